//! The `/metrics` families: a `prometheus-client` [`Collector`] that reads
//! every shard's single-writer [`ShardStats`] at scrape time and sums them,
//! encoded by the crate's Prometheus text encoder (`# HELP`, `# TYPE`,
//! counters ending in `_total`, histograms as `_bucket`/`_sum`/`_count`).
//!
//! Invariants:
//! - Shards never see the collector: they write their own counters,
//!   gauges and histograms (no shared atomics, no locks on the hot path);
//!   a scrape reads them with relaxed loads, so a scrape racing a dial may
//!   see it in one family and not yet in the next.
//! - Every sample carries `proxy`; the gauges where one shard can be the
//!   problem (tunnels, peer links, open streams, buffered bytes, route
//!   version) carry `shard` too; counters and histograms are summed over
//!   shards (per-shard rates are noise for an operator, and cardinality).
//! - Error counters with many label combinations (`error` × `side` ×
//!   `path`) list only the combinations that happened.
//!
//! Alternatives rejected: prometheus-client's own `Counter`/`Histogram` in
//! a `Family` (one shared atomic or mutex per update, contended by every
//! shard, and a hash-map lookup per labelled update); hand-formatted text
//! (what this replaced: no `# HELP`/`# TYPE`, easy to get the format wrong).

use std::fmt;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::registry::Registry;

use super::readiness::Observed;
use super::stats::{DialPath, HistogramSum, Metrics, ShardStats, SIDES};
use crate::wire::error::Label;

use crate::runtime::admin_http::{counter, gauge, histogram, Labels, CERT_EXPIRY_HELP};

/// One proxy's metric families.
#[derive(Clone)]
pub struct Families {
    proxy: String,
    metrics: Metrics,
    /// The running proxy's route, drain and certificate state (absent when
    /// only counters are rendered, as in in-process tests).
    observed: Option<Observed>,
}

impl fmt::Debug for Families {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Families").field("proxy", &self.proxy).finish_non_exhaustive()
    }
}

impl Families {
    /// Every family of a running proxy.
    pub fn of(o: Observed) -> Families {
        Families { proxy: o.proxy.clone(), metrics: o.metrics.clone(), observed: Some(o) }
    }

    /// The counter families alone.
    pub fn of_metrics(proxy: &str, metrics: Metrics) -> Families {
        Families { proxy: proxy.to_string(), metrics, observed: None }
    }

    /// A registry holding these families (built once per admin server).
    pub fn registry(self) -> Registry {
        let mut r = Registry::default();
        r.register_collector(Box::new(self));
        r
    }

    /// The Prometheus text exposition (version 0.0.4).
    pub fn render(self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry());
        out
    }

    fn l(&self) -> Labels {
        vec![("proxy", self.proxy.clone())]
    }

    fn with(&self, more: &[(&'static str, &str)]) -> Labels {
        let mut l = self.l();
        l.extend(more.iter().map(|(k, v)| (*k, v.to_string())));
        l
    }

    fn sum(&self, f: impl Fn(&ShardStats) -> u64) -> u64 {
        self.metrics.sum(f)
    }

    fn per_shard(&self, f: impl Fn(&ShardStats) -> i64) -> Vec<(Labels, i64)> {
        let shards = self.metrics.shards.iter().enumerate();
        shards.map(|(i, s)| (self.with(&[("shard", &i.to_string())]), f(s))).collect()
    }

    fn histograms(
        &self,
        pick: impl Fn(&ShardStats) -> &[super::stats::Histogram; DialPath::COUNT],
    ) -> Vec<(Labels, HistogramSum)> {
        DialPath::ALL
            .iter()
            .map(|p| {
                let mut h = HistogramSum::default();
                for s in &self.metrics.shards {
                    pick(s)[*p as usize].add_to(&mut h);
                }
                (self.with(&[("path", p.name())]), h)
            })
            .collect()
    }

    fn encode_counters(&self, e: &mut DescriptorEncoder) -> fmt::Result {
        let one = |v: u64| vec![(self.l(), v)];
        counter(e, "ringpeer_dials", "Dials received (client edge and peer links)", one(self.sum(|s| s.dials.get())))?;
        let attempts: Vec<(Labels, u64)> = DialPath::ALL
            .iter()
            .map(|p| {
                let v = self.sum(|s| match p {
                    DialPath::Local => s.dials_local.get(),
                    DialPath::Shard => s.dials_cross_shard.get(),
                    DialPath::Peer => s.dials_peered.get(),
                });
                (self.with(&[("path", p.name())]), v)
            })
            .collect();
        counter(
            e,
            "ringpeer_dial_attempts",
            "Upstreams tried by dials, by path: local (a tunnel on the same shard), shard (another shard's tunnel), peer (another proxy)",
            attempts,
        )?;
        let mut failed = Vec::new();
        for label in Label::ALL {
            for side in SIDES {
                for path in DialPath::ALL.iter().map(Some).chain([None]) {
                    let v = self.sum(|s| s.failure_count(*label, side, path.copied()));
                    if v > 0 {
                        let p = path.map_or("none", |p| p.name());
                        failed.push((self.with(&[("error", label.name()), ("side", side.name()), ("path", p)]), v));
                    }
                }
            }
        }
        counter(
            e,
            "ringpeer_dials_failed",
            "Dials that failed before being established, by error label, failing side and the path tried last (none: no upstream was tried)",
            failed,
        )?;
        let replanned = one(self.sum(|s| s.dials_replanned.get()));
        counter(
            e,
            "ringpeer_dials_replanned",
            "Dials that waited for the routes to change and were planned again",
            replanned,
        )?;
        let errors: Vec<(Labels, u64)> = Label::ALL
            .iter()
            .filter_map(|l| {
                let v = self.sum(|s| s.error_count(*l));
                (v > 0).then(|| (self.with(&[("error", l.name())]), v))
            })
            .collect();
        counter(
            e,
            "ringpeer_errors",
            "Failures by error label: failed dials, refused handshakes and streams, relays ended by an error",
            errors,
        )?;
        let bytes = vec![
            (self.with(&[("direction", "up")]), self.sum(|s| s.bytes_up.get())),
            (self.with(&[("direction", "down")]), self.sum(|s| s.bytes_down.get())),
        ];
        counter(e, "ringpeer_relayed_bytes", "Payload bytes relayed, up (client to agent) and down", bytes)?;
        let conns = one(self.sum(|s| s.client_conns.get()));
        counter(e, "ringpeer_client_connections", "Client edge connections accepted", conns)?;
        let audit = &self.metrics.audit;
        counter(e, "ringpeer_audit_lines", "Audit lines written to the audit sink", one(audit.lines()))?;
        counter(
            e,
            "ringpeer_audit_dropped",
            "Audit lines dropped (queue full, or the sink failed)",
            one(audit.dropped_count()),
        )
    }

    fn encode_shards(&self, e: &mut DescriptorEncoder) -> fmt::Result {
        histogram(
            e,
            "ringpeer_dial_setup_seconds",
            "Dial set-up time, from arrival to established, by path",
            self.histograms(|s| &s.setup),
        )?;
        histogram(
            e,
            "ringpeer_dial_first_byte_seconds",
            "Time from a dial's arrival to the first DATA relayed back to the caller, by path",
            self.histograms(|s| &s.first_byte),
        )?;
        gauge(e, "ringpeer_tunnels", "Agent tunnels held", self.per_shard(|s| s.tunnels.get()))?;
        gauge(e, "ringpeer_peer_links", "Peer links open from this shard", self.per_shard(|s| s.peer_links.get()))?;
        gauge(e, "ringpeer_active_streams", "Open relayed streams", self.per_shard(|s| s.active_streams.get()))?;
        let buffered = self.per_shard(|s| s.buffered.get());
        gauge(
            e,
            "ringpeer_buffered_bytes",
            "Bytes held by the relay (read buffers, chunks not yet credited)",
            buffered,
        )?;
        let version = self.per_shard(|s| s.route_version.get());
        gauge(e, "ringpeer_route_version", "Version of the route snapshot the shard routes by", version)
    }

    fn encode_observed(&self, e: &mut DescriptorEncoder, o: &Observed) -> fmt::Result {
        let table = o.snapshot.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let health = o.health.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let one = |v: i64| vec![(self.l(), v)];
        gauge(e, "ringpeer_route_agents", "Agents in the route table", one(table.agents.len() as i64))?;
        gauge(e, "ringpeer_route_proxies", "Live proxies in the route table", one(table.proxies.len() as i64))?;
        let up = health.synced && health.reader_error.is_none() && health.writer_error.is_none();
        let backend = self.with(&[("backend", &health.backend)]);
        gauge(
            e,
            "ringpeer_route_backend_up",
            "1 while the route backend is followed and takes writes, else 0",
            vec![(backend, i64::from(up))],
        )?;
        let age: Vec<(Labels, f64)> =
            health.last_sync.map(|t| (self.l(), t.elapsed().as_secs_f64())).into_iter().collect();
        gauge(
            e,
            "ringpeer_route_sync_age_seconds",
            "Seconds since the route backend last delivered a full load or events (absent before the first)",
            age,
        )?;
        gauge(
            e,
            "ringpeer_draining",
            "1 while the proxy drains (SIGTERM, drain, handover)",
            one(i64::from(o.draining())),
        )?;
        gauge(e, "ringpeer_ready", "1 while /readyz answers 200", one(i64::from(o.readiness().is_ok())))?;
        gauge(e, "ringpeer_cert_expiry_seconds", CERT_EXPIRY_HELP, o.tls.current().material.expiry_samples(&self.l()))
    }
}

impl Collector for Families {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        self.encode_counters(&mut e)?;
        self.encode_shards(&mut e)?;
        if let Some(o) = &self.observed {
            self.encode_observed(&mut e, o)?;
        }
        Ok(())
    }
}
