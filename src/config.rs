//! Configuration files (TOML, serde): proxy and agent.
//!
//! Invariants: unknown keys are errors (a typo never silently falls back to a
//! default); every value is validated at load, so a running process never
//! meets a bad value; errors name the file and the key.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::runtime::budget::{AgentLimits, ProxyLimits};
use crate::transport::h2conf::H2Tuning;
use crate::transport::identity::valid_name;
use crate::transport::tls::TlsFiles;

/// `[backend]`: where routes live.
#[derive(Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// `memory` (embedded, one process) or `redis`.
    #[serde(default)]
    pub kind: BackendKind,
    /// Redis URL, `redis://host:port/db` or `rediss://` (TLS), with
    /// `kind = "redis"`. A password in it works but is visible to anyone who
    /// reads the config: use `password_file` or `RINGPEER_REDIS_PASSWORD`.
    #[serde(default)]
    pub url: Option<String>,
    /// File holding the Redis password (read at start, trailing newline
    /// stripped); without it, `RINGPEER_REDIS_PASSWORD` is used when set.
    #[serde(default)]
    pub password_file: Option<std::path::PathBuf>,
    /// Redis ACL user (Redis 6+); without it, `RINGPEER_REDIS_USERNAME`.
    #[serde(default)]
    pub username: Option<String>,
    /// PEM CA the `rediss://` server certificate must chain to (the system
    /// roots without it).
    #[serde(default)]
    pub tls_ca: Option<std::path::PathBuf>,
    /// PEM client certificate for `rediss://` servers that require one.
    #[serde(default)]
    pub tls_cert: Option<std::path::PathBuf>,
    /// PEM private key of `tls_cert`.
    #[serde(default)]
    pub tls_key: Option<std::path::PathBuf>,
    /// Validity of this proxy's record; it heartbeats every third of it.
    #[serde(default = "default_ttl")]
    pub proxy_ttl_ms: u64,
    /// Full resync period.
    #[serde(default = "default_resync")]
    pub resync_interval_ms: u64,
    /// Approximate length the event stream is trimmed to.
    #[serde(default = "default_maxlen")]
    pub events_maxlen: usize,
}

fn default_ttl() -> u64 {
    10_000
}
fn default_resync() -> u64 {
    30_000
}
fn default_maxlen() -> usize {
    10_000
}

/// By hand: the URL is shown with its password redacted.
impl std::fmt::Debug for BackendConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendConfig")
            .field("kind", &self.kind)
            .field("url", &self.url.as_deref().map(crate::route::redis_conn::redact))
            .field("password_file", &self.password_file)
            .field("username", &self.username)
            .field("tls_ca", &self.tls_ca)
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .field("proxy_ttl_ms", &self.proxy_ttl_ms)
            .field("resync_interval_ms", &self.resync_interval_ms)
            .field("events_maxlen", &self.events_maxlen)
            .finish()
    }
}

impl BackendConfig {
    /// Where the Redis credentials and TLS material come from.
    pub fn redis_sources(&self) -> crate::route::redis_conn::RedisSources {
        crate::route::redis_conn::RedisSources {
            username: self.username.clone(),
            password_file: self.password_file.clone(),
            tls_ca: self.tls_ca.clone(),
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
        }
    }

    /// The Redis connection options: the URL, the password (file,
    /// environment or URL) and the TLS files, all read now.
    pub fn redis_options(&self) -> anyhow::Result<crate::route::redis_conn::RedisOptions> {
        crate::route::redis_conn::RedisOptions::load(self.url.as_deref().unwrap_or_default(), &self.redis_sources())
            .context("[backend]")
    }
}

impl Default for BackendConfig {
    fn default() -> Self {
        BackendConfig {
            kind: BackendKind::Memory,
            url: None,
            password_file: None,
            username: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            proxy_ttl_ms: default_ttl(),
            resync_interval_ms: default_resync(),
            events_maxlen: default_maxlen(),
        }
    }
}

/// Route backend kind.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// In-process store.
    #[default]
    Memory,
    /// Redis.
    Redis,
}

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
    /// Admin HTTP endpoint (`/metrics`, `/routes`, `/healthz`); off when absent.
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

fn default_drain_timeout() -> u64 {
    300_000
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
fn yes() -> bool {
    true
}

/// An agent's configuration file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Cluster name.
    pub cluster: String,
    /// Agent id; must match the name in its certificate.
    pub id: String,
    /// Proxy tunnel addresses (`host:port`).
    pub proxies: Vec<String>,
    /// TLS files.
    pub tls: TlsFiles,
    /// Services: `name = "host:port"`, or a `[services.name]` table with
    /// `addr` and `allow` ([`ServiceSpec`]).
    pub services: BTreeMap<String, ServiceSpec>,
    /// Target connect deadline, ms.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_ms: u64,
    /// Tunnels this agent keeps under `proxy_peering`, overriding the
    /// cluster's `agent_connection_count` (e.g. 2 for an agent that must
    /// survive a proxy loss).
    #[serde(default)]
    pub agent_connection_count: Option<u32>,
    /// HTTP/2 tuning.
    #[serde(default)]
    pub h2: H2Tuning,
    /// Budgets per tunnel and for the relay's buffers (README, "Limits").
    #[serde(default)]
    pub limits: AgentLimits,
    /// How long a tunnel the agent drains (its proxy drains, or the
    /// strategy no longer wants it) keeps its open streams, ms.
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout_ms: u64,
}

/// One `[services]` entry: `name = "host:port"`, or a table
/// `[services.name]` with `addr` and an optional `allow` list of client
/// names or globs. Without `allow`, every client the proxies' grants let
/// through is served; with it, the agent itself refuses the others.
///
/// Deserialized by hand rather than as a serde untagged enum: an untagged
/// enum answers a typo in the table (`alow = [..]`) with "data did not match
/// any variant", where this names the unknown key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceSpec {
    /// Target address, `host:port`.
    pub addr: String,
    /// Client names or globs allowed to reach this service, if restricted.
    pub allow: Option<Vec<String>>,
}

impl ServiceSpec {
    /// A service at `addr` open to every client the proxies let through.
    pub fn open(addr: impl Into<String>) -> ServiceSpec {
        ServiceSpec { addr: addr.into(), allow: None }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceTable {
    addr: String,
    #[serde(default)]
    allow: Option<Vec<String>>,
}

impl<'de> Deserialize<'de> for ServiceSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = ServiceSpec;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("\"host:port\" or a table with addr and allow")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ServiceSpec, E> {
                Ok(ServiceSpec::open(v))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, m: A) -> Result<ServiceSpec, A::Error> {
                let t = ServiceTable::deserialize(serde::de::value::MapAccessDeserializer::new(m))?;
                Ok(ServiceSpec { addr: t.addr, allow: t.allow })
            }
        }
        d.deserialize_any(V)
    }
}

fn default_connect_timeout() -> u64 {
    5_000
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read config {}", path.display()))
}

fn parse<T: serde::de::DeserializeOwned>(path: &Path, text: &str) -> anyhow::Result<T> {
    toml::from_str(text).map_err(|e| {
        let msg = e.message().to_string();
        anyhow::anyhow!("config {}: {}", path.display(), msg.trim())
    })
}

fn check_name(path: &Path, key: &str, v: &str) -> anyhow::Result<()> {
    if !valid_name(v) {
        bail!("config {}: {key} = {v:?} is not a valid name (letters, digits, '-', '_', '.')", path.display());
    }
    Ok(())
}

impl ProxyConfig {
    /// Loads and validates a proxy config.
    pub fn load(path: &Path) -> anyhow::Result<ProxyConfig> {
        let c: ProxyConfig = parse(path, &read(path)?)?;
        c.validate().map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))?;
        Ok(c)
    }

    /// Validates values; each error names its key.
    pub fn validate(&self) -> anyhow::Result<()> {
        check_name(Path::new(""), "cluster", &self.cluster)?;
        check_name(Path::new(""), "id", &self.id)?;
        if self.shards == Some(0) {
            bail!("shards must be at least 1");
        }
        if self.backend.kind == BackendKind::Redis && self.backend.url.is_none() {
            bail!("backend.kind = \"redis\" needs backend.url");
        }
        if self.backend.tls_cert.is_some() != self.backend.tls_key.is_some() {
            bail!("backend.tls_cert and backend.tls_key go together");
        }
        if self.backend.proxy_ttl_ms < 300 {
            bail!("backend.proxy_ttl_ms {} must be >= 300", self.backend.proxy_ttl_ms);
        }
        if self.backend.resync_interval_ms < 100 {
            bail!("backend.resync_interval_ms {} must be >= 100", self.backend.resync_interval_ms);
        }
        if self.backend.events_maxlen == 0 {
            bail!("backend.events_maxlen must be >= 1");
        }
        for (k, v) in [
            ("dial_timeout_ms", self.dial_timeout_ms),
            ("peer_connect_timeout_ms", self.peer_connect_timeout_ms),
            ("peer_answer_timeout_ms", self.peer_answer_timeout_ms),
            ("drain_timeout_ms", self.drain_timeout_ms),
        ] {
            if v == 0 {
                bail!("{k} must be > 0");
            }
        }
        // Shard i listens on the peer port + i: the last one must exist.
        let port = self.peer_addr.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok());
        let Some(port) = port else { bail!("peer_addr {:?} is not host:port", self.peer_addr) };
        let last = usize::from(port) + self.shard_count() - 1;
        if port != 0 && last > 65_535 {
            bail!(
                "peer_addr port {port} + {} shards overflows 65535 (shard i listens on port + i); lower peer_addr's port or shards",
                self.shard_count()
            );
        }
        if self.backend.kind == BackendKind::Redis && !self.grants.is_empty() {
            bail!("[[grants]] is for the embedded store; with backend.kind = \"redis\" grants live in Redis (`ringpeer grants add`)");
        }
        let mut names = std::collections::HashSet::new();
        for g in &self.grants {
            g.grant().map_err(anyhow::Error::msg)?;
            if !names.insert(&g.name) {
                bail!("grant {:?} is defined twice", g.name);
            }
        }
        if self.audit.queue == 0 || self.audit.queue > 1 << 24 {
            bail!("audit.queue {} must be between 1 and {}", self.audit.queue, 1 << 24);
        }
        if self.audit.path.is_empty() {
            bail!("audit.path must be a file or \"-\" (stdout)");
        }
        self.limits.validate().map_err(anyhow::Error::msg)?;
        self.h2.validate().map_err(anyhow::Error::msg)
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

impl AgentConfig {
    /// Loads and validates an agent config.
    pub fn load(path: &Path) -> anyhow::Result<AgentConfig> {
        let c: AgentConfig = parse(path, &read(path)?)?;
        c.validate().map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))?;
        Ok(c)
    }

    /// Validates values.
    pub fn validate(&self) -> anyhow::Result<()> {
        check_name(Path::new(""), "cluster", &self.cluster)?;
        check_name(Path::new(""), "id", &self.id)?;
        if self.proxies.is_empty() {
            bail!("proxies must list at least one proxy tunnel address");
        }
        if self.services.is_empty() {
            bail!("[services] must define at least one service");
        }
        if self.connect_timeout_ms == 0 {
            bail!("connect_timeout_ms must be > 0");
        }
        if self.agent_connection_count == Some(0) {
            bail!("agent_connection_count must be at least 1");
        }
        for (name, spec) in &self.services {
            let addr = &spec.addr;
            if !valid_name(name) {
                bail!("service name {name:?} is not a valid name");
            }
            if !addr.contains(':') {
                bail!("service {name} = {addr:?} is not host:port");
            }
            if let Some(allow) = &spec.allow {
                if allow.is_empty() {
                    bail!("service {name:?}: allow = [] would refuse every client; omit allow to serve every client the proxies' grants let through");
                }
                for p in allow {
                    crate::route::grants::Pattern::new(p)
                        .map_err(|e| anyhow::anyhow!("service {name:?}: allow: {e}"))?;
                }
            }
        }
        self.limits.validate().map_err(anyhow::Error::msg)?;
        self.h2.validate().map_err(anyhow::Error::msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p.toml");
        let base = "cluster='c'\nid='proxy-a'\nclient_addr='127.0.0.1:0'\ntunnel_addr='127.0.0.1:0'\n[tls]\nca='a'\ncert='b'\nkey='c'\n";
        std::fs::write(&p, base).unwrap();
        let c = ProxyConfig::load(&p).unwrap();
        assert_eq!(c.peer_addr, "0.0.0.0:3021");
        std::fs::write(&p, format!("shardz=2\n{base}")).unwrap();
        let e = ProxyConfig::load(&p).unwrap_err().to_string();
        assert!(e.contains("unknown field `shardz`"), "{e}");
        std::fs::write(&p, format!("{base}[h2]\nmax_frame_size=10\n")).unwrap();
        let e = ProxyConfig::load(&p).unwrap_err().to_string();
        assert!(e.contains("max_frame_size"), "{e}");
        // Values that would silently break the proxy: each error names the
        // file and the key.
        let top = "cluster='c'\nid='proxy-a'\nclient_addr='127.0.0.1:0'\ntunnel_addr='127.0.0.1:0'\n";
        let tls = "[tls]\nca='a'\ncert='b'\nkey='c'\n";
        let cases = [
            ("", "[h2]\nmax_send_buffer=0\n", "h2.max_send_buffer must be > 0"),
            ("", "[h2]\nmax_send_buffer=5000000000\n", "h2.max_send_buffer"),
            ("", "[h2]\nmax_header_list_size=0\n", "h2.max_header_list_size must be > 0"),
            ("", "[h2]\nkeepalive_timeout_ms=0\n", "h2.keepalive_timeout_ms must be > 0"),
            ("", "[h2]\nkeepalive_interval_ms=0\n", "h2.keepalive_interval_ms must be > 0"),
            ("", "[h2]\nkeepalive_miss_ms=0\n", "h2.keepalive_miss_ms must be > 0"),
            (
                "",
                "[h2]\nkeepalive_miss_ms=7000\nkeepalive_timeout_ms=6000\n",
                "h2.keepalive_miss_ms (7000) must be below",
            ),
            ("", "[h2]\nmax_concurrent_streams=0\n", "h2.max_concurrent_streams must be > 0"),
            ("", "[h2]\nhandshake_timeout_ms=0\n", "h2.handshake_timeout_ms must be > 0"),
            ("", "[h2]\nidle_timeout_ms=5\n", "h2.idle_timeout_ms 5"),
            ("shards=4\npeer_addr='127.0.0.1:65533'\n", "", "peer_addr port 65533 + 4 shards overflows 65535"),
            ("peer_addr='nowhere'\n", "", "peer_addr \"nowhere\" is not host:port"),
            ("dial_timeout_ms=0\n", "", "dial_timeout_ms must be > 0"),
            ("peer_answer_timeout_ms=0\n", "", "peer_answer_timeout_ms must be > 0"),
            ("", "[audit]\nqueue=0\n", "audit.queue 0 must be between 1"),
            ("", "[audit]\npath=''\n", "audit.path must be a file"),
        ];
        for (head, tail, want) in cases {
            std::fs::write(&p, format!("{head}{top}{tls}{tail}")).unwrap();
            let e = ProxyConfig::load(&p).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains(&p.display().to_string()), "{want:?} not in {e:?}");
        }
        // The last shard may take port 65535 itself.
        std::fs::write(&p, format!("shards=4\npeer_addr='127.0.0.1:65532'\n{top}{tls}")).unwrap();
        ProxyConfig::load(&p).unwrap();
        // The agent's own keys.
        let a = dir.path().join("a.toml");
        let agent = "cluster='c'\nid='agent-1'\nproxies=['127.0.0.1:1']\n";
        let rest = "[tls]\nca='a'\ncert='b'\nkey='c'\n[services]\necho='127.0.0.1:7'\n";
        for (head, tail, want) in [
            ("connect_timeout_ms=0\n", "", "connect_timeout_ms must be > 0"),
            ("agent_connection_count=0\n", "", "agent_connection_count must be at least 1"),
            ("", "[h2]\nkeepalive_timeout_ms=0\n", "h2.keepalive_timeout_ms must be > 0"),
        ] {
            std::fs::write(&a, format!("{head}{agent}{rest}{tail}")).unwrap();
            let e = AgentConfig::load(&a).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains(&a.display().to_string()), "{want:?} not in {e:?}");
        }
        // `[services]`: the short form and the table form with `allow`; a
        // typo in the table or a bad pattern is an error naming the service.
        let svc =
            "[tls]\nca='a'\ncert='b'\nkey='c'\n[services]\nweb='127.0.0.1:80'\n[services.ssh]\naddr='127.0.0.1:22'\n";
        std::fs::write(&a, format!("{agent}{svc}allow=['alice','ci-*']\n")).unwrap();
        let c = AgentConfig::load(&a).unwrap();
        assert_eq!(c.services["web"], ServiceSpec::open("127.0.0.1:80"));
        assert_eq!(c.services["ssh"].allow.as_deref(), Some(&["alice".to_string(), "ci-*".to_string()][..]));
        for (tail, want) in [
            ("alow=['alice']\n", "unknown field `alow`"),
            ("allow=['al ice']\n", "service \"ssh\": allow: \"al ice\" is not a name or a glob"),
            ("allow=[]\n", "service \"ssh\": allow = [] would refuse every client"),
        ] {
            std::fs::write(&a, format!("{agent}{svc}{tail}")).unwrap();
            let e = AgentConfig::load(&a).unwrap_err().to_string();
            assert!(e.contains(want), "{want:?} not in {e:?}");
        }
        std::fs::write(&p, format!("{base}[limits]\nstreams_per_conn=0\n")).unwrap();
        let e = ProxyConfig::load(&p).unwrap_err().to_string();
        assert!(e.contains("limits.streams_per_conn must be > 0"), "{e}");
        std::fs::write(&p, format!("{base}[limits]\nstreams_per_tunnel=5\n")).unwrap();
        let e = ProxyConfig::load(&p).unwrap_err().to_string();
        assert!(e.contains("unknown field `streams_per_tunnel`"), "{e}");
        std::fs::write(&p, format!("{base}[limits]\nconns_per_identity=3\n")).unwrap();
        assert_eq!(ProxyConfig::load(&p).unwrap().limits.conns_per_identity, 3);
    }
}
