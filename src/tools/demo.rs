//! `ringpeer demo`: the embedded default. A whole fleet in one process
//! (certificates in a temp dir, three proxies sharing the embedded route
//! store, two agents with one and two tunnels, echo and sink targets, real
//! sockets and mTLS), traffic entering at every proxy, and a report of the
//! path each dial took.
//!
//! Invariant: the demo exits 0 only if every check it prints passed.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rand::RngCore;

use super::fleet::{agent_config, proxy_config, AgentHandle, CertDir, ProxyHandle};
use super::load::{bulk_proxy, echo_roundtrip, gbps, pingpong_proxy};
use super::target::Kind;
use crate::client::Client;
use crate::runtime::Shutdown;
use crate::transport::h2conf::H2Tuning;
use crate::wire::DialTarget;

fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

/// How a dial entering at `p` went, from its counters before and after.
fn path_taken(p: &ProxyHandle, before: [u64; 3], agent: &str) -> String {
    let m = &p.metrics;
    let now = [m.sum(|s| s.dials_local.get()), m.sum(|s| s.dials_cross_shard.get()), m.sum(|s| s.dials_peered.get())];
    let r = p.routes();
    let holders = || {
        r.get(agent)
            .map(|a| a.remote.iter().map(|x| x.proxy.to_string()).collect::<Vec<_>>().join(" or "))
            .unwrap_or_default()
    };
    if now[2] > before[2] {
        format!("peer link -> {} -> tunnel", holders())
    } else if now[1] > before[1] {
        "other shard (pipe) -> tunnel".to_string()
    } else {
        "local tunnel".to_string()
    }
}

fn counters(p: &ProxyHandle) -> [u64; 3] {
    let m = &p.metrics;
    [m.sum(|s| s.dials_local.get()), m.sum(|s| s.dials_cross_shard.get()), m.sum(|s| s.dials_peered.get())]
}

/// Runs the demo; with `serve`, keeps the fleet up until `shutdown`.
pub fn run(serve: bool, shutdown: Shutdown) -> anyhow::Result<()> {
    let certs = CertDir::temp()?;
    let dir = certs.path.clone();
    let echo = super::target::spawn(Kind::Echo)?;
    let sink = super::target::spawn(Kind::Sink)?;
    // Three proxies sharing the embedded route store; the cluster runs
    // proxy_peering with one tunnel per agent, and agent-2 asks for two.
    let store: std::sync::Arc<dyn crate::route::store::StoreFactory> =
        std::sync::Arc::new(crate::route::store::MemoryStore::new(10_000));
    let start = |id: &str, shards: usize| -> anyhow::Result<ProxyHandle> {
        let mut c = proxy_config(&dir, id, shards);
        c.strategy = crate::route::model::Strategy::ProxyPeering { agent_connection_count: 1 };
        // Default policy: deny unless a grant allows. The demo's client may
        // reach the agents' services; nobody else may.
        let v = |x: &[&str]| x.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        c.grants = vec![crate::config::GrantSpec {
            name: "demo".into(),
            clients: v(&["client"]),
            agents: v(&["agent-*"]),
            services: v(&["*"]),
        }];
        let l = crate::proxy::Listeners::bind(&c)?;
        ProxyHandle::start_full(c, l, Some(store.clone()))
    };
    let proxies = [start("proxy-a", 2)?, start("proxy-b", 1)?, start("proxy-c", 1)?];
    let a1 = AgentHandle::start(agent_config(
        &dir,
        "agent-1",
        &[proxies[2].tunnel_addr],
        &[("echo", echo.addr), ("sink", sink.addr)],
    ))?;
    let mut c2 = agent_config(&dir, "agent-2", &[proxies[0].tunnel_addr], &[("echo", echo.addr)]);
    c2.agent_connection_count = Some(2);
    let a2 = AgentHandle::start(c2)?;
    let t0 = Instant::now();
    let tunnels = |p: &ProxyHandle| p.metrics.shards.iter().map(|s| s.tunnels.get()).sum::<i64>();
    while proxies.iter().map(tunnels).sum::<i64>() != 3
        || !proxies.iter().all(|p| p.routes().get("agent-1").is_some() && p.routes().get("agent-2").is_some())
    {
        if t0.elapsed() > Duration::from_secs(20) {
            let views: Vec<String> = proxies
                .iter()
                .map(|p| {
                    let r = p.routes();
                    format!(
                        "v{} proxies {:?} agents {:?} tunnels {}",
                        r.version,
                        r.proxies.keys().collect::<Vec<_>>(),
                        r.agents.keys().collect::<Vec<_>>(),
                        tunnels(p)
                    )
                })
                .collect();
            bail!("agents did not settle on their tunnels within 20 s; views: {views:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("ringpeer demo: one process, real sockets, mTLS (TLS 1.3, SPIFFE ids) on every link");
    println!("  certificates  {}", dir.display());
    for p in &proxies {
        let id = &p
            .routes()
            .proxies
            .values()
            .find(|i| i.client_addr == p.client_addr.to_string())
            .map(|i| i.id.clone())
            .unwrap_or_default();
        let held: Vec<String> = ["agent-1", "agent-2"]
            .iter()
            .filter(|a| p.routes().get(a).is_some_and(|r| !r.local.is_empty()))
            .map(|a| a.to_string())
            .collect();
        println!(
            "  {id:<12} client {}  tunnel {}  holds tunnels of: {}",
            p.client_addr,
            p.tunnel_addr,
            if held.is_empty() { "-".into() } else { held.join(", ") }
        );
    }
    println!("  strategy      proxy_peering, agent_connection_count 1 (agent-2 asks for 2); agents found the proxies by themselves");

    let client_tls = crate::client::client_tls(&dir, "client")?;
    let mut lines = Vec::new();
    // 1. Enter at every proxy, for both agents, and show the path taken.
    for p in &proxies {
        for agent in ["agent-1", "agent-2"] {
            let before = counters(p);
            let (addr, tls) = (p.client_addr.to_string(), client_tls.clone());
            let target = format!("{agent}/echo");
            let r = crate::runtime::block_on("demo-client", move || async move {
                let c = Client::connect(&addr, &tls, &H2Tuning::default()).await.map_err(|e| e.to_string())?;
                let data: Vec<u8> = (0..(1 << 20)).map(|i| (i % 251) as u8).collect();
                let t = Instant::now();
                let back =
                    echo_roundtrip(&c, &DialTarget::parse(&target).unwrap(), &data).await.map_err(|s| s.to_string())?;
                if back != data {
                    return Err("echo came back different".into());
                }
                Ok::<_, String>((c.proxy().to_string(), t.elapsed()))
            })?
            .map_err(anyhow::Error::msg)?;
            lines.push(format!(
                "[ok] enter at {:<8} -> {:<40} -> {agent}/echo: 1 MiB intact in {:.1} ms",
                r.0,
                path_taken(p, before, agent),
                r.1.as_secs_f64() * 1e3
            ));
        }
    }
    // 2. Heavier traffic through the peer link from proxy-a.
    let addr = proxies[0].client_addr.to_string();
    crate::transport::certs::issue(&dir, crate::transport::identity::Role::Client, "mallory")?;
    let mallory_tls = crate::client::client_tls(&dir, "mallory")?;
    let more = crate::runtime::block_on("demo-client", move || async move {
        let h2 = H2Tuning::default();
        let c = Client::connect(&addr, &client_tls, &h2).await.map_err(|e| e.to_string())?;
        let mut lines = Vec::new();
        let mut data = vec![0u8; 16 << 20];
        rand::thread_rng().fill_bytes(&mut data);
        let t0 = Instant::now();
        let back =
            echo_roundtrip(&c, &DialTarget::parse("agent-1/echo").unwrap(), &data).await.map_err(|s| s.to_string())?;
        if back != data {
            return Err("16 MiB echo came back different".to_string());
        }
        lines.push(format!(
            "[ok] 16 MiB random bytes, proxy-a -> peer -> agent-1/echo, intact ({:.2} s)",
            t0.elapsed().as_secs_f64()
        ));
        let h = pingpong_proxy(&c, &DialTarget::parse("agent-1/echo").unwrap(), 5000, 64)
            .await
            .map_err(|s| s.to_string())?;
        lines.push(format!(
            "[ok] 5000 x 64-byte ping-pong over the peer link, round trip: p50 {:.1} us  p99 {:.1} us  p99.9 {:.1} us  max {:.1} us",
            us(h.value_at_quantile(0.5)),
            us(h.value_at_quantile(0.99)),
            us(h.value_at_quantile(0.999)),
            us(h.max())
        ));
        let n = 200;
        let tasks: Vec<_> = (0..n)
            .map(|i| {
                let c = c.clone();
                glommio::spawn_local(async move {
                    let payload = vec![(i % 251) as u8; 4096 + i];
                    echo_roundtrip(&c, &DialTarget::parse("agent-1/echo").unwrap(), &payload)
                        .await
                        .map(|b| b == payload)
                })
            })
            .collect();
        let mut intact = 0;
        for t in tasks {
            if t.await == Ok(true) {
                intact += 1;
            }
        }
        if intact != n {
            return Err(format!("{} of {n} concurrent streams failed", n - intact));
        }
        lines.push(format!("[ok] {n} concurrent streams over one client connection and one peer link, all intact"));
        let bytes = 256u64 << 20;
        let d = bulk_proxy(&c, &DialTarget::parse("agent-1/sink").unwrap(), bytes).await.map_err(|s| s.to_string())?;
        lines.push(format!(
            "[ok] 256 MiB into agent-1/sink over the peer link in {:.2} s: {:.2} Gbit/s",
            d.as_secs_f64(),
            gbps(bytes, d)
        ));
        let m = Client::connect(&addr, &mallory_tls, &h2).await.map_err(|e| e.to_string())?;
        for (who, c, spec, want) in [
            ("client", &c, "agent-9/echo", "NOT_FOUND"),
            ("client", &c, "agent-2/ssh", "NOT_FOUND"),
            ("mallory", &m, "agent-1/echo", "PERMISSION_DENIED"),
        ] {
            match super::load::open(c, &DialTarget::parse(spec).unwrap()).await {
                Ok(_) => return Err(format!("dial {spec} as {who} unexpectedly worked")),
                Err(s) if s.code.name() == want => lines.push(format!("[ok] dial {spec} as {who}: {s}")),
                Err(s) => return Err(format!("dial {spec} as {who}: expected {want}, got {s}")),
            }
        }
        Ok(lines)
    })?;
    lines.extend(more.map_err(anyhow::Error::msg).context("demo traffic failed")?);
    for l in &lines {
        println!("{l}");
    }
    for (name, p) in ["proxy-a", "proxy-b", "proxy-c"].iter().zip(&proxies) {
        let m = &p.metrics;
        println!(
            "{name} counters: dials {} (own tunnel {}, other shard {}, via peer {}), failed {}, payload up {} MiB, down {} MiB",
            m.sum(|s| s.dials.get()),
            m.sum(|s| s.dials_local.get()),
            m.sum(|s| s.dials_cross_shard.get()),
            m.sum(|s| s.dials_peered.get()),
            m.sum(|s| s.dials_failed.get()),
            m.sum(|s| s.bytes_up.get()) >> 20,
            m.sum(|s| s.bytes_down.get()) >> 20,
        );
    }
    if serve {
        let dir = certs.keep();
        println!("\nThe fleet keeps running. Try (Ctrl-C stops it):");
        for p in &proxies {
            println!(
                "  echo hello | cargo run --release -- dial agent-1/echo --proxy {} --certs {}",
                p.client_addr,
                dir.display()
            );
        }
        println!(
            "  cargo run --release -- forward --listen 127.0.0.1:7000 --to agent-1/echo --proxy {} --certs {}",
            proxies[0].client_addr,
            dir.display()
        );
        println!("  then: nc 127.0.0.1 7000");
        shutdown.wait_blocking();
    }
    drop((a1, a2));
    for p in proxies {
        p.stop()?;
    }
    if lines.len() < 11 {
        bail!("demo incomplete");
    }
    println!("demo: all checks passed");
    Ok(())
}
