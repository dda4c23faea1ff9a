//! Tools: the programs built on the data plane, never imported by it.
//!
//! `demo` (the embedded default fleet), `bench` (the load generator),
//! `target` (echo/sink/source services), `fleet` (in-process proxies and
//! agents, used by the demo, the bench and the tests), `load` (dial drivers)
//! `routes` (the backend reader behind `ringpeer routes`), `grants` (behind
//! `ringpeer grants`), `plot` (`bench --plot`: SVG and JSON), `soak` (a long
//! mixed load with every byte checked) and `scale` (memory at scale: many
//! tunnels and idle streams from one process).
//!
//! Invariant: this is the top layer; nothing under `wire`, `runtime`,
//! `transport`, `relay`, `route` or the roles imports it (checked by
//! `tests/layers.rs`).

pub mod bench;
pub mod bench_external;
pub mod demo;
pub mod fleet;
pub mod grants;
pub mod load;
pub mod plot;
pub mod routes;
pub mod scale;
pub mod scale_sim;
pub mod soak;
pub mod target;
