//! `ringpeer bench --external-echo ... --external-sink ...`: the same
//! workloads as the fleet bench (ping-pong, 1- and 16-stream bulk, setup
//! rate), measured through any TCP path (e.g. a haproxy chain) beside
//! direct TCP to the targets behind it, in one invocation; with `--plot
//! DIR`, the same report as JSON and SVG (`super::plot`).
//!
//! Invariant: both sides use the same glommio client code, so the ratio
//! measures the path.

use anyhow::Context;
use serde::Serialize;

use super::bench::{BenchOpts, PathReport, Ratios, Samples};
use super::load::{bulk_direct, bulk_direct_n, gbps, pingpong_direct, setup_rate_direct};
use super::plot::Series;

/// Report of an external path measured beside direct TCP.
#[derive(Serialize, Debug)]
pub struct ExternalReport {
    /// Path name.
    pub label: String,
    /// Runs.
    pub runs: usize,
    /// Direct TCP to the targets behind the path.
    pub direct: PathReport,
    /// Through the path.
    pub path: PathReport,
    /// Path relative to direct.
    pub ratio: Ratios,
}

fn parse(a: &Option<String>, flag: &str) -> anyhow::Result<std::net::SocketAddr> {
    a.as_deref()
        .with_context(|| format!("{flag} is required with --external-echo"))?
        .parse()
        .with_context(|| format!("{flag} is not host:port"))
}

/// Measures an external TCP path (plain sockets, same workloads) beside
/// direct TCP to the targets behind it, in one invocation.
pub fn run(o: &BenchOpts) -> anyhow::Result<()> {
    let (pe, ps) = (parse(&o.external_echo, "--external-echo")?, parse(&o.external_sink, "--external-sink")?);
    let (de, ds) = (parse(&o.direct_echo, "--direct-echo")?, parse(&o.direct_sink, "--direct-sink")?);
    let opts = o.clone();
    // Steps: 4 workloads x 2 paths per run.
    let pb = super::plot::progress((o.runs * 8) as u64);
    let bar = pb.clone();
    let (direct, path) = crate::runtime::block_on("bench-external", move || async move {
        let e = |s: crate::wire::error::Error| s.to_string();
        let (mut d, mut p) = (Samples::default(), Samples::default());
        let bytes = opts.bulk_mib << 20;
        let each = (bytes / 16).max(1 << 20);
        pingpong_direct(pe, 500, opts.size).await.map_err(e)?;
        for run in 0..opts.runs {
            bar.set_message(format!("run {}/{}", run + 1, opts.runs));
            d.add(&pingpong_direct(de, opts.iters, opts.size).await.map_err(e)?);
            p.add(&pingpong_direct(pe, opts.iters, opts.size).await.map_err(e)?);
            bar.inc(2);
            d.bulk.push(gbps(bytes, bulk_direct(ds, bytes).await.map_err(e)?));
            p.bulk.push(gbps(bytes, bulk_direct(ps, bytes).await.map_err(e)?));
            bar.inc(2);
            d.bulk16.push(gbps(each * 16, bulk_direct_n(ds, each, 16).await.map_err(e)?));
            p.bulk16.push(gbps(each * 16, bulk_direct_n(ps, each, 16).await.map_err(e)?));
            bar.inc(2);
            d.setup.push(setup_rate_direct(de, 2000, 16).await.map_err(e)?);
            p.setup.push(setup_rate_direct(pe, 2000, 16).await.map_err(e)?);
            bar.inc(2);
        }
        Ok::<_, String>((d.report(), p.report()))
    })?
    .map_err(anyhow::Error::msg)?;
    pb.finish_and_clear();
    let r = ExternalReport { label: o.label.clone(), runs: o.runs, ratio: Ratios::of(&path, &direct), direct, path };
    println!(
        "{:<40} {:>8} {:>8} {:>9} {:>9} {:>10} {:>9}",
        "path (one-way = RTT/2, medians)", "p50 us", "p99 us", "p99.9 us", "1x Gb/s", "16x Gb/s", "setup/s"
    );
    for (name, p) in [("direct TCP", &r.direct), (r.label.as_str(), &r.path)] {
        let l = &p.one_way;
        println!(
            "{name:<40} {:>8.1} {:>8.1} {:>9.1} {:>9.2} {:>10.2} {:>9.0}",
            l.p50_us, l.p99_us, l.p999_us, p.bulk_gbps, p.bulk16_gbps, p.setup_per_s
        );
    }
    let x = &r.ratio;
    println!(
        "ratio {}/direct: latency p50 {:.2}x p99 {:.2}x p99.9 {:.2}x; throughput 1x {:.2}x 16x {:.2}x; setup {:.2}x",
        r.label, x.p50, x.p99, x.p999, x.bulk, x.bulk16, x.setup
    );
    let json = serde_json::to_string_pretty(&r)?;
    match &o.json {
        Some(p) => std::fs::write(p, &json).with_context(|| format!("cannot write {}", p.display()))?,
        None => println!("{json}"),
    }
    if let Some(dir) = &o.plot {
        let series = [Series { name: "direct TCP", report: &r.direct }, Series { name: &r.label, report: &r.path }];
        for f in super::plot::write(dir, &format!("ringpeer bench: {}", r.label), &r, &series)? {
            eprintln!("wrote {}", f.display());
        }
    }
    Ok(())
}
