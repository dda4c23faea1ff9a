//! Redis secrets, told with real processes against a real redis-server: the
//! password lives in a file (or the environment) and shows up nowhere a
//! person or another user could read it — not in `ps`, not in a debug log,
//! not in the `routes` CLI's output or errors; a legacy password in the URL
//! is printed as `***`; and `rediss://` with a private CA carries route sync,
//! while a server certificate from an unknown CA is refused by name.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::eventually;
use common::procs::{agent, free_addr, proxy_config_file, Proc};
use common::redis_server::{Redis, RedisOpts, RedisTls};
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose};
use ringpeer::tools::fleet::CertDir;
use ringpeer::tools::target::{self as targets, Kind};

const BIN: &str = env!("CARGO_BIN_EXE_ringpeer");

/// A password no log line could contain by accident.
fn password() -> String {
    format!("pw-{:016x}", rand::random::<u64>())
}

/// Writes `secret` to `<dir>/<name>` with mode 600.
fn secret_file(dir: &Path, name: &str, secret: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, format!("{secret}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

/// The proxy config of `id` on `url`, with `backend` lines added to `[backend]`.
fn config(dir: &Path, redis: &Redis, id: &str, url: &str, backend: &str) -> (PathBuf, SocketAddr) {
    let (path, admin) = proxy_config_file(dir, redis, id, 2_000, "type = \"agent_mesh\"", "");
    let text = std::fs::read_to_string(&path).unwrap();
    let text = text.replace(&format!("url = \"{}\"", redis.url()), &format!("url = \"{url}\"\n{backend}"));
    std::fs::write(&path, text).unwrap();
    (path, admin)
}

/// A proxy process at `--log debug` (RUST_LOG unset), its stderr into
/// `log`; returns it and its tunnel address once it listens.
fn logged_proxy(cfg: &Path, log: &Path, env: &[(&str, &str)]) -> (Proc, SocketAddr) {
    let file = std::fs::File::create(log).unwrap();
    let mut cmd = Command::new(BIN);
    cmd.args(["--log", "debug", "proxy", "--config", cfg.to_str().unwrap()]).env_remove("RUST_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let p = Proc(cmd.stderr(Stdio::from(file)).spawn().unwrap());
    let t0 = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap();
        if let Some(line) = text.lines().find(|l| l.contains(" listening: ")) {
            let words: Vec<&str> = line.split_whitespace().collect();
            let tunnel = words[words.iter().position(|w| *w == "tunnel").unwrap() + 1].parse().unwrap();
            return (p, tunnel);
        }
        assert!(t0.elapsed() < Duration::from_secs(15), "the proxy did not start:\n{text}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `ringpeer routes ARGS` with `env` added.
fn routes(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.arg("routes").args(args).env_remove("RUST_LOG").env_remove("RINGPEER_REDIS_PASSWORD");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn registered(redis: &Redis, id: &str) -> bool {
    let key = format!("ringpeer:{{demo}}:proxy:{id}");
    redis.client().get_connection().and_then(|mut c| redis::cmd("EXISTS").arg(&key).query::<i64>(&mut c)) == Ok(1)
}

/// `/proc/<pid>/<what>` (NUL-separated) as text.
fn proc_file(p: &Proc, what: &str) -> String {
    String::from_utf8_lossy(&std::fs::read(format!("/proc/{}/{what}", p.0.id())).unwrap()).replace('\0', " ")
}

#[test]
fn a_password_from_a_file_reaches_redis_and_nothing_else() {
    let pw = password();
    let redis = Redis::start_with(RedisOpts { password: Some(pw.clone()), tls: None, ..Default::default() });
    let certs = CertDir::temp().unwrap();
    let dir = &certs.path;
    let pass = secret_file(dir, "redis.pass", &pw);
    let (cfg, _) = config(dir, &redis, "proxy-a", &redis.url(), &format!("password_file = \"{}\"", pass.display()));
    let log = dir.join("proxy-a.log");
    let (proxy, tunnel) = logged_proxy(&cfg, &log, &[]);
    eventually("proxy-a registers in the password-protected Redis", || registered(&redis, "proxy-a"));
    let echo = targets::spawn(Kind::Echo).unwrap();
    let _agent = agent(dir, "agent-1", tunnel, echo.addr);

    // The CLI takes the password from the environment or a file, never argv.
    let by_env = [("RINGPEER_REDIS_PASSWORD", pw.as_str())];
    let backend = ["--backend", &redis.url(), "--cluster", "demo"];
    eventually("routes get shows agent-1 on proxy-a", || {
        let o = routes(&[&backend[..], &["get", "agent-1"]].concat(), &by_env);
        o.status.success() && text(&o).contains("proxy-a")
    });
    let listed = routes(&[&backend[..], &["list"]].concat(), &by_env);
    let by_file = routes(&[&backend[..], &["--redis-password-file", pass.to_str().unwrap(), "proxies"]].concat(), &[]);
    assert!(listed.status.success() && text(&listed).contains("agent-1"), "{}", text(&listed));
    assert!(by_file.status.success() && text(&by_file).contains("proxy-a"), "{}", text(&by_file));
    // A password file others can read works, with a warning.
    let loose = secret_file(dir, "loose.pass", &pw);
    std::fs::set_permissions(&loose, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let o = routes(&[&backend[..], &["--redis-password-file", loose.to_str().unwrap(), "proxies"]].concat(), &[]);
    assert!(o.status.success() && text(&o).contains("readable by group or others"), "{}", text(&o));

    // Where the password is not.
    let cmdline = proc_file(&proxy, "cmdline");
    assert!(cmdline.contains("--config") && !cmdline.contains(&pw), "{cmdline}");
    assert!(!proc_file(&proxy, "environ").contains(&pw));
    drop(proxy);
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("route backend synced") && logged.contains("DEBUG"), "a debug log was captured:\n{logged}");
    assert_eq!(logged.matches(&pw).count(), 0, "{logged}");
    assert_eq!((text(&listed).matches(&pw).count(), text(&by_file).matches(&pw).count()), (0, 0));

    // A wrong password: one line, naming the problem and its source, not the password.
    let wrong = password();
    let o = routes(&[&backend[..], &["list"]].concat(), &[("RINGPEER_REDIS_PASSWORD", &wrong)]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("authentication failed") && err.contains("RINGPEER_REDIS_PASSWORD"), "{err}");
    assert!(!err.contains(&wrong) && !err.contains(&pw), "{err}");
    // No password at all: the server's demand, named.
    let o = routes(&[&backend[..], &["list"]].concat(), &[]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!((o.status.code(), err.lines().count()), (Some(2), 1), "{err}");
    assert!(err.contains("requires a password"), "{err}");

    // A proxy whose password_file holds a wrong password says so once per
    // path (reader, writer), and never prints it.
    let bad = secret_file(dir, "bad.pass", &wrong);
    let (cfg_b, _) = config(dir, &redis, "proxy-b", &redis.url(), &format!("password_file = \"{}\"", bad.display()));
    let log_b = dir.join("proxy-b.log");
    let (proxy_b, _) = logged_proxy(&cfg_b, &log_b, &[]);
    eventually("proxy-b reports the refused password", || {
        std::fs::read_to_string(&log_b).unwrap().contains("authentication failed")
    });
    std::thread::sleep(Duration::from_millis(1_500)); // retries with backoff meanwhile
    drop(proxy_b);
    let logged = std::fs::read_to_string(&log_b).unwrap();
    let lines = logged.lines().filter(|l| l.contains("authentication failed")).count();
    assert!((1..=2).contains(&lines), "{lines} lines:\n{logged}");
    assert!(logged.contains("bad.pass") && !logged.contains(&wrong), "{logged}");
    assert!(!registered(&redis, "proxy-b"));
}

#[test]
fn a_password_in_the_url_still_works_and_is_printed_as_stars() {
    let pw = password();
    let redis = Redis::start_with(RedisOpts { password: Some(pw.clone()), tls: None, ..Default::default() });
    let certs = CertDir::temp().unwrap();
    let dir = &certs.path;
    let url = format!("redis://:{pw}@127.0.0.1:{}/0", redis.port);
    let (cfg, _) = config(dir, &redis, "proxy-a", &url, "");
    let log = dir.join("proxy-a.log");
    let (proxy, _) = logged_proxy(&cfg, &log, &[]);
    eventually("proxy-a registers with the password from its url", || registered(&redis, "proxy-a"));
    drop(proxy);
    let logged = std::fs::read_to_string(&log).unwrap();
    let shown = format!("redis://:***@127.0.0.1:{}/0", redis.port);
    assert!(logged.contains(&shown) && logged.contains("move it to backend.password_file"), "{logged}");
    assert_eq!(logged.matches(&pw).count(), 0, "{logged}");

    // The CLI: the warning and the errors show the URL redacted too.
    let o = routes(&["--backend", &url, "--cluster", "demo", "proxies"], &[]);
    assert!(o.status.success() && text(&o).contains("proxy-a") && text(&o).contains(&shown), "{}", text(&o));
    assert_eq!(text(&o).matches(&pw).count(), 0, "{}", text(&o));
    let dead = format!("redis://:{pw}@{}/0", free_addr());
    let o = routes(&["--backend", &dead, "--cluster", "demo", "list"], &[]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("redis://:***@127.0.0.1:") && !err.contains(&pw), "{err}");
}

/// A CA and a leaf it signs, as PEM files `<dir>/<name>.pem`, `<name>-key.pem`.
struct Pki {
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn ca(dir: &Path, name: &str) -> (Pki, PathBuf) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.distinguished_name.push(DnType::CommonName, name);
    let cert = p.self_signed(&key).unwrap();
    let path = dir.join(format!("{name}.pem"));
    std::fs::write(&path, cert.pem()).unwrap();
    (Pki { cert, key }, path)
}

fn leaf(dir: &Path, ca: &Pki, name: &str, usage: ExtendedKeyUsagePurpose) -> (PathBuf, PathBuf) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    p.distinguished_name.push(DnType::CommonName, name);
    p.extended_key_usages = vec![usage];
    let cert = p.signed_by(&key, &ca.cert, &ca.key).unwrap();
    let (c, k) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}-key.pem")));
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c, k)
}

#[test]
fn rediss_with_a_private_ca_carries_route_sync_and_refuses_an_unknown_ca() {
    let certs = CertDir::temp().unwrap();
    let dir = &certs.path;
    let (redis_ca, ca_path) = ca(dir, "redis-ca");
    let (other, other_path) = ca(dir, "other-ca");
    drop(other);
    let (server_cert, server_key) = leaf(dir, &redis_ca, "redis-server", ExtendedKeyUsagePurpose::ServerAuth);
    let (client_cert, client_key) = leaf(dir, &redis_ca, "redis-client", ExtendedKeyUsagePurpose::ClientAuth);
    let pw = password();
    let tls = RedisTls {
        cert: server_cert,
        key: server_key,
        ca: ca_path.clone(),
        auth_clients: true,
        client_cert: Some(client_cert.clone()),
        client_key: Some(client_key.clone()),
    };
    let redis = Redis::start_with(RedisOpts { password: Some(pw.clone()), tls: Some(tls), ..Default::default() });
    assert!(redis.url().starts_with("rediss://"));
    let pass = secret_file(dir, "redis.pass", &pw);
    let backend = format!(
        "password_file = \"{}\"\ntls_ca = \"{}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"",
        pass.display(),
        ca_path.display(),
        client_cert.display(),
        client_key.display()
    );
    let (cfg, _) = config(dir, &redis, "proxy-a", &redis.url(), &backend);
    let log = dir.join("proxy-a.log");
    let (_proxy, tunnel) = logged_proxy(&cfg, &log, &[]);
    eventually("proxy-a registers through TLS", || registered(&redis, "proxy-a"));
    let echo = targets::spawn(Kind::Echo).unwrap();
    let _agent = agent(dir, "agent-1", tunnel, echo.addr);

    let pass_s = pass.to_str().unwrap();
    let (ca_s, cc, ck) = (ca_path.to_str().unwrap(), client_cert.to_str().unwrap(), client_key.to_str().unwrap());
    let url = redis.url();
    let flags = ["--backend", &url, "--cluster", "demo", "--redis-password-file", pass_s];
    let tls_flags = ["--redis-tls-cert", cc, "--redis-tls-key", ck];
    eventually("routes get, over TLS, shows agent-1 on proxy-a", || {
        let o = routes(&[&flags[..], &tls_flags, &["--redis-tls-ca", ca_s, "get", "agent-1"]].concat(), &[]);
        o.status.success() && text(&o).contains("proxy-a")
    });
    // The same through --config (the proxy's own backend keys).
    let o = routes(&["--config", cfg.to_str().unwrap(), "get", "agent-1"], &[]);
    assert!(o.status.success() && text(&o).contains("proxy-a"), "{}", text(&o));

    // A server certificate from a CA we were not told to trust: refused, by name.
    let o = routes(&[&flags[..], &tls_flags, &["--redis-tls-ca", other_path.to_str().unwrap(), "list"]].concat(), &[]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!((o.status.code(), err.lines().count()), (Some(2), 1), "{err}");
    assert!(err.contains("UnknownIssuer") && err.contains("tls_ca"), "{err}");
    // A plain-text client on the TLS port gets nowhere (no silent downgrade).
    let plain = format!("redis://127.0.0.1:{}", redis.port);
    let o = routes(&["--backend", &plain, "--cluster", "demo", "--redis-password-file", pass_s, "list"], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("route backend synced") && !logged.contains(&pw), "{logged}");

    // A TLS port that accepts and then never speaks: the handshake runs
    // under the 2 s I/O deadline, so the CLI gives up instead of hanging.
    let stall = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("rediss://127.0.0.1:{}", stall.local_addr().unwrap().port());
    let t0 = Instant::now();
    let o = routes(
        &["--backend", &url, "--cluster", "demo", "--redis-password-file", pass_s, "--redis-tls-ca", ca_s, "list"],
        &[],
    );
    let took = t0.elapsed();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        took >= Duration::from_millis(1_900) && took < Duration::from_secs(8),
        "gave up after {took:?}: {}",
        text(&o)
    );
}
