//! The proxy's admin endpoint, off the hot path on its own thread
//! ([`crate::runtime::admin_http`]: connection cap, timeouts, bounded
//! stop): `GET /metrics` (Prometheus text, see `proxy::scrape`),
//! `GET /routes` (the current route snapshot as JSON), `GET /healthz`
//! (liveness: 200 while the process runs its loops), `GET /readyz`
//! (readiness, see `proxy::readiness`: 200 once serving, synced and with a
//! valid certificate; 503 naming the reason, `draining` while the proxy
//! drains).
//!
//! Invariant: it stops when every shard ended, or at once when a successor
//! took the listener over (the socket is then shared, and this process
//! stops accepting on it); a leaving proxy keeps answering `/readyz` with
//! 503 until its shards end. Proxy shutdown waits on the thread for at
//! most [`admin_http::SHUTDOWN_GRACE`].

use std::net::TcpListener;
use std::sync::Arc;
use std::thread::JoinHandle;

use futures_lite::future::or;
use http::StatusCode;
use prometheus_client::registry::Registry;

use super::drain::Phase;
use super::readiness::Observed;
use super::scrape::Families;
use crate::runtime::admin_http::{self, Endpoints, Reply};
use crate::runtime::Shutdown;

/// Serves the admin endpoint on `l` until `ended` fires, or until a
/// successor took the listener over.
pub fn spawn(l: TcpListener, observed: Observed, ended: Shutdown) -> std::io::Result<JoinHandle<()>> {
    let registry = Families::of(observed.clone()).registry();
    let thread = format!("{}-admin", observed.proxy);
    let o = observed.clone();
    let endpoints = Arc::new(ProxyEndpoints { observed, registry });
    admin_http::spawn(l, thread, endpoints, move || async move { stopped(&ended, &o).await })
}

/// Fires when the admin endpoint must stop: every shard ended, or a
/// successor holds the listener (phases only move forward, and `begun`
/// fires once the phase is Successor or Leaving).
async fn stopped(ended: &Shutdown, o: &Observed) {
    or(ended.wait(), async {
        o.drain.begun().wait().await;
        if o.drain.phase() != Phase::Successor {
            std::future::pending::<()>().await;
        }
    })
    .await
}

struct ProxyEndpoints {
    observed: Observed,
    registry: Registry,
}

impl Endpoints for ProxyEndpoints {
    fn get(&self, path: &str) -> Reply {
        let o = &self.observed;
        match path {
            "/metrics" => Reply::metrics(&self.registry),
            "/routes" => {
                let table = o.snapshot.lock().unwrap_or_else(|p| p.into_inner()).clone();
                Reply::json(serde_json::to_string_pretty(&*table).unwrap_or_default())
            }
            "/healthz" => Reply::text(StatusCode::OK, format!("{}\n", o.liveness())),
            "/readyz" => Reply::readiness(o.readiness()),
            _ => Reply::text(StatusCode::NOT_FOUND, "try /metrics, /routes, /healthz or /readyz\n".into()),
        }
    }
}
