//! Reaching Redis: the URL, the credentials and the TLS material, and the
//! factory that opens timed connections with them.
//!
//! Invariants:
//! - The password is never part of a printed string. `describe()`, every
//!   error and every log line show the URL with its password as `***`
//!   ([`redact`]); [`Secret`] prints as `***` even through `Debug`.
//! - Credentials are injected into [`redis::ConnectionInfo`], never spliced
//!   into a URL string (which would end up in errors and logs).
//! - Every connection has its read and write timeouts set before its first
//!   byte: the TLS handshake, `AUTH` and `SELECT` are sent by us after the
//!   timeouts (redis-rs's own setup pipeline would run them before, with no
//!   timeout, so a server that accepts TCP and then stalls would hang the
//!   control thread — rejected; the `disable-client-setinfo` feature keeps
//!   that pipeline empty). RESP3 (`?protocol=resp3`) is the exception: its
//!   `HELLO` carries the credentials and runs in redis-rs's setup.
//! - Password sources, first wins: `password_file`, then the environment
//!   variable [`PASSWORD_ENV`], then the URL (legacy, warned about).
//! - TLS (`rediss://`) uses rustls with the ring provider, like the rest of
//!   ringpeer. redis-rs builds its config with `ClientConfig::builder()`,
//!   which takes the process-default provider, so [`RedisFactory`] installs
//!   ring as that default once (an already installed default is kept);
//!   ringpeer's own TLS names ring explicitly and never reads the default.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context};
use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo, ProtocolVersion};

use super::redis::RedisStore;
use super::redis_ha::{split_url, Topology, SENTINEL_PASSWORD_ENV};
use super::store::{RouteStore, StoreFactory};

/// Connect deadline.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Read/write deadline for non-blocking commands.
pub const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// The Redis password, when no `password_file` is configured.
pub const PASSWORD_ENV: &str = "RINGPEER_REDIS_PASSWORD";
/// The Redis ACL user name, when none is configured.
pub const USERNAME_ENV: &str = "RINGPEER_REDIS_USERNAME";

/// A password: printed as `***`, readable only through [`Secret::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: String) -> Secret {
        Secret(s)
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// `url` with the password of its user-info replaced by `***`
/// (`redis://:***@host:6379/0`). Works on strings that do not parse as URLs
/// too: everything between `://` and the last `@` is user-info.
pub fn redact(url: &str) -> String {
    let Some(start) = url.find("://").map(|i| i + 3) else { return url.to_string() };
    let Some(at) = url[start..].rfind('@').map(|i| start + i) else { return url.to_string() };
    match url[start..at].find(':') {
        Some(colon) => format!("{}:***{}", &url[..start + colon], &url[at..]),
        None => url.to_string(),
    }
}

/// Where the credentials and the TLS material come from besides the URL
/// (`[backend]` keys, or the `routes` command's flags).
#[derive(Clone, Debug, Default)]
pub struct RedisSources {
    /// ACL user name (Redis 6+).
    pub username: Option<String>,
    /// A file holding the password (trailing newline stripped).
    pub password_file: Option<PathBuf>,
    /// PEM CA the server certificate must chain to (instead of the system roots).
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate, for servers with `tls-auth-clients yes`.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// A file holding the sentinels' password (`redis+sentinel://` only).
    pub sentinel_password_file: Option<PathBuf>,
}

/// Everything needed to connect, credentials held apart from the URL.
#[derive(Clone)]
pub struct RedisOptions {
    info: ConnectionInfo,
    shown: String,
    password_from: String,
    tls: Option<redis::TlsCertificates>,
    /// One server, sentinels, or cluster seeds (`redis_ha`).
    pub(super) topology: Topology,
    /// The sentinels' own password.
    sentinel_password: Option<Secret>,
}

impl RedisOptions {
    /// Options from `url` alone (a password in it is used, and redacted).
    pub fn from_url(url: &str) -> anyhow::Result<RedisOptions> {
        Self::resolve(url, &RedisSources::default(), |_| None)
    }

    /// Options from `url`, `src` and the process environment.
    pub fn load(url: &str, src: &RedisSources) -> anyhow::Result<RedisOptions> {
        Self::resolve(url, src, |k| std::env::var(k).ok().filter(|v| !v.is_empty()))
    }

    /// [`load`](Self::load) with `env` as the environment.
    pub fn resolve(
        url: &str,
        src: &RedisSources,
        env: impl Fn(&str) -> Option<String>,
    ) -> anyhow::Result<RedisOptions> {
        let shown = redact(url);
        let (topology, one) = split_url(url, &shown)?;
        // The redis error never quotes the URL; ours quotes it redacted.
        let mut info = one.into_connection_info().map_err(|e| anyhow::anyhow!("invalid redis url {shown:?}: {e}"))?;
        let in_url = info.redis.password.take().map(Secret::new);
        let (password, password_from) = if let Some(path) = &src.password_file {
            if in_url.is_some() {
                bail!(
                    "the redis url {shown:?} carries a password and password_file is set too: keep only password_file"
                );
            }
            (Some(read_password(path)?), format!("password_file {}", path.display()))
        } else if let Some(p) = env(PASSWORD_ENV) {
            if in_url.is_some() {
                tracing::warn!(url = %shown, "{PASSWORD_ENV} is set: the password in the redis url is ignored");
            }
            (Some(Secret::new(p)), PASSWORD_ENV.to_string())
        } else if let Some(p) = in_url {
            tracing::warn!(
                url = %shown,
                "the redis url carries a password: anyone who can read the config or the command line sees it; \
                 move it to backend.password_file or {PASSWORD_ENV}"
            );
            (Some(p), "the url".to_string())
        } else {
            (None, String::new())
        };
        info.redis.password = password.map(|s| s.0);
        if let Some(u) = src.username.clone().or_else(|| env(USERNAME_ENV)) {
            info.redis.username = Some(u);
        }
        let tls = tls_material(&info, src, &shown)?;
        let sentinel_password = match (&src.sentinel_password_file, &topology) {
            (Some(path), Topology::Sentinel { .. }) => Some(read_password(path)?),
            (Some(_), _) => bail!("sentinel_password_file needs a redis+sentinel:// url, not {shown:?}"),
            (None, Topology::Sentinel { .. }) => env(SENTINEL_PASSWORD_ENV).map(Secret::new),
            (None, _) => None,
        };
        Ok(RedisOptions { info, shown, password_from, tls, topology, sentinel_password })
    }

    /// The URL as printed: password redacted.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// Whether a password is configured.
    pub fn has_password(&self) -> bool {
        self.info.redis.password.is_some()
    }
}

fn read_password(path: &Path) -> anyhow::Result<Secret> {
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot read password_file {}", path.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = f.metadata().map(|m| m.permissions().mode()).unwrap_or(0);
        if mode & 0o077 != 0 {
            tracing::warn!(
                file = %path.display(),
                mode = format!("{:o}", mode & 0o777),
                "the redis password_file is readable by group or others; chmod 600 it"
            );
        }
    }
    let mut s = String::new();
    f.read_to_string(&mut s).with_context(|| format!("cannot read password_file {}", path.display()))?;
    let p = s.trim_end_matches(['\n', '\r']);
    if p.is_empty() {
        bail!("password_file {} is empty", path.display());
    }
    Ok(Secret::new(p.to_string()))
}

/// The TLS material of `src` for a `rediss://` URL; `None` uses redis-rs's
/// defaults (the system roots).
fn tls_material(
    info: &ConnectionInfo,
    src: &RedisSources,
    shown: &str,
) -> anyhow::Result<Option<redis::TlsCertificates>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let any = src.tls_ca.is_some() || src.tls_cert.is_some() || src.tls_key.is_some();
    if !any {
        return Ok(None);
    }
    if !matches!(info.addr, ConnectionAddr::TcpTls { .. }) {
        bail!("tls_ca, tls_cert and tls_key need a rediss:// url, not {shown:?}");
    }
    let read = |key: &str, p: &Path| std::fs::read(p).with_context(|| format!("cannot read {key} {}", p.display()));
    let certs = |key: &str, p: &Path, pem: &[u8]| -> anyhow::Result<()> {
        let n = CertificateDer::pem_slice_iter(pem)
            .try_fold(0usize, |n, c| c.map(|_| n + 1))
            .map_err(|e| anyhow::anyhow!("{key} {}: bad PEM certificate: {e}", p.display()))?;
        if n == 0 {
            bail!("{key} {}: no PEM certificate in file", p.display());
        }
        Ok(())
    };
    let root_cert = match &src.tls_ca {
        Some(p) => {
            let pem = read("tls_ca", p)?;
            certs("tls_ca", p, &pem)?;
            Some(pem)
        }
        None => None,
    };
    let client_tls = match (&src.tls_cert, &src.tls_key) {
        (Some(c), Some(k)) => {
            let client_cert = read("tls_cert", c)?;
            certs("tls_cert", c, &client_cert)?;
            let client_key = read("tls_key", k)?;
            PrivateKeyDer::from_pem_slice(&client_key)
                .map_err(|e| anyhow::anyhow!("tls_key {}: bad private key: {e}", k.display()))?;
            Some(redis::ClientTlsConfig { client_cert, client_key })
        }
        (None, None) => None,
        _ => bail!("tls_cert and tls_key go together"),
    };
    Ok(Some(redis::TlsCertificates { client_tls, root_cert }))
}

/// Opens Redis connections for one cluster.
pub struct RedisFactory {
    client: redis::Client,
    pub(super) opts: RedisOptions,
    pub(super) cluster: String,
    maxlen: usize,
    /// What redis-rs connects with (no credentials under RESP2: ours).
    node_info: ConnectionInfo,
    /// The cluster seed that answered last.
    pub(super) last_good: AtomicUsize,
    /// The highest sentinel config epoch followed so far.
    pub(super) epoch: AtomicU64,
    /// The highest epoch `watch` reacted to.
    watched: AtomicU64,
    /// The master last connected to (HA topologies).
    master: Mutex<Option<String>>,
    /// Bumped each time the master found differs from the previous one.
    generation: AtomicU64,
}

impl RedisFactory {
    /// A factory for `url` (credentials from the URL only) and `cluster`;
    /// events are trimmed to about `maxlen`.
    pub fn new(url: &str, cluster: &str, maxlen: usize) -> anyhow::Result<RedisFactory> {
        Self::with_options(RedisOptions::from_url(url)?, cluster, maxlen)
    }

    /// A factory for `opts` and `cluster`.
    pub fn with_options(opts: RedisOptions, cluster: &str, maxlen: usize) -> anyhow::Result<RedisFactory> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut info = opts.info.clone();
        if info.redis.protocol == ProtocolVersion::RESP2 {
            // AUTH and SELECT are ours, after the timeouts (module header).
            info.redis.password = None;
            info.redis.username = None;
            info.redis.db = 0;
        }
        let client = Self::client_for(&opts, info.clone())?;
        Ok(RedisFactory {
            client,
            opts,
            cluster: cluster.to_string(),
            maxlen,
            node_info: info,
            last_good: AtomicUsize::new(0),
            epoch: AtomicU64::new(0),
            watched: AtomicU64::new(0),
            master: Mutex::new(None),
            generation: AtomicU64::new(0),
        })
    }

    fn client_for(opts: &RedisOptions, info: ConnectionInfo) -> anyhow::Result<redis::Client> {
        match &opts.tls {
            Some(certs) => redis::Client::build_with_tls(info, certs.clone()),
            None => redis::Client::open(info),
        }
        .map_err(|e| anyhow::anyhow!("redis {}: {e}", opts.shown))
    }

    /// One connection to the master, timed, authenticated, on its
    /// database, answering PING; for HA topologies, found and verified by
    /// `redis_ha`, and a change of master bumps the generation.
    fn open(&self) -> anyhow::Result<redis::Connection> {
        if self.opts.topology == Topology::Single {
            return self.open_with(&self.client);
        }
        let (con, at) = self.discover()?;
        let mut cur = self.master.lock().unwrap_or_else(|p| p.into_inner());
        if cur.as_deref() != Some(at.as_str()) {
            if let Some(old) = cur.as_deref() {
                self.generation.fetch_add(1, Ordering::AcqRel);
                tracing::warn!(
                    backend = self.opts.shown,
                    from = old,
                    to = at,
                    "the redis master moved; reconnecting writer and reader, full resync"
                );
            }
            *cur = Some(at);
        }
        Ok(con)
    }

    /// [`open`](Self::open) on the data node at `host:port`.
    pub(super) fn node_con(&self, host: &str, port: u16) -> anyhow::Result<redis::Connection> {
        let mut info = self.node_info.clone();
        info.addr = super::redis_ha::addr_like(&info.addr, host, port);
        self.open_with(&Self::client_for(&self.opts, info)?)
    }

    /// A timed connection to the sentinel at `host:port`, authenticated
    /// with the sentinel password.
    pub(super) fn sentinel_con(&self, host: &str, port: u16) -> anyhow::Result<redis::Connection> {
        let addr = super::redis_ha::addr_like(&self.node_info.addr, host, port);
        let info = ConnectionInfo { addr, redis: redis::RedisConnectionInfo::default() };
        let mut con = Self::client_for(&self.opts, info)?.get_connection_with_timeout(CONNECT_TIMEOUT)?;
        con.set_read_timeout(Some(IO_TIMEOUT))?;
        con.set_write_timeout(Some(IO_TIMEOUT))?;
        if let Some(p) = &self.opts.sentinel_password {
            redis::cmd("AUTH").arg(p.expose()).query::<()>(&mut con).map_err(|e| {
                anyhow::anyhow!("the sentinel refused the sentinel password (sentinel_password_file or {SENTINEL_PASSWORD_ENV}): {e}")
            })?;
        }
        Ok(con)
    }

    fn open_with(&self, client: &redis::Client) -> anyhow::Result<redis::Connection> {
        let shown = &self.opts.shown;
        let mut con = client.get_connection_with_timeout(CONNECT_TIMEOUT).map_err(|e| self.explain(e))?;
        con.set_read_timeout(Some(IO_TIMEOUT))?;
        con.set_write_timeout(Some(IO_TIMEOUT))?;
        let r = &self.opts.info.redis;
        if r.protocol == ProtocolVersion::RESP2 {
            if let Some(p) = &r.password {
                let mut auth = redis::cmd("AUTH");
                if let Some(u) = &r.username {
                    auth.arg(u);
                }
                auth.arg(p).query::<()>(&mut con).map_err(|e| self.explain(e))?;
            }
            if r.db != 0 {
                redis::cmd("SELECT")
                    .arg(r.db)
                    .query::<()>(&mut con)
                    .with_context(|| format!("redis {shown}: SELECT"))?;
            }
        }
        redis::cmd("PING").query::<()>(&mut con).map_err(|e| self.explain(e))?;
        Ok(con)
    }

    /// One line naming what went wrong, never the password.
    fn explain(&self, e: redis::RedisError) -> anyhow::Error {
        let shown = &self.opts.shown;
        let code = e.code().unwrap_or_default();
        let who = match &self.opts.info.redis.username {
            Some(u) => format!("user {u:?} with the password"),
            None => "the password".into(),
        };
        if code == "WRONGPASS" || e.kind() == redis::ErrorKind::AuthenticationFailed {
            anyhow::anyhow!(
                "redis {shown}: authentication failed: the server refused {who} from {}: {e}",
                self.opts.password_from
            )
        } else if code == "NOAUTH" {
            anyhow::anyhow!("redis {shown}: the server requires a password: give one with password_file (--redis-password-file) or {PASSWORD_ENV}: {e}")
        } else if matches!(self.opts.info.addr, ConnectionAddr::TcpTls { .. }) && e.to_string().contains("certificate")
        {
            anyhow::anyhow!("redis {shown}: TLS: {e} (the server certificate must chain to backend.tls_ca, or to the system roots without it)")
        } else {
            anyhow::anyhow!("redis {shown}: {e}")
        }
    }
}

impl StoreFactory for RedisFactory {
    fn connect(&self) -> anyhow::Result<Box<dyn RouteStore>> {
        let s = RedisStore::new(self.open()?, &self.cluster, self.maxlen);
        Ok(Box::new(if self.opts.topology == Topology::Single { s } else { s.checking_role() }))
    }

    fn describe(&self) -> String {
        match self.master.lock().unwrap_or_else(|p| p.into_inner()).as_deref() {
            Some(m) => format!("redis {} ({} master {m})", self.opts.shown, self.opts.topology.kind()),
            None => format!("redis {}", self.opts.shown),
        }
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn watch(&self) {
        let Topology::Sentinel { sentinels, master } = &self.opts.topology else { return };
        let i = self.last_good.fetch_add(1, Ordering::Relaxed) % sentinels.len();
        let (h, p) = &sentinels[i];
        let Ok((epoch, mh, mp)) = self.sentinel_master(h, *p, master) else { return };
        let current = self.master.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let moved = current.as_deref() != Some(format!("{mh}:{mp}").as_str());
        if moved
            && epoch > self.epoch.load(Ordering::Acquire)
            && self.watched.fetch_max(epoch, Ordering::AcqRel) < epoch
        {
            tracing::warn!(
                backend = self.opts.shown,
                sentinel = format!("{h}:{p}"),
                epoch,
                to = format!("{mh}:{mp}"),
                "a sentinel reports a new redis master; reconnecting"
            );
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_hides_the_password_and_keeps_the_rest() {
        assert_eq!(redact("redis://:hunter2@h:6379/0"), "redis://:***@h:6379/0");
        assert_eq!(redact("rediss://app:p@ss:w@h:1/2"), "rediss://app:***@h:1/2");
        assert_eq!(redact("redis://h:6379"), "redis://h:6379");
        assert_eq!(redact("redis://user@h:6379"), "redis://user@h:6379");
        assert_eq!(redact("not a url :x@y"), "not a url :x@y");
        assert_eq!(format!("{:?}", Secret::new("hunter2".into())), "***");
    }

    #[test]
    fn password_sources_in_order_file_env_url() {
        let dir = std::env::temp_dir().join(format!("ringpeer-pw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("pass");
        std::fs::write(&file, "from-file\r\n").unwrap();
        let env = |k: &str| (k == PASSWORD_ENV).then(|| "from-env".to_string());
        let src = RedisSources { password_file: Some(file.clone()), ..Default::default() };
        let o = RedisOptions::resolve("redis://h:1", &src, env).unwrap();
        assert_eq!(o.info.redis.password.as_deref(), Some("from-file"));
        let o = RedisOptions::resolve("redis://:from-url@h:1", &RedisSources::default(), env).unwrap();
        assert_eq!(o.info.redis.password.as_deref(), Some("from-env"));
        let o = RedisOptions::resolve("redis://:from-url@h:1/3", &RedisSources::default(), |_| None).unwrap();
        assert_eq!((o.info.redis.password.as_deref(), o.info.redis.db), (Some("from-url"), 3));
        assert_eq!(o.shown(), "redis://:***@h:1/3");
        let e = RedisOptions::resolve("redis://:from-url@h:1", &src, |_| None).err().unwrap().to_string();
        assert!(e.contains("keep only password_file") && !e.contains("from-url"), "{e}");
        std::fs::write(&file, "\n").unwrap();
        let e = RedisOptions::resolve("redis://h:1", &src, |_| None).err().unwrap().to_string();
        assert!(e.contains("is empty"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn errors_quote_the_url_redacted() {
        let e = RedisOptions::from_url("redis://:hunter2@h:notaport").err().unwrap().to_string();
        assert!(!e.contains("hunter2") && e.contains(":***@"), "{e}");
        let src = RedisSources { tls_ca: Some("/nonexistent".into()), ..Default::default() };
        let e = RedisOptions::resolve("redis://:hunter2@h:1", &src, |_| None).err().unwrap().to_string();
        assert!(e.contains("need a rediss:// url") && !e.contains("hunter2"), "{e}");
    }
}
