//! Proxy processes for the upgrade stories: starting, restarting in place,
//! the successor build, and the fleet's state as the admin endpoints show it.

use crate::common;
use crate::{BIN, MOVE_BOUND};

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::procs::{
    agent, metric, proxy_config_file, routes_of, sigterm, start_proxy_line, try_start_proxy_line, Proc,
};
use common::redis_server::Redis;

// ---------------------------------------------------------------- proxies

/// The successor of a proxy restarted in place holds `n` tunnels: the admin
/// address (which it took over) answers not draining, with `n` tunnels.
/// `state` describes the fleet if it does not.
pub(crate) fn wait_successor_holds(admin: SocketAddr, n: i64, what: &str, state: impl Fn() -> String) -> Duration {
    let t0 = Instant::now();
    loop {
        if metric(admin, "ringpeer_draining") == Some(0) && metric(admin, "ringpeer_tunnels") == Some(n) {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < MOVE_BOUND,
            "{what}: the successor does not hold {n} tunnels within {MOVE_BOUND:?} (draining {:?}, tunnels {:?}); {}",
            metric(admin, "ringpeer_draining"),
            metric(admin, "ringpeer_tunnels"),
            state()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGTERM to `old`, and `config` started again at once with `bin`; returns
/// the successor, its client and tunnel addresses, and how long the start
/// took.
pub(crate) fn restart_in_place(
    old: &Proc,
    bin: &Path,
    config: &Path,
    label: &'static str,
) -> (Proc, SocketAddr, SocketAddr, Duration) {
    sigterm(old);
    let t0 = Instant::now();
    let (p, client, tunnel, line) = start_proxy_line(bin, config, Some(label));
    let took = t0.elapsed();
    assert!(line.contains("took over"), "{label}: the successor bound its own sockets: {line}");
    (p, client, tunnel, took)
}

/// Certificates for agents `agent-3`.. (the cert dir holds agent-1 and
/// agent-2).
pub(crate) fn agent_ids(dir: &Path, n: usize) -> Vec<String> {
    (1..=n)
        .map(|i| {
            let id = format!("agent-{i}");
            if i > 2 {
                ringpeer::transport::certs::issue(dir, ringpeer::transport::identity::Role::Agent, &id).unwrap();
            }
            id
        })
        .collect()
}

pub(crate) fn version_of(bin: &Path) -> String {
    let out = Command::new(bin).arg("--version").output().unwrap();
    assert!(out.status.success(), "{} --version: {out:?}", bin.display());
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The successor build for the upgrade story: `RINGPEER_NEXT_BIN`, which
/// scripts/test builds before `cargo test`, or else built here with
/// scripts/build-next (about 70 s on the 2-core dev machine: only the
/// ringpeer crate compiles, the dependencies are hard-linked from this
/// build's target directory).
pub(crate) fn next_bin() -> PathBuf {
    if let Ok(p) = std::env::var("RINGPEER_NEXT_BIN") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "RINGPEER_NEXT_BIN={} is not a file", p.display());
        return p;
    }
    // BIN is <target>/debug/ringpeer.
    let target = Path::new(BIN).parent().and_then(Path::parent).expect("the binary sits in <target>/<profile>");
    let t0 = Instant::now();
    let out = Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/build-next"))
        .arg(target)
        .stderr(std::process::Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "scripts/build-next failed: {out:?}");
    let p = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    eprintln!("built the successor {} in {:?}", p.display(), t0.elapsed());
    p
}

pub(crate) fn fresh_proxy(
    dir: &Path,
    redis: &Redis,
    id: &str,
    label: &'static str,
    ttl_ms: u64,
    strategy: &str,
    extra: &str,
) -> (PathBuf, SocketAddr, SocketAddr, SocketAddr, Proc) {
    for _ in 0..5 {
        let (config, admin) = proxy_config_file(dir, redis, id, ttl_ms, strategy, extra);
        match try_start_proxy_line(Path::new(BIN), &config, Some(label)) {
            Ok((p, client, tunnel, _)) => return (config, admin, client, tunnel, p),
            Err(line) if line.contains("admin_addr") && line.contains("in use") => continue,
            Err(line) => panic!("{id} did not start: {line}"),
        }
    }
    panic!("{id}: no free admin port in 5 tries");
}

/// Three proxy processes: (id, config, admin, client, tunnel, process).
pub(crate) type Fleet3 = Vec<(&'static str, PathBuf, SocketAddr, SocketAddr, SocketAddr, Proc)>;

/// Proxies a, b, c (2 shards each, Redis, `strategy`, `extra` config lines).
pub(crate) fn three_proxies(dir: &Path, redis: &Redis, strategy: &str, extra: &str) -> Fleet3 {
    let mut fleet = Vec::new();
    for id in ["proxy-a", "proxy-b", "proxy-c"] {
        let (config, admin, client, tunnel, p) = fresh_proxy(dir, redis, id, id, 3_000, strategy, extra);
        fleet.push((id, config, admin, client, tunnel, p));
    }
    fleet
}

/// Agents `ids` (echo service at `echo`), agent i seeded with proxy i mod 3:
/// with one tunnel per agent, an agent keeps the tunnel to its seed, so they
/// spread evenly (seeded with one address, all would stay on it).
pub(crate) fn spread_agents(dir: &Path, ids: &[String], fleet: &Fleet3, echo: SocketAddr) -> Vec<Proc> {
    ids.iter().enumerate().map(|(i, id)| agent(dir, id, fleet[i % fleet.len()].4, echo)).collect()
}

/// The proxies (of `fleet`, skipping `except`) where `agent` has a tunnel.
pub(crate) fn holders(fleet: &Fleet3, agent: &str, except: Option<&str>) -> Vec<&'static str> {
    fleet
        .iter()
        .filter(|f| Some(f.0) != except && routes_of(f.2, agent).contains(&"local".to_string()))
        .map(|f| f.0)
        .collect()
}

/// Each proxy's tunnels, and each agent's holders, as the admin endpoints
/// (id, admin) report them.
pub(crate) fn state(admins: &[(&str, SocketAddr)], ids: &[String]) -> String {
    let mut out = String::new();
    for (id, admin) in admins {
        let r = common::procs::routes_json(*admin);
        out += &format!(
            "{id}: tunnels {:?}, draining {:?}; ",
            metric(*admin, "ringpeer_tunnels"),
            metric(*admin, "ringpeer_draining")
        );
        for a in ids {
            out += &format!("{a} {} ", r["agents"][a]);
        }
        out += "\n";
    }
    out
}

/// Waits until every agent of `ids` holds exactly one tunnel, on a proxy of
/// `fleet` other than `except`, and those proxies hold no other; returns how
/// long that took.
pub(crate) fn one_tunnel_each(fleet: &Fleet3, ids: &[String], except: Option<&str>) -> Duration {
    let settled =
        || tunnels(fleet, except) == ids.len() as i64 && ids.iter().all(|a| holders(fleet, a, except).len() == 1);
    let what = format!("one tunnel per agent (away from {except:?})");
    wait_within_move_bound(&what, settled, || state(&live(fleet, except), ids))
}

/// Polls `done` until it holds; fails after [`MOVE_BOUND`] with `what` and
/// the fleet's `state`; returns how long it took.
fn wait_within_move_bound(what: &str, done: impl Fn() -> bool, state: impl Fn() -> String) -> Duration {
    let t0 = Instant::now();
    while !done() {
        assert!(t0.elapsed() < MOVE_BOUND, "no {what} within {MOVE_BOUND:?}:\n{}", state());
        std::thread::sleep(Duration::from_millis(20));
    }
    t0.elapsed()
}

/// The (id, admin address) of every proxy of `fleet` but `except`.
fn live<'a>(fleet: &'a Fleet3, except: Option<&str>) -> Vec<(&'a str, SocketAddr)> {
    fleet.iter().filter(|f| Some(f.0) != except).map(|f| (f.0, f.2)).collect()
}

/// Waits until every proxy of `fleet` (but `except`) routes each agent of
/// `ids` to exactly the proxies that hold a tunnel to it; returns how long
/// that took.
pub(crate) fn routes_agree(fleet: &Fleet3, ids: &[String], except: Option<&str>) -> Duration {
    let proxies = live(fleet, except);
    let agree = || {
        ids.iter().all(|a| {
            let held = holders(fleet, a, except);
            proxies.iter().all(|(id, admin)| {
                let mut want: Vec<String> =
                    held.iter().map(|h| if h == id { "local".to_string() } else { h.to_string() }).collect();
                want.sort();
                let mut got = routes_of(*admin, a);
                got.dedup();
                got == want
            })
        })
    };
    wait_within_move_bound("agreement of the routes with the tunnels", agree, || state(&proxies, ids))
}

pub(crate) fn tunnels(fleet: &Fleet3, except: Option<&str>) -> i64 {
    fleet.iter().filter(|f| Some(f.0) != except).map(|f| metric(f.2, "ringpeer_tunnels").unwrap_or(0)).sum()
}
