//! The proxy's configuration file: listeners, timeouts, backend, grants,
//! audit, limits and HTTP/2 tuning.

use std::path::Path;

use anyhow::bail;
use serde::{Deserialize, Serialize};

use crate::runtime::budget::ProxyLimits;
use crate::transport::h2conf::H2Tuning;
use crate::transport::tls::TlsFiles;

use super::*;

/// A proxy's configuration file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// Cluster name (the SPIFFE trust domain).
    pub cluster: String,
    /// This proxy's id; must match the name in its certificate.
    pub id: String,
    /// Number of shards (executors); default: available cores.
    #[serde(default)]
    pub shards: Option<usize>,
    /// Client edge listen address.
    pub client_addr: String,
    /// Agent tunnel listen address.
    pub tunnel_addr: String,
    /// Peer link listen address of shard 0; shard i listens on port + i
    /// (port 0: any free port per shard).
    #[serde(default = "default_peer_addr")]
    pub peer_addr: String,
    /// Host other proxies dial to reach this one (default: the peer_addr
    /// host; needed when that is a wildcard).
    #[serde(default)]
    pub advertise_host: Option<String>,
    /// Advertise each shard's own peer port, so peer streams land on the
    /// shard that owns the tunnel. Off: every shard advertises shard 0's
    /// port and the stream crosses shards there (for comparison).
    #[serde(default = "yes")]
    pub shard_aware_peering: bool,
    /// Pin shard i to CPU i (mod cores).
    #[serde(default = "yes")]
    pub pin_cpus: bool,
    /// Deadline for a dial to be established, ms.
    #[serde(default = "default_dial_timeout")]
    pub dial_timeout_ms: u64,
    /// Deadline for connecting a peer link (TCP + TLS + HTTP/2), ms. A dial
    /// gives a connect at most this, or what is left of its own deadline, so
    /// one black-holed peer leaves time to try the next.
    #[serde(default = "default_peer_connect_timeout")]
    pub peer_connect_timeout_ms: u64,
    /// How long a peer may take to answer a dial's headers, ms. A proxy
    /// answers them as soon as it has read the `DialRequest`, so a peer that
    /// does not is frozen: it is skipped (and marked suspect) and the dial
    /// goes to another holder within its deadline.
    #[serde(default = "default_peer_answer_timeout")]
    pub peer_answer_timeout_ms: u64,
    /// TLS files.
    pub tls: TlsFiles,
    /// Route backend.
    #[serde(default)]
    pub backend: BackendConfig,
    /// Tunnel strategy seeded into the backend when it has none.
    #[serde(default)]
    pub strategy: crate::route::model::Strategy,
    /// Admin HTTP endpoint (`/metrics`, `/routes`, `/healthz`, `/readyz`); off when absent.
    #[serde(default)]
    pub admin_addr: Option<String>,
    /// HTTP/2 tuning.
    #[serde(default)]
    pub h2: H2Tuning,
    /// Budgets per connection, identity and shard (README, "Limits").
    #[serde(default)]
    pub limits: ProxyLimits,
    /// How long a draining proxy keeps its open streams, ms (README,
    /// "Upgrades and maintenance"). Minutes: a stream is a user's session.
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout_ms: u64,
    /// After SIGTERM, how long a proxy waits for a successor to take over
    /// its listeners before it leaves the fleet instead, ms.
    #[serde(default = "default_handover_wait")]
    pub handover_wait_ms: u64,
    /// Authorization policy: `grants` (default: deny unless a grant allows
    /// the dial) or `allow_all`.
    #[serde(default)]
    pub authorization: crate::route::grants::Authorization,
    /// Grants for the embedded store (`[[grants]]`); with Redis, grants live
    /// in Redis (`ringpeer grants add`), so this must be empty.
    #[serde(default)]
    pub grants: Vec<GrantSpec>,
    /// Unix socket on which this proxy hands its listening sockets to a
    /// successor (`ringpeer proxy` started with the same config) and takes
    /// `ringpeer proxy … drain`. Default: [`ProxyConfig::upgrade_socket_path`].
    #[serde(default)]
    pub upgrade_socket: Option<std::path::PathBuf>,
    /// The audit log (`[audit]`): one JSON line per client-edge dial.
    #[serde(default)]
    pub audit: AuditConfig,
    /// Log filter (tracing `EnvFilter` syntax, e.g. `info` or
    /// `warn,ringpeer::proxy=debug`); `RUST_LOG` and `--log` override it at
    /// start, SIGHUP applies a change.
    #[serde(default)]
    pub log_level: Option<String>,
}

/// `[audit]`: where the entry proxy writes one JSON line per client dial
/// (README, "Audit").
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// Write the audit log (default: on; an operator expects an audit
    /// trail without asking for one).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// A file (appended to; created mode 0640), or `"-"` for stdout, the
    /// default: logs go to stderr, so the audit stays a stream of its own.
    #[serde(default = "default_audit_path")]
    pub path: String,
    /// Lines queued for the writer thread before further lines are dropped
    /// (and counted in `ringpeer_audit_dropped_total`).
    #[serde(default = "default_audit_queue")]
    pub queue: usize,
}

fn default_audit_path() -> String {
    "-".into()
}
fn default_audit_queue() -> usize {
    65_536
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig { enabled: true, path: default_audit_path(), queue: default_audit_queue() }
    }
}

impl AuditConfig {
    /// No audit log (the in-process fleet: demo and bench print on stdout).
    pub fn off() -> Self {
        AuditConfig { enabled: false, ..AuditConfig::default() }
    }

    /// An audit log appended to `path`.
    pub fn to_file(path: &Path) -> Self {
        AuditConfig { path: path.display().to_string(), ..AuditConfig::default() }
    }
}

/// One `[[grants]]` entry.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct GrantSpec {
    /// Grant name (its key in the backend).
    pub name: String,
    /// Client names (`spiffe://<cluster>/client/<name>`) or globs.
    pub clients: Vec<String>,
    /// Agent ids or globs.
    pub agents: Vec<String>,
    /// Service names or globs (`"*"`: any).
    pub services: Vec<String>,
}

impl GrantSpec {
    /// The validated grant.
    pub fn grant(&self) -> Result<crate::route::grants::Grant, String> {
        crate::route::grants::Grant::new(&self.name, &self.clients, &self.agents, &self.services)
            .map_err(|e| format!("grant {:?}: {e}", self.name))
    }
}

fn default_handover_wait() -> u64 {
    5_000
}

fn default_peer_addr() -> String {
    "0.0.0.0:3021".into()
}
fn default_dial_timeout() -> u64 {
    10_000
}
fn default_peer_connect_timeout() -> u64 {
    1_000
}
fn default_peer_answer_timeout() -> u64 {
    500
}

impl ProxyConfig {
    /// Loads and validates a proxy config.
    pub fn load(path: &Path) -> anyhow::Result<ProxyConfig> {
        let c: ProxyConfig = parse(path, &read(path)?)?;
        c.validate().map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))?;
        Ok(c)
    }

    /// Validates values; the error names the key (every bad key, `; `
    /// between them).
    pub fn validate(&self) -> anyhow::Result<()> {
        let p = self.problems();
        if !p.is_empty() {
            bail!("{}", p.join("; "));
        }
        Ok(())
    }

    /// Every bad value, one line each naming its key (`--check` lists
    /// them all; `validate` refuses on any).
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        p.extend(name_problem("cluster", &self.cluster));
        p.extend(name_problem("id", &self.id));
        p.extend(log_level_problem(self.log_level.as_deref()));
        if self.shards == Some(0) {
            p.push("shards must be at least 1".into());
        }
        if self.backend.kind == BackendKind::Redis && self.backend.url.is_none() {
            p.push("backend.kind = \"redis\" needs backend.url".into());
        }
        if self.backend.tls_cert.is_some() != self.backend.tls_key.is_some() {
            p.push("backend.tls_cert and backend.tls_key go together".into());
        }
        if self.backend.proxy_ttl_ms < 300 {
            p.push(format!("backend.proxy_ttl_ms {} must be >= 300", self.backend.proxy_ttl_ms));
        }
        if self.backend.resync_interval_ms < 100 {
            p.push(format!("backend.resync_interval_ms {} must be >= 100", self.backend.resync_interval_ms));
        }
        if self.backend.events_maxlen == 0 {
            p.push("backend.events_maxlen must be >= 1".into());
        }
        for (k, v) in [
            ("dial_timeout_ms", self.dial_timeout_ms),
            ("peer_connect_timeout_ms", self.peer_connect_timeout_ms),
            ("peer_answer_timeout_ms", self.peer_answer_timeout_ms),
            ("drain_timeout_ms", self.drain_timeout_ms),
        ] {
            if v == 0 {
                p.push(format!("{k} must be > 0"));
            }
        }
        // Shard i listens on the peer port + i: the last one must exist.
        let port = self.peer_addr.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok());
        match port {
            None => p.push(format!("peer_addr {:?} is not host:port", self.peer_addr)),
            Some(port) if port != 0 && usize::from(port) + self.shard_count() - 1 > 65_535 => p.push(format!(
                "peer_addr port {port} + {} shards overflows 65535 (shard i listens on port + i); lower peer_addr's port or shards",
                self.shard_count()
            )),
            Some(_) => {}
        }
        if self.backend.kind == BackendKind::Redis && !self.grants.is_empty() {
            p.push("[[grants]] is for the embedded store; with backend.kind = \"redis\" grants live in Redis (`ringpeer grants add`)".into());
        }
        let mut names = std::collections::HashSet::new();
        for g in &self.grants {
            if let Err(e) = g.grant() {
                p.push(e);
            }
            if !names.insert(&g.name) {
                p.push(format!("grant {:?} is defined twice", g.name));
            }
        }
        if self.audit.queue == 0 || self.audit.queue > 1 << 24 {
            p.push(format!("audit.queue {} must be between 1 and {}", self.audit.queue, 1 << 24));
        }
        if self.audit.path.is_empty() {
            p.push("audit.path must be a file or \"-\" (stdout)".into());
        }
        p.extend(self.limits.validate().err());
        p.extend(self.h2.validate().err());
        p
    }

    /// Shard count: configured, or available cores.
    pub fn shard_count(&self) -> usize {
        self.shards.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
    }

    /// The upgrade socket: configured, else
    /// `$XDG_RUNTIME_DIR` (or `/tmp`) `/ringpeer-<cluster>-<id>-<client port>.sock`.
    /// None when neither is set and the client port is 0: a successor could
    /// not know which process to take over from.
    pub fn upgrade_socket_path(&self) -> Option<std::path::PathBuf> {
        if let Some(p) = &self.upgrade_socket {
            return Some(p.clone());
        }
        let port = self.client_addr.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok()).filter(|p| *p != 0)?;
        let dir = std::env::var_os("XDG_RUNTIME_DIR").map(std::path::PathBuf::from).unwrap_or_else(|| "/tmp".into());
        Some(dir.join(format!("ringpeer-{}-{}-{port}.sock", self.cluster, self.id)))
    }
}
