//! The agent's config reload thread: on each request (SIGHUP) it reads
//! the config file again, applies a changed `log_level` and changed
//! `[services]` (addresses, allow lists, services added or removed: every
//! tunnel announces the new list to its proxy, see `services`), and logs
//! every other change as not applied (a restart is needed).
//!
//! Invariant: a file that does not parse or validate is refused with one
//! error line, and the running config stays. Ends within [`POLL`] of `stop`.

use std::thread::JoinHandle;
use std::time::Duration;

use super::services::{self, LiveServices};
use crate::config::live::{self, Reconfig};
use crate::config::AgentConfig;
use crate::runtime::Shutdown;

/// How often the thread looks at `stop`.
const POLL: Duration = Duration::from_millis(500);

/// Starts the reload thread.
pub fn spawn(cfg: AgentConfig, rc: Reconfig, stop: Shutdown, live: LiveServices) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name("config-reload".into()).spawn(move || {
        let who = format!("agent {}", cfg.id);
        let mut cur = cfg;
        rc.serve(&stop, POLL, || {
            let new = match AgentConfig::load(&rc.path) {
                Ok(n) => n,
                Err(e) => return live::refused(&who, &e),
            };
            let mut d = live::agent(&cur, &new);
            if cur.log_level != new.log_level {
                let r = rc.logs.as_ref().map(|set| set(new.log_level.as_deref()));
                if !matches!(r, Some(Ok(()))) {
                    d.applied.retain(|c| !c.starts_with("log_level "));
                    d.restart.push("log_level".into());
                }
            }
            let mut services_applied = false;
            if cur.services != new.services {
                // Validated by load, so every pattern compiles.
                match services::from_config(&new.services) {
                    Ok(s) => {
                        live.replace(s);
                        services_applied = true;
                    }
                    Err(e) => {
                        d.applied.retain(|c| !c.starts_with("services "));
                        d.restart.push(format!("services ({e:#})"));
                    }
                }
            }
            live::log(&who, &d);
            // What was not applied stays as it runs, so the next reload
            // reports it again.
            cur.log_level = new.log_level;
            if services_applied {
                cur.services = new.services;
            }
        })
    })
}
