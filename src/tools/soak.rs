//! `ringpeer soak`: a long mixed load through a running fleet, checking
//! every byte. `streams` loops run at once over `connections` client
//! connections, each looping until the deadline over three kinds of dial:
//! - echo round trips of 1 KiB to 256 KiB of random bytes, the SHA-256 of
//!   what came back compared with what was sent (60% of loops);
//! - bulk transfers of 1 to 4 MiB to a sink, which confirms the count (20%);
//! - short dials: open, echo one byte, close (20%).
//!
//! It samples the RSS of the processes it is given (`--pid name=PID`) every
//! second and compares the mean over the minute after the warm-up with the
//! mean over the last minute, and reports mismatches, dial errors
//! by code, operations and bytes. It fails (non-zero exit) when any byte
//! mismatched or any process's RSS grew by `max_rss_growth_pct` or more.
//!
//! Invariant: counters only, no per-operation record, so the tool's own
//! memory stays flat over a long run.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::{Rng, RngCore};
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::load::{bulk_proxy, echo_roundtrip};
use crate::client::{client_tls, Client};
use crate::transport::h2conf::H2Tuning;
use crate::wire::DialTarget;

/// `ringpeer soak` options.
#[derive(clap::Args, Clone, Debug)]
pub struct SoakOpts {
    /// Proxy client address to enter at.
    #[arg(long)]
    pub proxy: String,
    /// Certificates directory.
    #[arg(long)]
    pub certs: PathBuf,
    /// Client certificate name.
    #[arg(long, default_value = "client")]
    pub name: String,
    /// Echo service, AGENT/SERVICE.
    #[arg(long, default_value = "agent-1/echo")]
    pub echo: String,
    /// Sink service, AGENT/SERVICE.
    #[arg(long, default_value = "agent-1/sink")]
    pub sink: String,
    /// Concurrent stream loops.
    #[arg(long, default_value_t = 1000)]
    pub streams: usize,
    /// Client connections the loops share.
    #[arg(long, default_value_t = 8)]
    pub connections: usize,
    /// Total duration, seconds.
    #[arg(long, default_value_t = 600)]
    pub secs: u64,
    /// Warm-up before the first RSS sample, seconds.
    #[arg(long, default_value_t = 60)]
    pub warmup_secs: u64,
    /// Processes whose RSS to watch, as name=PID (repeatable).
    #[arg(long = "pid")]
    pub pids: Vec<String>,
    /// Fail when a process's RSS grows by this much (percent) or more.
    #[arg(long, default_value_t = 10.0)]
    pub max_rss_growth_pct: f64,
    /// Write the report as JSON here too.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Counters of one run.
#[derive(Default, Serialize, Debug)]
pub struct Tally {
    /// Echo round trips verified.
    pub echoes: u64,
    /// Bulk transfers confirmed.
    pub bulks: u64,
    /// Short dials completed.
    pub shorts: u64,
    /// Payload bytes sent and verified.
    pub bytes: u64,
    /// Echo round trips whose SHA-256 differed (or bulk counts that did).
    pub mismatches: u64,
    /// Failed dials by "CODE: message" (message truncated).
    pub errors: BTreeMap<String, u64>,
}

/// RSS of one process, KiB.
#[derive(Serialize, Debug)]
pub struct Rss {
    /// Name given on the command line.
    pub name: String,
    /// Mean over the window right after the warm-up.
    pub warm_kib: u64,
    /// Mean over the last window of the run.
    pub end_kib: u64,
    /// Highest sample.
    pub peak_kib: u64,
    /// end / warm - 1, percent.
    pub growth_pct: f64,
}

/// The soak's report.
#[derive(Serialize, Debug)]
pub struct SoakReport {
    /// Seconds run.
    pub secs: f64,
    /// Stream loops.
    pub streams: usize,
    /// Counters.
    pub tally: Tally,
    /// RSS per process.
    pub rss: Vec<Rss>,
    /// Whether the run passed.
    pub passed: bool,
}

fn parse_pids(v: &[String]) -> anyhow::Result<Vec<(String, u32)>> {
    v.iter()
        .map(|p| {
            let (n, pid) = p.split_once('=').with_context(|| format!("--pid {p:?}: use name=PID"))?;
            Ok((n.to_string(), pid.parse().with_context(|| format!("--pid {p:?}: bad PID"))?))
        })
        .collect()
}

/// One loop: runs dials of its kind until `end`.
async fn stream_loop(i: usize, c: Client, echo: DialTarget, sink: DialTarget, end: Instant, t: Rc<RefCell<Tally>>) {
    let mut rng = rand::thread_rng();
    let fail = |t: &Rc<RefCell<Tally>>, e: crate::wire::error::Error| {
        let m: String = e.message.chars().take(80).collect();
        *t.borrow_mut().errors.entry(format!("{:?}: {m}", e.code)).or_default() += 1;
    };
    while Instant::now() < end {
        match i % 10 {
            0..=5 => {
                let mut data = vec![0u8; rng.gen_range(1 << 10..=256 << 10)];
                rng.fill_bytes(&mut data);
                let sum = Sha256::digest(&data);
                match echo_roundtrip(&c, &echo, &data).await {
                    Ok(back) => {
                        let mut t = t.borrow_mut();
                        if Sha256::digest(&back) == sum {
                            t.echoes += 1;
                            t.bytes += data.len() as u64;
                        } else {
                            t.mismatches += 1;
                        }
                    }
                    Err(e) => fail(&t, e),
                }
            }
            6 | 7 => {
                let n = rng.gen_range(16..=64u64) * super::load::BULK_CHUNK as u64;
                match bulk_proxy(&c, &sink, n).await {
                    Ok(_) => {
                        let mut t = t.borrow_mut();
                        t.bulks += 1;
                        t.bytes += n;
                    }
                    Err(e) if e.message.starts_with("sink counted") => t.borrow_mut().mismatches += 1,
                    Err(e) => fail(&t, e),
                }
            }
            _ => match echo_roundtrip(&c, &echo, b"s").await {
                Ok(b) if b == b"s" => t.borrow_mut().shorts += 1,
                Ok(_) => t.borrow_mut().mismatches += 1,
                Err(e) => fail(&t, e),
            },
        }
    }
}

/// Runs the soak; `Ok(false)` when it failed its bounds.
pub fn run(o: SoakOpts) -> anyhow::Result<bool> {
    let pids = parse_pids(&o.pids)?;
    let tls = client_tls(&o.certs, &o.name)?;
    let parse = |s: &str| DialTarget::parse(s).map_err(|e| anyhow::anyhow!("{s:?}: {}", e.message));
    let (echo, sink) = (parse(&o.echo)?, parse(&o.sink)?);
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs(o.secs);
    // RSS sampler: its own thread, so a busy client executor cannot skew it.
    // RSS moves with what is in flight at the sampled instant, so "after
    // warm-up" and "end" are means over a window (a minute, or a quarter of
    // the measured time when shorter) rather than single samples.
    let sampler = {
        let warm = Duration::from_secs(o.warmup_secs.min(o.secs));
        let window = Duration::from_secs(60).min((Duration::from_secs(o.secs) - warm) / 4).max(Duration::from_secs(1));
        let (pids, warm_from, end_from) = (pids.clone(), t0 + warm, end - window);
        std::thread::spawn(move || {
            let n = pids.len();
            let (mut warm_sum, mut warm_n, mut end_sum, mut end_n) = (vec![0u64; n], 0u64, vec![0u64; n], 0u64);
            let mut peak = vec![0u64; n];
            loop {
                let now = Instant::now();
                let kib: Vec<u64> = pids.iter().map(|(_, p)| super::scale::rss_kib(*p)).collect();
                for k in 0..n {
                    peak[k] = peak[k].max(kib[k]);
                }
                if now >= warm_from && now < warm_from + window {
                    warm_n += 1;
                    warm_sum.iter_mut().zip(&kib).for_each(|(s, v)| *s += v);
                }
                if now >= end_from {
                    end_n += 1;
                    end_sum.iter_mut().zip(&kib).for_each(|(s, v)| *s += v);
                }
                if now >= end {
                    break;
                }
                std::thread::sleep(Duration::from_secs(1).min(end.saturating_duration_since(now)));
            }
            pids.iter()
                .enumerate()
                .map(|(k, (name, _))| {
                    let warm_kib = warm_sum[k] / warm_n.max(1);
                    let end_kib = end_sum[k] / end_n.max(1);
                    Rss {
                        name: name.clone(),
                        warm_kib,
                        end_kib,
                        peak_kib: peak[k],
                        growth_pct: (end_kib as f64 / warm_kib.max(1) as f64 - 1.0) * 100.0,
                    }
                })
                .collect::<Vec<Rss>>()
        })
    };
    let (proxy, streams, conns) = (o.proxy.clone(), o.streams, o.connections.max(1));
    let tally = crate::runtime::block_on("soak", move || async move {
        let mut clients = Vec::with_capacity(conns);
        for _ in 0..conns {
            clients.push(Client::connect(&proxy, &tls, &H2Tuning::default()).await.map_err(|e| e.to_string())?);
        }
        let t = Rc::new(RefCell::new(Tally::default()));
        let loops: Vec<_> = (0..streams)
            .map(|i| {
                let args = (clients[i % conns].clone(), echo.clone(), sink.clone(), t.clone());
                glommio::spawn_local(stream_loop(i, args.0, args.1, args.2, end, args.3))
            })
            .collect();
        for l in loops {
            l.await;
        }
        Ok::<_, String>(Rc::try_unwrap(t).map(RefCell::into_inner).unwrap_or_default())
    })?
    .map_err(anyhow::Error::msg)?;
    let rss = sampler.join().map_err(|_| anyhow::anyhow!("RSS sampler panicked"))?;
    let passed = tally.mismatches == 0 && rss.iter().all(|r| r.growth_pct < o.max_rss_growth_pct);
    let r = SoakReport { secs: t0.elapsed().as_secs_f64(), streams: o.streams, tally, rss, passed };
    let t = &r.tally;
    let errors: u64 = t.errors.values().sum();
    println!(
        "soak: {:.0} s, {} stream loops: {} echo round trips (SHA-256 checked), {} bulk transfers, {} short dials, {:.1} GiB verified",
        r.secs,
        r.streams,
        t.echoes,
        t.bulks,
        t.shorts,
        t.bytes as f64 / (1u64 << 30) as f64
    );
    println!("mismatches: {}; dial errors: {errors}", t.mismatches);
    for (k, n) in &t.errors {
        println!("  {n} x {k}");
    }
    for p in &r.rss {
        println!(
            "rss {:<8} after warm-up {:>8} KiB, at the end {:>8} KiB ({:+.1}%), peak {:>8} KiB (window means)",
            p.name, p.warm_kib, p.end_kib, p.growth_pct, p.peak_kib
        );
    }
    println!("{}", if r.passed { "PASS" } else { "FAIL" });
    if let Some(path) = &o.json {
        std::fs::write(path, serde_json::to_string_pretty(&r)? + "\n")?;
    }
    Ok(r.passed)
}
