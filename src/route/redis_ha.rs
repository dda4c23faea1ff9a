//! Redis high availability: which node is the one to write to. Three URL
//! forms (documented in the README's "Redis high availability"):
//! - `redis[s]://[[user]:pass@]host:port[/db]`: one server.
//! - `redis[s]+sentinel://[[user]:pass@]s1[:26379][,s2[:26379]...]/<master>[/db]`:
//!   the sentinels name the master of `<master>`.
//! - `redis[s]+cluster://[[user]:pass@]n1[:6379][,n2[:6379]...]`: Redis
//!   Cluster; the node that masters the slot of the cluster's hash tag.
//!
//! Invariants:
//! - Discovery uses the same deadlines as every other connection
//!   (`CONNECT_TIMEOUT`, `IO_TIMEOUT`): a sentinel or seed that accepts TCP
//!   and stalls costs at most those, then the next one is asked.
//! - A node is used only once it answers `ROLE` with `master`: a sentinel
//!   that has not yet seen a failover finish, or a stale slot map, makes the
//!   connect fail (the caller backs off and asks again), never a write to a
//!   replica.
//! - Sentinel: every sentinel is asked and the answer with the highest
//!   config epoch wins, never one older than an epoch already followed, so
//!   a sentinel that has not yet heard of a failover cannot send a proxy
//!   back to the old master while that one still believes it is master.
//! - Every ringpeer key of one cluster shares the hash tag `{<cluster>}`,
//!   hence one slot, hence one master: MULTI/EXEC, `SCAN`, `XREAD` and the
//!   repair script run unchanged on a plain connection to that node.
//! - The user-info of the URL authenticates the data nodes; sentinels get
//!   their own password (`sentinel_password_file` or
//!   [`SENTINEL_PASSWORD_ENV`]), since a sentinel's `requirepass` is
//!   separate from the master's. Neither is ever part of a printed string.
//!
//! Rejected alternatives: redis-rs's `sentinel` feature opens its sentinel
//! and ROLE-check connections with `get_connection()` (no connect or read
//! deadline, and its own AUTH before any timeout), so one stalled sentinel
//! would hang the control thread. redis-rs's `cluster` feature routes
//! keyless commands (`SCAN`, and `XINFO` by its first argument) to a random
//! node and would add a second connection type to every store call; since
//! all our keys live in one slot, talking to that slot's master directly is
//! simpler and keeps every deadline ours.

use anyhow::{bail, Context};
use redis::{ConnectionAddr, Value};

use super::redis_conn::RedisFactory;

/// The sentinels' password, when no `sentinel_password_file` is configured.
pub const SENTINEL_PASSWORD_ENV: &str = "RINGPEER_REDIS_SENTINEL_PASSWORD";

/// Default ports of the HA forms.
const SENTINEL_PORT: u16 = 26379;
const CLUSTER_PORT: u16 = 6379;

/// Where the master is found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Topology {
    /// The URL's one host.
    Single,
    /// Ask these sentinels for the master named `master`.
    Sentinel { sentinels: Vec<(String, u16)>, master: String },
    /// Ask these seed nodes which node masters our slot.
    Cluster { seeds: Vec<(String, u16)> },
}

impl Topology {
    /// Short name for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Topology::Single => "single",
            Topology::Sentinel { .. } => "sentinel",
            Topology::Cluster { .. } => "cluster",
        }
    }
}

/// Splits `url` into its topology and a one-node URL (its first host) that
/// redis-rs parses for the rest (user-info, database, `?protocol=`).
/// `shown` is the redacted URL, for errors.
pub fn split_url(url: &str, shown: &str) -> anyhow::Result<(Topology, String)> {
    let Some((scheme, rest)) = url.split_once("://") else { return Ok((Topology::Single, url.to_string())) };
    let (base, sentinel) = match scheme {
        "redis+sentinel" => ("redis", true),
        "rediss+sentinel" => ("rediss", true),
        "redis+cluster" => ("redis", false),
        "rediss+cluster" => ("rediss", false),
        _ => return Ok((Topology::Single, url.to_string())),
    };
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let (userinfo, rest) = match rest.rfind('@') {
        Some(at) => (Some(&rest[..at]), &rest[at + 1..]),
        None => (None, rest),
    };
    let (hosts, path) = rest.split_once('/').unwrap_or((rest, ""));
    let default_port = if sentinel { SENTINEL_PORT } else { CLUSTER_PORT };
    let nodes: Vec<(String, u16)> = hosts
        .split(',')
        .map(|h| host_port(h, default_port).with_context(|| format!("invalid redis url {shown:?}")))
        .collect::<anyhow::Result<_>>()?;
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let (topology, db) = if sentinel {
        let Some(master) = segs.first() else {
            bail!("invalid redis url {shown:?}: name the master after the sentinels: {scheme}://host:26379,host:26379/<master-name>[/db]")
        };
        if segs.len() > 2 {
            bail!("invalid redis url {shown:?}: the path is /<master-name>[/db]");
        }
        (Topology::Sentinel { sentinels: nodes.clone(), master: master.to_string() }, segs.get(1).copied())
    } else {
        if segs.iter().any(|s| *s != "0") {
            bail!("invalid redis url {shown:?}: Redis Cluster has only database 0");
        }
        (Topology::Cluster { seeds: nodes.clone() }, None)
    };
    if let Some(db) = db {
        db.parse::<i64>()
            .map_err(|_| anyhow::anyhow!("invalid redis url {shown:?}: database {db:?} is not a number"))?;
    }
    let (h, p) = &nodes[0];
    let host = if h.contains(':') { format!("[{h}]") } else { h.clone() };
    let one = format!(
        "{base}://{}{host}:{p}/{}{}",
        userinfo.map(|u| format!("{u}@")).unwrap_or_default(),
        db.unwrap_or("0"),
        query.map(|q| format!("?{q}")).unwrap_or_default()
    );
    Ok((topology, one))
}

/// `host[:port]` or `[v6][:port]`.
fn host_port(s: &str, default: u16) -> anyhow::Result<(String, u16)> {
    let (host, port) = if let Some(v6) = s.strip_prefix('[') {
        let (h, tail) = v6.split_once(']').context("unclosed [ in an IPv6 host")?;
        (h, tail.strip_prefix(':'))
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    if host.is_empty() {
        bail!("empty host in the host list");
    }
    let port = match port {
        Some(p) => p.parse().map_err(|_| anyhow::anyhow!("port {p:?} of host {host} is not a number"))?,
        None => default,
    };
    Ok((host.to_string(), port))
}

/// `ConnectionAddr` for `host:port`, TLS like `like`.
pub(super) fn addr_like(like: &ConnectionAddr, host: &str, port: u16) -> ConnectionAddr {
    match like {
        ConnectionAddr::TcpTls { insecure, .. } => {
            ConnectionAddr::TcpTls { host: host.to_string(), port, insecure: *insecure, tls_params: None }
        }
        _ => ConnectionAddr::Tcp(host.to_string(), port),
    }
}

impl RedisFactory {
    /// The master's connection and address, from the topology; every node
    /// asked and every answer that was not a usable master is named in the
    /// error.
    pub(super) fn discover(&self) -> anyhow::Result<(redis::Connection, String)> {
        match &self.opts.topology {
            Topology::Single => unreachable!("a single server needs no discovery"),
            Topology::Sentinel { sentinels, master } => self.ask_sentinels(sentinels, master),
            Topology::Cluster { seeds } => self.ask_seeds(seeds),
        }
    }

    /// Asks every sentinel (`SENTINEL MASTER`) and takes the address with
    /// the highest config epoch, never one older than an epoch already
    /// used. Right after a failover only the leader sentinel knows the new
    /// master, and the old one still answers ROLE master until it is
    /// demoted: the first answer alone would split the proxies' writes
    /// between two masters (seen in the failover test).
    fn ask_sentinels(&self, sentinels: &[(String, u16)], name: &str) -> anyhow::Result<(redis::Connection, String)> {
        let mut why = Vec::new();
        let mut answers: Vec<(u64, String, u16)> = Vec::new();
        for (h, p) in sentinels {
            match self.sentinel_master(h, *p, name) {
                Ok(a) => answers.push(a),
                Err(e) => why.push(format!("{h}:{p}: {e:#}")),
            }
        }
        answers.sort_by_key(|a| std::cmp::Reverse(a.0));
        let used = self.epoch.load(std::sync::atomic::Ordering::Acquire);
        for (epoch, mh, mp) in answers {
            if epoch < used {
                why.push(format!("{mh}:{mp}: config epoch {epoch} is older than {used}, already followed"));
                continue;
            }
            match self.verify_master(&mh, mp) {
                Ok(con) => {
                    self.epoch.fetch_max(epoch, std::sync::atomic::Ordering::AcqRel);
                    return Ok((con, format!("{mh}:{mp}")));
                }
                Err(e) => why.push(format!("{mh}:{mp} (epoch {epoch}): {e:#}")),
            }
        }
        bail!("redis {}: no master found: {}", self.opts.shown(), why.join("; "))
    }

    /// One sentinel's view of master `name`: (config epoch, host, port).
    pub(super) fn sentinel_master(&self, host: &str, port: u16, name: &str) -> anyhow::Result<(u64, String, u16)> {
        let mut con = self.sentinel_con(host, port)?;
        let m: std::collections::HashMap<String, String> =
            redis::cmd("SENTINEL").arg("MASTER").arg(name).query(&mut con)?;
        let field = |k: &str| m.get(k).cloned().with_context(|| format!("SENTINEL MASTER has no {k}"));
        Ok((field("config-epoch")?.parse()?, field("ip")?, field("port")?.parse()?))
    }

    /// Asks the seeds in turn which node masters our slot.
    fn ask_seeds(&self, seeds: &[(String, u16)]) -> anyhow::Result<(redis::Connection, String)> {
        let mut why = Vec::new();
        // Start where the last discovery succeeded: a dead first seed
        // costs its connect deadline once, not at every reconnect.
        let start = self.last_good.load(std::sync::atomic::Ordering::Relaxed) % seeds.len();
        for i in (0..seeds.len()).map(|k| (start + k) % seeds.len()) {
            let (h, p) = &seeds[i];
            match self.ask(h, *p).and_then(|(mh, mp)| self.verify_master(&mh, mp).map(|c| (c, format!("{mh}:{mp}")))) {
                Ok(found) => {
                    self.last_good.store(i, std::sync::atomic::Ordering::Relaxed);
                    return Ok(found);
                }
                Err(e) => why.push(format!("{h}:{p}: {e:#}")),
            }
        }
        bail!("redis {}: no master found: {}", self.opts.shown(), why.join("; "))
    }

    /// Asks one seed which node masters our slot.
    fn ask(&self, host: &str, port: u16) -> anyhow::Result<(String, u16)> {
        let mut con = self.node_con(host, port)?;
        let key = format!("ringpeer:{{{}}}:events", self.cluster);
        let slot: i64 = redis::cmd("CLUSTER").arg("KEYSLOT").arg(&key).query(&mut con)?;
        let slots: Value = redis::cmd("CLUSTER").arg("SLOTS").query(&mut con)?;
        slot_master(slots, slot, host).with_context(|| format!("no node serves slot {slot} (cluster down?)"))
    }

    /// A connection to `host:port`, once it answers ROLE as a master.
    fn verify_master(&self, host: &str, port: u16) -> anyhow::Result<redis::Connection> {
        let mut con = self.node_con(host, port).with_context(|| format!("master {host}:{port}"))?;
        let role: Vec<Value> = redis::cmd("ROLE").query(&mut con)?;
        let role: String = role.first().and_then(|v| redis::from_redis_value(v).ok()).unwrap_or_default();
        if role != "master" {
            bail!("{host}:{port} answers ROLE {role:?}, not master (a failover in progress?)");
        }
        Ok(con)
    }
}

/// The master (host, port) of `slot` in a `CLUSTER SLOTS` reply; an empty
/// host means the node that answered (`asked`).
fn slot_master(slots: Value, slot: i64, asked: &str) -> Option<(String, u16)> {
    let Value::Array(ranges) = slots else { return None };
    for r in ranges {
        let Value::Array(r) = r else { continue };
        let (Some(lo), Some(hi), Some(Value::Array(node))) = (r.first(), r.get(1), r.get(2)) else { continue };
        let (lo, hi): (i64, i64) = (redis::from_redis_value(lo).ok()?, redis::from_redis_value(hi).ok()?);
        if (lo..=hi).contains(&slot) {
            let host: String = node.first().and_then(|v| redis::from_redis_value(v).ok())?;
            let port: u16 = node.get(1).and_then(|v| redis::from_redis_value(v).ok())?;
            let host = if host.is_empty() || host == "?" { asked.to_string() } else { host };
            return Some((host, port));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(v: &[(&str, u16)]) -> Vec<(String, u16)> {
        v.iter().map(|(h, p)| (h.to_string(), *p)).collect()
    }

    #[test]
    fn sentinel_urls_name_the_sentinels_the_master_and_the_database() {
        let u = "redis+sentinel://:pw@s1,s2:26380,[::1]/mymaster/3?protocol=resp3";
        let (t, one) = split_url(u, "shown").unwrap();
        assert_eq!(
            t,
            Topology::Sentinel {
                sentinels: hosts(&[("s1", 26379), ("s2", 26380), ("::1", 26379)]),
                master: "mymaster".into()
            }
        );
        assert_eq!(one, "redis://:pw@s1:26379/3?protocol=resp3");
        let (_, one) = split_url("rediss+sentinel://s1/m", "x").unwrap();
        assert_eq!(one, "rediss://s1:26379/0");
        for bad in [
            "redis+sentinel://s1:26379",
            "redis+sentinel://s1/m/x",
            "redis+sentinel://s1:p/m",
            "redis+sentinel://,s1/m",
        ] {
            assert!(split_url(bad, "shown-url").unwrap_err().to_string().contains("shown-url"), "{bad}");
        }
    }

    #[test]
    fn cluster_urls_name_the_seeds_and_only_database_0() {
        let (t, one) = split_url("redis+cluster://app:pw@n1:7000,n2", "x").unwrap();
        assert_eq!(t, Topology::Cluster { seeds: hosts(&[("n1", 7000), ("n2", 6379)]) });
        assert_eq!(one, "redis://app:pw@n1:7000/0");
        assert!(split_url("redis+cluster://n1/2", "x").unwrap_err().to_string().contains("only database 0"));
        assert_eq!(split_url("redis://h:1/2", "x").unwrap(), (Topology::Single, "redis://h:1/2".into()));
    }

    #[test]
    fn the_slot_master_is_found_in_a_cluster_slots_reply() {
        let node = |h: &str, p: i64| Value::Array(vec![Value::BulkString(h.into()), Value::Int(p)]);
        let range = |lo, hi, h, p| Value::Array(vec![Value::Int(lo), Value::Int(hi), node(h, p), node("r", 1)]);
        let reply = Value::Array(vec![range(0, 5460, "a", 7000), range(5461, 10922, "", 7001)]);
        assert_eq!(slot_master(reply.clone(), 17, "seed"), Some(("a".into(), 7000)));
        assert_eq!(slot_master(reply.clone(), 6000, "seed"), Some(("seed".into(), 7001)));
        assert_eq!(slot_master(reply, 16000, "seed"), None);
    }
}
