//! Config reload (SIGHUP): what differs between the running config and the
//! file, split into what a running process applies and what needs a
//! restart. The roles apply the first part (`proxy::reconfig`,
//! `agent::reconfig`); this module only compares and words the log lines.
//!
//! Invariant: every key of the file is in exactly one of the two lists,
//! so a change is never silently ignored: a changed key that is not
//! applied is logged as such, naming it.

use std::fmt::Debug;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::{AgentConfig, ProxyConfig};
use crate::runtime::Shutdown;
use crate::transport::reload::Trigger;

/// Sets the process's log filter (`None`: back to the start-up filter).
pub type LogControl = Arc<dyn Fn(Option<&str>) -> Result<(), String> + Send + Sync>;

/// How a role reloads its config: the file, the request (SIGHUP) and the
/// log filter handle.
#[derive(Clone)]
pub struct Reconfig {
    /// The config file, read again at each request.
    pub path: PathBuf,
    /// Reload requests.
    pub trigger: Trigger,
    /// The log filter; without it a changed `log_level` is not applied.
    pub logs: Option<LogControl>,
}

impl Reconfig {
    /// The reload thread's loop, shared by the roles: `reload` runs once per
    /// request; `stop` is looked at every `poll`, so the loop ends within
    /// `poll` of it (or when the trigger is gone).
    pub fn serve(&self, stop: &Shutdown, poll: Duration, mut reload: impl FnMut()) {
        loop {
            let asked = self.trigger.wait(poll);
            if stop.is_triggered() || asked.is_none() {
                return;
            }
            if asked == Some(true) {
                reload();
            }
        }
    }
}

/// Logs a refused reload: the running config stays.
pub fn refused(who: &str, e: &anyhow::Error) {
    tracing::error!("{who}: config reload refused, the running config stays: {e:#}");
}

/// The differences between two configs.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Diff {
    /// `key old -> new`, applied live.
    pub applied: Vec<String>,
    /// `key old -> new`, needing a restart.
    pub restart: Vec<String>,
}

impl Diff {
    /// Nothing changed.
    pub fn is_empty(&self) -> bool {
        self.applied.is_empty() && self.restart.is_empty()
    }
}

fn show<T: Debug>(v: &T) -> String {
    let s = format!("{v:?}");
    // Option<"x"> reads better as "x", and None as "(unset)".
    match s.strip_prefix("Some(").and_then(|s| s.strip_suffix(')')) {
        Some(inner) => inner.to_string(),
        None if s == "None" => "(unset)".into(),
        None => s,
    }
}

/// Pushes `key old -> new` when they differ.
pub fn cmp<T: Debug + PartialEq>(out: &mut Vec<String>, key: &str, old: &T, new: &T) {
    if old != new {
        let (a, b) = (show(old), show(new));
        // Whole sections print as "changed" rather than as a struct dump.
        if a.len() + b.len() > 120 {
            out.push(format!("{key} changed"));
        } else {
            out.push(format!("{key} {a} -> {b}"));
        }
    }
}

/// Compares two `[limits]`-like sections key by key (via their TOML form).
fn cmp_table<T: serde::Serialize>(out: &mut Vec<String>, section: &str, old: &T, new: &T) {
    let (Ok(toml::Value::Table(a)), Ok(toml::Value::Table(b))) =
        (toml::Value::try_from(old), toml::Value::try_from(new))
    else {
        return;
    };
    for (k, v) in &a {
        if let Some(w) = b.get(k) {
            if v != w {
                out.push(format!("{section}.{k} {v} -> {w}"));
            }
        }
    }
}

/// Grant names added, removed or changed.
fn cmp_grants(out: &mut Vec<String>, old: &[super::GrantSpec], new: &[super::GrantSpec]) {
    for g in new {
        match old.iter().find(|o| o.name == g.name) {
            None => out.push(format!("grants +{}", g.name)),
            Some(o) if o != g => out.push(format!("grants ~{}", g.name)),
            Some(_) => {}
        }
    }
    for o in old {
        if !new.iter().any(|g| g.name == o.name) {
            out.push(format!("grants -{}", o.name));
        }
    }
}

/// What a proxy applies live: `log_level`, `[limits]`, `dial_timeout_ms`,
/// and with the embedded store `strategy` and `[[grants]]`. The rest needs
/// a restart.
pub fn proxy(old: &ProxyConfig, new: &ProxyConfig) -> Diff {
    let mut d = Diff::default();
    let a = &mut d.applied;
    cmp(a, "log_level", &old.log_level, &new.log_level);
    cmp_table(a, "limits", &old.limits, &new.limits);
    cmp(a, "dial_timeout_ms", &old.dial_timeout_ms, &new.dial_timeout_ms);
    // With Redis the strategy lives in Redis (`ringpeer routes
    // set-strategy`): the config only seeds an empty backend.
    let (os, ns) = (old.strategy.to_string(), new.strategy.to_string());
    if old.backend.kind == super::BackendKind::Memory {
        cmp(a, "strategy", &os, &ns);
    } else if os != ns {
        d.restart.push(format!("strategy {os} -> {ns} (with Redis: ringpeer routes set-strategy)"));
    }
    // Only the embedded store takes `[[grants]]` (validation).
    cmp_grants(&mut d.applied, &old.grants, &new.grants);
    let r = &mut d.restart;
    cmp(r, "cluster", &old.cluster, &new.cluster);
    cmp(r, "id", &old.id, &new.id);
    cmp(r, "shards", &old.shards, &new.shards);
    cmp(r, "client_addr", &old.client_addr, &new.client_addr);
    cmp(r, "tunnel_addr", &old.tunnel_addr, &new.tunnel_addr);
    cmp(r, "peer_addr", &old.peer_addr, &new.peer_addr);
    cmp(r, "advertise_host", &old.advertise_host, &new.advertise_host);
    cmp(r, "admin_addr", &old.admin_addr, &new.admin_addr);
    cmp(r, "shard_aware_peering", &old.shard_aware_peering, &new.shard_aware_peering);
    cmp(r, "pin_cpus", &old.pin_cpus, &new.pin_cpus);
    cmp(r, "peer_connect_timeout_ms", &old.peer_connect_timeout_ms, &new.peer_connect_timeout_ms);
    cmp(r, "peer_answer_timeout_ms", &old.peer_answer_timeout_ms, &new.peer_answer_timeout_ms);
    cmp(r, "drain_timeout_ms", &old.drain_timeout_ms, &new.drain_timeout_ms);
    cmp(r, "handover_wait_ms", &old.handover_wait_ms, &new.handover_wait_ms);
    cmp(r, "authorization", &old.authorization, &new.authorization);
    cmp(r, "upgrade_socket", &old.upgrade_socket, &new.upgrade_socket);
    cmp(r, "backend", &old.backend, &new.backend);
    cmp(r, "audit", &old.audit, &new.audit);
    cmp(r, "h2", &format!("{:?}", old.h2), &format!("{:?}", new.h2));
    // The files' contents reload on their own; other paths need a restart.
    cmp(r, "tls", &format!("{:?}", old.tls), &format!("{:?}", new.tls));
    d
}

/// What an agent applies live: `log_level`. Its services, their allow
/// lists and the rest need a restart (the services are announced to the
/// proxies when a tunnel opens).
pub fn agent(old: &AgentConfig, new: &AgentConfig) -> Diff {
    let mut d = Diff::default();
    cmp(&mut d.applied, "log_level", &old.log_level, &new.log_level);
    if old.services != new.services {
        d.applied.push(format!("services {}", services_change(&old.services, &new.services)));
    }
    let r = &mut d.restart;
    cmp(r, "cluster", &old.cluster, &new.cluster);
    cmp(r, "id", &old.id, &new.id);
    cmp(r, "proxies", &old.proxies, &new.proxies);
    cmp(r, "connect_timeout_ms", &old.connect_timeout_ms, &new.connect_timeout_ms);
    cmp(r, "agent_connection_count", &old.agent_connection_count, &new.agent_connection_count);
    cmp(r, "limits", &old.limits, &new.limits);
    cmp(r, "drain_timeout_ms", &old.drain_timeout_ms, &new.drain_timeout_ms);
    cmp(r, "h2", &format!("{:?}", old.h2), &format!("{:?}", new.h2));
    cmp(r, "tls", &format!("{:?}", old.tls), &format!("{:?}", new.tls));
    cmp(r, "admin_addr", &old.admin_addr, &new.admin_addr);
    d
}

/// What changed in `[services]`: added, removed and changed names.
fn services_change(
    old: &std::collections::BTreeMap<String, crate::config::ServiceSpec>,
    new: &std::collections::BTreeMap<String, crate::config::ServiceSpec>,
) -> String {
    let added: Vec<&str> = new.keys().filter(|k| !old.contains_key(*k)).map(String::as_str).collect();
    let removed: Vec<&str> = old.keys().filter(|k| !new.contains_key(*k)).map(String::as_str).collect();
    let changed: Vec<&str> =
        new.iter().filter(|(k, v)| old.get(*k).is_some_and(|o| o != *v)).map(|(k, _)| k.as_str()).collect();
    let parts: Vec<String> = [("added", added), ("removed", removed), ("changed", changed)]
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(what, v)| format!("{what} {}", v.join(" ")))
        .collect();
    format!("({})", parts.join("; "))
}

/// Logs a reload's outcome: one line with what was applied, one with what
/// was not.
pub fn log(who: &str, d: &Diff) {
    if d.is_empty() {
        tracing::info!("{who}: config reloaded: no change");
        return;
    }
    if !d.applied.is_empty() {
        tracing::info!("{who}: config reloaded: {}", d.applied.join(", "));
    }
    if !d.restart.is_empty() {
        tracing::warn!("{who}: config changes NOT applied (they need a restart): {}", d.restart.join(", "));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_split_into_applied_and_restart() {
        let dir = std::path::Path::new("/tmp");
        let old = crate::tools::fleet::proxy_config(dir, "proxy-a", 2);
        let mut new = old.clone();
        new.log_level = Some("debug".into());
        new.limits.streams_per_identity = 50;
        new.client_addr = "127.0.0.1:9".into();
        new.grants.push(crate::config::GrantSpec {
            name: "ops".into(),
            clients: vec!["alice".into()],
            agents: vec!["*".into()],
            services: vec!["*".into()],
        });
        let d = proxy(&old, &new);
        assert_eq!(
            d.applied,
            ["log_level (unset) -> \"debug\"", "limits.streams_per_identity 20000 -> 50", "grants +ops"]
        );
        assert_eq!(d.restart, ["client_addr \"127.0.0.1:0\" -> \"127.0.0.1:9\""]);
        assert!(proxy(&old, &old).is_empty());
    }
}
