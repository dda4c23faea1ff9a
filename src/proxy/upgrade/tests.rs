//! The handover and drain requests over a real Unix socket, with real
//! listening sockets and a real control thread.

use std::io::Read;
use std::net::TcpStream;
use std::sync::Arc;

use super::*;
use crate::proxy::control::{Control, ControlOpts};
use crate::route::model::{ProxyInfo, Strategy};
use crate::route::store::MemoryStore;
use crate::runtime::listeners::bind_group;

fn control() -> Control {
    let me = ProxyInfo {
        id: "proxy-a".into(),
        peer_addrs: vec![],
        tunnel_addr: String::new(),
        client_addr: String::new(),
        version: 1,
        draining: false,
        build: build_version().into(),
    };
    let opts = ControlOpts {
        me,
        ttl: Duration::from_secs(10),
        resync: Duration::from_secs(30),
        strategy: Strategy::default(),
    };
    Control::spawn(opts, Arc::new(MemoryStore::new(100)), Box::new(|_| {}), Default::default()).unwrap()
}

fn listeners() -> Listeners {
    let any = "127.0.0.1:0".parse().unwrap();
    Listeners {
        client: bind_group(any, 2, "client").unwrap().into_iter().map(Some).collect(),
        tunnel: bind_group(any, 2, "tunnel").unwrap().into_iter().map(Some).collect(),
        peer: vec![bind_group(any, 1, "peer").unwrap().pop(), None],
        admin: bind_group(any, 1, "admin").unwrap().pop(),
    }
}

#[test]
fn a_successor_takes_the_very_sockets_and_the_predecessor_drains() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("up.sock");
    let old = listeners();
    let (c, drain, stop) = (control(), Drain::new(), Shutdown::new());
    let t =
        serve(path.clone(), Spare::of(&old).unwrap(), drain.clone(), c.commands.clone(), stop.clone(), false).unwrap();
    // A connection queued in the old socket's backlog before the
    // handover is accepted through the new descriptor.
    let mut waiting = TcpStream::connect(old.client_addr()).unwrap();
    let (new, build) = take_over(&path).unwrap().expect("a predecessor answers");
    assert_eq!(build, build_version());
    assert_eq!(new.client_addr(), old.client_addr());
    assert_eq!(new.tunnel_addr(), old.tunnel_addr());
    assert_eq!(new.peer.iter().map(Option::is_some).collect::<Vec<_>>(), [true, false]);
    assert!(new.admin.is_some());
    drop(old);
    // The connection is queued on one of the shards' sockets: poll them.
    for l in new.client.iter().flatten() {
        l.set_nonblocking(true).unwrap();
    }
    let t0 = std::time::Instant::now();
    let (mut s, _) = loop {
        if let Some(a) = new.client.iter().flatten().find_map(|l| l.accept().ok()) {
            break a;
        }
        assert!(t0.elapsed() < Duration::from_secs(2), "the queued connection is accepted by the successor");
        std::thread::sleep(Duration::from_millis(10));
    };
    waiting.write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    s.set_nonblocking(false).unwrap();
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"x");
    // The predecessor drains in place and hands over only once.
    for _ in 0..100 {
        if drain.phase() == Phase::Successor {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(drain.phase(), Phase::Successor);
    t.join().unwrap();
    assert!(path.exists(), "the predecessor leaves the path to its successor");
    stop.trigger();
    c.stop();
}

#[test]
fn drain_requests_leave_and_stale_sockets_do_not_block_a_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("up.sock");
    // Nothing there, then a stale file nobody serves.
    assert!(take_over(&path).unwrap().is_none());
    drop(UnixListener::bind(&path).unwrap());
    assert!(take_over(&path).unwrap().is_none(), "a stale socket file means no predecessor");
    assert!(request_leave(&path).is_err());
    let l = listeners();
    let (c, drain, stop) = (control(), Drain::new(), Shutdown::new());
    let t =
        serve(path.clone(), Spare::of(&l).unwrap(), drain.clone(), c.commands.clone(), stop.clone(), false).unwrap();
    let answer = request_leave(&path).unwrap();
    assert!(answer.starts_with("ok: leaving"), "{answer}");
    assert_eq!(drain.phase(), Phase::Leaving);
    t.join().unwrap();
    assert!(!path.exists(), "a proxy that leaves removes its own socket file");
    // A leaving proxy hands nothing over.
    assert!(!drain.handed_over());
    stop.trigger();
    c.stop();
}
