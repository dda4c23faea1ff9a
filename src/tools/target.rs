//! Test targets served by the demo, bench and tests: `echo` (writes back what
//! it reads, half-close aware), `sink` (reads to EOF, then answers the
//! byte count as a big-endian u64) and `flood` (writes forever, until the
//! peer closes: the service a slow reader attacks).
//!
//! Invariant: each target runs on its own glommio executor thread, so a
//! target never shares a core's run queue with the proxy under test more
//! than the OS scheduler decides.

use std::net::{Shutdown as NetShutdown, SocketAddr};
use std::os::fd::{FromRawFd, IntoRawFd};

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::runtime::listeners::bind_group;
use crate::runtime::{spawn_executor, Shutdown};

/// What a target does with a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Echo bytes back.
    Echo,
    /// Count bytes, answer the count at EOF.
    Sink,
    /// Write forever, never read.
    Flood,
}

/// A running target.
pub struct Target {
    /// Its address.
    pub addr: SocketAddr,
    open: Arc<AtomicUsize>,
    accepted: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
    shutdown: Shutdown,
    join: Option<glommio::ExecutorJoinHandle<()>>,
}

impl Target {
    /// Connections open at the target now.
    pub fn open_conns(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Connections accepted since the start.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }

    /// The most connections open at once since the start (or the last
    /// [`reset_peak`](Self::reset_peak)).
    pub fn peak_open(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }

    /// Restarts the peak from the connections open now.
    pub fn reset_peak(&self) {
        self.peak.store(self.open_conns(), Ordering::Relaxed);
    }

    /// A live view of [`open_conns`](Self::open_conns), for other threads.
    pub fn open_counter(&self) -> Arc<AtomicUsize> {
        self.open.clone()
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.shutdown.trigger();
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

async fn serve_conn(kind: Kind, mut s: TcpStream) {
    let _ = s.set_nodelay(true);
    if kind == Kind::Flood {
        let block = vec![0x5au8; 16 << 10];
        while s.write_all(&block).await.is_ok() {}
        return;
    }
    let mut buf = vec![0u8; 64 << 10];
    let mut total = 0u64;
    loop {
        let n = match s.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        total += n as u64;
        if kind == Kind::Echo && s.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
    if kind == Kind::Sink {
        let _ = s.write_all(&total.to_be_bytes()).await;
    }
    let _ = s.shutdown(NetShutdown::Write).await;
}

/// Starts a target on 127.0.0.1 (port 0).
pub fn spawn(kind: Kind) -> std::io::Result<Target> {
    spawn_at(kind, "127.0.0.1:0".parse().expect("addr"))
}

/// Starts a target listening on `addr`.
pub fn spawn_at(kind: Kind, addr: SocketAddr) -> std::io::Result<Target> {
    let l = bind_group(addr, 1, "target").map_err(|e| std::io::Error::other(e.to_string()))?.pop().expect("one");
    let addr = l.local_addr()?;
    let shutdown = Shutdown::new();
    let sd = shutdown.clone();
    let open = Arc::new(AtomicUsize::new(0));
    let accepted = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (count, total, most) = (open.clone(), accepted.clone(), peak.clone());
    let join = spawn_executor(&format!("target-{kind:?}"), None, move || async move {
        // SAFETY: a bound, listening socket we own.
        let l = unsafe { glommio::net::TcpListener::from_raw_fd(l.into_raw_fd()) };
        loop {
            let r = futures_lite::future::or(async { Some(l.accept().await) }, async {
                sd.wait().await;
                None
            })
            .await;
            match r {
                Some(Ok(s)) => {
                    let count = count.clone();
                    let now = count.fetch_add(1, Ordering::Relaxed) + 1;
                    most.fetch_max(now, Ordering::Relaxed);
                    total.fetch_add(1, Ordering::Relaxed);
                    glommio::spawn_local(async move {
                        serve_conn(kind, s).await;
                        count.fetch_sub(1, Ordering::Relaxed);
                    })
                    .detach();
                }
                Some(Err(_)) => continue,
                None => return,
            }
        }
    })?;
    Ok(Target { addr, open, accepted, peak, shutdown, join: Some(join) })
}

/// A plain blocking echo server (one thread per connection), the reference
/// for absolute latency figures: it measures the loopback, not our runtime.
/// Its threads live as long as the process.
pub fn spawn_blocking_echo() -> std::io::Result<SocketAddr> {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    std::thread::Builder::new().name("blocking-echo".into()).spawn(move || {
        for s in l.incoming().flatten() {
            let _ = std::thread::Builder::new().name("blocking-echo-conn".into()).spawn(move || {
                let mut s = s;
                let _ = s.set_nodelay(true);
                let mut buf = vec![0u8; 64 << 10];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    })?;
    Ok(addr)
}
