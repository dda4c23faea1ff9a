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
            assert!(
                t0.elapsed() < bound,
                "no {n} line(s) with {what:?} within {bound:?}: {:#?}",
                self.log.lock().unwrap()
            );
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
        // The embedded store: the grant is in the config (with Redis, the
        // test server holds it).
        None => "[[grants]]\nname = \"all\"\nclients = [\"*\"]\nagents = [\"*\"]\nservices = [\"*\"]\n".to_string(),
    };
    let crl = if crl { format!("crl = \"{d}/crl.pem\"\n") } else { String::new() };
    let cfg = format!(
        "cluster = \"demo\"\nid = \"{id}\"\nshards = 2\nclient_addr = \"127.0.0.1:0\"\ntunnel_addr = \"127.0.0.1:0\"\n\
         admin_addr = \"{admin}\"\npeer_addr = \"127.0.0.1:0\"\npin_cpus = false\n\
         [tls]\nca = \"{d}/ca.pem\"\ncert = \"{d}/{id}.pem\"\nkey = \"{d}/{id}-key.pem\"\n{crl}\
         [audit]\npath = \"{d}/{id}-audit.log\"\n{backend}"
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
    start_agent_as(dir, "agent-1", proxies, echo)
}

/// Starts agent `id` (service `echo`) dialling `proxies`.
fn start_agent_as(dir: &Path, id: &str, proxies: &[SocketAddr], echo: SocketAddr) -> Logged {
    let d = dir.display();
    let list: Vec<String> = proxies.iter().map(|p| format!("\"{p}\"")).collect();
    let cfg = format!(
        "cluster = \"demo\"\nid = \"{id}\"\nproxies = [{}]\n[tls]\nca = \"{d}/ca.pem\"\ncert = \"{d}/{id}.pem\"\n\
         key = \"{d}/{id}-key.pem\"\n[services]\necho = \"{echo}\"\n",
        list.join(", ")
    );
    let path = dir.join(format!("{id}.toml"));
    std::fs::write(&path, cfg).unwrap();
    let (p, lines) = Logged::spawn(&["agent", "--config", path.to_str().unwrap()], "agent");
    p.keep(lines, "agent");
    p
}

/// `ringpeer dial agent-1/echo` with certificate `name` from `dir`, sending
/// `input`: (success, stdout, stderr).
fn dial(dir: &Path, proxy: SocketAddr, name: &str, input: &[u8]) -> (bool, Vec<u8>, String) {
    dial_to("agent-1/echo", dir, proxy, name, input)
}

/// [`dial`] to `target`.
fn dial_to(target: &str, dir: &Path, proxy: SocketAddr, name: &str, input: &[u8]) -> (bool, Vec<u8>, String) {
    let mut child = Command::new(BIN)
        .args(["dial", target, "--proxy", &proxy.to_string(), "--certs", dir.to_str().unwrap()])
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
    // proxy-a's certificate has three days left: a warning at start.
    let short = certs::issue_with(dir, Role::Proxy, "proxy-a", Validity::days(3)).unwrap();
    let echo = ringpeer::tools::target::spawn(ringpeer::tools::target::Kind::Echo).unwrap();
    let a = start_proxy(dir, "proxy-a", None, true);
    let warning = format!("own certificate spiffe://demo/proxy/proxy-a (serial {}) expires at", short.info.serial);
    a.p.wait_for(&warning, 1, Duration::from_secs(5));
    let left: i64 = expiry_lines(a.admin)[0].rsplit(' ').next().unwrap().parse().unwrap();
    assert!((3 * 86_400 - 600..=3 * 86_400).contains(&left), "own certificate has {left} s left");
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
    a.p.wait_for("refused client spiffe://demo/client/client-r: certificate revoked", 1, Duration::from_secs(5));
    let (ok, out, err) = dial(dir, a.client, "client", b"still here");
    assert!(ok && out == b"still here", "a client not on the CRL was refused: {err}");

    // An expired client certificate: `ringpeer dial` refuses to use it
    // (naming its expiry), and a client that presents it anyway gets the
    // proxy's certificate_expired alert; the proxy logs the expiry.
    let now = time::OffsetDateTime::now_utc();
    let past =
        Validity { not_before: now - Duration::from_secs(10 * 86_400), not_after: now - Duration::from_secs(86_400) };
    let old = certs::issue_with(dir, Role::Client, "client-old", past).unwrap();
    let (ok, _, err) = dial(dir, a.client, "client-old", b"x");
    assert!(!ok && err.contains("certificate expired at"), "client's error: {err}");
    let verdict = common::tls_verdict(a.client, presenting(&old.cert, &old.key));
    assert!(
        matches!(verdict, common::TlsVerdict::Refused(rustls::AlertDescription::CertificateExpired)),
        "{verdict:?}"
    );
    let at = ringpeer::transport::verify::rfc3339(old.info.not_after);
    a.p.wait_for(
        &format!("refused client spiffe://demo/client/client-old: certificate expired at {at}"),
        1,
        Duration::from_secs(5),
    );
}

/// What the stream holders saw.
#[derive(Debug, Default)]
struct HoldReport {
    opened: usize,
    echoes: u64,
    /// Streams that ended abnormally, with why.
    failures: Vec<String>,
}

/// Opens `n` dials to agent-1/echo through `proxy` over 4 client
/// connections (certificate `name` of `dir`) and keeps each for `secs`
/// from the start, echoing 32 bytes every second; then ends each one
/// cleanly. `opened` counts dials established.
fn hold(
    proxy: SocketAddr,
    dir: &Path,
    name: &str,
    n: usize,
    secs: u64,
    opened: Arc<std::sync::atomic::AtomicUsize>,
) -> std::thread::JoinHandle<HoldReport> {
    use ringpeer::client::{client_tls, Client};
    use ringpeer::tools::load::open;
    use std::cell::RefCell;
    use std::rc::Rc;
    use std::sync::atomic::Ordering;
    let tls = client_tls(dir, name).unwrap();
    std::thread::spawn(move || {
        ringpeer::runtime::block_on("holder", move || async move {
            let end = Instant::now() + Duration::from_secs(secs);
            let report = Rc::new(RefCell::new(HoldReport::default()));
            let target = ringpeer::wire::DialTarget::parse("agent-1/echo").unwrap();
            let h2 = ringpeer::transport::h2conf::H2Tuning::default();
            let mut clients = Vec::new();
            for _ in 0..4 {
                clients.push(Client::connect(&proxy.to_string(), &tls, &h2).await.expect("client connects"));
            }
            let mut tasks = Vec::new();
            for i in 0..n {
                let mut d = match open(&clients[i % 4], &target).await {
                    Ok(d) => d,
                    Err(e) => {
                        report.borrow_mut().failures.push(format!("open {i}: {e}"));
                        continue;
                    }
                };
                opened.fetch_add(1, Ordering::Relaxed);
                report.borrow_mut().opened += 1;
                let report = report.clone();
                tasks.push(glommio::spawn_local(async move {
                    let msg: Vec<u8> = (0..32u8).map(|b| b ^ (i as u8)).collect();
                    let r: Result<(), String> = async {
                        // Spread the echoes over the second.
                        glommio::timer::sleep(Duration::from_millis((i % 1000) as u64)).await;
                        while Instant::now() < end {
                            d.write(&msg).await.map_err(|e| format!("write: {e}"))?;
                            let mut got = Vec::new();
                            d.read_exact(&mut got, msg.len()).await.map_err(|e| format!("read: {e}"))?;
                            if got != msg {
                                return Err("echo mismatch".into());
                            }
                            report.borrow_mut().echoes += 1;
                            glommio::timer::sleep(Duration::from_secs(1)).await;
                        }
                        d.close_write().map_err(|e| format!("close: {e}"))?;
                        while d.read().await.map_err(|e| format!("drain: {e}"))?.is_some() {}
                        let st = d.status().await;
                        if !st.is_ok() {
                            return Err(format!("status {st}"));
                        }
                        Ok(())
                    }
                    .await;
                    if let Err(e) = r {
                        report.borrow_mut().failures.push(format!("stream {i}: {e}"));
                    }
                }));
            }
            for t in tasks {
                t.await;
            }
            Rc::try_unwrap(report).ok().unwrap().into_inner()
        })
        .unwrap()
    })
}

/// The serial of the certificate the server at `addr` presents now (a new
/// handshake, as `dir`'s `client`).
fn server_serial(addr: SocketAddr, dir: &Path) -> String {
    let cfg = common::client_config_as(dir, "client", Role::Client, None);
    ringpeer::runtime::block_on("serial", move || async move {
        let tcp = glommio::net::TcpStream::connect(addr).await.unwrap();
        let io = ringpeer::transport::io::GlommioIo::new(tcp);
        let name = ringpeer::transport::tls::server_name("127.0.0.1");
        let tls = tokio_rustls::TlsConnector::from(cfg).connect(name, io).await.unwrap();
        let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
        CertInfo::of("own", &leaf).unwrap().serial
    })
    .unwrap()
}

/// The `ringpeer_cert_expiry_seconds` lines of the proxy at `admin`.
fn expiry_lines(admin: SocketAddr) -> Vec<String> {
    let mut s = std::net::TcpStream::connect(admin).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut body = String::new();
    std::io::Read::read_to_string(&mut s, &mut body).unwrap();
    body.lines().filter(|l| l.starts_with("ringpeer_cert_expiry_seconds{")).map(str::to_string).collect()
}

/// Waits until `opened` reaches `n`.
fn wait_opened(opened: &std::sync::atomic::AtomicUsize, n: usize) {
    let t0 = Instant::now();
    while opened.load(std::sync::atomic::Ordering::Relaxed) < n {
        assert!(t0.elapsed() < Duration::from_secs(30), "only {opened:?} of {n} streams opened in 30 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Replaces `name`'s certificate and key in `live` with those of `from`
/// (key first, as `certs issue` writes them).
fn install(from: &Path, live: &Path, name: &str) {
    for f in [format!("{name}-key.pem"), format!("{name}.pem")] {
        let tmp = live.join(format!(".{f}.new"));
        std::fs::copy(from.join(&f), &tmp).unwrap();
        std::fs::rename(&tmp, live.join(&f)).unwrap();
    }
}

#[test]
fn certificates_rotate_under_1000_streams_through_two_proxies_without_dropping_one() {
    let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
    ringpeer::runtime::raise_memlock();
    let redis = common::redis_server::Redis::start();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    certs::init(dir, "demo").unwrap();
    let echo = ringpeer::tools::target::spawn(ringpeer::tools::target::Kind::Echo).unwrap();
    let a = start_proxy(dir, "proxy-a", Some(&redis.url()), false);
    let b = start_proxy(dir, "proxy-b", Some(&redis.url()), false);
    // agent-1 tunnels to B only: every dial entering at A crosses A's peer link to B.
    let _agent = start_agent(dir, &[b.tunnel], echo.addr);
    wait_dialable(dir, a.client, "client");
    let (a0, b0) = (server_serial(a.client, dir), server_serial(b.client, dir));

    const STREAMS: usize = 1000;
    let opened = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let t0 = Instant::now();
    let holder = hold(a.client, dir, "client", STREAMS, 60, opened.clone());
    wait_opened(&opened, STREAMS);
    eprintln!("{STREAMS} streams open after {:?}", t0.elapsed());

    // New certificates for both proxies: A picks its files up by itself
    // (the poller), B is told with SIGHUP.
    let new_a = certs::issue(dir, Role::Proxy, "proxy-a").map(|(c, _)| info(&c)).unwrap();
    let new_b = certs::issue(dir, Role::Proxy, "proxy-b").map(|(c, _)| info(&c)).unwrap();
    b.p.sighup();
    let t_rot = Instant::now();
    a.p.wait_for(&format!("certificate (serial {a0} -> {})", new_a.serial), 1, Duration::from_secs(10));
    b.p.wait_for(&format!("certificate (serial {b0} -> {})", new_b.serial), 1, Duration::from_secs(10));
    eprintln!("both proxies reloaded {:?} after the rotation", t_rot.elapsed());
    // New handshakes see the new certificates, and so does the metric.
    assert_eq!(server_serial(a.client, dir), new_a.serial);
    assert_eq!(server_serial(b.client, dir), new_b.serial);
    let lines = expiry_lines(a.admin);
    assert!(lines.iter().any(|l| l.contains("cert=\"own\"") && l.contains(&new_a.serial)), "metric lines: {lines:#?}");
    let left: i64 = lines[0].rsplit(' ').next().unwrap().parse().unwrap();
    assert!((89 * 86_400..=90 * 86_400).contains(&left), "own certificate has {left} s left: {lines:#?}");
    // A new client connection (a new handshake at A) dials through.
    let (ok, out, err) = dial(dir, a.client, "client", b"after rotation");
    assert!(ok && out == b"after rotation", "{err}");

    let report = holder.join().unwrap();
    eprintln!("hold report: opened {} echoes {} failures {}", report.opened, report.echoes, report.failures.len());
    assert_eq!(report.opened, STREAMS, "{:#?}", report.failures);
    assert!(report.failures.is_empty(), "streams ended abnormally: {:#?}", report.failures);
    // About one echo a second per stream for the minute (bound with room for a slow machine).
    assert!(report.echoes >= (STREAMS as u64) * 30, "only {} echoes", report.echoes);
}

#[test]
fn a_ca_rotates_under_load_and_then_refuses_certificates_of_the_old_ca() {
    let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
    ringpeer::runtime::raise_memlock();
    let redis = common::redis_server::Redis::start();
    let (old_tmp, new_tmp, stale_tmp) =
        (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // `live` is the old CA's directory, where the processes' files are;
    // `new` holds the new CA and certificates it issued.
    let (live, new) = (old_tmp.path(), new_tmp.path());
    certs::init(live, "demo").unwrap();
    certs::init(new, "demo").unwrap();
    let old_ca = std::fs::read(live.join("ca.pem")).unwrap();
    let new_ca = std::fs::read(new.join("ca.pem")).unwrap();
    let echo = ringpeer::tools::target::spawn(ringpeer::tools::target::Kind::Echo).unwrap();
    let a = start_proxy(live, "proxy-a", Some(&redis.url()), false);
    let b = start_proxy(live, "proxy-b", Some(&redis.url()), false);
    let agent = start_agent(live, &[b.tunnel], echo.addr);
    wait_dialable(live, a.client, "client");
    // A client that will keep its old-CA certificate (and trusts both CAs).
    let stale = stale_tmp.path();
    for f in ["client.pem", "client-key.pem"] {
        std::fs::copy(live.join(f), stale.join(f)).unwrap();
    }
    std::fs::write(stale.join("ca.pem"), [old_ca.clone(), new_ca.clone()].concat()).unwrap();
    let old_agent = stale.join("agent-1.pem");
    std::fs::copy(live.join("agent-1.pem"), &old_agent).unwrap();
    std::fs::copy(live.join("agent-1-key.pem"), stale.join("agent-1-key.pem")).unwrap();

    const STREAMS: usize = 300;
    let opened = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let holder = hold(a.client, live, "client", STREAMS, 25, opened.clone());
    wait_opened(&opened, STREAMS);
    let everyone = [&a.p, &b.p, &agent];
    let reload_all = |what: &str| {
        let before: Vec<usize> = everyone.iter().map(|p| p.count(what)).collect();
        for p in everyone {
            p.sighup();
        }
        for (p, n) in everyone.iter().zip(before) {
            p.wait_for(what, n + 1, Duration::from_secs(10));
        }
    };

    // 1. Every process trusts both CAs.
    std::fs::write(live.join("ca.pem"), [old_ca.clone(), new_ca.clone()].concat()).unwrap();
    reload_all("CA bundle (1 -> 2 CAs)");
    assert_eq!(expiry_lines(a.admin).iter().filter(|l| l.contains("cert=\"ca\"")).count(), 2);
    // 2. Proxies and the agent get certificates of the new CA.
    for name in ["proxy-a", "proxy-b", "agent-1"] {
        install(new, live, name);
    }
    reload_all("TLS reloaded: certificate (serial");
    // 3. Only the new CA is trusted.
    std::fs::write(live.join("ca.pem"), &new_ca).unwrap();
    reload_all("CA bundle (2 -> 1 CAs)");

    // New handshakes work with new-CA certificates: a client from the new
    // CA dials through A; B's tunnel port accepts the agent's new
    // certificate and refuses its old one.
    let (ok, out, err) = dial(new, a.client, "client", b"new ca");
    assert!(ok && out == b"new ca", "a new-CA client was refused: {err}");
    let verdict = common::tls_verdict(b.tunnel, common::client_config_as(new, "agent-1", Role::Agent, None));
    assert!(matches!(verdict, common::TlsVerdict::Accepted), "{verdict:?}");
    let verdict = common::tls_verdict(b.tunnel, presenting(&old_agent, &stale.join("agent-1-key.pem")));
    assert!(matches!(verdict, common::TlsVerdict::Refused(rustls::AlertDescription::UnknownCA)), "{verdict:?}");
    // A peer link made after the rotation (to a new proxy C of the new CA,
    // where agent-2 is) carries A's new certificate and trusts only the
    // new CA: A's peer link configs were rebuilt by the reload.
    let c = start_proxy(new, "proxy-c", Some(&redis.url()), false);
    let _agent2 = start_agent_as(new, "agent-2", &[c.tunnel], echo.addr);
    let t0 = Instant::now();
    loop {
        let (ok, out, err) = dial_to("agent-2/echo", new, a.client, "client", b"via a new link");
        if ok && out == b"via a new link" {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "A cannot reach agent-2 behind the new proxy C: {err}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // A client still holding an old-CA certificate is refused, and told why.
    let (ok, _, err) = dial(stale, a.client, "client", b"old ca");
    assert!(
        !ok && err.contains("the proxy refused our certificate: certificate not signed by a CA it trusts"),
        "{err}"
    );

    // The streams opened before the rotation, with old-CA certificates
    // at both ends of every hop, ran to their end.
    let report = holder.join().unwrap();
    eprintln!("hold report: opened {} echoes {} failures {}", report.opened, report.echoes, report.failures.len());
    assert_eq!(report.opened, STREAMS, "{:#?}", report.failures);
    assert!(report.failures.is_empty(), "streams ended abnormally: {:#?}", report.failures);
    assert!(report.echoes >= (STREAMS as u64) * 12, "only {} echoes", report.echoes);
}
