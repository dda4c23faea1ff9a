//! ringpeer: a proxy-peering data plane.
//!
//! Data flow: a client enters at a proxy's client edge ([`ingress`]), the
//! proxy finds the agent's tunnel ([`route`], kept fresh by the [`control`]
//! thread), and the dial's bytes are relayed verbatim ([`relay`]) over the
//! agent's reverse tunnel ([`tunnel`]) to its target. [`forward`] is the
//! client side, [`transport`] the TLS/HTTP/2 plumbing, [`runtime`] the
//! thread-per-core shards, [`telemetry`] the counters, [`wire`] the protocol.

pub mod config;
pub mod control;
pub mod demo;
pub mod forward;
pub mod ingress;
pub mod peer;
pub mod proxy;
pub mod relay;
pub mod route;
pub mod runtime;
pub mod telemetry;
pub mod transport;
pub mod tunnel;
pub mod wire;

pub use proxy::{run, Listeners};
