//! `ringpeer grants`: lists, writes and revokes grants in the route backend
//! (the keys and events the proxies follow; README, "Authorization").
//!
//! Invariant: like `routes`, only the [`RouteStore`] boundary is used, so a
//! grant written here is byte for byte what another control plane would
//! write, and what this lists is exactly what the proxies load.

use std::fmt::Write;

use anyhow::bail;

use crate::route::grants::{Grant, GrantTable};
use crate::route::store::RouteStore;
use crate::wire::DialTarget;

/// Splits repeated and comma-separated values (`--clients a,b --clients c`).
pub fn split_list(v: &[String]) -> Vec<String> {
    v.iter().flat_map(|s| s.split(',')).map(str::trim).filter(|s| !s.is_empty()).map(str::to_string).collect()
}

/// `grants list`.
pub fn list(store: &mut dyn RouteStore, json: bool) -> anyhow::Result<String> {
    let l = store.load()?;
    let mut grants = l.grants;
    grants.sort_by(|a, b| a.name.cmp(&b.name));
    if json {
        return Ok(serde_json::to_string_pretty(&grants)? + "\n");
    }
    let mut out: String = l
        .skipped
        .iter()
        .filter(|(k, _)| k.starts_with("grant:"))
        .map(|(k, e)| format!("warning: skipped {k}: {e}\n"))
        .collect();
    let _ = writeln!(out, "{:<20} {:<28} {:<28} SERVICES", "GRANT", "CLIENTS", "AGENTS");
    let join = |v: &[crate::route::grants::Pattern]| v.iter().map(|p| p.as_str()).collect::<Vec<_>>().join(",");
    for g in &grants {
        let _ = writeln!(out, "{:<20} {:<28} {:<28} {}", g.name, join(&g.clients), join(&g.agents), join(&g.services));
    }
    Ok(out)
}

/// `grants add NAME --clients .. --agents .. --services ..` (replaces a
/// grant of the same name).
pub fn add(
    store: &mut dyn RouteStore,
    name: &str,
    clients: &[String],
    agents: &[String],
    services: &[String],
) -> anyhow::Result<String> {
    let g = Grant::new(name, &split_list(clients), &split_list(agents), &split_list(services))
        .map_err(anyhow::Error::msg)?;
    store.put_grant(&g)?;
    Ok(format!("grant {name:?} written; every proxy applies it within about 100 ms\n"))
}

/// `grants revoke NAME [--kill-streams]`.
pub fn revoke(store: &mut dyn RouteStore, name: &str, kill_streams: bool) -> anyhow::Result<String> {
    let existed = store.remove_grant(name, kill_streams)?;
    let mut out = if existed {
        format!("grant {name:?} revoked; new dials it allowed are refused within about 100 ms\n")
    } else {
        format!("no grant {name:?} in the backend\n")
    };
    if kill_streams {
        out.push_str("open streams that no remaining grant allows are being ended on every proxy\n");
    } else if existed {
        out.push_str("open streams stay up (use --kill-streams to end them)\n");
    }
    Ok(out)
}

/// `grants check CLIENT AGENT[/SERVICE]`: which grant, if any, allows it.
pub fn check(store: &mut dyn RouteStore, client: &str, target: &str) -> anyhow::Result<String> {
    let t = DialTarget::parse(target).map_err(|s| anyhow::anyhow!("{}", s.message))?;
    if t.service.is_empty() {
        bail!("name the service: AGENT/SERVICE (proxies resolve the default service from the agent's routes)");
    }
    let table = GrantTable::new(store.load()?.grants);
    Ok(match table.allows(client, &t.agent, &t.service) {
        Some(g) => format!("allowed by grant {g:?}\n"),
        None => format!("denied: no grant lets client {client:?} reach {t}\n"),
    })
}
