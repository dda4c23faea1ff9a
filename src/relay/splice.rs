//! Splice: joins a framed dial stream (HTTP/2 + gRPC `Frame`s) to a plain
//! byte stream: a TCP target on the agent, a local connection or stdio on the
//! client.
//!
//! Invariants:
//! - Payload read from the byte side is framed in place (the header goes
//!   into headroom, [`DataBuf`]), so it is sent as one `Bytes`, uncopied.
//! - Payload from the dial side is written out as slices of the received
//!   DATA frames; every Data message already decoded from a chunk goes out
//!   in one vectored write (one `sendmsg`), not one write per message.
//! - Credit follows the rule of [`super::grpc`]: a chunk's credit returns
//!   only once all its payload was written to the byte side.
//! - Half-close maps to TCP `shutdown(Write)` and back to END_STREAM.
//! - A metered read half ([`split_tcp_metered`]) counts its read buffer in
//!   the shard's buffer budget; past the budget's soft level its buffer
//!   stops growing and a stream stalled on a slow reader holds only its
//!   one pending message.
//! - The agent side ends the call with OK trailers at the target's EOF, or
//!   with the failure's trailers; a reset from the caller ends the splice
//!   and drops (closes) the target connection.

use std::io::IoSlice;
use std::net::Shutdown;
use std::pin::Pin;

use bytes::Bytes;
use futures_lite::AsyncReadExt;
use glommio::net::TcpStream;
use tokio::io::AsyncWrite;

use super::grpc::{GrpcRecv, GrpcSend};
use super::Item;
use crate::runtime::budget::BufMeter;
use crate::runtime::pipe::{PipeRx, PipeTx};
use crate::transport::io::GlommioIo;
use crate::wire::codec::DataBuf;
use crate::wire::error::{Error, Label, Retry, Side};
use crate::wire::status::{Code, Status};

/// Read size from a byte stream.
pub const READ_CHUNK: usize = 64 << 10;
/// Most Data messages gathered into one vectored write.
const MAX_BATCH: usize = 64;

/// The readable side of a byte stream, producing framed Data messages.
pub trait ByteIn {
    /// The next framed Data message, `None` at EOF.
    fn next_framed(&mut self) -> impl std::future::Future<Output = std::io::Result<Option<Bytes>>>;

    /// `framed` is about to wait for send capacity (the reader is slow):
    /// a source with a buffer budget may give memory back here, and return
    /// the message to send (the same, or a copy that no longer holds a
    /// larger read buffer).
    fn stalled(&mut self, framed: Bytes) -> Bytes {
        framed
    }
}

/// The writable side of a byte stream.
pub trait ByteOut {
    /// Writes every payload slice in `bufs` (and empties it).
    fn write_all(&mut self, bufs: &mut Vec<Bytes>) -> impl std::future::Future<Output = std::io::Result<()>>;
    /// Half-closes (no more writes).
    fn shutdown(&mut self) -> impl std::future::Future<Output = ()>;
}

/// Read half of a TCP stream.
pub struct TcpIn {
    s: TcpStream,
    buf: DataBuf,
    /// The shard's buffer meter, and the bytes of it this half accounts for.
    meter: Option<(BufMeter, usize)>,
}

/// Write half of a TCP stream.
pub struct TcpOut {
    s: GlommioIo,
}

/// Splits a TCP stream into independent halves (two descriptors of one
/// socket, so neither half needs a lock).
pub fn split_tcp(s: TcpStream) -> std::io::Result<(TcpIn, TcpOut)> {
    use std::os::fd::{AsRawFd, FromRawFd};
    // SAFETY: dup returns a new descriptor we own.
    let fd = unsafe { libc::dup(s.as_raw_fd()) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, owned, connected TCP socket.
    let w = unsafe { TcpStream::from_raw_fd(fd) };
    Ok((TcpIn { s, buf: DataBuf::new(READ_CHUNK), meter: None }, TcpOut { s: GlommioIo::new(w) }))
}

/// [`split_tcp`], with the read buffer counted in `meter` (the shard's
/// buffer budget): past its soft level the buffer keeps its first size, and
/// a stalled stream gives its buffer back.
pub fn split_tcp_metered(s: TcpStream, meter: &BufMeter) -> std::io::Result<(TcpIn, TcpOut)> {
    let (mut i, o) = split_tcp(s)?;
    i.meter = Some((meter.clone(), 0));
    Ok((i, o))
}

impl TcpIn {
    /// Accounts `now` bytes for this half instead of what it had.
    fn account(&mut self, now: usize) {
        if let Some((m, had)) = &mut self.meter {
            m.sub(*had);
            m.add(now);
            *had = now;
        }
    }
}

impl Drop for TcpIn {
    fn drop(&mut self) {
        self.account(0);
    }
}

impl ByteIn for TcpIn {
    async fn next_framed(&mut self) -> std::io::Result<Option<Bytes>> {
        if let Some((m, _)) = &self.meter {
            self.buf.set_growing(!m.over_soft());
        }
        let (_, fresh) = self.buf.spare_fresh();
        if fresh > 0 {
            // The previous allocation lives on only in chunks already sent.
            self.account(fresh);
        }
        let n = self.s.read(self.buf.spare()).await?;
        Ok(if n == 0 { None } else { Some(self.buf.commit(n)) })
    }

    fn stalled(&mut self, framed: Bytes) -> Bytes {
        match &self.meter {
            Some((m, _)) if m.over_soft() => {
                // Past the soft level a stalled stream keeps only its
                // message, in an allocation of its own size; its (possibly
                // grown) read buffer goes back.
                self.buf.shed();
                let copy = Bytes::copy_from_slice(&framed);
                self.account(copy.len());
                copy
            }
            _ => framed,
        }
    }
}

impl ByteOut for TcpOut {
    async fn write_all(&mut self, bufs: &mut Vec<Bytes>) -> std::io::Result<()> {
        let mut first = 0;
        while first < bufs.len() {
            let n = std::future::poll_fn(|cx| {
                let mut iov = [IoSlice::new(&[]); MAX_BATCH];
                let k = (bufs.len() - first).min(MAX_BATCH);
                for (slot, b) in iov.iter_mut().zip(&bufs[first..first + k]) {
                    *slot = IoSlice::new(b);
                }
                Pin::new(&mut self.s).poll_write_vectored(cx, &iov[..k])
            })
            .await?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            let mut n = n;
            while n > 0 {
                let len = bufs[first].len();
                if n >= len {
                    n -= len;
                    first += 1;
                } else {
                    let _ = bufs[first].split_to(n);
                    n = 0;
                }
            }
        }
        bufs.clear();
        Ok(())
    }

    async fn shutdown(&mut self) {
        let _ = self.s.get_ref().shutdown(Shutdown::Write).await;
    }
}

impl ByteIn for PipeRx<Item> {
    async fn next_framed(&mut self) -> std::io::Result<Option<Bytes>> {
        match self.recv().await {
            Some(Item::Data(b)) => Ok(Some(b)),
            _ => Ok(None),
        }
    }
}

impl ByteOut for PipeTx<Item> {
    async fn write_all(&mut self, bufs: &mut Vec<Bytes>) -> std::io::Result<()> {
        for b in bufs.drain(..) {
            self.send(Item::Data(b)).await.map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))?;
        }
        Ok(())
    }

    async fn shutdown(&mut self) {
        let _ = self.send(Item::End(None)).await;
    }
}

/// Which end of a dial this splice is.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum End {
    /// The agent: the byte side is the target; its EOF ends the call with
    /// OK trailers.
    Agent,
    /// The client: the byte side's EOF half-closes the request; the call
    /// ends with the server's trailers.
    Client,
}

fn byte_side(end: End) -> Side {
    match end {
        End::Agent => Side::Target,
        End::Client => Side::Client,
    }
}

/// Decoded dial payload → byte stream. Returns the status the dial
/// direction ended with (the server's trailers on the client end).
async fn framed_to_bytes<O: ByteOut>(rx: &mut GrpcRecv, out: &mut O, end: End) -> Result<Option<Status>, Error> {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        match rx.next_data().await? {
            Some(b) => {
                batch.push(b);
                rx.ready_data(&mut batch)?;
                out.write_all(&mut batch).await.map_err(|e| {
                    let m = format!("write to the {} failed: {e}", byte_side(end).name());
                    Error::unavailable(byte_side(end), Retry::Unsafe, Label::TargetIo, m)
                })?;
                glommio::yield_if_needed().await;
            }
            None => {
                out.shutdown().await;
                if end == End::Agent {
                    return Ok(None);
                }
                let t = rx.trailers().await?;
                return Ok(Some(
                    t.as_ref()
                        .and_then(Status::from_headers)
                        .unwrap_or_else(|| Status::new(Code::Unknown, "the dial ended without a status")),
                ));
            }
        }
    }
}

/// Byte stream → framed dial payload.
async fn bytes_to_framed<I: ByteIn>(inp: &mut I, tx: &mut GrpcSend, end: End) -> Result<(), Error> {
    loop {
        match inp.next_framed().await {
            Ok(Some(framed)) => {
                let framed = if tx.reserve_now(framed.len()) { framed } else { inp.stalled(framed) };
                tx.send(framed).await?;
                glommio::yield_if_needed().await;
            }
            Ok(None) => {
                return match end {
                    End::Agent => tx.trailers(Status::ok().to_trailers()),
                    End::Client => tx.close(),
                }
            }
            Err(e) => {
                let m = format!("read from the {} failed: {e}", byte_side(end).name());
                return Err(Error::unavailable(byte_side(end), Retry::Unsafe, Label::TargetIo, m));
            }
        }
    }
}

/// Runs a dial's two directions between `tx`/`rx` and a byte stream.
/// On the agent end the call ends when the byte side reaches EOF; on the
/// client end when the server's trailers arrive (returned).
pub async fn splice<I: ByteIn, O: ByteOut>(
    mut inp: I,
    mut out: O,
    mut tx: GrpcSend,
    mut rx: GrpcRecv,
    end: End,
) -> Result<Status, Error> {
    let r = {
        let to_bytes = framed_to_bytes(&mut rx, &mut out, end);
        let to_framed = bytes_to_framed(&mut inp, &mut tx, end);
        match end {
            End::Agent => {
                futures_lite::future::or(async { to_framed.await.map(|_| Status::ok()) }, async {
                    match to_bytes.await {
                        Ok(_) => std::future::pending().await,
                        Err(e) => Err(e),
                    }
                })
                .await
            }
            End::Client => {
                futures_lite::future::or(async { to_bytes.await.map(|s| s.unwrap_or_else(Status::ok)) }, async {
                    match to_framed.await {
                        Ok(()) => std::future::pending().await,
                        Err(e) => Err(e),
                    }
                })
                .await
            }
        }
    };
    if let Err(e) = &r {
        super::Sink::fail(&mut tx, e).await;
    }
    r
}
