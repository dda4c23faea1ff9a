//! `ringpeer routes`: reads and writes the route backend directly (the same
//! schema the control threads use), printing tables or JSON.
//!
//! Invariant: the CLI only uses the [`RouteStore`] boundary, so what it shows
//! is exactly what proxies load, garbage values included (reported, skipped).

use std::fmt::Write;
use std::path::Path;

use anyhow::{bail, Context};
use serde::Serialize;

use crate::config::{BackendKind, ProxyConfig};
use crate::route::model::{AgentRoute, ProxyInfo, Strategy};
use crate::route::redis::RedisFactory;
use crate::route::redis_conn::{RedisOptions, RedisSources};
use crate::route::store::{Loaded, RouteStore, StoreFactory};

/// Opens the backend named by `--backend/--cluster` or by a proxy config.
/// The password never comes from the command line's other flags: it is
/// read from `flags.password_file`, `RINGPEER_REDIS_PASSWORD` or the
/// config's `password_file` (a password in `--backend` still works, with a
/// warning, since argv is visible in `ps`). `flags` given with `--config`
/// override the config's keys.
pub fn open(
    backend: Option<&str>,
    cluster: Option<&str>,
    config: Option<&Path>,
    flags: &RedisSources,
) -> anyhow::Result<Box<dyn RouteStore>> {
    let (url, cluster, base) = match (backend, config) {
        (Some(url), _) => {
            (url.to_string(), cluster.context("--backend needs --cluster")?.to_string(), RedisSources::default())
        }
        (None, Some(path)) => {
            let c = ProxyConfig::load(path)?;
            if c.backend.kind != BackendKind::Redis {
                bail!("{} uses the memory backend, which lives inside that proxy; read its admin endpoint /routes instead", path.display());
            }
            let base = c.backend.redis_sources();
            (c.backend.url.unwrap_or_default(), c.cluster, base)
        }
        (None, None) => bail!("name the backend: --backend redis://HOST:PORT --cluster NAME, or --config proxy.toml"),
    };
    let f = flags.clone();
    let src = RedisSources {
        username: f.username.or(base.username),
        password_file: f.password_file.or(base.password_file),
        tls_ca: f.tls_ca.or(base.tls_ca),
        tls_cert: f.tls_cert.or(base.tls_cert),
        tls_key: f.tls_key.or(base.tls_key),
        sentinel_password_file: f.sentinel_password_file.or(base.sentinel_password_file),
    };
    RedisFactory::with_options(RedisOptions::load(&url, &src)?, &cluster, 10_000)?.connect()
}

#[derive(Serialize)]
struct AgentRow<'a> {
    agent: &'a str,
    #[serde(flatten)]
    route: &'a AgentRoute,
    proxy_alive: bool,
}

fn agent_rows<'a>(l: &'a Loaded, only: Option<&str>) -> Vec<AgentRow<'a>> {
    let mut rows: Vec<AgentRow<'a>> = l
        .agents
        .iter()
        .filter(|(a, _)| only.is_none_or(|o| o == a))
        .flat_map(|(a, routes)| {
            routes.iter().map(move |r| AgentRow {
                agent: a,
                route: r,
                proxy_alive: l.proxies.iter().any(|(p, _)| p.id == r.proxy),
            })
        })
        .collect();
    rows.sort_by(|x, y| (x.agent, &x.route.proxy).cmp(&(y.agent, &y.route.proxy)));
    rows
}

fn agents_table(rows: &[AgentRow<'_>]) -> String {
    let mut out = format!("{:<24} {:<16} {:>5}  {:<6} {}\n", "AGENT", "PROXY", "SHARD", "ALIVE", "SERVICES");
    for r in rows {
        let _ = writeln!(
            out,
            "{:<24} {:<16} {:>5}  {:<6} {}",
            r.agent,
            r.route.proxy,
            r.route.shard,
            if r.proxy_alive { "yes" } else { "no" },
            r.route.services.join(",")
        );
    }
    out
}

fn skipped_note(l: &Loaded) -> String {
    l.skipped.iter().map(|(k, e)| format!("warning: skipped {k}: {e}\n")).collect()
}

/// `routes list`.
pub fn list(store: &mut dyn RouteStore, json: bool) -> anyhow::Result<String> {
    let l = store.load()?;
    let rows = agent_rows(&l, None);
    Ok(if json { serde_json::to_string_pretty(&rows)? + "\n" } else { skipped_note(&l) + &agents_table(&rows) })
}

/// `routes get AGENT`.
pub fn get(store: &mut dyn RouteStore, agent: &str, json: bool) -> anyhow::Result<String> {
    let l = store.load()?;
    let rows = agent_rows(&l, Some(agent));
    if rows.is_empty() {
        bail!("no routes for agent {agent:?}");
    }
    Ok(if json { serde_json::to_string_pretty(&rows)? + "\n" } else { agents_table(&rows) })
}

#[derive(Serialize)]
struct ProxyRow<'a> {
    #[serde(flatten)]
    info: &'a ProxyInfo,
    ttl_ms: u128,
}

/// `routes proxies`.
pub fn proxies(store: &mut dyn RouteStore, json: bool) -> anyhow::Result<String> {
    let l = store.load()?;
    let mut rows: Vec<ProxyRow<'_>> =
        l.proxies.iter().map(|(p, ttl)| ProxyRow { info: p, ttl_ms: ttl.as_millis() }).collect();
    rows.sort_by(|a, b| a.info.id.cmp(&b.info.id));
    if json {
        return Ok(serde_json::to_string_pretty(&rows)? + "\n");
    }
    let mut out = skipped_note(&l);
    let _ = writeln!(out, "{:<16} {:<22} {:<22} {:>8}  PEER ADDRS", "PROXY", "TUNNEL", "CLIENT", "TTL(ms)");
    for r in rows {
        let _ = writeln!(
            out,
            "{:<16} {:<22} {:<22} {:>8}  {}",
            r.info.id,
            r.info.tunnel_addr,
            r.info.client_addr,
            r.ttl_ms,
            r.info.peer_addrs.join(",")
        );
    }
    let _ = writeln!(out, "strategy: {}", l.strategy.map(|s| s.to_string()).unwrap_or_else(|| "(unset)".into()));
    Ok(out)
}

/// Parses `agent_mesh` / `proxy_peering` with a count.
pub fn parse_strategy(kind: &str, count: Option<u32>) -> anyhow::Result<Strategy> {
    match kind {
        "agent_mesh" => Ok(Strategy::AgentMesh),
        "proxy_peering" => Ok(Strategy::ProxyPeering { agent_connection_count: count.unwrap_or(1).max(1) }),
        _ => bail!("unknown strategy {kind:?}: use agent_mesh or proxy_peering"),
    }
}
