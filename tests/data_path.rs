//! Data path stories, in process: real sockets, real mTLS, the production
//! proxy and agent code, port-0 listeners.

mod common;

use std::time::Duration;

use common::{random_bytes, sha256, Fleet};
use ringpeer::tools::fleet::{agent_config, proxy_config, AgentHandle, CertDir, ProxyHandle};
use ringpeer::tools::load::{echo_roundtrip, open};
use ringpeer::tools::target::{self as targets, Kind};
use ringpeer::wire::error::Label;
use ringpeer::wire::status::Code;
use ringpeer::wire::DialTarget;

fn t(s: &str) -> DialTarget {
    DialTarget::parse(s).unwrap()
}

#[test]
fn sixteen_mib_of_random_bytes_round_trip_intact() {
    // Agent-1 connects to the proxy; a client dials agent-1/echo through it;
    // 16 MiB of random bytes come back with the same checksum.
    let fleet = Fleet::start(1);
    let data = random_bytes(16 << 20);
    let sum = sha256(&data);
    let back = fleet.client(move |c| async move { echo_roundtrip(&c, &t("agent-1/echo"), &data).await });
    let back = back.expect("echo succeeds");
    assert_eq!(back.len(), 16 << 20);
    assert_eq!(sha256(&back), sum);
    assert!(fleet.proxy.metrics.sum(|s| s.bytes_up.get()) >= 16 << 20);
}

#[test]
fn a_thousand_concurrent_streams_over_one_tunnel_all_intact() {
    let fleet = Fleet::start(1);
    let results = fleet.client(|c| async move {
        let tasks: Vec<_> = (0..1000usize)
            .map(|i| {
                let c = c.clone();
                glommio::spawn_local(async move {
                    let payload: Vec<u8> = (0..2048 + i).map(|j| (i * 31 + j) as u8).collect();
                    let back = echo_roundtrip(&c, &t("agent-1/echo"), &payload).await;
                    back.map(|b| b == payload)
                })
            })
            .collect();
        let mut ok = 0;
        for task in tasks {
            if task.await == Ok(true) {
                ok += 1;
            }
        }
        ok
    });
    assert_eq!(results, 1000, "every stream must come back intact");
    assert_eq!(fleet.proxy.metrics.sum(|s| s.dials.get()), 1000);
    assert_eq!(fleet.proxy.metrics.sum(|s| s.dials_failed.get()), 0);
}

#[test]
fn half_close_still_delivers_the_full_response() {
    // The client sends 3 MiB to the sink and closes its side; the sink only
    // answers (with the byte count) after it saw EOF, so the answer arrives
    // on a half-closed stream.
    let fleet = Fleet::start(1);
    let (count, status) = fleet.client(|c| async move {
        let mut d = open(&c, &t("agent-1/sink")).await.unwrap();
        for _ in 0..48 {
            d.write(&[7u8; 65536]).await.unwrap();
        }
        d.close_write().unwrap();
        let mut got = Vec::new();
        while let Some(b) = d.read().await.unwrap() {
            got.extend_from_slice(&b);
        }
        (got, d.status().await)
    });
    assert_eq!(count, (48u64 * 65536).to_be_bytes());
    assert!(status.is_ok(), "{status}");
}

#[test]
fn a_client_that_resets_its_dial_closes_the_agents_target_connection() {
    // The client opens a dial, sees one echo (so the target connection is
    // up), then resets the stream. The reset must travel proxy → agent and
    // close the agent's connection to the target; the proxy counts it as a
    // client cancel.
    let fleet = Fleet::start(1);
    let open_at_target = fleet.echo.open_counter();
    let closed_after = fleet.client(|c| async move {
        use std::sync::atomic::Ordering;
        let mut d = open(&c, &t("agent-1/echo")).await.unwrap();
        d.write(b"ping").await.unwrap();
        let mut got = Vec::new();
        d.read_exact(&mut got, 4).await.unwrap();
        assert_eq!(got, b"ping");
        assert_eq!(open_at_target.load(Ordering::Relaxed), 1);
        // Reset only this stream; the client's connection stays up, so only
        // the RST_STREAM can close the target connection.
        d.cancel();
        let t0 = std::time::Instant::now();
        while open_at_target.load(Ordering::Relaxed) > 0 {
            assert!(t0.elapsed() < Duration::from_secs(5), "the target connection stayed open after the reset");
            glommio::timer::sleep(Duration::from_millis(1)).await;
        }
        t0.elapsed()
    });
    eprintln!("the target connection closed {closed_after:?} after the client's reset");
    assert!(closed_after < Duration::from_secs(1), "{closed_after:?}");
    common::eventually("the proxy counted a client cancel", || {
        fleet.proxy.metrics.sum(|s| s.error_count(Label::Cancelled)) == 1
    });
}

#[test]
fn dial_errors_are_grpc_statuses_with_clear_messages() {
    let fleet = Fleet::start(1);
    let errs = fleet.client(|c| async move {
        let mut out = Vec::new();
        for spec in ["nobody/echo", "agent-1/ssh", "agent-1/refused", "agent-1"] {
            out.push((spec, open(&c, &t(spec)).await.err()));
        }
        out
    });
    let get = |spec: &str| errs.iter().find(|(s, _)| *s == spec).unwrap().1.clone().expect("dial must fail");
    let e = get("nobody/echo");
    assert_eq!(e.code, Code::NotFound);
    assert!(e.message.contains("no route to agent \"nobody\""), "{e}");
    let e = get("agent-1/ssh");
    assert_eq!(e.code, Code::NotFound);
    assert!(e.message.contains("has no service \"ssh\""), "{e}");
    let e = get("agent-1/refused");
    assert_eq!(e.code, Code::Unavailable);
    assert!(e.message.contains("service refused at"), "{e}");
    let e = get("agent-1");
    assert_eq!(e.code, Code::NotFound, "agent-1 has several services, so one must be named: {e}");
    assert_eq!(fleet.proxy.metrics.sum(|s| s.code_count(Code::NotFound)), 3);
    assert_eq!(fleet.proxy.metrics.sum(|s| s.code_count(Code::Unavailable)), 1);
}

#[test]
fn a_client_on_the_non_owner_shard_reaches_the_agent_across_shards() {
    // Two shards; the client port is open only on shard 0 and the tunnel port
    // only on shard 1, so every dial must cross shards.
    ringpeer::runtime::raise_memlock();
    let certs = CertDir::temp().unwrap();
    let echo = targets::spawn(Kind::Echo).unwrap();
    let cfg = proxy_config(&certs.path, "proxy-a", 2);
    let listeners = common::split_shards(0);
    let proxy = ProxyHandle::start_with(cfg, listeners).unwrap();
    let _agent =
        AgentHandle::start(agent_config(&certs.path, "agent-1", &[proxy.tunnel_addr], &[("echo", echo.addr)])).unwrap();
    proxy.wait_tunnels(1, Duration::from_secs(10)).unwrap();
    assert_eq!(proxy.metrics.shards[1].tunnels.get(), 1, "the tunnel lives on shard 1");
    let data = random_bytes(4 << 20);
    let sum = sha256(&data);
    let back = common::with_client(proxy.client_addr, &certs.path, "client", move |c| async move {
        let mut handles = Vec::new();
        for _ in 0..20 {
            let c = c.clone();
            handles.push(glommio::spawn_local(
                async move { echo_roundtrip(&c, &t("agent-1/echo"), &[9u8; 10_000]).await },
            ));
        }
        for h in handles {
            assert_eq!(h.await.unwrap(), vec![9u8; 10_000]);
        }
        echo_roundtrip(&c, &t("agent-1/echo"), &data).await
    });
    assert_eq!(sha256(&back.unwrap()), sum);
    assert_eq!(proxy.metrics.shards[0].dials_cross_shard.get(), 21);
    assert_eq!(proxy.metrics.shards[0].dials_local.get(), 0);
}

#[test]
fn a_client_certificate_from_another_ca_is_refused() {
    let fleet = Fleet::start(1);
    let other = CertDir::temp().unwrap();
    let tls = ringpeer::client::client_tls(&other.path, "client").unwrap();
    let addr = fleet.proxy.client_addr.to_string();
    let r = ringpeer::runtime::block_on("rogue", move || async move {
        ringpeer::client::Client::connect(&addr, &tls, &Default::default()).await.map(|_| ()).map_err(|e| e.to_string())
    })
    .unwrap();
    let e = r.expect_err("a foreign CA must not connect");
    assert!(e.contains("TLS handshake"), "{e}");
    common::eventually("refusal counted", || common::errors(&fleet.proxy.metrics, "tls_handshake") == 1);
    // That client refused the proxy first (it does not trust our CA). One
    // that trusts our CA but presents the foreign certificate leaves the
    // verdict to the proxy, which must refuse it at TLS.
    let foreign = common::client_config_presenting(
        fleet.dir(),
        &other.path,
        "client",
        ringpeer::transport::identity::Role::Client,
    );
    let v = common::tls_verdict(fleet.proxy.client_addr, foreign);
    assert!(matches!(v, common::TlsVerdict::Refused(_)), "the proxy must refuse a foreign-CA client at TLS: {v:?}");
    common::eventually("both refusals counted", || common::errors(&fleet.proxy.metrics, "tls_handshake") == 2);
    assert_eq!(fleet.proxy.metrics.sum(|s| s.client_conns.get()), 0);
}

#[test]
fn an_agent_certificate_cannot_be_used_as_a_client_and_an_agent_from_another_ca_gets_no_tunnel() {
    use common::{errors, tls_verdict, TlsVerdict};
    use ringpeer::transport::identity::Role;
    let fleet = Fleet::start(1);
    let m = &fleet.proxy.metrics;
    let tunnels = || m.shards.iter().map(|s| s.tunnels.get()).sum::<i64>();
    assert_eq!(tunnels(), 2);
    assert_eq!(errors(m, "tls_handshake"), 0);
    // A client presenting an agent certificate: the client edge's TLS layer
    // refuses it (a fatal alert, not a gRPC status on a served connection).
    let wrong_role = common::client_config_as(fleet.dir(), "agent-1", Role::Agent, None);
    let v = tls_verdict(fleet.proxy.client_addr, wrong_role);
    assert!(
        matches!(v, TlsVerdict::Refused(_)),
        "an agent certificate must be refused at TLS on the client port: {v:?}"
    );
    common::eventually("the wrong-role refusal counted", || errors(m, "tls_handshake") == 1);
    // Another CA's "agent-1", from a peer that trusts our CA (so only the
    // proxy's verifier can refuse it): no TLS on the tunnel port.
    let other = CertDir::temp().unwrap();
    let foreign = common::client_config_presenting(fleet.dir(), &other.path, "agent-1", Role::Agent);
    let v = tls_verdict(fleet.proxy.tunnel_addr, foreign);
    assert!(matches!(v, TlsVerdict::Refused(_)), "a foreign-CA agent must be refused at TLS on the tunnel port: {v:?}");
    common::eventually("the foreign certificate's refusal counted", || errors(m, "tls_handshake") == 2);
    // A whole agent from another CA keeps trying; watch two of its attempts
    // being refused (the proxy counts each), and the tunnel count not move.
    ringpeer::transport::certs::issue(&other.path, Role::Agent, "agent-9").unwrap();
    let rogue = agent_config(&other.path, "agent-9", &[fleet.proxy.tunnel_addr], &[("echo", fleet.echo.addr)]);
    let _rogue = AgentHandle::start(rogue).unwrap();
    common::eventually("two of the rogue's attempts refused", || errors(m, "tls_handshake") >= 4);
    assert_eq!(tunnels(), 2, "the rogue agent got no tunnel");
    assert_eq!(m.sum(|s| s.client_conns.get()), 0, "no client connection was served");
}

#[test]
fn a_handshake_without_alpn_h2_is_refused() {
    let fleet = Fleet::start(1);
    let base = common::client_config_as(fleet.dir(), "client", ringpeer::transport::identity::Role::Client, None);
    let addr = fleet.proxy.client_addr;
    for alpn in [vec![], vec![b"http/1.1".to_vec()]] {
        let mut cfg = (*base).clone();
        cfg.alpn_protocols = alpn.clone();
        let cfg = std::sync::Arc::new(cfg);
        let served = ringpeer::runtime::block_on("alpn", move || async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let tcp = glommio::net::TcpStream::connect(addr).await.unwrap();
            let io = ringpeer::transport::io::GlommioIo::new(tcp);
            let name = ringpeer::transport::tls::server_name("127.0.0.1");
            let Ok(mut tls) = tokio_rustls::TlsConnector::from(cfg).connect(name, io).await else { return false };
            // The server closes instead of speaking HTTP/2.
            let _ = tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
            let mut buf = [0u8; 64];
            matches!(tls.read(&mut buf).await, Ok(n) if n > 0)
        })
        .unwrap();
        assert!(!served, "a connection without ALPN h2 must not be served");
    }
    let m = &fleet.proxy.metrics;
    common::eventually("both refusals counted", || {
        m.sum(|s| s.error_count(Label::NoAlpn)) == 1 && m.sum(|s| s.error_count(Label::TlsHandshake)) == 1
    });
    assert_eq!(m.sum(|s| s.client_conns.get()), 0);
}
