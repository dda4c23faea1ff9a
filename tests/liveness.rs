//! Liveness stories: when a connection counts as idle, and how fast a
//! frozen proxy stops getting work. Real sockets, real mTLS; the frozen
//! proxy is a real process stopped with SIGSTOP.

mod common;

use std::time::{Duration, Instant};

use ringpeer::tools::fleet::{agent_config, proxy_config, AgentHandle, CertDir, ProxyHandle};
use ringpeer::tools::load::echo_roundtrip;
use ringpeer::tools::target::{self as targets, Kind};
use ringpeer::wire::DialTarget;

fn t(s: &str) -> DialTarget {
    DialTarget::parse(s).unwrap()
}

/// A client busy with short dials keeps its one connection however long it
/// goes on, since every stream that opens or closes is activity; once it
/// stops, the connection is closed after the idle timeout plus one check.
#[test]
fn a_connection_busy_with_short_dials_is_never_idle_and_an_idle_one_goes_on_time() {
    ringpeer::runtime::raise_memlock();
    let certs = CertDir::temp().unwrap();
    let echo = targets::spawn(Kind::Echo).unwrap();
    let idle = Duration::from_millis(400);
    let mut cfg = proxy_config(&certs.path, "proxy-a", 1);
    cfg.h2.idle_timeout_ms = idle.as_millis() as u64;
    let proxy = ProxyHandle::start(cfg).unwrap();
    let _agent =
        AgentHandle::start(agent_config(&certs.path, "agent-1", &[proxy.tunnel_addr], &[("echo", echo.addr)])).unwrap();
    proxy.wait_tunnels(1, Duration::from_secs(10)).unwrap();
    let (busy_for, dials, closed_after) = common::with_client(proxy.client_addr, &certs.path, "client", move |c| {
        async move {
            // Short dials, one every 50 ms (never two open at once), for
            // three idle timeouts: a tick that samples open streams alone
            // would mostly see none.
            let t0 = Instant::now();
            let (mut dials, mut last) = (0, t0);
            while t0.elapsed() < idle * 3 {
                glommio::timer::sleep(Duration::from_millis(50)).await;
                assert_eq!(echo_roundtrip(&c, &t("agent-1/echo"), b"short").await.unwrap(), b"short");
                last = Instant::now();
                assert!(c.is_alive(), "GOAWAY after {:?} of short dials", t0.elapsed());
                dials += 1;
            }
            let busy_for = t0.elapsed();
            // Now idle: the proxy closes the connection.
            while c.is_alive() && last.elapsed() < Duration::from_secs(5) {
                glommio::timer::sleep(Duration::from_millis(5)).await;
            }
            (busy_for, dials, last.elapsed())
        }
    });
    let conns = proxy.metrics.sum(|s| s.client_conns.get());
    eprintln!("{dials} dials over {busy_for:?} on {conns} connection(s); closed {closed_after:?} after the last");
    assert_eq!(conns, 1, "one connection served every dial");
    assert!(busy_for >= idle * 2 + idle / 2, "{busy_for:?}");
    // Idle timeout, plus one check (a quarter of it), plus scheduling slack.
    assert!(closed_after >= idle - Duration::from_millis(50), "closed early: {closed_after:?}");
    assert!(closed_after <= idle + idle / 4 + Duration::from_millis(250), "closed late: {closed_after:?}");
}
