//! ringpeer: a proxy-peering data plane.
//!
//! The crate is a stack; a module only imports modules below it:
//!
//! `wire` → `runtime` → `transport` → `relay` → `route` → roles
//! ([`proxy`], [`agent`], [`client`]) → [`tools`].
//!
//! - [`wire`]: prost messages, gRPC framing, status, and the one [`wire::error::Error`].
//! - [`runtime`]: glommio shards, timers, shutdown, cross-shard mailboxes and pipes.
//! - [`transport`]: sockets, rustls mTLS with SPIFFE identities, HTTP/2 set-up.
//! - [`relay`]: the session layer: one gRPC stream type with one flow-control
//!   rule, dial open/answer, the verbatim relay and the byte splice.
//! - [`route`]: route data: tables, the backend store (memory, Redis), the
//!   narrow feed between the control thread and the shards.
//! - [`proxy`]: `inbound` (decode → authorize → resolve → open → relay),
//!   `outbound` (upstreams: local tunnel, sibling shard, peer link),
//!   `shard`, and `control` (the route-sync thread).
//! - [`agent`] and [`client`]: the other two roles.
//! - [`tools`]: demo, bench, targets, the in-process fleet.
//!
//! `config` holds the TOML configs of the roles.

pub mod agent;
pub mod client;
pub mod config;
pub mod proxy;
pub mod relay;
pub mod route;
pub mod runtime;
#[cfg(feature = "tools")]
pub mod tools;
pub mod transport;
pub mod wire;

pub use proxy::{run, Listeners};
