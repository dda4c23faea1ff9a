//! Errors after establishment keep their code: once the agent answered
//! `ConnectionEstablished`, a client that sends a compressed message, a
//! message that is not a `Frame`, or a second `DialRequest` gets
//! INVALID_ARGUMENT with the reason in `grpc-message`, through a real proxy
//! to an echo agent (in-process, real sockets and mTLS), from a raw HTTP/2
//! client.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::Fleet;
use ringpeer::transport::h2conf::H2Tuning;
use ringpeer::wire::codec::{encode_data, encode_msg};
use ringpeer::wire::status::{Code, Status};
use ringpeer::wire::{paths, DialTarget};

/// Dials agent-1/echo, waits for establishment, sends `bad`, and returns
/// the call's final status and how long it took after `bad` was sent.
fn status_after(fleet: &Fleet, bad: Bytes) -> (Status, Duration) {
    let addr = fleet.proxy.client_addr.to_string();
    let tls = ringpeer::client::client_tls(fleet.dir(), "client").unwrap();
    ringpeer::runtime::block_on("after-establishment", move || async move {
        let (stream, _) = ringpeer::transport::connect_tls(&tls, &addr, Duration::from_secs(5)).await.unwrap();
        let (mut send, conn) = H2Tuning::default().client().handshake::<_, Bytes>(stream).await.unwrap();
        glommio::spawn_local(conn).detach();
        let mut req = http::Request::new(());
        *req.method_mut() = http::Method::POST;
        *req.uri_mut() = paths::uri(paths::PROXY_DIAL).clone();
        req.headers_mut().insert("content-type", http::HeaderValue::from_static("application/grpc"));
        std::future::poll_fn(|cx| send.poll_ready(cx)).await.unwrap();
        let (resp, mut tx) = send.send_request(req, false).unwrap();
        tx.send_data(encode_msg(&DialTarget::parse("agent-1/echo").unwrap().to_frame()), false).unwrap();
        let resp = resp.await.unwrap();
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        // The first message is ConnectionEstablished.
        let first = body.data().await.expect("establishment").unwrap();
        let _ = body.flow_control().release_capacity(first.len());
        // A good echo first, so the relay is running.
        tx.send_data(encode_data(b"ping"), false).unwrap();
        let echoed = body.data().await.expect("echo").unwrap();
        let _ = body.flow_control().release_capacity(echoed.len());
        let t0 = Instant::now();
        tx.send_data(bad, false).unwrap();
        while let Some(d) = body.data().await {
            let Ok(d) = d else { break };
            let _ = body.flow_control().release_capacity(d.len());
        }
        let trailers = ringpeer::runtime::timeout(Duration::from_secs(5), body.trailers())
            .await
            .expect("trailers within 5 s")
            .expect("trailers, not a reset")
            .expect("trailers present");
        (Status::from_headers(&trailers).expect("a grpc-status"), t0.elapsed())
    })
    .unwrap()
}

fn assert_invalid_argument(what: &str, s: &Status, took: Duration, mentions: &str) {
    eprintln!("{what}: {s} after {took:?}");
    assert_eq!(s.code, Code::InvalidArgument, "{what}: {s}");
    assert!(s.message.to_lowercase().contains(mentions), "{what}: {s:?} should mention {mentions:?}");
    assert!(took < Duration::from_secs(2), "{what}: {took:?}");
}

#[test]
fn a_compressed_message_after_establishment_is_invalid_argument() {
    let fleet = Fleet::start(1);
    let mut m = encode_data(b"squeezed").to_vec();
    m[0] = 1; // the compressed flag; nothing was negotiated
    let (s, took) = status_after(&fleet, m.into());
    assert_invalid_argument("compressed", &s, took, "compress");
}

#[test]
fn a_message_that_is_not_a_frame_after_establishment_is_invalid_argument() {
    let fleet = Fleet::start(1);
    let garbage = [0u8, 0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff];
    let (s, took) = status_after(&fleet, Bytes::copy_from_slice(&garbage));
    assert_invalid_argument("garbage", &s, took, "malformed");
}

#[test]
fn a_second_dial_request_after_establishment_is_invalid_argument() {
    let fleet = Fleet::start(1);
    let again = encode_msg(&DialTarget::parse("agent-1/echo").unwrap().to_frame());
    let (s, took) = status_after(&fleet, again);
    assert_invalid_argument("second DialRequest", &s, took, "non-data frame");
}
