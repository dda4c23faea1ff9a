//! SPIFFE identities: `spiffe://<cluster>/<role>/<name>` in a certificate's
//! URI SAN.
//!
//! Invariant: an identity is only ever taken from a certificate that rustls
//! has already chain-verified against the cluster CA; names are validated so
//! they can be used as route keys as they are.

use std::fmt;
use std::str::FromStr;

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The role part of an identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// A proxy.
    Proxy,
    /// An agent.
    Agent,
    /// A client (dial, forward, bench).
    Client,
}

impl Role {
    /// The role as written in the SPIFFE path.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Proxy => "proxy",
            Role::Agent => "agent",
            Role::Client => "client",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Role, IdentityError> {
        match s {
            "proxy" => Ok(Role::Proxy),
            "agent" => Ok(Role::Agent),
            "client" => Ok(Role::Client),
            _ => Err(IdentityError::BadRole(s.to_string())),
        }
    }
}

/// Why an identity was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    /// The certificate has no `spiffe://` URI SAN.
    #[error("certificate has no spiffe:// URI SAN")]
    Missing,
    /// The URI is not `spiffe://cluster/role/name`.
    #[error("malformed SPIFFE id {0:?} (want spiffe://<cluster>/<role>/<name>)")]
    Malformed(String),
    /// Unknown role.
    #[error("unknown role {0:?} (want proxy, agent or client)")]
    BadRole(String),
    /// The certificate did not parse.
    #[error("certificate does not parse as X.509")]
    BadCert,
}

/// A parsed SPIFFE id.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    /// Trust domain (cluster name).
    pub cluster: String,
    /// Role.
    pub role: Role,
    /// Name within the role (proxy id, agent id, client name).
    pub name: String,
}

/// Whether `s` is usable as a cluster, proxy, agent or client name.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

impl SpiffeId {
    /// Builds an id, validating its parts.
    pub fn new(cluster: &str, role: Role, name: &str) -> Result<SpiffeId, IdentityError> {
        let id = SpiffeId { cluster: cluster.to_string(), role, name: name.to_string() };
        if !valid_name(cluster) || !valid_name(name) {
            return Err(IdentityError::Malformed(id.uri()));
        }
        Ok(id)
    }

    /// Parses `spiffe://cluster/role/name`.
    pub fn parse(uri: &str) -> Result<SpiffeId, IdentityError> {
        let bad = || IdentityError::Malformed(uri.to_string());
        let rest = uri.strip_prefix("spiffe://").ok_or_else(bad)?;
        let mut parts = rest.split('/');
        let (Some(cluster), Some(role), Some(name), None) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        SpiffeId::new(cluster, role.parse()?, name)
    }

    /// The URI form.
    pub fn uri(&self) -> String {
        format!("spiffe://{}/{}/{}", self.cluster, self.role, self.name)
    }

    /// Extracts the identity from a DER certificate.
    pub fn from_cert(der: &[u8]) -> Result<SpiffeId, IdentityError> {
        let (_, cert) = X509Certificate::from_der(der).map_err(|_| IdentityError::BadCert)?;
        let san = cert.subject_alternative_name().map_err(|_| IdentityError::BadCert)?.ok_or(IdentityError::Missing)?;
        let mut found = None;
        for gn in &san.value.general_names {
            if let GeneralName::URI(u) = gn {
                if u.starts_with("spiffe://") {
                    if found.is_some() {
                        return Err(IdentityError::Malformed("more than one spiffe:// URI SAN".into()));
                    }
                    found = Some(SpiffeId::parse(u)?);
                }
            }
        }
        found.ok_or(IdentityError::Missing)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}/{}/{}", self.cluster, self.role, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        let id = SpiffeId::parse("spiffe://c1/agent/agent-1").unwrap();
        assert_eq!((id.cluster.as_str(), id.role, id.name.as_str()), ("c1", Role::Agent, "agent-1"));
        assert_eq!(id.uri(), "spiffe://c1/agent/agent-1");
        for bad in [
            "spiffe://c1/agent",
            "spiffe://c1/admin/x",
            "http://c1/agent/x",
            "spiffe://c1/agent/a/b",
            "spiffe://c1/agent/",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad}");
        }
    }
}
