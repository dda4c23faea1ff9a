//! Runtime: thread-per-core glommio shards, listeners, cross-shard channels,
//! shutdown and timers.
//!
//! Invariants: one pinned `LocalExecutor` per shard; shards share nothing
//! mutable, and all cross-thread traffic goes through
//! [`mailbox`] or [`pipe`].
//!
//! Locked memory: glommio registers each executor's `io_memory` slab
//! ([`IO_MEMORY`]) with its three rings, against `RLIMIT_MEMLOCK`. When
//! that fails it warns "registering buffers … Skipping" and uses the slab
//! unregistered; as read in glommio's code, only fixed-buffer file I/O
//! needs the registration, so our sockets lose nothing. Seen as a non-root
//! user under an 8 MiB limit (a 2-shard proxy warned once); root never
//! warns. The service units set `LimitMEMLOCK=infinity`.

pub mod admin_http;
pub mod backoff;
pub mod budget;
pub mod listeners;
pub mod mailbox;
pub mod pipe;
pub mod signal;
pub mod stats;
pub mod throttle;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};
use std::time::Duration;

use glommio::{LocalExecutorBuilder, Placement};

/// Locked memory per executor for io_uring buffers.
pub const IO_MEMORY: usize = 512 << 10;

/// A deadline passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("timed out")]
pub struct Elapsed;

/// Runs `f` with a deadline (glommio timer).
pub async fn timeout<F: Future>(d: Duration, f: F) -> Result<F::Output, Elapsed> {
    futures_lite::future::or(async { Ok(f.await) }, async {
        glommio::timer::sleep(d).await;
        Err(Elapsed)
    })
    .await
}

/// Raises `RLIMIT_MEMLOCK` as far as allowed (io_uring registered buffers).
pub fn raise_memlock() {
    let want = 256u64 << 20;
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain libc calls on a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) == 0 && lim.rlim_cur < want {
            let new = libc::rlimit { rlim_cur: want, rlim_max: want.max(lim.rlim_max) };
            if libc::setrlimit(libc::RLIMIT_MEMLOCK, &new) != 0 {
                let capped = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
                libc::setrlimit(libc::RLIMIT_MEMLOCK, &capped);
            }
        }
    }
}

/// This build's version: the package version, plus `+<tag>` when built
/// with `RINGPEER_BUILD_TAG` set (how two builds of one version are told
/// apart in an upgrade).
pub fn build_version() -> &'static str {
    static V: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    V.get_or_init(|| match option_env!("RINGPEER_BUILD_TAG") {
        Some(t) if !t.is_empty() => format!("{}+{t}", env!("CARGO_PKG_VERSION")),
        _ => env!("CARGO_PKG_VERSION").to_string(),
    })
}

/// Starts an executor thread named `name`, pinned to `cpu` when given.
pub fn spawn_executor<G, F, T>(name: &str, cpu: Option<usize>, f: G) -> std::io::Result<glommio::ExecutorJoinHandle<T>>
where
    G: FnOnce() -> F + Send + 'static,
    F: Future<Output = T> + 'static,
    T: Send + 'static,
{
    let placement = match cpu {
        Some(c) => Placement::Fixed(c),
        None => Placement::Unbound,
    };
    LocalExecutorBuilder::new(placement)
        .name(name)
        .io_memory(IO_MEMORY)
        .ring_depth(256)
        .preempt_timer(Duration::from_millis(10))
        .spawn(f)
        .map_err(|e| std::io::Error::other(format!("cannot start executor {name}: {e}")))
}

/// Runs one future on a fresh single executor and returns its output
/// (for CLI commands: dial, forward, bench).
pub fn block_on<F, T>(name: &str, f: impl FnOnce() -> F + Send + 'static) -> std::io::Result<T>
where
    F: Future<Output = T> + 'static,
    T: Send + 'static,
{
    spawn_executor(name, None, f)?.join().map_err(|e| std::io::Error::other(format!("executor {name} failed: {e}")))
}

#[derive(Default)]
struct ShutdownInner {
    fired: AtomicBool,
    waiters: Mutex<Vec<Option<Waker>>>,
    /// For threads that block instead of polling (the control thread, main).
    cv: std::sync::Condvar,
}

/// The process-wide shutdown signal.
///
/// Each shard waits on it once and then fires its own
/// [`signal::Signal`], so connections never touch this mutex. Waiting costs
/// one atomic load per poll; a waiter takes the mutex only to register and
/// to leave. Each waiter holds one waker clone at most (glommio counts waker
/// references in an `i16`).
#[derive(Clone, Default)]
pub struct Shutdown(Arc<ShutdownInner>);

/// The future returned by [`Shutdown::wait`].
pub struct Wait<'a> {
    sd: &'a Shutdown,
    slot: Option<usize>,
    waker: Option<Waker>,
}

impl Shutdown {
    /// A fresh, untriggered signal.
    pub fn new() -> Shutdown {
        Shutdown::default()
    }

    fn waiters(&self) -> std::sync::MutexGuard<'_, Vec<Option<Waker>>> {
        self.0.waiters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fires the signal and wakes every waiter.
    pub fn trigger(&self) {
        let wakers: Vec<Waker> = {
            let mut ws = self.waiters();
            self.0.fired.store(true, Ordering::Release);
            self.0.cv.notify_all();
            ws.iter_mut().filter_map(Option::take).collect()
        };
        for w in wakers {
            w.wake();
        }
    }

    /// Whether it fired.
    pub fn is_triggered(&self) -> bool {
        self.0.fired.load(Ordering::Acquire)
    }

    /// Resolves once the signal fires.
    pub fn wait(&self) -> Wait<'_> {
        Wait { sd: self, slot: None, waker: None }
    }
}

impl Future for Wait<'_> {
    type Output = ();

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<()> {
        if self.sd.is_triggered() {
            return Poll::Ready(());
        }
        if self.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            return Poll::Pending;
        }
        let w = cx.waker().clone();
        {
            let mut ws = self.sd.waiters();
            match self.slot {
                Some(i) => ws[i] = Some(w.clone()),
                None => {
                    let i = ws.iter().position(Option::is_none).unwrap_or_else(|| {
                        ws.push(None);
                        ws.len() - 1
                    });
                    ws[i] = Some(w.clone());
                    self.slot = Some(i);
                }
            }
        }
        self.waker = Some(w);
        if self.sd.is_triggered() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

impl Drop for Wait<'_> {
    fn drop(&mut self) {
        if let Some(i) = self.slot {
            if let Some(s) = self.sd.waiters().get_mut(i) {
                *s = None;
            }
        }
    }
}

impl Shutdown {
    /// Blocks the calling (non-executor) thread until the signal fires.
    pub fn wait_blocking(&self) {
        let mut ws = self.waiters();
        while !self.is_triggered() {
            ws = self.0.cv.wait(ws).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Blocks up to `d` for the signal; whether it fired.
    pub fn wait_blocking_for(&self, d: Duration) -> bool {
        let end = std::time::Instant::now() + d;
        let mut ws = self.waiters();
        while !self.is_triggered() {
            let left = end.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            ws = self.0.cv.wait_timeout(ws, left).unwrap_or_else(|p| p.into_inner()).0;
        }
        true
    }
}
