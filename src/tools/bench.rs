//! `ringpeer bench`: the load generator. In one invocation it measures, on
//! 127.0.0.1, direct TCP, the one-proxy path (client → B → agent → target)
//! and the two-proxy path (client → A → peer link → B → agent → target):
//! 64-byte ping-pong latency (HDR percentiles), bulk throughput over 1 and
//! 16 streams, and stream-setup rate, repeated `--runs` times; it prints
//! medians and each figure's ratio to direct, and writes JSON. With
//! `--shards 2` or more it also measures the other-shard path (the client
//! enters on a shard that does not hold the tunnel); with `--plot DIR` it
//! writes the report and SVG plots there (`super::plot`).
//!
//! Invariant: direct and proxied runs alternate within one process, against
//! the same targets, so machine noise hits both alike.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use hdrhistogram::Histogram;
use serde::Serialize;

use super::fleet::{agent_config, proxy_config, AgentHandle, CertDir, ProxyHandle};
use super::load::{
    bulk_direct, bulk_direct_n, bulk_proxy, bulk_proxy_n, gbps, pingpong_direct, pingpong_direct_blocking,
    pingpong_proxy, setup_rate_direct, setup_rate_proxy,
};
use super::plot::Series;
use super::target::Kind;
use crate::client::Client;
use crate::transport::h2conf::H2Tuning;
use crate::wire::error::Error;
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
    /// Also write `report.json`, `latency.svg` (percentile curves per path)
    /// and `throughput.svg` (bulk bars beside the baselines) into DIR.
    #[arg(long, value_name = "DIR")]
    pub plot: Option<PathBuf>,
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
    /// One-way latency curve, `[quantile, µs]` at
    /// [`super::plot::CURVE_QUANTILES`], over every run's samples together.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub curve: Vec<[f64; 2]>,
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
    /// client → proxy → agent → target, the client on the shard that
    /// holds the tunnel.
    pub proxy: PathReport,
    /// The same, the client on another shard (`--shards` 2 or more): the
    /// stream crosses shards inside the proxy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub other_shard: Option<PathReport>,
    /// client → proxy A → peer link → proxy B → agent → target.
    pub two_proxy: PathReport,
    /// One-proxy path relative to direct.
    pub ratio: Ratios,
    /// Two-proxy path relative to direct.
    pub ratio_two_proxy: Ratios,
    /// Other-shard path relative to direct.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio_other_shard: Option<Ratios>,
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
    /// Every run's round trips together, for the percentile curve.
    pub(crate) all: Option<hdrhistogram::Histogram<u64>>,
}

impl Samples {
    pub(crate) fn add(&mut self, h: &hdrhistogram::Histogram<u64>) {
        for (i, q) in [0.5, 0.99, 0.999].iter().enumerate() {
            self.p[i].push(h.value_at_quantile(*q) as f64 / 1000.0);
        }
        self.p[3].push(h.max() as f64 / 1000.0);
        match &mut self.all {
            // Same bounds (`load::histogram`), so adding cannot fail.
            Some(all) => all.add(h).expect("histograms share their bounds"),
            None => self.all = Some(h.clone()),
        }
    }

    pub(crate) fn report(self) -> PathReport {
        let curve = match &self.all {
            Some(h) => {
                super::plot::CURVE_QUANTILES.iter().map(|q| [*q, h.value_at_quantile(*q) as f64 / 2000.0]).collect()
            }
            None => Vec::new(),
        };
        let [p50, p99, p999, max] = self.p.map(median);
        let rt = Latency { p50_us: p50, p99_us: p99, p999_us: p999, max_us: max };
        let ow = Latency { p50_us: p50 / 2.0, p99_us: p99 / 2.0, p999_us: p999 / 2.0, max_us: max / 2.0 };
        PathReport {
            one_way: ow,
            round_trip: rt,
            bulk_gbps: median(self.bulk),
            bulk16_gbps: median(self.bulk16),
            setup_per_s: median(self.setup),
            curve,
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
    // With 2+ shards, B's client edge is split: shard 0 and the last shard
    // each get a listener on a port of their own, so a client picks the
    // shard it enters on (the tunnel is pinned to the last shard below).
    // Alternative rejected: one SO_REUSEPORT group, where the kernel's hash
    // picks the shard and "local" vs "other" would be chance.
    let mut split: Option<(SocketAddr, SocketAddr)> = None;
    let start = |id: &str, split: &mut Option<(SocketAddr, SocketAddr)>| -> anyhow::Result<ProxyHandle> {
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
            let own = || crate::runtime::listeners::bind_group(([127, 0, 0, 1], 0).into(), 1, "client_addr");
            let (other, local) = (own()?.pop().context("bind")?, own()?.pop().context("bind")?);
            *split = Some((local.local_addr()?, other.local_addr()?));
            l.client = (0..o.shards).map(|_| None).collect();
            l.client[0] = Some(other);
            l.client[o.shards - 1] = Some(local);
        }
        ProxyHandle::start_full(pc, l, Some(store.clone()))
    };
    let b = start("proxy-b", &mut split)?;
    let a = start("proxy-a", &mut None)?;
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
    // Entry addresses: B's local shard, B's other shard (when split), A.
    let (local, other) = match split {
        Some((l, x)) => (l, Some(x)),
        None => (b.client_addr, None),
    };
    let entries: Vec<SocketAddr> = [Some(local), other, Some(a.client_addr)].into_iter().flatten().collect();
    let targets = Targets {
        echo: echo.addr,
        sink: sink.addr,
        echo_t: DialTarget::parse("agent-1/echo").expect("valid"),
        sink_t: DialTarget::parse("agent-1/sink").expect("valid"),
    };
    let opts = o.clone();
    let client_h2 = h2.clone();
    // Steps: 4 workloads x (direct + each entry) per run.
    let pb = super::plot::progress((o.runs * 4 * (1 + entries.len())) as u64);
    let bar = pb.clone();
    let mut paths = crate::runtime::block_on("bench-client", move || async move {
        let e = |s: crate::wire::error::Error| s.to_string();
        let mut clients = Vec::new();
        for addr in &entries {
            clients.push(Client::connect(&addr.to_string(), &tls, &client_h2).await.map_err(|e| e.to_string())?);
        }
        let via: Vec<Option<&Client>> = std::iter::once(None).chain(clients.iter().map(Some)).collect();
        let mut samples: Vec<Samples> = via.iter().map(|_| Samples::default()).collect();
        // Warm-up: connections, peer link, TLS sessions, allocator.
        for v in &via {
            ping(*v, &targets, 500, opts.size).await.map_err(e)?;
        }
        for run in 0..opts.runs {
            for (w, name) in WORKLOADS.iter().enumerate() {
                for (v, s) in via.iter().zip(samples.iter_mut()) {
                    bar.set_message(format!("run {}/{}: {name}", run + 1, opts.runs));
                    step(w, *v, &targets, &opts, s).await.map_err(e)?;
                    bar.inc(1);
                }
            }
            let p50 = |s: &Samples| s.p[0].last().copied().unwrap_or_default();
            let gb = |s: &Samples| s.bulk.last().copied().unwrap_or_default();
            bar.suspend(|| {
                eprintln!(
                    "run {}: rtt p50 {} us; bulk {} Gbit/s (direct, local shard,{} peer link)",
                    run + 1,
                    samples.iter().map(|s| format!("{:.1}", p50(s))).collect::<Vec<_>>().join(" / "),
                    samples.iter().map(|s| format!("{:.2}", gb(s))).collect::<Vec<_>>().join(" / "),
                    if samples.len() == 4 { " other shard," } else { "" },
                )
            });
        }
        Ok::<_, String>(samples.into_iter().map(Samples::report).collect::<Vec<_>>())
    })?
    .map_err(anyhow::Error::msg)
    .context("benchmark failed")?;
    pb.finish_and_clear();
    let two = paths.pop().context("peer-link path")?;
    let other = if paths.len() == 3 { paths.pop() } else { None };
    let one = paths.pop().context("local path")?;
    let direct = paths.pop().context("direct path")?;
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
        ratio_other_shard: other.as_ref().map(|x| Ratios::of(x, &direct)),
        direct,
        proxy: one,
        other_shard: other,
        two_proxy: two,
    };
    print_report(&r);
    let json = serde_json::to_string_pretty(&r)?;
    if let Some(p) = &o.json {
        std::fs::write(p, &json).with_context(|| format!("cannot write {}", p.display()))?;
    } else {
        println!("{json}");
    }
    if let Some(dir) = &o.plot {
        let mut series =
            vec![Series { name: "direct TCP", report: &r.direct }, Series { name: "local shard", report: &r.proxy }];
        if let Some(x) = &r.other_shard {
            series.push(Series { name: "other shard", report: x });
        }
        series.push(Series { name: "peer link", report: &r.two_proxy });
        let title = format!("ringpeer bench ({} shards, {} B messages)", r.shards, r.size);
        for f in super::plot::write(dir, &title, &r, &series)? {
            eprintln!("wrote {}", f.display());
        }
    }
    drop(agent);
    a.stop()?;
    b.stop()
}

const WORKLOADS: [&str; 4] = ["ping-pong", "bulk, 1 stream", "bulk, 16 streams", "stream setup"];

/// The echo and sink targets, directly and through the fleet.
struct Targets {
    echo: SocketAddr,
    sink: SocketAddr,
    echo_t: DialTarget,
    sink_t: DialTarget,
}

async fn ping(via: Option<&Client>, t: &Targets, iters: usize, size: usize) -> Result<Histogram<u64>, Error> {
    match via {
        None => pingpong_direct(t.echo, iters, size).await,
        Some(c) => pingpong_proxy(c, &t.echo_t, iters, size).await,
    }
}

/// Workload `w` ([`WORKLOADS`]) once over one path (`None`: direct TCP).
async fn step(w: usize, via: Option<&Client>, t: &Targets, o: &BenchOpts, s: &mut Samples) -> Result<(), Error> {
    let bytes = o.bulk_mib << 20;
    let each = (bytes / 16).max(1 << 20);
    match (w, via) {
        (0, v) => s.add(&ping(v, t, o.iters, o.size).await?),
        (1, None) => s.bulk.push(gbps(bytes, bulk_direct(t.sink, bytes).await?)),
        (1, Some(c)) => s.bulk.push(gbps(bytes, bulk_proxy(c, &t.sink_t, bytes).await?)),
        (2, None) => s.bulk16.push(gbps(each * 16, bulk_direct_n(t.sink, each, 16).await?)),
        (2, Some(c)) => s.bulk16.push(gbps(each * 16, bulk_proxy_n(c, &t.sink_t, each, 16).await?)),
        (_, None) => s.setup.push(setup_rate_direct(t.echo, 2000, 16).await?),
        (_, Some(c)) => s.setup.push(setup_rate_proxy(c, &t.echo_t, 2000, 16).await?),
    }
    Ok(())
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
    let rows = [
        ("direct TCP, glommio client", Some(&r.direct)),
        ("client→B→agent→target (mTLS)", Some(&r.proxy)),
        ("the same, client on another shard", r.other_shard.as_ref()),
        ("client→A→peer→B→agent→target (mTLS)", Some(&r.two_proxy)),
    ];
    for (name, p) in rows.into_iter().filter_map(|(n, p)| Some((n, p?))) {
        let l = &p.one_way;
        println!(
            "{name:<40} {:>8.1} {:>8.1} {:>9.1} {:>9.1} {:>9.2} {:>10.2} {:>9.0}",
            l.p50_us, l.p99_us, l.p999_us, l.max_us, p.bulk_gbps, p.bulk16_gbps, p.setup_per_s
        );
    }
    let ratios = [
        ("1 proxy", Some(&r.ratio)),
        ("other shard", r.ratio_other_shard.as_ref()),
        ("2 proxies", Some(&r.ratio_two_proxy)),
    ];
    for (name, x) in ratios.into_iter().filter_map(|(n, x)| Some((n, x?))) {
        println!(
            "ratio {name}/direct: latency p50 {:.2}x p99 {:.2}x p99.9 {:.2}x; throughput 1x {:.2}x 16x {:.2}x; setup {:.2}x",
            x.p50, x.p99, x.p999, x.bulk, x.bulk16, x.setup
        );
    }
}
