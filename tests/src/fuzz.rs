//! Bodies of the fuzz targets under `tests/fuzz/`, kept here so that the committed corpus and
//! every regression input also run as an ordinary test (`tests/tests/fuzz_corpus.rs`) on the
//! stable toolchain. Each body drives one untrusted-input parser the way the daemon does and
//! asserts the invariants the daemon relies on; any panic is a bug. Each returns whether the
//! input got past the first parsing stage, so the corpus test can tell the seeds still reach
//! the deep paths.

use std::os::fd::{AsFd, OwnedFd};

use vfu_config::{CapabilityPolicies, CapabilityPolicy, IommuSpec};
use vfu_protocol::frame::{Decoded, FrameDecoder, FrameLimits};
use vfu_protocol::negotiate::{negotiate, ServerLimits, VersionPayload};
use vfu_protocol::request::Request;
use vfu_protocol::Command;
use vfud::pci::virtual_config::{self, PolicyRequest};
use vfud::pci::{CapabilityChain, HostIommuCaps};

const EXT_CAP_ATS: u16 = 0x000f;
const EXT_CAP_PRI: u16 = 0x0013;
const EXT_CAP_PASID: u16 = 0x001b;

/// A byte cursor over the fuzzer's input.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(*b)
    }

    fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        head
    }
}

/// A few real fds to attach to messages, as a client would (the decoder must close the ones a
/// message may not carry).
fn some_fds(n: usize) -> Vec<OwnedFd> {
    (0..n)
        .filter_map(|_| std::io::stderr().as_fd().try_clone_to_owned().ok())
        .collect()
}

/// The message stream of one connection: the input is a series of records
/// `[chunk length][fd count][bytes]`, fed to the decoder as the reader task feeds `recvmsg`
/// results, with the server's negotiated limits. Every complete command is parsed into a
/// typed request, and the first one, if it is VERSION, is negotiated.
pub fn message_stream(data: &[u8]) -> bool {
    let limits = ServerLimits::default();
    let frame_limits = FrameLimits::for_xfer_size(limits.max_data_xfer_size, limits.max_msg_fds);
    let mut decoder = FrameDecoder::new(frame_limits);
    let mut input = Input(data);
    let mut first = true;
    let mut parsed = false;
    while let (Some(len), Some(nfds)) = (input.byte(), input.byte()) {
        let chunk = input.take(usize::from(len) + 1);
        if chunk.is_empty() {
            break;
        }
        let mut fed = 0;
        // A chunk may span several reads when the decoder asks for less than it holds.
        while fed < chunk.len() {
            let buf = decoder.read_buf();
            assert!(!buf.is_empty(), "the decoder asked for an empty read");
            let n = buf.len().min(chunk.len() - fed);
            buf[..n].copy_from_slice(&chunk[fed..fed + n]);
            fed += n;
            let nfds = usize::from(nfds % 20);
            let fds = if fed == n && nfds <= frame_limits.max_fds {
                some_fds(nfds)
            } else {
                if fed == n && nfds > 0 {
                    decoder.reject_fds();
                }
                Vec::new()
            };
            match decoder.advance(n, fds) {
                Ok(Decoded::Pending) => {}
                Ok(Decoded::Frame(frame)) => {
                    assert!(frame.payload.len() <= frame_limits.max_payload);
                    assert!(frame.fds.len() <= frame_limits.max_fds);
                    if first && frame.header.command == Command::Version as u16 {
                        if let Ok(offer) = VersionPayload::parse(&frame.payload) {
                            let _ = negotiate(&offer, &limits);
                        }
                    }
                    first = false;
                    if frame.is_command() {
                        parsed |= Request::parse(frame, limits.max_data_xfer_size).is_ok();
                    }
                }
                Ok(Decoded::Rejected(..)) => first = false,
                // The connection would be closed here.
                Err(_) => return parsed,
            }
        }
    }
    parsed
}

/// A device's config space under every policy: the first bytes pick the policies, the host
/// capabilities and the space's size; then comes the device's config space, then guest
/// accesses `[offset lo][offset hi][len][write?][data]` applied to the virtual space.
pub fn config_space(data: &[u8]) -> bool {
    let mut input = Input(data);
    let (Some(p), Some(h), Some(size)) = (input.byte(), input.byte(), input.byte()) else {
        return false;
    };
    let policy = |bits: u8| match bits % 3 {
        0 => CapabilityPolicy::Auto,
        1 => CapabilityPolicy::On,
        _ => CapabilityPolicy::Off,
    };
    let len = match size % 3 {
        0 => 256,
        1 => 4096,
        _ => 0x40 + usize::from(size),
    };
    let mut device = input.take(len).to_vec();
    device.resize(len, 0);
    // The raw walker sees every chain, valid or not.
    let _ = CapabilityChain::walk(&device);

    let spec = IommuSpec {
        ats_supported: h & 1 != 0,
        max_pasid_log2: (h >> 1) % 21,
        pasid_exec: h & 0x40 != 0,
        pasid_priv: h & 0x80 != 0,
    };
    let mut request = PolicyRequest::new("fuzz");
    request.policies = CapabilityPolicies::explicit(policy(p), policy(p / 3), policy(p / 9));
    request.host = HostIommuCaps::from_spec(&spec);
    request.viommu_pasid = match p / 27 % 3 {
        0 => None,
        1 => Some(true),
        _ => Some(false),
    };
    request.pasid_cap_hidden = p & 0x80 != 0;
    let Ok(mut space) = virtual_config::build(&device, &request) else {
        return false;
    };
    let exposed = space.exposed();
    let guest = space
        .guest_bytes(&device)
        .expect("the whole space is readable");
    assert_eq!(guest.len(), space.len());
    // The guest finds a managed capability in the chain it walks exactly where the policy
    // exposed it, and never one the policy masked.
    let chain = CapabilityChain::walk(&guest);
    for (id, at) in [
        (EXT_CAP_ATS, exposed.ats),
        (EXT_CAP_PASID, exposed.pasid),
        (EXT_CAP_PRI, exposed.pri),
    ] {
        assert_eq!(chain.find_extended(id), at, "extended capability {id:#x}");
    }

    while let (Some(lo), Some(hi), Some(n), Some(write)) =
        (input.byte(), input.byte(), input.byte(), input.byte())
    {
        let offset = u64::from(u16::from_le_bytes([lo, hi]) % 0x1010);
        let n = usize::from(n % 9);
        if write & 1 != 0 {
            let bytes = input.take(n);
            let _ = space.write(offset, bytes);
        } else {
            let mut buf = [0u8; 8];
            let in_range = offset as usize + n <= device.len();
            let dev = device
                .get(offset as usize..offset as usize + n)
                .unwrap_or(&[]);
            let r = space.read(offset, dev, &mut buf[..n]);
            if in_range && n > 0 {
                assert!(r.is_ok(), "in-range read at {offset:#x}+{n} failed: {r:?}");
            }
        }
    }
    space.reset();
    true
}

/// A device configuration file as `vfud run` and `check-config` load it.
pub fn config_json(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else {
        return false;
    };
    match vfu_config::parse_str(text, None) {
        Ok(config) => vfud::device::resolve_capabilities(&config).is_ok(),
        Err(_) => false,
    }
}

/// Operations the vIOMMU bodies decode from the input, after the model's properties and the
/// initial guest memory.
#[derive(Debug, Clone, Copy)]
enum ModelOp {
    Write {
        offset: u64,
        value: u64,
        wide: bool,
    },
    Read {
        offset: u64,
        wide: bool,
    },
    Dma {
        sid: u16,
        pasid: Option<u32>,
        addr: u64,
        write: bool,
        translated: bool,
    },
    Ats {
        sid: u16,
        pasid: Option<u32>,
        addr: u64,
        len: u64,
        no_write: bool,
    },
    Ack,
    Timeout,
    Service,
}

/// Guest memory every model fuzz input starts from: `[0, GUEST_BYTES)`.
const GUEST_BYTES: usize = 64 * 1024;
/// Operations per input; each is bounded by the model, so the input is too.
const MAX_OPS: usize = 512;

fn u64_le(input: &mut Input<'_>, n: usize) -> u64 {
    input
        .take(n)
        .iter()
        .rev()
        .fold(0u64, |acc, b| acc << 8 | u64::from(*b))
}

fn model_ops(input: &mut Input<'_>, window: u64) -> Vec<ModelOp> {
    let mut ops = Vec::new();
    while let Some(op) = input.byte() {
        if ops.len() == MAX_OPS {
            break;
        }
        let flags = input.byte().unwrap_or(0);
        let pasid = (flags & 1 != 0).then(|| u64_le(input, 3) as u32 & 0xf_ffff);
        ops.push(match op % 7 {
            0 => ModelOp::Write {
                offset: (u64_le(input, 2) % window) & !3,
                value: u64_le(input, 8),
                wide: flags & 2 != 0,
            },
            1 => ModelOp::Read {
                offset: (u64_le(input, 2) % window) & !3,
                wide: flags & 2 != 0,
            },
            2 => ModelOp::Dma {
                sid: u64_le(input, 2) as u16,
                pasid,
                addr: u64_le(input, 8),
                write: flags & 4 != 0,
                translated: flags & 8 != 0,
            },
            3 => ModelOp::Ats {
                sid: u64_le(input, 2) as u16,
                pasid,
                addr: u64_le(input, 8),
                len: u64_le(input, 3),
                no_write: flags & 4 != 0,
            },
            4 => ModelOp::Ack,
            5 => ModelOp::Timeout,
            _ => ModelOp::Service,
        });
    }
    ops
}

fn guest_bytes(input: &mut Input<'_>) -> Vec<u8> {
    // A length byte says how much of the window the input fills; the rest is zero.
    let fill = usize::from(input.byte().unwrap_or(0)) * 256;
    let mut bytes = input.take(fill).to_vec();
    bytes.resize(GUEST_BYTES, 0);
    bytes
}

/// The embedded VT-d model under random properties, guest memory, register writes, DMA,
/// ATS requests, invalidation acknowledgements and timeouts. Returns whether the model was
/// built and ran at least one operation.
pub fn viommu_vtd(data: &[u8]) -> bool {
    use vfud::viommu::vtd::{self, Vtd, VtdConfig, VtdEvent};
    let mut input = Input(data);
    let (Some(a), Some(b)) = (input.byte(), input.byte()) else {
        return false;
    };
    let config = VtdConfig {
        aw_bits: [39, 48, 57][usize::from(a % 3)],
        scalable_mode: a & 4 != 0,
        first_stage: a & 8 != 0,
        second_stage: a & 16 != 0,
        nested: a & 32 != 0,
        pass_through: a & 64 != 0,
        device_iotlb: a & 128 != 0,
        pasid_bits: b % 21,
        fs1gp: b & 32 != 0,
        fs5lp: b & 64 != 0,
        ss_2m: b & 128 != 0,
        ..VtdConfig::default()
    };
    let Ok(mut model) = Vtd::new(config) else {
        return false;
    };
    let mut mem = vtd::VecGuestMemory::from_bytes(0, guest_bytes(&mut input));
    let ops = model_ops(&mut input, model.window_size());
    let mut outstanding = Vec::new();
    for op in &ops {
        match *op {
            ModelOp::Write {
                offset,
                value,
                wide,
            } => {
                let bytes = value.to_le_bytes();
                let _ = model.mmio_write(&mut mem, offset, &bytes[..if wide { 8 } else { 4 }]);
            }
            ModelOp::Read { offset, wide } => {
                let mut buf = [0u8; 8];
                let _ = model.mmio_read(offset, &mut buf[..if wide { 8 } else { 4 }]);
            }
            ModelOp::Dma {
                sid,
                pasid,
                addr,
                write,
                translated,
            } => {
                let req = vtd::DmaRequest {
                    sid,
                    pasid,
                    addr,
                    write,
                    privileged: false,
                };
                if translated {
                    let _ = model.translated_dma(&mut mem, &req);
                } else {
                    let _ = model.translate_dma(&mut mem, &req);
                }
            }
            ModelOp::Ats {
                sid,
                pasid,
                addr,
                len,
                no_write,
            } => {
                let req = vtd::AtsRequest {
                    sid,
                    pasid,
                    addr,
                    len,
                    no_write,
                    exec: false,
                    privileged: false,
                    max_entries: 8,
                    stu_log2: 12,
                };
                if let Ok(entries) = model.translation_request(&mut mem, &req) {
                    assert!(entries.len() <= vtd::MAX_ATS_ENTRIES);
                    for e in &entries {
                        assert!(!(no_write && e.w), "W granted on a No-Write request");
                    }
                }
            }
            ModelOp::Ack => {
                if let Some(tag) = outstanding.pop() {
                    model.ack_atc_invalidation(&mut mem, tag);
                }
            }
            ModelOp::Timeout => model.atc_invalidation_timeout(),
            ModelOp::Service => model.service_queue(&mut mem),
        }
        for event in model.take_events() {
            if let VtdEvent::InvalidateDeviceAtc(inv) = event {
                outstanding.push(inv.tag);
            }
        }
        assert!(outstanding.len() <= 4 * vtd::MAX_OUTSTANDING_ATC + MAX_OPS);
    }
    !ops.is_empty()
}

/// The embedded SMMUv3 model under random properties, guest memory, register writes, DMA,
/// ATS requests, invalidation acknowledgements and timeouts. Returns whether the model was
/// built and ran at least one operation.
pub fn viommu_smmuv3(data: &[u8]) -> bool {
    use vfud::viommu::smmuv3::{self, Smmuv3, Smmuv3Output, Smmuv3Properties};
    let mut input = Input(data);
    let (Some(a), Some(b)) = (input.byte(), input.byte()) else {
        return false;
    };
    let props = Smmuv3Properties {
        stage1: a & 1 != 0,
        stage2: a & 2 != 0,
        ats: a & 4 != 0,
        ril: a & 8 != 0,
        ssid_bits: b % 21,
        ..Smmuv3Properties::default()
    };
    let Ok(mut model) = Smmuv3::new(props) else {
        return false;
    };
    let mem = smmuv3::VecMemory::from_bytes(0, guest_bytes(&mut input));
    let ops = model_ops(&mut input, smmuv3::REGISTER_WINDOW_SIZE);
    let mut outstanding = Vec::new();
    for op in &ops {
        match *op {
            ModelOp::Write {
                offset,
                value,
                wide,
            } => {
                model.mmio_write(&mem, offset, if wide { 8 } else { 4 }, value);
            }
            ModelOp::Read { offset, wide } => {
                model.mmio_read(offset, if wide { 8 } else { 4 });
            }
            ModelOp::Dma {
                sid,
                pasid,
                addr,
                write,
                translated,
            } => {
                let req = smmuv3::DmaRequest {
                    sid: u32::from(sid),
                    ssid: pasid,
                    address: addr,
                    access: smmuv3::Access {
                        write,
                        ..Default::default()
                    },
                };
                if translated {
                    let _ = model.translated_dma(&mem, &req);
                } else {
                    let _ = model.translate_dma(&mem, &req);
                }
            }
            ModelOp::Ats {
                sid,
                pasid,
                addr,
                len,
                no_write,
            } => {
                let req = smmuv3::AtsRequest {
                    sid: u32::from(sid),
                    ssid: pasid,
                    address: addr,
                    length: len,
                    no_write,
                    exec: false,
                    privileged: false,
                };
                if let Ok(entries) = model.translate_ats(&mem, &req, 8) {
                    assert!(entries.len() <= smmuv3::MAX_ATS_ENTRIES);
                }
            }
            ModelOp::Ack => {
                if let Some(id) = outstanding.pop() {
                    model.ack_atc_invalidation(&mem, id);
                }
            }
            ModelOp::Timeout => {
                model.atc_invalidation_timeout();
            }
            ModelOp::Service => {
                model.process_commands(&mem);
            }
        }
        for output in model.take_outputs() {
            if let Smmuv3Output::AtcInvalidate(inv) = output {
                outstanding.push(inv.id);
            }
        }
        assert!(outstanding.len() <= smmuv3::MAX_OUTSTANDING_ATC_INVALIDATIONS + MAX_OPS);
    }
    !ops.is_empty()
}
