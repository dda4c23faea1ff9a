//! `ringpeer bench`: the load generator. In one invocation it measures
//! direct TCP and the path client → proxy → agent → target on 127.0.0.1:
//! 64-byte ping-pong latency (HDR percentiles) and single-stream bulk
//! throughput, repeated `--runs` times; it prints medians and the ratio of
//! each figure to direct, and writes JSON.
//!
//! Invariant: direct and proxied runs alternate within one process, against
//! the same targets, so machine noise hits both alike.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;

use super::fleet::{agent_config, proxy_config, AgentHandle, CertDir, ProxyHandle};
use super::load::{bulk_direct, bulk_proxy, gbps, pingpong_direct, pingpong_direct_blocking, pingpong_proxy};
use super::targets::{self, Kind};
use crate::forward::Client;
use crate::transport::h2conf::H2Tuning;
use crate::wire::DialTarget;

/// Options of `ringpeer bench`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchOpts {
    /// Repetitions of every workload; medians are reported.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Ping-pong round trips per run.
    #[arg(long, default_value_t = 20_000)]
    pub iters: usize,
    /// Ping-pong message size, bytes.
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Bulk bytes per run, MiB.
    #[arg(long, default_value_t = 1024)]
    pub bulk_mib: u64,
    /// Proxy shards.
    #[arg(long, default_value_t = 1)]
    pub shards: usize,
    /// HTTP/2 settings on every link: `tuned` (ringpeer's defaults) or
    /// `h2-defaults` (the h2 crate's 64 KiB windows and 16 KiB frames).
    #[arg(long, default_value = "tuned", value_parser = ["tuned", "h2-defaults"])]
    pub h2: String,
    /// Write the JSON report here (default: stdout only).
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Latency percentiles of one path, microseconds (one-way = round trip / 2).
#[derive(Serialize, Debug, Clone, Default)]
pub struct Latency {
    /// Median.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Maximum.
    pub max_us: f64,
}

/// Medians of one path.
#[derive(Serialize, Debug, Clone, Default)]
pub struct PathReport {
    /// One-way latency (RTT/2), median over runs of each percentile.
    pub one_way: Latency,
    /// Round-trip latency, median over runs of each percentile.
    pub round_trip: Latency,
    /// Single-stream bulk throughput, Gbit/s (median over runs).
    pub bulk_gbps: f64,
}

/// The whole report.
#[derive(Serialize, Debug)]
pub struct Report {
    /// Options used.
    pub runs: usize,
    /// Ping-pong iterations per run.
    pub iters: usize,
    /// Message size.
    pub size: usize,
    /// Bulk MiB per run.
    pub bulk_mib: u64,
    /// Proxy shards.
    pub shards: usize,
    /// HTTP/2 profile.
    pub h2: String,
    /// Blocking client and blocking echo server, no glommio anywhere
    /// (reference for absolute figures, latency only).
    pub direct_blocking: Latency,
    /// Direct TCP, same glommio client as the proxied path.
    pub direct: PathReport,
    /// client → proxy → agent → target.
    pub proxy: PathReport,
    /// proxy / direct for latency p50, p99, p99.9; direct / proxy for throughput.
    pub ratio: Ratios,
}

/// Ratios of the proxied path to direct.
#[derive(Serialize, Debug)]
pub struct Ratios {
    /// p50 latency, proxy / direct.
    pub p50: f64,
    /// p99 latency, proxy / direct.
    pub p99: f64,
    /// p99.9 latency, proxy / direct.
    pub p999: f64,
    /// Throughput, proxy / direct.
    pub bulk: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        0.0
    } else {
        v[v.len() / 2]
    }
}

#[derive(Default)]
struct Samples {
    p: [Vec<f64>; 4],
    bulk: Vec<f64>,
}

impl Samples {
    fn add(&mut self, h: &hdrhistogram::Histogram<u64>) {
        for (i, q) in [0.5, 0.99, 0.999].iter().enumerate() {
            self.p[i].push(h.value_at_quantile(*q) as f64 / 1000.0);
        }
        self.p[3].push(h.max() as f64 / 1000.0);
    }

    fn report(self) -> PathReport {
        let [p50, p99, p999, max] = self.p.map(median);
        let rt = Latency { p50_us: p50, p99_us: p99, p999_us: p999, max_us: max };
        let ow = Latency { p50_us: p50 / 2.0, p99_us: p99 / 2.0, p999_us: p999 / 2.0, max_us: max / 2.0 };
        PathReport { one_way: ow, round_trip: rt, bulk_gbps: median(self.bulk) }
    }
}

/// Runs the benchmark and prints the report.
pub fn run(o: BenchOpts) -> anyhow::Result<()> {
    let certs = CertDir::temp()?;
    let dir = certs.path.clone();
    let echo = targets::spawn(Kind::Echo)?;
    let sink = targets::spawn(Kind::Sink)?;
    let h2 = if o.h2 == "tuned" { H2Tuning::default() } else { H2Tuning::h2_crate_defaults() };
    let mut pc = proxy_config(&dir, "proxy-a", o.shards);
    pc.h2 = h2.clone();
    let proxy = ProxyHandle::start(pc)?;
    let mut ac = agent_config(&dir, "agent-1", &[proxy.tunnel_addr], &[("echo", echo.addr), ("sink", sink.addr)]);
    ac.h2 = h2.clone();
    let _agent = AgentHandle::start(ac)?;
    proxy.wait_tunnels(1, Duration::from_secs(10))?;
    let tls = crate::forward::client_tls(&dir, "client")?;
    let (addr, echo_addr, sink_addr) = (proxy.client_addr.to_string(), echo.addr, sink.addr);
    let opts = o.clone();
    let client_h2 = h2.clone();
    let (direct, via) = crate::runtime::block_on("bench-client", move || async move {
        let c = Client::connect(&addr, &tls, &client_h2).await.map_err(|e| e.to_string())?;
        let (echo_t, sink_t) = (DialTarget::parse("agent-1/echo").unwrap(), DialTarget::parse("agent-1/sink").unwrap());
        let (mut d, mut p) = (Samples::default(), Samples::default());
        let bytes = opts.bulk_mib << 20;
        // Warm-up: connections, TLS sessions, allocator.
        pingpong_proxy(&c, &echo_t, 1000, opts.size).await.map_err(|s| s.to_string())?;
        pingpong_direct(echo_addr, 1000, opts.size).await.map_err(|s| s.to_string())?;
        for run in 0..opts.runs {
            let hd = pingpong_direct(echo_addr, opts.iters, opts.size).await.map_err(|s| s.to_string())?;
            let hp = pingpong_proxy(&c, &echo_t, opts.iters, opts.size).await.map_err(|s| s.to_string())?;
            d.add(&hd);
            p.add(&hp);
            let bd = bulk_direct(sink_addr, bytes).await.map_err(|s| s.to_string())?;
            let bp = bulk_proxy(&c, &sink_t, bytes).await.map_err(|s| s.to_string())?;
            d.bulk.push(gbps(bytes, bd));
            p.bulk.push(gbps(bytes, bp));
            eprintln!(
                "run {}: rtt p50 direct {:.1} us proxy {:.1} us; bulk direct {:.2} Gbit/s proxy {:.2} Gbit/s",
                run + 1,
                hd.value_at_quantile(0.5) as f64 / 1000.0,
                hp.value_at_quantile(0.5) as f64 / 1000.0,
                gbps(bytes, bd),
                gbps(bytes, bp)
            );
        }
        Ok::<_, String>((d.report(), p.report()))
    })?
    .map_err(anyhow::Error::msg)
    .context("benchmark failed")?;
    let mut blocking = Samples::default();
    let blocking_echo = targets::spawn_blocking_echo()?;
    for _ in 0..o.runs {
        blocking.add(&pingpong_direct_blocking(blocking_echo, o.iters, o.size)?);
    }
    let direct_blocking = blocking.report().one_way;
    let ratio = Ratios {
        p50: via.one_way.p50_us / direct.one_way.p50_us,
        p99: via.one_way.p99_us / direct.one_way.p99_us,
        p999: via.one_way.p999_us / direct.one_way.p999_us,
        bulk: via.bulk_gbps / direct.bulk_gbps,
    };
    let r = Report {
        runs: o.runs,
        iters: o.iters,
        size: o.size,
        bulk_mib: o.bulk_mib,
        shards: o.shards,
        h2: o.h2.clone(),
        direct_blocking,
        direct,
        proxy: via,
        ratio,
    };
    println!(
        "{:<34} {:>9} {:>9} {:>9} {:>9} {:>12}",
        "path (one-way = RTT/2, medians)", "p50 us", "p99 us", "p99.9 us", "max us", "bulk Gbit/s"
    );
    let b = &r.direct_blocking;
    println!(
        "{:<34} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>12}",
        "direct TCP, blocking client+echo", b.p50_us, b.p99_us, b.p999_us, b.max_us, "-"
    );
    for (name, p) in [("direct TCP, glommio client", &r.direct), ("client→proxy→agent→target (mTLS)", &r.proxy)] {
        let l = &p.one_way;
        println!(
            "{name:<34} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>12.2}",
            l.p50_us, l.p99_us, l.p999_us, l.max_us, p.bulk_gbps
        );
    }
    println!(
        "ratio proxy/direct: latency p50 {:.2}x  p99 {:.2}x  p99.9 {:.2}x;  throughput {:.2}x",
        r.ratio.p50, r.ratio.p99, r.ratio.p999, r.ratio.bulk
    );
    let json = serde_json::to_string_pretty(&r)?;
    if let Some(p) = &o.json {
        std::fs::write(p, &json).with_context(|| format!("cannot write {}", p.display()))?;
    } else {
        println!("{json}");
    }
    drop(_agent);
    proxy.stop()
}
