//! The control thread's backend writes: this proxy's record (register,
//! heartbeat, draining mark, leave) and its agents' routes (publish,
//! refresh, stale-route cleanup), over one writer connection.
//!
//! Invariants: a failed write drops the connection and schedules a
//! reconnect with backoff, after which the whole local state is written
//! again; once retired (a successor owns the proxy id) nothing is written.
//! A master change (the backend's generation moved) drops the writer too:
//! writes the old master acknowledged may not have reached the new one, so
//! the whole local state is written again to the new master.

use std::time::Instant;

use super::{Command, ControlLoop};
use crate::route::model::{now_ms, AgentRoute};
use crate::route::store::RouteStore;

impl ControlLoop {
    pub(super) fn on_command(&mut self, c: Command) {
        match c {
            Command::Mark(d) => {
                self.opts.me.draining = d;
                tracing::info!(proxy = self.opts.me.id, draining = d, "draining mark");
                let (me, ttl) = (self.opts.me.clone(), self.opts.ttl);
                self.write("draining mark", |w| w.put_proxy(&me, ttl));
            }
            Command::Retire(ack) => {
                self.retired = true;
                self.writer = None;
                tracing::info!(proxy = self.opts.me.id, "a successor took over; no more backend writes");
                let _ = ack.send(());
            }
            Command::Resume => {
                // The draining mark stays as it was: a proxy that got SIGTERM
                // is still draining, whatever became of the handover.
                self.retired = false;
                self.next_connect = Instant::now();
                self.maybe_connect();
            }
        }
    }

    pub(super) fn route_for(&self, agent: &str) -> Option<AgentRoute> {
        let (_, r) = self.local.get(agent)?.first()?;
        Some(AgentRoute {
            proxy: self.opts.me.id.clone(),
            shard: r.shard,
            services: r.services.to_vec(),
            expires_ms: now_ms() + 3 * self.opts.resync.as_millis() as u64,
        })
    }

    /// Runs a write against the backend; drops the connection on failure.
    pub(super) fn write(&mut self, what: &str, f: impl FnOnce(&mut dyn RouteStore) -> anyhow::Result<()>) {
        let Some(w) = self.writer.as_mut() else { return };
        if let Err(e) = f(w.as_mut()) {
            self.writer = None;
            self.writer_down(format!("{what}: {e:#}"));
        }
    }

    pub(super) fn writer_down(&mut self, why: String) {
        if self.writer_error.is_none() {
            tracing::warn!(
                proxy = self.opts.me.id,
                backend = self.store.describe(),
                error = why,
                "route backend unavailable; serving the last snapshot and retrying with backoff"
            );
        }
        self.writer_error = Some(why);
        self.next_connect = Instant::now() + self.writer_backoff.next_delay();
    }

    pub(super) fn publish_agent(&mut self, agent: &str) {
        match self.route_for(agent) {
            Some(r) => self.write("put route", |w| w.put_route(agent, &r, true)),
            None => {
                let me = self.opts.me.id.clone();
                self.write("remove route", |w| w.remove_route(agent, &me, true));
            }
        }
    }

    pub(super) fn maybe_connect(&mut self) {
        if self.retired || self.writer.is_some() || Instant::now() < self.next_connect {
            return;
        }
        let generation = self.store.generation();
        match self.store.connect() {
            Ok(w) => {
                self.writer = Some(w);
                self.writer_generation = generation;
                let (me, ttl, seed) = (self.opts.me.clone(), self.opts.ttl, self.opts.strategy);
                self.write("register proxy", |w| w.put_proxy(&me, ttl));
                let mut in_force = None;
                self.write("seed strategy", |w| w.seed_strategy(seed).map(|s| in_force = Some(s)));
                if self.view.strategy.is_none() {
                    self.view.strategy = in_force;
                }
                let agents: Vec<String> = self.local.keys().cloned().collect();
                for a in agents {
                    self.publish_agent(&a);
                }
                let keep = 3 * self.opts.resync;
                self.gone.retain(|_, at| at.elapsed() < keep);
                let gone: Vec<String> = self.gone.keys().filter(|a| !self.local.contains_key(*a)).cloned().collect();
                let id = self.opts.me.id.clone();
                self.write("remove routes again", |w| gone.iter().try_for_each(|a| w.remove_route(a, &id, true)));
                if self.writer.is_some() {
                    if self.writer_error.take().is_some() {
                        tracing::info!(
                            proxy = me.id,
                            backend = self.store.describe(),
                            "route backend reachable again; local state republished"
                        );
                    }
                    self.writer_backoff.reset();
                    self.next_heartbeat = Instant::now() + ttl / 3;
                }
            }
            Err(e) => self.writer_down(format!("{e:#}")),
        }
    }

    pub(super) fn tick(&mut self) {
        if self.writer.is_some() && self.store.generation() != self.writer_generation {
            tracing::info!(
                proxy = self.opts.me.id,
                backend = self.store.describe(),
                "route backend master changed; republishing local state there"
            );
            self.writer = None;
            self.next_connect = Instant::now();
        }
        self.maybe_connect();
        let now = Instant::now();
        if now >= self.next_heartbeat && self.writer.is_some() {
            let (me, ttl) = (self.opts.me.clone(), self.opts.ttl);
            self.write("heartbeat", |w| w.put_proxy(&me, ttl));
            self.next_heartbeat = now + ttl / 3;
        }
        if now >= self.next_refresh && self.writer.is_some() {
            // Refresh our routes' expiry without announcing them.
            let routes: Vec<(String, AgentRoute)> =
                self.local.keys().filter_map(|a| self.route_for(a).map(|r| (a.clone(), r))).collect();
            self.write("refresh routes", |w| routes.iter().try_for_each(|(a, r)| w.put_route(a, r, false)));
            self.next_refresh = now + self.opts.resync;
        }
        if !self.cleaned && self.reader_up && self.view.arrivals_until.is_none() && self.writer.is_some() {
            // Routes under this id that no tunnel here backs, after the
            // arrival window: a predecessor's agents that never came (or a
            // crashed process's). Remove them, or they would last until
            // their expiry.
            self.cleaned = true;
            let me = self.opts.me.id.clone();
            let stale = self.view.listed_here_without_tunnel(&me, &self.local);
            if !stale.is_empty() {
                tracing::info!(proxy = me, agents = stale.len(), "removing routes under this id that no tunnel backs");
            }
            self.write("remove stale routes", |w| stale.iter().try_for_each(|a| w.remove_route(a, &me, true)));
        }
    }

    pub(super) fn leave(&mut self) {
        if self.retired {
            return;
        }
        let me = self.opts.me.id.clone();
        let agents: Vec<String> = self.local.keys().cloned().collect();
        self.write("leave", |w| {
            for a in &agents {
                w.remove_route(a, &me, true)?;
            }
            w.remove_proxy(&me)
        });
    }
}
