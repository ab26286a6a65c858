//! Framing: splitting a byte stream into messages, with limits checked before any allocation.
//!
//! [`FrameDecoder`] is a sans-I/O state machine shared by the async server and the blocking
//! client. It hands out exactly the buffer to fill next (the 16-byte header, then the payload),
//! so a read never crosses into the next message and the fds that arrive belong to this one.

use std::os::fd::OwnedFd;

use smallvec::SmallVec;
use zerocopy::{FromBytes, IntoBytes};

use crate::wire::{
    Header, FLAG_ERROR, FLAG_NO_REPLY, FLAG_TYPE_COMMAND, FLAG_TYPE_MASK, FLAG_TYPE_REPLY,
    HEADER_SIZE,
};

/// Payloads up to this size are stored inline in the [`Frame`]: every small REGION_READ /
/// REGION_WRITE (16-byte prefix plus up to 8 data bytes, as MMIO and config accesses are) and
/// most other commands are then framed without a heap allocation.
pub const INLINE_PAYLOAD: usize = 64;

/// A message payload: inline up to [`INLINE_PAYLOAD`] bytes, on the heap above.
pub type Payload = SmallVec<[u8; INLINE_PAYLOAD]>;

/// One complete message as received.
#[derive(Debug)]
pub struct Frame {
    pub header: Header,
    pub payload: Payload,
    pub fds: Vec<OwnedFd>,
}

impl Frame {
    /// The message type bits.
    pub fn kind(&self) -> u32 {
        self.header.flags & FLAG_TYPE_MASK
    }

    /// Whether this is a command (as opposed to a reply).
    pub fn is_command(&self) -> bool {
        self.kind() == FLAG_TYPE_COMMAND
    }

    /// Whether this is a reply.
    pub fn is_reply(&self) -> bool {
        self.kind() == FLAG_TYPE_REPLY
    }

    /// Whether the sender asked for no reply.
    pub fn no_reply(&self) -> bool {
        self.header.flags & FLAG_NO_REPLY != 0
    }

    /// The errno of an error reply, if this is one. The spec allows 0 ("unknown error").
    pub fn error(&self) -> Option<u32> {
        (self.header.flags & FLAG_ERROR != 0).then_some(self.header.error)
    }
}

/// Encodes one message: header (with `msg_size` computed) followed by `payload`.
pub fn encode(msg_id: u16, command: u16, flags: u32, error: u32, payload: &[&[u8]]) -> Vec<u8> {
    let len: usize = payload.iter().map(|p| p.len()).sum();
    let mut out = Vec::with_capacity(HEADER_SIZE + len);
    let header = Header {
        msg_id,
        command,
        msg_size: u32::try_from(HEADER_SIZE + len).unwrap_or(u32::MAX),
        flags,
        error,
    };
    out.extend_from_slice(header.as_bytes());
    for p in payload {
        out.extend_from_slice(p);
    }
    out
}

/// Encodes a header-only error reply to `request`.
pub fn encode_error_reply(request: &Header, errno: i32) -> Vec<u8> {
    encode(
        request.msg_id,
        request.command,
        FLAG_TYPE_REPLY | FLAG_ERROR,
        u32::try_from(errno).unwrap_or(nix::errno::Errno::EINVAL as u32),
        &[],
    )
}

/// Limits applied while framing, before the payload is allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameLimits {
    /// Largest payload (message minus header) accepted.
    pub max_payload: usize,
    /// Most fds accepted with one message.
    pub max_fds: usize,
}

impl FrameLimits {
    /// Limits for a peer that may send data counts up to `max_data_xfer_size`: the largest
    /// payload is a data-carrying command's 16-byte prefix plus the data, or a VERSION with a
    /// JSON string of at most 4 KiB, whichever is larger.
    pub fn for_xfer_size(max_data_xfer_size: u32, max_fds: u32) -> FrameLimits {
        FrameLimits {
            max_payload: (max_data_xfer_size as usize + 32).max(4096 + 4),
            max_fds: max_fds as usize,
        }
    }
}

/// A stream-level framing failure after which no further message boundary can be trusted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("message size {0} is smaller than the 16-byte header")]
    CheckHeaderSize(u32),
}

/// What [`FrameDecoder::advance`] produced.
#[derive(Debug)]
pub enum Decoded {
    /// More bytes are needed.
    Pending,
    /// A complete message.
    Frame(Frame),
    /// A message that cannot be served; its payload was read and thrown away so the stream
    /// stays in sync, and any fds it carried were closed. The caller sends an error reply.
    Rejected(Header, Rejection),
}

/// Why a complete message was rejected while framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// Its size exceeds the negotiated maximum (E2BIG).
    TooLarge,
    /// It carried more fds than the negotiated maximum (EINVAL).
    TooManyFds,
}

impl Rejection {
    /// The errno for the error reply.
    pub fn errno(self) -> nix::errno::Errno {
        match self {
            Rejection::TooLarge => nix::errno::Errno::E2BIG,
            Rejection::TooManyFds => nix::errno::Errno::EINVAL,
        }
    }
}

#[derive(Debug)]
enum State {
    Header {
        buf: [u8; HEADER_SIZE],
        got: usize,
    },
    Payload {
        header: Header,
        buf: Payload,
        got: usize,
    },
    Discard {
        header: Header,
        remaining: usize,
    },
}

/// Sans-I/O message decoder; see the module documentation.
#[derive(Debug)]
pub struct FrameDecoder {
    limits: FrameLimits,
    state: State,
    fds: Vec<OwnedFd>,
    scratch: Vec<u8>,
    rejected: Option<Rejection>,
}

impl FrameDecoder {
    pub fn new(limits: FrameLimits) -> FrameDecoder {
        FrameDecoder {
            limits,
            state: State::Header {
                buf: [0; HEADER_SIZE],
                got: 0,
            },
            fds: Vec::new(),
            scratch: Vec::new(),
            rejected: None,
        }
    }

    /// The current limits.
    pub fn limits(&self) -> FrameLimits {
        self.limits
    }

    /// True between messages: an end of stream here is a clean close, elsewhere a truncation.
    pub fn is_idle(&self) -> bool {
        matches!(self.state, State::Header { got: 0, .. })
            && self.fds.is_empty()
            && self.rejected.is_none()
    }

    /// Marks the message being read as carrying too many fds; it is rejected once complete.
    pub fn reject_fds(&mut self) {
        self.fds.clear();
        self.rejected.get_or_insert(Rejection::TooManyFds);
    }

    /// The buffer the next read must fill (never empty).
    pub fn read_buf(&mut self) -> &mut [u8] {
        match &mut self.state {
            State::Header { buf, got } => &mut buf[*got..],
            State::Payload { buf, got, .. } => &mut buf[*got..],
            State::Discard { remaining, .. } => {
                let n = (*remaining).min(64 * 1024);
                self.scratch.resize(n, 0);
                &mut self.scratch[..n]
            }
        }
    }

    /// Records that `n` bytes (n > 0) were read into [`Self::read_buf`], with `fds` alongside.
    pub fn advance(&mut self, n: usize, fds: Vec<OwnedFd>) -> Result<Decoded, FrameError> {
        self.fds.extend(fds);
        match &mut self.state {
            State::Header { buf, got } => {
                *got += n;
                if *got < HEADER_SIZE {
                    return Ok(Decoded::Pending);
                }
                let header = Header::read_from_bytes(&buf[..]).unwrap_or_default();
                let size = header.msg_size as usize;
                if size < HEADER_SIZE {
                    self.fds.clear();
                    return Err(FrameError::CheckHeaderSize(header.msg_size));
                }
                let payload = size - HEADER_SIZE;
                if self.fds.len() > self.limits.max_fds {
                    self.reject_fds();
                }
                if payload > self.limits.max_payload {
                    self.fds.clear();
                    self.rejected = Some(Rejection::TooLarge);
                }
                if self.rejected.is_some() {
                    if payload == 0 {
                        return Ok(self.finish(header, Payload::new()));
                    }
                    self.state = State::Discard {
                        header,
                        remaining: payload,
                    };
                    return Ok(Decoded::Pending);
                }
                if payload == 0 {
                    return Ok(self.finish(header, Payload::new()));
                }
                self.state = State::Payload {
                    header,
                    buf: Payload::from_elem(0, payload),
                    got: 0,
                };
                Ok(Decoded::Pending)
            }
            State::Payload { header, buf, got } => {
                *got += n;
                if *got < buf.len() {
                    return Ok(Decoded::Pending);
                }
                let header = *header;
                let payload = std::mem::take(buf);
                Ok(self.finish(header, payload))
            }
            State::Discard { header, remaining } => {
                self.fds.clear();
                *remaining -= n.min(*remaining);
                if *remaining > 0 {
                    return Ok(Decoded::Pending);
                }
                let header = *header;
                self.scratch = Vec::new();
                Ok(self.finish(header, Payload::new()))
            }
        }
    }

    fn finish(&mut self, header: Header, payload: Payload) -> Decoded {
        let fds = std::mem::take(&mut self.fds);
        self.reset();
        if let Some(why) = self.rejected.take() {
            return Decoded::Rejected(header, why);
        }
        if fds.len() > self.limits.max_fds {
            return Decoded::Rejected(header, Rejection::TooManyFds);
        }
        Decoded::Frame(Frame {
            header,
            payload,
            fds,
        })
    }

    fn reset(&mut self) {
        self.state = State::Header {
            buf: [0; HEADER_SIZE],
            got: 0,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(dec: &mut FrameDecoder, mut bytes: &[u8], step: usize) -> Vec<Decoded> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let buf = dec.read_buf();
            let n = buf.len().min(step).min(bytes.len());
            buf[..n].copy_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            match dec.advance(n, Vec::new()).unwrap() {
                Decoded::Pending => {}
                d => out.push(d),
            }
        }
        out
    }

    #[test]
    fn decodes_back_to_back_messages_in_any_chunking() {
        let mut stream = encode(1, 4, 0, 0, &[&[1, 2, 3, 4]]);
        stream.extend(encode(2, 13, 0, 0, &[]));
        for step in [1, 3, 16, 1000] {
            let mut dec = FrameDecoder::new(FrameLimits {
                max_payload: 64,
                max_fds: 1,
            });
            let out = feed(&mut dec, &stream, step);
            assert_eq!(out.len(), 2);
            match &out[0] {
                Decoded::Frame(f) => {
                    assert_eq!(f.header.msg_id, 1);
                    assert_eq!(f.payload.as_slice(), [1, 2, 3, 4]);
                }
                other => panic!("{other:?}"),
            }
            assert!(
                matches!(&out[1], Decoded::Frame(f) if f.header.command == 13 && f.payload.is_empty())
            );
            assert!(dec.is_idle());
        }
    }

    #[test]
    fn oversized_payload_is_discarded_and_the_stream_stays_in_sync() {
        let mut stream = encode(7, 10, 0, 0, &[&[0u8; 100]]);
        stream.extend(encode(8, 4, 0, 0, &[&[0u8; 16]]));
        let mut dec = FrameDecoder::new(FrameLimits {
            max_payload: 32,
            max_fds: 1,
        });
        let out = feed(&mut dec, &stream, 7);
        assert!(matches!(&out[0], Decoded::Rejected(h, Rejection::TooLarge) if h.msg_id == 7));
        assert!(matches!(&out[1], Decoded::Frame(f) if f.header.msg_id == 8));
    }

    #[test]
    fn header_size_below_16_cannot_be_framed() {
        let mut bad = encode(1, 4, 0, 0, &[]);
        bad[4] = 8;
        let mut dec = FrameDecoder::new(FrameLimits {
            max_payload: 32,
            max_fds: 1,
        });
        dec.read_buf()[..16].copy_from_slice(&bad);
        assert_eq!(
            dec.advance(16, Vec::new()).unwrap_err(),
            FrameError::CheckHeaderSize(8)
        );
    }
}
