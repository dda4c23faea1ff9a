//! Mutual TLS for every link: TLS 1.3 only, ALPN `h2` required, certificates
//! from one cluster CA, and the peer's SPIFFE role (and, when known, name)
//! checked inside the handshake.
//!
//! Invariants: rustls verifies the chain; the role, cluster and name checks
//! are ours and run in the verifier, so a wrong peer fails the handshake with
//! a certificate alert instead of reaching HTTP/2. A connection that did not
//! negotiate `h2` is refused after the handshake.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use serde::Deserialize;

use super::identity::{Role, SpiffeId};

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
}

impl TlsFiles {
    /// The conventional files of `certs init` for `name` in `dir`.
    pub fn in_dir(dir: &Path, name: &str) -> TlsFiles {
        TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}-key.pem")),
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

/// Loaded certificates and key of one process, with its verified identity.
#[derive(Clone)]
pub struct TlsMaterial {
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    /// This process's identity, from its own certificate.
    pub id: SpiffeId,
}

impl TlsMaterial {
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
        for c in CertificateDer::pem_slice_iter(&ca_pem) {
            let c = c.map_err(|e| file_err("bad CA certificate", &files.ca, e))?;
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
        let id = SpiffeId::from_cert(leaf).map_err(|e| file_err("bad certificate", &files.cert, e))?;
        if id.role != role || cluster.is_some_and(|c| c != id.cluster) {
            return Err(TlsError::WrongIdentity {
                path: files.cert.display().to_string(),
                found: id.uri(),
                role,
                cluster: cluster.unwrap_or(&id.cluster).to_string(),
            });
        }
        // Our own chain must verify against the CA, or every peer will refuse us.
        let parsed = ParsedCertificate::try_from(leaf).map_err(|e| file_err("bad certificate", &files.cert, e))?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            &chain[1..],
            UnixTime::now(),
            provider().signature_verification_algorithms.all,
        )
        .map_err(|e| file_err("certificate is not signed by the CA in", &files.ca, e))?;
        Ok(TlsMaterial { roots: Arc::new(roots), chain, key: Arc::new(key), id })
    }

    /// Server config accepting peers of `roles` from our cluster.
    pub fn server_config(&self, roles: &'static [Role]) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let prov = provider();
        let inner = WebPkiClientVerifier::builder_with_provider(self.roots.clone(), prov.clone())
            .build()
            .map_err(|e| TlsError::Config(rustls::Error::General(e.to_string())))?;
        let verifier = Arc::new(SpiffeClientVerifier { inner, cluster: self.id.cluster.clone(), roles });
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
            algs: prov.signature_verification_algorithms,
            cluster: self.id.cluster.clone(),
            role,
            name: name.map(str::to_string),
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

fn check_peer(
    cluster: &str,
    roles: &[Role],
    name: Option<&str>,
    cert: &CertificateDer<'_>,
) -> Result<SpiffeId, rustls::Error> {
    let id = SpiffeId::from_cert(cert).map_err(|e| rustls::Error::General(format!("peer certificate: {e}")))?;
    if id.cluster != cluster || !roles.contains(&id.role) {
        tracing::debug!(peer = %id, "refused peer with wrong role or cluster");
        return Err(rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure));
    }
    if let Some(n) = name {
        if id.name != n {
            tracing::debug!(peer = %id, expected = n, "refused peer with wrong name");
            return Err(rustls::Error::InvalidCertificate(CertificateError::NotValidForName));
        }
    }
    Ok(id)
}

#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    algs: WebPkiSupportedAlgorithms,
    cluster: String,
    role: Role,
    name: Option<String>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algs.all,
        )?;
        check_peer(&self.cluster, &[self.role], self.name.as_deref(), end_entity)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _m: &[u8],
        _c: &CertificateDer<'_>,
        _d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered))
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

#[derive(Debug)]
struct SpiffeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    cluster: String,
    roles: &'static [Role],
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner.verify_client_cert(end_entity, intermediates, now)?;
        check_peer(&self.cluster, self.roles, None, end_entity)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(m, c, d)
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(m, c, d)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
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
