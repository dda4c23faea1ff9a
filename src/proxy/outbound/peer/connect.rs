//! Connecting a link: TCP, TLS, HTTP/2 and the peer's first SETTINGS under
//! one timeout, then the task that drives the connection until it ends.

use std::cell::{Cell, RefCell};
use std::future::{poll_fn, Future};
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use futures_lite::future::or;
use h2::client::SendRequest;
use rustls::ClientConfig;

use super::link::{Flight, Link, State};
use super::Inner;
use crate::runtime::timeout;
use crate::transport::h2conf::{drive_client_pooled, H2Tuning};
use crate::transport::keepalive::LinkHealth;
use crate::transport::{connect_tls, ClientTls, TransportError};
use crate::wire::error::{Error, Label, Retry, Side};

/// One link's task: connect, publish the link, drive the connection until
/// it ends (or the shard stops), then remove the link.
pub(super) async fn run_link(
    inner: Weak<Inner>,
    addr: String,
    proxy: Rc<str>,
    tls: Arc<ClientConfig>,
    flight: Rc<Flight>,
) {
    let Some((h2, connect_timeout, closing, pool)) =
        inner.upgrade().map(|i| (i.h2.clone(), i.cfg.connect_timeout, i.closing.clone(), i.pool.borrow().clone()))
    else {
        return flight.finish(Err(stopped()));
    };
    let attempt = timeout(connect_timeout, connect(&tls, &addr, &h2, connect_timeout));
    let r = or(async { attempt.await.unwrap_or_else(|_| Err(connect_timed_out(&addr, connect_timeout))) }, async {
        closing.wait().await;
        Err(stopped())
    })
    .await
    .map_err(|e| Error { message: format!("peer {proxy}: {}", e.message).into(), ..e });
    let Some(shared) = inner.upgrade() else { return flight.finish(Err(stopped())) };
    let (link, conn, resumed) = match r {
        Ok((send, conn, resumed)) => {
            let link = Rc::new(Link {
                proxy: proxy.clone(),
                state: Cell::new(State::Ready),
                send: RefCell::new(Some(send)),
                active: Cell::new(0),
                health: LinkHealth::new(),
            });
            shared.resumed.set(shared.resumed.get() + u64::from(resumed));
            shared.settle(&addr, Ok(link.clone()));
            (link, conn, resumed)
        }
        Err(e) => {
            tracing::debug!(peer = &*proxy, addr, error = %e, "peer connect failed");
            shared.settle(&addr, Err(&e));
            return flight.finish(Err(e));
        }
    };
    drop(shared); // the task must not keep the links alive
    flight.finish(Ok(()));
    tracing::info!(peer = &*proxy, addr, resumed, "peer link up");
    // The link carries many clients' responses: its window grows with the
    // streams open on it (a few stalled readers must not block the rest).
    let open = || Some(link.active.get());
    let why = or(drive_client_pooled(conn, &h2, &link.health, pool.as_ref(), open), async {
        closing.wait().await;
        "shard_stopping"
    })
    .await;
    link.state.set(State::Closed);
    link.send.borrow_mut().take();
    if let Some(shared) = inner.upgrade() {
        shared.remove(&addr, &link);
    }
    tracing::info!(peer = &*proxy, addr, why, "peer link closed");
}

type Conn = h2::client::Connection<ClientTls, Bytes>;

/// TCP + TLS (peer name checked in the handshake) + HTTP/2, then waits for
/// the peer's first SETTINGS.
///
/// The client starts with `initial_max_send_streams(0)` and drives the
/// connection here until `current_max_send_streams()` turns non-zero, i.e.
/// until h2 has applied the peer's SETTINGS (a SETTINGS without
/// MAX_CONCURRENT_STREAMS means unlimited, also non-zero). Rejected:
/// guessing a limit until SETTINGS arrive (the shared client default of 100)
/// lets the first burst exceed a lower peer limit and be refused, which is
/// what forced the old string-matched REFUSED_STREAM retry; a PING round
/// trip would prove the same thing but needs the `PingPong` handle that
/// `drive_client` owns for keepalive. A peer announcing 0 streams never
/// becomes Ready and fails by the connect timeout.
async fn connect(
    tls: &Arc<ClientConfig>,
    addr: &str,
    h2: &H2Tuning,
    limit: Duration,
) -> Result<(SendRequest<Bytes>, Conn, bool), Error> {
    let (tls, _id) = connect_tls(tls, addr, limit).await.map_err(transport_error)?;
    let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    let mut b = h2.link_client();
    b.initial_max_send_streams(0);
    let (send, mut conn) = b.handshake::<_, Bytes>(tls).await.map_err(|e| h2_setup(addr, e.to_string()))?;
    poll_fn(|cx| {
        if send.current_max_send_streams() > 0 {
            return Poll::Ready(Ok(()));
        }
        match std::pin::Pin::new(&mut conn).poll(cx) {
            Poll::Ready(Ok(())) => {
                Poll::Ready(Err(h2_setup(addr, "the connection closed before the peer's SETTINGS".into())))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(h2_setup(addr, e.to_string()))),
            Poll::Pending if send.current_max_send_streams() > 0 => Poll::Ready(Ok(())),
            Poll::Pending => Poll::Pending,
        }
    })
    .await?;
    Ok((send, conn, resumed))
}

fn transport_error(e: TransportError) -> Error {
    let label = match e {
        TransportError::Connect { .. } => Label::Connect,
        TransportError::Handshake { .. } => Label::TlsHandshake,
        TransportError::NoAlpn { .. } => Label::NoAlpn,
        TransportError::Timeout { .. } => Label::ConnectTimeout,
        TransportError::H2 { .. } => Label::H2Handshake,
    };
    Error::unavailable(Side::Peer, Retry::Safe, label, e.to_string())
}

fn h2_setup(addr: &str, msg: String) -> Error {
    Error::unavailable(Side::Peer, Retry::Safe, Label::H2Handshake, format!("HTTP/2 set-up with {addr}: {msg}"))
}

fn connect_timed_out(addr: &str, limit: Duration) -> Error {
    let msg = format!("connecting to {addr} timed out after {} ms", limit.as_millis());
    Error::unavailable(Side::Peer, Retry::Safe, Label::ConnectTimeout, msg)
}

fn stopped() -> Error {
    Error::unavailable(Side::Proxy, Retry::Never, Label::ShardStopped, "the shard is stopping")
}
