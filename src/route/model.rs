//! Route domain types and their backend encoding (prost messages from
//! `proto/ringpeer/v1/ringpeer.proto`).
//!
//! Invariants: generated types are converted here (and grants in [`super::grants`]) and
//! nowhere else in the route code; every value read from a backend is size-checked before it is
//! decoded and validated after (names, shard numbers), so garbage under our
//! keys is an error value, never a panic.

use std::fmt;

use prost::Message;

use crate::transport::identity::valid_name;
use crate::wire::pb::v1 as pb;

/// Largest backend value decoded.
pub const MAX_VALUE: usize = 256 << 10;

/// A value under our keys that could not be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("bad {what}: {why}")]
pub struct BadValue {
    /// What was being decoded.
    pub what: &'static str,
    /// Why it was refused.
    pub why: String,
}

fn bad(what: &'static str, why: impl fmt::Display) -> BadValue {
    BadValue { what, why: why.to_string() }
}

/// Decodes a backend value after checking its size.
pub(crate) fn decode_checked<M: Message + Default>(what: &'static str, b: &[u8]) -> Result<M, BadValue> {
    if b.len() > MAX_VALUE {
        return Err(bad(what, format!("{} bytes exceeds {MAX_VALUE}", b.len())));
    }
    M::decode(b).map_err(|e| bad(what, e))
}

fn name(what: &'static str, field: &str, v: &str) -> Result<(), BadValue> {
    if valid_name(v) {
        Ok(())
    } else {
        Err(bad(what, format!("{field} {v:?} is not a valid name")))
    }
}

/// A proxy as registered in the backend.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ProxyInfo {
    /// Proxy id.
    pub id: String,
    /// Peer address of each shard (index = shard).
    pub peer_addrs: Vec<String>,
    /// Agent tunnel address.
    pub tunnel_addr: String,
    /// Client edge address.
    pub client_addr: String,
    /// Record version (start time, ms).
    pub version: u64,
    /// Draining: peers prefer other holders of its agents.
    pub draining: bool,
    /// The build that wrote the record.
    pub build: String,
}

impl ProxyInfo {
    /// Encodes as a `ProxyRecord`.
    pub fn encode(&self) -> Vec<u8> {
        self.to_pb().encode_to_vec()
    }

    fn to_pb(&self) -> pb::ProxyRecord {
        pb::ProxyRecord {
            id: self.id.clone(),
            peer_addrs: self.peer_addrs.clone(),
            tunnel_addr: self.tunnel_addr.clone(),
            client_addr: self.client_addr.clone(),
            version: self.version,
            draining: self.draining,
            build: self.build.clone(),
        }
    }

    fn from_pb(r: pb::ProxyRecord) -> Result<ProxyInfo, BadValue> {
        name("ProxyRecord", "ID", &r.id)?;
        Ok(ProxyInfo {
            id: r.id,
            peer_addrs: r.peer_addrs,
            tunnel_addr: r.tunnel_addr,
            client_addr: r.client_addr,
            version: r.version,
            draining: r.draining,
            build: r.build,
        })
    }

    /// Decodes a `ProxyRecord`.
    pub fn decode(b: &[u8]) -> Result<ProxyInfo, BadValue> {
        Self::from_pb(decode_checked("ProxyRecord", b)?)
    }
}

/// One proxy's tunnel to an agent, as stored in `agent:<id>`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct AgentRoute {
    /// Proxy holding the tunnel.
    pub proxy: String,
    /// Shard on that proxy.
    pub shard: u32,
    /// Services the agent announced.
    pub services: Vec<String>,
    /// Unix ms after which the field is garbage.
    pub expires_ms: u64,
}

impl AgentRoute {
    /// Encodes as an `AgentRoute` message.
    pub fn encode(&self) -> Vec<u8> {
        self.to_pb().encode_to_vec()
    }

    fn to_pb(&self) -> pb::AgentRoute {
        pb::AgentRoute {
            proxy_id: self.proxy.clone(),
            shard: self.shard,
            services: self.services.clone(),
            expires_unix_ms: self.expires_ms,
        }
    }

    fn from_pb(r: pb::AgentRoute) -> Result<AgentRoute, BadValue> {
        name("AgentRoute", "ProxyID", &r.proxy_id)?;
        if r.shard > 4096 {
            return Err(bad("AgentRoute", format!("shard {} out of range", r.shard)));
        }
        for s in &r.services {
            name("AgentRoute", "service", s)?;
        }
        Ok(AgentRoute { proxy: r.proxy_id, shard: r.shard, services: r.services, expires_ms: r.expires_unix_ms })
    }

    /// Decodes an `AgentRoute`.
    pub fn decode(b: &[u8]) -> Result<AgentRoute, BadValue> {
        Self::from_pb(decode_checked("AgentRoute", b)?)
    }
}

/// The cluster's tunnel strategy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Strategy {
    /// Agents tunnel to every proxy.
    #[default]
    AgentMesh,
    /// Agents tunnel to `agent_connection_count` proxies.
    ProxyPeering {
        /// Tunnels per agent.
        agent_connection_count: u32,
    },
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Strategy::AgentMesh => f.write_str("agent_mesh"),
            Strategy::ProxyPeering { agent_connection_count } => {
                write!(f, "proxy_peering (agent_connection_count {agent_connection_count})")
            }
        }
    }
}

impl Strategy {
    /// As the wire message.
    pub fn to_pb(self) -> pb::TunnelStrategy {
        match self {
            Strategy::AgentMesh => {
                pb::TunnelStrategy { r#type: pb::tunnel_strategy::Kind::AgentMesh as i32, agent_connection_count: 0 }
            }
            Strategy::ProxyPeering { agent_connection_count } => {
                pb::TunnelStrategy { r#type: pb::tunnel_strategy::Kind::ProxyPeering as i32, agent_connection_count }
            }
        }
    }

    /// From the wire message.
    pub fn from_pb(s: &pb::TunnelStrategy) -> Result<Strategy, BadValue> {
        match pb::tunnel_strategy::Kind::try_from(s.r#type) {
            Ok(pb::tunnel_strategy::Kind::AgentMesh) => Ok(Strategy::AgentMesh),
            Ok(pb::tunnel_strategy::Kind::ProxyPeering) => {
                Ok(Strategy::ProxyPeering { agent_connection_count: s.agent_connection_count.max(1) })
            }
            Err(_) => Err(bad("TunnelStrategy", format!("unknown type {}", s.r#type))),
        }
    }

    /// Encodes as a `TunnelStrategy` message.
    pub fn encode(self) -> Vec<u8> {
        self.to_pb().encode_to_vec()
    }

    /// Decodes a `TunnelStrategy` message.
    pub fn decode(b: &[u8]) -> Result<Strategy, BadValue> {
        Self::from_pb(&decode_checked::<pb::TunnelStrategy>("TunnelStrategy", b)?)
    }
}

/// A change, as appended to the `events` stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// `agent`'s tunnel on `route.proxy` is up.
    AgentUp {
        /// Agent id.
        agent: String,
        /// The route.
        route: AgentRoute,
    },
    /// `agent`'s tunnel on `proxy` is gone.
    AgentDown {
        /// Agent id.
        agent: String,
        /// Proxy id.
        proxy: String,
    },
    /// A proxy registered or heartbeated; valid for `ttl_ms`.
    ProxyUp {
        /// The record.
        info: ProxyInfo,
        /// Validity.
        ttl_ms: u64,
    },
    /// A proxy left cleanly.
    ProxyDown {
        /// Proxy id.
        proxy: String,
    },
    /// The strategy changed.
    Strategy(Strategy),
    /// A grant was written (added or replaced).
    GrantUp(super::grants::Grant),
    /// A grant was removed; `kill_streams`: end the open streams it allowed
    /// that no other grant allows.
    GrantDown {
        /// Grant name.
        name: String,
        /// End the streams it no longer allows.
        kill_streams: bool,
    },
}

impl Event {
    /// Encodes as a `RouteEvent`.
    pub fn encode(&self) -> Vec<u8> {
        use pb::route_event::Kind;
        let mut e = pb::RouteEvent::default();
        match self {
            Event::AgentUp { agent, route } => {
                e.r#type = Kind::AgentUp as i32;
                e.agent_id = agent.clone();
                e.proxy_id = route.proxy.clone();
                e.route = Some(route.to_pb());
            }
            Event::AgentDown { agent, proxy } => {
                e.r#type = Kind::AgentDown as i32;
                e.agent_id = agent.clone();
                e.proxy_id = proxy.clone();
            }
            Event::ProxyUp { info, ttl_ms } => {
                e.r#type = Kind::ProxyUp as i32;
                e.proxy_id = info.id.clone();
                e.proxy = Some(info.to_pb());
                e.ttl_ms = *ttl_ms;
            }
            Event::ProxyDown { proxy } => {
                e.r#type = Kind::ProxyDown as i32;
                e.proxy_id = proxy.clone();
            }
            Event::Strategy(s) => {
                e.r#type = Kind::Strategy as i32;
                e.strategy = Some(s.to_pb());
            }
            Event::GrantUp(g) => {
                e.r#type = Kind::GrantUp as i32;
                e.grant_name = g.name.clone();
                e.grant = Some(g.to_pb());
            }
            Event::GrantDown { name, kill_streams } => {
                e.r#type = Kind::GrantDown as i32;
                e.grant_name = name.clone();
                e.kill_streams = *kill_streams;
            }
        }
        e.encode_to_vec()
    }

    /// Decodes a `RouteEvent`.
    pub fn decode(b: &[u8]) -> Result<Event, BadValue> {
        use pb::route_event::Kind;
        let e: pb::RouteEvent = decode_checked("RouteEvent", b)?;
        let missing = |f| bad("RouteEvent", format!("missing {f}"));
        match Kind::try_from(e.r#type) {
            Ok(Kind::AgentUp) => {
                name("RouteEvent", "AgentID", &e.agent_id)?;
                Ok(Event::AgentUp {
                    agent: e.agent_id,
                    route: AgentRoute::from_pb(e.route.ok_or_else(|| missing("Route"))?)?,
                })
            }
            Ok(Kind::AgentDown) => {
                name("RouteEvent", "AgentID", &e.agent_id)?;
                name("RouteEvent", "ProxyID", &e.proxy_id)?;
                Ok(Event::AgentDown { agent: e.agent_id, proxy: e.proxy_id })
            }
            Ok(Kind::ProxyUp) => Ok(Event::ProxyUp {
                info: ProxyInfo::from_pb(e.proxy.ok_or_else(|| missing("Proxy"))?)?,
                ttl_ms: e.ttl_ms,
            }),
            Ok(Kind::ProxyDown) => {
                name("RouteEvent", "ProxyID", &e.proxy_id)?;
                Ok(Event::ProxyDown { proxy: e.proxy_id })
            }
            Ok(Kind::Strategy) => {
                Ok(Event::Strategy(Strategy::from_pb(&e.strategy.ok_or_else(|| missing("Strategy"))?)?))
            }
            Ok(Kind::GrantUp) => {
                Ok(Event::GrantUp(super::grants::Grant::from_pb(e.grant.ok_or_else(|| missing("Grant"))?)?))
            }
            Ok(Kind::GrantDown) => {
                name("RouteEvent", "GrantName", &e.grant_name)?;
                Ok(Event::GrantDown { name: e.grant_name, kill_streams: e.kill_streams })
            }
            Err(_) => Err(bad("RouteEvent", format!("unknown type {}", e.r#type))),
        }
    }
}

/// Unix time in ms.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_and_garbage_is_refused() {
        let route = AgentRoute { proxy: "proxy-b".into(), shard: 1, services: vec!["ssh".into()], expires_ms: 9 };
        let info = ProxyInfo {
            id: "proxy-b".into(),
            peer_addrs: vec!["10.0.0.2:3021".into()],
            tunnel_addr: "t".into(),
            client_addr: "c".into(),
            version: 3,
            draining: true,
            build: "0.1.0+next".into(),
        };
        for e in [
            Event::AgentUp { agent: "a1".into(), route: route.clone() },
            Event::AgentDown { agent: "a1".into(), proxy: "proxy-b".into() },
            Event::ProxyUp { info, ttl_ms: 10_000 },
            Event::ProxyDown { proxy: "proxy-b".into() },
            Event::Strategy(Strategy::ProxyPeering { agent_connection_count: 2 }),
            Event::GrantUp(
                super::super::grants::Grant::new("db", &["alice".into()], &["db-*".into()], &["*".into()]).unwrap(),
            ),
            Event::GrantDown { name: "db".into(), kill_streams: true },
        ] {
            assert_eq!(Event::decode(&e.encode()).unwrap(), e);
        }
        assert!(Event::decode(b"\xff\xff\xff").is_err());
        assert!(AgentRoute::decode(b"garbage!").is_err());
        let mut evil = route.clone();
        evil.proxy = "../../etc".into();
        assert!(AgentRoute::decode(&evil.encode()).is_err());
        assert!(Event::decode(&vec![0x0a; MAX_VALUE + 1]).is_err());
    }
}
