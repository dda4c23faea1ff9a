//! Development certificates: a cluster CA and leaf certificates carrying
//! `spiffe://<cluster>/<role>/<name>`, written as `ca.pem`, `<name>.pem`,
//! `<name>-key.pem` (rcgen).
//!
//! Invariants: the CA carries `spiffe://<cluster>` so `issue` can recover the
//! cluster name; private keys end with mode 0600, also when the file was
//! there before with a wider one; the CA's files are never overwritten
//! (init refuses a directory that has a CA, issue refuses the names whose
//! files would be `ca.pem`/`ca-key.pem`). Every certificate is valid from
//! an hour ago (clock skew between hosts) for a given number of days
//! ([`DEFAULT_CA_DAYS`], [`DEFAULT_LEAF_DAYS`]) and has a random 128-bit
//! serial, so a rotation is visible (logs, metric, the peer's view) and a
//! CRL ([`revoke`]) can name it.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use rand::RngCore;
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, CertificateRevocationListParams, DnType, ExtendedKeyUsagePurpose,
    IsCa, KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams, SanType, SerialNumber,
};
use time::OffsetDateTime;

use super::identity::{valid_name, Role, SpiffeId};
use super::tls::CertInfo;

/// Validity of a cluster CA made by `certs init`, days (ten years).
pub const DEFAULT_CA_DAYS: u32 = 3650;
/// Validity of a proxy, agent or client certificate, days (three months:
/// rotate with `certs issue`, the processes reload on their own).
pub const DEFAULT_LEAF_DAYS: u32 = 90;
/// How far back a certificate's validity starts: hosts' clocks differ.
pub const CLOCK_SKEW: Duration = Duration::from_secs(3600);

/// A validity window.
#[derive(Clone, Copy, Debug)]
pub struct Validity {
    /// Start.
    pub not_before: OffsetDateTime,
    /// End.
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// From an hour ago to `days` days from now.
    pub fn days(days: u32) -> Validity {
        let now = OffsetDateTime::now_utc();
        Validity { not_before: now - CLOCK_SKEW, not_after: now + Duration::from_secs(u64::from(days) * 86_400) }
    }
}

/// One certificate written.
#[derive(Clone, Debug)]
pub struct Issued {
    /// Certificate file.
    pub cert: PathBuf,
    /// Private key file (mode 0600).
    pub key: PathBuf,
    /// Subject, serial and expiry.
    pub info: CertInfo,
}

impl Issued {
    /// One line for a person: files, serial, expiry.
    pub fn summary(&self) -> String {
        format!(
            "{} (key {}): {} serial {} valid until {}",
            self.cert.display(),
            self.key.display(),
            self.info.subject,
            self.info.serial,
            super::verify::rfc3339(self.info.not_after)
        )
    }
}

/// A random positive 128-bit serial (first byte 0x01..=0x7f, so its DER
/// form is exactly these 16 bytes).
fn random_serial() -> SerialNumber {
    let mut b = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut b);
    b[0] = (b[0] & 0x7f).max(1);
    SerialNumber::from_slice(&b)
}

/// Names `certs init` issues by default.
pub const DEFAULT_NAMES: [(Role, &str); 6] = [
    (Role::Proxy, "proxy-a"),
    (Role::Proxy, "proxy-b"),
    (Role::Proxy, "proxy-c"),
    (Role::Agent, "agent-1"),
    (Role::Agent, "agent-2"),
    (Role::Client, "client"),
];

fn write_file(path: &Path, data: &str, private: bool) -> anyhow::Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    // `mode` only applies to a file created now: an existing key file
    // keeps its mode unless it is set explicitly (before the write, so the
    // new key is never readable by others).
    if private {
        f.set_permissions(fs::Permissions::from_mode(0o600))
            .with_context(|| format!("cannot restrict {} to mode 0600", path.display()))?;
    }
    f.write_all(data.as_bytes()).with_context(|| format!("cannot write {}", path.display()))
}

/// Creates a CA for `cluster` in `dir` and the default certificates, with
/// the default validities. Returns the files written.
pub fn init(dir: &Path, cluster: &str) -> anyhow::Result<Vec<PathBuf>> {
    let issued = init_with(dir, cluster, DEFAULT_CA_DAYS, DEFAULT_LEAF_DAYS)?;
    Ok(issued.into_iter().flat_map(|i| [i.cert, i.key]).collect())
}

/// [`init`] with the CA valid `ca_days` and the certificates `days`; the
/// CA comes first.
pub fn init_with(dir: &Path, cluster: &str, ca_days: u32, days: u32) -> anyhow::Result<Vec<Issued>> {
    if !valid_name(cluster) {
        bail!("invalid cluster name {cluster:?}: use letters, digits, '-', '_' or '.'");
    }
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let ca_path = dir.join("ca.pem");
    if ca_path.exists() {
        bail!("{} already exists; use `ringpeer certs issue` to add certificates", ca_path.display());
    }
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // Each CA has its own name (a tag of its serial): during a CA rotation
    // the bundle holds two CAs of one cluster, and chain building and CRL
    // matching go by issuer name.
    let serial = random_serial();
    let tag: String = serial.as_ref().iter().take(4).map(|b| format!("{b:02x}")).collect();
    params.distinguished_name.push(DnType::CommonName, format!("ringpeer {cluster} CA {tag}"));
    params.subject_alt_names = vec![SanType::URI(format!("spiffe://{cluster}").try_into()?)];
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.serial_number = Some(serial);
    let v = Validity::days(ca_days);
    (params.not_before, params.not_after) = (v.not_before, v.not_after);
    let key = KeyPair::generate()?;
    let ca = params.self_signed(&key)?;
    let key_path = dir.join("ca-key.pem");
    write_file(&ca_path, &ca.pem(), false)?;
    write_file(&key_path, &key.serialize_pem(), true)?;
    let info = CertInfo::of("ca", ca.der()).context("the new CA does not parse")?;
    let mut written = vec![Issued { cert: ca_path, key: key_path, info }];
    for (role, name) in DEFAULT_NAMES {
        written.push(issue_with(dir, role, name, Validity::days(days))?);
    }
    Ok(written)
}

/// Issues a certificate for `role`/`name` signed by the CA in `dir`, valid
/// [`DEFAULT_LEAF_DAYS`].
pub fn issue(dir: &Path, role: Role, name: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
    let i = issue_with(dir, role, name, Validity::days(DEFAULT_LEAF_DAYS))?;
    Ok((i.cert, i.key))
}

/// The CA of `dir`, re-created from its parameters and key (same subject
/// and key, so what it signs verifies against `ca.pem`), and its cluster.
fn load_ca(dir: &Path) -> anyhow::Result<(Certificate, KeyPair, String)> {
    let ca_pem = fs::read_to_string(dir.join("ca.pem"))
        .with_context(|| format!("cannot read {}/ca.pem (run `ringpeer certs init` first)", dir.display()))?;
    let ca_key_pem = fs::read_to_string(dir.join("ca-key.pem"))
        .with_context(|| format!("cannot read {}/ca-key.pem", dir.display()))?;
    let ca_params = CertificateParams::from_ca_cert_pem(&ca_pem).context("ca.pem is not a CA certificate")?;
    let cluster = ca_params
        .subject_alt_names
        .iter()
        .find_map(|s| match s {
            SanType::URI(u) => u.as_str().strip_prefix("spiffe://").map(str::to_string),
            _ => None,
        })
        .context("ca.pem carries no spiffe://<cluster> URI; it was not made by ringpeer")?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).context("ca-key.pem is not a private key")?;
    let ca = ca_params.self_signed(&ca_key)?;
    Ok((ca, ca_key, cluster))
}

/// [`issue`] with a given validity (tests make expired certificates so).
pub fn issue_with(dir: &Path, role: Role, name: &str, validity: Validity) -> anyhow::Result<Issued> {
    // `<name>.pem` and `<name>-key.pem` must not be the CA's files.
    if name == "ca" || name == "ca-key" {
        bail!("refusing to issue {name:?}: its files would overwrite the CA (ca.pem / ca-key.pem)");
    }
    let (ca, ca_key, cluster) = load_ca(dir)?;
    let id = SpiffeId::new(&cluster, role, name).map_err(|e| anyhow::anyhow!("invalid name {name:?}: {e}"))?;

    let mut params = CertificateParams::new(vec!["localhost".to_string()])?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.subject_alt_names.push(SanType::URI(id.uri().try_into()?));
    params.subject_alt_names.push(SanType::IpAddress([127, 0, 0, 1].into()));
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial());
    (params.not_before, params.not_after) = (validity.not_before, validity.not_after);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca, &ca_key)?;
    let cert_path = dir.join(format!("{name}.pem"));
    let key_path = dir.join(format!("{name}-key.pem"));
    // Key first: a process polling the files never pairs the new
    // certificate with the old key for longer than the two writes.
    write_file(&key_path, &key.serialize_pem(), true)?;
    write_file(&cert_path, &cert.pem(), false)?;
    let info = CertInfo::of("own", cert.der()).context("the new certificate does not parse")?;
    Ok(Issued { cert: cert_path, key: key_path, info })
}

/// Writes to `out` a CRL signed by the CA in `dir` revoking `serials`
/// (hex, as `certs issue` prints them), valid for `days`. Returns the
/// number of entries.
pub fn revoke(dir: &Path, serials: &[String], out: &Path, days: u32) -> anyhow::Result<usize> {
    let (ca, ca_key, _) = load_ca(dir)?;
    let now = OffsetDateTime::now_utc();
    let mut revoked = Vec::new();
    for s in serials {
        let b = unhex(s).with_context(|| format!("serial {s:?} is not hex"))?;
        revoked.push(RevokedCertParams {
            serial_number: SerialNumber::from_slice(&b),
            revocation_time: now,
            reason_code: None,
            invalidity_date: None,
        });
    }
    let n = revoked.len();
    let params = CertificateRevocationListParams {
        this_update: now - CLOCK_SKEW,
        next_update: now + Duration::from_secs(u64::from(days) * 86_400),
        crl_number: SerialNumber::from_slice(&OffsetDateTime::now_utc().unix_timestamp().to_be_bytes()),
        issuing_distribution_point: None,
        revoked_certs: revoked,
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let crl = params.signed_by(&ca, &ca_key)?;
    write_file(out, &crl.pem()?, false)?;
    Ok(n)
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    let s: String = s.chars().filter(|c| *c != ':').collect();
    if s.is_empty() || s.len() % 2 != 0 {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::tls::{TlsFiles, TlsMaterial};
    use rustls::pki_types::pem::PemObject;

    #[test]
    fn init_and_issue_make_loadable_identities() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), "c1").unwrap();
        assert!(init(dir.path(), "c1").is_err(), "init must not overwrite a CA");
        issue(dir.path(), Role::Agent, "agent-9").unwrap();
        let m = TlsMaterial::load(&TlsFiles::in_dir(dir.path(), "agent-9"), "c1", Role::Agent).unwrap();
        assert_eq!(m.id.uri(), "spiffe://c1/agent/agent-9");
        let err = TlsMaterial::load(&TlsFiles::in_dir(dir.path(), "agent-9"), "c1", Role::Proxy).err().unwrap();
        assert!(err.to_string().contains("needs a proxy certificate"), "{err}");
        let other = tempfile::tempdir().unwrap();
        init(other.path(), "c1").unwrap();
        let mut files = TlsFiles::in_dir(dir.path(), "proxy-a");
        files.ca = other.path().join("ca.pem");
        let err = TlsMaterial::load(&files, "c1", Role::Proxy).err().unwrap();
        assert!(err.to_string().contains("not signed by the CA"), "{err}");
    }

    #[test]
    fn days_set_the_validity_and_each_certificate_has_its_own_serial() {
        let dir = tempfile::tempdir().unwrap();
        let all = init_with(dir.path(), "c1", 400, 30).unwrap();
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let ca = &all[0].info;
        assert!((ca.not_after - now - 400 * 86_400).abs() < 60, "CA not_after {} vs now {now}", ca.not_after);
        for leaf in &all[1..] {
            assert!((leaf.info.not_after - now - 30 * 86_400).abs() < 60, "{}", leaf.summary());
        }
        let a = issue_with(dir.path(), Role::Proxy, "proxy-z", Validity::days(7)).unwrap();
        let b = issue_with(dir.path(), Role::Proxy, "proxy-z", Validity::days(7)).unwrap();
        assert_ne!(a.info.serial, b.info.serial);
        assert_eq!(a.info.serial.len(), 32, "128-bit serial: {}", a.info.serial);
        assert!((b.info.not_after - now - 7 * 86_400).abs() < 60);
        // The certificate starts an hour back (clock skew), per its DER.
        let pem = fs::read(&b.cert).unwrap();
        let der = rustls::pki_types::CertificateDer::from_pem_slice(&pem).unwrap();
        let (_, x) = x509_parser::parse_x509_certificate(&der).unwrap();
        let back = now - x.validity().not_before.timestamp();
        assert!((3540..=3660).contains(&back), "not_before {back} s ago");
        // The default for a leaf is 90 days.
        issue(dir.path(), Role::Agent, "agent-z").unwrap();
        let m = TlsMaterial::load(&TlsFiles::in_dir(dir.path(), "agent-z"), "c1", Role::Agent).unwrap();
        assert!((m.own().not_after - now - i64::from(DEFAULT_LEAF_DAYS) * 86_400).abs() < 60);
        assert_eq!(m.cas().len(), 1);
    }

    #[test]
    fn issue_refuses_the_ca_names_and_keys_end_at_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), "c1").unwrap();
        let ca_before = fs::read(dir.path().join("ca.pem")).unwrap();
        let key_before = fs::read(dir.path().join("ca-key.pem")).unwrap();
        for name in ["ca", "ca-key"] {
            let err = issue(dir.path(), Role::Proxy, name).unwrap_err().to_string();
            assert!(err.contains("would overwrite the CA"), "{err}");
        }
        assert_eq!(fs::read(dir.path().join("ca.pem")).unwrap(), ca_before);
        assert_eq!(fs::read(dir.path().join("ca-key.pem")).unwrap(), key_before);
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.path().join("ca-key.pem")), 0o600);
        assert_eq!(mode(&dir.path().join("client-key.pem")), 0o600);
        // A key file that was there with a wider mode is narrowed.
        let key = dir.path().join("agent-7-key.pem");
        fs::write(&key, "old").unwrap();
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        issue(dir.path(), Role::Agent, "agent-7").unwrap();
        assert_eq!(mode(&key), 0o600);
        assert_eq!(mode(&dir.path().join("agent-7.pem")), 0o644);
    }

    #[test]
    fn a_crl_revokes_by_serial_and_a_revoked_own_certificate_does_not_load() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), "c1").unwrap();
        let bad = issue_with(dir.path(), Role::Agent, "agent-r", Validity::days(5)).unwrap();
        let crl = dir.path().join("crl.pem");
        assert_eq!(revoke(dir.path(), std::slice::from_ref(&bad.info.serial), &crl, 7).unwrap(), 1);
        let mut files = TlsFiles::in_dir(dir.path(), "proxy-a");
        files.crl = Some(crl.clone());
        let m = TlsMaterial::load(&files, "c1", Role::Proxy).unwrap();
        assert_eq!(m.crl_entries, 1);
        let mut files = TlsFiles::in_dir(dir.path(), "agent-r");
        files.crl = Some(crl);
        let err = TlsMaterial::load(&files, "c1", Role::Agent).err().unwrap().to_string();
        assert!(err.contains("certificate revoked"), "{err}");
    }
}
