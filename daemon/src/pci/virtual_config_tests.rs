//! Tests of the policy layer over hand-built, fuzzed and randomly laid out config spaces.

use proptest::prelude::*;

use super::*;
use crate::pci::caps::{
    CapabilityChain, CAP_ID_EXP, EXT_CAP_ID_ATS, EXT_CAP_ID_NULL, EXT_CAP_ID_PASID, EXT_CAP_ID_PRI,
    STATUS_CAP_LIST,
};
use crate::pci::config::ConfigSpaceBuilder;
use crate::pci::policy::{CompatLevel, IommuSpec, PolicyOrigin, PolicySetting};

const AER: u16 = 0x0001;
const DSN: u16 = 0x0003;
const VSEC: u16 = 0x000b;

use CapabilityPolicy::{Auto, Off, On};

/// A hand-built device config space: a PCI Express endpoint header whose standard list holds
/// one PCI Express capability at 0x40, plus extended capabilities where a test puts them.
struct Raw(Vec<u8>);

impl Raw {
    fn new() -> Raw {
        let mut b = vec![0u8; CONFIG_SPACE_SIZE];
        b[0..4].copy_from_slice(&[0x36, 0x1b, 0xfd, 0x00]);
        b[0x06] = STATUS_CAP_LIST as u8;
        b[0x34] = 0x40;
        b[0x40] = CAP_ID_EXP;
        b[0x42] = 0x02;
        Raw(b)
    }

    fn put16(&mut self, at: usize, v: u16) -> &mut Raw {
        self.0[at..at + 2].copy_from_slice(&v.to_le_bytes());
        self
    }

    fn put32(&mut self, at: usize, v: u32) -> &mut Raw {
        self.0[at..at + 4].copy_from_slice(&v.to_le_bytes());
        self
    }

    /// Links `chain` (offset, id) in that order, version 1, with plausible register contents
    /// for the managed capabilities.
    fn ext(&mut self, chain: &[(usize, u16)]) -> &mut Raw {
        for (i, (at, id)) in chain.iter().enumerate() {
            let next = chain.get(i + 1).map_or(0, |(n, _)| *n as u32);
            let version = if *id == EXT_CAP_ID_NULL { 0 } else { 1 };
            self.put32(*at, u32::from(*id) | version << 16 | next << 20);
            match *id {
                EXT_CAP_ID_ATS => {
                    self.put16(at + 4, 0x0020);
                }
                EXT_CAP_ID_PASID => {
                    self.put16(at + 4, 0x1406);
                }
                EXT_CAP_ID_PRI => {
                    self.put16(at + 6, 0x0100).put32(at + 8, 32);
                }
                _ => {}
            }
        }
        self
    }
}

fn explicit(
    ats: CapabilityPolicy,
    pasid: CapabilityPolicy,
    pri: CapabilityPolicy,
) -> CapabilityPolicies {
    CapabilityPolicies::explicit(ats, pasid, pri)
}

fn request(policies: CapabilityPolicies) -> PolicyRequest<'static> {
    PolicyRequest {
        policies,
        ..PolicyRequest::new("dev0")
    }
}

/// The extended chain of the guest view as (offset, id), insisting on well-formed chains.
fn guest_chain(view: &VirtualConfigSpace, raw: &Raw) -> Vec<(usize, u16)> {
    let bytes = view.guest_bytes(&raw.0).expect("whole view");
    let chain = CapabilityChain::parse(&bytes).expect("the guest sees well-formed chains");
    chain.extended.iter().map(|e| (e.offset, e.id)).collect()
}

fn guest_u32(view: &VirtualConfigSpace, raw: &Raw, at: usize) -> u32 {
    let mut b = [0u8; 4];
    view.read(at as u64, &raw.0[at..at + 4], &mut b).unwrap();
    u32::from_le_bytes(b)
}

#[test]
fn nothing_masked_keeps_the_chain_as_it_was() {
    let mut raw = Raw::new();
    raw.ext(&[
        (0x100, EXT_CAP_ID_ATS),
        (0x140, DSN),
        (0x180, EXT_CAP_ID_PASID),
        (0x1c0, EXT_CAP_ID_PRI),
    ]);
    let view = build(&raw.0, &request(explicit(Auto, Auto, Auto))).unwrap();
    assert_eq!(
        guest_chain(&view, &raw),
        [
            (0x100, EXT_CAP_ID_ATS),
            (0x140, DSN),
            (0x180, EXT_CAP_ID_PASID),
            (0x1c0, EXT_CAP_ID_PRI)
        ]
    );
    assert_eq!(view.guest_bytes(&raw.0).unwrap(), raw.0, "nothing changed");
}

#[test]
fn masking_the_first_extended_capability_leaves_a_null_capability_at_0x100() {
    let mut raw = Raw::new();
    raw.ext(&[
        (0x100, EXT_CAP_ID_PASID),
        (0x140, EXT_CAP_ID_ATS),
        (0x180, DSN),
        (0x1c0, EXT_CAP_ID_PRI),
        (0x200, AER),
    ]);
    let view = build(&raw.0, &request(explicit(Auto, Off, Auto))).unwrap();
    assert_eq!(
        guest_chain(&view, &raw),
        [
            (0x100, EXT_CAP_ID_NULL),
            (0x140, EXT_CAP_ID_ATS),
            (0x180, DSN),
            (0x1c0, EXT_CAP_ID_PRI),
            (0x200, AER)
        ]
    );
    assert_eq!(
        guest_u32(&view, &raw, 0x100),
        0x140 << 20,
        "ID 0, version 0, next 0x140"
    );
    assert_eq!(
        guest_u32(&view, &raw, 0x104),
        0,
        "the masked body reads as zero"
    );
    assert_eq!(view.exposed().pasid, None);
    assert!(view.controls().pasid.is_none());
}

#[test]
fn masking_a_middle_extended_capability_relinks_around_it() {
    let mut raw = Raw::new();
    raw.ext(&[
        (0x100, EXT_CAP_ID_PASID),
        (0x140, EXT_CAP_ID_ATS),
        (0x180, DSN),
        (0x1c0, EXT_CAP_ID_PRI),
        (0x200, AER),
    ]);
    let view = build(&raw.0, &request(explicit(Auto, Auto, Off))).unwrap();
    assert_eq!(
        guest_chain(&view, &raw),
        [
            (0x100, EXT_CAP_ID_PASID),
            (0x140, EXT_CAP_ID_ATS),
            (0x180, DSN),
            (0x200, AER)
        ]
    );
    assert_eq!(
        guest_u32(&view, &raw, 0x180) >> 20,
        0x200,
        "DSN skips the masked PRI"
    );
    for at in (0x1c0..0x1d0).step_by(4) {
        assert_eq!(guest_u32(&view, &raw, at), 0, "PRI at {at:#x} is gone");
    }
}

#[test]
fn masking_the_last_extended_capability_ends_the_chain_before_it() {
    let mut raw = Raw::new();
    raw.ext(&[
        (0x100, EXT_CAP_ID_ATS),
        (0x140, DSN),
        (0x180, EXT_CAP_ID_PRI),
    ]);
    let view = build(&raw.0, &request(explicit(Auto, Auto, Off))).unwrap();
    assert_eq!(
        guest_chain(&view, &raw),
        [(0x100, EXT_CAP_ID_ATS), (0x140, DSN)]
    );
    assert_eq!(
        guest_u32(&view, &raw, 0x140),
        u32::from(DSN) | 1 << 16,
        "next 0"
    );
}

#[test]
fn masking_several_including_first_and_last() {
    let mut raw = Raw::new();
    raw.ext(&[
        (0x100, EXT_CAP_ID_ATS),
        (0x108, EXT_CAP_ID_PASID),
        (0x110, EXT_CAP_ID_PRI),
    ]);
    // ATS off takes PRI (auto) with it: only PASID is left, behind a null capability.
    let view = build(&raw.0, &request(explicit(Off, Auto, Auto))).unwrap();
    assert_eq!(
        guest_chain(&view, &raw),
        [(0x100, EXT_CAP_ID_NULL), (0x108, EXT_CAP_ID_PASID)]
    );
    assert!(!view.decisions().pri.exposed);
    // Everything masked: 0x100 reads 0 and the guest finds no extended capability at all.
    let view = build(&raw.0, &request(explicit(Off, Off, Off))).unwrap();
    assert_eq!(guest_chain(&view, &raw), []);
    assert_eq!(guest_u32(&view, &raw, 0x100), 0);
    let bytes = view.guest_bytes(&raw.0).unwrap();
    assert!(bytes[0x100..0x120].iter().all(|b| *b == 0));
}

#[test]
fn a_kernel_null_placeholder_is_relinked_or_cleared() {
    let mut raw = Raw::new();
    raw.ext(&[
        (0x100, EXT_CAP_ID_NULL),
        (0x140, EXT_CAP_ID_ATS),
        (0x180, AER),
    ]);
    let view = build(&raw.0, &request(explicit(Auto, Auto, Auto))).unwrap();
    assert_eq!(
        guest_chain(&view, &raw),
        [
            (0x100, EXT_CAP_ID_NULL),
            (0x140, EXT_CAP_ID_ATS),
            (0x180, AER)
        ]
    );
    let view = build(&raw.0, &request(explicit(Off, Auto, Auto))).unwrap();
    assert_eq!(
        guest_chain(&view, &raw),
        [(0x100, EXT_CAP_ID_NULL), (0x180, AER)]
    );
}

#[test]
fn malformed_chains_are_rejected_with_an_error() {
    let cases: Vec<(&str, Raw)> = vec![
        ("extended loop", {
            let mut r = Raw::new();
            r.ext(&[(0x100, EXT_CAP_ID_ATS), (0x140, DSN)]);
            r.put32(0x140, u32::from(DSN) | 1 << 16 | 0x100 << 20);
            r
        }),
        ("self loop", {
            let mut r = Raw::new();
            r.put32(0x100, u32::from(AER) | 1 << 16 | 0x100 << 20);
            r
        }),
        ("standard loop", {
            let mut r = Raw::new();
            r.0[0x41] = 0x40;
            r
        }),
        ("standard pointer into the header", {
            let mut r = Raw::new();
            r.0[0x34] = 0x20;
            r
        }),
        ("extended pointer into the header", {
            let mut r = Raw::new();
            r.put32(0x100, u32::from(AER) | 1 << 16 | 0x0c0 << 20);
            r
        }),
        ("extended pointer past the end of config space", {
            let mut r = Raw(vec![0u8; 0x200]);
            r.0[0x06] = 0;
            r.put32(0x100, u32::from(AER) | 1 << 16 | 0x300 << 20);
            r
        }),
        ("capability running past 4 KiB", {
            let mut r = Raw::new();
            r.ext(&[(0x100, DSN)]);
            r.put32(0x100, u32::from(DSN) | 1 << 16 | 0xffc << 20);
            r.put32(0xffc, u32::from(EXT_CAP_ID_PRI) | 1 << 16);
            r
        }),
        ("standard capability running past 256 bytes", {
            let mut r = Raw::new();
            r.0[0x34] = 0xe0;
            r.0[0xe0] = CAP_ID_EXP;
            r.0[0xe2] = 0x02;
            r
        }),
        ("misaligned next pointer", {
            let mut r = Raw::new();
            r.put32(0x100, u32::from(AER) | 1 << 16 | 0x142 << 20);
            r
        }),
        ("dangling link", {
            let mut r = Raw::new();
            r.put32(0x100, u32::from(EXT_CAP_ID_ATS) | 1 << 16 | 0x200 << 20);
            r
        }),
        ("overlapping capabilities", {
            let mut r = Raw::new();
            r.ext(&[(0x100, EXT_CAP_ID_ATS), (0x104, EXT_CAP_ID_PASID)]);
            r
        }),
    ];
    for (what, raw) in cases {
        match build(&raw.0, &request(explicit(Auto, Auto, Auto))) {
            Err(VirtualConfigError::ParseChains { device, source }) => {
                assert_eq!(device, "dev0", "{what}");
                let shown = VirtualConfigError::ParseChains {
                    device,
                    source: source.clone(),
                }
                .to_string();
                assert!(shown.starts_with("device dev0: "), "{what}: {shown}");
                assert!(
                    !shown.contains(&source.to_string()),
                    "source not repeated: {shown}"
                );
            }
            other => panic!("{what}: expected ParseChains, got {other:?}"),
        }
    }
}

#[test]
fn duplicate_managed_capabilities_and_odd_sizes_are_refused() {
    let mut raw = Raw::new();
    raw.ext(&[(0x100, EXT_CAP_ID_ATS), (0x140, EXT_CAP_ID_ATS)]);
    let err = build(&raw.0, &request(explicit(Auto, Auto, Auto))).unwrap_err();
    assert!(
        matches!(
            err,
            VirtualConfigError::CheckDuplicate {
                first: 0x100,
                second: 0x140,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("two ATS capabilities"), "{err}");
    for len in [0, 0x3f, 0x1001] {
        let err = build(&vec![0u8; len], &request(explicit(Auto, Auto, Auto))).unwrap_err();
        assert!(matches!(err, VirtualConfigError::CheckSize { .. }), "{len}");
    }
}

#[test]
fn conventional_config_space_has_nothing_to_manage() {
    let raw = Raw(Raw::new().0[..0x100].to_vec());
    let view = build(&raw.0, &request(explicit(Auto, Auto, Auto))).unwrap();
    assert!(view.decisions().iter().all(|d| !d.exposed));
    let mut req = request(explicit(Auto, Auto, Auto));
    req.pasid_cap_hidden = true;
    let view = build(&raw.0, &req).unwrap();
    assert!(!view.decisions().pasid.exposed);
    assert!(view
        .decisions()
        .pasid
        .reason
        .contains("no PCI Express extended config space"));
    req.policies.pasid = PolicySetting::explicit(On);
    assert!(matches!(
        build(&raw.0, &req),
        Err(VirtualConfigError::PlacePasid { .. })
    ));
}

#[test]
fn emulated_bits_never_reach_the_device_and_read_from_the_virtual_copy() {
    // The device side: a model's own config space, where ATS Control is writable.
    let mut b = ConfigSpaceBuilder::new(0x1b36, 0x00fd, 0x088000, 1);
    let ats = b.extended_capability(EXT_CAP_ID_ATS, 1, &[0x20, 0, 0, 0]);
    b.writable(ats + 6, &0x801fu16.to_le_bytes());
    let pri = b.extended_capability(EXT_CAP_ID_PRI, 1, &[0, 0, 0, 0x01, 32, 0, 0, 0, 0, 0, 0, 0]);
    let mut device = b.build();
    let mut view = build(device.bytes(), &request(explicit(Auto, Auto, Auto))).unwrap();
    assert_eq!(view.exposed().ats, Some(ats));

    // ATS Control is emulated: a write to it alone forwards nothing.
    assert_eq!(view.write(ats as u64 + 6, &[0xff, 0xff]).unwrap(), None);
    // ATS Control is emulated: only the (read-only) ATS Capability register is forwarded.
    let forwarded = view
        .write(ats as u64 + 4, &[0xff, 0xff, 0xe3, 0xff])
        .unwrap()
        .expect("the capability register is the device's");
    assert_eq!(forwarded.mask, [0xff, 0xff, 0, 0]);
    device
        .write_masked(forwarded.offset, &forwarded.data, &forwarded.mask)
        .unwrap();
    assert_eq!(
        device.u16_at(ats + 6),
        0,
        "the device never saw the control write"
    );
    assert_eq!(
        device.u16_at(ats + 4),
        0x0020,
        "and its capability register is RO"
    );
    let mut got = [0u8; 4];
    let dev = device.bytes()[ats + 4..ats + 8].to_vec();
    view.read(ats as u64 + 4, &dev, &mut got).unwrap();
    assert_eq!(
        got,
        [0x20, 0x00, 0x03, 0x80],
        "capability RO, Enable and STU stick, bits 14:5 RO"
    );
    assert_eq!(
        view.controls().ats,
        Some(AtsControl {
            enabled: true,
            stu: 3
        })
    );

    // Even if the device's own bytes change, the guest reads the virtual copy.
    device.set_u16(ats + 6, 0x1234);
    let dev = device.bytes()[ats + 4..ats + 8].to_vec();
    view.read(ats as u64 + 4, &dev, &mut got).unwrap();
    assert_eq!(got, [0x20, 0x00, 0x03, 0x80]);

    // The Command register is the device's: the write is forwarded with its mask.
    let forwarded = view.write(0x04, &[0x06, 0x04]).unwrap().expect("forwarded");
    assert_eq!(forwarded.mask, [0xff, 0xff]);
    device
        .write_masked(forwarded.offset, &forwarded.data, &forwarded.mask)
        .unwrap();
    assert_eq!(device.u16_at(0x04), 0x0406);

    // A write over a header never forwards the header.
    let forwarded = view
        .write(ats as u64, &[0xff; 8])
        .unwrap()
        .expect("capability reg");
    assert_eq!(forwarded.mask, [0, 0, 0, 0, 0xff, 0xff, 0, 0]);
    assert_eq!(
        guest_chain_of(&view, &device),
        [(ats, EXT_CAP_ID_ATS), (pri, EXT_CAP_ID_PRI)]
    );

    // PRI: Reset reads 0 and clears the error bits while disabled; Status errors are W1C.
    view.write(pri as u64 + 4, &[0x01, 0x00]).unwrap();
    assert_eq!(
        view.space().u16_at(pri + 6) & 0x0100,
        0,
        "running: not stopped"
    );
    view.space.set_bytes(pri + 6, &0x0003u16.to_le_bytes());
    view.write(pri as u64 + 6, &[0x01, 0x00]).unwrap();
    assert_eq!(view.space().u16_at(pri + 6), 0x0002, "W1C");
    view.write(pri as u64 + 4, &[0x02, 0x00]).unwrap();
    assert_eq!(
        view.space().u16_at(pri + 4),
        0,
        "Reset is write-only, Enable now clear"
    );
    assert_eq!(
        view.space().u16_at(pri + 6),
        0x0100,
        "errors cleared, stopped"
    );

    view.reset();
    assert_eq!(
        view.controls().ats,
        Some(AtsControl {
            enabled: false,
            stu: 0
        })
    );
}

fn guest_chain_of(view: &VirtualConfigSpace, device: &ConfigSpace) -> Vec<(usize, u16)> {
    guest_chain(view, &Raw(device.bytes().to_vec()))
}

#[test]
fn hidden_pasid_is_synthesized_at_the_end_with_the_host_width() {
    let mut raw = Raw::new();
    raw.ext(&[(0x100, EXT_CAP_ID_ATS), (0x108, EXT_CAP_ID_PRI)]);
    let mut req = request(explicit(Auto, Auto, Auto));
    req.pasid_cap_hidden = true;
    req.host = HostIommuCaps::from_spec(&IommuSpec {
        max_pasid_log2: 12,
        pasid_exec: true,
        pasid_priv: false,
        ..IommuSpec::default()
    });
    let mut view = build(&raw.0, &req).unwrap();
    assert_eq!(
        guest_chain(&view, &raw),
        [
            (0x100, EXT_CAP_ID_ATS),
            (0x108, EXT_CAP_ID_PRI),
            (0xff8, EXT_CAP_ID_PASID)
        ]
    );
    assert_eq!(
        guest_u32(&view, &raw, 0xff8),
        u32::from(EXT_CAP_ID_PASID) | 1 << 16
    );
    assert_eq!(
        guest_u32(&view, &raw, 0xffc),
        0x0c02,
        "width 12, exec, no priv, control 0"
    );
    assert!(view.exposed().pasid_synthesized);
    assert_eq!(
        view.decisions().pasid.to_string(),
        "pasid: exposed (auto: the IOMMU supports 12-bit PASIDs; synthesized at 0xff8)"
    );
    // Control: Enable and Exec Enable writable; Priv Enable is not (not supported).
    assert_eq!(view.write(0xffe, &[0x07, 0x00]).unwrap(), None);
    assert_eq!(guest_u32(&view, &raw, 0xffc), 0x0003_0c02);

    // Without the hidden flag there is no PASID to expose.
    req.pasid_cap_hidden = false;
    let view = build(&raw.0, &req).unwrap();
    assert!(!view.decisions().pasid.exposed);
    assert!(view
        .decisions()
        .pasid
        .reason
        .contains("no PASID capability"));
}

#[test]
fn synthesized_pasid_skips_used_space_and_honours_the_offset_override() {
    let mut raw = Raw::new();
    raw.ext(&[(0x100, EXT_CAP_ID_ATS), (0xff0, VSEC)]);
    raw.put32(0xff4, 0xdead_beef).put32(0xffc, 1);
    let mut req = request(explicit(Auto, Auto, Auto));
    req.pasid_cap_hidden = true;
    let view = build(&raw.0, &req).unwrap();
    assert_eq!(
        view.exposed().pasid,
        Some(0xfe8),
        "below the VSEC's non-zero bytes"
    );

    req.pasid_cap_offset = Some(0x400);
    let view = build(&raw.0, &req).unwrap();
    assert_eq!(
        guest_chain(&view, &raw),
        [
            (0x100, EXT_CAP_ID_ATS),
            (0xff0, VSEC),
            (0x400, EXT_CAP_ID_PASID)
        ]
    );

    req.pasid_cap_offset = Some(0x104);
    let err = build(&raw.0, &req).unwrap_err();
    assert_eq!(
        err.to_string(),
        "device dev0: the PASID capability cannot be synthesized: pasid_cap_offset=0x104 overlaps the device's ATS capability at 0x100..0x108; set pasid_cap_offset to a free 4-byte-aligned offset, or remove it to let vfud pick one"
    );
    for bad in [0x0fc, 0x402, 0xffc] {
        req.pasid_cap_offset = Some(bad);
        assert!(
            matches!(
                build(&raw.0, &req),
                Err(VirtualConfigError::PlacePasid { .. })
            ),
            "{bad:#x}"
        );
    }
    // The offset only matters when PASID is synthesized.
    req.policies.pasid = PolicySetting::explicit(Off);
    assert!(build(&raw.0, &req).is_ok());
}

#[test]
fn synthesized_pasid_links_from_0x100_when_the_extended_list_is_empty() {
    let raw = Raw::new();
    let mut req = request(explicit(Auto, Auto, Auto));
    req.pasid_cap_hidden = true;
    let view = build(&raw.0, &req).unwrap();
    assert_eq!(
        guest_chain(&view, &raw),
        [(0x100, EXT_CAP_ID_NULL), (0xff8, EXT_CAP_ID_PASID)]
    );
    req.pasid_cap_offset = Some(0x100);
    let view = build(&raw.0, &req).unwrap();
    assert_eq!(guest_chain(&view, &raw), [(0x100, EXT_CAP_ID_PASID)]);
}

#[test]
fn no_room_for_pasid_masks_auto_and_refuses_on() {
    let mut raw = Raw::new();
    raw.ext(&[(0x100, EXT_CAP_ID_ATS)]);
    for b in &mut raw.0[0x108..] {
        *b = 0xa5;
    }
    let mut req = request(explicit(Auto, Auto, Auto));
    req.pasid_cap_hidden = true;
    let view = build(&raw.0, &req).unwrap();
    assert!(!view.decisions().pasid.exposed);
    assert!(
        view.decisions().pasid.reason.contains("no 8 free bytes"),
        "{}",
        view.decisions().pasid
    );
    req.policies.pasid = PolicySetting::explicit(On);
    let err = build(&raw.0, &req).unwrap_err();
    assert!(err.to_string().contains("set pasid_cap_offset"), "{err}");
}

#[test]
fn the_vfud_wording_of_an_on_failure_passes_through_unchanged() {
    let mut raw = Raw::new();
    raw.ext(&[(0x100, EXT_CAP_ID_ATS)]);
    let mut req = request(explicit(On, Auto, Auto));
    req.host = HostIommuCaps::from_spec(&IommuSpec {
        ats_supported: false,
        ..IommuSpec::default()
    });
    let err = build(&raw.0, &req).unwrap_err();
    assert_eq!(
        err.to_string(),
        "device dev0: ats=on but the IOMMU reports ATS not supported (iommu.ats_supported=false); use ats=auto or ats=off"
    );
}

// ---- fuzzed and random layouts -------------------------------------------------------------

fn policy_strategy() -> impl Strategy<Value = CapabilityPolicy> {
    prop_oneof![Just(On), Just(Off), Just(Auto)]
}

fn setting_strategy() -> impl Strategy<Value = Option<CapabilityPolicy>> {
    prop_oneof![Just(None), policy_strategy().prop_map(Some)]
}

fn host_strategy() -> impl Strategy<Value = HostIommuCaps> {
    (any::<bool>(), 0u8..=20, any::<bool>(), any::<bool>()).prop_map(
        |(ats_ok, width, exec, privileged)| {
            HostIommuCaps::from_spec(&IommuSpec {
                ats_supported: ats_ok,
                max_pasid_log2: width,
                pasid_exec: exec,
                pasid_priv: privileged,
            })
        },
    )
}

/// A random but valid device: which managed capabilities it has, some other extended
/// capabilities with random bodies, in random chain order at random 0x40-byte slots, possibly
/// behind a kernel null placeholder at 0x100.
#[derive(Debug, Clone)]
struct Layout {
    ats: bool,
    pasid_width: Option<u8>,
    pri: bool,
    others: Vec<u16>,
    null_head: bool,
    slots: Vec<usize>,
    order_seed: Vec<usize>,
    body_seed: u64,
}

fn layout_strategy() -> impl Strategy<Value = Layout> {
    (
        any::<bool>(),
        prop::option::of(0u8..=20),
        any::<bool>(),
        prop::collection::vec(
            prop_oneof![Just(AER), Just(DSN), Just(VSEC), Just(0x000d), Just(0x001e)],
            0..5,
        ),
        any::<bool>(),
        prop::sample::subsequence((1..60usize).collect::<Vec<_>>(), 8),
        prop::collection::vec(any::<usize>(), 8),
        any::<u64>(),
    )
        .prop_map(
            |(ats, pasid_width, pri, others, null_head, slots, order_seed, body_seed)| Layout {
                ats,
                pasid_width,
                pri,
                others,
                null_head,
                slots,
                order_seed,
                body_seed,
            },
        )
}

impl Layout {
    /// The raw bytes and the (offset, id) chain in order.
    fn raw(&self) -> (Raw, Vec<(usize, u16)>) {
        let mut ids: Vec<u16> = self.others.clone();
        if self.ats {
            ids.push(EXT_CAP_ID_ATS);
        }
        if self.pasid_width.is_some() {
            ids.push(EXT_CAP_ID_PASID);
        }
        if self.pri {
            ids.push(EXT_CAP_ID_PRI);
        }
        // Shuffle deterministically from the seed.
        for i in (1..ids.len()).rev() {
            let j = self.order_seed[i % self.order_seed.len()] % (i + 1);
            ids.swap(i, j);
        }
        let mut offsets: Vec<usize> = self.slots.iter().map(|s| 0x100 + s * 0x40).collect();
        for i in (1..offsets.len()).rev() {
            let j = self.order_seed[(i + 3) % self.order_seed.len()] % (i + 1);
            offsets.swap(i, j);
        }
        let mut chain = Vec::new();
        if self.null_head {
            chain.push((0x100, EXT_CAP_ID_NULL));
        } else {
            offsets.insert(0, 0x100);
        }
        chain.extend(offsets.into_iter().zip(ids));
        let mut raw = Raw::new();
        // Other capabilities get random bodies (8..60 bytes) that PASID placement must avoid.
        let mut seed = self.body_seed | 1;
        for (at, id) in &chain {
            if ![
                EXT_CAP_ID_ATS,
                EXT_CAP_ID_PASID,
                EXT_CAP_ID_PRI,
                EXT_CAP_ID_NULL,
            ]
            .contains(id)
            {
                let len = 4 + (seed % 56) as usize;
                for b in &mut raw.0[at + 4..at + 4 + len] {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    *b = seed as u8 | 1;
                }
            }
        }
        raw.ext(&chain);
        if let (Some(width), Some((at, _))) = (
            self.pasid_width,
            chain.iter().find(|(_, id)| *id == EXT_CAP_ID_PASID),
        ) {
            raw.put16(
                at + 4,
                PasidFeatures {
                    max_width: width,
                    exec: true,
                    privileged: true,
                }
                .register(),
            );
        }
        (raw, chain)
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// For random layouts and policies the rebuilt chains are well-formed and hold exactly the
    /// device's unmanaged capabilities plus the exposed managed ones; masked ids appear nowhere
    /// in the chain and their bytes read as zero; a guest writing all-ones everywhere cannot
    /// change the extended chain.
    #[test]
    fn rebuilt_chains_hold_exactly_the_exposed_set(
        layout in layout_strategy(),
        settings in (setting_strategy(), setting_strategy(), setting_strategy()),
        compat in prop_oneof![Just(CompatLevel::Level0), Just(CompatLevel::Level1)],
        host in host_strategy(),
        viommu in prop_oneof![Just(None), any::<bool>().prop_map(Some)],
        hidden in any::<bool>(),
    ) {
        let (raw, chain) = layout.raw();
        let policies = compat.resolve(settings.0, settings.1, settings.2);
        let mut req = request(policies);
        req.host = host;
        req.viommu_pasid = viommu;
        req.pasid_cap_hidden = hidden;

        // The oracle, written out independently of the resolver.
        let device_pasid_width = match layout.pasid_width {
            Some(w) => Some(w),
            None if hidden => Some(host.max_pasid_log2),
            None => None,
        };
        let ats_ok = layout.ats && !host.ats_not_supported;
        let pasid_ok = device_pasid_width.is_some_and(|w| w > 0)
            && host.max_pasid_log2 > 0
            && viommu != Some(false);
        let want_ats = policies.ats.value != Off && ats_ok;
        let pri_ok = layout.pri && want_ats;
        let lacks = |setting: PolicySetting, has: bool| setting.origin != PolicyOrigin::Explicit && !has;
        let must_fail = (policies.ats.value == On && !ats_ok && !lacks(policies.ats, layout.ats))
            || (policies.pasid.value == On && !pasid_ok && !lacks(policies.pasid, device_pasid_width.is_some()))
            || (policies.pri.value == On && !pri_ok && !lacks(policies.pri, layout.pri));

        let view = match build(&raw.0, &req) {
            Ok(view) => view,
            Err(VirtualConfigError::Resolve(PolicyError::RequireCapability { setting, .. })) => {
                prop_assert!(must_fail, "refused without cause");
                prop_assert_eq!(setting.value, On);
                return Ok(());
            }
            Err(VirtualConfigError::PlacePasid { .. }) => {
                prop_assert!(layout.pasid_width.is_none() && policies.pasid.value == On);
                return Ok(());
            }
            Err(other) => return Err(TestCaseError::fail(format!("unexpected error {other:?}"))),
        };
        prop_assert!(!must_fail, "an unmet `on` must refuse the device");
        let d = view.decisions();
        prop_assert_eq!(d.ats.exposed, want_ats);
        prop_assert_eq!(d.pri.exposed, policies.pri.value != Off && pri_ok);
        let want_pasid = policies.pasid.value != Off && pasid_ok;
        if want_pasid && !d.pasid.exposed {
            // Only a synthesized PASID can lose its place.
            prop_assert!(layout.pasid_width.is_none());
            prop_assert!(d.pasid.reason.contains("free bytes"), "{}", d.pasid);
        } else {
            prop_assert_eq!(d.pasid.exposed, want_pasid);
        }

        let guest = view.guest_bytes(&raw.0).unwrap();
        let walked = CapabilityChain::parse(&guest);
        prop_assert!(walked.is_ok(), "malformed guest chain: {:?}", walked.err());
        let walked = walked.unwrap();
        let mut want: Vec<u16> = chain
            .iter()
            .map(|(_, id)| *id)
            .filter(|id| *id != EXT_CAP_ID_NULL)
            .filter(|id| ManagedCapability::ALL.iter().find(|c| c.ext_cap_id() == *id).is_none_or(|c| d.get(*c).exposed))
            .collect();
        if view.exposed().pasid_synthesized {
            want.push(EXT_CAP_ID_PASID);
        }
        let got: Vec<u16> = walked.extended.iter().map(|e| e.id).filter(|id| *id != EXT_CAP_ID_NULL).collect();
        prop_assert_eq!(&got, &want, "chain order is kept, synthesized PASID last");
        // A null capability only ever heads the chain.
        for e in walked.extended.iter().skip(1) {
            prop_assert_ne!(e.id, EXT_CAP_ID_NULL);
        }
        // Masked capabilities: not in the chain, and their bytes read as zero.
        for c in ManagedCapability::ALL {
            if let Some((at, _)) = chain.iter().find(|(_, id)| *id == c.ext_cap_id()) {
                if !d.get(c).exposed {
                    prop_assert!(walked.find_extended(c.ext_cap_id()).is_none());
                    let end = at + crate::pci::caps::extended_len(c.ext_cap_id());
                    let body_start = if *at == EXT_CAP_START { at + 4 } else { *at };
                    prop_assert!(guest[body_start..end].iter().all(|b| *b == 0));
                }
            }
        }
        // Controls are offered exactly for exposed capabilities.
        let controls = view.controls();
        prop_assert_eq!(controls.ats.is_some(), d.ats.exposed);
        prop_assert_eq!(controls.pasid.is_some(), d.pasid.exposed);
        prop_assert_eq!(controls.pri.is_some(), d.pri.exposed);
        if let Some(f) = d.pasid_features.filter(|_| d.pasid.exposed) {
            let at = view.exposed().pasid.unwrap();
            prop_assert_eq!(PasidFeatures::from_register(u16::from_le_bytes([guest[at + 4], guest[at + 5]])), f);
            prop_assert!(f.max_width <= host.max_pasid_log2);
        }

        // A hostile guest writes all-ones over the whole space, through to a device that
        // accepts anything: the extended chain does not move.
        let mut view = view;
        let mut device = raw.0.clone();
        if let Some(w) = view.write(0, &vec![0xff; CONFIG_SPACE_SIZE]).unwrap() {
            for (i, (v, m)) in w.data.iter().zip(&w.mask).enumerate() {
                device[i] = (device[i] & !m) | (v & m);
            }
        }
        let after = CapabilityChain::walk(&view.guest_bytes(&device).unwrap());
        prop_assert!(after.extended_error.is_none());
        prop_assert_eq!(after.extended, walked.extended);
    }

    /// Arbitrary bytes never panic the policy layer, and whatever it accepts it serves as
    /// well-formed chains without a masked capability in them.
    #[test]
    fn fuzzed_config_spaces_never_panic(
        bytes in prop::collection::vec(any::<u8>(), CONFIG_SPACE_SIZE),
        ats in policy_strategy(),
        pasid in policy_strategy(),
        pri in policy_strategy(),
        host in host_strategy(),
        hidden in any::<bool>(),
        offset in prop::option::of(0u16..0x1000),
    ) {
        let mut req = request(explicit(ats, pasid, pri));
        req.host = host;
        req.pasid_cap_hidden = hidden;
        req.pasid_cap_offset = offset;
        if let Ok(view) = build(&bytes, &req) {
            let guest = view.guest_bytes(&bytes).unwrap();
            let walked = CapabilityChain::parse(&guest);
            prop_assert!(walked.is_ok(), "{:?}", walked.err());
            let walked = walked.unwrap();
            for c in ManagedCapability::ALL {
                if !view.decisions().get(c).exposed {
                    prop_assert!(walked.find_extended(c.ext_cap_id()).is_none());
                }
            }
        }
    }

    /// Fuzzed chains built from plausible pieces (valid ids, pointers that are mostly right)
    /// reach the interesting checks far more often than random bytes do.
    #[test]
    fn fuzzed_chains_never_panic(
        links in prop::collection::vec((0u16..0x30, 0usize..0x400, any::<u8>()), 1..10),
        std_ptr in any::<u8>(),
    ) {
        let mut raw = Raw::new();
        raw.0[0x34] = std_ptr;
        let mut at = 0x100;
        for (id, next, noise) in &links {
            let next = (next * 4) & 0xfff;
            raw.put32(at, u32::from(*id) | 1 << 16 | (next as u32) << 20);
            if at + 5 < CONFIG_SPACE_SIZE {
                raw.0[at + 4] = *noise;
            }
            if !(EXT_CAP_START..=CONFIG_SPACE_SIZE - 4).contains(&next) {
                break;
            }
            at = next;
        }
        let result = build(&raw.0, &request(explicit(Auto, Auto, Auto)));
        if let Ok(view) = result {
            let walked = CapabilityChain::parse(&view.guest_bytes(&raw.0).unwrap());
            prop_assert!(walked.is_ok(), "{:?}", walked.err());
        }
    }
}

#[test]
fn compat_defaults_flow_through_to_the_rebuilt_space() {
    let mut raw = Raw::new();
    raw.ext(&[
        (0x100, EXT_CAP_ID_ATS),
        (0x108, EXT_CAP_ID_PASID),
        (0x110, EXT_CAP_ID_PRI),
    ]);
    let view = build(
        &raw.0,
        &request(CompatLevel::Level0.resolve(None, None, None)),
    )
    .unwrap();
    assert_eq!(
        guest_chain(&view, &raw),
        [(0x100, EXT_CAP_ID_ATS), (0x110, EXT_CAP_ID_PRI)]
    );
}
