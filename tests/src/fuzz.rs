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
