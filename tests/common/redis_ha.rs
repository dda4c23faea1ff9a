//! The two high-availability Redis setups, behind one trait ([`HaSet`]):
//! a Sentinel-managed master and replica ([`SentinelSet`]), and a Redis
//! Cluster of three masters and a replica ([`ClusterSet`]). Every node is a
//! real `redis-server` on a free port, with a password.

use std::path::PathBuf;
use std::process::Child;

use super::redis_server::{
    con, free_port, kill_all, kill_node, ping, spawn_on_free_port, store_at, temp_dir, wait_for, write_secret,
};

/// A high-availability Redis setup whose master (of cluster `demo`'s keys)
/// can be failed over or killed.
pub trait HaSet {
    /// The `[backend]` lines of a proxy config (URL and password files).
    fn backend(&self) -> String;
    /// The port of the node that is master of cluster `demo`'s keys.
    fn master_port(&self) -> u16;
    /// A coordinated failover: the replica is promoted, the master demoted.
    fn failover(&self);
    /// The data nodes' password.
    fn data_password(&self) -> &'static str;
    /// The data nodes: port, and process until killed.
    fn nodes(&mut self) -> &mut [(u16, Option<Child>)];

    /// A connection to the data node on `port`, authenticated.
    fn data_con(&self, port: u16) -> redis::RedisResult<redis::Connection> {
        con(port, self.data_password())
    }
    /// `ROLE` of the data node on `port` ("master", "slave"), or "" when down.
    fn role(&self, port: u16) -> String {
        let Ok(mut c) = self.data_con(port) else { return String::new() };
        let r: Vec<redis::Value> = redis::cmd("ROLE").query(&mut c).unwrap_or_default();
        r.first().and_then(|v| redis::from_redis_value(v).ok()).unwrap_or_default()
    }
    /// kill -9 of the data node on `port`.
    fn kill_node(&mut self, port: u16) {
        kill_node(self.nodes(), port)
    }
    /// The route store on the data node on `port` (plain URL, password in
    /// it: test-only).
    fn store_at(&self, port: u16) -> Box<dyn ringpeer::route::store::RouteStore> {
        store_at(port, self.data_password())
    }
}

/// A Sentinel-managed pair: a master, one replica (`--replicaof`) and three
/// sentinels (quorum 2, down after 1 s), all on free ports, every one with
/// a password: `data_password` on the data nodes (the replica and the
/// sentinels use it as `masterauth` / `auth-pass`), `sentinel_password` on
/// the sentinels (`requirepass`, and `sentinel-pass` between them).
pub struct SentinelSet {
    pub name: &'static str,
    pub data_password: &'static str,
    pub sentinel_password: &'static str,
    /// Data node ports and processes (index 0 started as master).
    nodes: Vec<(u16, Option<Child>)>,
    sentinels: Vec<(u16, Child)>,
    dir: PathBuf,
}

impl SentinelSet {
    /// Starts it and waits until every sentinel knows the replica and the
    /// two other sentinels (else a failover cannot be elected), and writes
    /// the open grant for cluster `demo` (see [`Redis::start`]).
    pub fn start() -> SentinelSet {
        let dir = temp_dir("sentinels");
        let mut s = SentinelSet {
            name: "ringpeer-main",
            data_password: "data-secret-d4t4",
            sentinel_password: "sentinel-secret-s3nt",
            nodes: Vec::new(),
            sentinels: Vec::new(),
            dir,
        };
        let pw = s.data_password;
        // Replication writes an RDB file for a full sync: into the set's
        // own directory, not the test's working directory.
        let dir = s.dir.to_str().unwrap().to_string();
        let base = |port: u16| -> Vec<String> {
            let p = port.to_string();
            [
                "--dir",
                &dir,
                "--port",
                &p,
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--requirepass",
                pw,
                "--masterauth",
                pw,
            ]
            .map(String::from)
            .into()
        };
        let (m, child) = spawn_on_free_port(base, |port| ping(port, Some(pw)));
        s.nodes.push((m, Some(child)));
        let (r, child) = spawn_on_free_port(
            |port| {
                let mut a = base(port);
                a.extend(["--replicaof".into(), "127.0.0.1".into(), m.to_string()]);
                a
            },
            |port| ping(port, Some(pw)),
        );
        s.nodes.push((r, Some(child)));
        wait_for("the replica in sync", || {
            let Ok(mut c) = s.data_con(m) else { return false };
            let info: String = redis::cmd("INFO").arg("replication").query(&mut c).unwrap_or_default();
            info.contains("state=online")
        });
        for _ in 0..3 {
            let dir = s.dir.clone();
            let (name, spw) = (s.name, s.sentinel_password);
            let (port, child) = spawn_on_free_port(
                |port| {
                    let conf = dir.join(format!("sentinel-{port}.conf"));
                    std::fs::write(
                        &conf,
                        format!(
                            "port {port}\nbind 127.0.0.1\nrequirepass {spw}\nsentinel sentinel-pass {spw}\n\
                             sentinel monitor {name} 127.0.0.1 {m} 2\nsentinel auth-pass {name} {pw}\n\
                             sentinel down-after-milliseconds {name} 1000\nsentinel failover-timeout {name} 6000\n\
                             sentinel parallel-syncs {name} 1\n"
                        ),
                    )
                    .unwrap();
                    vec![conf.to_str().unwrap().to_string(), "--sentinel".into()]
                },
                |port| ping(port, Some(spw)),
            );
            s.sentinels.push((port, child));
        }
        wait_for("every sentinel knows the replica and two peers", || {
            s.sentinels.iter().all(|(p, _)| {
                let Ok(mut c) = s.sentinel_con(*p) else { return false };
                let replicas: Vec<redis::Value> =
                    redis::cmd("SENTINEL").arg("REPLICAS").arg(s.name).query(&mut c).unwrap_or_default();
                let peers: Vec<redis::Value> =
                    redis::cmd("SENTINEL").arg("SENTINELS").arg(s.name).query(&mut c).unwrap_or_default();
                replicas.len() == 1 && peers.len() == 2
            })
        });
        s.put_open_grant();
        s
    }

    /// The backend URL (no password: the proxies read it from files).
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self.sentinels.iter().map(|(p, _)| format!("127.0.0.1:{p}")).collect();
        format!("redis+sentinel://{}/{}", hosts.join(","), self.name)
    }

    /// The master's port as the first sentinel that answers sees it.
    pub fn master_port(&self) -> u16 {
        for (p, _) in &self.sentinels {
            let Ok(mut c) = self.sentinel_con(*p) else { continue };
            let got: redis::RedisResult<(String, u16)> =
                redis::cmd("SENTINEL").arg("GET-MASTER-ADDR-BY-NAME").arg(self.name).query(&mut c);
            if let Ok((_, port)) = got {
                return port;
            }
        }
        panic!("no sentinel answers")
    }

    /// `SENTINEL FAILOVER`: promotes the replica without agreement.
    pub fn failover(&self) {
        let mut c = self.sentinel_con(self.sentinels[0].0).unwrap();
        redis::cmd("SENTINEL").arg("FAILOVER").arg(self.name).query::<()>(&mut c).unwrap();
    }

    fn sentinel_con(&self, port: u16) -> redis::RedisResult<redis::Connection> {
        con(port, self.sentinel_password)
    }

    /// Writes the `fleet` grant for `demo` on the master.
    fn put_open_grant(&self) {
        let g = ringpeer::tools::fleet::open_grant().grant().unwrap();
        store_at(self.master_port(), self.data_password).put_grant(&g).unwrap();
    }

    /// Writes the two password files; returns (data, sentinel) paths.
    pub fn password_files(&self) -> (PathBuf, PathBuf) {
        (
            write_secret(&self.dir.join("data.pass"), self.data_password),
            write_secret(&self.dir.join("sentinel.pass"), self.sentinel_password),
        )
    }
}

impl HaSet for SentinelSet {
    fn backend(&self) -> String {
        let (data_pw, sentinel_pw) = self.password_files();
        format!(
            "url = \"{}\"\npassword_file = \"{}\"\nsentinel_password_file = \"{}\"",
            self.url(),
            data_pw.display(),
            sentinel_pw.display()
        )
    }
    fn master_port(&self) -> u16 {
        SentinelSet::master_port(self)
    }
    fn failover(&self) {
        SentinelSet::failover(self)
    }
    fn data_password(&self) -> &'static str {
        self.data_password
    }
    fn nodes(&mut self) -> &mut [(u16, Option<Child>)] {
        &mut self.nodes
    }
}

impl Drop for SentinelSet {
    fn drop(&mut self) {
        for (_, c) in &mut self.sentinels {
            let _ = c.kill();
            let _ = c.wait();
        }
        kill_all(&mut self.nodes);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis Cluster: three masters splitting the 16384 slots, and one
/// replica of the master that serves cluster `demo`'s hash tag, all with
/// `data_password` (`requirepass`, `masterauth`), node timeout 1 s, each
/// with its own bus port (so no port + 10000 has to be free).
pub struct ClusterSet {
    pub data_password: &'static str,
    /// Data node ports and processes: three masters, then the replica.
    nodes: Vec<(u16, Option<Child>)>,
    /// Index in `nodes` of the master that first served `demo`'s slot.
    owner: usize,
    dir: PathBuf,
}

impl ClusterSet {
    /// Starts it, assigns the slots, joins the nodes, makes the fourth node
    /// a replica of the master of `demo`'s slot, waits until every node
    /// agrees (cluster state ok, the replica known as such everywhere, else
    /// a failover cannot be authorized), and writes the open grant.
    pub fn start() -> ClusterSet {
        let dir = temp_dir("cluster");
        let pw = "cluster-secret-c1u5";
        let mut s = ClusterSet { data_password: pw, nodes: Vec::new(), owner: 0, dir };
        let dir = s.dir.to_str().unwrap().to_string();
        let mut bus = Vec::new();
        for _ in 0..4 {
            let bus_port = std::cell::Cell::new(0);
            let (port, child) = spawn_on_free_port(
                |port| {
                    bus_port.set(free_port());
                    let (p, b) = (port.to_string(), bus_port.get().to_string());
                    let conf = format!("{dir}/nodes-{port}.conf");
                    #[rustfmt::skip]
                    let args = [
                        "--dir", &dir, "--port", &p, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                        "--requirepass", pw, "--masterauth", pw, "--cluster-enabled", "yes",
                        "--cluster-config-file", &conf, "--cluster-port", &b, "--cluster-node-timeout", "1000",
                        // A replica whose link to a killed master is only
                        // seconds old may always stand for election.
                        "--cluster-replica-validity-factor", "0",
                    ];
                    args.map(String::from).into()
                },
                |port| ping(port, Some(pw)),
            );
            s.nodes.push((port, Some(child)));
            bus.push(bus_port.get());
        }
        let ports: Vec<u16> = s.nodes.iter().map(|(p, _)| *p).collect();
        let cmd = |port: u16, args: &[&str]| -> redis::Value {
            let mut c = con(port, pw).unwrap();
            let mut cmd = redis::cmd(args[0]);
            for a in &args[1..] {
                cmd.arg(*a);
            }
            cmd.query(&mut c).unwrap_or_else(|e| panic!("{args:?} on {port}: {e}"))
        };
        const RANGES: [(u16, u16); 3] = [(0, 5460), (5461, 10922), (10923, 16383)];
        for (i, (lo, hi)) in RANGES.iter().enumerate() {
            cmd(ports[i], &["CLUSTER", "ADDSLOTSRANGE", &lo.to_string(), &hi.to_string()]);
        }
        for i in 1..4 {
            cmd(ports[0], &["CLUSTER", "MEET", "127.0.0.1", &ports[i].to_string(), &bus[i].to_string()]);
        }
        let slot: u16 =
            redis::from_redis_value(&cmd(ports[0], &["CLUSTER", "KEYSLOT", "ringpeer:{demo}:events"])).unwrap();
        let owner = RANGES.iter().position(|(lo, hi)| (*lo..=*hi).contains(&slot)).unwrap();
        let owner_id: String = redis::from_redis_value(&cmd(ports[owner], &["CLUSTER", "MYID"])).unwrap();
        wait_for("the replica knows the master of demo's slot", || {
            let nodes: String = redis::from_redis_value(&cmd(ports[3], &["CLUSTER", "NODES"])).unwrap();
            nodes.contains(&owner_id)
        });
        cmd(ports[3], &["CLUSTER", "REPLICATE", &owner_id]);
        let replica_id: String = redis::from_redis_value(&cmd(ports[3], &["CLUSTER", "MYID"])).unwrap();
        wait_for("every node sees the cluster ok and the replica in sync", || {
            ports.iter().all(|p| {
                let Ok(mut c) = s.data_con(*p) else { return false };
                let info: String = redis::cmd("CLUSTER").arg("INFO").query(&mut c).unwrap_or_default();
                let nodes: String = redis::cmd("CLUSTER").arg("NODES").query(&mut c).unwrap_or_default();
                let replica = nodes.lines().find(|l| l.starts_with(&replica_id)).unwrap_or_default();
                info.contains("cluster_state:ok")
                    && info.contains("cluster_known_nodes:4")
                    && replica.contains("slave")
                    && replica.contains(&owner_id)
            }) && {
                let mut c = s.data_con(ports[3]).unwrap();
                let info: String = redis::cmd("INFO").arg("replication").query(&mut c).unwrap_or_default();
                info.contains("master_link_status:up")
            }
        });
        store_at(ports[owner], pw).put_grant(&ringpeer::tools::fleet::open_grant().grant().unwrap()).unwrap();
        s.owner = owner;
        s
    }

    /// The backend URL: every node as a seed, the masters that do not
    /// serve `demo`'s slot first, so discovery goes through `CLUSTER SLOTS`.
    pub fn url(&self) -> String {
        let mut order: Vec<usize> = (0..3).filter(|i| *i != self.owner).collect();
        order.extend([self.owner, 3]);
        let hosts: Vec<String> = order.iter().map(|i| format!("127.0.0.1:{}", self.nodes[*i].0)).collect();
        format!("redis+cluster://{}", hosts.join(","))
    }

    /// The port of the master that first served `demo`'s slot, and of its
    /// replica.
    pub fn owner_and_replica(&self) -> (u16, u16) {
        (self.nodes[self.owner].0, self.nodes[3].0)
    }

    /// Writes the password file.
    pub fn password_file(&self) -> PathBuf {
        write_secret(&self.dir.join("data.pass"), self.data_password)
    }
}

impl HaSet for ClusterSet {
    fn backend(&self) -> String {
        format!("url = \"{}\"\npassword_file = \"{}\"", self.url(), self.password_file().display())
    }

    /// As the first live node that answers `CLUSTER SLOTS` sees it.
    fn master_port(&self) -> u16 {
        for (p, c) in &self.nodes {
            let Some(_) = c else { continue };
            let Ok(mut c) = self.data_con(*p) else { continue };
            let Ok(slot) = redis::cmd("CLUSTER").arg("KEYSLOT").arg("ringpeer:{demo}:events").query::<u16>(&mut c)
            else {
                continue;
            };
            let Ok(redis::Value::Array(ranges)) = redis::cmd("CLUSTER").arg("SLOTS").query::<redis::Value>(&mut c)
            else {
                continue;
            };
            // Each range: [first, last, [master ip, port, id, …], replicas…].
            for r in ranges {
                let redis::Value::Array(r) = r else { continue };
                let num = |v: Option<&redis::Value>| v.and_then(|v| redis::from_redis_value::<u16>(v).ok());
                let (Some(lo), Some(hi)) = (num(r.first()), num(r.get(1))) else { continue };
                let Some(redis::Value::Array(master)) = r.get(2) else { continue };
                if (lo..=hi).contains(&slot) {
                    if let Some(port) = num(master.get(1)) {
                        return port;
                    }
                }
            }
        }
        panic!("no cluster node answers")
    }

    /// `CLUSTER FAILOVER` on the replica.
    fn failover(&self) {
        let mut c = self.data_con(self.nodes[3].0).unwrap();
        redis::cmd("CLUSTER").arg("FAILOVER").query::<()>(&mut c).unwrap();
    }

    fn data_password(&self) -> &'static str {
        self.data_password
    }

    fn nodes(&mut self) -> &mut [(u16, Option<Child>)] {
        &mut self.nodes
    }
}

impl Drop for ClusterSet {
    fn drop(&mut self) {
        kill_all(&mut self.nodes);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
