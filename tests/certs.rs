//! Certificate lifecycle with the real binary: proxies and agents reload
//! their certificates, CA bundle and CRL on SIGHUP or when the files
//! change, while streams keep running; revoked and expired certificates
//! are refused with the reason on the refused side's screen.
//!
//! Every process logs at info into a shared buffer, so a story waits for
//! the reload line it caused instead of sleeping.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::procs::{free_addr, Proc};
use ringpeer::transport::certs::{self, Validity};
use ringpeer::transport::identity::Role;
use ringpeer::transport::tls::CertInfo;

const BIN: &str = env!("CARGO_BIN_EXE_ringpeer");

/// The stories load the machine: one at a time.
static TURN: Mutex<()> = Mutex::new(());

/// A process whose stderr lines are kept.
struct Logged {
    proc: Proc,
    log: Arc<Mutex<Vec<String>>>,
}

impl Logged {
    fn spawn(args: &[&str], echo: &'static str) -> (Logged, std::io::Lines<BufReader<std::process::ChildStderr>>) {
        let mut child = Command::new(BIN)
            .args(args)
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let _ = echo;
        (Logged { proc: Proc(child), log: Arc::default() }, lines)
    }

    fn keep(&self, lines: impl Iterator<Item = std::io::Result<String>> + Send + 'static, echo: &'static str) {
        let log = self.log.clone();
        std::thread::spawn(move || {
            for l in lines.map_while(Result::ok) {
                if std::env::var_os("CERTS_ECHO").is_some() {
                    eprintln!("{echo}: {l}");
                }
                log.lock().unwrap().push(l);
            }
        });
    }

    /// Lines logged so far that contain `what`.
    fn count(&self, what: &str) -> usize {
        self.log.lock().unwrap().iter().filter(|l| l.contains(what)).count()
    }

    /// Waits up to `bound` until `n` lines contain `what`.
    fn wait_for(&self, what: &str, n: usize, bound: Duration) {
        let t0 = Instant::now();
        while self.count(what) < n {
            assert!(t0.elapsed() < bound, "no {n} line(s) with {what:?} within {bound:?}: {:#?}", self.log.lock().unwrap());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn sighup(&self) {
        // SAFETY: a plain signal to our own child process.
        assert_eq!(unsafe { libc::kill(self.proc.0.id() as i32, libc::SIGHUP) }, 0);
    }
}

/// A proxy process: its client and tunnel addresses, admin address.
struct ProxyProc {
    p: Logged,
    client: SocketAddr,
    tunnel: SocketAddr,
    admin: SocketAddr,
}

/// Starts proxy `id` with its certificate files in `dir` (and `dir/crl.pem`
/// when `crl`), on Redis `redis` when given (else the memory backend).
fn start_proxy(dir: &Path, id: &str, redis: Option<&str>, crl: bool) -> ProxyProc {
    let admin = free_addr();
    let d = dir.display();
    let backend = match redis {
        Some(url) => format!(
            "[backend]\nkind = \"redis\"\nurl = \"{url}\"\nproxy_ttl_ms = 3000\n\
             [strategy]\ntype = \"proxy_peering\"\nagent_connection_count = 1\n"
        ),
        None => String::new(),
    };
    let crl = if crl { format!("crl = \"{d}/crl.pem\"\n") } else { String::new() };
    let cfg = format!(
        "cluster = \"demo\"\nid = \"{id}\"\nshards = 2\nclient_addr = \"127.0.0.1:0\"\ntunnel_addr = \"127.0.0.1:0\"\n\
         admin_addr = \"{admin}\"\npeer_addr = \"127.0.0.1:0\"\npin_cpus = false\n\
         [tls]\nca = \"{d}/ca.pem\"\ncert = \"{d}/{id}.pem\"\nkey = \"{d}/{id}-key.pem\"\n{crl}{backend}"
    );
    let path = dir.join(format!("{id}.toml"));
    std::fs::write(&path, cfg).unwrap();
    let (p, mut lines) = Logged::spawn(&["proxy", "--config", path.to_str().unwrap()], "proxy");
    let line = lines.next().expect("the proxy prints its addresses").unwrap();
    assert!(line.contains(" listening: "), "the proxy did not start: {line}");
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = |k: &str| words[words.iter().position(|w| *w == k).unwrap() + 1].parse().unwrap();
    let (client, tunnel) = (at("client"), at("tunnel"));
    p.keep(lines, if id == "proxy-a" { "A" } else { "B" });
    ProxyProc { p, client, tunnel, admin }
}

/// Starts agent-1 (service `echo`) dialling `proxies`.
fn start_agent(dir: &Path, proxies: &[SocketAddr], echo: SocketAddr) -> Logged {
    let d = dir.display();
    let list: Vec<String> = proxies.iter().map(|p| format!("\"{p}\"")).collect();
    let cfg = format!(
        "cluster = \"demo\"\nid = \"agent-1\"\nproxies = [{}]\n[tls]\nca = \"{d}/ca.pem\"\ncert = \"{d}/agent-1.pem\"\n\
         key = \"{d}/agent-1-key.pem\"\n[services]\necho = \"{echo}\"\n",
        list.join(", ")
    );
    let path = dir.join("agent-1.toml");
    std::fs::write(&path, cfg).unwrap();
    let (p, lines) = Logged::spawn(&["agent", "--config", path.to_str().unwrap()], "agent");
    p.keep(lines, "agent");
    p
}

/// `ringpeer dial agent-1/echo` with certificate `name` from `dir`, sending
/// `input`: (success, stdout, stderr).
fn dial(dir: &Path, proxy: SocketAddr, name: &str, input: &[u8]) -> (bool, Vec<u8>, String) {
    let mut child = Command::new(BIN)
        .args(["dial", "agent-1/echo", "--proxy", &proxy.to_string(), "--certs", dir.to_str().unwrap()])
        .args(["--name", name, "--timeout-ms", "5000"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    (out.status.success(), out.stdout, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Waits until the proxy at `proxy` accepts dials of agent-1 (routes and
/// tunnels settle after a start).
fn wait_dialable(dir: &Path, proxy: SocketAddr, name: &str) {
    let t0 = Instant::now();
    loop {
        let (ok, out, err) = dial(dir, proxy, name, b"ping");
        if ok && out == b"ping" {
            return;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "agent-1 not dialable through {proxy}: {err}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The certificate of the PEM file at `path`.
fn info(path: &Path) -> CertInfo {
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::CertificateDer::from_pem_file(path).unwrap();
    CertInfo::of("own", &der).unwrap()
}

/// Writes a CRL of the CA in `dir` revoking `serials` to `dir/crl.pem`.
fn write_crl(dir: &Path, serials: &[String]) {
    certs::revoke(dir, serials, &dir.join("crl.pem"), 7).unwrap();
}

/// A client config presenting `cert`/`key` whatever their validity, and
/// accepting any server: a test of the server's verdict alone.
fn presenting(cert: &Path, key: &Path) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let chain: Vec<_> = rustls::pki_types::CertificateDer::pem_file_iter(cert).unwrap().map(Result::unwrap).collect();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(key).unwrap();
    let base = common::client_config_as(cert.parent().unwrap(), "client", Role::Client, None);
    let own = rustls::ClientConfig::builder_with_provider(ringpeer::transport::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_client_auth_cert(chain, key)
        .unwrap();
    let mut cfg = (*base).clone();
    cfg.client_auth_cert_resolver = own.client_auth_cert_resolver.clone();
    Arc::new(cfg)
}

#[test]
fn a_revoked_client_is_refused_after_sighup_and_an_expired_one_with_its_expiry() {
    let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
    ringpeer::runtime::raise_memlock();
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    certs::init(dir, "demo").unwrap();
    write_crl(dir, &[]);
    let echo = ringpeer::tools::target::spawn(ringpeer::tools::target::Kind::Echo).unwrap();
    let a = start_proxy(dir, "proxy-a", None, true);
    let _agent = start_agent(dir, &[a.tunnel], echo.addr);
    // Two clients: one will be revoked, the other goes on.
    let doomed = certs::issue_with(dir, Role::Client, "client-r", Validity::days(30)).unwrap();
    wait_dialable(dir, a.client, "client-r");
    wait_dialable(dir, a.client, "client");

    // The CRL names client-r; SIGHUP; the proxy reloads (one line says so).
    write_crl(dir, std::slice::from_ref(&doomed.info.serial));
    a.p.sighup();
    a.p.wait_for("CRL (0 -> 1 entries)", 1, Duration::from_secs(10));
    let (ok, out, err) = dial(dir, a.client, "client-r", b"hello");
    assert!(!ok && out.is_empty(), "a revoked client got through: {err}");
    assert!(err.contains("the proxy refused our certificate: certificate revoked"), "client's error: {err}");
    a.p.wait_for(&format!("refused client spiffe://demo/client/client-r: certificate revoked"), 1, Duration::from_secs(5));
    let (ok, out, err) = dial(dir, a.client, "client", b"still here");
    assert!(ok && out == b"still here", "a client not on the CRL was refused: {err}");

    // An expired client certificate: `ringpeer dial` refuses to use it
    // (naming its expiry), and a client that presents it anyway gets the
    // proxy's certificate_expired alert; the proxy logs the expiry.
    let now = time::OffsetDateTime::now_utc();
    let past = Validity { not_before: now - Duration::from_secs(10 * 86_400), not_after: now - Duration::from_secs(86_400) };
    let old = certs::issue_with(dir, Role::Client, "client-old", past).unwrap();
    let (ok, _, err) = dial(dir, a.client, "client-old", b"x");
    assert!(!ok && err.contains("certificate expired at"), "client's error: {err}");
    let verdict = common::tls_verdict(a.client, presenting(&old.cert, &old.key));
    assert!(
        matches!(verdict, common::TlsVerdict::Refused(rustls::AlertDescription::CertificateExpired)),
        "{verdict:?}"
    );
    let at = ringpeer::transport::verify::rfc3339(old.info.not_after);
    a.p.wait_for(&format!("refused client spiffe://demo/client/client-old: certificate expired at {at}"), 1, Duration::from_secs(5));
}
