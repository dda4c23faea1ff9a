//! The proxy's config reload thread: on each request (SIGHUP) it reads the
//! config file again and applies what can change live — the log filter,
//! `[limits]` and `dial_timeout_ms` ([`LiveTunables`]), and with the
//! embedded store `strategy` and `[[grants]]` (written to the store, so
//! they reach the shards through the ordinary event path) — and logs what
//! changed and what was not applied (needs a restart).
//!
//! Invariants: a file that does not parse or validate is refused whole,
//! with one error line, and the running config stays. The store is
//! written before anything else is applied, so a store error (none is
//! expected from the embedded store) leaves limits and log level as they
//! were. The thread ends within [`POLL`] of `stop`. The certificates
//! reload on the same signal through their own thread
//! (`transport::reload`).

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::tunables::LiveTunables;
use crate::config::live::{self, Reconfig};
use crate::config::{BackendKind, ProxyConfig};
use crate::route::store::StoreFactory;
use crate::runtime::Shutdown;

/// How often the thread looks at `stop`.
const POLL: Duration = Duration::from_millis(500);

/// What a reload changes.
pub struct Targets {
    /// The shards' live settings.
    pub tunables: LiveTunables,
    /// The route store (grants and strategy with the embedded store).
    pub store: Arc<dyn StoreFactory>,
}

/// Starts the reload thread.
pub fn spawn(cfg: ProxyConfig, rc: Reconfig, t: Targets, stop: Shutdown) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name("config-reload".into()).spawn(move || {
        let who = format!("proxy {}", cfg.id);
        let mut cur = cfg;
        rc.serve(&stop, POLL, || {
            match ProxyConfig::load(&rc.path).and_then(|new| apply(&cur, &new, &rc, &t).map(|d| (new, d))) {
                Ok((new, d)) => {
                    live::log(&who, &d);
                    cur = new;
                }
                Err(e) => live::refused(&who, &e),
            }
        })
    })
}

/// Applies `new` over `old`; on error nothing has been applied.
fn apply(old: &ProxyConfig, new: &ProxyConfig, rc: &Reconfig, t: &Targets) -> anyhow::Result<live::Diff> {
    let mut d = live::proxy(old, new);
    // The store first: it is the step that can fail.
    if old.backend.kind == BackendKind::Memory {
        let grants_changed = d.applied.iter().any(|c| c.starts_with("grants "));
        let strategy_changed = d.applied.iter().any(|c| c.starts_with("strategy "));
        if grants_changed || strategy_changed {
            let mut w = t.store.connect()?;
            if strategy_changed {
                w.set_strategy(new.strategy)?;
            }
            for g in &new.grants {
                if !old.grants.contains(g) {
                    w.put_grant(&g.grant().map_err(anyhow::Error::msg)?)?;
                }
            }
            for g in &old.grants {
                if !new.grants.iter().any(|n| n.name == g.name) {
                    w.remove_grant(&g.name, false)?;
                }
            }
        }
    }
    t.tunables.store(new.limits.clone(), Duration::from_millis(new.dial_timeout_ms));
    if old.log_level != new.log_level {
        match &rc.logs {
            Some(set) => {
                if let Err(e) = set(new.log_level.as_deref()) {
                    d.applied.retain(|c| !c.starts_with("log_level "));
                    d.restart.push(format!("log_level ({e})"));
                }
            }
            None => {
                d.applied.retain(|c| !c.starts_with("log_level "));
                d.restart.push("log_level (no log filter handle in this process)".into());
            }
        }
    }
    Ok(d)
}
