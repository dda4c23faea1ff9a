//! `ringpeer bench`: the load generator. In one invocation it measures, on
//! 127.0.0.1, direct TCP, the one-proxy path (client → B → agent → target)
//! and the two-proxy path (client → A → peer link → B → agent → target):
//! 64-byte ping-pong latency (HDR percentiles), bulk throughput over 1 and
//! 16 streams, and stream-setup rate, repeated `--runs` times; it prints
//! medians and each figure's ratio to direct, and writes JSON.
//!
//! Invariant: direct and proxied runs alternate within one process, against
//! the same targets, so machine noise hits both alike.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;

use super::fleet::{agent_config, proxy_config, AgentHandle, CertDir, ProxyHandle};
use super::load::{
    bulk_direct, bulk_direct_n, bulk_proxy, bulk_proxy_n, gbps, pingpong_direct, pingpong_direct_blocking,
    pingpong_proxy, setup_rate_direct, setup_rate_proxy,
};
use super::target::Kind;
use crate::client::Client;
use crate::transport::h2conf::H2Tuning;
use crate::wire::DialTarget;

/// Options of `ringpeer bench`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchOpts {
    /// Repetitions of every workload; medians are reported.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Ping-pong round trips per run.
    #[arg(long, default_value_t = 10_000)]
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
    /// Advertise only shard 0's peer port (peer streams then cross shards
    /// on the receiving proxy), to measure what shard-aware routing saves.
    #[arg(long)]
    pub no_shard_aware: bool,
    /// Measure an external TCP path instead of the fleet (e.g. a haproxy
    /// chain): its echo front; needs --external-sink, --direct-echo, --direct-sink.
    #[arg(long)]
    pub external_echo: Option<String>,
    /// The external path's sink front.
    #[arg(long)]
    pub external_sink: Option<String>,
    /// Direct address of the echo target behind the external path.
    #[arg(long)]
    pub direct_echo: Option<String>,
    /// Direct address of the sink target behind the external path.
    #[arg(long)]
    pub direct_sink: Option<String>,
    /// Name of the external path in the report.
    #[arg(long, default_value = "external")]
    pub label: String,
    /// Write the JSON report here (default: stdout only).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Memory at scale instead (`super::scale`): hold this many agent
    /// tunnels (and `--streams` idle streams) from this one process against
    /// a real proxy process, and report RSS per tunnel and per stream.
    #[arg(long)]
    pub tunnels: Option<usize>,
    /// With `--tunnels`: open idle streams in each phase.
    #[arg(long, default_value_t = 1000)]
    pub streams: usize,
    /// With `--tunnels`: `proxy`, `agent` or `both` phases.
    #[arg(long, default_value = "both", value_parser = ["both", "proxy", "agent"])]
    pub scale_phase: String,
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
    /// 16-stream aggregate bulk throughput, Gbit/s (median over runs).
    pub bulk16_gbps: f64,
    /// Streams set up per second (open, 1-byte echo, close; 16 loops).
    pub setup_per_s: f64,
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
    /// Whether peer streams landed on the owning shard directly.
    pub shard_aware: bool,
    /// Blocking client and blocking echo server, no glommio anywhere
    /// (reference for absolute figures, latency only).
    pub direct_blocking: Latency,
    /// Direct TCP, same glommio client as the proxied path.
    pub direct: PathReport,
    /// client → proxy → agent → target.
    pub proxy: PathReport,
    /// client → proxy A → peer link → proxy B → agent → target.
    pub two_proxy: PathReport,
    /// One-proxy path relative to direct.
    pub ratio: Ratios,
    /// Two-proxy path relative to direct.
    pub ratio_two_proxy: Ratios,
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
    /// 16-stream throughput, proxy / direct.
    pub bulk16: f64,
    /// Setup rate, proxy / direct.
    pub setup: f64,
}

impl Ratios {
    pub(crate) fn of(p: &PathReport, d: &PathReport) -> Ratios {
        Ratios {
            p50: p.one_way.p50_us / d.one_way.p50_us,
            p99: p.one_way.p99_us / d.one_way.p99_us,
            p999: p.one_way.p999_us / d.one_way.p999_us,
            bulk: p.bulk_gbps / d.bulk_gbps,
            bulk16: p.bulk16_gbps / d.bulk16_gbps,
            setup: p.setup_per_s / d.setup_per_s,
        }
    }
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        0.0
    } else {
        v[v.len() / 2]
    }
}

#[derive(Default)]
pub(crate) struct Samples {
    pub(crate) p: [Vec<f64>; 4],
    pub(crate) bulk: Vec<f64>,
    pub(crate) bulk16: Vec<f64>,
    pub(crate) setup: Vec<f64>,
}

impl Samples {
    pub(crate) fn add(&mut self, h: &hdrhistogram::Histogram<u64>) {
        for (i, q) in [0.5, 0.99, 0.999].iter().enumerate() {
            self.p[i].push(h.value_at_quantile(*q) as f64 / 1000.0);
        }
        self.p[3].push(h.max() as f64 / 1000.0);
    }

    pub(crate) fn report(self) -> PathReport {
        let [p50, p99, p999, max] = self.p.map(median);
        let rt = Latency { p50_us: p50, p99_us: p99, p999_us: p999, max_us: max };
        let ow = Latency { p50_us: p50 / 2.0, p99_us: p99 / 2.0, p999_us: p999 / 2.0, max_us: max / 2.0 };
        PathReport {
            one_way: ow,
            round_trip: rt,
            bulk_gbps: median(self.bulk),
            bulk16_gbps: median(self.bulk16),
            setup_per_s: median(self.setup),
        }
    }
}

/// Runs the benchmark and prints the report.
pub fn run(o: BenchOpts) -> anyhow::Result<()> {
    if o.external_echo.is_some() {
        return super::bench_external::run(&o);
    }
    if let Some(n) = o.tunnels {
        return super::scale::run(&o, n);
    }
    let certs = CertDir::temp()?;
    let dir = certs.path.clone();
    let echo = super::target::spawn(Kind::Echo)?;
    let sink = super::target::spawn(Kind::Sink)?;
    let h2 = if o.h2 == "tuned" { H2Tuning::default() } else { H2Tuning::h2_crate_defaults() };
    // Two proxies sharing one route store; the agent keeps one tunnel, to B.
    let store: std::sync::Arc<dyn crate::route::store::StoreFactory> =
        std::sync::Arc::new(crate::route::store::MemoryStore::new(10_000));
    let start = |id: &str| -> anyhow::Result<ProxyHandle> {
        let mut pc = proxy_config(&dir, id, o.shards);
        pc.h2 = h2.clone();
        pc.strategy = crate::route::model::Strategy::ProxyPeering { agent_connection_count: 1 };
        pc.shard_aware_peering = !o.no_shard_aware;
        let mut l = crate::proxy::Listeners::bind(&pc)?;
        if id == "proxy-b" && l.tunnel.len() > 1 {
            // Pin the agent's tunnel to B's last shard, so a peer stream
            // that lands on shard 0 must cross shards.
            for t in l.tunnel.iter_mut().take(o.shards - 1) {
                *t = None;
            }
        }
        ProxyHandle::start_full(pc, l, Some(store.clone()))
    };
    let b = start("proxy-b")?;
    let a = start("proxy-a")?;
    let mut ac = agent_config(&dir, "agent-1", &[b.tunnel_addr], &[("echo", echo.addr), ("sink", sink.addr)]);
    ac.h2 = h2.clone();
    let agent = AgentHandle::start(ac)?;
    b.wait_tunnels(1, Duration::from_secs(10))?;
    let t0 = std::time::Instant::now();
    while a.routes().get("agent-1").is_none_or(|r| r.remote.is_empty()) {
        anyhow::ensure!(t0.elapsed() < Duration::from_secs(10), "proxy-a never learned the route");
        std::thread::sleep(Duration::from_millis(10));
    }
    let tls = crate::client::client_tls(&dir, "client")?;
    let (addr_a, addr_b, echo_addr, sink_addr) =
        (a.client_addr.to_string(), b.client_addr.to_string(), echo.addr, sink.addr);
    let opts = o.clone();
    let client_h2 = h2.clone();
    let (direct, one, two) = crate::runtime::block_on("bench-client", move || async move {
        let e = |s: crate::wire::error::Error| s.to_string();
        let cb = Client::connect(&addr_b, &tls, &client_h2).await.map_err(|e| e.to_string())?;
        let ca = Client::connect(&addr_a, &tls, &client_h2).await.map_err(|e| e.to_string())?;
        let (echo_t, sink_t) = (DialTarget::parse("agent-1/echo").unwrap(), DialTarget::parse("agent-1/sink").unwrap());
        let (mut d, mut p1, mut p2) = (Samples::default(), Samples::default(), Samples::default());
        let bytes = opts.bulk_mib << 20;
        let each = (bytes / 16).max(1 << 20);
        // Warm-up: connections, peer link, TLS sessions, allocator.
        pingpong_proxy(&cb, &echo_t, 500, opts.size).await.map_err(e)?;
        pingpong_proxy(&ca, &echo_t, 500, opts.size).await.map_err(e)?;
        pingpong_direct(echo_addr, 500, opts.size).await.map_err(e)?;
        for run in 0..opts.runs {
            let hd = pingpong_direct(echo_addr, opts.iters, opts.size).await.map_err(e)?;
            let h1 = pingpong_proxy(&cb, &echo_t, opts.iters, opts.size).await.map_err(e)?;
            let h2p = pingpong_proxy(&ca, &echo_t, opts.iters, opts.size).await.map_err(e)?;
            d.add(&hd);
            p1.add(&h1);
            p2.add(&h2p);
            d.bulk.push(gbps(bytes, bulk_direct(sink_addr, bytes).await.map_err(e)?));
            p1.bulk.push(gbps(bytes, bulk_proxy(&cb, &sink_t, bytes).await.map_err(e)?));
            p2.bulk.push(gbps(bytes, bulk_proxy(&ca, &sink_t, bytes).await.map_err(e)?));
            d.bulk16.push(gbps(each * 16, bulk_direct_n(sink_addr, each, 16).await.map_err(e)?));
            p1.bulk16.push(gbps(each * 16, bulk_proxy_n(&cb, &sink_t, each, 16).await.map_err(e)?));
            p2.bulk16.push(gbps(each * 16, bulk_proxy_n(&ca, &sink_t, each, 16).await.map_err(e)?));
            d.setup.push(setup_rate_direct(echo_addr, 2000, 16).await.map_err(e)?);
            p1.setup.push(setup_rate_proxy(&cb, &echo_t, 2000, 16).await.map_err(e)?);
            p2.setup.push(setup_rate_proxy(&ca, &echo_t, 2000, 16).await.map_err(e)?);
            eprintln!(
                "run {}: rtt p50 direct {:.1} / 1 proxy {:.1} / 2 proxies {:.1} us; bulk {:.2} / {:.2} / {:.2} Gbit/s",
                run + 1,
                hd.value_at_quantile(0.5) as f64 / 1000.0,
                h1.value_at_quantile(0.5) as f64 / 1000.0,
                h2p.value_at_quantile(0.5) as f64 / 1000.0,
                d.bulk[run],
                p1.bulk[run],
                p2.bulk[run]
            );
        }
        Ok::<_, String>((d.report(), p1.report(), p2.report()))
    })?
    .map_err(anyhow::Error::msg)
    .context("benchmark failed")?;
    eprintln!(
        "proxy-b: {} dials, {} crossed shards (shard-aware peering {})",
        b.metrics.sum(|s| s.dials.get()),
        b.metrics.sum(|s| s.dials_cross_shard.get()),
        if o.no_shard_aware { "off" } else { "on" }
    );
    let mut blocking = Samples::default();
    let blocking_echo = super::target::spawn_blocking_echo()?;
    for _ in 0..o.runs {
        blocking.add(&pingpong_direct_blocking(blocking_echo, o.iters, o.size)?);
    }
    let r = Report {
        runs: o.runs,
        iters: o.iters,
        size: o.size,
        bulk_mib: o.bulk_mib,
        shards: o.shards,
        h2: o.h2.clone(),
        shard_aware: !o.no_shard_aware,
        direct_blocking: blocking.report().one_way,
        ratio: Ratios::of(&one, &direct),
        ratio_two_proxy: Ratios::of(&two, &direct),
        direct,
        proxy: one,
        two_proxy: two,
    };
    print_report(&r);
    let json = serde_json::to_string_pretty(&r)?;
    if let Some(p) = &o.json {
        std::fs::write(p, &json).with_context(|| format!("cannot write {}", p.display()))?;
    } else {
        println!("{json}");
    }
    drop(agent);
    a.stop()?;
    b.stop()
}

fn print_report(r: &Report) {
    println!(
        "{:<40} {:>8} {:>8} {:>9} {:>9} {:>9} {:>10} {:>9}",
        "path (one-way = RTT/2, medians)", "p50 us", "p99 us", "p99.9 us", "max us", "1x Gb/s", "16x Gb/s", "setup/s"
    );
    let b = &r.direct_blocking;
    println!(
        "{:<40} {:>8.1} {:>8.1} {:>9.1} {:>9.1}",
        "direct TCP, blocking client+echo", b.p50_us, b.p99_us, b.p999_us, b.max_us
    );
    for (name, p) in [
        ("direct TCP, glommio client", &r.direct),
        ("client→B→agent→target (mTLS)", &r.proxy),
        ("client→A→peer→B→agent→target (mTLS)", &r.two_proxy),
    ] {
        let l = &p.one_way;
        println!(
            "{name:<40} {:>8.1} {:>8.1} {:>9.1} {:>9.1} {:>9.2} {:>10.2} {:>9.0}",
            l.p50_us, l.p99_us, l.p999_us, l.max_us, p.bulk_gbps, p.bulk16_gbps, p.setup_per_s
        );
    }
    for (name, x) in [("1 proxy", &r.ratio), ("2 proxies", &r.ratio_two_proxy)] {
        println!(
            "ratio {name}/direct: latency p50 {:.2}x p99 {:.2}x p99.9 {:.2}x; throughput 1x {:.2}x 16x {:.2}x; setup {:.2}x",
            x.p50, x.p99, x.p999, x.bulk, x.bulk16, x.setup
        );
    }
}
