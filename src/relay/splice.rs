//! Splice: joins a framed dial stream (HTTP/2 + gRPC `Frame`s) to a plain
//! byte stream: a TCP target on the agent, a local connection or stdio on the
//! client.
//!
//! Invariants: payload read from the byte side is framed in place (header
//! written into headroom, [`DataBuf`]); payload from the dial side is written
//! out as slices of the received DATA frames; half-close maps to TCP
//! `shutdown(Write)` and back to END_STREAM; flow-control capacity is
//! released only after the bytes were written.

use std::future::poll_fn;
use std::net::Shutdown;

use bytes::Bytes;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use h2::{RecvStream, SendStream};

use super::{wait_capacity, RelayError};
use crate::runtime::pipe::{Item, PipeRx, PipeTx};
use crate::wire::codec::{DataBuf, Event, FrameDecoder};
use crate::wire::status::{Code, Status};

/// Read size from a byte stream.
pub const READ_CHUNK: usize = 64 << 10;

/// The readable side of a byte stream, producing framed Data messages.
pub trait ByteIn {
    /// The next framed Data message, `None` at EOF.
    fn next_framed(&mut self) -> impl std::future::Future<Output = std::io::Result<Option<Bytes>>>;
}

/// The writable side of a byte stream.
pub trait ByteOut {
    /// Writes a payload slice.
    fn write(&mut self, b: Bytes) -> impl std::future::Future<Output = std::io::Result<()>>;
    /// Half-closes (no more writes).
    fn shutdown(&mut self) -> impl std::future::Future<Output = ()>;
}

/// Read half of a TCP stream.
pub struct TcpIn {
    s: TcpStream,
    buf: DataBuf,
}

/// Write half of a TCP stream.
pub struct TcpOut {
    s: TcpStream,
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
    let _ = s.set_nodelay(true);
    Ok((TcpIn { s, buf: DataBuf::new(READ_CHUNK) }, TcpOut { s: w }))
}

impl ByteIn for TcpIn {
    async fn next_framed(&mut self) -> std::io::Result<Option<Bytes>> {
        let n = self.s.read(self.buf.spare()).await?;
        Ok(if n == 0 { None } else { Some(self.buf.commit(n)) })
    }
}

impl ByteOut for TcpOut {
    async fn write(&mut self, b: Bytes) -> std::io::Result<()> {
        self.s.write_all(&b).await
    }

    async fn shutdown(&mut self) {
        let _ = self.s.shutdown(Shutdown::Write).await;
    }
}

impl ByteIn for PipeRx {
    async fn next_framed(&mut self) -> std::io::Result<Option<Bytes>> {
        match self.recv().await {
            Some(Item::Data(b)) => Ok(Some(b)),
            _ => Ok(None),
        }
    }
}

impl ByteOut for PipeTx {
    async fn write(&mut self, b: Bytes) -> std::io::Result<()> {
        self.send(Item::Data(b)).await.map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))
    }

    async fn shutdown(&mut self) {
        let _ = self.send(Item::End(None)).await;
    }
}

/// Which end of a dial this splice is.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Side {
    /// The agent: the byte side's EOF ends the call with OK trailers.
    Agent,
    /// The client: the byte side's EOF half-closes the request; the call
    /// ends with the server's trailers.
    Client,
}

/// Decoded dial bytes → byte stream. Returns the status at the end of the
/// dial direction (the server's trailers on the client side).
async fn framed_to_bytes<O: ByteOut>(
    rx: &mut RecvStream,
    dec: &mut FrameDecoder,
    out: &mut O,
    side: Side,
) -> Result<Option<Status>, Status> {
    // Capacity of a chunk (payload and framing) is released once everything
    // decoded from it has been written.
    let mut pending = 0usize;
    loop {
        while let Some(ev) = dec.decode_next().map_err(|e| e.status())? {
            match ev {
                Event::Data(b) => {
                    out.write(b).await.map_err(|e| Status::new(Code::Unavailable, format!("write failed: {e}")))?;
                }
                Event::Frame(_) => {
                    return Err(Status::new(
                        Code::InvalidArgument,
                        "unexpected non-Data frame after the dial was established",
                    ))
                }
            }
        }
        if pending > 0 {
            let _ = rx.flow_control().release_capacity(pending);
        }
        match poll_fn(|cx| rx.poll_data(cx)).await {
            Some(Ok(chunk)) => {
                pending = chunk.len();
                dec.push(chunk);
                glommio::yield_if_needed().await;
            }
            Some(Err(e)) => return Err(Status::new(Code::Unavailable, format!("dial stream failed: {e}"))),
            None => {
                dec.finish().map_err(|e| e.status())?;
                out.shutdown().await;
                if side == Side::Client {
                    let t = poll_fn(|cx| rx.poll_trailers(cx))
                        .await
                        .map_err(|e| Status::new(Code::Unavailable, format!("dial stream failed: {e}")))?;
                    return Ok(Some(
                        t.as_ref()
                            .and_then(Status::from_headers)
                            .unwrap_or_else(|| Status::new(Code::Unknown, "the dial ended without a status")),
                    ));
                }
                return Ok(None);
            }
        }
    }
}

/// Byte stream → framed dial bytes.
async fn bytes_to_framed<I: ByteIn>(inp: &mut I, tx: &mut SendStream<Bytes>, side: Side) -> Result<(), Status> {
    let h2err = |e: RelayError| Status::new(Code::Unavailable, format!("dial stream failed: {e}"));
    loop {
        match inp.next_framed().await {
            Ok(Some(framed)) => {
                wait_capacity(tx, framed.len()).await.map_err(h2err)?;
                tx.send_data(framed, false).map_err(|e| h2err(e.into()))?;
                glommio::yield_if_needed().await;
            }
            Ok(None) => {
                match side {
                    Side::Agent => tx.send_trailers(Status::ok().to_trailers()),
                    Side::Client => tx.send_data(Bytes::new(), true),
                }
                .map_err(|e| h2err(e.into()))?;
                return Ok(());
            }
            Err(e) => {
                let s = Status::new(Code::Unavailable, format!("read failed: {e}"));
                if side == Side::Agent {
                    let _ = tx.send_trailers(s.to_trailers());
                }
                return Err(s);
            }
        }
    }
}

/// Runs a dial's two directions between `tx`/`rx` and a byte stream.
/// On the agent side the call ends when the byte side reaches EOF; on the
/// client side when the server's trailers arrive (returned).
pub async fn splice<I: ByteIn, O: ByteOut>(
    mut inp: I,
    mut out: O,
    mut tx: SendStream<Bytes>,
    mut rx: RecvStream,
    mut dec: FrameDecoder,
    side: Side,
) -> Result<Status, Status> {
    match side {
        Side::Agent => {
            let up = framed_to_bytes(&mut rx, &mut dec, &mut out, side);
            let down = bytes_to_framed(&mut inp, &mut tx, side);
            futures_lite::future::or(async { down.await.map(|_| Status::ok()) }, async {
                match up.await {
                    Ok(_) => std::future::pending().await,
                    Err(s) => Err(s),
                }
            })
            .await
        }
        Side::Client => {
            let down = framed_to_bytes(&mut rx, &mut dec, &mut out, side);
            let up = bytes_to_framed(&mut inp, &mut tx, side);
            futures_lite::future::or(async { down.await.map(|s| s.unwrap_or_else(Status::ok)) }, async {
                match up.await {
                    Ok(()) => std::future::pending().await,
                    Err(s) => Err(s),
                }
            })
            .await
        }
    }
}
