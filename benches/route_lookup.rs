//! Route lookup and snapshot rebuild cost.
//!
//! `cargo bench --bench route_lookup [-- --json FILE]`: builds the control
//! thread's cluster view with N agents spread over 16 proxies, times the
//! full snapshot rebuild (median of 5) and the incremental snapshot for one
//! changed agent (p50/p99 of 101) at 10k / 100k / 1M agents, and times
//! lookups of random existing agents in the 1M table (ns/op, HDR p50/p99
//! over batches of 64 lookups).

use std::collections::HashMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use ringpeer::proxy::control::view::{ClusterView, LocalTunnels};
use ringpeer::route::model::{AgentRoute, ProxyInfo};

fn view(n: usize) -> ClusterView {
    let mut v = ClusterView::default();
    let far = Instant::now() + Duration::from_secs(3600);
    for p in 0..16 {
        let info = ProxyInfo {
            id: format!("proxy-{p}"),
            peer_addrs: vec![format!("10.0.0.{p}:3021"), format!("10.0.0.{p}:3022")],
            tunnel_addr: format!("10.0.0.{p}:3024"),
            client_addr: format!("10.0.0.{p}:3080"),
            version: 1,
            draining: false,
            build: String::new(),
        };
        v.proxies.insert(info.id.clone(), (info, far));
    }
    for i in 0..n {
        let proxy = format!("proxy-{}", i % 16);
        let r = AgentRoute {
            proxy: proxy.clone(),
            shard: (i % 2) as u32,
            services: vec!["ssh".into()],
            expires_ms: u64::MAX,
        };
        v.agents.insert(format!("agent-{i}"), HashMap::from([(proxy, r)]));
    }
    v
}

fn main() {
    let json_out = std::env::args().skip_while(|a| a != "--json").nth(1);
    let local = LocalTunnels::new();
    let mut report = serde_json::Map::new();
    println!("{:>9} {:>14}", "agents", "rebuild ms");
    for n in [10_000usize, 100_000, 1_000_000] {
        let v = view(n);
        let mut times: Vec<f64> = (0..5)
            .map(|i| {
                let t0 = Instant::now();
                let t = black_box(v.build("proxy-self", &local, i, true));
                let d = t0.elapsed().as_secs_f64() * 1e3;
                drop(t);
                d
            })
            .collect();
        times.sort_by(|a, b| a.total_cmp(b));
        println!("{n:>9} {:>14.1}", times[2]);
        report.insert(format!("rebuild_ms_{n}"), times[2].into());
        {
            // Incremental: one agent changed, the next snapshot derived from the last.
            let prev = v.build("proxy-self", &local, 1, true);
            let mut inc: Vec<f64> = (0..101)
                .map(|i| {
                    let changed = ringpeer::proxy::control::view::Affected::agent(&format!("agent-{}", i * 7 % n));
                    let t0 = Instant::now();
                    black_box(v.update(&prev, &changed, "proxy-self", &local, 2, true));
                    t0.elapsed().as_secs_f64() * 1e6
                })
                .collect();
            inc.sort_by(|a, b| a.total_cmp(b));
            println!("{n:>9} {:>14} incremental update (one agent): p50 {:.1} us, p99 {:.1} us", "", inc[50], inc[99]);
            report.insert(format!("incremental_us_p50_{n}"), inc[50].into());
            report.insert(format!("incremental_us_p99_{n}"), inc[99].into());
        }
        if n == 1_000_000 {
            let table = v.build("proxy-self", &local, 99, true);
            let mut rng = rand::rngs::StdRng::seed_from_u64(1);
            let keys: Vec<String> = (0..4096).map(|_| format!("agent-{}", rng.gen_range(0..n))).collect();
            let mut h = hdrhistogram::Histogram::<u64>::new(3).unwrap();
            const BATCH: usize = 64;
            for round in 0..20_000 {
                let base = (round * BATCH) % (keys.len() - BATCH);
                let t0 = Instant::now();
                for k in &keys[base..base + BATCH] {
                    black_box(table.get(black_box(k)));
                }
                let per_op = t0.elapsed().as_nanos() as u64 / BATCH as u64;
                h.record(per_op.max(1)).ok();
            }
            println!(
                "lookup in a 1M-agent table: p50 {} ns/op, p99 {} ns/op",
                h.value_at_quantile(0.5),
                h.value_at_quantile(0.99)
            );
            report.insert("lookup_ns_p50_1m".into(), h.value_at_quantile(0.5).into());
            report.insert("lookup_ns_p99_1m".into(), h.value_at_quantile(0.99).into());
        }
    }
    if let Some(p) = json_out {
        std::fs::write(&p, serde_json::to_string_pretty(&report).unwrap()).unwrap();
    }
}
