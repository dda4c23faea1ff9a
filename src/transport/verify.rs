//! Certificate verifiers of both handshake sides: the chain to one of the
//! CAs of the bundle, the revocation list (CRL) when one is configured, then
//! our SPIFFE role/cluster/name check. Also the words a person reads when a
//! certificate is refused, on either side.
//!
//! Invariants: a refused certificate fails the handshake with the TLS alert
//! rustls derives from the error (`certificate_revoked`,
//! `certificate_expired`, `bad_certificate` ...), so the peer learns why;
//! the accepting side logs a revoked or expired peer at info, at most ten
//! lines a second per listener, the rest at debug (a peer retrying in a loop must
//! not flood the log; the refusals are counted by the accept loops). The
//! CRL only speaks for certificates its issuer signed: a certificate of
//! another CA of the bundle (during a CA rotation) has no status and is
//! accepted on its chain.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{AlertDescription, CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore};
use rustls::{OtherError, SignatureScheme};
use webpki::{CertRevocationList, RevocationCheckDepth, RevocationOptionsBuilder, UnknownStatusPolicy};

use super::identity::{Role, SpiffeId};

/// Parsed revocation lists, shared by every verifier built from one load.
pub type Crls = Arc<Vec<CertRevocationList<'static>>>;

/// Verifies `ee`'s chain to `roots` at `now` and, with `crls`, that it is
/// not revoked. Rejected: rustls's `WebPkiServerVerifier`, which also
/// checks the DNS/IP name the dialler used: our certificates are named by
/// their SPIFFE URI and peers are dialled by any address.
pub fn verify_chain(
    roots: &RootCertStore,
    crls: &[CertRevocationList<'static>],
    algs: &WebPkiSupportedAlgorithms,
    ee: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
) -> Result<(), rustls::Error> {
    let cert = webpki::EndEntityCert::try_from(ee).map_err(pki_error)?;
    let refs: Vec<&CertRevocationList<'static>> = crls.iter().collect();
    let revocation = RevocationOptionsBuilder::new(&refs)
        .ok()
        .map(|b| b.with_depth(RevocationCheckDepth::EndEntity).with_status_policy(UnknownStatusPolicy::Allow).build());
    cert.verify_for_usage(algs.all, &roots.roots, intermediates, now, webpki::KeyUsage::server_auth(), revocation, None)
        .map(|_| ())
        .map_err(pki_error)
}

/// The rustls error (and so the alert) for a webpki verdict; the same
/// mapping rustls makes for its own verifiers.
fn pki_error(e: webpki::Error) -> rustls::Error {
    use webpki::Error as E;
    let ce = match e {
        E::BadDer | E::BadDerTime | E::TrailingData(_) => CertificateError::BadEncoding,
        E::CertExpired { time, not_after } => CertificateError::ExpiredContext { time, not_after },
        E::CertNotValidYet { time, not_before } => CertificateError::NotValidYetContext { time, not_before },
        E::CertRevoked => CertificateError::Revoked,
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::InvalidSignatureForPublicKey | E::UnsupportedSignatureAlgorithmForPublicKeyContext(_) => {
            CertificateError::BadSignature
        }
        E::UnknownRevocationStatus => CertificateError::UnknownRevocationStatus,
        e => CertificateError::Other(OtherError(Arc::new(e))),
    };
    rustls::Error::InvalidCertificate(ce)
}

/// A refused certificate in a person's words: `certificate revoked`,
/// `certificate expired at 2026-11-26T06:53:05Z` ...
pub fn reason(e: &rustls::Error) -> String {
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::Revoked => "certificate revoked".into(),
            CertificateError::ExpiredContext { not_after, .. } => {
                format!("certificate expired at {}", rfc3339(not_after.as_secs() as i64))
            }
            CertificateError::Expired => "certificate expired".into(),
            CertificateError::NotValidYetContext { not_before, .. } => {
                format!("certificate not valid before {}", rfc3339(not_before.as_secs() as i64))
            }
            CertificateError::UnknownIssuer => "certificate not signed by a CA of the bundle".into(),
            CertificateError::BadSignature => "bad signature (not signed by a CA of the bundle)".into(),
            other => format!("certificate refused ({other:?})"),
        },
        other => other.to_string(),
    }
}

/// `secs` since the epoch as an RFC 3339 UTC time.
pub fn rfc3339(secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| format!("@{secs}"))
}

/// The alerts a verifier sends for a refused certificate, in words.
const REFUSALS: [(AlertDescription, &str); 5] = [
    (AlertDescription::CertificateRevoked, "certificate revoked"),
    (AlertDescription::CertificateExpired, "certificate expired or not yet valid"),
    (AlertDescription::UnknownCA, "certificate not signed by a CA it trusts"),
    (AlertDescription::BadCertificate, "certificate refused (bad certificate)"),
    (AlertDescription::AccessDenied, "certificate refused (access denied)"),
];

/// How the far side's refusal of our own certificate reads, when `e` (a
/// handshake or first-read error: io, h2 or rustls, any nesting) carries
/// the alert it sent. In TLS 1.3 the client's handshake completes before
/// the server has judged the client's certificate, so the alert shows up
/// at the first read (usually the HTTP/2 handshake), not at connect. h2
/// keeps only the text of an io error (it clones errors to every stream),
/// so the alert is recognised by rustls's own wording of it. Rejected:
/// waiting after the handshake for the server's first bytes (a second
/// round trip on every connect, and the bytes then belong to HTTP/2).
pub fn explain_refusal(e: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(rustls::Error::AlertReceived(a)) = err.downcast_ref::<rustls::Error>() {
            return REFUSALS.iter().find(|(x, _)| x == a).map(|(_, w)| *w);
        }
        let text = err.to_string();
        if let Some((_, w)) =
            REFUSALS.iter().find(|(a, _)| text.contains(&rustls::Error::AlertReceived(*a).to_string()))
        {
            return Some(w);
        }
        cur = if let Some(h) = err.downcast_ref::<h2::Error>() {
            h.get_io().map(|e| e as &(dyn std::error::Error + 'static))
        } else if let Some(io) = err.downcast_ref::<std::io::Error>() {
            io.get_ref().map(|e| e as &(dyn std::error::Error + 'static))
        } else {
            err.source()
        };
    }
    None
}

pub(crate) fn check_peer(
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

/// Info lines about refused certificates per second and verifier; the
/// rest go to debug.
const LOG_PER_SECOND: u64 = 10;

/// Logs a refused peer certificate: revoked and expired ones at info, at
/// most [`LOG_PER_SECOND`] a second per verifier, everything else at debug.
fn log_refusal(last: &AtomicU64, side: &str, ee: &CertificateDer<'_>, e: &rustls::Error) {
    let who = SpiffeId::from_cert(ee).map(|id| id.uri()).unwrap_or_else(|_| "<no spiffe id>".into());
    let notable = matches!(
        e,
        rustls::Error::InvalidCertificate(
            CertificateError::Revoked | CertificateError::Expired | CertificateError::ExpiredContext { .. }
        )
    );
    // `last` holds the second of the latest info line (high bits) and
    // how many were logged in it (low 8 bits).
    let now = UnixTime::now().as_secs();
    let admitted = notable
        && last
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| match (v >> 8 == now, v & 0xff) {
                (false, _) => Some(now << 8 | 1),
                (true, n) if n < LOG_PER_SECOND => Some(v + 1),
                _ => None,
            })
            .is_ok();
    if admitted {
        tracing::info!("refused {side} {who}: {}", reason(e));
    } else {
        tracing::debug!("refused {side} {who}: {}", reason(e));
    }
}

/// Checks a server's certificate: chain (+ CRL), then role and name.
#[derive(Debug)]
pub(crate) struct SpiffeServerVerifier {
    pub roots: Arc<RootCertStore>,
    pub crls: Crls,
    pub algs: WebPkiSupportedAlgorithms,
    pub cluster: String,
    pub role: Role,
    pub name: Option<String>,
    pub last_log: AtomicU64,
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
        verify_chain(&self.roots, &self.crls, &self.algs, end_entity, intermediates, now)
            .inspect_err(|e| log_refusal(&self.last_log, self.role.as_str(), end_entity, e))?;
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

/// Checks a client's certificate: rustls's verifier (chain + CRL), then
/// role and cluster.
#[derive(Debug)]
pub(crate) struct SpiffeClientVerifier {
    pub inner: Arc<dyn ClientCertVerifier>,
    pub cluster: String,
    pub roles: &'static [Role],
    pub last_log: AtomicU64,
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
        let side = self.roles.first().map_or("peer", |r| r.as_str());
        self.inner
            .verify_client_cert(end_entity, intermediates, now)
            .inspect_err(|e| log_refusal(&self.last_log, side, end_entity, e))?;
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
