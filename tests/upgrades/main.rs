//! Upgrade and maintenance stories (issue 9), with real proxy and agent
//! processes on a real Redis:
//! - a proxy restarted in place (SIGTERM, then the same config started at
//!   once) fails no dial and cuts no stream, and its successor takes over its
//!   listeners (same ports) and its agent's tunnel;
//! - the same across two builds (the successor reports another version);
//! - a proxy decommissioned from a fleet of three (`ringpeer proxy … drain`)
//!   hands its agents to the other two while dials entering there go on;
//! - a rolling restart of three proxies under dials and 100 long streams;
//! - kill -9 stays the fallback: the routes expire, failover covers the
//!   dials, and the stale upgrade socket does not block the next start.
//!
//! Every proxy config sets `upgrade_socket` in the test's temp dir: tests run
//! in parallel and reuse proxy ids, and the default path is per id.
//!
//! The clients are the library's (`ringpeer::client::Dialer`, one per entry
//! proxy): when a proxy sends GOAWAY, a dial it refused unprocessed is sent
//! once more on a new connection, which is what `ringpeer forward` does too.
//! Every failure the dialer returns counts as a failed dial.

#[path = "../common/mod.rs"]
mod common;
mod fleet;
mod load;

use fleet::*;
use load::*;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::procs::{metric, sigterm, start_proxy, wait_exit};
use common::redis_server::Redis;
use ringpeer::tools::fleet::CertDir;
use ringpeer::tools::target::{self as targets, Kind, Target};
use ringpeer::wire::DialTarget;

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_ringpeer");
/// How long an old process may take to exit once its last stream ended.
pub(crate) const EXIT_BOUND: Duration = Duration::from_secs(10);
/// How long a successor (or the remaining proxies) may take to hold the
/// moved tunnels.
pub(crate) const MOVE_BOUND: Duration = Duration::from_secs(15);
/// The longest a kill -9 may keep an agent unreachable: its tunnel counts
/// as failed after 2 s (agent::strategy::FAILED_AFTER) and the replacement
/// must be up and announced. Measured: 2.03-2.09 s before the drain
/// protocol (dials failed meanwhile), 2.06-2.14 s with it (0 failed: dials
/// for a moving agent wait for its tunnel).
pub(crate) const KILL_OUTAGE_BOUND: Duration = Duration::from_secs(6);

/// Every story runs `proxy_peering` with one tunnel per agent: a proxy's
/// agents then have no other tunnel, so each move is tested.
pub(crate) const PEERING_ONE: &str = "type = \"proxy_peering\"\nagent_connection_count = 1";

/// A story's stage: a Redis, a certificate directory, an echo target.
fn stage() -> (Redis, CertDir, Target) {
    ringpeer::runtime::raise_memlock();
    (Redis::start(), CertDir::temp().unwrap(), targets::spawn(Kind::Echo).unwrap())
}

pub(crate) fn echo_of(agent: &str) -> DialTarget {
    DialTarget::parse(&format!("{agent}/echo")).unwrap()
}

// ---------------------------------------------------------------- stories

#[test]
fn restart_in_place_fails_no_dial_and_keeps_a_stream() {
    restart_one_proxy(Path::new(BIN), Duration::from_secs(60));
}

#[test]
fn upgrade_across_builds() {
    let next = next_bin();
    let (now, then) = (version_of(Path::new(BIN)), version_of(&next));
    eprintln!("upgrading from `{now}` to `{then}`");
    // (The successor's start-up line names the build it took over from.)
    assert_ne!(now, then, "the successor build must report another version");
    assert!(then.ends_with("+next"), "{then}");
    // The stream runs 30 s past the upgrade here: the 60 s bar is the
    // restart-in-place story's, with the same code, and the suite's time
    // is bounded.
    restart_one_proxy(&next, Duration::from_secs(30));
}

/// One proxy (2 shards, Redis) and one agent with an echo target. A long
/// stream (1 KiB every 100 ms) starts before the restart and runs `after`
/// past it; a dial every 50 ms for 20 s spans `kill -TERM` plus the start
/// of the same config with `successor`.
fn restart_one_proxy(successor: &Path, after: Duration) {
    let (redis, certs, echo) = stage();
    let dir = &certs.path;
    let strategy = PEERING_ONE;
    let (config, admin, client, tunnel, mut old) =
        fresh_proxy(dir, &redis, "proxy-a", "old proxy-a", 3_000, strategy, "");
    let (_agent, agent_admin) = common::procs::agent_with_admin(dir, "agent-1", tunnel, echo.addr);
    common::eventually("the agent's tunnel is up", || metric(admin, "ringpeer_tunnels") == Some(1));
    common::eventually("the agent is ready", || common::procs::admin_get(agent_admin, "/readyz").0 == 200);

    let (stop_stream, progress) = (Arc::new(AtomicBool::new(false)), Arc::new(Progress::default()));
    let stream = spawn_streams(
        dir,
        vec![(client, "agent-1".into())],
        1024,
        Duration::from_millis(100),
        stop_stream.clone(),
        progress.clone(),
    );
    let stream = streams_up(stream, &progress, 1, &stop_stream);
    let (ready_tx, ready) = mpsc::channel();
    let dialer = spawn_dialer(
        dir,
        vec![client],
        vec!["agent-1".into()],
        Duration::from_millis(50),
        Some(Duration::from_secs(20)),
        Arc::new(AtomicBool::new(false)),
        ready_tx,
    );
    ready.recv_timeout(Duration::from_secs(10)).expect("dials succeed before the restart");

    let (new, client2, tunnel2, started) = restart_in_place(&old, successor, &config, "new proxy-a");
    let restarted = Instant::now();
    eprintln!("successor started in {started:?}");
    assert_eq!((client2, tunnel2), (client, tunnel), "the successor took over the listening sockets");
    let moved = wait_successor_holds(admin, 1, "restart in place", String::new);
    eprintln!("the agent's tunnel is on the successor {moved:?} after its start");

    let dials = dialer.join().unwrap();
    dials.report("dials across the restart");
    assert!(dials.made >= 250, "a dial every 50 ms for 20 s: only {}", dials.made);
    assert!(dials.failed.is_empty(), "{} of {} dials failed", dials.failed.len(), dials.made);

    // The stream goes on `after` past the restart, on the old process.
    std::thread::sleep(after.saturating_sub(restarted.elapsed()));
    let early_exit = old.0.try_wait().unwrap();
    stop_stream.store(true, Ordering::Relaxed);
    let outs = stream.join().unwrap();
    let ended = Instant::now();
    eprintln!("the stream ran {:?} past the restart", ended - restarted);
    assert!(early_exit.is_none(), "the old process exited while its stream ran: {early_exit:?}; the stream: {outs:?}");
    // 1 KiB every 100 ms for `after`, less a fifth for a loaded machine.
    let min = after.as_millis() as u64 / 100 * 1024 * 4 / 5;
    assert_streams_intact(&outs, min);

    let status = wait_exit(&mut old, EXIT_BOUND);
    let exit_after = ended.elapsed();
    eprintln!("the old process exited {exit_after:?} after its stream ended: {status:?}");
    assert!(status.is_some_and(|s| s.success()), "old process: {status:?} within {EXIT_BOUND:?} of its stream's end");
    // The admin address is the successor's alone now.
    assert_eq!(metric(admin, "ringpeer_tunnels"), Some(1));
    assert_eq!(metric(admin, "ringpeer_draining"), Some(0));
    // The agent still counts its tunnel (to the successor, at the same
    // address) after the predecessor's went down: once, under systemd, its
    // /readyz said "no tunnel up" here.
    let (status, ready) = common::procs::admin_get(agent_admin, "/readyz");
    assert!(status == 200 && ready.contains("1 tunnel(s) up: proxy-a"), "{status} {ready}");
    assert_eq!(metric(agent_admin, "ringpeer_agent_tunnels"), Some(1));
    drop(new);
}

/// Writes proxy `id`'s config (see [`proxy_config_file`], `extra` config
/// lines) and starts it,
/// its log lines prefixed with `label`; returns (config, admin, client,
/// tunnel, process). The admin port is picked free, then bound by the
/// proxy: another process may take it in between, so a start that finds
/// it in use is tried again on another.
#[test]
fn decommission_one_of_three() {
    // `ringpeer proxy --config a.toml drain`: a leaves the fleet at once.
    decommission(Leave::DrainCommand);
}

#[test]
fn sigterm_without_a_successor_decommissions() {
    // SIGTERM and no successor within handover_wait_ms (500 ms here): a
    // leaves the fleet the same way.
    decommission(Leave::Sigterm);
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Leave {
    DrainCommand,
    Sigterm,
}

/// Under proxy_peering with one tunnel per agent, proxy a of three leaves
/// the fleet (`how`): its agents open tunnels to b or c, a exits 0, and
/// dials entering at b and c, every agent every 50 ms, never fail.
fn decommission(how: Leave) {
    let (redis, certs, echo) = stage();
    let dir = &certs.path;
    let strategy = PEERING_ONE;
    let mut fleet = three_proxies(dir, &redis, strategy, "handover_wait_ms = 500");
    let ids = agent_ids(dir, 6);
    let _agents = spread_agents(dir, &ids, &fleet, echo.addr);
    one_tunnel_each(&fleet, &ids, None);
    let on_a: Vec<&String> = ids.iter().filter(|a| holders(&fleet, a, None) == ["proxy-a"]).collect();
    eprintln!("agents on proxy-a: {on_a:?} (of {})", ids.len());
    assert_eq!(on_a.len(), 2, "agents seeded with a stay on a");

    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready) = mpsc::channel();
    let entries = vec![fleet[1].3, fleet[2].3];
    let dialer = spawn_dialer(dir, entries, ids.clone(), Duration::from_millis(50), None, stop.clone(), ready_tx);
    ready.recv_timeout(Duration::from_secs(15)).expect("dials succeed before the decommission");

    let t0 = Instant::now();
    match how {
        Leave::DrainCommand => {
            let out = Command::new(BIN)
                .args(["proxy", "--config", fleet[0].1.to_str().unwrap(), "drain"])
                .env("RUST_LOG", "warn")
                .output()
                .unwrap();
            let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            eprintln!("`ringpeer proxy --config a.toml drain` said: {}", said.trim());
            assert!(out.status.success(), "drain: {out:?}");
            assert_eq!(said.trim().lines().count(), 1, "one line: {said}");
        }
        Leave::Sigterm => sigterm(&fleet[0].5),
    }

    one_tunnel_each(&fleet, &ids, Some("proxy-a"));
    let moved = t0.elapsed();
    eprintln!("{} agents moved off proxy-a {moved:?} after {how:?}", on_a.len());
    let status = wait_exit(&mut fleet[0].5, Duration::from_secs(20));
    let exited = t0.elapsed();
    eprintln!("proxy-a exited {exited:?} after {how:?}: {status:?}");
    assert!(status.is_some_and(|s| s.success()), "proxy-a: {status:?}");

    let agreed = routes_agree(&fleet, &ids, Some("proxy-a"));
    eprintln!("b's and c's routes agree with the tunnels {agreed:?} after a's exit");
    // Dials go on for 3 s with a gone.
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    let dials = dialer.join().unwrap();
    dials.report("dials entering at b and c across the decommission of a");
    assert!(dials.failed.is_empty(), "{} of {} dials failed", dials.failed.len(), dials.made);
    // Each agent: one tunnel, on b or c; b and c no longer route to a.
    for a in &ids {
        assert_eq!(holders(&fleet, a, Some("proxy-a")).len(), 1, "{a}");
    }
    assert_eq!(tunnels(&fleet, Some("proxy-a")), 6);
}

#[test]
fn rolling_restart_of_three() {
    // proxy_peering with one tunnel per agent: every restart moves each
    // tunnel of the restarted proxy (its agents have no other), and dials
    // and streams entering at the other two must reach those agents while
    // they move. agent_mesh would leave every agent two other tunnels, so a
    // restart would test less.
    let (redis, certs, echo) = stage();
    let dir = &certs.path;
    let mut fleet = three_proxies(dir, &redis, PEERING_ONE, "");
    let ids = agent_ids(dir, 4);
    let _agents = spread_agents(dir, &ids, &fleet, echo.addr);
    one_tunnel_each(&fleet, &ids, None);
    for f in &fleet {
        eprintln!("{} holds {:?} tunnels", f.0, metric(f.2, "ringpeer_tunnels"));
    }

    // 100 streams, spread over the three entries and the four agents.
    let plan: Vec<(SocketAddr, String)> = (0..100).map(|i| (fleet[i % 3].3, ids[i % ids.len()].clone())).collect();
    let (stop, progress) = (Arc::new(AtomicBool::new(false)), Arc::new(Progress::default()));
    let streams = spawn_streams(dir, plan, 256, Duration::from_millis(500), stop.clone(), progress.clone());
    let streams = streams_up(streams, &progress, 100, &stop);
    let (ready_tx, ready) = mpsc::channel();
    let entries = fleet.iter().map(|f| f.3).collect();
    let dialer = spawn_dialer(dir, entries, ids.clone(), Duration::from_millis(100), None, stop.clone(), ready_tx);
    ready.recv_timeout(Duration::from_secs(15)).expect("dials succeed before the restarts");

    let fleet_view: Vec<(&str, SocketAddr)> = fleet.iter().map(|f| (f.0, f.2)).collect();
    let mut olds = Vec::new();
    for f in fleet.iter_mut() {
        let n = metric(f.2, "ringpeer_tunnels").unwrap();
        let (new, client, tunnel, started) = restart_in_place(&f.5, Path::new(BIN), &f.1, f.0);
        assert_eq!((client, tunnel), (f.3, f.4), "{}: the successor took over the listening sockets", f.0);
        let moved = wait_successor_holds(f.2, n, f.0, || state(&fleet_view, &ids));
        eprintln!("{}: successor started in {started:?}, holds its {n} tunnels {moved:?} later", f.0);
        olds.push((f.0, std::mem::replace(&mut f.5, new)));
    }
    // The streams run 3 s past the last restart, then end.
    std::thread::sleep(Duration::from_secs(3));
    for (id, p) in olds.iter_mut() {
        assert!(p.0.try_wait().unwrap().is_none(), "old {id} exited while streams through it ran");
    }
    stop.store(true, Ordering::Relaxed);
    let outs = streams.join().unwrap();
    let ended = Instant::now();
    let dials = dialer.join().unwrap();
    dials.report("dials across the rolling restart");
    // At least 3 s of chunks (the run after the last restart) per stream.
    assert_streams_intact(&outs, 256 * 6);
    assert!(dials.failed.is_empty(), "{} of {} dials failed", dials.failed.len(), dials.made);
    for (id, p) in olds.iter_mut() {
        let status = wait_exit(p, EXIT_BOUND);
        eprintln!("old {id} exited {:?} after the streams ended: {status:?}", ended.elapsed());
        assert!(status.is_some_and(|s| s.success()), "old {id}: {status:?}");
    }
    // Each agent ends with one tunnel, and every proxy's routes say where.
    let settled = one_tunnel_each(&fleet, &ids, None);
    let agreed = routes_agree(&fleet, &ids, None);
    eprintln!("one tunnel per agent {settled:?}, routes agree {agreed:?} after the old processes' exit");
}

#[test]
fn kill_9_stays_the_fallback() {
    // kill -9 of proxy a of three (proxy_peering, one tunnel per agent,
    // route TTL 1.5 s): a's agents see their tunnel close, and after
    // FAILED_AFTER (2 s) open one to b or c; dials for them entering at b
    // and c fail or wait meanwhile. The outage is bounded; then the same
    // config starts again at once, its stale upgrade socket in the way.
    let (redis, certs, echo) = stage();
    let dir = &certs.path;
    let strategy = PEERING_ONE;
    let mut fleet: Fleet3 = Vec::new();
    for id in ["proxy-a", "proxy-b", "proxy-c"] {
        let (config, admin, client, tunnel, p) = fresh_proxy(dir, &redis, id, id, 1_500, strategy, "");
        fleet.push((id, config, admin, client, tunnel, p));
    }
    let ids = agent_ids(dir, 3);
    let _agents = spread_agents(dir, &ids, &fleet, echo.addr);
    one_tunnel_each(&fleet, &ids, None);
    let on_a: Vec<String> = ids.iter().filter(|a| holders(&fleet, a, None) == ["proxy-a"]).cloned().collect();
    eprintln!("agents on proxy-a: {on_a:?}");
    assert_eq!(on_a, ["agent-1"], "agents seeded with a stay on a");

    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready) = mpsc::channel();
    let entries = vec![fleet[1].3, fleet[2].3];
    let dialer = spawn_dialer(dir, entries, ids.clone(), Duration::from_millis(50), None, stop.clone(), ready_tx);
    ready.recv_timeout(Duration::from_secs(15)).expect("dials succeed before the kill");

    let sock = dir.join("proxy-a.sock");
    let killed = Instant::now();
    let _ = fleet[0].5 .0.kill(); // SIGKILL
    let _ = fleet[0].5 .0.wait();
    one_tunnel_each(&fleet, &ids, Some("proxy-a"));
    let moved = killed.elapsed();
    eprintln!("a's agents re-tunnelled to b or c {moved:?} after the kill");

    // The same config starts again, the dead process's socket file still there.
    assert!(sock.exists(), "the killed proxy left its upgrade socket at {}", sock.display());
    let t0 = Instant::now();
    let (again, client, _) = start_proxy(&fleet[0].1, Some("proxy-a again"));
    let started = t0.elapsed();
    eprintln!("proxy-a started again in {started:?} beside its stale upgrade socket");
    assert!(started < Duration::from_secs(5), "{started:?}");
    fleet[0].5 = again;
    // Dials go on 2 s more; the restarted a answers for every agent too.
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let dials = dialer.join().unwrap();
    dials.report("dials entering at b and c across the kill -9 of a");
    let (ids2, dir2) = (ids.clone(), dir.clone());
    let through_a = ringpeer::runtime::block_on("through-a", move || async move {
        let e = Entry::new(client, &dir2);
        let mut failed = Vec::new();
        for a in &ids2 {
            if let Err(err) = e.dial(&echo_of(a), b"ping").await {
                failed.push(format!("{a}: {err}"));
            }
        }
        failed
    })
    .unwrap();
    assert!(through_a.is_empty(), "dials entering at the restarted a: {through_a:?}");
    for a in &on_a {
        let gap = dials.longest_gap(&echo_of(a).to_string());
        eprintln!("{a} (was on proxy-a): longest time between successful dials {gap:?}");
        assert!(gap < KILL_OUTAGE_BOUND, "{a}: outage {gap:?}");
    }
    for a in ids.iter().filter(|a| !on_a.contains(a)) {
        // (Its dials wait their turn behind those to a's agents: the time
        // between them is not its own.)
        let slowest = dials.slowest_to(&echo_of(a).to_string());
        eprintln!("{a} (elsewhere): slowest dial {slowest:?}");
        assert!(slowest < Duration::from_secs(1), "{a} was not on a: {slowest:?}");
    }
}
