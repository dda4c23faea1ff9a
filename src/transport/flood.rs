//! Control-frame flood meter: counts the peer's PING and SETTINGS frames on
//! a server connection's decrypted bytes, below h2, and ends the connection
//! (GOAWAY ENHANCE_YOUR_CALM, through [`ActiveStreams::calm`]) when either
//! comes faster than any real client sends them.
//!
//! h2 answers PING and SETTINGS itself and tells us nothing about them, so
//! the meter reads the HTTP/2 frame headers as the bytes pass on their way
//! to h2: it skips the 24-byte client preface, then, frame by frame, reads
//! the 9-byte header (24-bit length, type, flags) and skips the payload.
//! Each frame costs a few comparisons; a read costs nothing more than a walk
//! over the frame headers it holds (one per 16 KiB to 64 KiB of DATA), with
//! no allocation and one clock read per threshold's worth of counted frames.
//!
//! Invariants: only non-ACK frames count (ACKs answer our own frames); once
//! over a threshold, the read that crossed it is cut just before the frame
//! that crossed it, and every later read stays pending, so h2 answers at
//! most the threshold's worth and the connection's task moves on to the
//! GOAWAY.
//!
//! Rejected: a hook in h2 (0.4 has none for received PING or SETTINGS, and
//! a fork is ours to maintain); counting TLS records (they do not align
//! with frames, and one record carries a thousand PINGs); h2's own defences
//! (it answers every PING and SETTINGS, bounded only by the peer reading
//! the answers, so a reading attacker keeps a shard busy for ever); a
//! second h2 frame decoder (copies and allocates what only needs counting).

use std::io;
use std::io::IoSlice;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::h2conf::ActiveStreams;

/// Non-ACK PING frames a peer may send in one second. Keepalive is one
/// every few seconds (ours: 2 s; gRPC's: 10 s and more); gRPC's bandwidth
/// probe sends one per round trip while it receives data, which stays
/// below this on any path slower than a 100 µs round trip. A flood sends
/// a million a second, so it is cut within milliseconds of work.
pub const MAX_PINGS_PER_SEC: u32 = 10_000;

/// Non-ACK SETTINGS frames a peer may send in one second. Clients send one
/// at start and gRPC a handful more as its window grows; each one can make
/// h2 walk every open stream (a new initial window), so the bound is low.
pub const MAX_SETTINGS_PER_SEC: u32 = 100;

const PREFACE_LEN: u8 = 24;
const PING: u8 = 0x6;
const SETTINGS: u8 = 0x4;
const ACK: u8 = 0x1;

/// Frames of one kind within a one-second window.
#[derive(Default)]
struct Rate {
    start: Option<Instant>,
    n: u32,
}

impl Rate {
    /// Counts one frame; true when it is over `max` within a second of the
    /// window's first frame. The clock is read only for a window's first
    /// frame and when the count passes `max`.
    fn over(&mut self, max: u32) -> bool {
        self.n += 1;
        if self.n == 1 {
            self.start = Some(Instant::now());
        }
        if self.n <= max {
            return false;
        }
        let now = Instant::now();
        if self.start.is_some_and(|s| now.duration_since(s) < Duration::from_secs(1)) {
            return true;
        }
        (self.start, self.n) = (Some(now), 1);
        false
    }
}

/// Where the scan is in the peer's byte stream.
struct Scan {
    /// Preface bytes still to skip.
    preface: u8,
    /// The frame header being read, and how much of it is in.
    head: [u8; 9],
    have: u8,
    /// Payload bytes still to skip.
    skip: usize,
}

/// A server connection's transport with the flood meter on its read side
/// (writes pass through untouched).
pub struct FloodMeter<T> {
    io: T,
    active: ActiveStreams,
    scan: Scan,
    pings: Rate,
    settings: Rate,
    tripped: bool,
}

impl<T> FloodMeter<T> {
    /// Meters `io` (whose peer starts with the client preface); over a
    /// threshold, `active` is told to calm the connection down.
    pub fn new(io: T, active: &ActiveStreams) -> FloodMeter<T> {
        FloodMeter {
            io,
            active: active.clone(),
            scan: Scan { preface: PREFACE_LEN, head: [0; 9], have: 0, skip: 0 },
            pings: Rate::default(),
            settings: Rate::default(),
            tripped: false,
        }
    }

    /// Scans `b`; returns how many of its bytes may go to h2 (all of them,
    /// unless a threshold was crossed in it).
    fn feed(&mut self, b: &[u8]) -> usize {
        let s = &mut self.scan;
        let mut i = 0;
        while i < b.len() {
            if s.preface > 0 {
                let n = (s.preface as usize).min(b.len() - i);
                (s.preface, i) = (s.preface - n as u8, i + n);
            } else if s.skip > 0 {
                let n = s.skip.min(b.len() - i);
                (s.skip, i) = (s.skip - n, i + n);
            } else {
                let start = i;
                let n = (9 - s.have as usize).min(b.len() - i);
                s.head[s.have as usize..s.have as usize + n].copy_from_slice(&b[i..i + n]);
                (s.have, i) = (s.have + n as u8, i + n);
                if s.have < 9 {
                    break;
                }
                s.have = 0;
                let h = s.head;
                s.skip = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
                let why = match (h[3], h[4] & ACK) {
                    (PING, 0) if self.pings.over(MAX_PINGS_PER_SEC) => "ping_flood",
                    (SETTINGS, 0) if self.settings.over(MAX_SETTINGS_PER_SEC) => "settings_flood",
                    _ => continue,
                };
                self.tripped = true;
                self.active.calm(why);
                return start;
            }
        }
        b.len()
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for FloodMeter<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if me.tripped {
            // The connection's task is ending it (the calm signal fired in
            // this same poll); h2 must not read on meanwhile.
            return Poll::Pending;
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut me.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            let pass = me.feed(&buf.filled()[before..]);
            buf.set_filled(before + pass);
            if me.tripped && pass == 0 {
                return Poll::Pending;
            }
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for FloodMeter<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let n = payload.len();
        let mut f = vec![(n >> 16) as u8, (n >> 8) as u8, n as u8, kind, flags, 0, 0, 0, 0];
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn pings_past_the_threshold_cut_the_read_before_the_frame_that_crossed_it() {
        let active = ActiveStreams::default();
        let mut m = FloodMeter::new((), &active);
        let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        bytes.extend(frame(SETTINGS, 0, &[0, 3, 0, 0, 0, 100]));
        bytes.extend(frame(0x0, 0, &[7; 40_000])); // DATA, skipped whole
        for _ in 0..MAX_PINGS_PER_SEC {
            bytes.extend(frame(PING, 0, &[1; 8]));
            bytes.extend(frame(PING, ACK, &[1; 8])); // answers never count
        }
        let cut = bytes.len();
        bytes.extend(frame(PING, 0, &[2; 8]));
        // Fed in odd-sized pieces, so headers split across reads.
        let mut passed = 0;
        for piece in bytes.chunks(1000 + 7) {
            passed += m.feed(piece);
            if m.tripped {
                break;
            }
        }
        assert!(m.tripped);
        assert_eq!(passed, cut, "everything before the crossing frame reaches h2, nothing after");
    }

    #[test]
    fn settings_are_bounded_much_lower_and_a_slow_rate_never_trips() {
        let active = ActiveStreams::default();
        let mut m = FloodMeter::new((), &active);
        m.feed(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        let one = frame(SETTINGS, 0, &[]);
        let n = (0..=MAX_SETTINGS_PER_SEC).take_while(|_| m.feed(&one) == one.len()).count();
        assert_eq!(n as u32, MAX_SETTINGS_PER_SEC);
        // A fresh window: the count starts again once a second has passed.
        let mut r = Rate::default();
        assert!(!r.over(1));
        r.start = Some(Instant::now() - Duration::from_secs(2));
        assert!(!r.over(1), "the second frame comes after the window ended");
        assert!(r.over(1), "but a third within the new window is over");
    }
}
