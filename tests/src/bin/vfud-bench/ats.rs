//! ATS through the shadow translation source: the ats-dma engine with ATS enabled translates
//! every page of a command through its ATC, whose misses are translation requests answered
//! from the connection's DMA map table, and a DMA_UNMAP is a device-TLB invalidation.
//!
//! Costs are isolated by differences between runs of the same command, each timed from the
//! CMD write to its completion interrupt: cold ATC (every page a translation request), warm
//! ATC (every page a hit) and ATS off (untranslated DMA, the baseline).

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use vfu_protocol::client::Client;
use vfu_protocol::command::irq;
use vfu_protocol::wire::{
    DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE, IRQ_SET_ACTION_TRIGGER, IRQ_SET_DATA_EVENTFD,
};
use vfud_tests::ats_dma::{self, atc_counters, enable_ats};
use vfud_tests::{eventfd, wait_eventfd, Daemon, GuestRam};

use crate::stats::Samples;
use crate::{Row, Sizes, ATS_DMA, PAGE};

/// Pages per command: within the engine's 256-entry ATC, so a repeat hits on every page.
const PAGES: u64 = 256;
const IOVA: u64 = 0x4000_0000;

/// One 4 KiB map per page, mapped from the highest IOVA down: the shadow source gives each new
/// map the next translated addresses, so neighbouring pages are not contiguous in translated
/// space and every page needs a completion of its own (a request may still carry several).
fn map_pages(c: &mut Client, ram: &GuestRam) {
    for i in (0..PAGES).rev() {
        let backing = (PAGES - 1 - i) * PAGE;
        c.dma_map(
            IOVA + i * PAGE,
            PAGE,
            DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE,
            Some((ram.fd(), backing)),
        )
        .expect("DMA_MAP of a page");
    }
}

fn unmap_pages(c: &mut Client) {
    for i in 0..PAGES {
        c.dma_unmap(IOVA + i * PAGE, PAGE, 0)
            .expect("DMA_UNMAP of a page");
    }
}

/// Fills every page once; returns the time from the CMD write to the completion interrupt.
fn timed_fill(c: &mut Client, ev: &nix::sys::eventfd::EventFd) -> Duration {
    use ats_dma::*;
    c.write_u32(0, SRC_LO, 0).unwrap();
    c.write_u32(0, SRC_HI, 0).unwrap();
    c.write_u32(0, DST_LO, IOVA as u32).unwrap();
    c.write_u32(0, DST_HI, (IOVA >> 32) as u32).unwrap();
    c.write_u32(0, LEN, (PAGES * PAGE) as u32).unwrap();
    c.write_u32(0, PATTERN, 0x5a5a_5a5a).unwrap();
    let t = Instant::now();
    c.write_u32(0, CMD, OP_FILL | CMD_IRQ).unwrap();
    assert_eq!(
        wait_eventfd(ev, Duration::from_secs(20)),
        1,
        "fill completion"
    );
    let took = t.elapsed();
    assert_eq!(wait_idle(c), (STATUS_DONE, ERR_NONE), "the fill failed");
    took
}

pub(crate) fn shadow(s: &Sizes, rows: &mut Vec<Row>) {
    let daemon = Daemon::start_logging(&[("bench0", ATS_DMA)], "info");
    let mut c = daemon.client();
    let ram = GuestRam::new(PAGES * PAGE);
    let ev = eventfd();
    c.set_irqs(
        irq::MSIX,
        IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
        0,
        1,
        &[ev.as_fd()],
        &[],
    )
    .expect("MSI-X eventfd");
    map_pages(&mut c, &ram);

    let mut off = Samples::default();
    for _ in 0..s.ats_runs {
        off.push(timed_fill(&mut c, &ev));
    }

    enable_ats(&mut c, 0);
    let (mut cold, mut warm, mut unmap_cached) =
        (Samples::default(), Samples::default(), Samples::default());
    let mut requests_per_run = 0;
    for _ in 0..s.ats_runs {
        let before = atc_counters(&mut c);
        cold.push(timed_fill(&mut c, &ev));
        let between = atc_counters(&mut c);
        warm.push(timed_fill(&mut c, &ev));
        let after = atc_counters(&mut c);
        assert!(
            between.misses > before.misses && after.misses == between.misses,
            "the cold run must miss and the warm run only hit"
        );
        assert_eq!(
            after.hits - between.hits,
            PAGES as u32,
            "warm run: a hit per page"
        );
        requests_per_run = between.requests - before.requests;
        // The device-TLB invalidation: unmapping pages whose translations are cached.
        let t = Instant::now();
        unmap_pages(&mut c);
        unmap_cached.push(t.elapsed() / PAGES as u32);
        assert_eq!(
            atc_counters(&mut c).entries,
            0,
            "the unmaps emptied the ATC"
        );
        map_pages(&mut c, &ram);
    }
    // The same unmaps without ATS: the table work alone, no invalidation to wait for.
    c.reset().expect("DEVICE_RESET turns ATS off");
    let mut unmap_plain = Samples::default();
    for _ in 0..s.ats_runs {
        let t = Instant::now();
        unmap_pages(&mut c);
        unmap_plain.push(t.elapsed() / PAGES as u32);
        map_pages(&mut c, &ram);
    }

    let per_page = |a: &Samples, b: &Samples| (a.median() - b.median()) / PAGES as f64;
    // A translation request may be answered with several completions (the shadow source
    // answers up to the requested length), so the miss cost is per translated page.
    let miss_ns = per_page(&cold, &warm);
    rows.push(Row {
        name: "ats.shadow.translated_pages_per_s".into(),
        value: 1e9 / miss_ns.max(1.0),
        unit: "/s",
        baseline: None,
        p99: None,
    });
    rows.push(Row {
        name: "ats.shadow.requests_per_256_pages".into(),
        value: f64::from(requests_per_run),
        unit: "",
        baseline: None,
        p99: None,
    });
    rows.push(Row {
        name: "ats.shadow.miss_cost_per_page".into(),
        value: miss_ns,
        unit: "ns",
        baseline: None,
        p99: None,
    });
    rows.push(Row {
        name: "ats.atc_hit_cost_per_page".into(),
        value: per_page(&warm, &off),
        unit: "ns",
        baseline: None,
        p99: None,
    });
    rows.push(Row {
        name: "ats.fill_1mib_warm_atc".into(),
        value: warm.median(),
        unit: "ns",
        baseline: Some(("the same fill, ATS off".into(), off.median())),
        p99: Some((warm.p99(), off.p99())),
    });
    rows.push(Row {
        name: "ats.unmap_with_atc_invalidation".into(),
        value: unmap_cached.median(),
        unit: "ns",
        baseline: Some(("DMA_UNMAP with ATS off".into(), unmap_plain.median())),
        p99: Some((unmap_cached.p99(), unmap_plain.p99())),
    });
}
