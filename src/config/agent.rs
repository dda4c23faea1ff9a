//! The agent's configuration file: proxies to start from, services (with
//! their optional allow lists), limits and HTTP/2 tuning.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::bail;
use serde::{Deserialize, Serialize};

use crate::runtime::budget::AgentLimits;
use crate::transport::h2conf::H2Tuning;
use crate::transport::identity::valid_name;
use crate::transport::tls::TlsFiles;

use super::*;

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
    /// Log filter (tracing `EnvFilter` syntax); `RUST_LOG` and `--log`
    /// override it at start, SIGHUP applies a change.
    #[serde(default)]
    pub log_level: Option<String>,
    /// Admin endpoint (`/metrics`, `/tunnels`, `/healthz`, `/readyz`),
    /// `host:port` (bound as the proxy binds its own); none when absent.
    #[serde(default)]
    pub admin_addr: Option<String>,
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

impl AgentConfig {
    /// Loads and validates an agent config.
    pub fn load(path: &Path) -> anyhow::Result<AgentConfig> {
        let c: AgentConfig = parse(path, &read(path)?)?;
        c.validate().map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))?;
        Ok(c)
    }

    /// Validates values; the error names every bad key.
    pub fn validate(&self) -> anyhow::Result<()> {
        let p = self.problems();
        if !p.is_empty() {
            bail!("{}", p.join("; "));
        }
        Ok(())
    }

    /// Every bad value, one line each (`--check` lists them all).
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        p.extend(name_problem("cluster", &self.cluster));
        p.extend(name_problem("id", &self.id));
        p.extend(log_level_problem(self.log_level.as_deref()));
        if self.proxies.is_empty() {
            p.push("proxies must list at least one proxy tunnel address".into());
        }
        for a in &self.proxies {
            if a.rsplit_once(':').and_then(|(_, port)| port.parse::<u16>().ok()).is_none() {
                p.push(format!("proxies: {a:?} is not host:port"));
            }
        }
        if self.services.is_empty() {
            p.push("[services] must define at least one service".into());
        }
        if let Some(a) = &self.admin_addr {
            if crate::runtime::listeners::parse_addr(a, "admin_addr").is_err() {
                p.push(format!("admin_addr {a:?} is not a host:port address"));
            }
        }
        if self.connect_timeout_ms == 0 {
            p.push("connect_timeout_ms must be > 0".into());
        }
        if self.agent_connection_count == Some(0) {
            p.push("agent_connection_count must be at least 1".into());
        }
        for (name, spec) in &self.services {
            let addr = &spec.addr;
            if !valid_name(name) {
                p.push(format!("service name {name:?} is not a valid name"));
            }
            if !addr.contains(':') {
                p.push(format!("service {name} = {addr:?} is not host:port"));
            }
            if let Some(allow) = &spec.allow {
                if allow.is_empty() {
                    p.push(format!("service {name:?}: allow = [] would refuse every client; omit allow to serve every client the proxies' grants let through"));
                }
                for pat in allow {
                    if let Err(e) = crate::route::grants::Pattern::new(pat) {
                        p.push(format!("service {name:?}: allow: {e}"));
                    }
                }
            }
        }
        p.extend(self.limits.validate().err());
        p.extend(self.h2.validate().err());
        p
    }
}
