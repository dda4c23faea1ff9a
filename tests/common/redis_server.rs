//! A real `redis-server` on a free port, started, killed and restarted by
//! the tests.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Redis {
    pub port: u16,
    child: Option<Child>,
    /// Whether (re)starts write the open grant (see [`Redis::start`]).
    open_grant: bool,
}

impl Redis {
    /// A server on a free port. The port is free when picked but another
    /// process (a parallel test) may take it before redis-server binds it:
    /// then redis-server exits, and another port is tried.
    ///
    /// The server starts (and restarts) holding one grant for cluster
    /// `demo`, named `fleet`, that lets every client reach everything, as a
    /// control plane would have written: the proxies' default policy denies
    /// every dial no grant allows. Tests of grants use [`Redis::start_bare`].
    pub fn start() -> Redis {
        Self::start_with(true)
    }

    /// A server with no grant in it.
    pub fn start_bare() -> Redis {
        Self::start_with(false)
    }

    fn start_with(open_grant: bool) -> Redis {
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let mut r = Redis { port, child: None, open_grant };
            if r.try_start() {
                return r;
            }
        }
        panic!("redis-server did not start on any of 5 free ports");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
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
        let mut child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
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
        if self.open_grant {
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

    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).unwrap()
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
