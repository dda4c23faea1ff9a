//! The Redis route store (production backend). Schema, under the prefix
//! `ringpeer:{<cluster>}:` (a Redis Cluster hash tag):
//! `proxy:<id>` (string with TTL, ProxyRecord), `agent:<id>` (hash: field =
//! proxy id, value = AgentRoute), `strategy` (TunnelStrategy), `events`
//! (stream, field `e` = RouteEvent, trimmed with `MAXLEN ~`), `grant:<name>`
//! (string, Grant).
//!
//! Connections (URL, credentials, TLS, timeouts) are opened by
//! [`RedisFactory`] in `redis_conn.rs`.
//!
//! Invariants: every connection has connect, read and write timeouts, so the
//! control thread never hangs on a dead server; a value change and its event
//! go out in one MULTI/EXEC; trimming past a reader's cursor is detected from
//! `XINFO STREAM` (oldest surviving entry, last generated id, and
//! `max-deleted-entry-id` where Redis has it).
//! - Bad data never stops sync. A key of the wrong type or an undecodable
//!   value is skipped (and reported once by the control thread). An `events`
//!   key that is not a stream would break every write and read, so it is
//!   renamed aside to `events:bad:<ms>` (kept for inspection, one log line)
//!   and a fresh stream starts; readers then resync from a full load.

use std::time::{Duration, Instant};

use redis::{Commands, Connection, Value};

use super::grants::Grant;
use super::model::{AgentRoute, Event, ProxyInfo, Strategy};
use super::store::{Loaded, Read, RouteStore, StreamId};

pub use super::redis_conn::{RedisFactory, CONNECT_TIMEOUT, IO_TIMEOUT};

/// One Redis connection speaking the route schema.
pub struct RedisStore {
    con: Connection,
    prefix: String,
    maxlen: usize,
    /// HA topologies: when the reader next checks that its node is still
    /// the master (a demoted node keeps serving reads; see `read`).
    role_due: Option<Instant>,
}

/// How often an HA reader checks ROLE between blocking reads.
pub const ROLE_CHECK: Duration = Duration::from_secs(1);

impl RedisStore {
    /// The store of `cluster` over `con` (opened by [`RedisFactory`]:
    /// timed, authenticated); events are trimmed to about `maxlen`.
    pub(super) fn new(con: Connection, cluster: &str, maxlen: usize) -> RedisStore {
        RedisStore { con, prefix: format!("ringpeer:{{{cluster}}}:"), maxlen, role_due: None }
    }

    /// This store checks, every [`ROLE_CHECK`] while reading, that its node
    /// is still the master, and fails the read when it is not, so the
    /// reader rediscovers the master and resyncs.
    pub(super) fn checking_role(mut self) -> RedisStore {
        self.role_due = Some(Instant::now() + ROLE_CHECK);
        self
    }
}

/// Whether a Redis error is about the data (wrong type, bad reply), as
/// opposed to the connection: data errors skip a key, connection errors end
/// the operation (and the control thread reconnects).
/// The node refusing because it is not (or no longer) the master of our
/// slot (READONLY, MOVED, ASK, TRYAGAIN, CLUSTERDOWN, MASTERDOWN, LOADING)
/// counts as a connection error: the fix is another node, not a repair.
fn data_error(e: &redis::RedisError) -> bool {
    use redis::ErrorKind as K;
    let wrong_node = matches!(
        e.kind(),
        K::ReadOnly | K::Moved | K::Ask | K::TryAgain | K::ClusterDown | K::MasterDown | K::BusyLoadingError
    );
    !(wrong_node || e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal())
}

impl RedisStore {
    /// Renames `key` aside when it exists with another type than `want`;
    /// true when it did. Check and rename are one script, so two proxies
    /// repairing at once cannot rename aside the fresh key the first one
    /// already wrote (both keys share the cluster hash tag).
    fn repair(&mut self, key: &str, want: &str) -> anyhow::Result<bool> {
        const SCRIPT: &str = "local t = redis.call('TYPE', KEYS[1]).ok \
            if t == ARGV[1] or t == 'none' then return '' end \
            redis.call('RENAME', KEYS[1], KEYS[2]) return t";
        let aside = format!("{key}:bad:{}", super::model::now_ms());
        let kind: String = redis::cmd("EVAL").arg(SCRIPT).arg(2).arg(key).arg(&aside).arg(want).query(&mut self.con)?;
        if kind.is_empty() {
            return Ok(false);
        }
        tracing::warn!(key, kind, want, aside, "a route key had the wrong type; renamed it aside");
        Ok(true)
    }

    /// Renames a non-stream `events` key aside; true when it did.
    fn repair_events(&mut self) -> anyhow::Result<bool> {
        let key = self.key("events");
        self.repair(&key, "stream")
    }

    /// Runs a write pipeline. When it fails on data (a key of the wrong
    /// type: `events`, or `also` with its expected type), repairs what was
    /// wrong and runs it once more.
    fn exec(&mut self, p: &redis::Pipeline, also: Option<(&str, &str)>) -> anyhow::Result<()> {
        match p.query::<()>(&mut self.con) {
            Ok(()) => Ok(()),
            Err(e) if data_error(&e) => {
                let mut repaired = self.repair_events()?;
                if let Some((key, want)) = also {
                    repaired |= self.repair(key, want)?;
                }
                if !repaired {
                    return Err(e.into());
                }
                Ok(p.query::<()>(&mut self.con)?)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn key(&self, k: &str) -> String {
        format!("{}{k}", self.prefix)
    }

    fn xadd(&self, pipe: &mut redis::Pipeline, e: &Event) {
        pipe.cmd("XADD")
            .arg(self.key("events"))
            .arg("MAXLEN")
            .arg("~")
            .arg(self.maxlen)
            .arg("*")
            .arg("e")
            .arg(e.encode())
            .ignore();
    }

    /// Key names as bytes: a name that is not UTF-8 must not fail the
    /// whole scan (the caller skips it, naming it escaped).
    fn scan(&mut self, pattern: &str) -> anyhow::Result<Vec<Vec<u8>>> {
        let mut out = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<Vec<u8>>) =
                redis::cmd("SCAN").arg(cursor).arg("MATCH").arg(pattern).arg("COUNT").arg(1000).query(&mut self.con)?;
            out.extend(keys);
            if next == 0 {
                return Ok(out);
            }
            cursor = next;
        }
    }

    /// Whether events after `cursor` may have been trimmed or deleted:
    /// the oldest surviving entry is newer than the cursor, or the stream is
    /// empty although ids past the cursor were generated, or (Redis 7) an
    /// entry past the cursor was deleted.
    fn gap_after(&mut self, cursor: StreamId) -> anyhow::Result<bool> {
        let v: Value = match redis::cmd("XINFO").arg("STREAM").arg(self.key("events")).query(&mut self.con) {
            Ok(v) => v,
            Err(e) if e.to_string().contains("no such key") => return Ok(false),
            Err(e) => return Err(e.into()),
        };
        let pairs: Vec<(String, Value)> = match v {
            Value::Map(m) => {
                m.into_iter().filter_map(|(k, v)| redis::from_redis_value::<String>(&k).ok().map(|k| (k, v))).collect()
            }
            Value::Array(a) => a
                .chunks(2)
                .filter_map(|c| match c {
                    [k, v] => redis::from_redis_value::<String>(k).ok().map(|k| (k, v.clone())),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        };
        let get = |name: &str| pairs.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        let id = |v: Option<Value>| {
            v.and_then(|v| redis::from_redis_value::<String>(&v).ok()).and_then(|s| StreamId::parse(&s))
        };
        if id(get("max-deleted-entry-id")).is_some_and(|d| d > cursor) {
            return Ok(true);
        }
        let length: i64 = get("length").and_then(|v| redis::from_redis_value(&v).ok()).unwrap_or(0);
        if length == 0 {
            return Ok(id(get("last-generated-id")).is_some_and(|l| l > cursor));
        }
        if let Some(Value::Array(entry)) = get("first-entry") {
            return Ok(id(entry.first().cloned()).is_some_and(|first| first > cursor));
        }
        Ok(false)
    }
}

impl RouteStore for RedisStore {
    fn put_proxy(&mut self, info: &ProxyInfo, ttl: Duration) -> anyhow::Result<()> {
        let mut p = redis::pipe();
        p.atomic()
            .cmd("SET")
            .arg(self.key(&format!("proxy:{}", info.id)))
            .arg(info.encode())
            .arg("PX")
            .arg(ttl.as_millis() as u64)
            .ignore();
        self.xadd(&mut p, &Event::ProxyUp { info: info.clone(), ttl_ms: ttl.as_millis() as u64 });
        self.exec(&p, None)
    }

    fn remove_proxy(&mut self, id: &str) -> anyhow::Result<()> {
        let mut p = redis::pipe();
        p.atomic().cmd("DEL").arg(self.key(&format!("proxy:{id}"))).ignore();
        self.xadd(&mut p, &Event::ProxyDown { proxy: id.to_string() });
        self.exec(&p, None)
    }

    fn put_route(&mut self, agent: &str, route: &AgentRoute, announce: bool) -> anyhow::Result<()> {
        let mut p = redis::pipe();
        let key = self.key(&format!("agent:{agent}"));
        p.atomic().cmd("HSET").arg(&key).arg(&route.proxy).arg(route.encode()).ignore();
        if announce {
            self.xadd(&mut p, &Event::AgentUp { agent: agent.to_string(), route: route.clone() });
        }
        self.exec(&p, Some((&key, "hash")))
    }

    fn remove_route(&mut self, agent: &str, proxy: &str, announce: bool) -> anyhow::Result<()> {
        let mut p = redis::pipe();
        let key = self.key(&format!("agent:{agent}"));
        p.atomic().cmd("HDEL").arg(&key).arg(proxy).ignore();
        if announce {
            self.xadd(&mut p, &Event::AgentDown { agent: agent.to_string(), proxy: proxy.to_string() });
        }
        self.exec(&p, Some((&key, "hash")))
    }

    fn seed_strategy(&mut self, s: Strategy) -> anyhow::Result<Strategy> {
        let key = self.key("strategy");
        let set: Value = redis::cmd("SET").arg(&key).arg(s.encode()).arg("NX").query(&mut self.con)?;
        if set != Value::Nil {
            // We seeded it: announce, so every proxy learns it at once.
            let mut p = redis::pipe();
            self.xadd(&mut p, &Event::Strategy(s));
            self.exec(&p, None)?;
            return Ok(s);
        }
        match self.con.get::<_, Vec<u8>>(&key) {
            Ok(cur) => Ok(Strategy::decode(&cur)?),
            Err(e) if data_error(&e) => {
                tracing::warn!(key, error = %e, "the strategy key holds garbage; using this proxy's configured strategy");
                Ok(s)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn set_strategy(&mut self, s: Strategy) -> anyhow::Result<()> {
        let mut p = redis::pipe();
        p.atomic().cmd("SET").arg(self.key("strategy")).arg(s.encode()).ignore();
        self.xadd(&mut p, &Event::Strategy(s));
        self.exec(&p, None)
    }

    fn put_grant(&mut self, g: &Grant) -> anyhow::Result<()> {
        let mut p = redis::pipe();
        let key = self.key(&format!("grant:{}", g.name));
        p.atomic().cmd("SET").arg(&key).arg(g.encode()).ignore();
        self.xadd(&mut p, &Event::GrantUp(g.clone()));
        self.exec(&p, Some((&key, "string")))
    }

    fn remove_grant(&mut self, name: &str, kill_streams: bool) -> anyhow::Result<bool> {
        let key = self.key(&format!("grant:{name}"));
        let mut p = redis::pipe();
        p.atomic().cmd("DEL").arg(&key);
        self.xadd(&mut p, &Event::GrantDown { name: name.to_string(), kill_streams });
        let (n,): (i64,) = p.query(&mut self.con)?;
        Ok(n > 0)
    }

    fn load(&mut self) -> anyhow::Result<Loaded> {
        let mut l = Loaded::default();
        let newest = |con: &mut Connection, key: &str| {
            redis::cmd("XREVRANGE").arg(key).arg("+").arg("-").arg("COUNT").arg(1).query::<Vec<Value>>(con)
        };
        let key = self.key("events");
        let newest = match newest(&mut self.con, &key) {
            Err(e) if data_error(&e) && self.repair_events()? => newest(&mut self.con, &key)?,
            r => r?,
        };
        let last: Vec<(String, Value)> =
            newest.into_iter().filter_map(|e| redis::from_redis_value::<(String, Value)>(&e).ok()).collect();
        l.cursor = last.first().and_then(|(id, _)| StreamId::parse(id)).unwrap_or_default();
        let plen = self.prefix.len();
        let bad = |what: &'static str, why: String| super::model::BadValue { what, why };
        for raw in self.scan(&format!("{}proxy:*", self.prefix))? {
            let key = match utf8_key(raw, plen) {
                Ok(k) => k,
                Err(skip) => {
                    l.skipped.push((skip, bad("ProxyRecord", "the key name is not UTF-8".into())));
                    continue;
                }
            };
            let got: Result<(Option<Vec<u8>>, i64), _> =
                redis::pipe().get(&key).cmd("PTTL").arg(&key).query(&mut self.con);
            let (val, pttl) = match got {
                Ok(v) => v,
                Err(e) if data_error(&e) => {
                    l.skipped.push((key[plen..].to_string(), bad("ProxyRecord", e.to_string())));
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let (Some(val), true) = (val, pttl > 0) else { continue };
            match ProxyInfo::decode(&val) {
                Ok(p) => l.proxies.push((p, Duration::from_millis(pttl as u64))),
                Err(e) => l.skipped.push((key[plen..].to_string(), e)),
            }
        }
        for raw in self.scan(&format!("{}agent:*", self.prefix))? {
            let key = match utf8_key(raw, plen) {
                Ok(k) => k,
                Err(skip) => {
                    l.skipped.push((skip, bad("agent hash", "the key name is not UTF-8".into())));
                    continue;
                }
            };
            let agent = key[plen + "agent:".len()..].to_string();
            if !crate::transport::identity::valid_name(&agent) {
                l.skipped
                    .push((key[plen..].to_string(), bad("agent hash", format!("agent {agent:?} is not a valid name"))));
                continue;
            }
            // Field names as bytes too: one bad field skips that field only.
            let fields: Vec<(Vec<u8>, Vec<u8>)> = match self.con.hgetall(&key) {
                Ok(f) => f,
                Err(e) if !data_error(&e) => return Err(e.into()),
                Err(e) => {
                    l.skipped.push((key[plen..].to_string(), bad("agent hash", e.to_string())));
                    continue;
                }
            };
            let mut routes = Vec::new();
            for (proxy, b) in fields {
                let field = format!("{} field {}", &key[plen..], proxy.escape_ascii());
                match AgentRoute::decode(&b) {
                    Ok(r) if r.proxy.as_bytes() == proxy => routes.push(r),
                    Ok(r) => l.skipped.push((
                        field,
                        bad(
                            "AgentRoute",
                            format!(
                                "field names proxy {:?} but the value {:?}",
                                proxy.escape_ascii().to_string(),
                                r.proxy
                            ),
                        ),
                    )),
                    Err(e) => l.skipped.push((field, e)),
                }
            }
            l.agents.push((agent, routes));
        }
        let strategy: Option<Vec<u8>> = match self.con.get(self.key("strategy")) {
            Ok(v) => v,
            Err(e) if data_error(&e) => {
                l.skipped
                    .push(("strategy".into(), super::model::BadValue { what: "TunnelStrategy", why: e.to_string() }));
                None
            }
            Err(e) => return Err(e.into()),
        };
        l.strategy = match strategy.map(|b| Strategy::decode(&b)) {
            Some(Ok(s)) => Some(s),
            Some(Err(e)) => {
                l.skipped.push(("strategy".into(), e));
                None
            }
            None => None,
        };
        for raw in self.scan(&format!("{}grant:*", self.prefix))? {
            let key = match utf8_key(raw, plen) {
                Ok(k) => k,
                Err(skip) => {
                    l.skipped.push((skip, bad("Grant", "the key name is not UTF-8".into())));
                    continue;
                }
            };
            let val: Option<Vec<u8>> = match self.con.get(&key) {
                Ok(v) => v,
                Err(e) if data_error(&e) => {
                    l.skipped.push((key[plen..].to_string(), bad("Grant", e.to_string())));
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            match val.map(|b| Grant::decode(&b)) {
                Some(Ok(g)) if key[plen + "grant:".len()..] == g.name => l.grants.push(g),
                Some(Ok(g)) => l
                    .skipped
                    .push((key[plen..].to_string(), bad("Grant", format!("the value names grant {:?}", g.name)))),
                Some(Err(e)) => l.skipped.push((key[plen..].to_string(), e)),
                None => {}
            }
        }
        Ok(l)
    }

    fn read(&mut self, after: StreamId, block: Duration) -> anyhow::Result<Read> {
        if let Some(due) = self.role_due.filter(|d| Instant::now() >= *d) {
            let role: Vec<Value> = redis::cmd("ROLE").query(&mut self.con)?;
            let role: String = role.first().and_then(|v| redis::from_redis_value(v).ok()).unwrap_or_default();
            if role != "master" {
                anyhow::bail!("the node answers ROLE {role:?}: it is no longer the master");
            }
            self.role_due = Some(due.max(Instant::now() - ROLE_CHECK) + ROLE_CHECK);
        }
        if after != StreamId::default() && self.gap_after(after)? {
            return Ok(Read::Trimmed);
        }
        self.con.set_read_timeout(Some(block + IO_TIMEOUT))?;
        let r: redis::RedisResult<Value> = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(10_000)
            .arg("BLOCK")
            .arg(block.as_millis().max(1) as u64)
            .arg("STREAMS")
            .arg(self.key("events"))
            .arg(after.to_string())
            .query(&mut self.con);
        self.con.set_read_timeout(Some(IO_TIMEOUT))?;
        let r = match r {
            // Not a stream: repaired, and what this reader had is gone.
            Err(e) if data_error(&e) && self.repair_events()? => return Ok(Read::Trimmed),
            r => r?,
        };
        // Parsed by hand, entry by entry: a typed parse of the whole reply
        // fails on one bad entry (a field name that is not UTF-8), and the
        // reader would then re-read the same batch forever.
        let mut out = Vec::new();
        for (id, fields) in stream_entries(r) {
            let Some(id) = StreamId::parse(&id) else { continue };
            let ev = match fields.iter().find(|(k, _)| k == b"e") {
                Some((_, b)) => Event::decode(b),
                None => Err(super::model::BadValue { what: "RouteEvent", why: "entry has no field e".into() }),
            };
            out.push((id, ev));
        }
        Ok(if out.is_empty() { Read::Timeout } else { Read::Events(out) })
    }
}

/// A scanned key name as UTF-8, or the escaped name (without the prefix) to
/// report it under.
fn utf8_key(raw: Vec<u8>, plen: usize) -> Result<String, String> {
    String::from_utf8(raw).map_err(|e| {
        let b = e.into_bytes();
        b.get(plen..).unwrap_or(&b).escape_ascii().to_string()
    })
}

fn bulk(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        _ => None,
    }
}

fn pairs(v: Value) -> Vec<(Value, Value)> {
    match v {
        Value::Map(m) => m,
        Value::Array(a) => {
            let mut it = a.into_iter();
            let mut out = Vec::new();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                out.push((k, v));
            }
            out
        }
        _ => Vec::new(),
    }
}

/// A stream entry's fields, as raw (name, value) pairs.
type Fields = Vec<(Vec<u8>, Vec<u8>)>;

/// The entries of an XREAD reply (one stream), as (id, [(field, value)]),
/// whatever bytes the fields hold. RESP2 replies are arrays, RESP3 maps.
fn stream_entries(reply: Value) -> Vec<(String, Fields)> {
    let streams = match reply {
        Value::Array(a) => a.into_iter().filter_map(|s| pairs_of_two(s).map(|(_, e)| e)).collect(),
        m @ Value::Map(_) => pairs(m).into_iter().map(|(_, e)| e).collect(),
        _ => Vec::new(),
    };
    let mut out = Vec::new();
    for entries in streams {
        let Value::Array(entries) = entries else { continue };
        for e in entries {
            let Some((id, fields)) = pairs_of_two(e) else { continue };
            let Some(id) = bulk(id).and_then(|b| String::from_utf8(b).ok()) else { continue };
            let fields = pairs(fields).into_iter().filter_map(|(k, v)| Some((bulk(k)?, bulk(v)?))).collect();
            out.push((id, fields));
        }
    }
    out
}

/// A two-element array as a pair.
fn pairs_of_two(v: Value) -> Option<(Value, Value)> {
    match v {
        Value::Array(a) if a.len() == 2 => {
            let mut it = a.into_iter();
            Some((it.next()?, it.next()?))
        }
        _ => None,
    }
}
