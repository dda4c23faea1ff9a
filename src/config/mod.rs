//! Configuration files (TOML, serde): proxy and agent.
//!
//! Invariants: unknown keys are errors (a typo never silently falls back to a
//! default); every value is validated at load, so a running process never
//! meets a bad value; errors name the file and the key.

//!
//! `proxy` holds the proxy's file (with `[audit]` and `[[grants]]`),
//! `agent` the agent's (with its services and their allow lists); the
//! `[backend]` section and the loading helpers they share live here.

mod agent;
pub mod check;
pub mod live;
mod proxy;

pub use agent::*;
pub use proxy::*;

use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::transport::identity::valid_name;

/// `[backend]`: where routes live.
#[derive(Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// `memory` (embedded, one process) or `redis`.
    #[serde(default)]
    pub kind: BackendKind,
    /// Redis URL, `redis://host:port/db` or `rediss://` (TLS), with
    /// `kind = "redis"`; for high availability
    /// `redis+sentinel://s1:26379,s2:26379/<master>[/db]` or
    /// `redis+cluster://n1:6379,n2:6379` (`rediss+` for TLS). A password in
    /// it works but is visible to anyone who reads the config: use
    /// `password_file` or `RINGPEER_REDIS_PASSWORD`.
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
    /// File holding the sentinels' own password (`requirepass` of
    /// `redis+sentinel://` sentinels); without it,
    /// `RINGPEER_REDIS_SENTINEL_PASSWORD`.
    #[serde(default)]
    pub sentinel_password_file: Option<std::path::PathBuf>,
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
            .field("sentinel_password_file", &self.sentinel_password_file)
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
            sentinel_password_file: self.sentinel_password_file.clone(),
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
            sentinel_password_file: None,
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

fn default_drain_timeout() -> u64 {
    300_000
}
fn yes() -> bool {
    true
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

fn name_problem(key: &str, v: &str) -> Option<String> {
    (!valid_name(v)).then(|| format!("{key} = {v:?} is not a valid name (letters, digits, '-', '_', '.')"))
}

fn log_level_problem(v: Option<&str>) -> Option<String> {
    let v = v?;
    tracing_subscriber::EnvFilter::builder()
        .parse(v)
        .err()
        .map(|e| format!("log_level {v:?} is not a log filter (e.g. \"info\", \"warn,ringpeer::proxy=debug\"): {e}"))
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
