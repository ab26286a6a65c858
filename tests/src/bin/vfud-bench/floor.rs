//! The floor every vfud figure is compared with: the same message sizes exchanged over an
//! AF_UNIX socketpair between two threads, read header-then-body like a vfio-user peer.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::thread;
use std::time::Instant;

use crate::stats::Samples;
use crate::wire::{floor_message, read_message};

/// Round trips of a `request`-byte message answered by a `reply`-byte message.
pub fn ping_pong(request: usize, reply: usize, warmup: usize, iterations: usize) -> Samples {
    let (mut a, mut b) = UnixStream::pair().expect("socketpair");
    let responder = thread::spawn(move || {
        let answer = floor_message(reply, true, false);
        let mut buf = vec![0u8; 64 * 1024];
        while read_message(&mut b, &mut buf).is_ok() {
            if b.write_all(&answer).is_err() {
                break;
            }
        }
    });
    let msg = floor_message(request, false, false);
    let mut buf = vec![0u8; 64 * 1024];
    let mut samples = Samples::with_capacity(iterations);
    for i in 0..warmup + iterations {
        let t = Instant::now();
        a.write_all(&msg).expect("floor write");
        read_message(&mut a, &mut buf).expect("floor read");
        if i >= warmup {
            samples.push(t.elapsed());
        }
    }
    drop(a);
    responder.join().expect("floor responder");
    samples
}

/// Nanoseconds per message for `count` posted `size`-byte messages followed by one round trip,
/// the shape of a posted REGION_WRITE stream closed by a read.
pub fn posted_stream(size: usize, count: usize) -> f64 {
    let (mut a, mut b) = UnixStream::pair().expect("socketpair");
    let responder = thread::spawn(move || {
        let answer = floor_message(36, true, false);
        let mut buf = vec![0u8; 64 * 1024];
        let mut seen = 0usize;
        while let Ok(n) = read_message(&mut b, &mut buf) {
            seen += 1;
            // The closing request is the only one without No_reply; answer it.
            if n != size && b.write_all(&answer).is_err() {
                break;
            }
        }
        seen
    });
    let posted = floor_message(size, false, true);
    let closing = floor_message(32, false, false);
    let mut buf = vec![0u8; 64 * 1024];
    let t = Instant::now();
    for _ in 0..count {
        a.write_all(&posted).expect("floor write");
    }
    a.write_all(&closing).expect("floor write");
    read_message(&mut a, &mut buf).expect("floor read");
    let ns = t.elapsed().as_nanos() as f64 / count as f64;
    drop(a);
    let seen = responder.join().expect("floor responder");
    assert_eq!(seen, count + 1, "floor responder lost messages");
    ns
}
