//! Peer links as session objects: one shard's HTTP/2 connections to other
//! proxies, each a small state machine, handing out stream slots.
//!
//! A link to a peer address goes Connecting → Ready → Draining → closed:
//! - **Connecting** is single-flight: at most one connect per address at a
//!   time, and every caller that needs the address waits on that one (a
//!   `Flight`). The connect runs in its own task, so a caller that gives up
//!   does not abort it for the others.
//! - **Ready** means TLS is up, the peer's identity checked, and the peer's
//!   first SETTINGS applied, so `current_max_send_streams()` is the peer's
//!   real limit before the first stream is admitted.
//! - **Draining**: the peer sent GOAWAY (or its proxy left the registry).
//!   No new stream is put on the link; streams already open finish. We drop
//!   our `SendRequest` handle, so the connection closes once the last
//!   [`PeerStream`] is gone. h2 has no GOAWAY callback: a received GOAWAY
//!   becomes the connection error that `SendRequest::poll_ready` and
//!   `send_request` return (`is_go_away()`), so every admission checks it
//!   (`Link::is_ready`) and [`PeerStream::send_request`] drains the link
//!   when a GOAWAY raced the admission (like pingora's `shutting_down`).
//! - **Closed**: the connection task ended; the link is removed.
//!
//! Invariants:
//! - A link admits a stream only while the slots it handed out are below
//!   the peer's SETTINGS_MAX_CONCURRENT_STREAMS; a full link gets a sibling,
//!   up to `max_links_per_peer` Ready links per proxy, after which callers
//!   get RESOURCE_EXHAUSTED at once (retry-safe, so failover tries another
//!   proxy instead of queueing behind this one).
//! - A connect attempt lasts at most `connect_timeout`; a caller waits at
//!   most until its own deadline, so one black-holed peer cannot eat the
//!   time failover needs. A failed attempt puts the address in a capped,
//!   jittered backoff during which callers fail at once (retry-safe).
//! - One rustls `ClientConfig` per expected peer name, kept until the TLS
//!   material is reloaded (then rebuilt from the new one, so new links
//!   present the new certificate and trust the new bundle; open links
//!   stay), so TLS sessions resume; tickets never cross identities
//!   because each config has its own session cache.
//! - Every failure is a [`crate::wire::error::Error`]; everything that fails
//!   before a request reaches the peer is `Retry::Safe`.
//! - Single-threaded (one per shard): state is `Cell`/`RefCell`, and no
//!   borrow is held across an await.
//!
//! Depends only on `transport`, `runtime` and `wire` (nothing of the proxy). Files: `link.rs`
//! (a link, its slots, the single flight, backoff), `connect.rs` (the
//! connect and the connection task), `tests.rs` (against an in-process peer).
//!
//! Links are keyed by the address the caller dials; whether that is one
//! address per remote proxy (the design's S_local × (P − 1) bound) or the
//! owning shard's is the caller's choice. Rejected: a connect future owned
//! by the first caller and shared with the others (a cancelled first dial
//! would abort everyone's connect).

mod connect;
mod link;
#[cfg(test)]
mod tests;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::ClientConfig;

use crate::runtime::backoff::Backoff;
use crate::runtime::budget::BufMeter;
use crate::runtime::signal::Signal;
use crate::runtime::timeout;
use crate::transport::h2conf::H2Tuning;
use crate::transport::identity::Role;
use crate::transport::reload::MaterialSource;
use crate::wire::error::{Error, Label, Retry, Side};
use crate::wire::status::Code;
pub use link::PeerStream;
use link::{Flight, Link};

/// Limits of a shard's peer links.
#[derive(Clone, Debug)]
pub struct PeerLinkConfig {
    /// Longest one connect attempt (TCP + TLS + HTTP/2 + first SETTINGS) may take.
    pub connect_timeout: Duration,
    /// First backoff delay after a failed connect.
    pub backoff_min: Duration,
    /// Longest backoff delay.
    pub backoff_max: Duration,
    /// Ready links per peer proxy (siblings are opened when a link is full).
    pub max_links_per_peer: usize,
}

impl Default for PeerLinkConfig {
    fn default() -> Self {
        PeerLinkConfig {
            connect_timeout: Duration::from_secs(1),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            max_links_per_peer: 8,
        }
    }
}

/// Everything known about one peer address.
struct Dest {
    /// Proxy last asked for at this address.
    proxy: Rc<str>,
    links: Vec<Rc<Link>>,
    connecting: Option<Rc<Flight>>,
    backoff: Backoff,
    /// While set and in the future, callers fail at once with `failure`.
    retry_at: Option<Instant>,
    failure: Option<Error>,
}

struct Inner {
    tls: Box<dyn MaterialSource>,
    h2: H2Tuning,
    cfg: PeerLinkConfig,
    closing: Signal,
    /// Client configs by expected peer name (kept: session resumption).
    configs: RefCell<HashMap<Rc<str>, Arc<ClientConfig>>>,
    /// The material generation `configs` were built from.
    configs_gen: Cell<u64>,
    dests: RefCell<HashMap<String, Dest>>,
    open: Cell<usize>,
    resumed: Cell<u64>,
    /// Told the open-link count whenever it changes (the shard's gauge).
    on_count: RefCell<Option<CountHook>>,
    /// The shard's buffer meter: links' connection windows grow from its
    /// pool (`transport::window`).
    pool: RefCell<Option<BufMeter>>,
}

/// What [`PeerLinks::on_count`] calls.
type CountHook = Box<dyn Fn(usize)>;

/// One shard's peer links, by peer address.
pub struct PeerLinks {
    inner: Rc<Inner>,
}

enum Step {
    Stream(PeerStream),
    Wait(Rc<Flight>),
}

impl PeerLinks {
    /// Links built from `tls` and `h2`; `closing` fires when the shard stops,
    /// which ends every connect and connection task.
    pub fn new(tls: impl MaterialSource + 'static, h2: H2Tuning, cfg: PeerLinkConfig, closing: Signal) -> Self {
        let inner = Inner {
            configs_gen: Cell::new(tls.generation()),
            tls: Box::new(tls),
            h2,
            cfg,
            closing,
            configs: RefCell::default(),
            dests: RefCell::default(),
            open: Cell::new(0),
            resumed: Cell::new(0),
            on_count: RefCell::default(),
            pool: RefCell::default(),
        };
        PeerLinks { inner: Rc::new(inner) }
    }

    /// A stream slot on a Ready link to `proxy` at `addr`, connecting
    /// (single-flight) if no link has room. Fails at once while the address
    /// backs off, when `max_links_per_peer` links are all full, or when a
    /// link to it is suspect (its keepalive ping is overdue: the peer may be
    /// frozen, and connecting another link would wait on it too).
    pub async fn stream(&self, proxy: &str, addr: &str, deadline: Instant) -> Result<PeerStream, Error> {
        self.stream_with(proxy, addr, deadline, false).await
    }

    /// [`stream`](Self::stream) for a caller with no other upstream left:
    /// a suspect link is used rather than failing at once.
    pub async fn stream_last_resort(&self, proxy: &str, addr: &str, deadline: Instant) -> Result<PeerStream, Error> {
        self.stream_with(proxy, addr, deadline, true).await
    }

    async fn stream_with(
        &self,
        proxy: &str,
        addr: &str,
        deadline: Instant,
        suspect_ok: bool,
    ) -> Result<PeerStream, Error> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let flight = match self.step(proxy, addr, left, suspect_ok)? {
                Step::Stream(s) => return Ok(s),
                Step::Wait(f) => f,
            };
            match timeout(left, flight.wait()).await {
                Ok(Ok(())) => continue, // a link came up: take a slot, or connect a sibling
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(late(proxy, addr)),
            }
        }
    }

    /// Whether a Ready link to `addr` that answers its keepalive exists
    /// (live links are tried first).
    pub fn has_ready(&self, addr: &str) -> bool {
        self.inner
            .dests
            .borrow()
            .get(addr)
            .is_some_and(|d| d.links.iter().any(|l| l.is_ready() && !l.health.is_suspect()))
    }

    /// Streams this shard has open towards `addr`.
    pub fn load(&self, addr: &str) -> usize {
        self.inner.dests.borrow().get(addr).map_or(0, |d| d.links.iter().map(|l| l.active.get()).sum())
    }

    /// Open connections (Ready and Draining).
    pub fn link_count(&self) -> usize {
        self.inner.open.get()
    }

    /// Lets the links' connection windows grow from `meter`'s pool (the
    /// shard's buffer budget) while many streams are open on them.
    pub fn pool(&self, meter: &BufMeter) {
        *self.inner.pool.borrow_mut() = Some(meter.clone());
    }

    /// Calls `f` with the open-link count whenever it changes.
    pub fn on_count(&self, f: impl Fn(usize) + 'static) {
        *self.inner.on_count.borrow_mut() = Some(Box::new(f));
    }

    /// TLS handshakes that resumed a session (a metric).
    pub fn resumed(&self) -> u64 {
        self.inner.resumed.get()
    }

    /// Marks `addr` suspect after it failed to answer in time (a frozen or
    /// black-holed peer): its links drain (open streams may still finish),
    /// and dials skip the address at once for a backoff period instead of
    /// each waiting out the same bound.
    pub fn suspect(&self, addr: &str, why: &Error) {
        let mut dests = self.inner.dests.borrow_mut();
        let Some(d) = dests.get_mut(addr) else { return };
        for l in &d.links {
            l.drain("suspect");
        }
        d.retry_at = Some(Instant::now() + d.backoff.next_delay());
        d.failure = Some(why.clone());
        tracing::warn!(addr, peer = &*d.proxy, error = %why, "peer link suspect; skipping it for a while");
    }

    /// Drains the links of proxies that left the registry (their open
    /// streams finish) and forgets addresses nothing uses any more.
    pub fn retain_proxies(&self, live: impl Fn(&str) -> bool) {
        self.inner.dests.borrow_mut().retain(|_, d| {
            for l in d.links.iter().filter(|l| !live(&l.proxy)) {
                l.drain("proxy_left");
            }
            !d.links.is_empty() || d.connecting.is_some() || live(&d.proxy)
        });
    }

    /// Takes a slot, or says which connect to wait for (starting one if
    /// allowed). Synchronous: the borrows end before the caller awaits.
    fn step(&self, proxy: &str, addr: &str, left: Duration, suspect_ok: bool) -> Result<Step, Error> {
        let mut dests = self.inner.dests.borrow_mut();
        if !dests.contains_key(addr) {
            dests.insert(addr.to_string(), self.inner.dest(proxy));
        }
        let Some(d) = dests.get_mut(addr) else { return Err(Error::internal("peer address vanished")) };
        if let Some(s) = d.links.iter().find_map(|l| l.admit(proxy, suspect_ok)) {
            return Ok(Step::Stream(s));
        }
        let overdue = d.links.iter().filter(|l| l.is_ready()).find_map(|l| l.health.suspect_since());
        if let (Some(since), false) = (overdue, suspect_ok) {
            let msg = format!(
                "peer {proxy} at {addr} is suspect: its keepalive ping has been unanswered for {} ms",
                since.elapsed().as_millis() + self.inner.h2.keepalive_miss_ms as u128
            );
            return Err(Error::unavailable(Side::Peer, Retry::Safe, Label::LinkSuspect, msg));
        }
        if let Some(f) = &d.connecting {
            return Ok(Step::Wait(f.clone()));
        }
        if let (Some(at), Some(e)) = (d.retry_at, &d.failure) {
            if Instant::now() < at {
                let msg = format!("backing off after: {}", e.message);
                return Err(Error::unavailable(Side::Peer, Retry::Safe, Label::PeerBackoff, msg));
            }
        }
        if d.links.iter().filter(|l| &*l.proxy == proxy && l.is_ready()).count() >= self.inner.cfg.max_links_per_peer {
            // Rejected: waiting for a slot. h2 would queue the stream, but
            // behind streams that may live for hours; another proxy that
            // holds the agent is a better bet, and failover needs the time.
            let msg = format!("all {} links to peer {proxy} at {addr} are full", self.inner.cfg.max_links_per_peer);
            return Err(Error::new(Code::ResourceExhausted, Side::Proxy, Retry::Safe, Label::ResourceExhausted, msg));
        }
        if left.is_zero() {
            return Err(late(proxy, addr));
        }
        let tls = self.inner.client_config(proxy)?;
        let flight = Rc::new(Flight::default());
        d.proxy = Rc::from(proxy);
        d.connecting = Some(flight.clone());
        let task =
            connect::run_link(Rc::downgrade(&self.inner), addr.to_string(), d.proxy.clone(), tls, flight.clone());
        glommio::spawn_local(task).detach();
        Ok(Step::Wait(flight))
    }
}

impl Inner {
    fn dest(&self, proxy: &str) -> Dest {
        Dest {
            proxy: Rc::from(proxy),
            links: Vec::new(),
            connecting: None,
            backoff: Backoff::new(self.cfg.backoff_min, self.cfg.backoff_max),
            retry_at: None,
            failure: None,
        }
    }

    fn set_open(&self, n: usize) {
        self.open.set(n);
        if let Some(f) = &*self.on_count.borrow() {
            f(n);
        }
    }

    fn client_config(&self, proxy: &str) -> Result<Arc<ClientConfig>, Error> {
        let generation = self.tls.generation();
        if generation != self.configs_gen.replace(generation) {
            self.configs.borrow_mut().clear();
        }
        if let Some(c) = self.configs.borrow().get(proxy) {
            return Ok(c.clone());
        }
        let c = self
            .tls
            .material()
            .client_config(Role::Proxy, Some(proxy))
            .map_err(|e| Error::internal(format!("TLS client config for peer {proxy}: {e}")))?;
        self.configs.borrow_mut().insert(Rc::from(proxy), c.clone());
        Ok(c)
    }

    /// Records the end of a connect attempt. A new link counts as open
    /// until [`remove`](Self::remove), whether or not its address is still known.
    fn settle(&self, addr: &str, r: Result<Rc<Link>, &Error>) {
        if r.is_ok() {
            self.set_open(self.open.get() + 1);
        }
        let mut dests = self.dests.borrow_mut();
        let Some(d) = dests.get_mut(addr) else {
            // Forgotten meanwhile (retain_proxies keeps addresses that are
            // connecting, so this is defensive): nobody can pick the link.
            if let Ok(link) = r {
                link.drain("address_forgotten");
            }
            return;
        };
        d.connecting = None;
        match r {
            Ok(link) => {
                d.links.push(link);
                d.backoff.reset();
                d.retry_at = None;
                d.failure = None;
            }
            Err(e) => {
                d.retry_at = Some(Instant::now() + d.backoff.next_delay());
                d.failure = Some(e.clone());
            }
        }
    }

    fn remove(&self, addr: &str, link: &Rc<Link>) {
        self.set_open(self.open.get().saturating_sub(1));
        let mut dests = self.dests.borrow_mut();
        if let Some(d) = dests.get_mut(addr) {
            d.links.retain(|l| !Rc::ptr_eq(l, link));
        }
    }
}

/// The deadline of the caller passed while it waited for a connect.
fn late(proxy: &str, addr: &str) -> Error {
    let msg = format!("the dial deadline passed while connecting to peer {proxy} at {addr}");
    Error::new(Code::DeadlineExceeded, Side::Peer, Retry::Safe, Label::DialTimeout, msg)
}
