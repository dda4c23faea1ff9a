//! Route propagation latency through Redis.
//!
//! `cargo bench --bench route_propagation [-- --json FILE]` starts a
//! `redis-server` on a free port and two control threads (proxy-a, proxy-b)
//! exactly as proxies run them. For each of 300 agents it reports a tunnel
//! up on B and measures the time until A's shards receive a snapshot with
//! the route (then the same for the tunnel going down): B's write, Redis,
//! A's XREAD, A's rebuild and publish. Prints p50/p99/max.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam::channel::Receiver;
use ringpeer::proxy::control::{Control, ControlOpts};
use ringpeer::route::feed::TunnelEvent;
use ringpeer::route::model::{ProxyInfo, Strategy};
use ringpeer::route::redis::RedisFactory;
use ringpeer::route::RouteTable;

type Tables = Receiver<Arc<RouteTable>>;

fn control(id: &str, url: &str) -> (Control, Tables) {
    let (tx, rx) = crossbeam::channel::unbounded();
    let opts = ControlOpts {
        me: ProxyInfo {
            id: id.into(),
            peer_addrs: vec!["127.0.0.1:1".into()],
            tunnel_addr: "t".into(),
            client_addr: "c".into(),
            version: 1,
            draining: false,
            build: String::new(),
        },
        ttl: Duration::from_secs(10),
        resync: Duration::from_secs(30),
        strategy: Strategy::AgentMesh,
    };
    let f = Arc::new(RedisFactory::new(url, "bench", 10_000).unwrap());
    let publish = Box::new(move |t| {
        let _ = tx.send(t);
    });
    (Control::spawn(opts, f, publish, Default::default()).unwrap(), rx)
}

fn wait_until(tables: &mut Tables, pred: impl Fn(&RouteTable) -> bool) {
    while let Ok(t) = tables.recv() {
        if pred(&t) {
            return;
        }
    }
}

fn main() {
    let json_out = std::env::args().skip_while(|a| a != "--json").nth(1);
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut redis = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server must be installed");
    let url = format!("redis://127.0.0.1:{port}");
    std::thread::sleep(Duration::from_millis(300));
    let (a, mut a_in) = control("proxy-a", &url);
    let (b, _b_in) = control("proxy-b", &url);
    wait_until(&mut a_in, |t| t.proxies.contains_key("proxy-b"));
    let mut up = hdrhistogram::Histogram::<u64>::new(3).unwrap();
    let mut down = hdrhistogram::Histogram::<u64>::new(3).unwrap();
    for i in 0..300u64 {
        let agent = format!("agent-{i}");
        let t0 = Instant::now();
        b.events
            .send(TunnelEvent::TunnelUp {
                agent: agent.clone(),
                shard: 1,
                conn: i,
                services: vec!["ssh".to_string()].into(),
            })
            .unwrap();
        wait_until(&mut a_in, |t| t.get(&agent).is_some_and(|r| r.remote.iter().any(|x| &*x.proxy == "proxy-b")));
        up.record(t0.elapsed().as_micros() as u64).ok();
        let t0 = Instant::now();
        b.events.send(TunnelEvent::TunnelDown { agent: agent.clone(), conn: i }).unwrap();
        wait_until(&mut a_in, |t| t.get(&agent).is_none());
        down.record(t0.elapsed().as_micros() as u64).ok();
    }
    let ms = |h: &hdrhistogram::Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "route up on B -> visible on A:   p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
        ms(&up, 0.5),
        ms(&up, 0.99),
        up.max() as f64 / 1000.0
    );
    println!(
        "route down on B -> gone on A:    p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
        ms(&down, 0.5),
        ms(&down, 0.99),
        down.max() as f64 / 1000.0
    );
    if let Some(p) = json_out {
        let j = serde_json::json!({
            "samples": 300,
            "up_ms": {"p50": ms(&up, 0.5), "p99": ms(&up, 0.99), "max": up.max() as f64 / 1000.0},
            "down_ms": {"p50": ms(&down, 0.5), "p99": ms(&down, 0.99), "max": down.max() as f64 / 1000.0},
        });
        std::fs::write(p, serde_json::to_string_pretty(&j).unwrap()).unwrap();
    }
    a.stop();
    b.stop();
    let _ = redis.kill();
    let _ = redis.wait();
}
