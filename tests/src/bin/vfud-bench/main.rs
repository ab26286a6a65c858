//! `vfud-bench`: measures the real `vfud` binary over its socket and reports every figure next
//! to a baseline measured in the same run, as a ratio. Prints a table, then one JSON object.
//!
//! Run it with a release build of both: `cargo run --release -p vfud-tests --bin vfud-bench`
//! (it uses `$VFUD_BIN`, else the `vfud` next to itself). `--quick` shrinks every measurement
//! so CI can check that the benchmark still runs; its numbers are not meant to be read.

mod ats;
mod floor;
mod models;
mod stats;
mod wire;

use std::time::Instant;

use serde_json::{json, Map, Value};
use vfu_protocol::client::Client;
use vfu_protocol::wire::{DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE};
use vfud_tests::{ats_dma, Daemon, GuestRam};

use stats::Samples;
use wire::RawConnection;

pub(crate) const ATS_DMA: &str = r#"{"type":"emulated","model":"ats-dma"}"#;
const CONFIG_REGION: u32 = 7;
const BAR0: u32 = 0;
pub(crate) const PAGE: u64 = 4096;

/// How much work each measurement does.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sizes {
    pub(crate) warmup: usize,
    pub(crate) round_trips: usize,
    pub(crate) posted: usize,
    pub(crate) churn_pairs: usize,
    pub(crate) live_maps: &'static [usize],
    pub(crate) scale_devices: usize,
    pub(crate) scale_clients: usize,
    pub(crate) ats_runs: usize,
}

const FULL: Sizes = Sizes {
    warmup: 2_000,
    round_trips: 50_000,
    posted: 200_000,
    churn_pairs: 5_000,
    live_maps: &[10, 1_000, 65_535],
    scale_devices: 256,
    scale_clients: 8,
    ats_runs: 41,
};

const QUICK: Sizes = Sizes {
    warmup: 100,
    round_trips: 1_000,
    posted: 2_000,
    churn_pairs: 200,
    live_maps: &[10, 1_000],
    scale_devices: 16,
    scale_clients: 4,
    ats_runs: 3,
};

/// One reported figure.
pub(crate) struct Row {
    pub(crate) name: String,
    pub(crate) value: f64,
    pub(crate) unit: &'static str,
    pub(crate) baseline: Option<(String, f64)>,
    pub(crate) p99: Option<(f64, f64)>,
}

impl Row {
    fn ratio(&self) -> Option<f64> {
        self.baseline.as_ref().map(|(_, b)| self.value / b)
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let sizes = if quick { QUICK } else { FULL };
    let started = Instant::now();
    let mut rows = Vec::new();

    round_trips(&sizes, &mut rows);
    dma_churn(&sizes, &mut rows);
    ats::shadow(&sizes, &mut rows);
    models::vtd(&sizes, &mut rows);
    models::smmuv3(&sizes, &mut rows);
    scale(&sizes, &mut rows);
    idle_memory(&mut rows);

    print_table(&rows);
    let mut obj = Map::new();
    obj.insert("quick".into(), json!(quick));
    obj.insert("seconds".into(), json!(started.elapsed().as_secs_f64()));
    obj.insert(
        "commit".into(),
        json!(option_env!("VFUD_COMMIT").unwrap_or("unknown")),
    );
    for r in &rows {
        let mut o = Map::new();
        o.insert("value".into(), json!(r.value));
        o.insert("unit".into(), json!(r.unit));
        if let Some((name, b)) = &r.baseline {
            o.insert("baseline".into(), json!(name));
            o.insert("baseline_value".into(), json!(b));
            o.insert("ratio".into(), json!(r.ratio()));
        }
        if let Some((p, bp)) = r.p99 {
            o.insert("p99".into(), json!(p));
            o.insert("baseline_p99".into(), json!(bp));
        }
        obj.insert(r.name.clone(), Value::Object(o));
    }
    println!("{}", Value::Object(obj));
}

fn print_table(rows: &[Row]) {
    println!(
        "{:<44} {:>14} {:>14} {:>8} {:>22}",
        "figure", "vfud", "baseline", "ratio", "p99 (vfud / baseline)"
    );
    for r in rows {
        let base = r
            .baseline
            .as_ref()
            .map(|(_, b)| format!("{b:.0}"))
            .unwrap_or_else(|| "-".into());
        let ratio = r
            .ratio()
            .map(|x| format!("{x:.2}x"))
            .unwrap_or_else(|| "-".into());
        let p99 = r
            .p99
            .map(|(a, b)| format!("{a:.0} / {b:.0}"))
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<44} {:>10.0} {:<3} {:>14} {:>8} {:>22}",
            r.name, r.value, r.unit, base, ratio, p99
        );
    }
}

/// A negotiated connection handed over to the lean requester.
fn raw_connection(client: &Client) -> RawConnection {
    RawConnection::new(
        client
            .socket()
            .try_clone()
            .expect("dup of the client socket"),
    )
}

fn measure_reads(conn: &mut RawConnection, region: u32, offset: u64, s: &Sizes) -> Samples {
    let mut samples = Samples::with_capacity(s.round_trips);
    for i in 0..s.warmup + s.round_trips {
        let t = Instant::now();
        conn.region_read(region, offset, 4).expect("REGION_READ");
        if i >= s.warmup {
            samples.push(t.elapsed());
        }
    }
    samples
}

fn round_trips(s: &Sizes, rows: &mut Vec<Row>) {
    let daemon = Daemon::start_logging(&[("bench0", ATS_DMA)], "info");
    let client = daemon.client();
    let mut conn = raw_connection(&client);

    // A 4-byte REGION_READ is a 32-byte request and a 36-byte reply.
    let floor = floor::ping_pong(32, 36, s.warmup, s.round_trips);
    for (name, region, offset) in [
        ("rtt.config_read_4", CONFIG_REGION, 0),
        ("rtt.bar0_read_4", BAR0, ats_dma::ID),
    ] {
        let got = measure_reads(&mut conn, region, offset, s);
        rows.push(Row {
            name: name.into(),
            value: got.median(),
            unit: "ns",
            baseline: Some(("socketpair ping-pong 32/36 B".into(), floor.median())),
            p99: Some((got.p99(), floor.p99())),
        });
    }

    // Posted 4-byte REGION_WRITEs (36 bytes each) to a side-effect-free register, closed by a
    // read that, served in order, proves every write was handled.
    let floor_ns = floor::posted_stream(36, s.posted);
    let t = Instant::now();
    for i in 0..s.posted {
        conn.region_write_posted(BAR0, ats_dma::PATTERN, &(i as u32).to_le_bytes())
            .expect("posted REGION_WRITE");
    }
    conn.region_read(BAR0, ats_dma::PATTERN, 4)
        .expect("closing REGION_READ");
    let ns = t.elapsed().as_nanos() as f64 / s.posted as f64;
    rows.push(Row {
        name: "stream.posted_write_4".into(),
        value: ns,
        unit: "ns",
        baseline: Some(("socketpair posted 36 B stream".into(), floor_ns)),
        p99: None,
    });
}

fn dma_churn(s: &Sizes, rows: &mut Vec<Row>) {
    let mut baseline = None;
    for &live in s.live_maps {
        let daemon = Daemon::start_logging(&[("bench0", ATS_DMA)], "info");
        let mut client = daemon.client();
        // One page per map plus a gap page, so no two maps are adjacent; the memfd is sparse.
        let ram = GuestRam::new((live as u64 + 1) * 2 * PAGE);
        let rw = DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE;
        // The churned map is the `live`-th one at its peak: `live` is the count in the table.
        for i in 0..live as u64 - 1 {
            let off = i * 2 * PAGE;
            client
                .dma_map(off, PAGE, rw, Some((ram.fd(), off)))
                .unwrap_or_else(|e| panic!("DMA_MAP {i} of {live}: {e:?}"));
        }
        let churn_at = (live as u64 - 1) * 2 * PAGE;
        let mut t = Instant::now();
        for i in 0..s.warmup + s.churn_pairs {
            if i == s.warmup {
                t = Instant::now();
            }
            client
                .dma_map(churn_at, PAGE, rw, Some((ram.fd(), churn_at)))
                .expect("churn DMA_MAP");
            client
                .dma_unmap(churn_at, PAGE, 0)
                .expect("churn DMA_UNMAP");
        }
        let per_sec = s.churn_pairs as f64 / t.elapsed().as_secs_f64();
        let base = *baseline.get_or_insert((live, per_sec));
        rows.push(Row {
            name: format!("dma.map_unmap_pairs_per_s.{live}_live"),
            value: per_sec,
            unit: "/s",
            baseline: (live != base.0).then(|| (format!("{} live maps", base.0), base.1)),
            p99: None,
        });
    }
}

fn scale(s: &Sizes, rows: &mut Vec<Row>) {
    let one = Daemon::start_logging(&[("bench0", ATS_DMA)], "info");
    let rss_one = one.rss_kib();
    drop(one);

    let names: Vec<String> = (0..s.scale_devices).map(|i| format!("dev{i}")).collect();
    let configs: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), ATS_DMA)).collect();
    let t = Instant::now();
    let daemon = Daemon::start_logging(&configs, "info");
    let startup = t.elapsed();
    let rss_all = daemon.rss_kib();
    rows.push(Row {
        name: format!("scale.startup_to_ready_ms.{}_devices", s.scale_devices),
        value: startup.as_secs_f64() * 1e3,
        unit: "ms",
        baseline: None,
        p99: None,
    });
    rows.push(Row {
        name: "scale.rss_per_idle_device_kib".into(),
        value: rss_all.saturating_sub(rss_one) as f64 / (s.scale_devices - 1) as f64,
        unit: "KiB",
        baseline: None,
        p99: None,
    });

    let n = s.scale_clients;
    let vfud = std::thread::scope(|scope| {
        let workers: Vec<_> = names[..n]
            .iter()
            .map(|name| {
                let client = daemon.client_of(name);
                scope.spawn(move || {
                    let mut conn = raw_connection(&client);
                    measure_reads(&mut conn, CONFIG_REGION, 0, s)
                })
            })
            .collect();
        let mut all = Samples::default();
        for w in workers {
            all.extend(w.join().expect("bench client"));
        }
        all
    });
    let floor = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..n)
            .map(|_| scope.spawn(|| floor::ping_pong(32, 36, s.warmup, s.round_trips)))
            .collect();
        let mut all = Samples::default();
        for w in workers {
            all.extend(w.join().expect("floor pair"));
        }
        all
    });
    rows.push(Row {
        name: format!("scale.rtt.config_read_4.{n}_clients"),
        value: vfud.median(),
        unit: "ns",
        baseline: Some((format!("{n} socketpair ping-pongs"), floor.median())),
        p99: Some((vfud.p99(), floor.p99())),
    });
}

fn idle_memory(rows: &mut Vec<Row>) {
    let daemon = Daemon::start_logging(&[("bench0", ATS_DMA)], "info");
    rows.push(Row {
        name: "memory.idle_rss_default_device_kib".into(),
        value: daemon.rss_kib() as f64,
        unit: "KiB",
        baseline: None,
        p99: None,
    });
}
