//! Budget stories, played against a real proxy and a real agent, each its
//! own `ringpeer` process (so each RSS is its own), with a target in this
//! process whose open connections we count:
//!
//! - slow readers: thousands of streams to a service that writes forever,
//!   from clients that never grant flow-control window: both processes
//!   stay within their budgets, and every target connection closes once
//!   the clients are gone;
//! - reset amplification: 5,000 dials reset in flight: few reach the
//!   target, nothing of them remains a second later, memory barely moves,
//!   and a canary client is served as fast as before;
//! - each budget refuses the first dial past it, naming itself.
//!
//! Stalled streams on a shared link are in `tests/stalls.rs`.

mod common;

use common::stage::*;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::procs::metric;
use ringpeer::runtime::budget::{AgentLimits, ProxyLimits};
use ringpeer::tools::fleet::CertDir;
use ringpeer::tools::target::{self as targets, Kind};
use ringpeer::transport::h2conf::{H2Tuning, MAX_RESETS_PER_SEC};
use ringpeer::wire::codec::encode_msg;
use ringpeer::wire::DialTarget;

#[test]
fn slow_readers_stay_within_the_budgets_and_leave_no_target_connection() {
    let _turn = turn();
    const CONNS: usize = 5;
    const PER_CONN: usize = 2_000;
    let st = stage(Kind::Flood);
    let (p, a) = (st.proxy.0.id(), st.agent.0.id());
    let base = (rss(p), rss(a));
    let tls = ringpeer::client::client_tls(&st.certs.path, "client").unwrap();
    let addr = st.client_addr;
    let leave = Arc::new(AtomicBool::new(false));
    let go = leave.clone();
    let clients = std::thread::spawn(move || {
        ringpeer::runtime::block_on("slow-readers", move || async move {
            let first = encode_msg(&DialTarget::parse("agent-1/svc").unwrap().to_frame());
            let mut held = Vec::new();
            let mut conns = Vec::new();
            let mut conns_send = Vec::new();
            for _ in 0..CONNS {
                let (mut send, conn) = raw_client(addr, &tls).await;
                conns.push(glommio::spawn_local(async move {
                    if let Err(e) = conn.await {
                        eprintln!("slow reader connection ended: {e}");
                    }
                }));
                for _ in 0..PER_CONN {
                    if std::future::poll_fn(|cx| send.poll_ready(cx)).await.is_err() {
                        break;
                    }
                    let Ok((resp, mut tx)) = send.send_request(dial_head(), false) else { break };
                    let _ = tx.send_data(first.clone(), false);
                    held.push((resp, tx));
                }
                conns_send.push(send);
            }
            while !go.load(Ordering::Relaxed) {
                glommio::timer::sleep(Duration::from_millis(20)).await;
            }
            // Going away: the connections close with everything on them
            // (each ends once its last handle is gone).
            drop((held, conns_send));
            for c in conns {
                let _ = ringpeer::runtime::timeout(Duration::from_secs(5), c).await;
            }
        })
        .unwrap()
    });
    // Let the dials arrive, and the ones that cannot be established fail:
    // until every target connection belongs to a relayed stream.
    let stop = Arc::new(AtomicBool::new(false));
    let peaks = watch_rss(p, a, stop.clone());
    let t0 = Instant::now();
    let settled = within(Duration::from_secs(40), "every open target connection is a relayed stream", || {
        let open = st.target.open_conns() as i64;
        st.target.accepted() > 0
            && t0.elapsed() > Duration::from_millis(DIAL_TIMEOUT_MS)
            && metric(st.admin, "ringpeer_active_streams") == Some(open)
            && st.target.open_conns() as i64 == open
    });
    // Hold them a little, still never reading; meanwhile another client
    // dials the same agent. Logged, not asserted: this many stalled streams
    // hold more than half of `shard_buffer_bytes` in the relay, where the
    // tunnel's window no longer grows (it is what bounds memory), so the
    // dial may pass its deadline. Within the budget it is asserted:
    // `stalled_streams_leave_the_tunnel_open_to_new_dials`.
    let canary = with_clients(st.client_addr, &st.certs.path, 1, |cs| async move {
        let t0 = Instant::now();
        let r = cs[0].dial(&DialTarget::parse("agent-1/svc").unwrap(), Duration::from_secs(5)).await;
        (t0.elapsed(), r.err().map(|e| e.to_string()))
    });
    eprintln!("a canary dial during the attack: {canary:?}");
    std::thread::sleep(Duration::from_secs(1));
    let open = st.target.open_conns();
    let relayed = metric(st.admin, "ringpeer_active_streams").unwrap_or(-1);
    stop.store(true, Ordering::Relaxed);
    let (pp, ap) = peaks.join().unwrap();
    eprintln!(
        "settled after {settled:?}: {open} target connections open ({} accepted), the proxy relays {relayed}; \
         RSS proxy {} -> peak {} MiB, agent {} -> peak {} MiB",
        st.target.accepted(),
        base.0 / MIB,
        pp / MIB,
        base.1 / MIB,
        ap / MIB
    );
    eprintln!("{}", error_lines(st.admin));
    // The documented budget: per open dial at most PER_DIAL (h2 stream
    // state, the task, a cross-shard pipe, one pending message), plus the
    // buffers up to the soft level of `shard_buffer_bytes`, where they stop
    // growing. The whole run's peak is held to it, set-up storm included.
    const PER_DIAL: u64 = 40 << 10;
    let dials = (CONNS * PER_CONN) as u64;
    let proxy_budget = dials * PER_DIAL + ProxyLimits::default().shard_buffer_bytes as u64 / 2;
    let agent_budget = dials * PER_DIAL + AgentLimits::default().shard_buffer_bytes as u64 / 2;
    assert!(pp - base.0 <= proxy_budget, "proxy RSS grew {} MiB > {} MiB", (pp - base.0) / MIB, proxy_budget / MIB);
    assert!(ap - base.1 <= agent_budget, "agent RSS grew {} MiB > {} MiB", (ap - base.1) / MIB, agent_budget / MIB);
    // How many of the 10,000 set-ups beat the 3 s deadline depends on the
    // machine (100 to 4,525 here, with a debug build); whatever failed must
    // have left no target connection.
    assert!(open as i64 == relayed, "{open} target connections for {relayed} relayed streams");

    // The clients go away: every target connection closes.
    leave.store(true, Ordering::Relaxed);
    clients.join().unwrap();
    let took = within(Duration::from_secs(5), "every target connection closed after the clients left", || {
        st.target.open_conns() == 0
    });
    within(Duration::from_secs(5), "the proxy's stream gauge back to 0", || {
        metric(st.admin, "ringpeer_active_streams") == Some(0)
    });
    eprintln!("all {open} target connections closed {took:?} after the clients left");
}

/// Each budget, set small, refuses the first dial past it with
/// RESOURCE_EXHAUSTED naming the budget and its value, counted under its
/// own metric label, while the dials within it are served: streams per
/// tunnel at the agent, per client connection, per identity, and
/// connections per identity. (The shard buffer budget is exercised by the
/// slow readers above and unit-tested in `runtime::budget`.)
#[test]
fn each_budget_refuses_the_first_dial_past_it_naming_itself() {
    let _turn = turn();
    use ringpeer::tools::fleet::{agent_config, proxy_config, AgentHandle, ProxyHandle};
    use ringpeer::wire::status::Code;
    ringpeer::runtime::raise_memlock();
    let certs = CertDir::temp().unwrap();
    let echo = targets::spawn(Kind::Echo).unwrap();
    let mut cfg = proxy_config(&certs.path, "proxy-a", 1);
    cfg.limits =
        ProxyLimits { streams_per_conn: 4, streams_per_identity: 6, conns_per_identity: 2, ..Default::default() };
    let proxy = ProxyHandle::start(cfg).unwrap();
    let mut a1 = agent_config(&certs.path, "agent-1", &[proxy.tunnel_addr], &[("echo", echo.addr)]);
    a1.limits = AgentLimits { streams_per_conn: 3, ..Default::default() };
    let a2 = agent_config(&certs.path, "agent-2", &[proxy.tunnel_addr], &[("echo", echo.addr)]);
    let _agents = [AgentHandle::start(a1).unwrap(), AgentHandle::start(a2).unwrap()];
    proxy.wait_tunnels(2, Duration::from_secs(10)).unwrap();
    let refusals = with_clients(proxy.client_addr, &certs.path, 3, |cs| async move {
        let d = Duration::from_secs(5);
        let (one, two) = (DialTarget::parse("agent-1/echo").unwrap(), DialTarget::parse("agent-2/echo").unwrap());
        let mut out = Vec::new();
        let mut held = Vec::new();
        // Agent 1's tunnel takes 3 dial streams; the 4th is refused there.
        for _ in 0..3 {
            held.push(cs[0].dial(&one, d).await.expect("within the agent's budget"));
        }
        out.push(cs[0].dial(&one, d).await.err());
        // Connection 0 takes a 4th stream, not a 5th.
        held.push(cs[0].dial(&two, d).await.expect("within the connection's budget"));
        out.push(cs[0].dial(&two, d).await.err());
        // The identity takes 2 more on connection 1 (6 in all), not a 7th.
        for _ in 0..2 {
            held.push(cs[1].dial(&two, d).await.expect("within the identity's budget"));
        }
        out.push(cs[1].dial(&two, d).await.err());
        // Its third connection is over its budget of 2.
        out.push(cs[2].dial(&two, d).await.err());
        drop(held);
        out.into_iter().map(|e| e.map(|e| (e.code, e.message.to_string()))).collect::<Vec<_>>()
    });
    let want = [
        "budget streams_per_conn (3) reached",
        "budget streams_per_conn (4) reached",
        "budget streams_per_identity (6) reached",
        "budget conns_per_identity (2) reached",
    ];
    for (got, want) in refusals.iter().zip(want) {
        let (code, msg) = got.as_ref().unwrap_or_else(|| panic!("no refusal for {want}"));
        eprintln!("refused: {code:?} {msg:?}");
        assert_eq!(*code, Code::ResourceExhausted, "{msg}");
        assert!(msg.contains(want), "{msg:?} does not name {want:?}");
    }
    let m = &proxy.metrics;
    for label in ["budget_streams_per_conn", "budget_streams_per_identity", "budget_conns_per_identity"] {
        assert!(common::errors(m, label) >= 1, "{label} not counted");
    }
}

/// Dials per attacking connection, and their pace: under the rapid-reset
/// rule (MAX_RESETS_PER_SEC premature resets in a second end a connection),
/// so every reset goes down the cancellation path instead of ending its
/// connection early.
const RESETS_PER_CONN: usize = 200;
const RESET_EVERY: Duration = Duration::from_millis(25);

/// 5,000 dials reset in flight (HEADERS + DialRequest + RST_STREAM) over
/// 25 connections, each paced under the rapid-reset rule. A reset cancels
/// the dial at every hop: few reach the target, none outlives its reset by
/// a second, memory barely moves, and a canary client is served as fast as
/// before.
#[test]
fn reset_amplification_reaches_few_targets_and_leaves_nothing() {
    let _turn = turn();
    const CONNS: usize = 25;
    assert!(1_000_000 / RESET_EVERY.as_micros() as u32 <= MAX_RESETS_PER_SEC);
    let st = stage(Kind::Echo);
    let (p, a) = (st.proxy.0.id(), st.agent.0.id());
    let tls = ringpeer::client::client_tls(&st.certs.path, "client").unwrap();

    // The canary: one echo dial after another, idle first, then under attack.
    let phase = Arc::new(std::sync::atomic::AtomicU8::new(0));
    let (ph, canary_addr, canary_tls) = (phase.clone(), st.client_addr, tls.clone());
    let canary = std::thread::spawn(move || {
        ringpeer::runtime::block_on("canary", move || async move {
            let c = ringpeer::client::Client::connect(&canary_addr.to_string(), &canary_tls, &H2Tuning::default())
                .await
                .unwrap();
            let t = DialTarget::parse("agent-1/svc").unwrap();
            let (mut idle, mut attacked) = (Vec::new(), Vec::new());
            loop {
                let now = ph.load(Ordering::Relaxed);
                if now == 3 {
                    break;
                }
                let t0 = Instant::now();
                // Bounded: a canary reply lost on the way is a failure that
                // says so, not a test that never ends.
                let back = ringpeer::runtime::timeout(
                    Duration::from_secs(20),
                    ringpeer::tools::load::echo_roundtrip(&c, &t, b"canary"),
                )
                .await
                .unwrap_or_else(|_| panic!("a canary round trip got no answer within 20 s (phase {now})"));
                let took = t0.elapsed();
                assert_eq!(back.expect("the canary is served"), b"canary");
                match now {
                    0 => idle.push(took),
                    2 => attacked.push(took),
                    _ => {}
                }
                if now == 0 && idle.len() == 50 {
                    ph.store(1, Ordering::Relaxed);
                }
                glommio::timer::sleep(Duration::from_millis(5)).await;
            }
            (idle, attacked)
        })
        .unwrap()
    });
    while phase.load(Ordering::Relaxed) == 0 {
        std::thread::sleep(Duration::from_millis(10));
    }
    let base = (rss(p), rss(a));
    st.target.reset_peak();
    let stop = Arc::new(AtomicBool::new(false));
    let peaks = watch_rss(p, a, stop.clone());
    phase.store(2, Ordering::Relaxed);
    let addr = st.client_addr;
    let t0 = Instant::now();
    let sent = ringpeer::runtime::block_on("reset-amplification", move || async move {
        let first = encode_msg(&DialTarget::parse("agent-1/svc").unwrap().to_frame());
        let mut tasks = Vec::new();
        for _ in 0..CONNS {
            let (tls, first) = (tls.clone(), first.clone());
            tasks.push(glommio::spawn_local(async move {
                let (mut send, conn) = raw_client(addr, &tls).await;
                glommio::spawn_local(conn).detach();
                let start = Instant::now();
                let mut sent = 0;
                for i in 0..RESETS_PER_CONN {
                    if std::future::poll_fn(|cx| send.poll_ready(cx)).await.is_err() {
                        break;
                    }
                    let Ok((_resp, mut tx)) = send.send_request(dial_head(), false) else { break };
                    let _ = tx.send_data(first.clone(), false);
                    // In flight: the proxy has started the dial when the reset comes.
                    glommio::timer::sleep(Duration::from_millis(1)).await;
                    tx.send_reset(h2::Reason::CANCEL);
                    sent += 1;
                    let next = start + RESET_EVERY * (i as u32 + 1);
                    glommio::timer::sleep(next.saturating_duration_since(Instant::now())).await;
                }
                sent
            }));
        }
        let mut sent = 0;
        for t in tasks {
            sent += t.await;
        }
        sent
    })
    .unwrap();
    let attack = t0.elapsed();
    phase.store(3, Ordering::Relaxed);
    let (idle, attacked) = canary.join().unwrap();
    // Everything of the reset dials is gone within a second.
    let released = within(Duration::from_secs(1), "no target connection and no relayed stream left", || {
        st.target.open_conns() == 0 && metric(st.admin, "ringpeer_active_streams") == Some(0)
    });
    stop.store(true, Ordering::Relaxed);
    let (pp, ap) = peaks.join().unwrap();
    let (idle_m, attacked_m) = (median(idle), median(attacked.clone()));
    let cancelled = errors(st.admin, "cancelled");
    eprintln!(
        "{sent} dials reset in flight over {CONNS} connections in {attack:?}; the proxy cancelled {cancelled}; \
         the target accepted {} (at most {} at once); released {released:?} after the attack; \
         RSS proxy {} -> peak {} MiB, agent {} -> peak {} MiB; canary median {idle_m:?} idle, \
         {attacked_m:?} under attack ({} dials)",
        st.target.accepted(),
        st.target.peak_open(),
        base.0 / MIB,
        pp / MIB,
        base.1 / MIB,
        ap / MIB,
        attacked.len()
    );
    eprintln!("{}", error_lines(st.admin));
    assert_eq!(sent, CONNS * RESETS_PER_CONN);
    assert_eq!(errors(st.admin, "reset_flood"), 0, "the pace stayed under the rapid-reset rule");
    // Most resets must land while the dial is in flight, or this would not
    // test cancellation (a dial established within its 1 ms is not).
    assert!(cancelled as usize >= sent / 2, "only {cancelled} of {sent} resets cancelled a dial at the proxy");
    let setup = ProxyLimits::default().setup_per_conn;
    assert!(st.target.peak_open() <= setup, "{} target connections at once", st.target.peak_open());
    assert!(pp.saturating_sub(base.0) <= 64 * MIB, "proxy RSS grew {} MiB", (pp - base.0) / MIB);
    assert!(ap.saturating_sub(base.1) <= 64 * MIB, "agent RSS grew {} MiB", (ap - base.1) / MIB);
    assert!(attacked.len() >= 5, "the canary ran {} dials during the attack", attacked.len());
    // 1.1-1.65x when this test runs alone; 2.09x and 2.12x in two full
    // `scripts/test` runs on 2026-11-26, with the sibling tests of this
    // file on the same two cores (and an audit line per dial since then).
    assert!(attacked_m < idle_m * 3, "canary median {attacked_m:?} under attack vs {idle_m:?} idle");
}
