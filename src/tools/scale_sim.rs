//! The two load sides of `ringpeer bench --tunnels N --streams M`, on one
//! executor: many agent tunnels (each its own identity, real mTLS, the
//! agent's wire protocol) and many client dials, each established with one
//! echoed byte and then held idle.
//!
//! Invariants: a simulated agent speaks exactly what `ringpeer agent`
//! speaks on its tunnel (answers Agent/Control with its `AgentHello`,
//! answers Agent/Dial with `ConnectionEstablished` and echoes the Data), so
//! the proxy cannot tell it from the real one; it answers dials in-process
//! instead of connecting a target socket, so the load process needs no
//! socket per stream. Work in flight is bounded (`PARALLEL`), so set-up
//! budgets (`setup_per_conn`) are never what limits the run.
//!
//! Rejected: running N real agents (`agent::run`) in this process. Each is
//! an executor thread with its own rings; 10,000 of them do not fit, and
//! their tunnel managers wake ten times a second each.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::server::SendResponse;
use h2::RecvStream;
use http::Request;

use crate::client::{Client, DialIo};
use crate::relay::call::{answer_ok, established, read_dial_request};
use crate::relay::GrpcRecv;
use crate::runtime::signal::Signal;
use crate::transport::connect_tls;
use crate::transport::h2conf::{serve, ActiveStreams};
use crate::wire::codec::{encode_data, encode_msg, FrameDecoder};
use crate::wire::error::Side;
use crate::wire::paths;
use crate::wire::pb::v1::{agent_message, AgentHello, AgentMessage};
use crate::wire::status::Status;
use crate::wire::DialTarget;

/// Tunnels being opened, or dials being set up, at once.
pub const PARALLEL: usize = 256;

/// Opens one simulated agent tunnel to `addr` and serves it until `stop`
/// (a failed attempt is retried after a second, as an agent would); `up`
/// counts tunnels whose h2 handshake completed.
pub async fn agent_tunnel(tls: Arc<rustls::ClientConfig>, addr: String, stop: Signal, up: Rc<Cell<usize>>) {
    let h2 = super::scale::h2();
    let conn = loop {
        if stop.is_triggered() {
            return;
        }
        if let Ok((tls, _)) = connect_tls(&tls, &addr, h2.handshake_timeout()).await {
            if let Ok(conn) = h2.link_server().handshake::<_, Bytes>(tls).await {
                break conn;
            }
        }
        glommio::timer::sleep(Duration::from_secs(1)).await;
    };
    up.set(up.get() + 1);
    let active = ActiveStreams::default();
    serve(conn, &h2, &stop, &active, true, |req, respond| {
        glommio::spawn_local(answer(req, respond)).detach();
    })
    .await;
    up.set(up.get() - 1);
}

async fn answer(req: Request<RecvStream>, mut respond: SendResponse<Bytes>) {
    let Ok(mut tx) = answer_ok(&mut respond, Side::Proxy) else { return };
    let path = req.uri().path().to_string();
    let mut rx = GrpcRecv::new(req.into_body(), FrameDecoder::new(), Side::Proxy);
    if path == paths::AGENT_CONTROL {
        let hello = AgentMessage {
            message: Some(agent_message::Message::Hello(AgentHello {
                services: vec!["echo".into()],
                version: env!("CARGO_PKG_VERSION").to_string(),
            })),
        };
        if tx.send_now(encode_msg(&hello)).is_err() {
            return;
        }
        // Hold the control stream open until the proxy ends it.
        while let Ok(Some(_)) = rx.chunk().await {}
        return;
    }
    if read_dial_request(&mut rx, Duration::from_secs(30)).await.is_err() || tx.send_now(established()).is_err() {
        return;
    }
    rx.set_established();
    tx.set_established();
    while let Ok(Some(b)) = rx.next_data().await {
        if tx.send(encode_data(&b)).await.is_err() {
            return;
        }
    }
    let _ = tx.trailers(Status::ok().to_trailers());
}

/// Opens `n` dials spread over `clients` round robin, dial `i` to
/// `target(i)` (`agent/service`), each established with one echoed byte;
/// returns them held open.
pub async fn open_streams(
    clients: &[Client],
    n: usize,
    target: impl Fn(usize) -> String,
) -> Result<Vec<DialIo>, String> {
    let held = Rc::new(std::cell::RefCell::new(Vec::with_capacity(n)));
    let failed: Rc<std::cell::RefCell<Option<String>>> = Rc::default();
    let in_flight = Rc::new(Cell::new(0usize));
    let t0 = Instant::now();
    for i in 0..n {
        while in_flight.get() >= PARALLEL {
            glommio::timer::sleep(Duration::from_millis(1)).await;
        }
        if let Some(e) = failed.borrow().clone() {
            return Err(e);
        }
        in_flight.set(in_flight.get() + 1);
        let target = DialTarget::parse(&target(i)).map_err(|s| s.message.to_string())?;
        let c = clients[i % clients.len()].clone();
        let (held, failed, in_flight) = (held.clone(), failed.clone(), in_flight.clone());
        glommio::spawn_local(async move {
            match one_stream(&c, &target).await {
                Ok(io) => held.borrow_mut().push(io),
                Err(e) => *failed.borrow_mut() = Some(format!("stream {i} to {target}: {e}")),
            }
            in_flight.set(in_flight.get() - 1);
        })
        .detach();
        if (i + 1) % 10_000 == 0 {
            eprintln!("  {} streams open ({:.1} s)", i + 1, t0.elapsed().as_secs_f64());
        }
    }
    while in_flight.get() > 0 {
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
    if let Some(e) = failed.borrow().clone() {
        return Err(e);
    }
    let v = std::mem::take(&mut *held.borrow_mut());
    Ok(v)
}

async fn one_stream(c: &Client, target: &DialTarget) -> Result<DialIo, String> {
    let mut io: DialIo = c.dial(target, Duration::from_secs(60)).await.map_err(|e| e.to_string())?.into();
    io.write(b"x").await.map_err(|e| e.to_string())?;
    let mut got = Vec::with_capacity(1);
    io.read_exact(&mut got, 1).await.map_err(|e| e.to_string())?;
    if got != b"x" {
        return Err(format!("echoed {got:?}, sent \"x\""));
    }
    Ok(io)
}
