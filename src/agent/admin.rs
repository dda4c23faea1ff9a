//! The agent's admin endpoint (`admin_addr`), on its own thread through
//! [`crate::runtime::admin_http`] (connection cap, timeouts, bounded stop):
//! `GET /metrics` (Prometheus text), `GET /tunnels` (the tunnels up, JSON),
//! `GET /healthz` (200 while the process runs), `GET /readyz` (200 while at
//! least one tunnel is up and the agent is not shutting down; 503 naming
//! the reason otherwise).
//!
//! Invariants: it reads only [`AgentStats`], the agent's shutdown signal
//! and its loaded certificates, never the executor; it stops when the
//! agent has ended (not at the shutdown request, so `/readyz` answers 503
//! `draining` while the tunnels drain).

use std::fmt;
use std::net::TcpListener;
use std::sync::Arc;
use std::thread::JoinHandle;

use http::StatusCode;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::registry::Registry;
use rustls::ClientConfig;

use super::stats::AgentStats;
use crate::runtime::admin_http::{self, counter, gauge, histogram, Endpoints, Labels, Reply, CERT_EXPIRY_HELP};
use crate::runtime::stats::HistogramSum;
use crate::runtime::Shutdown;
use crate::transport::reload::Live;
use crate::wire::error::Label;

/// What the admin thread reads.
#[derive(Clone)]
pub struct Observed {
    pub agent: String,
    pub stats: Arc<AgentStats>,
    /// Fires when the agent is asked to stop (it then drains).
    pub shutdown: Shutdown,
    pub tls: Live<Arc<ClientConfig>>,
}

impl fmt::Debug for Observed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Observed").field("agent", &self.agent).finish_non_exhaustive()
    }
}

impl Observed {
    /// Ready: not shutting down, and at least one tunnel up.
    pub fn readiness(&self) -> Result<String, String> {
        if self.shutdown.is_triggered() {
            return Err("draining (shutting down)".into());
        }
        let up = self.stats.tunnels();
        if up.is_empty() {
            return Err(format!("agent {}: no tunnel up yet", self.agent));
        }
        let to: Vec<String> = up.iter().map(|(a, p)| format!("{p} at {a}")).collect();
        Ok(format!("ready: agent {}, {} tunnel(s) up: {}", self.agent, up.len(), to.join(", ")))
    }
}

/// Serves the admin endpoint on `l` until `ended` fires (the agent ended).
pub fn spawn(l: TcpListener, o: Observed, ended: Shutdown) -> std::io::Result<JoinHandle<()>> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(o.clone()));
    let thread = format!("{}-admin", o.agent);
    admin_http::spawn(l, thread, Arc::new(AgentEndpoints { o, registry }), move || async move { ended.wait().await })
}

struct AgentEndpoints {
    o: Observed,
    registry: Registry,
}

impl Endpoints for AgentEndpoints {
    fn get(&self, path: &str) -> Reply {
        match path {
            "/metrics" => Reply::metrics(&self.registry),
            "/tunnels" => {
                let t: Vec<serde_json::Value> = self
                    .o
                    .stats
                    .tunnels()
                    .into_iter()
                    .map(|(addr, proxy)| serde_json::json!({ "addr": addr, "proxy": proxy }))
                    .collect();
                Reply::json(
                    serde_json::to_string_pretty(&serde_json::json!({ "agent": self.o.agent, "tunnels": t }))
                        .unwrap_or_default(),
                )
            }
            "/healthz" => Reply::text(StatusCode::OK, format!("alive: agent {}\n", self.o.agent)),
            "/readyz" => Reply::readiness(self.o.readiness()),
            _ => Reply::text(StatusCode::NOT_FOUND, "try /metrics, /tunnels, /healthz or /readyz\n".into()),
        }
    }
}

impl Collector for Observed {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        let s = &self.stats;
        let l = || -> Labels { vec![("agent", self.agent.clone())] };
        let one = |v: u64| vec![(l(), v)];
        counter(&mut e, "ringpeer_agent_dials", "Dials received from proxies", one(s.dials.get()))?;
        counter(&mut e, "ringpeer_agent_dials_established", "Dials whose target connected", one(s.established.get()))?;
        let errors: Vec<(Labels, u64)> = Label::ALL
            .iter()
            .map(|lb| (*lb, s.error_count(*lb)))
            .filter(|(_, n)| *n > 0)
            .map(|(lb, n)| {
                let mut x = l();
                x.push(("error", lb.name().to_string()));
                (x, n)
            })
            .collect();
        counter(&mut e, "ringpeer_agent_dial_errors", "Dials answered with an error, by error label", errors)?;
        let mut h = HistogramSum::default();
        s.connect.add_to(&mut h);
        histogram(
            &mut e,
            "ringpeer_agent_target_connect_seconds",
            "Time to connect to the target service",
            vec![(l(), h)],
        )?;
        gauge(&mut e, "ringpeer_agent_open_streams", "Relayed streams open", vec![(l(), s.open_streams.get())])?;
        gauge(&mut e, "ringpeer_agent_buffered_bytes", "Bytes the relay holds", vec![(l(), s.buffered.get())])?;
        let up = s.tunnels();
        gauge(&mut e, "ringpeer_agent_tunnels", "Tunnels up", vec![(l(), up.len() as i64)])?;
        let per: Vec<(Labels, i64)> = up
            .into_iter()
            .map(|(addr, proxy)| {
                let mut x = l();
                x.extend([("proxy", proxy), ("addr", addr)]);
                (x, 1)
            })
            .collect();
        gauge(&mut e, "ringpeer_agent_tunnel_up", "1 per tunnel up, by proxy and address", per)?;
        counter(&mut e, "ringpeer_agent_tunnels_opened", "Tunnels established", one(s.tunnels_opened.get()))?;
        counter(
            &mut e,
            "ringpeer_agent_tunnel_failures",
            "Tunnel attempts that failed before the tunnel was up",
            one(s.tunnel_failures.get()),
        )?;
        gauge(
            &mut e,
            "ringpeer_agent_ready",
            "1 while /readyz answers 200",
            vec![(l(), i64::from(self.readiness().is_ok()))],
        )?;
        let certs = self.tls.current().material.expiry_samples(&l());
        gauge(&mut e, "ringpeer_agent_cert_expiry_seconds", CERT_EXPIRY_HELP, certs)
    }
}
