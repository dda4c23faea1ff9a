//! The agent's tunnel manager: runs one task per tunnel the strategy
//! ([`super::strategy`]) wants, reconnecting each with backoff, and retires
//! tunnels make-before-break: one no longer wanted, or one whose proxy said
//! a successor listens at its address, drains only once its replacement has
//! been up for [`SETTLE`].
//!
//! Invariants: at most one live slot per address, plus retiring ones; a
//! slot's task ends only after its stop fired; every state change is logged
//! once, not once per retry.

use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_lite::future::or;

use super::proxy_tls::{is_name_mismatch, Expect, ProxyTls};
use super::strategy::{desired, Slot, SETTLE};
use super::{serve_tunnel, AgentCtx};
use crate::route::model::Strategy;
use crate::runtime::backoff::Backoff;
use crate::transport::connect_tls;

/// Keeps the set of tunnels the strategy asks for, until shutdown.
pub(super) async fn manage(ctx: Rc<AgentCtx>, seeds: Vec<String>) {
    let mut slots: HashMap<String, (Slot, glommio::task::JoinHandle<()>)> = HashMap::new();
    // Slots whose proxy said a successor listens at the same address: each
    // drains once the replacement at its address is up (make before break).
    let mut retiring: Vec<(String, Slot)> = Vec::new();
    let mut last: Option<(u64, Vec<String>)> = None;
    while !ctx.shutdown.is_triggered() {
        slots.retain(|_, (s, _)| !s.ended.get());
        retiring.retain(|(_, s)| !s.ended.get());
        let now = Instant::now();
        let moved: Vec<String> = slots.iter().filter(|(_, (s, _))| s.replace.get()).map(|(a, _)| a.clone()).collect();
        for a in moved {
            if let Some((s, _)) = slots.remove(&a) {
                tracing::info!(
                    agent = ctx.id,
                    addr = a,
                    "a successor listens at the proxy's address; opening a replacement tunnel"
                );
                retiring.push((a, s));
            }
        }
        // A retiring tunnel stands for its address until its replacement
        // exists, so the strategy keeps that address (the successor's).
        let mut view: HashMap<String, Slot> = slots.iter().map(|(a, (s, _))| (a.clone(), s.clone())).collect();
        for (a, s) in &retiring {
            view.entry(a.clone()).or_insert_with(|| s.clone());
        }
        let want = {
            let m = ctx.membership.borrow();
            let strategy = match (m.strategy, ctx.count_override) {
                (Strategy::ProxyPeering { .. }, Some(n)) => Strategy::ProxyPeering { agent_connection_count: n.max(1) },
                (s, _) => s,
            };
            desired(&ctx.id, strategy, &m, &seeds, &view, now)
        };
        for a in &want {
            if !slots.contains_key(a) {
                let slot = Slot::new();
                let copy = slot.clone();
                let task = glommio::spawn_local(tunnel_loop(ctx.clone(), a.clone(), copy)).detach();
                slots.insert(a.clone(), (slot, task));
            }
        }
        // Make before break: a healthy tunnel that is no longer wanted
        // drains only once every wanted one has been up for SETTLE.
        let settled = want.iter().all(|a| slots.get(a).is_some_and(|(s, _)| s.up_for(SETTLE, now)));
        for (a, (s, _)) in &slots {
            if want.contains(a) || s.stop.is_triggered() {
                continue;
            }
            let why = if s.suspect() {
                "its proxy missed a keepalive ping"
            } else if !s.up.get() {
                "no longer wanted (and down)"
            } else if settled {
                "no longer wanted; its replacement is up"
            } else {
                continue;
            };
            tracing::info!(agent = ctx.id, addr = a, why, "draining tunnel");
            s.stop.trigger();
        }
        for (a, s) in &retiring {
            let replaced = slots.get(a).is_some_and(|(n, _)| n.up_for(SETTLE, now));
            if !s.stop.is_triggered() && (replaced || !s.up.get()) {
                tracing::info!(agent = ctx.id, addr = a, "draining the predecessor's tunnel");
                s.stop.trigger();
            }
        }
        let generation = ctx.membership.borrow().generation;
        if last.as_ref() != Some(&(generation, want.clone())) {
            tracing::debug!(agent = ctx.id, ?want, strategy = %ctx.membership.borrow().strategy, "tunnel set");
            last = Some((generation, want));
        }
        or(glommio::timer::sleep(Duration::from_millis(100)), ctx.shutdown.wait()).await;
    }
    for (_, (s, _)) in slots {
        s.stop.trigger();
    }
    for (_, s) in retiring {
        s.stop.trigger();
    }
}

async fn tunnel_loop(ctx: Rc<AgentCtx>, addr: String, slot: Slot) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let mut last_error: Option<String> = None;
    while !ctx.shutdown.is_triggered() && !slot.stop.is_triggered() {
        let started = Instant::now();
        // Which proxy must answer here: read per attempt, so a new proxy
        // set applies from the next handshake on.
        let expect = ProxyTls::expect(&ctx.membership.borrow().proxies, &addr);
        match attempt(&ctx, &addr, &expect).await {
            Ok((tls, proxy)) => {
                last_error = None;
                *slot.proxy.borrow_mut() = Some(proxy.name.clone());
                slot.up.set(true);
                slot.since.set(Instant::now());
                tracing::info!(agent = ctx.id, proxy = proxy.name, addr, "tunnel up");
                let id = ctx.stats.tunnel_up(&addr, &proxy.name);
                let why = serve_tunnel(ctx.clone(), tls, &slot).await;
                ctx.stats.tunnel_down(id);
                slot.up.set(false);
                slot.health.replace(Default::default());
                slot.since.set(Instant::now());
                tracing::info!(agent = ctx.id, proxy = proxy.name, addr, why, "tunnel down");
                if started.elapsed() > Duration::from_secs(5) {
                    backoff.reset();
                }
            }
            Err(Refused::Logged) => {
                ctx.stats.tunnel_failures.inc();
                last_error = None
            }
            Err(Refused::Other(msg)) => {
                ctx.stats.tunnel_failures.inc();
                if last_error.as_deref() != Some(&msg) {
                    tracing::warn!(agent = ctx.id, addr, error = %msg, "cannot open tunnel; retrying with backoff");
                    last_error = Some(msg);
                }
            }
        }
        // Every failure, a refused proxy name included, waits its backoff:
        // a forged entry costs one handshake per step, not a tight loop.
        let wait = or(glommio::timer::sleep(backoff.next_delay()), ctx.shutdown.wait());
        or(wait, slot.stop.wait()).await;
    }
    slot.ended.set(true);
}

enum Refused {
    /// A proxy that is not the one the set names (logged once per entry).
    Logged,
    /// Any other failure, for the caller to log once per change.
    Other(String),
}

/// One handshake with `addr`, holding the proxy to `expect`.
async fn attempt(
    ctx: &AgentCtx,
    addr: &str,
    expect: &Expect,
) -> Result<(crate::transport::ClientTls, crate::transport::identity::SpiffeId), Refused> {
    let cfg = ctx.tls.config(expect).map_err(|e| Refused::Other(e.to_string()))?;
    match connect_tls(&cfg, addr, ctx.h2.handshake_timeout()).await {
        Ok((_, proxy)) if !expect.check(&proxy.name) => {
            if ctx.tls.first_refusal(&proxy.name, addr) {
                tracing::warn!(
                    agent = ctx.id,
                    addr,
                    presented = proxy.name,
                    "the proxy set entries at {addr} ({}) do not include {:?}, whose certificate it presented; refusing it",
                    expect.names(),
                    proxy.name
                );
            }
            Err(Refused::Logged)
        }
        Ok(v) => Ok(v),
        Err(e) => match expect {
            Expect::One(id) if is_name_mismatch(&e) => {
                if ctx.tls.first_refusal(id, addr) {
                    tracing::warn!(
                        agent = ctx.id,
                        addr,
                        entry = id,
                        "proxy set entry {id:?} at {addr} presented a certificate that does not name {id:?}; refusing it"
                    );
                }
                Err(Refused::Logged)
            }
            _ => Err(Refused::Other(e.to_string())),
        },
    }
}
