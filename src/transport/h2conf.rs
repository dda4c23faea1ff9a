//! HTTP/2 connection drivers (the `[h2]` settings are in [`super::tuning`]).
//!
//! Invariants: every endpoint sets every h2 limit explicitly (the builders
//! are in [`super::h2limits`]); every connection runs ping keepalive and
//! publishes its verdict ([`super::keepalive`]); servers drain with GOAWAY
//! on shutdown, close connections idle (no stream open, opened or closed)
//! for `idle_timeout_ms`, and end abusive ones with GOAWAY
//! ENHANCE_YOUR_CALM (premature resets here, PING and SETTINGS floods in
//! [`super::flood`]).

use std::cell::Cell;
use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::rc::Rc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_lite::FutureExt;
use tokio::io::{AsyncRead, AsyncWrite};

use super::keepalive::{keepalive, LinkHealth};
use super::window::{apply, ConnWindow, TICK};
use crate::runtime::budget::BufMeter;
use crate::runtime::signal::Signal;

pub use super::tuning::H2Tuning;

/// Longest a connection told to calm down may take to read its GOAWAY
/// (queued behind the answers it has not read yet) before the socket is
/// closed. The task only waits on a socket meanwhile; h2 reads nothing.
/// Rejected: 100 ms, after which a flooding client that reads slowly got a
/// reset instead of the GOAWAY that names its offence.
pub const CALM_FLUSH_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a process stopping without the drain protocol (tests, the
/// demo, an agent) lets open streams finish. A proxy's drain uses its
/// `drain_timeout_ms` instead ([`H2Tuning::drain_timeout_ms`]).
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Streams the peer may reset per second on one connection, before they
/// were established, until it is told to calm down (GOAWAY
/// ENHANCE_YOUR_CALM). The HTTP/2 rapid-reset attack opens and resets
/// streams as fast as it can, each costing us a dial's set-up and, without
/// this bound, a shard busy forever. Only premature resets count (as in
/// Envoy's premature-reset check): a client that drops established streams
/// early, which multiplexing clients do all the time, never trips it.
pub const MAX_RESETS_PER_SEC: u32 = 200;

/// Dials a peer may have in set-up at once on one connection (read the
/// `DialRequest`, resolve, open the upstream), by default (`[limits]
/// setup_per_conn`). Each holds a task and, upstream, a stream; a stream
/// over the budget is answered at once with RESOURCE_EXHAUSTED naming it.
pub const MAX_SETUP_PER_CONN: usize = crate::runtime::budget::DEFAULT_SETUP_PER_CONN;

struct ActiveInner {
    open: Cell<usize>,
    setup: Cell<usize>,
    max_open: usize,
    max_setup: usize,
    resets: Cell<u32>,
    window: Cell<Option<Instant>>,
    calm: Signal,
    /// Why `calm` fired (a static reason: `reset_flood`, `ping_flood`, ...).
    calm_why: Cell<&'static str>,
    /// When a stream last opened or closed (for the idle timeout).
    touched: Cell<Option<Instant>>,
    /// The connection's keepalive verdict.
    health: LinkHealth,
    /// The shard's buffer meter, whose pool the connection window grows
    /// from ([`super::window`]); `None`: a fixed window.
    pool: Option<BufMeter>,
}

impl Default for ActiveInner {
    fn default() -> Self {
        ActiveInner {
            open: Cell::default(),
            setup: Cell::default(),
            max_open: usize::MAX,
            max_setup: MAX_SETUP_PER_CONN,
            resets: Cell::default(),
            window: Cell::default(),
            calm: Signal::default(),
            calm_why: Cell::new(""),
            touched: Cell::default(),
            health: LinkHealth::default(),
            pool: None,
        }
    }
}

/// A server connection's open streams (for the idle timeout and the
/// per-connection stream budget), its dials in set-up (their budget) and
/// the streams its peer reset (for the rapid-reset bound).
#[derive(Clone, Default)]
pub struct ActiveStreams(Rc<ActiveInner>);

/// Held while a stream is open.
pub struct StreamGuard(Rc<ActiveInner>);

/// Held while a dial is in set-up.
pub struct SetupGuard(Rc<ActiveInner>);

impl Drop for SetupGuard {
    fn drop(&mut self) {
        self.0.setup.set(self.0.setup.get() - 1);
    }
}

impl ActiveStreams {
    /// Marks a stream open until the guard drops.
    pub fn enter(&self) -> StreamGuard {
        self.0.open.set(self.0.open.get() + 1);
        self.0.touched.set(Some(Instant::now()));
        StreamGuard(self.0.clone())
    }

    /// A connection whose peer may have at most `streams` streams open and
    /// `setup` dials in set-up (`[limits]`).
    pub fn with_limits(streams: usize, setup: usize) -> ActiveStreams {
        ActiveStreams(Rc::new(ActiveInner { max_open: streams, max_setup: setup, ..ActiveInner::default() }))
    }

    /// [`ActiveStreams::with_limits`], with a connection window that grows
    /// with the open streams from `pool`'s share of the buffer budget.
    pub fn with_pool(streams: usize, setup: usize, pool: &BufMeter) -> ActiveStreams {
        let inner =
            ActiveInner { max_open: streams, max_setup: setup, pool: Some(pool.clone()), ..ActiveInner::default() };
        ActiveStreams(Rc::new(inner))
    }

    /// Marks a stream open until the guard drops, or `None` when the
    /// connection already has its budget of open streams.
    pub fn try_enter(&self) -> Option<StreamGuard> {
        (self.0.open.get() < self.0.max_open).then(|| self.enter())
    }

    /// Streams open now.
    pub fn open(&self) -> usize {
        self.0.open.get()
    }

    /// The budgets: (open streams, dials in set-up).
    pub fn limits(&self) -> (usize, usize) {
        (self.0.max_open, self.0.max_setup)
    }

    /// A set-up slot, or `None` when the set-up budget is taken.
    pub fn enter_setup(&self) -> Option<SetupGuard> {
        if self.0.setup.get() >= self.0.max_setup {
            return None;
        }
        self.0.setup.set(self.0.setup.get() + 1);
        Some(SetupGuard(self.0.clone()))
    }

    /// Counts a stream the peer reset (or cancelled) before it was
    /// established.
    /// Over [`MAX_RESETS_PER_SEC`] in one second, the connection is ended
    /// with GOAWAY ENHANCE_YOUR_CALM.
    pub fn reset_by_peer(&self) {
        let now = Instant::now();
        let fresh = self.0.window.get().is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1));
        if fresh {
            self.0.window.set(Some(now));
            self.0.resets.set(0);
        }
        self.0.resets.set(self.0.resets.get() + 1);
        if self.0.resets.get() > MAX_RESETS_PER_SEC {
            self.calm("reset_flood");
        }
    }

    /// Ends the connection with GOAWAY ENHANCE_YOUR_CALM; `why` is what
    /// [`serve`] returns (the first reason wins).
    pub fn calm(&self, why: &'static str) {
        if !self.0.calm.is_triggered() {
            self.0.calm_why.set(why);
            self.0.calm.trigger();
        }
    }

    /// The connection's keepalive verdict (suspect after a missed ping).
    pub fn health(&self) -> &LinkHealth {
        &self.0.health
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.open.set(self.0.open.get() - 1);
        self.0.touched.set(Some(Instant::now()));
    }
}

/// Drives a server connection: hands each request to `on_request`, answers
/// keepalive (its verdict in `active.health()`), drains with GOAWAY when
/// `stop` fires, ends it with GOAWAY ENHANCE_YOUR_CALM when `active` is
/// told to calm down, and closes it once no stream was open and none opened
/// or closed for `idle_timeout_ms` (unless `persistent`; checked every
/// quarter of it, so a connection goes within 1.25 × the timeout).
/// Returns why the connection ended.
pub async fn serve<T, H>(
    mut conn: h2::server::Connection<T, Bytes>,
    t: &H2Tuning,
    stop: &Signal,
    active: &ActiveStreams,
    persistent: bool,
    mut on_request: H,
) -> &'static str
where
    T: AsyncRead + AsyncWrite + Unpin,
    H: FnMut(http::Request<h2::RecvStream>, h2::server::SendResponse<Bytes>),
{
    let mut ka = pin!(keepalive(conn.ping_pong(), t, &active.0.health));
    let mut stop = pin!(stop.wait());
    let mut calm = pin!(active.0.calm.wait());
    let mut draining = false;
    let idle = Duration::from_millis(t.idle_timeout_ms);
    let mut idle_since = Instant::now();
    let mut idle_tick = pin!(glommio::timer::sleep(idle.max(Duration::from_millis(100))));
    let mut drain_deadline = pin!(futures_lite::future::pending::<()>().boxed_local());
    let mut win = active.0.pool.as_ref().map(|m| ConnWindow::new(m, t.connection_window, t.stream_window));
    let mut win_tick = pin!(glommio::timer::sleep(TICK));
    loop {
        enum Ev<R> {
            Req(R),
            Dead(&'static str),
            Stop,
            Calm,
            Tick,
            Window,
        }
        let ev = poll_fn(|cx| {
            if let Poll::Ready(r) = conn.poll_accept(cx) {
                return Poll::Ready(Ev::Req(r));
            }
            if let Poll::Ready(why) = ka.as_mut().poll(cx) {
                return Poll::Ready(Ev::Dead(why));
            }
            if !draining && stop.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ev::Stop);
            }
            if calm.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ev::Calm);
            }
            if draining && drain_deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ev::Dead("drain_timeout"));
            }
            if !persistent && t.idle_timeout_ms > 0 && idle_tick.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ev::Tick);
            }
            if win.is_some() && win_tick.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ev::Window);
            }
            Poll::Pending
        })
        .await;
        match ev {
            Ev::Req(Some(Ok((req, respond)))) => on_request(req, respond),
            Ev::Req(Some(Err(e))) => {
                tracing::debug!(error = %e, "h2 server connection error");
                // h2's own bound on streams reset before we accepted them.
                if e.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM) && !e.is_remote() {
                    return "reset_flood";
                }
                return "h2_error";
            }
            Ev::Req(None) => return if draining { "drained" } else { "closed" },
            Ev::Dead(why) => {
                conn.abrupt_shutdown(h2::Reason::NO_ERROR);
                return why;
            }
            Ev::Calm => {
                let why = active.0.calm_why.get();
                crate::warn_throttled!(
                    "peer over an abuse threshold",
                    why,
                    "peer over an abuse threshold; GOAWAY ENHANCE_YOUR_CALM"
                );
                conn.abrupt_shutdown(h2::Reason::ENHANCE_YOUR_CALM);
                // Flush the GOAWAY (h2 reads nothing more meanwhile), then
                // end the connection.
                let _ = crate::runtime::timeout(CALM_FLUSH_TIMEOUT, poll_fn(|cx| conn.poll_closed(cx))).await;
                return why;
            }
            Ev::Stop => {
                conn.graceful_shutdown();
                draining = true;
                drain_deadline.set(glommio::timer::sleep(Duration::from_millis(t.drain_timeout_ms)).boxed_local());
            }
            Ev::Window => {
                if let Some(w) = &mut win {
                    apply(w, active.0.open.get(), &mut conn);
                }
                win_tick.set(glommio::timer::sleep(TICK));
            }
            Ev::Tick => {
                // Idle means no stream open and none opened or closed since:
                // a connection busy with short streams is never idle.
                // (Rejected: sampling `open` at ticks alone, which missed
                // every stream that lived between two ticks.)
                if let Some(t) = active.0.touched.get() {
                    idle_since = idle_since.max(t);
                }
                if active.0.open.get() > 0 {
                    idle_since = Instant::now();
                } else if idle_since.elapsed() >= idle && !draining {
                    conn.graceful_shutdown();
                    draining = true;
                }
                idle_tick.set(glommio::timer::sleep((idle / 4).max(Duration::from_millis(100))));
            }
        }
    }
}

/// Drives a client connection with keepalive until it ends; returns why.
pub async fn drive_client<T>(conn: h2::client::Connection<T, Bytes>, t: &H2Tuning) -> &'static str
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    drive_client_watched(conn, t, &LinkHealth::new()).await
}

/// [`drive_client`], publishing the keepalive verdict in `health`.
pub async fn drive_client_watched<T>(
    conn: h2::client::Connection<T, Bytes>,
    t: &H2Tuning,
    health: &LinkHealth,
) -> &'static str
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    drive_client_pooled(conn, t, health, None, || None).await
}

/// [`drive_client_watched`], with a connection window that grows from
/// `pool`'s share of the buffer budget as streams open ([`super::window`]);
/// `open` counts the connection's open streams (`None`: unknown now, keep
/// the windows as they are).
pub async fn drive_client_pooled<T>(
    mut conn: h2::client::Connection<T, Bytes>,
    t: &H2Tuning,
    health: &LinkHealth,
    pool: Option<&BufMeter>,
    open: impl Fn() -> Option<usize>,
) -> &'static str
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let mut ka = pin!(keepalive(conn.ping_pong(), t, health));
    let mut win = pool.map(|m| ConnWindow::new(m, t.connection_window, t.stream_window));
    let mut tick = pin!(glommio::timer::sleep(TICK));
    loop {
        enum Ev {
            Done(Result<(), h2::Error>),
            Dead(&'static str),
            Window,
        }
        let ev = poll_fn(|cx| {
            if let Poll::Ready(r) = Pin::new(&mut conn).poll(cx) {
                return Poll::Ready(Ev::Done(r));
            }
            if let Poll::Ready(why) = ka.as_mut().poll(cx) {
                return Poll::Ready(Ev::Dead(why));
            }
            if win.is_some() && tick.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ev::Window);
            }
            Poll::Pending
        })
        .await;
        match ev {
            Ev::Done(Ok(())) => return "closed",
            Ev::Done(Err(e)) => {
                tracing::debug!(error = %e, "h2 client connection error");
                return "h2_error";
            }
            Ev::Dead(why) => return why,
            Ev::Window => {
                if let (Some(w), Some(n)) = (&mut win, open()) {
                    apply(w, n, &mut conn);
                }
                tick.set(glommio::timer::sleep(TICK));
            }
        }
    }
}
