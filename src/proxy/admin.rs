//! Admin HTTP endpoint (off the hot path, plain threads): `GET /metrics`
//! (Prometheus text), `GET /routes` (the current route snapshot as JSON),
//! `GET /healthz` (200 when routes are loaded and the backend is reachable,
//! 503 with the reason otherwise, and 503 `draining` while the proxy
//! drains, so a load balancer stops sending it clients).
//!
//! Invariants:
//! - One accept thread that never touches a client socket: it polls the
//!   shutdown signal every [`ACCEPT_POLL`], so shutdown never waits on a
//!   client.
//! - Each client is served on its own short-lived thread, at most
//!   [`MAX_CLIENTS`] at once; past that a client gets `503` (written without
//!   waiting) and is closed, so stalled clients cannot starve others of
//!   more than their slots.
//! - A client has [`READ_TIMEOUT`] in total to send its request head (at
//!   most [`MAX_REQUEST`] bytes, else `431`) and [`WRITE_TIMEOUT`] in total
//!   to take the response: a client that never sends or never reads costs
//!   one slot for a bounded time. Handlers never touch a shard.
//!
//! Alternatives rejected: one thread serving clients in turn (a stalled
//! reader blocked every other client and shutdown); a nonblocking event
//! loop (more code for an endpoint scraped a few times a minute).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::drain::{Drain, Phase};
use super::shard::Acceptors;
use super::stats::cert_expiry;
use super::stats::Metrics;
use crate::proxy::control::{HealthCell, SnapshotCell};
use crate::runtime::Shutdown;
use crate::transport::reload::Live;

/// Clients served at once.
pub const MAX_CLIENTS: usize = 8;
/// Total time a client has to send its request head.
pub const READ_TIMEOUT: Duration = Duration::from_secs(2);
/// Total time a client has to take the whole response.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest request head read.
pub const MAX_REQUEST: usize = 8 * 1024;
/// How often the accept thread checks for shutdown.
pub const ACCEPT_POLL: Duration = Duration::from_millis(25);

/// What the admin endpoint reads.
#[derive(Clone)]
pub struct AdminState {
    /// Proxy id.
    pub proxy: String,
    /// Its counters.
    pub metrics: Metrics,
    /// Its latest route snapshot.
    pub snapshot: SnapshotCell,
    /// Its health verdict.
    pub health: HealthCell,
    /// Its drain state.
    pub drain: Drain,
    /// Its TLS material (the certificate expiry metric).
    pub tls: Live<Acceptors>,
}

/// Serves the admin endpoint on `l` until `shutdown`, or until a successor
/// took the listener over (the socket is then shared: accepting is a
/// nonblocking syscall here, so stopping can never take a connection and
/// drop it). The returned thread ends within [`ACCEPT_POLL`] of either;
/// client threads end within their timeouts.
pub fn spawn(l: TcpListener, state: AdminState, shutdown: Shutdown) -> std::io::Result<JoinHandle<()>> {
    l.set_nonblocking(true)?;
    let busy = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new().name(format!("{}-admin", state.proxy)).spawn(move || {
        while !shutdown.is_triggered() && state.drain.phase() != Phase::Successor {
            let s = match l.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(ACCEPT_POLL);
                    continue;
                }
                Err(_) => {
                    std::thread::sleep(ACCEPT_POLL);
                    continue;
                }
            };
            if busy.fetch_add(1, Ordering::AcqRel) >= MAX_CLIENTS {
                busy.fetch_sub(1, Ordering::AcqRel);
                refuse(s);
                continue;
            }
            let (state, slot) = (state.clone(), Slot(busy.clone()));
            let spawned = std::thread::Builder::new().name(format!("{}-admin-client", state.proxy)).spawn(move || {
                let _slot = slot;
                serve(s, &state);
            });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "admin: cannot start a client thread");
            }
        }
    })
}

/// Releases a client slot when its thread ends (or fails to start).
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Answers 503 without waiting (the socket is nonblocking) and closes.
fn refuse(mut s: TcpStream) {
    let _ = s.set_nonblocking(true);
    let body = format!("busy: {MAX_CLIENTS} admin clients already connected\n");
    let _ = s.write(head("503 Service Unavailable", "text/plain", body.len()).as_bytes());
    let _ = s.write(body.as_bytes());
}

fn head(status: &str, ctype: &str, len: usize) -> String {
    format!("HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {len}\r\nconnection: close\r\n\r\n")
}

/// Reads the request head within [`READ_TIMEOUT`] in total; `Err` carries
/// the status to answer.
fn read_head(s: &mut TcpStream) -> Result<Vec<u8>, &'static str> {
    let end = Instant::now() + READ_TIMEOUT;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() || s.set_read_timeout(Some(left)).is_err() {
            return Err("408 Request Timeout");
        }
        match s.read(&mut chunk) {
            Ok(0) => return Err(""),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return Err("408 Request Timeout")
            }
            Err(_) => return Err(""),
        }
        if buf.len() > MAX_REQUEST {
            return Err("431 Request Header Fields Too Large");
        }
    }
    Ok(buf)
}

/// Writes all of `b` within `end`; gives up silently past it.
fn write_until(s: &mut TcpStream, mut b: &[u8], end: Instant) {
    while !b.is_empty() {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() || s.set_write_timeout(Some(left)).is_err() {
            return;
        }
        match s.write(b) {
            Ok(0) | Err(_) => return,
            Ok(n) => b = &b[n..],
        }
    }
}

fn serve(mut s: TcpStream, st: &AdminState) {
    let _ = s.set_nonblocking(false);
    let (status, ctype, body) = match read_head(&mut s) {
        Ok(req) => {
            let req = String::from_utf8_lossy(&req);
            route(req.split_whitespace().nth(1).unwrap_or(""), st)
        }
        Err("") => return,
        Err(status) => (status, "text/plain", format!("{status}\n")),
    };
    let end = Instant::now() + WRITE_TIMEOUT;
    write_until(&mut s, head(status, ctype, body.len()).as_bytes(), end);
    write_until(&mut s, body.as_bytes(), end);
}

fn route(path: &str, st: &AdminState) -> (&'static str, &'static str, String) {
    match path {
        "/metrics" => {
            let mut m = st.metrics.render(&st.proxy);
            let draining = u8::from(st.drain.phase() != Phase::Running);
            m.push_str(&format!(
                "# HELP ringpeer_draining 1 while the proxy drains (SIGTERM, drain, handover).\n\
                 # TYPE ringpeer_draining gauge\nringpeer_draining{{proxy=\"{}\"}} {draining}\n",
                st.proxy
            ));
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            m.push_str(&cert_expiry(&st.proxy, &st.tls.current().material.certs, now));
            ("200 OK", "text/plain; version=0.0.4", m)
        }
        "/routes" => {
            let table = st.snapshot.lock().unwrap_or_else(|p| p.into_inner()).clone();
            ("200 OK", "application/json", serde_json::to_string_pretty(&*table).unwrap_or_default())
        }
        "/healthz" if st.drain.phase() != Phase::Running => {
            ("503 Service Unavailable", "text/plain", format!("draining ({:?})\n", st.drain.phase()))
        }
        "/healthz" => {
            let (ok, why) = st.health.lock().unwrap_or_else(|p| p.into_inner()).verdict();
            let status = if ok { "200 OK" } else { "503 Service Unavailable" };
            (status, "text/plain", format!("{why}\n"))
        }
        _ => ("404 Not Found", "text/plain", "try /metrics, /routes or /healthz\n".into()),
    }
}
