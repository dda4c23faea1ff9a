//! Route lookup and snapshot rebuild cost.
//!
//! `cargo bench --bench route_lookup [-- --json FILE] [--rounds N]`:
//!
//! 1. The control thread's cluster view with N agents spread over 16
//!    proxies: the full snapshot rebuild (median of 5) and the incremental
//!    snapshot for one changed agent (`ClusterView::update`, p50/p99 of
//!    101) at 10k / 100k / 1M agents.
//! 2. At 1M agents, candidate agent-map structures built side by side from
//!    the same entries, timed in interleaved rounds (A, B, C, … then again,
//!    the order rotated each round), so the machine's drift (a shared 2-core
//!    VM whose speed varies by 2× from run to run) hits all alike. Per
//!    round and candidate: lookups of random existing agents (ns/op over
//!    batches of 64; the round's p50), the copy-and-change of one agent
//!    (µs, the round's median of 21, dropping the copy included) and, in
//!    the first rounds, a full build. Reported: the median over rounds of
//!    each, and the median (min, max) over rounds of the per-round ratio
//!    to the `imbl_siphash` structure (what the snapshots used before).
//!
//! `lookup_ns_p50_1m` / `lookup_ns_p99_1m` are the production map's
//! (`AgentMap`, `sharded_65536`) HDR percentiles over all its lookup
//! batches.

use std::collections::HashMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use ringpeer::proxy::control::view::{Affected, ClusterView, LocalTunnels};
use ringpeer::route::agents::{AgentMap, ShardedMap};
use ringpeer::route::model::{AgentRoute, ProxyInfo};
use ringpeer::route::AgentRoutes;
use serde_json::{json, Map, Value};

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

/// An agent map under comparison.
trait Candidate: Clone {
    fn build(entries: &[(String, AgentRoutes)]) -> Self;
    fn lookup(&self, agent: &str) -> Option<&AgentRoutes>;
    fn set(&mut self, agent: &str, r: AgentRoutes);
}

type ImblSip = imbl::HashMap<String, AgentRoutes>;
type ImblFold =
    imbl::GenericHashMap<String, AgentRoutes, foldhash::fast::RandomState, imbl::shared_ptr::DefaultSharedPtr>;

macro_rules! imbl_candidate {
    ($t:ty) => {
        impl Candidate for $t {
            fn build(e: &[(String, AgentRoutes)]) -> Self {
                e.iter().cloned().collect()
            }
            fn lookup(&self, a: &str) -> Option<&AgentRoutes> {
                self.get(a)
            }
            fn set(&mut self, a: &str, r: AgentRoutes) {
                self.insert(a.to_string(), r);
            }
        }
    };
}
imbl_candidate!(ImblSip);
imbl_candidate!(ImblFold);

impl<const T: u32, const M: u32> Candidate for ShardedMap<T, M> {
    fn build(e: &[(String, AgentRoutes)]) -> Self {
        e.iter().map(|(k, v)| (k, v.clone())).collect()
    }
    fn lookup(&self, a: &str) -> Option<&AgentRoutes> {
        self.get(a)
    }
    fn set(&mut self, a: &str, r: AgentRoutes) {
        self.insert(a, r);
    }
}

/// One round's figures for one candidate.
trait Rounds {
    /// p50 ns/op of this round's lookup batches (also recorded in `all`).
    fn lookups(&self, keys: &[String], batches: usize, all: &mut hdrhistogram::Histogram<u64>) -> f64;
    /// Median µs of copy-and-change of one agent (copy dropped inside).
    fn updates(&self, keys: &[String], value: &AgentRoutes, round: usize) -> f64;
    /// ms of a full build.
    fn rebuild(&self, entries: &[(String, AgentRoutes)]) -> f64;
}

struct Held<C>(C);

impl<C: Candidate> Rounds for Held<C> {
    fn lookups(&self, keys: &[String], batches: usize, all: &mut hdrhistogram::Histogram<u64>) -> f64 {
        const BATCH: usize = 64;
        let mut h = hdrhistogram::Histogram::<u64>::new(3).unwrap();
        for b in 0..batches {
            let base = (b * 61 * BATCH) % (keys.len() - BATCH);
            let t0 = Instant::now();
            for k in &keys[base..base + BATCH] {
                // The dial path reads the routes at once: so does this.
                black_box(self.0.lookup(black_box(k)).map(|r| r.moving));
            }
            let per_op = (t0.elapsed().as_nanos() as u64 / BATCH as u64).max(1);
            h.record(per_op).ok();
            all.record(per_op).ok();
        }
        h.value_at_quantile(0.5) as f64
    }

    fn updates(&self, keys: &[String], value: &AgentRoutes, round: usize) -> f64 {
        let mut t: Vec<f64> = (0..21)
            .map(|i| {
                let k = &keys[(round * 21 + i) * 13 % keys.len()];
                let v = value.clone();
                let t0 = Instant::now();
                let mut next = self.0.clone();
                next.set(k, v);
                drop(black_box(next));
                t0.elapsed().as_secs_f64() * 1e6
            })
            .collect();
        t.sort_by(|a, b| a.total_cmp(b));
        t[10]
    }

    fn rebuild(&self, entries: &[(String, AgentRoutes)]) -> f64 {
        let t0 = Instant::now();
        drop(black_box(C::build(entries)));
        t0.elapsed().as_secs_f64() * 1e3
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

/// Median and range over rounds of each candidate's figure, and of its
/// per-round ratio to candidate 0.
fn summarize(names: &[&str], per_round: &[Vec<f64>], unit: &str) -> Value {
    let mut out = Map::new();
    for (i, name) in names.iter().enumerate() {
        let mut v: Vec<f64> = per_round.iter().map(|r| r[i]).collect();
        let mut ratio: Vec<f64> = per_round.iter().map(|r| r[i] / r[0]).collect();
        let (m, rm) = (median(&mut v), median(&mut ratio));
        println!(
            "  {name:<16} median {m:>10.2} {unit}   ratio to {} {rm:.3} (min {:.3}, max {:.3})",
            names[0],
            ratio[0],
            ratio[ratio.len() - 1]
        );
        out.insert(
            name.to_string(),
            json!({"median": m, "ratio_median": rm, "ratio_min": ratio[0], "ratio_max": ratio[ratio.len() - 1]}),
        );
    }
    Value::Object(out)
}

fn compare(v: &ClusterView, local: &LocalTunnels, rounds: usize, report: &mut Map<String, Value>) {
    let n = v.agents.len();
    let table = v.build("proxy-self", local, 99, true);
    let entries: Vec<(String, AgentRoutes)> = table.agents.iter().map(|(k, r)| (k.to_string(), r.clone())).collect();
    drop(table);
    let names = ["imbl_siphash", "imbl_foldhash", "sharded_4096", "sharded_16384", "sharded_65536"];
    let held: Vec<Box<dyn Rounds>> = vec![
        Box::new(Held(ImblSip::build(&entries))),
        Box::new(Held(ImblFold::build(&entries))),
        Box::new(Held(ShardedMap::<6, 6>::build(&entries))),
        Box::new(Held(ShardedMap::<7, 7>::build(&entries))),
        Box::new(Held(AgentMap::build(&entries))),
    ];
    const PRODUCTION: usize = 4;
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let keys: Vec<String> = (0..4096).map(|_| format!("agent-{}", rng.gen_range(0..n))).collect();
    let mut value = entries[0].1.clone();
    value.moving = !value.moving;
    let mut all: Vec<_> = names.iter().map(|_| hdrhistogram::Histogram::<u64>::new(3).unwrap()).collect();
    let c = names.len();
    // Lookups: short slices (100 batches, ~1 ms) so that the machine's
    // drift is the same for every candidate within a round.
    let look: Vec<Vec<f64>> = (0..rounds * 10)
        .map(|round| {
            let mut l = vec![0.0; c];
            for j in 0..c {
                let i = (round + j) % c;
                l[i] = held[i].lookups(&keys, 100, &mut all[i]);
            }
            l
        })
        .collect();
    let upd: Vec<Vec<f64>> = (0..rounds)
        .map(|round| {
            let mut u = vec![0.0; c];
            for j in 0..c {
                let i = (round + j) % c;
                u[i] = held[i].updates(&keys, &value, round);
            }
            u
        })
        .collect();
    let reb: Vec<Vec<f64>> = (0..3)
        .map(|round| {
            let mut b = vec![0.0; c];
            for j in 0..c {
                let i = (round + j) % c;
                b[i] = held[i].rebuild(&entries);
            }
            b
        })
        .collect();
    println!("interleaved at {n} agents:");
    println!(" lookup p50 (ns/op, {} rounds of 100 batches of 64):", look.len());
    report.insert("lookup_ns_p50_rounds".into(), summarize(&names, &look, "ns/op"));
    println!(" copy-and-change one agent (us, {} rounds of 21):", upd.len());
    report.insert("update_one_us_rounds".into(), summarize(&names, &upd, "us"));
    println!(" full build (ms, {} rounds):", reb.len());
    report.insert("build_ms_rounds".into(), summarize(&names, &reb, "ms"));
    let hist: Map<String, Value> = names
        .iter()
        .zip(&all)
        .map(|(n, h)| (n.to_string(), json!({"p50": h.value_at_quantile(0.5), "p99": h.value_at_quantile(0.99)})))
        .collect();
    report.insert("lookup_ns_hdr_all_rounds".into(), Value::Object(hist));
    let p = &all[PRODUCTION];
    println!(
        "lookup in a 1M-agent table (AgentMap, all rounds): p50 {} ns/op, p99 {} ns/op",
        p.value_at_quantile(0.5),
        p.value_at_quantile(0.99)
    );
    report.insert("lookup_ns_p50_1m".into(), p.value_at_quantile(0.5).into());
    report.insert("lookup_ns_p99_1m".into(), p.value_at_quantile(0.99).into());
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| args.iter().skip_while(|a| *a != name).nth(1).cloned();
    let json_out = arg("--json");
    let rounds: usize = arg("--rounds").and_then(|r| r.parse().ok()).unwrap_or(30);
    let local = LocalTunnels::new();
    let mut report = Map::new();
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
        let rebuild = median(&mut times);
        println!("{n:>9} {rebuild:>14.1}");
        report.insert(format!("rebuild_ms_{n}"), rebuild.into());
        {
            // Incremental: one agent changed, the next snapshot derived from the last.
            let prev = v.build("proxy-self", &local, 1, true);
            let mut inc: Vec<f64> = (0..101)
                .map(|i| {
                    let changed = Affected::agent(&format!("agent-{}", i * 7 % n));
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
            compare(&v, &local, rounds, &mut report);
        }
    }
    if let Some(p) = json_out {
        std::fs::write(&p, serde_json::to_string_pretty(&report).unwrap()).unwrap();
    }
}
