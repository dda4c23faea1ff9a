//! Mutual TLS for every link: TLS 1.3 only, ALPN `h2` required, certificates
//! from one cluster CA, and the peer's SPIFFE role (and, when known, name)
//! checked inside the handshake.
//!
//! Invariants: rustls verifies the chain; the role, cluster and name checks
//! are ours and run in the verifier, so a wrong peer fails the handshake with
//! a certificate alert instead of reaching HTTP/2. A connection that did not
//! negotiate `h2` is refused after the handshake. The CA file may hold
//! several CAs (a CA rotation); an optional CRL revokes certificates of
//! the CA that signed it ([`super::verify`]). Material is immutable once
//! loaded: a reload builds a new one ([`super::reload`]).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use std::sync::atomic::AtomicU64;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use serde::Deserialize;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::identity::{Role, SpiffeId};
use super::verify::{verify_chain, Crls, SpiffeClientVerifier, SpiffeServerVerifier};
use crate::runtime::admin_http::Labels;

/// The `[tls]` section of a config file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// Cluster CA certificate (PEM).
    pub ca: PathBuf,
    /// This process's certificate chain (PEM).
    pub cert: PathBuf,
    /// This process's private key (PEM).
    pub key: PathBuf,
    /// Certificate revocation list (PEM or DER X.509 CRL), optional.
    #[serde(default)]
    pub crl: Option<PathBuf>,
}

impl TlsFiles {
    /// The conventional files of `certs init` for `name` in `dir`.
    pub fn in_dir(dir: &Path, name: &str) -> TlsFiles {
        TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}-key.pem")),
            crl: None,
        }
    }
}

/// A TLS setup error: one clear line for a person.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or parsed.
    #[error("{what} {path}: {reason}")]
    File {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// Our own certificate is for another cluster or role.
    #[error("certificate {path} is {found}, but this process needs a {role} certificate of cluster {cluster:?}")]
    WrongIdentity {
        /// Certificate path.
        path: String,
        /// Identity found.
        found: String,
        /// Role needed.
        role: Role,
        /// Cluster configured.
        cluster: String,
    },
    /// Our certificate names another process than the config's id.
    #[error("certificate {path} is for {role} {found:?}, but the config's id is {id:?}")]
    WrongName {
        /// Certificate path.
        path: String,
        /// Role.
        role: Role,
        /// Name in the certificate.
        found: String,
        /// Configured id.
        id: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

fn file_err(what: &'static str, path: &Path, reason: impl fmt::Display) -> TlsError {
    TlsError::File { what, path: path.display().to_string(), reason: reason.to_string() }
}

/// One loaded certificate, for logs and the expiry metric.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    /// `own` (this process's) or `ca` (one of the bundle).
    pub kind: &'static str,
    /// The SPIFFE URI (own; CAs made by `certs init` carry
    /// `spiffe://<cluster>`), else the subject DN.
    pub subject: String,
    /// Serial number, lowercase hex.
    pub serial: String,
    /// End of validity, seconds since the epoch.
    pub not_after: i64,
}

impl CertInfo {
    /// Reads `der`'s subject, serial and validity.
    pub fn of(kind: &'static str, der: &[u8]) -> Option<CertInfo> {
        let (_, c) = X509Certificate::from_der(der).ok()?;
        let spiffe = c.subject_alternative_name().ok().flatten().and_then(|san| {
            san.value.general_names.iter().find_map(|g| match g {
                x509_parser::extensions::GeneralName::URI(u) if u.starts_with("spiffe://") => Some(u.to_string()),
                _ => None,
            })
        });
        Some(CertInfo {
            kind,
            subject: spiffe.unwrap_or_else(|| c.subject().to_string()),
            serial: hex(c.raw_serial()),
            not_after: c.validity().not_after.timestamp(),
        })
    }

    /// Seconds of validity left at `now` (negative once expired).
    pub fn remaining(&self, now: i64) -> i64 {
        self.not_after - now
    }
}

/// Lowercase hex of `b`.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Loaded certificates and key of one process, with its verified identity.
#[derive(Clone)]
pub struct TlsMaterial {
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    crl_ders: Vec<CertificateRevocationListDer<'static>>,
    crls: Crls,
    /// This process's identity, from its own certificate.
    pub id: SpiffeId,
    /// Our certificate first, then each CA of the bundle.
    pub certs: Vec<CertInfo>,
    /// Certificates the CRL revokes (0 without a CRL).
    pub crl_entries: usize,
}

impl TlsMaterial {
    /// One `*_cert_expiry_seconds` sample per loaded certificate (own, and
    /// each CA): `base` plus `cert`, `subject` and `serial`, and the seconds
    /// it has left (negative once expired).
    pub fn expiry_samples(&self, base: &Labels) -> Vec<(Labels, i64)> {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let labels = |c: &CertInfo| {
            let mut l = base.clone();
            l.extend([("cert", c.kind.to_string()), ("subject", c.subject.clone()), ("serial", c.serial.clone())]);
            l
        };
        self.certs.iter().map(|c| (labels(c), c.remaining(now))).collect()
    }

    /// Loads and checks the files: the CA parses, the certificate's SPIFFE id
    /// names `cluster` and `role`.
    pub fn load(files: &TlsFiles, cluster: &str, role: Role) -> Result<TlsMaterial, TlsError> {
        Self::load_checked(files, Some(cluster), role)
    }

    /// [`load`](Self::load), also checking that the certificate names `id`.
    pub fn load_as(files: &TlsFiles, cluster: &str, role: Role, id: &str) -> Result<TlsMaterial, TlsError> {
        let m = Self::load(files, cluster, role)?;
        if m.id.name != id {
            return Err(TlsError::WrongName {
                path: files.cert.display().to_string(),
                role,
                found: m.id.name.clone(),
                id: id.to_string(),
            });
        }
        Ok(m)
    }

    /// Like [`load`](Self::load), taking the cluster from the certificate.
    pub fn load_any_cluster(files: &TlsFiles, role: Role) -> Result<TlsMaterial, TlsError> {
        Self::load_checked(files, None, role)
    }

    fn load_checked(files: &TlsFiles, cluster: Option<&str>, role: Role) -> Result<TlsMaterial, TlsError> {
        let read = |what, p: &Path| std::fs::read(p).map_err(|e| file_err(what, p, e));
        let ca_pem = read("cannot read CA certificate", &files.ca)?;
        let mut roots = RootCertStore::empty();
        let mut cas = Vec::new();
        for c in CertificateDer::pem_slice_iter(&ca_pem) {
            let c = c.map_err(|e| file_err("bad CA certificate", &files.ca, e))?;
            cas.extend(CertInfo::of("ca", &c));
            roots.add(c).map_err(|e| file_err("bad CA certificate", &files.ca, e))?;
        }
        if roots.is_empty() {
            return Err(file_err("bad CA certificate", &files.ca, "no PEM certificate in file"));
        }
        let cert_pem = read("cannot read certificate", &files.cert)?;
        let chain: Vec<_> = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| file_err("bad certificate", &files.cert, e))?;
        let Some(leaf) = chain.first() else {
            return Err(file_err("bad certificate", &files.cert, "no PEM certificate in file"));
        };
        let key_pem = read("cannot read private key", &files.key)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| file_err("bad private key", &files.key, e))?;
        // rustls cannot tell for every key type whether a key belongs to a
        // certificate (ECDSA keys under ring), so we compare the public keys.
        if let Ok(kp) = rcgen::KeyPair::from_pem(&String::from_utf8_lossy(&key_pem)) {
            let spki = X509Certificate::from_der(leaf).map(|(_, c)| c.public_key().raw.to_vec()).unwrap_or_default();
            if kp.public_key_der() != spki {
                return Err(file_err("private key does not match the certificate", &files.key, files.cert.display()));
            }
        }
        let id = SpiffeId::from_cert(leaf).map_err(|e| file_err("bad certificate", &files.cert, e))?;
        if id.role != role || cluster.is_some_and(|c| c != id.cluster) {
            return Err(TlsError::WrongIdentity {
                path: files.cert.display().to_string(),
                found: id.uri(),
                role,
                cluster: cluster.unwrap_or(&id.cluster).to_string(),
            });
        }
        let (crl_ders, crls, crl_entries) = match &files.crl {
            Some(p) => load_crl(p)?,
            None => (Vec::new(), Vec::new(), 0),
        };
        // Our own chain must verify against a CA of the bundle (any of
        // them), and not be revoked, or every peer will refuse us. This
        // also proves the CRL's signature when its CA signed us.
        let algs = provider().signature_verification_algorithms;
        verify_chain(&roots, &crls, &algs, leaf, &chain[1..], UnixTime::now()).map_err(|e| match e {
            rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer | rustls::CertificateError::BadSignature,
            ) => file_err("certificate is not signed by the CA in", &files.ca, super::verify::reason(&e)),
            e => file_err("certificate refused by the CA bundle and CRL", &files.cert, super::verify::reason(&e)),
        })?;
        let mut certs: Vec<CertInfo> = CertInfo::of("own", leaf).into_iter().collect();
        certs.extend(cas);
        Ok(TlsMaterial {
            roots: Arc::new(roots),
            chain,
            key: Arc::new(key),
            crl_ders,
            crls: Arc::new(crls),
            id,
            certs,
            crl_entries,
        })
    }

    /// This process's certificate.
    pub fn own(&self) -> &CertInfo {
        &self.certs[0]
    }

    /// The CAs of the bundle.
    pub fn cas(&self) -> &[CertInfo] {
        &self.certs[1..]
    }

    /// Server config accepting peers of `roles` from our cluster.
    pub fn server_config(&self, roles: &'static [Role]) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let prov = provider();
        let inner = WebPkiClientVerifier::builder_with_provider(self.roots.clone(), prov.clone())
            .with_crls(self.crl_ders.iter().cloned())
            .only_check_end_entity_revocation()
            .allow_unknown_revocation_status()
            .build()
            .map_err(|e| TlsError::Config(rustls::Error::General(e.to_string())))?;
        let verifier = Arc::new(SpiffeClientVerifier {
            inner,
            cluster: self.id.cluster.clone(),
            roles,
            last_log: AtomicU64::new(0),
        });
        let mut cfg = rustls::ServerConfig::builder_with_provider(prov)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        // Stateless session tickets, so reconnects resume whatever their
        // number. Rejected: rustls's default stateful cache (256 sessions per
        // config, shared by every shard), which a fleet of 100 proxies of 64
        // shards dialling one peer port would evict long before reuse.
        cfg.ticketer = rustls::crypto::ring::Ticketer::new()?;
        Ok(Arc::new(cfg))
    }

    /// Client config that expects a server of `role` (and `name`, if given).
    pub fn client_config(&self, role: Role, name: Option<&str>) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        let prov = provider();
        let verifier = Arc::new(SpiffeServerVerifier {
            roots: self.roots.clone(),
            crls: self.crls.clone(),
            algs: prov.signature_verification_algorithms,
            cluster: self.id.cluster.clone(),
            role,
            name: name.map(str::to_string),
            last_log: AtomicU64::new(0),
        });
        let mut cfg = rustls::ClientConfig::builder_with_provider(prov)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(cfg))
    }
}

type LoadedCrls = (Vec<CertificateRevocationListDer<'static>>, Vec<webpki::CertRevocationList<'static>>, usize);

/// Reads a CRL file, PEM (one or more `X509 CRL` blocks) or DER.
fn load_crl(path: &Path) -> Result<LoadedCrls, TlsError> {
    let bad = |e: &dyn fmt::Display| file_err("bad CRL", path, e);
    let data = std::fs::read(path).map_err(|e| file_err("cannot read CRL", path, e))?;
    let ders: Vec<CertificateRevocationListDer<'static>> = if data.starts_with(b"-----BEGIN") {
        CertificateRevocationListDer::pem_slice_iter(&data).collect::<Result<_, _>>().map_err(|e| bad(&e))?
    } else {
        vec![CertificateRevocationListDer::from(data)]
    };
    if ders.is_empty() {
        return Err(bad(&"no PEM X509 CRL in file"));
    }
    let mut parsed = Vec::new();
    let mut entries = 0;
    for d in &ders {
        let crl = webpki::OwnedCertRevocationList::from_der(d).map_err(|e| bad(&format!("{e:?}")))?;
        let (_, x) = x509_parser::revocation_list::CertificateRevocationList::from_der(d).map_err(|e| bad(&e))?;
        entries += x.iter_revoked_certificates().count();
        parsed.push(crl.into());
    }
    Ok((ders, parsed, entries))
}

/// The crypto provider (ring).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server name to present when dialling `host` (no SNI for addresses).
pub fn server_name(host: &str) -> ServerName<'static> {
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => ServerName::IpAddress(ip.into()),
        Err(_) => ServerName::try_from(host.to_string())
            .unwrap_or(ServerName::IpAddress(std::net::IpAddr::from([127, 0, 0, 1]).into())),
    }
}

/// The verified identity of the peer of an established connection.
pub fn peer_identity(conn: &rustls::CommonState) -> Option<SpiffeId> {
    conn.peer_certificates().and_then(|c| c.first()).and_then(|c| SpiffeId::from_cert(c).ok())
}

/// Whether the connection negotiated ALPN `h2`.
pub fn negotiated_h2(conn: &rustls::CommonState) -> bool {
    conn.alpn_protocol() == Some(b"h2")
}
