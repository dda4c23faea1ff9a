//! The operator endpoint server, shared by the proxy's and the agent's
//! admin ports: HTTP/1.1 by hyper 1 on a current-thread tokio runtime owned
//! by its own thread, answering GET/HEAD from an [`Endpoints`] table, plus
//! the Prometheus text encoding helpers both roles' collectors use.
//!
//! Invariants:
//! - Off the data path: the shards never run admin code and admin code
//!   never touches a shard (it reads what they publish).
//! - At most [`MAX_CONNS`] connections at once (a semaphore); past it a
//!   connection gets `503` written without waiting and is closed, so
//!   clients that never send or never read cannot queue up others for
//!   more than their slots. The close lingers (the request is read and
//!   discarded for at most [`LINGER`], at most [`MAX_LINGERING`] at once):
//!   closing with the request unread would answer it with a reset, and a
//!   client that sent its request after our 503 would then see "broken
//!   pipe" or "connection reset" instead of the 503 (seen in CI).
//! - A connection serves one request: it has [`HEADER_TIMEOUT`] to send its
//!   head (at most [`MAX_HEAD`] bytes) and [`CONN_TIMEOUT`] in total; then
//!   it is closed, so a stalled client holds a slot for a bounded time.
//! - Stopping (the `stopped` future resolves): accepting stops at once,
//!   open connections are asked to finish (`GracefulShutdown`) and get at
//!   most [`SHUTDOWN_GRACE`]; then the runtime is dropped with them. The
//!   owner's shutdown waits on this thread for at most that long.
//!
//! Alternatives rejected: the hand-written server this replaced (a thread
//! per client, an accept thread polling for shutdown every 25 ms, its own
//! request parser); axum (routing, extractors and tower layers: more than
//! a few fixed GET endpoints need); a task on a glommio shard (admin work,
//! even small, would then run on the data path's cores).

use std::convert::Infallible;
use std::future::Future;
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
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::sync::Semaphore;

use super::stats::HistogramSum;

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
/// How long a refused connection's request is read and discarded.
pub const LINGER: Duration = Duration::from_secs(1);
/// Refused connections lingering at once; past it they close at once.
pub const MAX_LINGERING: usize = 64;

/// One answer: status, content type and body.
pub struct Reply {
    pub status: StatusCode,
    pub ctype: &'static str,
    pub body: String,
}

impl Reply {
    /// A plain-text answer.
    pub fn text(status: StatusCode, body: String) -> Reply {
        Reply { status, ctype: "text/plain", body }
    }

    /// 200 with a JSON body.
    pub fn json(body: String) -> Reply {
        Reply { status: StatusCode::OK, ctype: "application/json", body }
    }

    /// The Prometheus text exposition of `registry`.
    pub fn metrics(registry: &Registry) -> Reply {
        use prometheus_client::encoding::prometheus_text::{encode, CONTENT_TYPE};
        let mut m = String::new();
        match encode(&mut m, registry) {
            Ok(()) => Reply { status: StatusCode::OK, ctype: CONTENT_TYPE, body: m },
            Err(_) => Reply::text(StatusCode::INTERNAL_SERVER_ERROR, "cannot encode the metrics\n".into()),
        }
    }

    /// 200 when `r` is Ok, 503 otherwise; the reason as the body.
    pub fn readiness(r: Result<String, String>) -> Reply {
        match r {
            Ok(why) => Reply::text(StatusCode::OK, format!("{why}\n")),
            Err(why) => Reply::text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
        }
    }
}

/// What an admin port serves: the answer to a GET of `path` (HEAD gets
/// the same head; other methods are refused before this is asked).
pub trait Endpoints: Send + Sync + 'static {
    fn get(&self, path: &str) -> Reply;
}

/// Serves `endpoints` on `l` on a thread named `thread` until the future
/// `stopped()` builds (on that thread) resolves. The returned thread ends
/// within [`SHUTDOWN_GRACE`] of it.
pub fn spawn<S, F>(
    l: TcpListener,
    thread: String,
    endpoints: Arc<dyn Endpoints>,
    stopped: S,
) -> std::io::Result<JoinHandle<()>>
where
    S: FnOnce() -> F + Send + 'static,
    F: Future<Output = ()>,
{
    l.set_nonblocking(true)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build()?;
    std::thread::Builder::new().name(thread).spawn(move || {
        rt.block_on(serve(l, endpoints, stopped()));
        // Drops whatever connection outlived the grace period.
        rt.shutdown_background();
    })
}

async fn serve(l: TcpListener, endpoints: Arc<dyn Endpoints>, stopped: impl Future<Output = ()>) {
    let listener = match tokio::net::TcpListener::from_std(l) {
        Ok(l) => l,
        Err(e) => return tracing::error!(error = %e, "admin: cannot serve the listener"),
    };
    let slots = Arc::new(Semaphore::new(MAX_CONNS));
    let lingering = Arc::new(Semaphore::new(MAX_LINGERING));
    let graceful = GracefulShutdown::new();
    let mut stopped = std::pin::pin!(stopped);
    loop {
        let accepted = or(async { Some(listener.accept().await) }, async {
            stopped.as_mut().await;
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
            refuse(stream, &lingering);
            continue;
        };
        let endpoints = endpoints.clone();
        let svc = service_fn(move |req| {
            let r = answer(&req, &*endpoints);
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

/// Answers 503 without waiting (a nonblocking write) and closes: after
/// reading and discarding what the client sends for at most [`LINGER`]
/// when a lingering place is free, else at once.
fn refuse(mut s: tokio::net::TcpStream, lingering: &Arc<Semaphore>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = format!("busy: {MAX_CONNS} admin connections already open\n");
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let _ = s.try_write(format!("{head}{body}").as_bytes());
    let Ok(place) = lingering.clone().try_acquire_owned() else { return };
    tokio::spawn(async move {
        let _place = place;
        let _ = s.shutdown().await;
        let mut sink = [0u8; 1024];
        let _ =
            tokio::time::timeout(LINGER, async { while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {} }).await;
    });
}

fn answer(req: &Request<Incoming>, endpoints: &dyn Endpoints) -> Response<Full<Bytes>> {
    let r = if req.method() != Method::GET && req.method() != Method::HEAD {
        Reply::text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n".into())
    } else {
        endpoints.get(req.uri().path())
    };
    let mut resp = Response::new(Full::new(Bytes::from(r.body)));
    *resp.status_mut() = r.status;
    resp.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(r.ctype));
    resp
}

/// Label pairs of one sample.
pub type Labels = Vec<(&'static str, String)>;

/// The help text of both roles' certificate expiry gauges.
pub const CERT_EXPIRY_HELP: &str =
    "Seconds until a loaded certificate expires (own, and each CA); negative once expired";

/// Encodes a counter family (`_total` is added by the encoder).
pub fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, samples: Vec<(Labels, u64)>) -> std::fmt::Result {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (l, v) in samples {
        ConstCounter::new(v).encode(m.encode_family(&l)?)?;
    }
    Ok(())
}

/// Encodes a gauge family.
pub fn gauge<V: prometheus_client::encoding::EncodeGaugeValue>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: Vec<(Labels, V)>,
) -> std::fmt::Result {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (l, v) in samples {
        m.encode_family(&l)?.encode_gauge(&v)?;
    }
    Ok(())
}

/// Encodes a latency histogram family (seconds).
pub fn histogram(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: Vec<(Labels, HistogramSum)>,
) -> std::fmt::Result {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (l, h) in samples {
        let buckets: Vec<(f64, u64)> = h.bounds().collect();
        let sum = h.sum_ns as f64 / 1e9;
        m.encode_family(&l)?.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            sum,
            h.count(),
            &buckets,
            None,
        )?;
    }
    Ok(())
}
