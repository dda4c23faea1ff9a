//! The route store boundary and its embedded in-memory implementation.
//!
//! Invariants: a store speaks domain types ([`super::model`]) and keeps the
//! encoded bytes exactly as the Redis store would, so both go through the
//! same decoding and validation; every change that other proxies must see
//! is appended to the event stream with an increasing id; a reader that
//! fell behind the trimmed part of the stream is told so ([`Read::Trimmed`]).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::grants::Grant;
use super::model::{AgentRoute, BadValue, Event, ProxyInfo, Strategy};

/// A position in the event stream (`ms-seq` in Redis).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamId(pub u64, pub u64);

impl StreamId {
    /// Parses `ms-seq`.
    pub fn parse(s: &str) -> Option<StreamId> {
        let (a, b) = s.split_once('-')?;
        Some(StreamId(a.parse().ok()?, b.parse().ok()?))
    }
}

impl std::fmt::Display for StreamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.0, self.1)
    }
}

/// Everything a full resync reads.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Live proxies with their remaining validity.
    pub proxies: Vec<(ProxyInfo, Duration)>,
    /// Agent routes, by agent.
    pub agents: Vec<(String, Vec<AgentRoute>)>,
    /// The strategy, if set.
    pub strategy: Option<Strategy>,
    /// The grants.
    pub grants: Vec<Grant>,
    /// Events after this id are not reflected in the load.
    pub cursor: StreamId,
    /// Values that could not be decoded (key and reason); skipped.
    pub skipped: Vec<(String, BadValue)>,
}

/// Result of reading the event stream.
#[derive(Debug)]
pub enum Read {
    /// New events (undecodable ones carry their error).
    Events(Vec<(StreamId, Result<Event, BadValue>)>),
    /// Nothing new within the blocking time.
    Timeout,
    /// Events after the cursor were trimmed away: resync fully.
    Trimmed,
}

/// A route backend connection.
pub trait RouteStore: Send {
    /// Registers or refreshes a proxy record (with TTL) and announces it.
    fn put_proxy(&mut self, info: &ProxyInfo, ttl: Duration) -> anyhow::Result<()>;
    /// Removes a proxy record and announces it.
    fn remove_proxy(&mut self, id: &str) -> anyhow::Result<()>;
    /// Writes an agent route; announces it when `announce`.
    fn put_route(&mut self, agent: &str, route: &AgentRoute, announce: bool) -> anyhow::Result<()>;
    /// Removes `proxy`'s route to `agent`; announces it when `announce`.
    fn remove_route(&mut self, agent: &str, proxy: &str, announce: bool) -> anyhow::Result<()>;
    /// Sets the strategy unless one is set; returns the one in force.
    fn seed_strategy(&mut self, s: Strategy) -> anyhow::Result<Strategy>;
    /// Sets the strategy and announces it.
    fn set_strategy(&mut self, s: Strategy) -> anyhow::Result<()>;
    /// Writes a grant (added or replaced) and announces it.
    fn put_grant(&mut self, g: &Grant) -> anyhow::Result<()>;
    /// Removes a grant and announces it; with `kill_streams`, proxies end
    /// the open streams no remaining grant allows. False when it did not
    /// exist (the event is still announced, so a kill still applies).
    fn remove_grant(&mut self, name: &str, kill_streams: bool) -> anyhow::Result<bool>;
    /// Reads everything (full resync).
    fn load(&mut self) -> anyhow::Result<Loaded>;
    /// Reads events after `after`, blocking up to `block`.
    fn read(&mut self, after: StreamId, block: Duration) -> anyhow::Result<Read>;
}

/// Opens store connections (the control thread keeps a writer and a reader).
pub trait StoreFactory: Send + Sync {
    /// A new connection.
    fn connect(&self) -> anyhow::Result<Box<dyn RouteStore>>;
    /// Human-readable backend name for logs.
    fn describe(&self) -> String;
    /// Bumped whenever the backend's master changed (Redis Sentinel or
    /// Cluster failover): connections opened under an older generation
    /// talk to a node that is no longer the master, so their owners
    /// reconnect (and the reader resyncs, the writer republishes).
    fn generation(&self) -> u64 {
        0
    }
    /// Asks the backend's topology whether the master moved (one sentinel,
    /// round robin), bumping the generation when it did; the reader calls
    /// it about once a second. A demoted master may keep accepting writes
    /// until the sentinels convert it (up to their 10 s INFO period), so
    /// waiting for the connection to drop is not enough.
    fn watch(&self) {}
}

#[derive(Default)]
struct MemState {
    proxies: HashMap<String, (Vec<u8>, Instant)>,
    agents: HashMap<String, HashMap<String, Vec<u8>>>,
    strategy: Option<Vec<u8>>,
    grants: HashMap<String, Vec<u8>>,
    events: VecDeque<(StreamId, Vec<u8>)>,
    next: u64,
    max_deleted: StreamId,
    maxlen: usize,
}

impl MemState {
    fn append(&mut self, e: &Event) {
        self.next += 1;
        self.events.push_back((StreamId(self.next, 0), e.encode()));
        while self.events.len() > self.maxlen {
            if let Some((id, _)) = self.events.pop_front() {
                self.max_deleted = id;
            }
        }
    }
}

/// The embedded store: one process, shared by every proxy in it.
#[derive(Clone)]
pub struct MemoryStore(Arc<(Mutex<MemState>, Condvar)>);

impl MemoryStore {
    /// An empty store whose event stream keeps `maxlen` entries.
    pub fn new(maxlen: usize) -> MemoryStore {
        MemoryStore(Arc::new((Mutex::new(MemState { maxlen: maxlen.max(1), ..Default::default() }), Condvar::new())))
    }

    fn with<T>(&self, f: impl FnOnce(&mut MemState) -> T) -> T {
        let mut g = self.0 .0.lock().unwrap_or_else(|p| p.into_inner());
        let r = f(&mut g);
        self.0 .1.notify_all();
        r
    }
}

impl RouteStore for MemoryStore {
    fn put_proxy(&mut self, info: &ProxyInfo, ttl: Duration) -> anyhow::Result<()> {
        self.with(|s| {
            s.proxies.insert(info.id.clone(), (info.encode(), Instant::now() + ttl));
            s.append(&Event::ProxyUp { info: info.clone(), ttl_ms: ttl.as_millis() as u64 });
        });
        Ok(())
    }

    fn remove_proxy(&mut self, id: &str) -> anyhow::Result<()> {
        self.with(|s| {
            s.proxies.remove(id);
            s.append(&Event::ProxyDown { proxy: id.to_string() });
        });
        Ok(())
    }

    fn put_route(&mut self, agent: &str, route: &AgentRoute, announce: bool) -> anyhow::Result<()> {
        self.with(|s| {
            s.agents.entry(agent.to_string()).or_default().insert(route.proxy.clone(), route.encode());
            if announce {
                s.append(&Event::AgentUp { agent: agent.to_string(), route: route.clone() });
            }
        });
        Ok(())
    }

    fn remove_route(&mut self, agent: &str, proxy: &str, announce: bool) -> anyhow::Result<()> {
        self.with(|s| {
            if let Some(h) = s.agents.get_mut(agent) {
                h.remove(proxy);
                if h.is_empty() {
                    s.agents.remove(agent);
                }
            }
            if announce {
                s.append(&Event::AgentDown { agent: agent.to_string(), proxy: proxy.to_string() });
            }
        });
        Ok(())
    }

    fn seed_strategy(&mut self, st: Strategy) -> anyhow::Result<Strategy> {
        let cur = self.with(|s| match &s.strategy {
            Some(b) => b.clone(),
            None => {
                s.strategy = Some(st.encode());
                s.append(&Event::Strategy(st));
                st.encode()
            }
        });
        Ok(Strategy::decode(&cur)?)
    }

    fn set_strategy(&mut self, st: Strategy) -> anyhow::Result<()> {
        self.with(|s| {
            s.strategy = Some(st.encode());
            s.append(&Event::Strategy(st));
        });
        Ok(())
    }

    fn put_grant(&mut self, g: &Grant) -> anyhow::Result<()> {
        self.with(|s| {
            s.grants.insert(g.name.clone(), g.encode());
            s.append(&Event::GrantUp(g.clone()));
        });
        Ok(())
    }

    fn remove_grant(&mut self, name: &str, kill_streams: bool) -> anyhow::Result<bool> {
        Ok(self.with(|s| {
            let had = s.grants.remove(name).is_some();
            s.append(&Event::GrantDown { name: name.to_string(), kill_streams });
            had
        }))
    }

    fn load(&mut self) -> anyhow::Result<Loaded> {
        Ok(self.with(|s| {
            let now = Instant::now();
            s.proxies.retain(|_, (_, exp)| *exp > now);
            let mut l = Loaded { cursor: StreamId(s.next, 0), ..Default::default() };
            for (id, (b, exp)) in &s.proxies {
                match ProxyInfo::decode(b) {
                    Ok(p) => l.proxies.push((p, *exp - now)),
                    Err(e) => l.skipped.push((format!("proxy:{id}"), e)),
                }
            }
            for (agent, h) in &s.agents {
                let mut routes = Vec::new();
                for (proxy, b) in h {
                    match AgentRoute::decode(b) {
                        Ok(r) => routes.push(r),
                        Err(e) => l.skipped.push((format!("agent:{agent} field {proxy}"), e)),
                    }
                }
                l.agents.push((agent.clone(), routes));
            }
            l.strategy = s.strategy.as_deref().and_then(|b| Strategy::decode(b).ok());
            for (name, b) in &s.grants {
                match Grant::decode(b) {
                    Ok(g) => l.grants.push(g),
                    Err(e) => l.skipped.push((format!("grant:{name}"), e)),
                }
            }
            l
        }))
    }

    fn read(&mut self, after: StreamId, block: Duration) -> anyhow::Result<Read> {
        let deadline = Instant::now() + block;
        let mut g = self.0 .0.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if after < g.max_deleted {
                return Ok(Read::Trimmed);
            }
            let evs: Vec<_> =
                g.events.iter().filter(|(id, _)| *id > after).map(|(id, b)| (*id, Event::decode(b))).collect();
            if !evs.is_empty() {
                return Ok(Read::Events(evs));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(Read::Timeout);
            }
            g = self.0 .1.wait_timeout(g, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
        }
    }
}

impl StoreFactory for MemoryStore {
    fn connect(&self) -> anyhow::Result<Box<dyn RouteStore>> {
        Ok(Box::new(self.clone()))
    }

    fn describe(&self) -> String {
        "memory".into()
    }
}
