//! Client-to-server commands, parsed once into typed values.
//!
//! [`Request::parse`] checks every size, count and flag combination against the layout and the
//! negotiated limits before anything is allocated or acted on. Fds that a command does not take
//! make it invalid; on any error the fds are dropped, which closes them.

use std::os::fd::OwnedFd;

use nix::errno::Errno;
use zerocopy::FromBytes;

use crate::command::Command;
use crate::frame::{Frame, Payload};
use crate::negotiate::{NegotiateError, VersionPayload};
use crate::wire;

/// Most entries accepted in one REGION_WRITE_MULTI (QEMU sends at most 200).
pub const MAX_WRITE_MULTI_ENTRIES: usize = 1024;

/// Why a command was rejected; [`RequestError::errno`] is what the error reply carries.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("command {0} is not a vfio-user command")]
    ParseCommand(u16),
    #[error("{0} is sent by the server, never by a client")]
    CheckDirection(Command),
    #[error("{command} payload is {got} bytes; {expected}")]
    CheckPayloadSize {
        command: Command,
        got: usize,
        expected: &'static str,
    },
    #[error("{command} takes {allowed} file descriptors, {got} were attached")]
    CheckFdCount {
        command: Command,
        allowed: &'static str,
        got: usize,
    },
    #[error("{command} data count {count} exceeds the negotiated maximum {max}")]
    CheckDataCount {
        command: Command,
        count: u64,
        max: u32,
    },
    #[error("{command} data count must not be 0")]
    CheckZeroCount { command: Command },
    #[error("{command} flags {flags:#x} are not valid: {why}")]
    CheckFlags {
        command: Command,
        flags: u32,
        why: &'static str,
    },
    #[error("VERSION was rejected")]
    Negotiate(#[from] NegotiateError),
}

impl RequestError {
    /// The errno for the error reply.
    pub fn errno(&self) -> Errno {
        match self {
            RequestError::ParseCommand(_) => Errno::ENOSYS,
            RequestError::CheckDataCount { .. } => Errno::E2BIG,
            _ => Errno::EINVAL,
        }
    }
}

/// What SET_IRQS asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IrqAction {
    Mask,
    Unmask,
    Trigger,
}

/// The data of a SET_IRQS.
#[derive(Debug)]
pub enum IrqData {
    None,
    /// One flag per vector in `[start, start+count)`.
    Bool(Vec<bool>),
    /// One eventfd per vector; empty means de-assign the range.
    Eventfds(Vec<OwnedFd>),
}

/// A parsed DEVICE_SET_IRQS. Range checks against the device's vector count are the device's.
#[derive(Debug)]
pub struct SetIrqsRequest {
    pub index: u32,
    pub start: u32,
    pub count: u32,
    pub action: IrqAction,
    pub data: IrqData,
}

/// One write of a REGION_WRITE_MULTI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MultiWrite {
    pub region: u32,
    pub offset: u64,
    pub data: Vec<u8>,
}

/// A client command.
#[derive(Debug)]
pub enum Request {
    Version(VersionPayload),
    DmaMap {
        map: wire::DmaMap,
        fd: Option<OwnedFd>,
    },
    DmaUnmap(wire::DmaUnmap),
    DeviceGetInfo {
        argsz: u32,
    },
    DeviceGetRegionInfo {
        argsz: u32,
        index: u32,
    },
    DeviceGetRegionIoFds {
        argsz: u32,
        index: u32,
    },
    DeviceGetIrqInfo {
        argsz: u32,
        index: u32,
    },
    DeviceSetIrqs(SetIrqsRequest),
    RegionRead {
        region: u32,
        offset: u64,
        count: u32,
    },
    RegionWrite {
        region: u32,
        offset: u64,
        /// Inline for small writes, so MMIO writes are parsed without a heap allocation.
        data: Payload,
    },
    DeviceReset,
    RegionWriteMulti(Vec<MultiWrite>),
    DeviceFeature {
        argsz: u32,
        flags: u32,
        data: Vec<u8>,
    },
    MigDataRead {
        argsz: u32,
        size: u32,
    },
    MigDataWrite {
        data: Vec<u8>,
    },
}

fn prefix<'a, T: FromBytes>(
    command: Command,
    payload: &'a [u8],
    expected: &'static str,
) -> Result<(T, &'a [u8]), RequestError> {
    T::read_from_prefix(payload).map_err(|_| RequestError::CheckPayloadSize {
        command,
        got: payload.len(),
        expected,
    })
}

fn exact<T: FromBytes>(
    command: Command,
    payload: &[u8],
    expected: &'static str,
) -> Result<T, RequestError> {
    let (v, rest) = prefix::<T>(command, payload, expected)?;
    if !rest.is_empty() {
        return Err(RequestError::CheckPayloadSize {
            command,
            got: payload.len(),
            expected,
        });
    }
    Ok(v)
}

fn no_fds(command: Command, fds: &[OwnedFd]) -> Result<(), RequestError> {
    if fds.is_empty() {
        Ok(())
    } else {
        Err(RequestError::CheckFdCount {
            command,
            allowed: "no",
            got: fds.len(),
        })
    }
}

impl Request {
    /// The command this request is.
    pub fn command(&self) -> Command {
        match self {
            Request::Version(_) => Command::Version,
            Request::DmaMap { .. } => Command::DmaMap,
            Request::DmaUnmap(_) => Command::DmaUnmap,
            Request::DeviceGetInfo { .. } => Command::DeviceGetInfo,
            Request::DeviceGetRegionInfo { .. } => Command::DeviceGetRegionInfo,
            Request::DeviceGetRegionIoFds { .. } => Command::DeviceGetRegionIoFds,
            Request::DeviceGetIrqInfo { .. } => Command::DeviceGetIrqInfo,
            Request::DeviceSetIrqs(_) => Command::DeviceSetIrqs,
            Request::RegionRead { .. } => Command::RegionRead,
            Request::RegionWrite { .. } => Command::RegionWrite,
            Request::DeviceReset => Command::DeviceReset,
            Request::RegionWriteMulti(_) => Command::RegionWriteMulti,
            Request::DeviceFeature { .. } => Command::DeviceFeature,
            Request::MigDataRead { .. } => Command::MigDataRead,
            Request::MigDataWrite { .. } => Command::MigDataWrite,
        }
    }

    /// Parses a command frame. `max_xfer` is the data count limit we advertised.
    pub fn parse(frame: Frame, max_xfer: u32) -> Result<Request, RequestError> {
        let Frame {
            header,
            payload,
            mut fds,
        } = frame;
        let command =
            Command::from_u16(header.command).ok_or(RequestError::ParseCommand(header.command))?;
        let p = payload.as_slice();
        let check_count = |count: u64| -> Result<(), RequestError> {
            if count == 0 {
                Err(RequestError::CheckZeroCount { command })
            } else if count > u64::from(max_xfer) {
                Err(RequestError::CheckDataCount {
                    command,
                    count,
                    max: max_xfer,
                })
            } else {
                Ok(())
            }
        };
        let req = match command {
            Command::Version => {
                no_fds(command, &fds)?;
                Request::Version(VersionPayload::parse(p)?)
            }
            Command::DmaMap => {
                let map: wire::DmaMap = exact(command, p, "expected 32")?;
                if fds.len() > 1 {
                    return Err(RequestError::CheckFdCount {
                        command,
                        allowed: "0 or 1",
                        got: fds.len(),
                    });
                }
                if map.flags & !(wire::DMA_MAP_FLAG_READ | wire::DMA_MAP_FLAG_WRITE) != 0 {
                    return Err(RequestError::CheckFlags {
                        command,
                        flags: map.flags,
                        why: "only READ (1) and WRITE (2) are defined",
                    });
                }
                Request::DmaMap { map, fd: fds.pop() }
            }
            Command::DmaUnmap => {
                no_fds(command, &fds)?;
                let unmap: wire::DmaUnmap = exact(command, p, "expected 24")?;
                if unmap.flags & !wire::DMA_UNMAP_FLAG_ALL != 0 {
                    return Err(RequestError::CheckFlags {
                        command,
                        flags: unmap.flags,
                        why: "only UNMAP_ALL (2) is supported; dirty bitmaps are not",
                    });
                }
                if unmap.flags & wire::DMA_UNMAP_FLAG_ALL != 0
                    && (unmap.address != 0 || unmap.size != 0)
                {
                    return Err(RequestError::CheckFlags {
                        command,
                        flags: unmap.flags,
                        why: "UNMAP_ALL requires address and size 0",
                    });
                }
                Request::DmaUnmap(unmap)
            }
            Command::DeviceGetInfo => {
                no_fds(command, &fds)?;
                let info: wire::DeviceInfo = exact(command, p, "expected 16")?;
                Request::DeviceGetInfo { argsz: info.argsz }
            }
            Command::DeviceGetRegionInfo => {
                no_fds(command, &fds)?;
                let info: wire::RegionInfo = exact(command, p, "expected 32")?;
                Request::DeviceGetRegionInfo {
                    argsz: info.argsz,
                    index: info.index,
                }
            }
            Command::DeviceGetRegionIoFds => {
                no_fds(command, &fds)?;
                let io: wire::RegionIoFds = exact(command, p, "expected 16")?;
                Request::DeviceGetRegionIoFds {
                    argsz: io.argsz,
                    index: io.index,
                }
            }
            Command::DeviceGetIrqInfo => {
                no_fds(command, &fds)?;
                let info: wire::IrqInfo = exact(command, p, "expected 16")?;
                Request::DeviceGetIrqInfo {
                    argsz: info.argsz,
                    index: info.index,
                }
            }
            Command::DeviceSetIrqs => Request::DeviceSetIrqs(parse_set_irqs(p, fds)?),
            Command::RegionRead => {
                no_fds(command, &fds)?;
                let a: wire::RegionAccess = exact(command, p, "expected 16")?;
                check_count(u64::from(a.count))?;
                Request::RegionRead {
                    region: a.region,
                    offset: a.offset,
                    count: a.count,
                }
            }
            Command::RegionWrite => {
                no_fds(command, &fds)?;
                let (a, data) =
                    prefix::<wire::RegionAccess>(command, p, "expected 16 plus the data")?;
                check_count(u64::from(a.count))?;
                if data.len() != a.count as usize {
                    return Err(RequestError::CheckPayloadSize {
                        command,
                        got: p.len(),
                        expected: "expected 16 plus exactly `count` data bytes",
                    });
                }
                Request::RegionWrite {
                    region: a.region,
                    offset: a.offset,
                    data: Payload::from_slice(data),
                }
            }
            Command::DmaRead | Command::DmaWrite => {
                return Err(RequestError::CheckDirection(command))
            }
            Command::DeviceReset => {
                no_fds(command, &fds)?;
                if !p.is_empty() {
                    return Err(RequestError::CheckPayloadSize {
                        command,
                        got: p.len(),
                        expected: "expected 0",
                    });
                }
                Request::DeviceReset
            }
            Command::RegionWriteMulti => {
                no_fds(command, &fds)?;
                let (count, rest) = prefix::<u64>(command, p, "expected 8 plus 24 per write")?;
                let entries = <[wire::WriteMultiEntry]>::ref_from_bytes(rest).map_err(|_| {
                    RequestError::CheckPayloadSize {
                        command,
                        got: p.len(),
                        expected: "expected 8 plus 24 per write",
                    }
                });
                let entries = entries?;
                if count != entries.len() as u64
                    || entries.is_empty()
                    || entries.len() > MAX_WRITE_MULTI_ENTRIES
                {
                    return Err(RequestError::CheckPayloadSize {
                        command,
                        got: p.len(),
                        expected: "expected wr_cnt (1..=1024) entries of 24 bytes",
                    });
                }
                let mut writes = Vec::with_capacity(entries.len());
                for e in entries {
                    if e.count == 0 || e.count > 8 {
                        return Err(RequestError::CheckFlags {
                            command,
                            flags: e.count,
                            why: "each write's count must be 1..=8",
                        });
                    }
                    writes.push(MultiWrite {
                        region: e.region,
                        offset: e.offset,
                        data: e.data[..e.count as usize].to_vec(),
                    });
                }
                Request::RegionWriteMulti(writes)
            }
            Command::DeviceFeature => {
                no_fds(command, &fds)?;
                let (f, data) =
                    prefix::<wire::DeviceFeature>(command, p, "expected 8 plus feature data")?;
                let ops = f.flags
                    & (wire::DEVICE_FEATURE_GET
                        | wire::DEVICE_FEATURE_SET
                        | wire::DEVICE_FEATURE_PROBE);
                if f.flags & !(wire::DEVICE_FEATURE_MASK | ops) != 0 || ops == 0 {
                    return Err(RequestError::CheckFlags {
                        command,
                        flags: f.flags,
                        why: "a feature index plus GET, SET and/or PROBE is required",
                    });
                }
                Request::DeviceFeature {
                    argsz: f.argsz,
                    flags: f.flags,
                    data: data.to_vec(),
                }
            }
            Command::MigDataRead => {
                no_fds(command, &fds)?;
                let m: wire::MigData = exact(command, p, "expected 8")?;
                check_count(u64::from(m.size))?;
                Request::MigDataRead {
                    argsz: m.argsz,
                    size: m.size,
                }
            }
            Command::MigDataWrite => {
                no_fds(command, &fds)?;
                let (m, data) = prefix::<wire::MigData>(command, p, "expected 8 plus the data")?;
                check_count(u64::from(m.size))?;
                if data.len() != m.size as usize {
                    return Err(RequestError::CheckPayloadSize {
                        command,
                        got: p.len(),
                        expected: "expected 8 plus exactly `size` data bytes",
                    });
                }
                Request::MigDataWrite {
                    data: data.to_vec(),
                }
            }
        };
        Ok(req)
    }
}

fn parse_set_irqs(p: &[u8], fds: Vec<OwnedFd>) -> Result<SetIrqsRequest, RequestError> {
    let command = Command::DeviceSetIrqs;
    let (s, data) =
        prefix::<wire::SetIrqs>(command, p, "expected 20 (plus bool bytes for DATA_BOOL)")?;
    let data_bits =
        s.flags & (wire::IRQ_SET_DATA_NONE | wire::IRQ_SET_DATA_BOOL | wire::IRQ_SET_DATA_EVENTFD);
    let action_bits = s.flags
        & (wire::IRQ_SET_ACTION_MASK | wire::IRQ_SET_ACTION_UNMASK | wire::IRQ_SET_ACTION_TRIGGER);
    let bad_flags = |why| RequestError::CheckFlags {
        command,
        flags: s.flags,
        why,
    };
    if s.flags & !(data_bits | action_bits) != 0 {
        return Err(bad_flags("undefined flag bits are set"));
    }
    if data_bits.count_ones() != 1 || action_bits.count_ones() != 1 {
        return Err(bad_flags(
            "exactly one DATA_* and one ACTION_* flag are required",
        ));
    }
    let action = match action_bits {
        wire::IRQ_SET_ACTION_MASK => IrqAction::Mask,
        wire::IRQ_SET_ACTION_UNMASK => IrqAction::Unmask,
        _ => IrqAction::Trigger,
    };
    if s.count == 0
        && !(s.start == 0 && action == IrqAction::Trigger && data_bits == wire::IRQ_SET_DATA_NONE)
    {
        return Err(bad_flags(
            "count 0 is only valid as start 0, DATA_NONE | ACTION_TRIGGER (disable all)",
        ));
    }
    if s.start.checked_add(s.count).is_none() {
        return Err(bad_flags("start + count overflows"));
    }
    let data = match data_bits {
        wire::IRQ_SET_DATA_NONE => {
            if !fds.is_empty() {
                return Err(RequestError::CheckFdCount {
                    command,
                    allowed: "no (DATA_NONE)",
                    got: fds.len(),
                });
            }
            if !data.is_empty() {
                return Err(RequestError::CheckPayloadSize {
                    command,
                    got: p.len(),
                    expected: "expected 20 for DATA_NONE",
                });
            }
            IrqData::None
        }
        wire::IRQ_SET_DATA_BOOL => {
            if !fds.is_empty() {
                return Err(RequestError::CheckFdCount {
                    command,
                    allowed: "no (DATA_BOOL)",
                    got: fds.len(),
                });
            }
            if data.len() != s.count as usize {
                return Err(RequestError::CheckPayloadSize {
                    command,
                    got: p.len(),
                    expected: "expected 20 plus one bool byte per vector",
                });
            }
            IrqData::Bool(data.iter().map(|b| *b != 0).collect())
        }
        _ => {
            if !data.is_empty() {
                return Err(RequestError::CheckPayloadSize {
                    command,
                    got: p.len(),
                    expected: "expected 20 for DATA_EVENTFD",
                });
            }
            if !fds.is_empty() && fds.len() != s.count as usize {
                return Err(RequestError::CheckFdCount {
                    command,
                    allowed: "exactly `count` (or 0 to de-assign)",
                    got: fds.len(),
                });
            }
            IrqData::Eventfds(fds)
        }
    };
    Ok(SetIrqsRequest {
        index: s.index,
        start: s.start,
        count: s.count,
        action,
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::encode;
    use zerocopy::IntoBytes;

    fn frame(command: u16, payload: &[u8]) -> Frame {
        let bytes = encode(1, command, 0, 0, &[payload]);
        Frame {
            header: wire::Header::read_from_prefix(&bytes).unwrap().0,
            payload: payload.into(),
            fds: Vec::new(),
        }
    }

    #[test]
    fn every_command_rejects_a_truncated_payload_without_panicking() {
        for c in Command::ALL {
            for len in [0usize, 1, 3, 7, 15, 19, 23, 31] {
                let _ = Request::parse(frame(c as u16, &vec![0xff; len]), 1 << 20);
            }
        }
    }

    #[test]
    fn region_read_limits() {
        let a = wire::RegionAccess {
            offset: 0,
            region: 7,
            count: 0,
        };
        let e = Request::parse(frame(9, a.as_bytes()), 4096).unwrap_err();
        assert_eq!(e.errno(), Errno::EINVAL);
        let a = wire::RegionAccess { count: 4097, ..a };
        let e = Request::parse(frame(9, a.as_bytes()), 4096).unwrap_err();
        assert_eq!(e.errno(), Errno::E2BIG);
        let a = wire::RegionAccess { count: 4, ..a };
        assert!(matches!(
            Request::parse(frame(9, a.as_bytes()), 4096).unwrap(),
            Request::RegionRead { count: 4, .. }
        ));
    }

    #[test]
    fn region_write_data_must_match_count() {
        let a = wire::RegionAccess {
            offset: 0,
            region: 0,
            count: 4,
        };
        let mut p = a.as_bytes().to_vec();
        p.extend([1, 2, 3]);
        assert!(Request::parse(frame(10, &p), 4096).is_err());
        p.push(4);
        match Request::parse(frame(10, &p), 4096).unwrap() {
            Request::RegionWrite { data, .. } => assert_eq!(data.as_slice(), [1, 2, 3, 4]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn set_irqs_flag_rules() {
        let s = |flags, start, count| wire::SetIrqs {
            argsz: 20,
            flags,
            index: 2,
            start,
            count,
        };
        let trig_none = wire::IRQ_SET_DATA_NONE | wire::IRQ_SET_ACTION_TRIGGER;
        assert!(Request::parse(frame(8, s(trig_none, 0, 0).as_bytes()), 4096).is_ok());
        assert!(Request::parse(frame(8, s(trig_none, 1, 0).as_bytes()), 4096).is_err());
        assert!(
            Request::parse(frame(8, s(wire::IRQ_SET_DATA_NONE, 0, 1).as_bytes()), 4096).is_err()
        );
        let two_data =
            wire::IRQ_SET_DATA_NONE | wire::IRQ_SET_DATA_BOOL | wire::IRQ_SET_ACTION_MASK;
        assert!(Request::parse(frame(8, s(two_data, 0, 1).as_bytes()), 4096).is_err());
        let mut b = s(wire::IRQ_SET_DATA_BOOL | wire::IRQ_SET_ACTION_TRIGGER, 0, 2)
            .as_bytes()
            .to_vec();
        assert!(Request::parse(frame(8, &b), 4096).is_err());
        b.extend([1, 0]);
        assert!(matches!(
            Request::parse(frame(8, &b), 4096).unwrap(),
            Request::DeviceSetIrqs(SetIrqsRequest { data: IrqData::Bool(ref v), .. }) if v == &[true, false]
        ));
        assert!(Request::parse(frame(8, s(trig_none, u32::MAX, 2).as_bytes()), 4096).is_err());
    }

    #[test]
    fn unknown_and_server_only_commands() {
        assert_eq!(
            Request::parse(frame(14, &[]), 4096).unwrap_err().errno(),
            Errno::ENOSYS
        );
        assert_eq!(
            Request::parse(frame(999, &[]), 4096).unwrap_err().errno(),
            Errno::ENOSYS
        );
        assert!(matches!(
            Request::parse(frame(11, &[0; 16]), 4096),
            Err(RequestError::CheckDirection(_))
        ));
    }

    #[test]
    fn write_multi_counts() {
        let e = wire::WriteMultiEntry {
            offset: 8,
            region: 0,
            count: 4,
            data: [1, 2, 3, 4, 0, 0, 0, 0],
        };
        let mut p = 2u64.as_bytes().to_vec();
        p.extend(e.as_bytes());
        assert!(
            Request::parse(frame(15, &p), 4096).is_err(),
            "wr_cnt says 2, one entry present"
        );
        p.extend(e.as_bytes());
        match Request::parse(frame(15, &p), 4096).unwrap() {
            Request::RegionWriteMulti(w) => assert_eq!(w[1].data, vec![1, 2, 3, 4]),
            other => panic!("{other:?}"),
        }
    }
}
