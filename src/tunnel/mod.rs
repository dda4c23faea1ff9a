//! Agent tunnels: reverse connections that agents dial to proxies. After
//! TLS the roles reverse: the proxy is the HTTP/2 client and opens a stream
//! on the tunnel per dial; the agent serves `ringpeer.v1.Agent/Dial` and
//! `ringpeer.v1.Agent/Control`.

pub mod accept;
pub mod agent;
pub mod backoff;
pub mod strategy;
