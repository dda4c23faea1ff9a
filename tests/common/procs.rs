//! Proxy and agent processes for multi-process stories, with the admin
//! endpoint as the window into each proxy.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use super::redis_server::Redis;

const BIN: &str = env!("CARGO_BIN_EXE_ringpeer");

/// A child process, killed (SIGKILL) on drop.
pub struct Proc(pub Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// A proxy process on the Redis backend; returns it, its tunnel address
/// and its admin address.
pub fn proxy(dir: &Path, redis: &Redis, id: &str, ttl_ms: u64, count: u32) -> (Proc, SocketAddr, SocketAddr) {
    let admin = free_addr();
    let d = dir.display();
    let cfg = format!(
        "cluster = \"demo\"\nid = \"{id}\"\nshards = 2\nclient_addr = \"127.0.0.1:0\"\ntunnel_addr = \"127.0.0.1:0\"\n\
         admin_addr = \"{admin}\"\npeer_addr = \"127.0.0.1:0\"\npin_cpus = false\n[tls]\nca = \"{d}/ca.pem\"\ncert = \"{d}/{id}.pem\"\nkey = \"{d}/{id}-key.pem\"\n\
         [backend]\nkind = \"redis\"\nurl = \"{}\"\nproxy_ttl_ms = {ttl_ms}\n\
         [strategy]\ntype = \"proxy_peering\"\nagent_connection_count = {count}\n\
         [audit]\npath = \"{d}/{id}-audit.log\"\n",
        redis.url()
    );
    let path = dir.join(format!("{id}.toml"));
    std::fs::write(&path, cfg).unwrap();
    let (proc, _, tunnel) = start_proxy(&path, None);
    (proc, tunnel, admin)
}

/// Starts a proxy process on `config`; returns it with its client and
/// tunnel addresses, read from its start-up line. Its later log lines are
/// echoed with `echo` as prefix, or dropped.
pub fn start_proxy(config: &Path, echo: Option<&'static str>) -> (Proc, SocketAddr, SocketAddr) {
    let (p, client, tunnel, _) = start_proxy_line(Path::new(BIN), config, echo);
    (p, client, tunnel)
}

/// [`start_proxy`] with the binary at `bin` (e.g. another build), and the
/// proxy's start-up line.
pub fn start_proxy_line(
    bin: &Path,
    config: &Path,
    echo: Option<&'static str>,
) -> (Proc, SocketAddr, SocketAddr, String) {
    try_start_proxy_line(bin, config, echo).unwrap_or_else(|line| panic!("the proxy did not start: {line}"))
}

/// [`start_proxy_line`]; the line the proxy printed instead when it did not
/// start.
pub fn try_start_proxy_line(
    bin: &Path,
    config: &Path,
    echo: Option<&'static str>,
) -> Result<(Proc, SocketAddr, SocketAddr, String), String> {
    let mut child = Command::new(bin)
        .args(["proxy", "--config", config.to_str().unwrap()])
        .env("RUST_LOG", super::child_log())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let line = lines.next().expect("proxy prints its addresses").unwrap();
    if !line.contains(" listening: ") {
        let _ = child.wait();
        return Err(line);
    }
    // With RINGPEER_TEST_LOG set, every proxy's lines are echoed, named
    // after its config file.
    let name = config.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let echo: Option<String> = echo.map(str::to_string).or_else(|| super::test_log().map(|_| name));
    std::thread::spawn(move || {
        for l in lines.map_while(Result::ok) {
            if let Some(who) = &echo {
                eprintln!("{who}: {l}");
            }
        }
    });
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = |k: &str| words[words.iter().position(|w| *w == k).unwrap() + 1].parse().unwrap();
    let (client, tunnel) = (at("client"), at("tunnel"));
    Ok((Proc(child), client, tunnel, line))
}

pub fn agent(dir: &Path, id: &str, proxy: SocketAddr, echo: SocketAddr) -> Proc {
    agent_with(dir, id, proxy, echo, "")
}

/// [`agent`] with its admin endpoint on a free port; returns the process
/// and the admin address.
pub fn agent_with_admin(dir: &Path, id: &str, proxy: SocketAddr, echo: SocketAddr) -> (Proc, SocketAddr) {
    let admin = free_addr();
    (agent_with(dir, id, proxy, echo, &format!("admin_addr = \"{admin}\"\n")), admin)
}

/// [`agent`] with `top` as extra top-level config lines.
fn agent_with(dir: &Path, id: &str, proxy: SocketAddr, echo: SocketAddr, top: &str) -> Proc {
    spawn_agent(&write_agent_config(dir, id, proxy, top, &format!("echo = \"{echo}\"\n")))
}

/// Writes agent `id`'s config (cluster `demo`, certificates in `dir`)
/// dialling `proxy`, with `top` as extra top-level lines and `services` as
/// the `[services]` body; returns its path (`<dir>/<id>.toml`).
pub fn write_agent_config(
    dir: &Path,
    id: &str,
    proxy: impl std::fmt::Display,
    top: &str,
    services: &str,
) -> std::path::PathBuf {
    let d = dir.display();
    let cfg = format!(
        "cluster = \"demo\"\nid = \"{id}\"\nproxies = [\"{proxy}\"]\n{top}[tls]\nca = \"{d}/ca.pem\"\ncert = \"{d}/{id}.pem\"\n\
         key = \"{d}/{id}-key.pem\"\n[services]\n{services}"
    );
    let path = dir.join(format!("{id}.toml"));
    std::fs::write(&path, cfg).unwrap();
    path
}

/// Starts `ringpeer agent --config <path>`, logging at [`super::child_log`].
pub fn spawn_agent(path: &Path) -> Proc {
    Proc(
        Command::new(BIN)
            .args(["agent", "--config", path.to_str().unwrap()])
            .env("RUST_LOG", super::child_log())
            .spawn()
            .unwrap(),
    )
}

/// One admin request over a fresh connection: (status, body); status 0
/// when nothing answered.
pub fn admin_get(admin: SocketAddr, path: &str) -> (u16, String) {
    let Ok(mut s) = TcpStream::connect_timeout(&admin, std::time::Duration::from_secs(2)) else {
        return (0, String::new());
    };
    s.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    let _ = write!(s, "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

pub fn routes_json(admin: SocketAddr) -> serde_json::Value {
    let Ok(mut s) = TcpStream::connect(admin) else { return serde_json::Value::Null };
    let _ = s.write_all(b"GET /routes HTTP/1.0\r\n\r\n");
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    let json = body.split("\r\n\r\n").nth(1).unwrap_or("null");
    serde_json::from_str(json).unwrap_or(serde_json::Value::Null)
}

/// The sum over shards of metric `name` on the admin endpoint at `admin`
/// (`None` when unreachable or absent).
pub fn metric(admin: SocketAddr, name: &str) -> Option<i64> {
    let mut s = TcpStream::connect(admin).ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    let prefix = format!("{name}{{");
    let values: Vec<i64> =
        body.lines().filter(|l| l.starts_with(&prefix)).filter_map(|l| l.rsplit(' ').next()?.parse().ok()).collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

pub fn routes_of(admin: SocketAddr, agent: &str) -> Vec<String> {
    let v = routes_json(admin);
    let r = &v["agents"][agent];
    let mut out: Vec<String> =
        r["remote"].as_array().into_iter().flatten().map(|x| x["proxy"].as_str().unwrap_or("").to_string()).collect();
    if r["local"].as_array().is_some_and(|l| !l.is_empty()) {
        out.push("local".into());
    }
    out.sort();
    out
}

/// Sends SIGTERM to `p`.
pub fn sigterm(p: &Proc) {
    // SAFETY: a plain signal to our own child process.
    assert_eq!(unsafe { libc::kill(p.0.id() as i32, libc::SIGTERM) }, 0);
}

/// Waits up to `bound` for `p` to exit; its exit status, or `None` if it
/// is still running.
pub fn wait_exit(p: &mut Proc, bound: std::time::Duration) -> Option<std::process::ExitStatus> {
    let t0 = std::time::Instant::now();
    loop {
        if let Some(s) = p.0.try_wait().unwrap() {
            return Some(s);
        }
        if t0.elapsed() >= bound {
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Writes the config of proxy `id` (two shards, ports 0, admin on a free
/// port, Redis backend, upgrade socket `<dir>/<id>.sock`) with `extra`
/// top-level lines and `strategy` as the `[strategy]` table's body; returns
/// its path and admin address.
pub fn proxy_config_file(
    dir: &Path,
    redis: &Redis,
    id: &str,
    ttl_ms: u64,
    strategy: &str,
    extra: &str,
) -> (std::path::PathBuf, SocketAddr) {
    let admin = free_addr();
    let d = dir.display();
    let cfg = format!(
        "cluster = \"demo\"\nid = \"{id}\"\nshards = 2\nclient_addr = \"127.0.0.1:0\"\ntunnel_addr = \"127.0.0.1:0\"\n\
         admin_addr = \"{admin}\"\npeer_addr = \"127.0.0.1:0\"\npin_cpus = false\nupgrade_socket = \"{d}/{id}.sock\"\n{extra}\n\
         [tls]\nca = \"{d}/ca.pem\"\ncert = \"{d}/{id}.pem\"\nkey = \"{d}/{id}-key.pem\"\n\
         [backend]\nkind = \"redis\"\nurl = \"{}\"\nproxy_ttl_ms = {ttl_ms}\n[strategy]\n{strategy}\n\
         [audit]\npath = \"{d}/{id}-audit.log\"\n",
        redis.url()
    );
    let path = dir.join(format!("{id}.toml"));
    std::fs::write(&path, cfg).unwrap();
    (path, admin)
}

/// [`proxy`] with `backend` as the `[backend]` table's extra lines (the
/// `url` and any password files), e.g. a `redis+sentinel://` URL.
pub fn proxy_on(dir: &Path, backend: &str, id: &str, ttl_ms: u64, count: u32) -> (Proc, SocketAddr, SocketAddr) {
    let admin = free_addr();
    let d = dir.display();
    let cfg = format!(
        "cluster = \"demo\"\nid = \"{id}\"\nshards = 2\nclient_addr = \"127.0.0.1:0\"\ntunnel_addr = \"127.0.0.1:0\"\n\
         admin_addr = \"{admin}\"\npeer_addr = \"127.0.0.1:0\"\npin_cpus = false\n[tls]\nca = \"{d}/ca.pem\"\ncert = \"{d}/{id}.pem\"\nkey = \"{d}/{id}-key.pem\"\n\
         [backend]\nkind = \"redis\"\n{backend}\nproxy_ttl_ms = {ttl_ms}\n\
         [strategy]\ntype = \"proxy_peering\"\nagent_connection_count = {count}\n\
         [audit]\npath = \"{d}/{id}-audit.log\"\n"
    );
    let path = dir.join(format!("{id}.toml"));
    std::fs::write(&path, cfg).unwrap();
    let (proc, _, tunnel) = start_proxy(&path, None);
    (proc, tunnel, admin)
}

/// Every thread's stack of `p` (gdb, when the machine has it), for a
/// failure message: what a process that stopped answering was doing.
pub fn stacks(name: &str, p: &Proc) -> String {
    let out = Command::new("timeout")
        .args(["30", "gdb", "-p", &p.0.id().to_string(), "-batch", "-ex", "thread apply all bt 12"])
        .output();
    match out {
        Ok(o) if o.status.success() => {
            let text = String::from_utf8_lossy(&o.stdout);
            let frames: Vec<&str> = text.lines().filter(|l| l.starts_with("Thread ") || l.starts_with('#')).collect();
            format!("--- {name} (pid {}) ---\n{}", p.0.id(), frames.join("\n"))
        }
        _ => format!("--- {name}: no stacks (gdb missing or refused)"),
    }
}
