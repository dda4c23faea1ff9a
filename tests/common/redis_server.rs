//! A real `redis-server` on a free port, started, killed and restarted by
//! the tests; optionally with a password (`--requirepass`) and TLS only
//! (`--tls-port`, plain port off). The high-availability setups are in
//! `redis_ha`; the process helpers both use are here.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How the server is started; the default is plain, no password.
#[derive(Clone, Default)]
pub struct RedisOpts {
    /// `--requirepass`.
    pub password: Option<String>,
    /// TLS only, on the server's port.
    pub tls: Option<RedisTls>,
    /// No open grant (see [`Redis::start`]).
    pub bare: bool,
}

/// The server's TLS files (PEM), and the client pair the helper's own
/// client presents when `auth_clients` is on.
#[derive(Clone)]
pub struct RedisTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    /// `--tls-auth-clients yes|no`.
    pub auth_clients: bool,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

pub struct Redis {
    pub port: u16,
    child: Option<Child>,
    opts: RedisOpts,
}

impl Redis {
    /// A server on a free port. The port is free when picked but another
    /// process (a parallel test) may take it before redis-server binds it:
    /// then redis-server exits, and another port is tried.
    ///
    /// A plain server starts (and restarts) holding one grant for cluster
    /// `demo`, named `fleet`, that lets every client reach everything, as a
    /// control plane would have written: the proxies' default policy denies
    /// every dial no grant allows. Tests of grants use [`Redis::start_bare`].
    pub fn start() -> Redis {
        Self::start_with(RedisOpts::default())
    }

    /// A plain server with no grant in it.
    pub fn start_bare() -> Redis {
        Self::start_with(RedisOpts { bare: true, ..Default::default() })
    }

    /// [`start`](Self::start) with a password and/or TLS.
    pub fn start_with(opts: RedisOpts) -> Redis {
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let mut r = Redis { port, child: None, opts: opts.clone() };
            if r.try_start() {
                return r;
            }
        }
        panic!("redis-server did not start on any of 5 free ports");
    }

    /// The URL, without the password (`rediss://` with TLS).
    pub fn url(&self) -> String {
        let scheme = if self.opts.tls.is_some() { "rediss" } else { "redis" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// (Re)starts the server on the same port, empty.
    pub fn restart(&mut self) {
        for _ in 0..5 {
            if self.try_start() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("redis-server did not start on port {}", self.port);
    }

    /// Starts the server; false when it exited at once (its port was taken).
    fn try_start(&mut self) -> bool {
        let port = self.port.to_string();
        let mut args: Vec<String> =
            ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"].map(String::from).into();
        match &self.opts.tls {
            None => args.extend(["--port".into(), port]),
            Some(t) => {
                let p = |p: &PathBuf| p.to_str().unwrap().to_string();
                args.extend(["--port".into(), "0".into(), "--tls-port".into(), port]);
                args.extend(["--tls-cert-file".into(), p(&t.cert), "--tls-key-file".into(), p(&t.key)]);
                args.extend(["--tls-ca-cert-file".into(), p(&t.ca)]);
                args.extend(["--tls-auth-clients".into(), if t.auth_clients { "yes" } else { "no" }.into()]);
            }
        }
        if let Some(pw) = &self.opts.password {
            args.extend(["--requirepass".into(), pw.clone()]);
        }
        let mut child = Command::new("redis-server")
            .args(&args)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is installed (scripts/test installs it)");
        let t0 = Instant::now();
        while self.client().get_connection().and_then(|mut c| redis::cmd("PING").query::<String>(&mut c)).is_err() {
            if child.try_wait().ok().flatten().is_some() {
                return false;
            }
            assert!(t0.elapsed() < Duration::from_secs(10), "redis-server did not answer within 10 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child = Some(child);
        if !self.opts.bare && self.opts.password.is_none() && self.opts.tls.is_none() {
            self.put_open_grant();
        }
        true
    }

    /// Writes the `fleet` grant (every client, agent and service) for `demo`.
    pub fn put_open_grant(&self) {
        use ringpeer::route::store::StoreFactory;
        let g = ringpeer::tools::fleet::open_grant().grant().unwrap();
        let f = ringpeer::route::redis::RedisFactory::new(&self.url(), "demo", 10_000).unwrap();
        f.connect().unwrap().put_grant(&g).unwrap();
    }

    /// kill -9.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A client with the server's password and TLS files (test-only: the
    /// password rides in its connection info).
    pub fn client(&self) -> redis::Client {
        let mut info = redis::IntoConnectionInfo::into_connection_info(self.url()).unwrap();
        info.redis.password = self.opts.password.clone();
        let Some(t) = &self.opts.tls else { return redis::Client::open(info).unwrap() };
        let read = |p: &PathBuf| std::fs::read(p).unwrap();
        let client_tls = match (&t.client_cert, &t.client_key) {
            (Some(c), Some(k)) => Some(redis::ClientTlsConfig { client_cert: read(c), client_key: read(k) }),
            _ => None,
        };
        redis::Client::build_with_tls(info, redis::TlsCertificates { client_tls, root_cert: Some(read(&t.ca)) })
            .unwrap()
    }

    pub fn con(&self) -> redis::Connection {
        self.client().get_connection().unwrap()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A fresh directory for one set's files (replication RDBs, node configs).
pub(super) fn temp_dir(kind: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "ringpeer-{kind}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes `value` to `path`, mode 0600.
pub(super) fn write_secret(path: &std::path::Path, value: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, value).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path.to_path_buf()
}

pub(super) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A connection to the node on `port` with `password`, 1 s to connect.
pub(super) fn con(port: u16, password: &str) -> redis::RedisResult<redis::Connection> {
    client(port, Some(password)).get_connection_with_timeout(Duration::from_secs(1))
}

pub(super) fn store_at(port: u16, password: &str) -> Box<dyn ringpeer::route::store::RouteStore> {
    use ringpeer::route::store::StoreFactory;
    let url = format!("redis://:{password}@127.0.0.1:{port}");
    ringpeer::route::redis::RedisFactory::new(&url, "demo", 10_000).unwrap().connect().unwrap()
}

pub(super) fn kill_node(nodes: &mut [(u16, Option<Child>)], port: u16) {
    for (p, c) in nodes {
        if *p == port {
            if let Some(mut c) = c.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

pub(super) fn kill_all(nodes: &mut [(u16, Option<Child>)]) {
    for (_, c) in nodes {
        if let Some(mut c) = c.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub(super) fn client(port: u16, password: Option<&str>) -> redis::Client {
    let mut info = redis::IntoConnectionInfo::into_connection_info(format!("redis://127.0.0.1:{port}")).unwrap();
    info.redis.password = password.map(String::from);
    redis::Client::open(info).unwrap()
}

pub(super) fn ping(port: u16, password: Option<&str>) -> bool {
    client(port, password).get_connection().and_then(|mut c| redis::cmd("PING").query::<String>(&mut c)).is_ok()
}

pub(super) fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < Duration::from_secs(30), "{what}: not within 30 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Spawns `redis-server` with `args(port)` on a free port until `up(port)`;
/// another port when the process exits first (a parallel test took it).
pub(super) fn spawn_on_free_port(args: impl Fn(u16) -> Vec<String>, up: impl Fn(u16) -> bool) -> (u16, Child) {
    for _ in 0..5 {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut child = Command::new("redis-server")
            .args(args(port))
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is installed (scripts/test installs it)");
        let t0 = Instant::now();
        loop {
            if up(port) {
                return (port, child);
            }
            if child.try_wait().ok().flatten().is_some() {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(10), "redis-server did not answer within 10 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    panic!("redis-server did not start on any of 5 free ports");
}
