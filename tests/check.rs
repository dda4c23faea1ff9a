//! `ringpeer proxy|agent --config F --check`, with the real binary and real
//! certificates: a good config passes without binding anything; a bad one
//! exits 2 listing every problem, one line each, naming the key or file.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ringpeer::tools::fleet::CertDir;
use ringpeer::transport::certs::{issue_with, Validity};
use ringpeer::transport::identity::Role;

const BIN: &str = env!("CARGO_BIN_EXE_ringpeer");

/// Runs `ringpeer <role> --config <file> --check` on `text`; exit code and
/// the stderr lines.
fn check(dir: &Path, role: &str, text: &str) -> (i32, Vec<String>) {
    let path = dir.join(format!("{role}-check.toml"));
    std::fs::write(&path, text).unwrap();
    let out = Command::new(BIN)
        .args([role, "--config", path.to_str().unwrap(), "--check"])
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let lines = String::from_utf8_lossy(&out.stderr).lines().map(str::to_string).collect();
    (out.status.code().unwrap_or(-1), lines)
}

fn proxy(dir: &Path, client_addr: &str, top: &str, cert: &str, key: &str) -> String {
    let d = dir.display();
    format!(
        "cluster = \"demo\"\nid = \"proxy-a\"\nclient_addr = \"{client_addr}\"\ntunnel_addr = \"127.0.0.1:0\"\n\
         peer_addr = \"127.0.0.1:0\"\n{top}\n[tls]\nca = \"{d}/ca.pem\"\ncert = \"{d}/{cert}\"\nkey = \"{d}/{key}\"\n"
    )
}

fn has(lines: &[String], s: &str) -> bool {
    lines.iter().any(|l| l.contains(s))
}

#[test]
fn a_good_config_passes_without_binding_and_a_bad_one_lists_every_problem() {
    let certs = CertDir::temp().unwrap();
    let dir = certs.path.as_path();

    // Good: exit 0 — while the test itself holds the client port, which
    // a proxy that bound its listeners would fail on.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().to_string();
    let (code, lines) = check(dir, "proxy", &proxy(dir, &port, "", "proxy-a.pem", "proxy-a-key.pem"));
    assert_eq!(code, 0, "{lines:#?}");
    assert!(has(&lines, "OK: proxy proxy-a of cluster demo, certificate spiffe://demo/proxy/proxy-a"), "{lines:#?}");
    let d = dir.display();
    let agent = format!(
        "cluster = \"demo\"\nid = \"agent-1\"\nproxies = [\"127.0.0.1:1\"]\n[tls]\nca = \"{d}/ca.pem\"\n\
         cert = \"{d}/agent-1.pem\"\nkey = \"{d}/agent-1-key.pem\"\n[services]\necho = \"127.0.0.1:7\"\n"
    );
    let (code, lines) = check(dir, "agent", &agent);
    assert_eq!(code, 0, "{lines:#?}");

    // A syntax error: its line, nothing more to check.
    let (code, lines) = check(dir, "proxy", "cluster = \"demo\"\nid = proxy-a\n");
    assert_eq!(code, 2);
    assert!(has(&lines, "(line 2)"), "{lines:#?}");

    // Several problems at once: every one listed.
    let top = "[limits]\nstreams_per_conn = 0\n[h2]\nmax_frame_size = 10\n";
    let (code, lines) = check(dir, "proxy", &proxy(dir, "nowhere", top, "missing.pem", "proxy-a-key.pem"));
    assert_eq!(code, 2, "{lines:#?}");
    for want in [
        "client_addr \"nowhere\" is not a host:port address",
        "limits.streams_per_conn must be > 0",
        "h2.max_frame_size",
        "tls.cert",
        "missing.pem: cannot read",
        "4 problem(s)",
    ] {
        assert!(has(&lines, want), "{want:?} not in {lines:#?}");
    }

    // A key that does not match the certificate; a certificate of another
    // proxy; an expired one; a world-readable key.
    let (code, lines) = check(dir, "proxy", &proxy(dir, "127.0.0.1:0", "", "proxy-a.pem", "proxy-b-key.pem"));
    assert_eq!(code, 2);
    assert!(has(&lines, "private key does not match the certificate"), "{lines:#?}");
    let (code, lines) = check(dir, "proxy", &proxy(dir, "127.0.0.1:0", "", "proxy-b.pem", "proxy-b-key.pem"));
    assert_eq!(code, 2);
    assert!(has(&lines, "is for proxy \"proxy-b\", but the config's id is \"proxy-a\""), "{lines:#?}");
    let now = time::OffsetDateTime::now_utc();
    let day = Duration::from_secs(86_400);
    let old = Validity { not_before: now - day * 30, not_after: now - day };
    let old = issue_with(dir, Role::Proxy, "proxy-a", old).unwrap();
    let (code, lines) = check(dir, "proxy", &proxy(dir, "127.0.0.1:0", "", "proxy-a.pem", "proxy-a-key.pem"));
    assert_eq!(code, 2);
    assert!(has(&lines, "expired"), "{lines:#?}");
    // Three days left: a warning, not a problem.
    issue_with(dir, Role::Proxy, "proxy-a", Validity::days(3)).unwrap();
    let (code, lines) = check(dir, "proxy", &proxy(dir, "127.0.0.1:0", "", "proxy-a.pem", "proxy-a-key.pem"));
    assert_eq!(code, 0, "{lines:#?}");
    assert!(has(&lines, "warning: own certificate spiffe://demo/proxy/proxy-a"), "{lines:#?}");
    std::fs::set_permissions(&old.key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, lines) = check(dir, "proxy", &proxy(dir, "127.0.0.1:0", "", "proxy-a.pem", "proxy-a-key.pem"));
    assert_eq!(code, 2);
    assert!(has(&lines, "is world-readable (mode 644)"), "{lines:#?}");
    drop(held);
}
