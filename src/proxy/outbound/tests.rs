//! The failover choice and the upstream order, as pure functions.

use std::sync::Arc;

use super::*;
use crate::wire::status::Code;

fn remote(proxy: &str, addr: Option<&str>) -> RemoteRoute {
    RemoteRoute {
        proxy: Arc::from(proxy),
        shard: 0,
        peer_addr: addr.map(Arc::from),
        services: Arc::from(vec![]),
        draining: false,
    }
}

fn names(p: &[Upstream]) -> Vec<String> {
    p.iter().map(|u| format!("{u:?}")).collect()
}

#[test]
fn a_sibling_comes_before_peers_and_live_least_loaded_links_come_first() {
    let r = [remote("b", Some("b:1")), remote("c", Some("c:1")), remote("d", Some("d:1")), remote("e", None)];
    let link = |a: &str| match a {
        "b:1" => (false, 0),
        "c:1" => (true, 9),
        _ => (true, 2),
    };
    let p = plan(0, None, [0, 1], &r, true, link);
    assert_eq!(names(&p), ["Sibling(1)", "Peer(d at d:1)", "Peer(c at c:1)", "Peer(b at b:1)"]);
}

#[test]
fn a_dial_from_a_peer_gets_no_peer_upstreams_and_this_shard_is_not_its_own_sibling() {
    let r = [remote("b", Some("b:1"))];
    let p = plan(1, None, [1], &r, false, |_| (true, 0));
    assert!(p.is_empty(), "{:?}", names(&p));
}

#[test]
fn failover_follows_the_retry_class_never_the_text() {
    let refused = Error::from_h2(Side::Peer, false, &h2::Error::from(h2::Reason::REFUSED_STREAM));
    assert_eq!(after_failure(&refused, 0), Next::Again);
    assert_eq!(after_failure(&refused, MAX_REFUSED_RETRIES), Next::Skip, "a peer that keeps refusing is skipped");
    let down = Error::unavailable(Side::Peer, Retry::Safe, Label::PeerUnreachable, "refused");
    assert_eq!(after_failure(&down, 0), Next::Skip);
    // Same code and text, but the far end acted on the dial: never repeat it.
    let acted = Error::unavailable(Side::Peer, Retry::Unsafe, Label::PeerUnreachable, "refused");
    assert_eq!(after_failure(&acted, 0), Next::Stop);
    let denied = Error::from_status(Side::Peer, crate::wire::status::Status::new(Code::PermissionDenied, "no"));
    assert_eq!(after_failure(&denied, 0), Next::Stop);
    let not_here = Error::from_status(Side::Peer, crate::wire::status::Status::new(Code::NotFound, "gone"));
    assert_eq!(after_failure(&not_here, 0), Next::Skip, "a stale route: try the next holder");
}

/// A tunnel handle on an in-memory connection nobody serves (its requests
/// are never sent: `plan` only orders upstreams).
fn tunnel(conn: u64) -> TunnelRef {
    let (io, _far) = tokio::io::duplex(1 << 16);
    let (send, _conn) = futures_lite::future::block_on(h2::client::handshake(io)).expect("handshake");
    TunnelRef { conn, send, health: Default::default(), streams: Default::default() }
}

#[test]
fn a_local_tunnel_whose_ping_is_overdue_goes_after_siblings_and_peers() {
    let r = [remote("b", Some("b:1"))];
    let t = tunnel(7);
    let p = plan(0, Some(t.clone()), [0, 1], &r, true, |_| (true, 0));
    assert_eq!(names(&p), ["Local(conn 7)", "Sibling(1)", "Peer(b at b:1)"]);
    t.health.mark(true);
    let p = plan(0, Some(t.clone()), [0, 1], &r, true, |_| (true, 0));
    assert_eq!(names(&p), ["Sibling(1)", "Peer(b at b:1)", "Local(conn 7)"], "tried last, not dropped");
    t.health.mark(false);
    assert_eq!(names(&plan(0, Some(t), [0], &r, true, |_| (true, 0)))[0], "Local(conn 7)");
}

#[test]
fn a_cross_shard_dial_past_the_mailbox_bound_is_refused_naming_the_budget() {
    use crate::proxy::shard::{CrossDial, ShardMsg};
    use crate::runtime::mailbox::mailbox;
    use crate::runtime::pipe::pipe;
    let dial = || {
        let ((_, up), (down, _)) = (pipe(1), pipe(1));
        ShardMsg::Dial(Box::new(CrossDial {
            agent: "a".into(),
            dial: crate::relay::call::Outgoing { first: bytes::Bytes::new(), client: None },
            up,
            down,
        }))
    };
    let (mb, inbox) = mailbox(2);
    assert!(sibling::post_dial(&mb, 1, dial()).is_ok() && sibling::post_dial(&mb, 1, dial()).is_ok());
    let e = sibling::post_dial(&mb, 1, dial()).unwrap_err();
    assert_eq!((e.code, e.retry), (Code::ResourceExhausted, Retry::Safe));
    assert!(e.message.contains("budget shard_mailbox (2) reached"), "{e}");
    drop(inbox);
    let e = sibling::post_dial(&mb, 1, dial()).unwrap_err();
    assert_eq!((e.code, e.label), (Code::Unavailable, Label::ShardStopped));
}
