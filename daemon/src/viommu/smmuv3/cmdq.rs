//! Command decoding (16-byte command-queue entries).
//!
//! Decoding is separate from execution so that "is this command legal" has one answer:
//! anything this returns `Err` for stops the queue with CERROR_ILL.

use super::props::Smmuv3Properties;

/// Command opcodes (`dw0[7:0]`).
pub mod opcode {
    /// CMD_PREFETCH_CONFIG.
    pub const PREFETCH_CONFIG: u8 = 0x01;
    /// CMD_PREFETCH_ADDR.
    pub const PREFETCH_ADDR: u8 = 0x02;
    /// CMD_CFGI_STE.
    pub const CFGI_STE: u8 = 0x03;
    /// CMD_CFGI_STE_RANGE (CFGI_ALL is Range = 31).
    pub const CFGI_STE_RANGE: u8 = 0x04;
    /// CMD_CFGI_CD.
    pub const CFGI_CD: u8 = 0x05;
    /// CMD_CFGI_CD_ALL.
    pub const CFGI_CD_ALL: u8 = 0x06;
    /// CMD_TLBI_NH_ALL.
    pub const TLBI_NH_ALL: u8 = 0x10;
    /// CMD_TLBI_NH_ASID.
    pub const TLBI_NH_ASID: u8 = 0x11;
    /// CMD_TLBI_NH_VA.
    pub const TLBI_NH_VA: u8 = 0x12;
    /// CMD_TLBI_NH_VAA.
    pub const TLBI_NH_VAA: u8 = 0x13;
    /// CMD_TLBI_S12_VMALL.
    pub const TLBI_S12_VMALL: u8 = 0x28;
    /// CMD_TLBI_S2_IPA.
    pub const TLBI_S2_IPA: u8 = 0x2A;
    /// CMD_TLBI_NSNH_ALL.
    pub const TLBI_NSNH_ALL: u8 = 0x30;
    /// CMD_ATC_INV.
    pub const ATC_INV: u8 = 0x40;
    /// CMD_PRI_RESP.
    pub const PRI_RESP: u8 = 0x41;
    /// CMD_RESUME.
    pub const RESUME: u8 = 0x44;
    /// CMD_STALL_TERM.
    pub const STALL_TERM: u8 = 0x45;
    /// CMD_SYNC.
    pub const SYNC: u8 = 0x46;
}

/// CMD_SYNC completion signal (CS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SyncSignal {
    None,
    Irq,
    Sev,
}

/// CMD_PRI_RESP response code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PriResponseCode {
    /// Deny ("invalid request").
    Deny,
    /// Failure: the device stops issuing page requests.
    Fail,
    /// Success.
    Success,
}

/// A decoded, legal command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Command {
    /// Prefetch, RESUME, STALL_TERM: nothing to do (no prefetching, no stalls).
    Nop,
    CfgiSte {
        sid: u32,
        count: u64,
    },
    CfgiCd {
        sid: u32,
        ssid: u32,
    },
    CfgiCdAll {
        sid: u32,
    },
    TlbiNhAll {
        vmid: u16,
    },
    TlbiNhAsid {
        vmid: u16,
        asid: u16,
    },
    TlbiNhVa {
        vmid: u16,
        asid: Option<u16>,
        start: u64,
        end: u64,
    },
    TlbiS12Vmall {
        vmid: u16,
    },
    TlbiS2Ipa {
        vmid: u16,
        start: u64,
        end: u64,
    },
    TlbiNsnhAll,
    AtcInv {
        sid: u32,
        ssid: Option<u32>,
        global: bool,
        start: u64,
        size_log2: u32,
    },
    PriResp {
        sid: u32,
        ssid: Option<u32>,
        prgi: u16,
        code: PriResponseCode,
    },
    Sync {
        signal: SyncSignal,
        msi_data: u32,
        msi_addr: u64,
    },
}

/// A command the model cannot execute: unknown opcode, reserved field value, or a command
/// for a feature the model does not advertise. Stops the queue with CERROR_ILL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IllegalCommand;

/// Largest ATC_INV Size: "invalidate the whole address space".
pub const ATC_INV_SIZE_ALL: u32 = 52;

/// Decode one command; `Err` is CERROR_ILL.
pub(crate) fn decode(
    dw0: u64,
    dw1: u64,
    props: &Smmuv3Properties,
) -> Result<Command, IllegalCommand> {
    let op = (dw0 & 0xff) as u8;
    if dw0 >> 10 & 1 == 1 {
        // SSEC on the non-secure queue.
        return Err(IllegalCommand);
    }
    let sid = (dw0 >> 32) as u32;
    let ssid = (dw0 >> 12 & 0xf_ffff) as u32;
    let ssv = dw0 >> 11 & 1 == 1;
    let vmid_mask = if props.vmid16 { 0xffff } else { 0xff };
    let asid_mask = if props.asid16 { 0xffff } else { 0xff };
    let vmid = (dw0 >> 32 & vmid_mask) as u16;
    let asid = (dw0 >> 48 & asid_mask) as u16;
    Ok(match op {
        opcode::PREFETCH_CONFIG | opcode::PREFETCH_ADDR | opcode::RESUME | opcode::STALL_TERM => {
            Command::Nop
        }
        opcode::CFGI_STE => Command::CfgiSte { sid, count: 1 },
        opcode::CFGI_STE_RANGE => {
            let range = (dw1 & 0x1f) as u32;
            let count = 2u64 << range;
            let first = (u64::from(sid) & !(count - 1)) as u32;
            Command::CfgiSte { sid: first, count }
        }
        opcode::CFGI_CD => Command::CfgiCd { sid, ssid },
        opcode::CFGI_CD_ALL => Command::CfgiCdAll { sid },
        opcode::TLBI_NH_ALL => Command::TlbiNhAll { vmid },
        opcode::TLBI_NH_ASID => Command::TlbiNhAsid { vmid, asid },
        opcode::TLBI_NH_VA | opcode::TLBI_NH_VAA => {
            let (start, end) = tlbi_range(dw0, dw1, !0xfff, props);
            let asid = (op == opcode::TLBI_NH_VA).then_some(asid);
            Command::TlbiNhVa {
                vmid,
                asid,
                start,
                end,
            }
        }
        opcode::TLBI_S12_VMALL => Command::TlbiS12Vmall { vmid },
        opcode::TLBI_S2_IPA => {
            let (start, end) = tlbi_range(dw0, dw1, 0x000f_ffff_ffff_f000, props);
            Command::TlbiS2Ipa { vmid, start, end }
        }
        opcode::TLBI_NSNH_ALL => Command::TlbiNsnhAll,
        opcode::ATC_INV if props.ats => {
            let size = (dw1 & 0x3f) as u32;
            if size > ATC_INV_SIZE_ALL {
                return Err(IllegalCommand);
            }
            let size_log2 = if size == ATC_INV_SIZE_ALL {
                64
            } else {
                12 + size
            };
            let start = if size_log2 >= 64 {
                0
            } else {
                dw1 & !((1u64 << size_log2) - 1)
            };
            Command::AtcInv {
                sid,
                ssid: ssv.then_some(ssid),
                global: ssv && dw0 >> 9 & 1 == 1,
                start,
                size_log2,
            }
        }
        opcode::PRI_RESP if props.pri => {
            let code = match dw1 >> 12 & 3 {
                0 => PriResponseCode::Deny,
                1 => PriResponseCode::Fail,
                2 => PriResponseCode::Success,
                _ => return Err(IllegalCommand),
            };
            Command::PriResp {
                sid,
                ssid: ssv.then_some(ssid),
                prgi: (dw1 & 0x1ff) as u16,
                code,
            }
        }
        opcode::SYNC => {
            let signal = match dw0 >> 12 & 3 {
                0 => SyncSignal::None,
                1 => SyncSignal::Irq,
                2 if props.sev => SyncSignal::Sev,
                _ => return Err(IllegalCommand),
            };
            Command::Sync {
                signal,
                msi_data: (dw0 >> 32) as u32,
                msi_addr: dw1 & 0x000f_ffff_ffff_fffc,
            }
        }
        // EL2/EL3 TLBIs (no IDR0.HYP, non-secure queue), unknown opcodes, and commands for
        // features the model does not advertise.
        _ => return Err(IllegalCommand),
    })
}

/// The `[start, end)` a TLBI by address covers. With RIL and TG != 0 it is
/// (NUM + 1) * 2^SCALE granules from the granule-aligned address; otherwise the 4 KiB page
/// holding the address, which overlaps every entry (of any size) that maps the address.
fn tlbi_range(dw0: u64, dw1: u64, addr_mask: u64, props: &Smmuv3Properties) -> (u64, u64) {
    let addr = dw1 & addr_mask;
    let tg = dw1 >> 10 & 3;
    if !props.ril || tg == 0 {
        return (addr, addr.saturating_add(0x1000));
    }
    let granule_log2 = 10 + 2 * tg as u32;
    let num = dw0 >> 12 & 0x1f;
    let scale = (dw0 >> 20 & 0x1f) as u32;
    let start = addr & !((1u64 << granule_log2) - 1);
    // At most 32 * 2^31 granules of 64 KiB: fits in u64 arithmetic before saturation.
    let len = (num + 1)
        .checked_shl(scale + granule_log2)
        .unwrap_or(u64::MAX);
    (start, start.saturating_add(len))
}
