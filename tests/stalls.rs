//! Stall stories: clients that never read (or a target that never reads)
//! hold their streams' share of a tunnel's connection window; new dials to
//! the same agent must still be established at once, within the memory
//! bound. Real proxy and agent processes (see `common::stage`).

mod common;

use common::stage::*;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::procs::metric;
use ringpeer::proxy::outbound::sibling::PIPE_CAP;
use ringpeer::runtime::budget::{AgentLimits, ProxyLimits};
use ringpeer::tools::target::{self as targets, Kind};
use ringpeer::transport::h2conf::H2Tuning;
use ringpeer::wire::codec::encode_msg;
use ringpeer::wire::DialTarget;

/// 200 stalled streams (5 connections x 40, from clients that never grant
/// window) to a service that writes forever: on the tunnel they may hold
/// 800 MiB of stream windows, 25 times its 32 MiB connection window. The
/// tunnel's window grows with its streams, within the shard's buffer
/// budget, so every stalled dial is established, and a canary client then
/// dials an echo service on the same agent 10 times: each dial is
/// established and echoes within 1 s, while both processes stay within the
/// documented bound.
#[test]
fn stalled_streams_leave_the_tunnel_open_to_new_dials() {
    let _turn = turn();
    stalled_story(false)
}

/// The same, the stalled clients also uploading as fast as they are let
/// to a target that never reads: their data holds the agent's side of the
/// tunnel (the agent is its HTTP/2 server), whose window grows the same way.
// Known limit, not yet met: clients that upload at full speed the moment
// their streams open fill each stream's 4 MiB window within one window
// tick (50 ms), before the agent can lower the stream window, and 200 x
// 4 MiB exceeds the tunnel's window plus its pool. It passed here in
// several runs and failed on a clean CI run (all 10 canaries at the 3 s
// deadline). Run with `cargo test --test stalls -- --ignored`.
#[test]
#[ignore = "known limit: a burst of full-speed uploads outruns the 50 ms window tick (README, failure modes)"]
fn stalled_uploads_leave_the_tunnel_open_to_new_dials() {
    let _turn = turn();
    stalled_story(true)
}

fn stalled_story(upload: bool) {
    const CONNS: usize = 5;
    const PER_CONN: usize = 40;
    const CANARY: usize = 10;
    let echo = targets::spawn(Kind::Echo).unwrap();
    let st = stage_with(Kind::Flood, Some(echo.addr));
    let (p, a) = (st.proxy.0.id(), st.agent.0.id());
    let base = (rss(p), rss(a));
    let stop = Arc::new(AtomicBool::new(false));
    let peaks = watch_rss(p, a, stop.clone());
    let tls = ringpeer::client::client_tls(&st.certs.path, "client").unwrap();
    let addr = st.client_addr;
    let leave = Arc::new(AtomicBool::new(false));
    let go = leave.clone();
    let stalled = std::thread::spawn(move || {
        ringpeer::runtime::block_on("stalled", move || async move {
            let first = encode_msg(&DialTarget::parse("agent-1/svc").unwrap().to_frame());
            let (mut held, mut sends) = (Vec::new(), Vec::new());
            for _ in 0..CONNS {
                let (mut send, conn) = raw_client(addr, &tls).await;
                glommio::spawn_local(conn).detach();
                for _ in 0..PER_CONN {
                    std::future::poll_fn(|cx| send.poll_ready(cx)).await.unwrap();
                    let (resp, mut tx) = send.send_request(dial_head(), false).unwrap();
                    tx.send_data(first.clone(), false).unwrap();
                    if upload {
                        // Writes as fast as the proxy's windows let it.
                        glommio::spawn_local(async move {
                            let _resp = resp;
                            let chunk = ringpeer::wire::codec::encode_data(&[7u8; 16 << 10]);
                            loop {
                                tx.reserve_capacity(chunk.len());
                                match std::future::poll_fn(|cx| tx.poll_capacity(cx)).await {
                                    Some(Ok(n)) if n >= chunk.len() => {
                                        if tx.send_data(chunk.clone(), false).is_err() {
                                            break;
                                        }
                                    }
                                    Some(Ok(_)) => {}
                                    _ => break,
                                }
                            }
                        })
                        .detach();
                    } else {
                        held.push((resp, tx));
                    }
                }
                sends.push(send);
            }
            while !go.load(Ordering::Relaxed) {
                glommio::timer::sleep(Duration::from_millis(20)).await;
            }
            drop((held, sends));
        })
        .unwrap()
    });
    // Every stalled dial reaches the target, which starts writing at once.
    let dials = CONNS * PER_CONN;
    within(Duration::from_secs(20), "every stalled dial reached the target", || st.target.accepted() >= dials);
    // The floods fill every window they are given (no event tells when:
    // 4 MiB per stream on loopback takes well under this).
    std::thread::sleep(Duration::from_millis(1_000));
    let established = metric(st.admin, "ringpeer_active_streams").unwrap_or(-1);
    let echo_addr = DialTarget::parse("agent-1/echo").unwrap();
    let canary = with_clients(st.client_addr, &st.certs.path, 1, move |cs| async move {
        let mut took = Vec::new();
        for i in 0..CANARY {
            let t0 = Instant::now();
            let data = format!("canary {i}");
            let r = ringpeer::tools::load::echo_roundtrip(&cs[0], &echo_addr, data.as_bytes()).await;
            took.push((t0.elapsed(), r.map(|b| b == data.as_bytes()).map_err(|e| e.to_string())));
        }
        took
    });
    stop.store(true, Ordering::Relaxed);
    let (pp, ap) = peaks.join().unwrap();
    eprintln!(
        "{dials} stalled dials ({established} relayed, upload {upload}); canary dials {canary:?}; \
         RSS proxy {} -> peak {} MiB, agent {} -> peak {} MiB",
        base.0 / MIB,
        pp / MIB,
        base.1 / MIB,
        ap / MIB
    );
    eprintln!("{}", error_lines(st.admin));
    leave.store(true, Ordering::Relaxed);
    for (i, (took, r)) in canary.iter().enumerate() {
        assert_eq!(r, &Ok(true), "canary dial {i} after {took:?}");
        assert!(*took < Duration::from_secs(1), "canary dial {i} took {took:?}");
    }
    assert_eq!(established, dials as i64, "every stalled dial was established");
    // The documented bound: per open dial PER_DIAL, and per stalled dial
    // that crosses shards a full pipe (PIPE_CAP frames); plus each
    // connection's own window (the tunnel's and, uploading, each client
    // connection's: 32 MiB) and the buffers up to the soft level of
    // `shard_buffer_bytes` (what the windows may grow by is part of it).
    const PER_DIAL: u64 = 40 << 10;
    let h2 = H2Tuning::default();
    let pipe = (PIPE_CAP as u64) * h2.max_frame_size as u64;
    let window = h2.connection_window as u64 * if upload { CONNS as u64 + 1 } else { 1 };
    let proxy_budget = dials as u64 * (PER_DIAL + pipe) + window + ProxyLimits::default().shard_buffer_bytes as u64 / 2;
    let agent_budget = dials as u64 * PER_DIAL + window + AgentLimits::default().shard_buffer_bytes as u64 / 2;
    assert!(pp - base.0 <= proxy_budget, "proxy RSS grew {} MiB > {} MiB", (pp - base.0) / MIB, proxy_budget / MIB);
    assert!(ap - base.1 <= agent_budget, "agent RSS grew {} MiB > {} MiB", (ap - base.1) / MIB, agent_budget / MIB);
    stalled.join().unwrap();
}
