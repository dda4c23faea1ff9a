//! ringpeer: a proxy-peering data plane.
pub mod wire;
