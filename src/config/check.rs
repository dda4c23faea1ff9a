//! `ringpeer proxy|agent --config F --check`: everything that can be
//! known about a config without binding a socket or dialling anything —
//! syntax, every value, addresses, TLS files (readable, key not
//! world-readable, key matches the certificate, chains to the CA, not
//! expired, SPIFFE identity = configured cluster/role/id, CRL parses) and
//! the Redis URL (well formed; credentials and TLS files read; no
//! connection).
//!
//! Invariant: every problem is reported, not just the first — except that
//! a file that does not parse has nothing more to check — one line each,
//! naming the key or file. Warnings (a certificate expiring within
//! [`EXPIRY_WARNING`]) do not fail the check.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::runtime::listeners::parse_addr;
use crate::transport::identity::Role;
use crate::transport::reload::EXPIRY_WARNING;
use crate::transport::tls::{TlsFiles, TlsMaterial};
use crate::transport::verify::rfc3339;

use super::{AgentConfig, BackendKind, ProxyConfig};

/// What a check found.
#[derive(Debug, Default)]
pub struct Report {
    /// Problems: the config would not start, or not work.
    pub problems: Vec<String>,
    /// Warnings: it would start, but look at these.
    pub warnings: Vec<String>,
    /// One line saying what was checked, when all is well.
    pub summary: String,
}

impl Report {
    /// No problem found.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Parses `path` as `T`, the syntax error as one line with its position.
fn parse<T: serde::de::DeserializeOwned>(path: &Path, r: &mut Report) -> Option<T> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            r.problems.push(format!("cannot read config {}: {e}", path.display()));
            return None;
        }
    };
    match toml::from_str(&text) {
        Ok(c) => Some(c),
        Err(e) => {
            let at = e.span().map(|s| {
                let line = text[..s.start.min(text.len())].lines().count().max(1);
                format!(" (line {line})")
            });
            r.problems.push(format!("{}{}", e.message().trim(), at.unwrap_or_default()));
            None
        }
    }
}

/// Checks a proxy config.
pub fn proxy(path: &Path) -> Report {
    let mut r = Report::default();
    let Some(c) = parse::<ProxyConfig>(path, &mut r) else { return r };
    r.problems.extend(c.problems());
    let mut addrs = vec![("client_addr", &c.client_addr), ("tunnel_addr", &c.tunnel_addr)];
    addrs.extend(c.admin_addr.as_ref().map(|a| ("admin_addr", a)));
    for (key, a) in addrs {
        if parse_addr(a, key).is_err() {
            r.problems.push(format!("{key} {a:?} is not a host:port address"));
        }
    }
    if c.peer_addr.rsplit_once(':').is_some() && parse_addr(&c.peer_addr, "peer_addr").is_err() {
        r.problems.push(format!("peer_addr {:?} is not a host:port address", c.peer_addr));
    }
    if c.backend.kind == BackendKind::Redis && c.backend.url.is_some() {
        if let Err(e) = c.backend.redis_options() {
            r.problems.push(format!("{e:#}"));
        }
    }
    let id = tls(&c.tls, &c.cluster, Role::Proxy, &c.id, &mut r);
    r.summary = format!("proxy {} of cluster {}{id}", c.id, c.cluster);
    r
}

/// Checks an agent config.
pub fn agent(path: &Path) -> Report {
    let mut r = Report::default();
    let Some(c) = parse::<AgentConfig>(path, &mut r) else { return r };
    r.problems.extend(c.problems());
    let id = tls(&c.tls, &c.cluster, Role::Agent, &c.id, &mut r);
    r.summary = format!("agent {} of cluster {}, {} service(s){id}", c.id, c.cluster, c.services.len());
    r
}

/// The TLS files: each readable, the key private, then the whole material
/// as a process would load it. Returns a summary of the certificate.
fn tls(files: &TlsFiles, cluster: &str, role: Role, id: &str, r: &mut Report) -> String {
    let before = r.problems.len();
    let all = [("tls.ca", Some(&files.ca)), ("tls.cert", Some(&files.cert)), ("tls.key", Some(&files.key))];
    for (key, p) in all.into_iter().chain([("tls.crl", files.crl.as_ref())]) {
        let Some(p) = p else { continue };
        match std::fs::File::open(p).and_then(|f| f.metadata()) {
            Err(e) => r.problems.push(format!("{key} {}: cannot read: {e}", p.display())),
            Ok(m) if key == "tls.key" && m.permissions().mode() & 0o004 != 0 => r.problems.push(format!(
                "tls.key {} is world-readable (mode {:o}); chmod 600 it",
                p.display(),
                m.permissions().mode() & 0o777
            )),
            Ok(_) => {}
        }
    }
    if r.problems.len() > before {
        return String::new();
    }
    match TlsMaterial::load_as(files, cluster, role, id) {
        Err(e) => {
            r.problems.push(e.to_string());
            String::new()
        }
        Ok(m) => {
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            for c in &m.certs {
                let left = c.remaining(now);
                if left < EXPIRY_WARNING.as_secs() as i64 {
                    r.warnings.push(format!(
                        "{} certificate {} (serial {}) expires at {} ({:.1} days left)",
                        c.kind,
                        c.subject,
                        c.serial,
                        rfc3339(c.not_after),
                        left as f64 / 86_400.0
                    ));
                }
            }
            format!(", certificate {} valid until {}", m.own().subject, rfc3339(m.own().not_after))
        }
    }
}
