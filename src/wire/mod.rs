//! Wire protocol: the prost messages generated from `proto/`, the gRPC framing
//! codec, and gRPC status.
//!
//! Invariants: generated types stay inside this module and its callers that
//! build messages; the rest of the crate speaks [`DialTarget`] and
//! [`status::Status`]. Nothing is decoded before its size is checked.

pub mod codec;
pub mod error;
pub mod status;

/// Generated types of `proto/proxyservice.proto` (package `proto`).
#[allow(clippy::all, missing_docs)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/proto.rs"));
    /// Generated types of `proto/ringpeer/v1/ringpeer.proto`.
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/ringpeer.v1.rs"));
    }
}

use bytes::Bytes;
use status::{Code, Status};

/// gRPC paths served on each link kind.
pub mod paths {
    /// Client edge: served by a proxy on its client port.
    pub const PROXY_DIAL: &str = "/ringpeer.v1.Proxy/Dial";
    /// Agent tunnel: served by the agent, called by the proxy.
    pub const AGENT_DIAL: &str = "/ringpeer.v1.Agent/Dial";
    /// Agent tunnel control stream.
    pub const AGENT_CONTROL: &str = "/ringpeer.v1.Agent/Control";
    /// Peer link (Teleport-compatible).
    pub const PEER_DIAL: &str = "/proto.ProxyService/DialNode";
    /// Peer link health check (Teleport-compatible).
    pub const PEER_PING: &str = "/proto.ProxyService/Ping";

    /// The request URI of a method, built once per process: a dial clones
    /// it (reference-counted parts) instead of formatting and parsing one.
    /// The authority is fixed: the callee is named by the certificate.
    pub fn uri(path: &'static str) -> &'static http::Uri {
        use std::sync::LazyLock;
        static URIS: LazyLock<Vec<(&'static str, http::Uri)>> = LazyLock::new(|| {
            [PROXY_DIAL, AGENT_DIAL, AGENT_CONTROL, PEER_DIAL, PEER_PING]
                .into_iter()
                .map(|p| {
                    let uri = http::Uri::builder().scheme("https").authority("ringpeer").path_and_query(p).build();
                    (p, uri.expect("static URI"))
                })
                .collect()
        });
        &URIS.iter().find(|(p, _)| *p == path).expect("a path of this module").1
    }
}

/// Longest agent id or service name accepted in a DialRequest.
pub const MAX_NAME_LEN: usize = 253;

/// What a dial asks for, validated out of a `DialRequest`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DialTarget {
    /// Agent id (`NodeID`).
    pub agent: String,
    /// Service name on the agent (`TunnelType`); empty means the agent's default.
    pub service: String,
    /// Opaque permit, passed to the agent untouched.
    pub permit: Bytes,
    /// The client's address as the entry proxy saw it (`DialRequest.Source`,
    /// network `tcp`); empty when unknown. The entry proxy overwrites what a
    /// client sent, so only proxies set it.
    pub source: String,
}

impl DialTarget {
    /// Parses `AGENT[/SERVICE]`.
    pub fn parse(spec: &str) -> Result<Self, Status> {
        let (agent, service) = match spec.split_once('/') {
            Some((a, s)) => (a, s),
            None => (spec, ""),
        };
        let t = DialTarget {
            agent: agent.to_string(),
            service: service.to_string(),
            permit: Bytes::new(),
            source: String::new(),
        };
        t.validate()?;
        Ok(t)
    }

    fn validate(&self) -> Result<(), Status> {
        if self.agent.is_empty() {
            return Err(Status::new(Code::InvalidArgument, "DialRequest has an empty NodeID (agent id)"));
        }
        for (what, s) in [("NodeID", &self.agent), ("TunnelType", &self.service)] {
            if s.len() > MAX_NAME_LEN || s.chars().any(|c| c.is_control() || c == '/') {
                return Err(Status::new(
                    Code::InvalidArgument,
                    format!(
                        "DialRequest {what} is not a valid name (at most {MAX_NAME_LEN} printable characters, no '/')"
                    ),
                ));
            }
        }
        if self.source.len() > MAX_NAME_LEN || self.source.chars().any(char::is_control) {
            return Err(Status::new(Code::InvalidArgument, "DialRequest Source.Addr is not a printable address"));
        }
        Ok(())
    }

    /// Builds the `DialRequest` frame for this target.
    pub fn to_frame(&self) -> pb::Frame {
        pb::Frame {
            message: Some(pb::frame::Message::DialRequest(pb::DialRequest {
                node_id: self.agent.clone(),
                tunnel_type: self.service.clone(),
                source: (!self.source.is_empty())
                    .then(|| pb::NetAddr { network: "tcp".to_string(), addr: self.source.clone() }),
                destination: None,
                permit: self.permit.clone(),
            })),
        }
    }

    /// Extracts and validates the target of a `DialRequest` frame.
    pub fn from_frame(frame: pb::Frame) -> Result<Self, Status> {
        match frame.message {
            Some(pb::frame::Message::DialRequest(r)) => {
                let source = r.source.map(|s| s.addr).unwrap_or_default();
                let t = DialTarget { agent: r.node_id, service: r.tunnel_type, permit: r.permit, source };
                t.validate()?;
                Ok(t)
            }
            _ => Err(Status::new(Code::InvalidArgument, "the first message of a dial must be a DialRequest")),
        }
    }
}

impl std::fmt::Display for DialTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.service.is_empty() {
            write!(f, "{}", self.agent)
        } else {
            write!(f, "{}/{}", self.agent, self.service)
        }
    }
}

/// The `ConnectionEstablished` frame.
pub fn established_frame() -> pb::Frame {
    pb::Frame { message: Some(pb::frame::Message::ConnectionEstablished(pb::ConnectionEstablished {})) }
}
