//! Which proxy the agent expects at a tunnel address, and the TLS client
//! config that enforces it.
//!
//! Invariants:
//! - An address from the pushed proxy set (`ProxySet`: id + tunnel address)
//!   is dialled with a config that requires the proxy certificate to name
//!   that id ([`build`] with `Some(id)`): a registry entry that names one
//!   proxy and another's address fails the handshake inside the verifier,
//!   before the agent presents its own certificate or serves a dial.
//! - A configured seed address (`proxies` in the agent config) has no id:
//!   any proxy certificate of the cluster is accepted there. The seed only
//!   bootstraps discovery; the set it pushes is then checked entry by entry.
//! - An address that several entries claim (a stale record of a proxy that
//!   left, and the proxy that took its port) is dialled as a seed is, and
//!   the proxy that answers must be one of the claimants
//!   ([`Expect::check`]).
//! - Configs are built per id once and cached; the cache keeps only ids in
//!   the current set. [`build`] is the one place a config is made from
//!   [`TlsMaterial`]; a reload swaps the material in the shared cell and
//!   the cache is dropped when its generation moves.
//!
//! Rejected: checking the name after the handshake for every entry (the
//! agent would authenticate itself to, and hold a session with, whoever
//! listens at a forged address); keying tunnels by (id, address) (the
//! strategy spreads over addresses, and one process is one address).

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use rustls::ClientConfig;

use crate::transport::identity::Role;
use crate::transport::reload::Live;
use crate::transport::tls::{TlsError, TlsMaterial};
use crate::transport::TransportError;

/// The one function that makes the agent's client config: a proxy of the
/// agent's cluster, named `id` when given.
pub fn build(material: &TlsMaterial, id: Option<&str>) -> Result<Arc<ClientConfig>, TlsError> {
    material.client_config(Role::Proxy, id)
}

/// What the agent expects at one address.
pub enum Expect {
    /// A seed: any proxy of the cluster.
    Any,
    /// The one proxy set entry with this address; checked in the handshake.
    One(String),
    /// Several entries claim the address; the proxy must be one of them.
    OneOf(Vec<String>),
}

impl Expect {
    /// Whether proxy `name`, which answered, is acceptable here (after the
    /// handshake; `One` was already checked inside it).
    pub fn check(&self, name: &str) -> bool {
        match self {
            Expect::Any | Expect::One(_) => true,
            Expect::OneOf(ids) => ids.iter().any(|i| i == name),
        }
    }

    /// The ids expected, for a log line.
    pub fn names(&self) -> String {
        match self {
            Expect::Any => "any proxy".into(),
            Expect::One(id) => format!("{id:?}"),
            Expect::OneOf(ids) => ids.iter().map(|i| format!("{i:?}")).collect::<Vec<_>>().join(", "),
        }
    }
}

/// The agent's TLS client configs towards proxies, following reloads: the
/// reloader swaps the material and the "any proxy" config in `live`; the
/// per-id configs are rebuilt when its generation moves.
pub struct ProxyTls {
    live: Live<Arc<ClientConfig>>,
    generation: Cell<u64>,
    by_id: RefCell<HashMap<String, Arc<ClientConfig>>>,
    /// (id, address) pairs whose refusal was logged, so each is logged once.
    warned: RefCell<HashSet<(String, String)>>,
}

impl ProxyTls {
    /// Configs from the material in `live` (its `built` is the "any proxy"
    /// config, made by [`build`] with `None`).
    pub fn new(live: Live<Arc<ClientConfig>>) -> ProxyTls {
        let generation = Cell::new(live.current().generation);
        ProxyTls { live, generation, by_id: RefCell::default(), warned: RefCell::default() }
    }

    /// What to expect at `addr`, given the proxy set (id → address).
    pub fn expect(proxies: &BTreeMap<String, String>, addr: &str) -> Expect {
        let mut ids: Vec<String> = proxies.iter().filter(|(_, a)| *a == addr).map(|(id, _)| id.clone()).collect();
        match ids.len() {
            0 => Expect::Any,
            1 => Expect::One(ids.pop().expect("one")),
            _ => Expect::OneOf(ids),
        }
    }

    /// The config that enforces `e`.
    pub fn config(&self, e: &Expect) -> Result<Arc<ClientConfig>, TlsError> {
        let cur = self.live.current();
        if cur.generation != self.generation.replace(cur.generation) {
            self.by_id.borrow_mut().clear();
        }
        let Expect::One(id) = e else { return Ok(cur.built.clone()) };
        if let Some(c) = self.by_id.borrow().get(id) {
            return Ok(c.clone());
        }
        let c = build(&cur.material, Some(id))?;
        self.by_id.borrow_mut().insert(id.clone(), c.clone());
        Ok(c)
    }

    /// Drops cached configs and logged refusals of ids no longer in the set.
    pub fn retain(&self, proxies: &BTreeMap<String, String>) {
        self.by_id.borrow_mut().retain(|id, _| proxies.contains_key(id));
        self.warned.borrow_mut().retain(|(id, a)| proxies.get(id) == Some(a));
    }

    /// Whether this refusal of (`id`, `addr`) is the first: log it then.
    pub fn first_refusal(&self, id: &str, addr: &str) -> bool {
        self.warned.borrow_mut().insert((id.to_string(), addr.to_string()))
    }
}

/// Whether `e` is the verifier's name check failing: the proxy presented a
/// valid certificate of the cluster that names another proxy.
pub fn is_name_mismatch(e: &TransportError) -> bool {
    let TransportError::Handshake { source, .. } = e else { return false };
    matches!(
        source.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()),
        Some(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_expects_the_entries_that_claim_it() {
        let set: BTreeMap<String, String> =
            [("proxy-a", "10.0.0.1:3024"), ("proxy-b", "10.0.0.2:3024"), ("proxy-c", "10.0.0.2:3024")]
                .into_iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect();
        assert!(matches!(ProxyTls::expect(&set, "10.0.0.1:3024"), Expect::One(id) if id == "proxy-a"));
        assert!(matches!(ProxyTls::expect(&set, "seed:3024"), Expect::Any));
        let both = ProxyTls::expect(&set, "10.0.0.2:3024");
        assert!(both.check("proxy-b") && both.check("proxy-c") && !both.check("proxy-a"));
    }
}
