//! Control thread: a plain thread, off the shards, that publishes this
//! proxy's state to the route backend, follows everyone else's, and hands
//! immutable route snapshots to every shard.
//!
//! Invariants:
//! - Shards report tunnel changes as events and never wait for this thread.
//! - Local routes in every snapshot are exact, whatever the backend's state.
//! - The backend is touched through two connections: a writer here and a
//!   blocking event reader on its own thread ([`reader`]), so a slow XREAD
//!   never delays publishing a local tunnel.
//! - Backend outages are logged once per state change; reconnects back off
//!   (capped, jittered); after a reconnect the whole local state is
//!   republished, so the backend converges.

pub mod commands;
pub mod grants;
pub mod health;
pub mod reader;
pub mod view;
mod writer;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam::channel::{Receiver, Sender};

use crate::route::feed::{Publish, TunnelEvent};
use crate::route::model::{ProxyInfo, Strategy};
use crate::route::store::{RouteStore, StoreFactory};
use crate::route::{LocalRoute, RouteTable};
use crate::runtime::backoff::Backoff;
pub use commands::{Command, Commands};
use health::BadDataLog;
pub use health::{Health, HealthCell, BAD_DATA_LOG_EVERY};
use reader::FromReader;
use view::{Affected, ClusterView, LocalTunnels};

/// Control-plane settings.
#[derive(Clone, Debug)]
pub struct ControlOpts {
    /// This proxy's record.
    pub me: ProxyInfo,
    /// Validity of the proxy record; heartbeats every third of it.
    pub ttl: Duration,
    /// Full resync period.
    pub resync: Duration,
    /// Strategy to seed the backend with when it has none.
    pub strategy: Strategy,
}

/// Tunnel events queued from the shards before they keep further ones in
/// their own backlog (see `proxy::shard`): shards never wait on this thread.
pub const EVENTS: usize = 1024;

/// Messages (full loads, event batches of up to 10,000 events) queued from
/// the backend reader before it waits for the control thread.
pub const READER_MSGS: usize = 16;

/// The latest snapshot, readable off the hot path (admin endpoint, tests).
pub type SnapshotCell = Arc<Mutex<Arc<RouteTable>>>;

/// The control thread's handle.
pub struct Control {
    /// Where shards send events.
    pub events: Sender<TunnelEvent>,
    /// The latest published snapshot.
    pub snapshot: SnapshotCell,
    /// The latest health verdict.
    pub health: HealthCell,
    /// Drain-protocol commands.
    pub commands: Commands,
    stop: Arc<AtomicBool>,
    join: Option<JoinHandle<()>>,
    reader: Option<JoinHandle<()>>,
}

impl Control {
    /// Starts the control thread (and its backend reader); `publish` hands
    /// each new route snapshot to the shards.
    pub fn spawn(
        opts: ControlOpts,
        store: Arc<dyn StoreFactory>,
        publish: Publish,
        snapshot: SnapshotCell,
    ) -> anyhow::Result<Control> {
        // Bounded both ways. Shards never block on `tx` (they keep a
        // backlog, see `proxy::shard`); the reader thread may block on `rtx`
        // (it then reads the backend later, which only delays events).
        let (tx, rx) = crossbeam::channel::bounded(EVENTS);
        let (rtx, rrx) = crossbeam::channel::bounded(READER_MSGS);
        let (ctx, crx) = crossbeam::channel::bounded(16);
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let (store, stop, resync) = (store.clone(), stop.clone(), opts.resync);
            std::thread::Builder::new()
                .name(format!("{}-routes", opts.me.id))
                .spawn(move || reader::run(store, rtx, resync, stop))?
        };
        let name = format!("{}-control", opts.me.id);
        let cell = snapshot.clone();
        let health = HealthCell::default();
        let h = health.clone();
        let join = std::thread::Builder::new().name(name).spawn(move || {
            let mut c = ControlLoop::new(opts, store, publish, cell, h);
            c.run(rx, rrx, crx);
        })?;
        let commands = Commands(ctx);
        Ok(Control { events: tx, snapshot, health, commands, stop, join: Some(join), reader: Some(reader) })
    }

    /// Stops both threads and waits for them.
    pub fn stop(mut self) {
        let _ = self.events.send(TunnelEvent::Stop);
        self.stop.store(true, Ordering::Release);
        for j in [self.join.take(), self.reader.take()].into_iter().flatten() {
            let _ = j.join();
        }
    }
}

struct ControlLoop {
    opts: ControlOpts,
    store: Arc<dyn StoreFactory>,
    publish: Publish,
    cell: SnapshotCell,
    health: HealthCell,
    /// Why the reader is down (None while it follows the backend).
    reader_error: Option<String>,
    ever_synced: bool,
    skipped: usize,
    writer: Option<Box<dyn RouteStore>>,
    /// Agents whose last tunnel here closed, and when: their removal is
    /// written again on every writer (re)connect, since it may have failed
    /// while the backend was down or been lost in a failover (the new
    /// master holds the replica's older copy). Kept for the route expiry
    /// (3 x resync), after which a stale route expires anyway.
    gone: HashMap<String, Instant>,
    /// The backend generation the writer connected under.
    writer_generation: u64,
    writer_backoff: Backoff,
    next_connect: Instant,
    writer_error: Option<String>,
    next_heartbeat: Instant,
    next_refresh: Instant,
    local: LocalTunnels,
    view: ClusterView,
    reader_up: bool,
    version: u64,
    /// When the reader last delivered a load or events.
    last_sync: Option<Instant>,
    /// What changed since the last published snapshot.
    pending: Affected,
    /// The last published snapshot.
    table: Arc<RouteTable>,
    /// Bad backend data: reported in one line, again only when the set of
    /// bad keys changes or after [`BAD_DATA_LOG_EVERY`].
    bad_data: BadDataLog,
    /// A successor owns this proxy's id: nothing more is written.
    retired: bool,
    /// Stale routes under this id were cleaned after the arrival window.
    cleaned: bool,
}

impl ControlLoop {
    fn new(
        opts: ControlOpts,
        store: Arc<dyn StoreFactory>,
        publish: Publish,
        cell: SnapshotCell,
        health: HealthCell,
    ) -> Self {
        let now = Instant::now();
        ControlLoop {
            opts,
            store,
            publish,
            cell,
            health,
            reader_error: None,
            ever_synced: false,
            skipped: 0,
            writer: None,
            gone: HashMap::new(),
            writer_generation: 0,
            writer_backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(5)),
            next_connect: now,
            writer_error: None,
            next_heartbeat: now,
            next_refresh: now,
            local: HashMap::new(),
            view: ClusterView::default(),
            reader_up: false,
            version: 0,
            last_sync: None,
            pending: Affected { all: true, ..Default::default() },
            table: Arc::default(),
            bad_data: BadDataLog::default(),
            retired: false,
            cleaned: false,
        }
        .arriving(now)
    }

    fn arriving(mut self, now: Instant) -> Self {
        self.view.arrivals_until = Some(now + view::ARRIVAL_WINDOW);
        self
    }

    fn on_local(&mut self, ev: TunnelEvent) {
        match &ev {
            TunnelEvent::TunnelUp { agent, .. } | TunnelEvent::TunnelDown { agent, .. } => {
                self.pending.merge(Affected::agent(agent))
            }
            TunnelEvent::Stop => {}
        }
        match ev {
            TunnelEvent::TunnelUp { agent, shard, conn, services } => {
                self.gone.remove(&agent);
                // A tunnel already known here announced again (the agent
                // reloaded its services): its entry is replaced, in place.
                let v = self.local.entry(agent.clone()).or_default();
                match v.iter_mut().find(|(c, _)| *c == conn) {
                    Some((_, r)) => r.services = services,
                    None => v.insert(0, (conn, LocalRoute { shard, services })),
                }
                self.publish_agent(&agent);
            }
            TunnelEvent::TunnelDown { agent, conn } => {
                if let Some(v) = self.local.get_mut(&agent) {
                    v.retain(|(c, _)| *c != conn);
                    if v.is_empty() {
                        self.local.remove(&agent);
                        self.gone.insert(agent.clone(), Instant::now());
                        // It may be reconnecting (here or elsewhere).
                        self.view.lost(&agent, Instant::now());
                    }
                }
                self.publish_agent(&agent);
            }
            TunnelEvent::Stop => {}
        }
    }

    fn on_reader(&mut self, msg: FromReader) {
        let now = Instant::now();
        match msg {
            FromReader::Loaded(l) => {
                let after_outage = self.ever_synced && !self.reader_up;
                self.last_sync = Some(now);
                self.bad_data.loaded(&l.skipped, now);
                self.skipped = l.skipped.len();
                self.reader_error = None;
                self.ever_synced = true;
                if !self.reader_up {
                    tracing::info!(
                        proxy = self.opts.me.id,
                        proxies = l.proxies.len(),
                        agents = l.agents.len(),
                        "route backend synced"
                    );
                }
                let mut fresh = ClusterView::from_loaded(&l, now);
                let extend_to = after_outage.then(|| now + self.opts.ttl);
                let kept = fresh.carry_over(&self.view, now, extend_to);
                if kept > 0 && after_outage {
                    tracing::info!(
                        proxy = self.opts.me.id,
                        kept,
                        "proxies whose records lapsed during the backend outage are kept one more TTL"
                    );
                } else if kept > 0 {
                    tracing::debug!(
                        proxy = self.opts.me.id,
                        kept,
                        "proxies the load lacks are kept until their deadline"
                    );
                }
                fresh.moving = std::mem::take(&mut self.view.moving);
                fresh.arrivals_until = self.view.arrivals_until;
                fresh.grants = grants::GrantView::from_loaded(&l.grants, &self.view.grants);
                if self.reader_up {
                    // Periodic resync: only what differs.
                    let d = self.view.diff(&fresh);
                    self.pending.merge(d);
                } else {
                    self.pending.all = true;
                }
                self.view = fresh;
                self.reader_up = true;
            }
            FromReader::Events(evs) => {
                self.last_sync = Some(now);
                for (id, e) in evs {
                    match e {
                        Ok(e) => {
                            let a = self.view.apply(e, now);
                            self.pending.merge(a);
                        }
                        Err(e) => self.bad_data.event(&id, &e, now),
                    }
                }
            }
            FromReader::Down(why) => {
                if self.reader_up {
                    tracing::warn!(
                        proxy = self.opts.me.id,
                        error = why,
                        "route backend unreachable; keeping every known route"
                    );
                } else if self.reader_error.is_none() {
                    // Never synced (or not since the last outage): say so
                    // once, or the proxy would answer NOT_FOUND in silence.
                    tracing::error!(
                        proxy = self.opts.me.id,
                        backend = self.store.describe(),
                        error = why,
                        synced_before = self.ever_synced,
                        "cannot load routes from the route backend; retrying with backoff"
                    );
                }
                self.reader_error = Some(why);
                self.reader_up = false;
                self.pending.cluster = true;
            }
        }
    }

    /// Connects the writer and republishes the whole local state.
    fn publish(&mut self) {
        self.version += 1;
        let changed = std::mem::take(&mut self.pending);
        let table = Arc::new(self.view.update(
            &self.table,
            &changed,
            &self.opts.me.id,
            &self.local,
            self.version,
            self.reader_up,
        ));
        self.table = table.clone();
        (self.publish)(table.clone());
        *self.cell.lock().unwrap_or_else(|p| p.into_inner()) = table;
    }

    /// Publishes the health verdict when it changed.
    fn report_health(&self) {
        let h = Health {
            backend: self.store.describe(),
            synced: self.reader_up,
            ever_synced: self.ever_synced,
            reader_error: self.reader_error.clone(),
            writer_error: self.writer_error.clone(),
            skipped: self.skipped,
            version: self.version,
            last_sync: self.last_sync,
        };
        let mut cur = self.health.lock().unwrap_or_else(|p| p.into_inner());
        if *cur != h {
            *cur = h;
        }
    }

    fn run(&mut self, events: Receiver<TunnelEvent>, reader: Receiver<FromReader>, commands: Receiver<Command>) {
        self.maybe_connect();
        self.publish();
        let tick = crossbeam::channel::tick(Duration::from_millis(100));
        loop {
            crossbeam::select! {
                recv(events) -> ev => match ev {
                    Ok(TunnelEvent::Stop) | Err(_) => break,
                    Ok(ev) => self.on_local(ev),
                },
                recv(reader) -> msg => if let Ok(m) = msg {
                    self.on_reader(m);
                },
                recv(commands) -> c => if let Ok(c) = c {
                    self.on_command(c);
                },
                recv(tick) -> _ => {
                    self.tick();
                    if self.reader_up {
                        let gone = self.view.expire(Instant::now());
                        self.pending.merge(gone);
                    }
                },
            }
            // Fold whatever else is queued into the same snapshot.
            while let Ok(ev) = events.try_recv() {
                if matches!(ev, TunnelEvent::Stop) {
                    self.leave();
                    return;
                }
                self.on_local(ev);
            }
            while let Ok(m) = reader.try_recv() {
                self.on_reader(m);
            }
            // Every visible change is recorded in `pending` (heartbeats of
            // known proxies are not), so unchanged snapshots are not re-sent.
            if !self.pending.is_empty() {
                self.publish();
            }
            self.report_health();
        }
        self.leave();
    }
}
