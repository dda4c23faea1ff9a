//! Adapter from glommio's io_uring sockets to tokio's I/O traits, which
//! tokio-rustls and h2 are written against.
//!
//! Invariants: never blocks the shard (every syscall is non-blocking and
//! falls back to glommio's readiness wait); a vectored write is one
//! `sendmsg`, so a TLS record batch or an h2 frame header plus its payload
//! costs one syscall, not one per buffer.

use std::io::{self, IoSlice};
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_io::{AsyncRead as FAsyncRead, AsyncWrite as FAsyncWrite};
use glommio::net::TcpStream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Most iovecs passed to one `sendmsg`.
const MAX_IOV: usize = 64;

/// A glommio TCP stream that implements tokio's `AsyncRead`/`AsyncWrite`.
pub struct GlommioIo {
    inner: TcpStream,
}

impl GlommioIo {
    /// Wraps a connected stream, with Nagle off (h2 and TLS coalesce already).
    pub fn new(inner: TcpStream) -> Self {
        let _ = inner.set_nodelay(true);
        GlommioIo { inner }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &TcpStream {
        &self.inner
    }
}

fn sendmsg_nonblocking(fd: i32, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
    let n = bufs.len().min(MAX_IOV);
    // SAFETY: IoSlice is ABI-compatible with iovec; the msghdr only borrows
    // `bufs` for the duration of the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = n as _;
    let r = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

impl AsyncRead for GlommioIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let dst = buf.initialize_unfilled();
        match Pin::new(&mut self.inner).poll_read(cx, dst) {
            Poll::Ready(Ok(n)) => {
                buf.advance(n);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncWrite for GlommioIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let Some(first) = bufs.iter().find(|b| !b.is_empty()) else {
            return Poll::Ready(Ok(0));
        };
        if bufs.len() == 1 {
            return Pin::new(&mut self.inner).poll_write(cx, first);
        }
        match sendmsg_nonblocking(self.inner.as_raw_fd(), bufs) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Let glommio register write interest (it retries the send
                // itself and may even succeed).
                let first: &[u8] = first;
                Pin::new(&mut self.inner).poll_write(cx, first)
            }
            r => Poll::Ready(r),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}
