//! The status counters in the Prometheus (OpenMetrics) text format, for `vfud metrics`.
//!
//! Built from a [`DaemonStatus`] at every scrape, so metrics and `vfud status` always agree.
//! Every series is labelled with its device; see README "Metrics" for the list.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::ops::status::{DaemonStatus, DeviceState};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeviceLabels {
    device: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    device: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CommandLabels {
    device: String,
    command: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IrqLabels {
    device: String,
    index: String,
}

type GaugeF = Gauge<f64, std::sync::atomic::AtomicU64>;

fn gauge_i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Registers a family and returns a handle to fill it.
fn family<L, M>(registry: &mut Registry, name: &str, help: &str) -> Family<L, M>
where
    L: EncodeLabelSet + Clone + std::hash::Hash + Eq + std::fmt::Debug + Send + Sync + 'static,
    M: prometheus_client::metrics::TypedMetric
        + prometheus_client::encoding::EncodeMetric
        + Default
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let f = Family::<L, M>::default();
    registry.register(name, help, f.clone());
    f
}

/// The OpenMetrics text (which Prometheus scrapes natively), ending with `# EOF`.
pub fn render(status: &DaemonStatus) -> Result<String, std::fmt::Error> {
    let mut r = Registry::with_prefix("vfud");
    let uptime = GaugeF::default();
    r.register(
        "uptime_seconds",
        "Seconds since the daemon started",
        uptime.clone(),
    );
    uptime.set(status.uptime_seconds);
    let invalid = Gauge::<i64>::default();
    r.register(
        "invalid_config_files",
        "Configuration files refused at the last (re)load",
        invalid.clone(),
    );
    invalid.set(status.invalid_files.len() as i64);

    let state: Family<StateLabels, Gauge> = family(
        &mut r,
        "device_state",
        "1 for the state the device is in (listening, connected, failed), 0 for the others",
    );
    let dev_uptime: Family<DeviceLabels, GaugeF> = family(
        &mut r,
        "device_uptime_seconds",
        "Seconds since the device instance started",
    );
    let connections: Family<DeviceLabels, Counter> = family(
        &mut r,
        "device_connections",
        "Clients accepted since the device started",
    );
    let maps: Family<DeviceLabels, Gauge> =
        family(&mut r, "dma_maps", "DMA maps of the current client");
    let bytes: Family<DeviceLabels, Gauge> = family(
        &mut r,
        "dma_mapped_bytes",
        "Bytes covered by the DMA maps of the current client",
    );
    let irqs: Family<IrqLabels, Gauge> = family(
        &mut r,
        "irqs_wired",
        "Interrupt vectors wired to client eventfds, per IRQ index",
    );
    let messages: Family<CommandLabels, Counter> = family(
        &mut r,
        "messages",
        "vfio-user messages handled, per command",
    );
    let errors: Family<CommandLabels, Counter> = family(
        &mut r,
        "message_errors",
        "vfio-user messages that failed, per command",
    );
    let ats_requests: Family<DeviceLabels, Counter> = family(
        &mut r,
        "ats_translation_requests",
        "ATS translation requests the device sent",
    );
    let ats_hits: Family<DeviceLabels, Counter> = family(
        &mut r,
        "ats_atc_hits",
        "Accesses answered from the device ATC",
    );
    let ats_misses: Family<DeviceLabels, Counter> = family(
        &mut r,
        "ats_atc_misses",
        "Accesses that needed a translation request",
    );
    let ats_invalidations: Family<DeviceLabels, Counter> = family(
        &mut r,
        "ats_invalidations",
        "ATC invalidation requests received",
    );

    for d in &status.devices {
        let device = DeviceLabels {
            device: d.name.clone(),
        };
        for s in [
            DeviceState::Listening,
            DeviceState::Connected,
            DeviceState::Failed,
        ] {
            state
                .get_or_create(&StateLabels {
                    device: d.name.clone(),
                    state: s.to_string(),
                })
                .set(i64::from(d.state == s));
        }
        if d.state == DeviceState::Failed {
            continue;
        }
        dev_uptime.get_or_create(&device).set(d.uptime_seconds);
        connections.get_or_create(&device).inc_by(d.connections);
        maps.get_or_create(&device).set(gauge_i(d.dma.maps));
        bytes.get_or_create(&device).set(gauge_i(d.dma.bytes));
        for i in &d.irqs {
            irqs.get_or_create(&IrqLabels {
                device: d.name.clone(),
                index: i.name.clone(),
            })
            .set(i64::from(i.wired));
        }
        for c in &d.messages.by_command {
            let labels = CommandLabels {
                device: d.name.clone(),
                command: c.command.clone(),
            };
            messages.get_or_create(&labels).inc_by(c.messages);
            errors.get_or_create(&labels).inc_by(c.errors);
        }
        if let Some(a) = &d.ats {
            ats_requests.get_or_create(&device).inc_by(a.requests);
            ats_hits.get_or_create(&device).inc_by(a.hits);
            ats_misses.get_or_create(&device).inc_by(a.misses);
            ats_invalidations
                .get_or_create(&device)
                .inc_by(a.invalidations);
        }
    }
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &r)?;
    Ok(text)
}
