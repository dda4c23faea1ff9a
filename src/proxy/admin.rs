//! Admin HTTP endpoint, off the hot path on its own thread: `GET /metrics`
//! (Prometheus text, see `proxy::scrape`), `GET /routes` (the current route
//! snapshot as JSON), `GET /healthz` (liveness: 200 while the process runs
//! its loops), `GET /readyz` (readiness, see `proxy::readiness`: 200 once
//! serving, synced and with a valid certificate; 503 naming the reason,
//! `draining` while the proxy drains).
//!
//! Invariants:
//! - HTTP/1.1 by hyper 1 on a current-thread tokio runtime owned by the
//!   admin thread: the shards never run admin code and admin code never
//!   touches a shard (it reads what they publish).
//! - At most [`MAX_CONNS`] connections at once (a semaphore); past it a
//!   connection gets `503` written without waiting and is closed, so
//!   clients that never send or never read cannot queue up others for
//!   more than their slots.
//! - A connection serves one request: it has [`HEADER_TIMEOUT`] to send its
//!   head (at most [`MAX_HEAD`] bytes) and [`CONN_TIMEOUT`] in total; then
//!   it is closed, so a stalled client holds a slot for a bounded time.
//! - Stopping (every shard ended, or a successor took the listener over):
//!   accepting stops at once, open connections are asked to finish
//!   (`GracefulShutdown`) and get at most [`SHUTDOWN_GRACE`]; then the
//!   runtime is dropped with them. Proxy shutdown waits on this thread for
//!   at most that long.
//!
//! Alternatives rejected: the hand-written server this replaced (a thread
//! per client, an accept thread polling for shutdown every 25 ms, its own
//! request parser); axum (routing, extractors and tower layers: more than
//! four fixed GET endpoints need); a task on a glommio shard (admin work,
//! even small, would then run on the data path's cores).

use std::convert::Infallible;
use std::net::TcpListener;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use futures_lite::future::or;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use prometheus_client::registry::Registry;
use tokio::sync::Semaphore;

use super::drain::Phase;
use super::readiness::Observed;
use super::scrape::Families;
use crate::runtime::Shutdown;

/// Connections served at once.
pub const MAX_CONNS: usize = 8;
/// Time a connection has to send each request head.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// Total time a connection may stay open (requests and responses).
pub const CONN_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head read (hyper's minimum buffer).
pub const MAX_HEAD: usize = 8 * 1024;
/// How long stopping waits for open connections.
pub const SHUTDOWN_GRACE: Duration = Duration::from_millis(200);

/// Serves the admin endpoint on `l` until `ended` fires, or until a
/// successor took the listener over (the socket is then shared, and this
/// process stops accepting on it). The returned thread ends within
/// [`SHUTDOWN_GRACE`] of either.
pub fn spawn(l: TcpListener, observed: Observed, ended: Shutdown) -> std::io::Result<JoinHandle<()>> {
    l.set_nonblocking(true)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build()?;
    std::thread::Builder::new().name(format!("{}-admin", observed.proxy)).spawn(move || {
        rt.block_on(serve(l, observed, ended));
        // Drops whatever connection outlived the grace period.
        rt.shutdown_background();
    })
}

/// Fires when the admin endpoint must stop: every shard ended, or a
/// successor holds the listener (phases only move forward, and `begun`
/// fires once the phase is Successor or Leaving; a leaving proxy keeps
/// answering `/readyz` with 503 until its shards end).
async fn stopped(ended: &Shutdown, o: &Observed) {
    or(ended.wait(), async {
        o.drain.begun().wait().await;
        if o.drain.phase() != Phase::Successor {
            std::future::pending::<()>().await;
        }
    })
    .await
}

async fn serve(l: TcpListener, o: Observed, ended: Shutdown) {
    let listener = match tokio::net::TcpListener::from_std(l) {
        Ok(l) => l,
        Err(e) => return tracing::error!(error = %e, "admin: cannot serve the listener"),
    };
    let registry = Arc::new(Families::of(o.clone()).registry());
    let slots = Arc::new(Semaphore::new(MAX_CONNS));
    let graceful = GracefulShutdown::new();
    loop {
        let accepted = or(async { Some(listener.accept().await) }, async {
            stopped(&ended, &o).await;
            None
        })
        .await;
        let stream = match accepted {
            None => break,
            Some(Ok((s, _))) => s,
            Some(Err(e)) => {
                // EMFILE and the like: back off a little instead of spinning.
                tracing::debug!(error = %e, "admin: accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            refuse(&stream);
            continue;
        };
        let (o, registry) = (o.clone(), registry.clone());
        let svc = service_fn(move |req| {
            let r = answer(&req, &o, &registry);
            async move { Ok::<_, Infallible>(r) }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            // One request per connection: naive clients (scripts reading to
            // EOF) end at once, and an idle keep-alive holds no slot.
            .keep_alive(false)
            .max_buf_size(MAX_HEAD)
            .serve_connection(TokioIo::new(stream), svc);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _slot = slot;
            let _ = tokio::time::timeout(CONN_TIMEOUT, conn).await;
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown()).await;
}

/// Answers 503 without waiting (a nonblocking write) and closes.
fn refuse(s: &tokio::net::TcpStream) {
    let body = format!("busy: {MAX_CONNS} admin connections already open\n");
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let _ = s.try_write(format!("{head}{body}").as_bytes());
}

fn answer(req: &Request<Incoming>, o: &Observed, registry: &Registry) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "only GET and HEAD\n".into());
    }
    match req.uri().path() {
        "/metrics" => {
            let mut m = String::new();
            match prometheus_client::encoding::prometheus_text::encode(&mut m, registry) {
                Ok(()) => reply(StatusCode::OK, prometheus_client::encoding::prometheus_text::CONTENT_TYPE, m),
                Err(_) => reply(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", "cannot encode the metrics\n".into()),
            }
        }
        "/routes" => {
            let table = o.snapshot.lock().unwrap_or_else(|p| p.into_inner()).clone();
            reply(StatusCode::OK, "application/json", serde_json::to_string_pretty(&*table).unwrap_or_default())
        }
        "/healthz" => reply(StatusCode::OK, "text/plain", format!("{}\n", o.liveness())),
        "/readyz" => match o.readiness() {
            Ok(why) => reply(StatusCode::OK, "text/plain", format!("{why}\n")),
            Err(why) => reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", format!("{why}\n")),
        },
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "try /metrics, /routes, /healthz or /readyz\n".into()),
    }
}

fn reply(status: StatusCode, ctype: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(ctype));
    r
}
