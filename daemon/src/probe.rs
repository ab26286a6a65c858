//! `vfud probe`: connect to a vfio-user socket as a client and report what a VMM would see.
//!
//! Works against any vfio-user server, not only vfud, so everything read from the socket is
//! treated as untrusted: capability chains are walked with loop and range checks and the
//! config-space read is bounded by the size the server reported (at most 4 KiB).

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;
use vfu_protocol::client::{Client, ClientError};
use vfu_protocol::command::{irq, region};
use vfu_protocol::reply::RegionCap;
use vfu_protocol::wire;

use crate::pci::caps::{
    self, CapabilityChain, EXT_CAP_ID_ATS, EXT_CAP_ID_NULL, EXT_CAP_ID_PASID, EXT_CAP_ID_PRI,
};

/// Why probing failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("connecting and negotiating with {socket} failed")]
    Connect {
        socket: String,
        #[source]
        source: ClientError,
    },
    #[error("{what} failed")]
    Query {
        what: String,
        #[source]
        source: ClientError,
    },
}

/// One region as reported.
#[derive(Debug, Serialize)]
pub struct RegionReport {
    pub index: u32,
    pub name: String,
    pub size: u64,
    pub flags: Vec<&'static str>,
    pub mmap_areas: Vec<(u64, u64)>,
    pub fd: bool,
}

/// One IRQ index as reported.
#[derive(Debug, Serialize)]
pub struct IrqReport {
    pub index: u32,
    pub name: &'static str,
    pub count: u32,
    pub flags: Vec<&'static str>,
}

/// One capability with decoded registers.
#[derive(Debug, Serialize)]
pub struct CapabilityReport {
    pub offset: usize,
    pub id: u16,
    pub name: &'static str,
    pub extended: bool,
    pub registers: Vec<(String, String)>,
}

/// Everything `probe` prints.
#[derive(Debug, Serialize)]
pub struct ProbeReport {
    pub socket: String,
    pub version: String,
    pub server_capabilities: serde_json::Value,
    pub device_flags: Vec<&'static str>,
    pub vendor_id: u16,
    pub device_id: u16,
    pub class_code: u32,
    pub regions: Vec<RegionReport>,
    pub irqs: Vec<IrqReport>,
    pub standard_capabilities: Vec<CapabilityReport>,
    pub extended_capabilities: Vec<CapabilityReport>,
    pub capability_errors: Vec<String>,
}

fn region_name(index: u32) -> String {
    match index {
        0..=5 => format!("BAR{index}"),
        region::ROM => "ROM".into(),
        region::CONFIG => "CONFIG".into(),
        region::VGA => "VGA".into(),
        i => format!("region {i}"),
    }
}

fn irq_name(index: u32) -> &'static str {
    match index {
        irq::INTX => "INTx",
        irq::MSI => "MSI",
        irq::MSIX => "MSI-X",
        irq::ERR => "ERR",
        irq::REQ => "REQ",
        _ => "other",
    }
}

fn flag_names(flags: u32, table: &[(u32, &'static str)]) -> Vec<&'static str> {
    table
        .iter()
        .filter(|(b, _)| flags & b != 0)
        .map(|(_, n)| *n)
        .collect()
}

fn bit(v: u32, b: u32) -> String {
    if v & (1 << b) != 0 { "1" } else { "0" }.to_string()
}

/// Decodes the registers of the capabilities vfud manages (ATS, PASID, PRI) and a few others.
fn decode(cs: &[u8], e: &caps::CapabilityEntry) -> Vec<(String, String)> {
    let u16_at = |o: usize| u32::from(caps::u16_at(cs, o));
    let u32_at = |o: usize| caps::u32_at(cs, o);
    let o = e.offset;
    let mut r = Vec::new();
    let mut push = |k: &str, v: String| r.push((k.to_string(), v));
    match (e.extended, e.id) {
        (true, EXT_CAP_ID_NULL) => {
            let next = u32_at(o) >> 20;
            let note = if o == caps::EXT_CAP_START {
                format!("placeholder for a hidden capability; the list continues at {next:#x}")
            } else {
                format!("null capability; the list continues at {next:#x}")
            };
            push("note", note);
        }
        (true, EXT_CAP_ID_ATS) => {
            let cap = u16_at(o + 4);
            let ctl = u16_at(o + 6);
            push("capability", format!("{cap:#06x}"));
            push("invalidate_queue_depth", (cap & 0x1f).to_string());
            push("page_aligned_request", bit(cap, 5));
            push("global_invalidate", bit(cap, 6));
            push("control", format!("{ctl:#06x}"));
            push("enable", bit(ctl, 15));
            push("stu", (ctl & 0x1f).to_string());
        }
        (true, EXT_CAP_ID_PASID) => {
            let cap = u16_at(o + 4);
            let ctl = u16_at(o + 6);
            push("capability", format!("{cap:#06x}"));
            push("exec_supported", bit(cap, 1));
            push("priv_supported", bit(cap, 2));
            push("max_pasid_width", ((cap >> 8) & 0x1f).to_string());
            push("control", format!("{ctl:#06x}"));
            push("enable", bit(ctl, 0));
            push("exec_enable", bit(ctl, 1));
            push("priv_enable", bit(ctl, 2));
        }
        (true, EXT_CAP_ID_PRI) => {
            let ctl = u16_at(o + 4);
            let status = u16_at(o + 6);
            push("control", format!("{ctl:#06x}"));
            push("enable", bit(ctl, 0));
            push("status", format!("{status:#06x}"));
            push("stopped", bit(status, 8));
            push("prg_response_pasid_required", bit(status, 15));
            push("outstanding_capacity", u32_at(o + 8).to_string());
            push("outstanding_allocation", u32_at(o + 12).to_string());
        }
        (false, id) if id == u16::from(caps::CAP_ID_MSIX) => {
            let ctl = u16_at(o + 2);
            push("table_size", ((ctl & 0x7ff) + 1).to_string());
            push("enable", bit(ctl, 15));
            let t = u32_at(o + 4);
            push("table", format!("BAR{} + {:#x}", t & 7, t & !7));
            let p = u32_at(o + 8);
            push("pba", format!("BAR{} + {:#x}", p & 7, p & !7));
        }
        (false, id) if id == u16::from(caps::CAP_ID_MSI) => {
            let ctl = u16_at(o + 2);
            push("enable", bit(ctl, 0));
            push("vectors_capable", (1u32 << ((ctl >> 1) & 7)).to_string());
            push("64bit", bit(ctl, 7));
        }
        (false, id) if id == u16::from(caps::CAP_ID_EXP) => {
            let flags = u16_at(o + 2);
            push("version", (flags & 0xf).to_string());
            push("port_type", ((flags >> 4) & 0xf).to_string());
        }
        _ => {}
    }
    r
}

/// Connects to `socket` and collects the report.
pub fn probe(socket: &Path) -> Result<ProbeReport, ProbeError> {
    let mut c = Client::connect(socket).map_err(|source| ProbeError::Connect {
        socket: socket.display().to_string(),
        source,
    })?;
    let q = |what: &str| {
        let what = what.to_string();
        move |source| ProbeError::Query { what, source }
    };
    let server = c.server().cloned();
    let info = c.device_info().map_err(q("DEVICE_GET_INFO"))?;
    let mut regions = Vec::new();
    for index in 0..info.num_regions.min(64) {
        let (d, fd) = c
            .region_info(index)
            .map_err(q(&format!("DEVICE_GET_REGION_INFO {index}")))?;
        let mut mmap_areas = Vec::new();
        for cap in &d.caps {
            if let RegionCap::SparseMmap(areas) = cap {
                mmap_areas.extend(areas.iter().map(|a| (a.offset, a.size)));
            }
        }
        regions.push(RegionReport {
            index,
            name: region_name(index),
            size: d.size,
            flags: flag_names(
                d.flags,
                &[
                    (wire::REGION_FLAG_READ, "read"),
                    (wire::REGION_FLAG_WRITE, "write"),
                    (wire::REGION_FLAG_MMAP, "mmap"),
                    (wire::REGION_FLAG_CAPS, "caps"),
                ],
            ),
            mmap_areas,
            fd: fd.is_some(),
        });
    }
    let mut irqs = Vec::new();
    for index in 0..info.num_irqs.min(64) {
        let i = c
            .irq_info(index)
            .map_err(q(&format!("DEVICE_GET_IRQ_INFO {index}")))?;
        irqs.push(IrqReport {
            index,
            name: irq_name(index),
            count: i.count,
            flags: flag_names(
                i.flags,
                &[
                    (wire::IRQ_INFO_EVENTFD, "eventfd"),
                    (wire::IRQ_INFO_MASKABLE, "maskable"),
                    (wire::IRQ_INFO_AUTOMASKED, "automasked"),
                    (wire::IRQ_INFO_NORESIZE, "noresize"),
                ],
            ),
        });
    }
    let config_size = regions
        .iter()
        .find(|r| r.index == region::CONFIG)
        .map_or(0, |r| r.size.min(caps::CONFIG_SPACE_SIZE as u64)) as usize;
    let max_xfer = server
        .as_ref()
        .map_or(4096, |s| s.caps.max_data_xfer_size)
        .clamp(4, 4096) as usize;
    let mut cs = Vec::with_capacity(config_size);
    while cs.len() < config_size {
        let n = max_xfer.min(config_size - cs.len());
        let chunk = c
            .region_read(region::CONFIG, cs.len() as u64, n as u32)
            .map_err(q("reading config space"))?;
        if chunk.is_empty() {
            break;
        }
        cs.extend_from_slice(&chunk);
    }
    let chain = CapabilityChain::walk(&cs);
    let report = |e: &caps::CapabilityEntry| CapabilityReport {
        offset: e.offset,
        id: e.id,
        name: if e.extended {
            caps::extended_name(e.id)
        } else {
            caps::standard_name(e.id as u8)
        },
        extended: e.extended,
        registers: decode(&cs, e),
    };
    let u16_at = |o: usize| caps::u16_at(&cs, o);
    Ok(ProbeReport {
        socket: socket.display().to_string(),
        version: server
            .as_ref()
            .map_or_else(String::new, |s| format!("{}.{}", s.major, s.minor)),
        server_capabilities: server
            .as_ref()
            .and_then(|s| serde_json::from_str(&s.caps.to_json()).ok())
            .unwrap_or(serde_json::Value::Null),
        device_flags: flag_names(
            info.flags,
            &[
                (wire::DEVICE_FLAG_RESET, "reset"),
                (wire::DEVICE_FLAG_PCI, "pci"),
            ],
        ),
        vendor_id: u16_at(0),
        device_id: u16_at(2),
        class_code: cs
            .get(9..12)
            .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], 0])),
        regions,
        irqs,
        standard_capabilities: chain.standard.iter().map(report).collect(),
        extended_capabilities: chain.extended.iter().map(report).collect(),
        capability_errors: chain
            .standard_error
            .iter()
            .chain(chain.extended_error.iter())
            .map(|e| e.to_string())
            .collect(),
    })
}

impl std::fmt::Display for ProbeReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut s = String::new();
        let _ = writeln!(s, "socket      {}", self.socket);
        let _ = writeln!(
            s,
            "protocol    {}  {}",
            self.version, self.server_capabilities
        );
        let _ = writeln!(
            s,
            "device      {:04x}:{:04x} class {:06x}  flags [{}]",
            self.vendor_id,
            self.device_id,
            self.class_code,
            self.device_flags.join(", ")
        );
        let _ = writeln!(s, "regions");
        for r in &self.regions {
            if r.size == 0 {
                let _ = writeln!(s, "  {:<7} absent", r.name);
                continue;
            }
            let _ = write!(
                s,
                "  {:<7} {:>#10x} bytes  [{}]",
                r.name,
                r.size,
                r.flags.join(", ")
            );
            if !r.mmap_areas.is_empty() {
                let areas: Vec<String> = r
                    .mmap_areas
                    .iter()
                    .map(|(o, l)| format!("{o:#x}+{l:#x}"))
                    .collect();
                let _ = write!(
                    s,
                    "  mmap {}{}",
                    areas.join(" "),
                    if r.fd { " (fd)" } else { "" }
                );
            }
            let _ = writeln!(s);
        }
        let _ = writeln!(s, "irqs");
        for i in &self.irqs {
            let _ = writeln!(
                s,
                "  {:<7} {:>3} vectors  [{}]",
                i.name,
                i.count,
                i.flags.join(", ")
            );
        }
        for (title, list) in [
            ("standard capabilities", &self.standard_capabilities),
            ("extended capabilities", &self.extended_capabilities),
        ] {
            let _ = writeln!(s, "{title}");
            for c in list {
                let _ = writeln!(s, "  [{:#05x}] {} (id {:#x})", c.offset, c.name, c.id);
                for (k, v) in &c.registers {
                    let _ = writeln!(s, "           {k:<28} {v}");
                }
            }
        }
        for e in &self.capability_errors {
            let _ = writeln!(s, "warning: {e}");
        }
        f.write_str(s.trim_end())
    }
}
