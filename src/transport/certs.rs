//! Development certificates: a cluster CA and leaf certificates carrying
//! `spiffe://<cluster>/<role>/<name>`, written as `ca.pem`, `<name>.pem`,
//! `<name>-key.pem` (rcgen).
//!
//! Invariants: the CA carries `spiffe://<cluster>` so `issue` can recover the
//! cluster name; private keys are written with mode 0600; existing files are
//! never overwritten silently (init refuses a directory that has a CA).

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};

use super::identity::{valid_name, Role, SpiffeId};

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
    f.write_all(data.as_bytes()).with_context(|| format!("cannot write {}", path.display()))
}

/// Creates a CA for `cluster` in `dir` and the default certificates.
/// Returns the files written.
pub fn init(dir: &Path, cluster: &str) -> anyhow::Result<Vec<PathBuf>> {
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
    params.distinguished_name.push(DnType::CommonName, format!("ringpeer {cluster} CA"));
    params.subject_alt_names = vec![SanType::URI(format!("spiffe://{cluster}").try_into()?)];
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let key = KeyPair::generate()?;
    let ca = params.self_signed(&key)?;
    write_file(&ca_path, &ca.pem(), false)?;
    write_file(&dir.join("ca-key.pem"), &key.serialize_pem(), true)?;
    let mut written = vec![ca_path];
    for (role, name) in DEFAULT_NAMES {
        let (c, k) = issue(dir, role, name)?;
        written.push(c);
        written.push(k);
    }
    Ok(written)
}

/// Issues a certificate for `role`/`name` signed by the CA in `dir`.
pub fn issue(dir: &Path, role: Role, name: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
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
    let id = SpiffeId::new(&cluster, role, name).map_err(|e| anyhow::anyhow!("invalid name {name:?}: {e}"))?;

    let mut params = CertificateParams::new(vec!["localhost".to_string()])?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.subject_alt_names.push(SanType::URI(id.uri().try_into()?));
    params.subject_alt_names.push(SanType::IpAddress([127, 0, 0, 1].into()));
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca, &ca_key)?;
    let cert_path = dir.join(format!("{name}.pem"));
    let key_path = dir.join(format!("{name}-key.pem"));
    write_file(&cert_path, &cert.pem(), false)?;
    write_file(&key_path, &key.serialize_pem(), true)?;
    Ok((cert_path, key_path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::tls::{TlsFiles, TlsMaterial};

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
}
