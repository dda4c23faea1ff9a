//! `ringpeer demo`: the embedded default. A whole fleet in one process
//! (certificates in a temp dir, a proxy, two agents, echo and sink targets,
//! real sockets and mTLS), traffic pushed through it, and a report.
//!
//! Invariant: the demo exits 0 only if every check it prints passed.

pub mod bench;
pub mod fleet;
pub mod load;
pub mod targets;

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rand::RngCore;

use crate::forward::Client;
use crate::runtime::Shutdown;
use crate::transport::h2conf::H2Tuning;
use crate::wire::DialTarget;
use fleet::{agent_config, proxy_config, AgentHandle, CertDir, ProxyHandle};
use load::{bulk_proxy, echo_roundtrip, gbps, pingpong_proxy};
use targets::Kind;

fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

/// Runs the demo; with `serve`, keeps the fleet up until `shutdown`.
pub fn run(serve: bool, shutdown: Shutdown) -> anyhow::Result<()> {
    let certs = CertDir::temp()?;
    let dir = certs.path.clone();
    let echo = targets::spawn(Kind::Echo)?;
    let sink = targets::spawn(Kind::Sink)?;
    let shards = 2;
    let proxy = ProxyHandle::start(proxy_config(&dir, "proxy-a", shards))?;
    let a1 = AgentHandle::start(agent_config(
        &dir,
        "agent-1",
        &[proxy.tunnel_addr],
        &[("echo", echo.addr), ("sink", sink.addr)],
    ))?;
    let a2 = AgentHandle::start(agent_config(&dir, "agent-2", &[proxy.tunnel_addr], &[("echo", echo.addr)]))?;
    proxy.wait_tunnels(2, Duration::from_secs(10))?;
    println!("ringpeer demo: one process, real sockets, mTLS (TLS 1.3, SPIFFE ids) on every link");
    println!("  certificates  {}", dir.display());
    println!("  proxy-a       client {}  tunnel {}  ({shards} shards)", proxy.client_addr, proxy.tunnel_addr);
    println!("  agent-1       services echo={} sink={}", echo.addr, sink.addr);
    println!("  agent-2       services echo={}", echo.addr);

    let client_tls = crate::forward::client_tls(&dir, "client")?;
    let addr = proxy.client_addr.to_string();
    let report = crate::runtime::block_on("demo-client", move || async move {
        let h2 = H2Tuning::default();
        let c = Client::connect(&addr, &client_tls, &h2).await.map_err(|e| e.to_string())?;
        let mut lines = Vec::new();
        // 1. 16 MiB random through agent-1/echo, checked.
        let mut data = vec![0u8; 16 << 20];
        rand::thread_rng().fill_bytes(&mut data);
        let t0 = Instant::now();
        let back =
            echo_roundtrip(&c, &DialTarget::parse("agent-1/echo").unwrap(), &data).await.map_err(|s| s.to_string())?;
        if back != data {
            return Err("16 MiB echo came back different".to_string());
        }
        lines.push(format!(
            "[ok] 16 MiB random bytes through agent-1/echo came back intact ({:.2} s)",
            t0.elapsed().as_secs_f64()
        ));
        // 2. 64-byte ping-pong latency.
        let h = pingpong_proxy(&c, &DialTarget::parse("agent-2/echo").unwrap(), 5000, 64)
            .await
            .map_err(|s| s.to_string())?;
        lines.push(format!(
            "[ok] 5000 x 64-byte ping-pong via agent-2/echo, round trip: p50 {:.1} us  p99 {:.1} us  p99.9 {:.1} us  max {:.1} us",
            us(h.value_at_quantile(0.5)),
            us(h.value_at_quantile(0.99)),
            us(h.value_at_quantile(0.999)),
            us(h.max())
        ));
        // 3. Concurrent streams over one client connection and one tunnel.
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
        lines.push(format!("[ok] {n} concurrent streams over one connection to agent-1/echo, all intact"));
        // 4. Bulk into the sink.
        let bytes = 256u64 << 20;
        let d = bulk_proxy(&c, &DialTarget::parse("agent-1/sink").unwrap(), bytes).await.map_err(|s| s.to_string())?;
        lines.push(format!("[ok] 256 MiB into agent-1/sink in {:.2} s: {:.2} Gbit/s", d.as_secs_f64(), gbps(bytes, d)));
        // 5. Errors are statuses, not hangs.
        for (spec, want) in [("nobody/echo", "NOT_FOUND"), ("agent-2/ssh", "NOT_FOUND")] {
            match load::open(&c, &DialTarget::parse(spec).unwrap()).await {
                Ok(_) => return Err(format!("dial {spec} unexpectedly worked")),
                Err(s) if s.code.name() == want => lines.push(format!("[ok] dial {spec}: {s}")),
                Err(s) => return Err(format!("dial {spec}: expected {want}, got {s}")),
            }
        }
        Ok(lines)
    })?;
    let lines = report.map_err(anyhow::Error::msg).context("demo traffic failed")?;
    for l in &lines {
        println!("{l}");
    }
    let m = &proxy.metrics;
    println!(
        "proxy-a counters: dials {} (same shard {}, cross-shard {}), failed {}, payload up {} MiB, down {} MiB",
        m.sum(|s| s.dials.get()),
        m.sum(|s| s.dials_local.get()),
        m.sum(|s| s.dials_cross_shard.get()),
        m.sum(|s| s.dials_failed.get()),
        m.sum(|s| s.bytes_up.get()) >> 20,
        m.sum(|s| s.bytes_down.get()) >> 20,
    );
    if serve {
        let dir = certs.keep();
        println!("\nThe fleet keeps running. Try (Ctrl-C stops it):");
        println!(
            "  echo hello | cargo run --release -- dial agent-1/echo --proxy {} --certs {}",
            proxy.client_addr,
            dir.display()
        );
        println!(
            "  cargo run --release -- forward --listen 127.0.0.1:7000 --to agent-1/echo --proxy {} --certs {}",
            proxy.client_addr,
            dir.display()
        );
        println!("  then: nc 127.0.0.1 7000");
        shutdown.wait_blocking();
    }
    drop((a1, a2));
    proxy.stop()?;
    if lines.len() < 6 {
        bail!("demo incomplete");
    }
    println!("demo: all checks passed");
    Ok(())
}
