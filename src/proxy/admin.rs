//! Admin HTTP endpoint (off the hot path, one plain thread): `GET /metrics`
//! (Prometheus text), `GET /routes` (the current route snapshot as JSON),
//! `GET /healthz`.
//!
//! Invariants: requests are read with a size cap and a timeout; the thread
//! polls the shutdown signal and never touches a shard.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::thread::JoinHandle;
use std::time::Duration;

use super::stats::Metrics;
use crate::proxy::control::SnapshotCell;
use crate::runtime::Shutdown;

fn respond(s: &mut std::net::TcpStream, status: &str, ctype: &str, body: &str) {
    let _ = write!(
        s,
        "HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// Serves the admin endpoint on `l` until `shutdown`.
pub fn spawn(
    l: TcpListener,
    proxy: String,
    metrics: Metrics,
    snapshot: SnapshotCell,
    shutdown: Shutdown,
) -> std::io::Result<JoinHandle<()>> {
    l.set_nonblocking(true)?;
    std::thread::Builder::new().name(format!("{proxy}-admin")).spawn(move || {
        while !shutdown.is_triggered() {
            let mut s = match l.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(25));
                    continue;
                }
                Err(_) => continue,
            };
            let _ = s.set_nonblocking(false);
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let mut buf = [0u8; 2048];
            let n = s.read(&mut buf).unwrap_or(0);
            let req = String::from_utf8_lossy(&buf[..n]);
            let path = req.split_whitespace().nth(1).unwrap_or("");
            match path {
                "/metrics" => respond(&mut s, "200 OK", "text/plain; version=0.0.4", &metrics.render(&proxy)),
                "/routes" => {
                    let table = snapshot.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    let body = serde_json::to_string_pretty(&*table).unwrap_or_default();
                    respond(&mut s, "200 OK", "application/json", &body)
                }
                "/healthz" => respond(&mut s, "200 OK", "text/plain", "ok\n"),
                _ => respond(&mut s, "404 Not Found", "text/plain", "try /metrics, /routes or /healthz\n"),
            }
        }
    })
}
