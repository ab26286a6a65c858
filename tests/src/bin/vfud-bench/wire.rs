//! A lean vfio-user requester for the measurements: pre-encoded requests, one `write` per
//! message, replies read header-then-body into a fixed buffer, exactly as the floor does. The
//! general-purpose test client allocates per reply; using it here would charge its cost to vfud.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use vfu_protocol::command::Command;
use vfu_protocol::wire::{
    Header, RegionAccess, FLAG_ERROR, FLAG_NO_REPLY, FLAG_TYPE_COMMAND, FLAG_TYPE_MASK,
    FLAG_TYPE_REPLY, HEADER_SIZE,
};
use zerocopy::{FromBytes, IntoBytes};

/// Size of a REGION_READ / REGION_WRITE request without data.
pub const ACCESS_SIZE: usize = HEADER_SIZE + size_of::<RegionAccess>();

/// One negotiated vfio-user connection driven without the test client.
pub struct RawConnection {
    sock: UnixStream,
    next_id: u16,
    buf: Vec<u8>,
}

impl RawConnection {
    /// Takes over a socket on which VERSION has already been negotiated.
    pub fn new(sock: UnixStream) -> RawConnection {
        RawConnection {
            sock,
            next_id: 0x4000,
            buf: vec![0; 64 * 1024],
        }
    }

    fn header(&mut self, command: Command, size: usize, flags: u32) -> Header {
        self.next_id = self.next_id.wrapping_add(1);
        Header {
            msg_id: self.next_id,
            command: command as u16,
            msg_size: size as u32,
            flags: FLAG_TYPE_COMMAND | flags,
            error: 0,
        }
    }

    /// Encodes a region access into `out` (header, access, data) and returns its length.
    fn encode_access(
        &mut self,
        out: &mut [u8; 128],
        command: Command,
        flags: u32,
        access: RegionAccess,
        data: &[u8],
    ) -> usize {
        let size = ACCESS_SIZE + data.len();
        let h = self.header(command, size, flags);
        out[..HEADER_SIZE].copy_from_slice(h.as_bytes());
        out[HEADER_SIZE..ACCESS_SIZE].copy_from_slice(access.as_bytes());
        out[ACCESS_SIZE..size].copy_from_slice(data);
        size
    }

    /// REGION_READ of `count` bytes, waiting for the reply.
    pub fn region_read(&mut self, region: u32, offset: u64, count: u32) -> std::io::Result<()> {
        let mut msg = [0u8; 128];
        let access = RegionAccess {
            offset,
            region,
            count,
        };
        let n = self.encode_access(&mut msg, Command::RegionRead, 0, access, &[]);
        self.sock.write_all(&msg[..n])?;
        self.read_reply(Command::RegionRead)
    }

    /// REGION_WRITE with No_reply.
    pub fn region_write_posted(
        &mut self,
        region: u32,
        offset: u64,
        data: &[u8],
    ) -> std::io::Result<()> {
        let mut msg = [0u8; 128];
        let access = RegionAccess {
            offset,
            region,
            count: data.len() as u32,
        };
        let n = self.encode_access(&mut msg, Command::RegionWrite, FLAG_NO_REPLY, access, data);
        self.sock.write_all(&msg[..n])
    }

    fn read_reply(&mut self, command: Command) -> std::io::Result<()> {
        let id = self.next_id;
        read_message(&mut self.sock, &mut self.buf)?;
        let (h, _) = Header::read_from_prefix(&self.buf[..]).map_err(|_| bad("short header"))?;
        if h.flags & FLAG_TYPE_MASK != FLAG_TYPE_REPLY || h.msg_id != id {
            return Err(bad("unexpected message instead of the reply"));
        }
        if h.flags & FLAG_ERROR != 0 {
            return Err(std::io::Error::other(format!(
                "{command:?} failed with errno {}",
                h.error
            )));
        }
        Ok(())
    }
}

fn bad(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string())
}

/// Reads one message as QEMU's client does: the header, then `msg_size - 16` bytes.
pub fn read_message(sock: &mut UnixStream, buf: &mut [u8]) -> std::io::Result<usize> {
    sock.read_exact(&mut buf[..HEADER_SIZE])?;
    let (h, _) = Header::read_from_prefix(&buf[..]).map_err(|_| bad("short header"))?;
    let size = h.msg_size as usize;
    if !(HEADER_SIZE..=buf.len()).contains(&size) {
        return Err(bad("message size out of range"));
    }
    sock.read_exact(&mut buf[HEADER_SIZE..size])?;
    Ok(size)
}

/// A message of `size` bytes with a valid header, for the floor.
pub fn floor_message(size: usize, reply: bool, no_reply: bool) -> Vec<u8> {
    let mut m = vec![0u8; size];
    let h = Header {
        msg_id: 1,
        command: Command::RegionRead as u16,
        msg_size: size as u32,
        flags: if reply {
            FLAG_TYPE_REPLY
        } else {
            FLAG_TYPE_COMMAND
        } | if no_reply { FLAG_NO_REPLY } else { 0 },
        error: 0,
    };
    m[..HEADER_SIZE].copy_from_slice(h.as_bytes());
    m
}
