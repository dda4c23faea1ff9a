//! Peer-link session tests against a real in-process peer: a glommio TCP
//! listener, rustls with certificates from `certs::init`, and an h2 server
//! built from `H2Tuning` (served by `h2conf::serve`). No mocks.

use std::cell::{Cell, RefCell};
use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::join_all;
use tokio_rustls::TlsAcceptor;

use super::*;
use crate::runtime::signal::Signal;
use crate::transport::h2conf::{serve, ActiveStreams};
use crate::transport::tls::{TlsFiles, TlsMaterial};

/// Runs one test on a fresh executor, with a fresh certificate directory.
fn run<F, Fut>(f: F)
where
    F: FnOnce(std::path::PathBuf) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + 'static,
{
    crate::runtime::raise_memlock();
    let dir = tempfile::tempdir().expect("tempdir");
    crate::transport::certs::init(dir.path(), "test").expect("certs");
    let path = dir.path().to_path_buf();
    crate::runtime::block_on("session-test", move || f(path)).expect("executor");
}

fn material(dir: &Path, name: &str) -> TlsMaterial {
    TlsMaterial::load(&TlsFiles::in_dir(dir, name), "test", Role::Proxy).expect("material")
}

/// An in-process peer proxy.
struct Peer {
    addr: String,
    /// TCP connections accepted.
    accepts: Rc<Cell<usize>>,
    /// TLS handshakes that resumed a session.
    resumed: Rc<Cell<usize>>,
    /// One trigger per connection: firing it makes the peer send GOAWAY.
    goaway: Rc<RefCell<Vec<Signal>>>,
}

/// Starts peer `name`, announcing `max_streams`; it answers every request
/// with 200 and echoes the request body.
fn peer(dir: &Path, name: &str, max_streams: u32) -> Peer {
    let acceptor = TlsAcceptor::from(material(dir, name).server_config(&[Role::Proxy]).expect("server config"));
    let h2 = H2Tuning { max_concurrent_streams: max_streams, ..H2Tuning::default() };
    let listener = glommio::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let p = Peer { addr, accepts: Rc::default(), resumed: Rc::default(), goaway: Rc::default() };
    let (accepts, resumed, goaway) = (p.accepts.clone(), p.resumed.clone(), p.goaway.clone());
    glommio::spawn_local(async move {
        while let Ok(tcp) = listener.accept().await {
            accepts.set(accepts.get() + 1);
            let (acceptor, h2, resumed, stop) = (acceptor.clone(), h2.clone(), resumed.clone(), Signal::new());
            goaway.borrow_mut().push(stop.clone());
            glommio::spawn_local(async move {
                let Ok((tls, _)) = crate::transport::accept_tls(&acceptor, tcp, Duration::from_secs(5)).await else {
                    return;
                };
                if tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
                    resumed.set(resumed.get() + 1);
                }
                let Ok(conn) = h2.server().handshake::<_, Bytes>(tls).await else { return };
                serve(conn, &h2, &stop, &ActiveStreams::default(), true, |req, mut respond| {
                    glommio::spawn_local(async move {
                        let mut body = req.into_body();
                        let Ok(mut tx) = respond.send_response(http::Response::new(()), false) else { return };
                        while let Some(Ok(d)) = body.data().await {
                            let _ = body.flow_control().release_capacity(d.len());
                            let _ = tx.send_data(d, false);
                        }
                        let _ = tx.send_data(Bytes::new(), true);
                    })
                    .detach();
                })
                .await;
            })
            .detach();
        }
    })
    .detach();
    p
}

fn new_links(dir: &Path, cfg: PeerLinkConfig) -> (PeerLinks, Signal) {
    let closing = Signal::new();
    (PeerLinks::new(material(dir, "proxy-a"), H2Tuning::default(), cfg, closing.clone()), closing)
}

fn soon() -> Instant {
    Instant::now() + Duration::from_secs(10)
}

fn req() -> http::Request<()> {
    http::Request::post("https://peer/proto.ProxyService/DialNode").body(()).expect("request")
}

/// Waits (up to 5 s) for a condition on observable state.
async fn eventually(what: &str, f: impl Fn() -> bool) {
    for _ in 0..500 {
        if f() {
            return;
        }
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for: {what}");
}

#[test]
fn goaway_drains_the_link_open_streams_finish_and_new_streams_get_a_new_link() {
    run(|dir| async move {
        let p = peer(&dir, "proxy-b", 100);
        let (links, _) = new_links(&dir, PeerLinkConfig::default());
        let mut s1 = links.stream("proxy-b", &p.addr, soon()).await.expect("first stream");
        let (resp, mut tx) = s1.send_request(req(), false).expect("open");
        let mut rx = resp.await.expect("response").into_body();
        let mut s2 = links.stream("proxy-b", &p.addr, soon()).await.expect("second slot");
        assert!(links.has_ready(&p.addr));

        p.goaway.borrow()[0].trigger();
        eventually("the GOAWAY is seen", || !links.has_ready(&p.addr)).await;
        assert_eq!(links.link_count(), 1, "a draining link stays open for its streams");

        // A slot handed out before the GOAWAY: opening on it fails, retry-safe.
        let e = s2.send_request(req(), true).expect_err("no new stream on a draining link");
        assert_eq!((e.retry, e.side, e.label), (Retry::Safe, Side::Peer, Label::GoAway), "{e}");

        // The open stream still works.
        tx.send_data(Bytes::from_static(b"ping"), false).expect("send on the draining link");
        assert_eq!(rx.data().await.expect("echo").expect("echo ok"), Bytes::from_static(b"ping"));

        // A new stream goes to a new link.
        let _s3 = links.stream("proxy-b", &p.addr, soon()).await.expect("stream on a new link");
        assert_eq!((p.accepts.get(), links.link_count()), (2, 2));

        // Once its stream ends, the draining link closes.
        tx.send_data(Bytes::new(), true).expect("end");
        while rx.data().await.is_some() {}
        drop((s1, s2, tx, rx));
        eventually("the drained link closes", || links.link_count() == 1).await;
        assert!(links.has_ready(&p.addr));
    });
}

#[test]
fn concurrent_first_dials_share_one_handshake() {
    run(|dir| async move {
        let p = peer(&dir, "proxy-b", 1000);
        let (links, closing) = new_links(&dir, PeerLinkConfig::default());
        let all = join_all((0..50).map(|_| links.stream("proxy-b", &p.addr, soon()))).await;
        assert!(all.iter().all(Result::is_ok), "every caller gets a slot");
        assert_eq!(p.accepts.get(), 1, "50 concurrent first dials, one TCP connection");
        assert_eq!((links.link_count(), links.load(&p.addr)), (1, 50));
        drop(all);
        assert_eq!(links.load(&p.addr), 0, "dropped slots are freed");

        closing.trigger();
        eventually("the link ends with the shard", || links.link_count() == 0).await;
    });
}

#[test]
fn streams_are_admitted_by_the_peers_settings_and_full_links_get_siblings_up_to_the_cap() {
    run(|dir| async move {
        let p = peer(&dir, "proxy-b", 5);
        let (links, _) = new_links(&dir, PeerLinkConfig::default());
        let mut held: Vec<_> = join_all((0..12).map(|_| links.stream("proxy-b", &p.addr, soon())))
            .await
            .into_iter()
            .collect::<Result<_, _>>()
            .expect("12 slots");
        assert_eq!(
            held[0].send.current_max_send_streams(),
            5,
            "the peer's SETTINGS were applied before the first slot"
        );
        assert_eq!((links.link_count(), p.accepts.get()), (3, 3), "12 streams over links of 5 need exactly 3");
        // Every slot really carries a stream: none is refused by the peer.
        let mut open = Vec::new();
        for s in &mut held {
            open.push(s.send_request(req(), false).expect("open"));
        }
        for (resp, _tx) in open.iter_mut() {
            let r = resp.await.expect("not refused");
            assert_eq!(r.status(), 200);
        }

        let cfg = PeerLinkConfig { max_links_per_peer: 2, ..PeerLinkConfig::default() };
        let (capped, _) = new_links(&dir, cfg);
        let mut ten = join_all((0..10).map(|_| capped.stream("proxy-b", &p.addr, soon()))).await;
        assert!(ten.iter().all(Result::is_ok));
        let t = Instant::now();
        let e = capped.stream("proxy-b", &p.addr, soon()).await.err().expect("the 11th does not fit");
        assert!(t.elapsed() < Duration::from_millis(50), "RESOURCE_EXHAUSTED at once, no waiting");
        assert_eq!((e.code, e.retry, e.label), (Code::ResourceExhausted, Retry::Safe, Label::ResourceExhausted));
        ten.pop();
        capped.stream("proxy-b", &p.addr, soon()).await.expect("a freed slot is reused");
        assert_eq!(capped.link_count(), 2);
    });
}

#[test]
fn a_second_connection_to_the_same_peer_resumes_tls() {
    run(|dir| async move {
        let p = peer(&dir, "proxy-b", 1);
        let (links, _) = new_links(&dir, PeerLinkConfig::default());
        let _one = links.stream("proxy-b", &p.addr, soon()).await.expect("first link");
        assert_eq!(links.resumed(), 0);
        let _two = links.stream("proxy-b", &p.addr, soon()).await.expect("sibling link");
        assert_eq!(links.link_count(), 2);
        assert_eq!((links.resumed(), p.resumed.get()), (1, 1), "the sibling resumed the first session");
    });
}

#[test]
fn a_black_holed_peer_fails_within_the_connect_timeout() {
    run(|dir| async move {
        // Accepts TCP (kernel backlog) but never answers the ClientHello.
        let hole = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = hole.local_addr().expect("addr").to_string();
        let limit = Duration::from_millis(500);
        let cfg = PeerLinkConfig { connect_timeout: limit, backoff_min: Duration::from_secs(4), ..Default::default() };
        let (links, _) = new_links(&dir, cfg);
        let t = Instant::now();
        let e = links.stream("proxy-b", &addr, soon()).await.err().expect("black hole");
        let took = t.elapsed();
        assert!(took >= limit - Duration::from_millis(50) && took < limit + Duration::from_millis(300), "{took:?}");
        assert_eq!(
            (e.code, e.side, e.retry, e.label),
            (Code::Unavailable, Side::Peer, Retry::Safe, Label::ConnectTimeout)
        );

        // A caller with less time left than the connect timeout waits only that long.
        let (short, _) = new_links(&dir, PeerLinkConfig::default());
        let t = Instant::now();
        let e = short.stream("proxy-b", &addr, Instant::now() + Duration::from_millis(200)).await.err().expect("late");
        assert!(t.elapsed() < Duration::from_millis(450), "{:?}", t.elapsed());
        assert_eq!((e.code, e.side, e.retry), (Code::DeadlineExceeded, Side::Peer, Retry::Safe));
        drop(hole);
    });
}

#[test]
fn a_failed_address_backs_off_and_calls_fail_at_once() {
    run(|dir| async move {
        let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").to_string();
        let cfg = PeerLinkConfig {
            backoff_min: Duration::from_millis(200),
            backoff_max: Duration::from_millis(300),
            ..PeerLinkConfig::default()
        };
        let (links, _) = new_links(&dir, cfg);
        let e = links.stream("proxy-b", &dead, soon()).await.err().expect("refused");
        assert_eq!((e.label, e.retry), (Label::Connect, Retry::Safe), "{e}");
        let t = Instant::now();
        let e = links.stream("proxy-b", &dead, soon()).await.err().expect("backing off");
        assert!(t.elapsed() < Duration::from_millis(50), "no connect attempt during backoff");
        assert_eq!(
            (e.code, e.side, e.retry, e.label),
            (Code::Unavailable, Side::Peer, Retry::Safe, Label::PeerBackoff)
        );
        // The capped delay (at most 300 ms) passes: the next call tries again.
        glommio::timer::sleep(Duration::from_millis(350)).await;
        let e = links.stream("proxy-b", &dead, soon()).await.err().expect("still refused");
        assert_eq!(e.label, Label::Connect, "a new attempt, not the backoff: {e}");
    });
}

#[test]
fn a_peer_with_another_name_fails_the_tls_handshake_retry_safe() {
    run(|dir| async move {
        let p = peer(&dir, "proxy-b", 100);
        let (links, _) = new_links(&dir, PeerLinkConfig::default());
        let e = links.stream("proxy-c", &p.addr, soon()).await.err().expect("wrong name");
        assert_eq!(
            (e.code, e.side, e.retry, e.label),
            (Code::Unavailable, Side::Peer, Retry::Safe, Label::TlsHandshake)
        );
        assert_eq!(links.link_count(), 0);
    });
}

#[test]
fn links_of_a_proxy_that_left_drain_and_close_when_their_streams_end() {
    run(|dir| async move {
        let p = peer(&dir, "proxy-b", 100);
        let (links, _) = new_links(&dir, PeerLinkConfig::default());
        let s = links.stream("proxy-b", &p.addr, soon()).await.expect("stream");
        links.retain_proxies(|name| name != "proxy-b");
        assert!(!links.has_ready(&p.addr), "no new streams on the link of a proxy that left");
        assert_eq!(links.link_count(), 1, "its open stream keeps it");
        drop(s);
        eventually("the drained link closes", || links.link_count() == 0).await;
    });
}

#[test]
fn a_link_whose_ping_is_overdue_gets_no_new_stream_unless_it_is_the_last_resort() {
    run(|dir| async move {
        let p = peer(&dir, "proxy-b", 100);
        let (links, _) = new_links(&dir, PeerLinkConfig::default());
        let _s1 = links.stream("proxy-b", &p.addr, soon()).await.expect("first stream");
        let health = links.inner.dests.borrow()[&p.addr].links[0].health.clone();
        // The keepalive misses one answer (what a frozen peer does).
        health.mark(true);
        assert!(!links.has_ready(&p.addr), "the plan ranks a suspect link after live ones");
        let t0 = Instant::now();
        let e = links.stream("proxy-b", &p.addr, soon()).await.err().expect("no stream on a suspect link");
        assert_eq!((e.retry, e.side, e.label), (Retry::Safe, Side::Peer, Label::LinkSuspect), "{e}");
        assert!(e.message.contains("keepalive ping has been unanswered"), "{e}");
        assert!(t0.elapsed() < Duration::from_millis(50), "fails at once, no connect to the frozen peer");
        assert_eq!(p.accepts.get(), 1, "no sibling link was dialled");
        // With nowhere else to go, the dial takes its chance on the link.
        let _s2 = links.stream_last_resort("proxy-b", &p.addr, soon()).await.expect("last resort");
        // The answer arrives: the link is live again.
        health.mark(false);
        assert!(links.has_ready(&p.addr));
        let _s3 = links.stream("proxy-b", &p.addr, soon()).await.expect("stream after the pong");
        assert_eq!((p.accepts.get(), links.link_count()), (1, 1));
    });
}
