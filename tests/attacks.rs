//! Attack stories, played with a raw HTTP/2 client against a real proxy
//! and agent (in-process, real sockets and mTLS). Each asserts a bound.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::Fleet;
use ringpeer::transport::h2conf::{H2Tuning, MAX_RESETS_PER_SEC};
use ringpeer::wire::codec::encode_msg;
use ringpeer::wire::error::Label;
use ringpeer::wire::{paths, DialTarget};

type Conn = h2::client::Connection<ringpeer::transport::ClientTls, Bytes>;

/// A raw HTTP/2 connection to `addr` with the fleet's client certificate.
async fn raw_client(addr: &str, tls: &std::sync::Arc<rustls::ClientConfig>) -> (h2::client::SendRequest<Bytes>, Conn) {
    let (stream, _) = ringpeer::transport::connect_tls(tls, addr, Duration::from_secs(5)).await.unwrap();
    H2Tuning::default().client().handshake::<_, Bytes>(stream).await.unwrap()
}

/// The request head of a client dial.
fn dial_head() -> http::Request<()> {
    let mut req = http::Request::new(());
    *req.method_mut() = http::Method::POST;
    *req.uri_mut() = paths::uri(paths::PROXY_DIAL).clone();
    req.headers_mut().insert("content-type", http::HeaderValue::from_static("application/grpc"));
    req
}

/// A rapid-reset client: HEADERS + DialRequest + RST_STREAM, as fast as it
/// can, on one connection. The proxy ends the connection with GOAWAY
/// ENHANCE_YOUR_CALM, and the reset dials barely reach the agent's target.
#[test]
fn a_rapid_reset_flood_gets_goaway_enhance_your_calm_and_few_target_connects() {
    let fleet = Fleet::start(1);
    let addr = fleet.proxy.client_addr.to_string();
    let tls = ringpeer::client::client_tls(fleet.dir(), "client").unwrap();
    let (sent, reason, took) = ringpeer::runtime::block_on("rapid-reset", move || async move {
        let (mut send, conn) = raw_client(&addr, &tls).await;
        let ended = glommio::spawn_local(conn);
        let first = encode_msg(&DialTarget::parse("agent-1/echo").unwrap().to_frame());
        let t0 = Instant::now();
        let mut sent = 0u32;
        while sent < 100_000 {
            if let Err(e) = std::future::poll_fn(|cx| send.poll_ready(cx)).await {
                eprintln!("poll_ready: {e:?}");
                break;
            }
            let (_resp, mut tx) = match send.send_request(dial_head(), false) {
                Ok(v) => v,
                Err(e) => {
                    eprintln!("send_request: {e:?}");
                    break;
                }
            };
            let _ = tx.send_data(first.clone(), false);
            // Let the proxy accept the stream and start the dial before the
            // reset: resets of streams not yet accepted are h2's own bound
            // (max_pending_accept_reset_streams), this is ours.
            glommio::timer::sleep(Duration::from_micros(200)).await;
            tx.send_reset(h2::Reason::CANCEL);
            sent += 1;
        }
        let end = ringpeer::runtime::timeout(Duration::from_secs(10), ended).await;
        let reason = match end {
            Ok(Err(e)) => e.reason(),
            Ok(Ok(())) => None,
            Err(_) => panic!("the connection was still open 10 s after {sent} resets"),
        };
        (sent, reason, t0.elapsed())
    })
    .unwrap();
    eprintln!("{sent} reset streams sent in {took:?} before the connection ended ({reason:?})");
    // The client may not read the GOAWAY before the socket closes under its
    // flood; the proxy's count of connections it ended for a reset flood is
    // the evidence.
    let m = &fleet.proxy.metrics;
    common::eventually("the proxy ended the connection for a reset flood", || {
        m.sum(|s| s.error_count(Label::ResetFlood)) == 1
    });
    let cancels = m.sum(|s| s.error_count(Label::Cancelled));
    let accepted = fleet.echo.accepted();
    eprintln!("target connections: {accepted} made; the proxy handled {cancels} reset dials");
    // Cut once MAX_RESETS_PER_SEC (200) streams were reset before they were
    // established, within a second; streams the proxy had already
    // established when their reset came are ordinary cancels (counted, not
    // held against the client), so the total depends on the machine's pace.
    // Literal bounds, so a raised constant fails here too.
    assert_eq!(MAX_RESETS_PER_SEC, 200);
    assert!(took < Duration::from_secs(2), "the flood ran for {took:?}");
    assert!(sent < 5_000, "{sent} resets before the cut");
    assert!(cancels > 0 && accepted <= sent as usize, "{accepted} target connections for {sent} reset dials");
    // Every reset reached the agent: no target connection outlives its dial.
    let t0 = Instant::now();
    while fleet.echo.open_conns() > 0 {
        assert!(t0.elapsed() < Duration::from_secs(1), "{} target connections still open", fleet.echo.open_conns());
        std::thread::sleep(Duration::from_millis(5));
    }
    // The proxy still serves others.
    let back = fleet.client(|c| async move {
        ringpeer::tools::load::echo_roundtrip(&c, &DialTarget::parse("agent-1/echo").unwrap(), b"still here").await
    });
    assert_eq!(back.unwrap(), b"still here");
}

/// A slow-loris of dials: streams that send HEADERS and never their
/// `DialRequest`. Each would hold a task until the dial deadline; past the
/// per-connection set-up budget the proxy answers at once with
/// RESOURCE_EXHAUSTED naming the budget, and other clients are served.
#[test]
fn dials_that_never_send_their_request_are_held_to_the_setup_budget() {
    use ringpeer::transport::h2conf::MAX_SETUP_PER_CONN;
    use ringpeer::wire::status::Status;
    let fleet = Fleet::start(1);
    let addr = fleet.proxy.client_addr.to_string();
    let tls = ringpeer::client::client_tls(fleet.dir(), "client").unwrap();
    let (answered, status, took) = ringpeer::runtime::block_on("slow-loris", move || async move {
        let (mut send, conn) = raw_client(&addr, &tls).await;
        glommio::spawn_local(conn).detach();
        let mut held = Vec::new();
        let mut extra = None;
        for i in 0..=MAX_SETUP_PER_CONN {
            std::future::poll_fn(|cx| send.poll_ready(cx)).await.unwrap();
            let (resp, tx) = send.send_request(dial_head(), false).unwrap();
            if i < MAX_SETUP_PER_CONN {
                held.push((resp, tx));
            } else {
                extra = Some((resp, tx));
            }
        }
        let t0 = Instant::now();
        let (resp, _tx) = extra.unwrap();
        let resp = ringpeer::runtime::timeout(Duration::from_secs(3), resp).await.expect("answered").unwrap();
        let status = ringpeer::wire::status::Status::from_headers(resp.headers());
        (held.len(), status, t0.elapsed())
    })
    .unwrap();
    let status: Status = status.expect("a trailers-only status");
    eprintln!("{answered} dials held in set-up; the next one got {status} after {took:?}");
    assert_eq!(status.code, ringpeer::wire::status::Code::ResourceExhausted);
    assert!(status.message.contains("dials in set-up per connection"), "{status}");
    assert!(took < Duration::from_secs(1), "{took:?}");
    // Another client is served meanwhile.
    let back = fleet.client(|c| async move {
        ringpeer::tools::load::echo_roundtrip(&c, &DialTarget::parse("agent-1/echo").unwrap(), b"served").await
    });
    assert_eq!(back.unwrap(), b"served");
}
