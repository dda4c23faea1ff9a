//! The agent's services and its own authorization: which service a dial
//! names, and whether the client behind it may reach that service.
//!
//! Invariants: the client is the one the proxies vouch for in the
//! `ringpeer-client-id` header ([`CLIENT_ID_HEADER`]); only proxies reach
//! the agent (its tunnels are mTLS to proxy certificates), and a proxy never
//! takes that header from a client. A service with an `allow` list serves
//! only clients of the agent's own cluster that match it: a missing or
//! malformed header, another cluster or another role is refused, never
//! served. The check runs before the agent connects to the target, so a
//! refused client never reaches it. A service without `allow` serves every
//! client the proxies' grants let through.
//!
//! Rejected: re-checking the proxies' grants here (the agent holds no route
//! backend, and would need a copy of the fleet's grants); trusting the
//! client's name from the `DialRequest` (clients write it, proxies do not
//! vouch for it).
//!
//! Reload: [`LiveServices`] holds the services in force; a SIGHUP that
//! changes them swaps in a new version whole (a dial sees the old set or
//! the new one, never a mix) and fires the old version's `superseded`
//! signal, on which every tunnel's control stream announces the new list.

use std::collections::BTreeMap;
use std::sync::Arc;

use arc_swap::ArcSwap;

use http::HeaderValue;

use crate::config::ServiceSpec;
use crate::route::grants::Pattern;
use crate::transport::identity::{Role, SpiffeId};
use crate::wire::error::{Error, Label, Retry, Side};
use crate::wire::status::Code;

pub use crate::relay::call::CLIENT_ID_HEADER;

/// One local service.
#[derive(Debug)]
pub struct Service {
    /// Target address, `host:port`.
    pub addr: String,
    /// Client names or globs allowed, when the service restricts them.
    pub allow: Option<Vec<Pattern>>,
}

/// The agent's services by name.
pub type Services = BTreeMap<String, Service>;

/// One version of the services in force.
pub struct Version {
    pub services: Services,
    /// Fires when a newer version replaces this one.
    pub superseded: crate::runtime::Shutdown,
}

/// The services in force, shared by the executor (dials, control streams)
/// and the reload thread. Reading is a lock-free `ArcSwap` load.
///
/// Alternative rejected: reopening every tunnel on a change (the proxies
/// would learn the new list from the new tunnels' hellos): every open
/// stream would have to drain, for what one control message says.
#[derive(Clone)]
pub struct LiveServices(Arc<ArcSwap<Version>>);

impl LiveServices {
    pub fn new(services: Services) -> LiveServices {
        LiveServices(Arc::new(ArcSwap::from_pointee(Version { services, superseded: Default::default() })))
    }

    /// The version in force.
    pub fn current(&self) -> Arc<Version> {
        self.0.load_full()
    }

    /// Puts `services` in force and tells whoever watches the old version.
    pub fn replace(&self, services: Services) {
        let old = self.0.swap(Arc::new(Version { services, superseded: Default::default() }));
        old.superseded.trigger();
    }
}

/// Builds the services from the config (validated at load, so every
/// pattern parses; one that does not is an error naming its service).
pub fn from_config(specs: &BTreeMap<String, ServiceSpec>) -> anyhow::Result<Services> {
    let mut out = Services::new();
    for (name, spec) in specs {
        let allow = match &spec.allow {
            None => None,
            Some(list) => Some(
                list.iter()
                    .map(|p| Pattern::new(p).map_err(|e| anyhow::anyhow!("service {name:?}: allow: {e}")))
                    .collect::<anyhow::Result<Vec<_>>>()?,
            ),
        };
        out.insert(name.clone(), Service { addr: spec.addr.clone(), allow });
    }
    Ok(out)
}

/// The service a dial names; an empty name is the agent's only service, or
/// its `default` one.
pub fn pick<'a>(agent: &str, services: &'a Services, name: &str) -> Result<(&'a str, &'a Service), Error> {
    let known = || services.keys().cloned().collect::<Vec<_>>().join(", ");
    if name.is_empty() {
        if services.len() == 1 {
            let (k, v) = services.iter().next().expect("one service");
            return Ok((k, v));
        }
        if let Some((k, v)) = services.get_key_value("default") {
            return Ok((k, v));
        }
        let m = format!("agent {agent:?} has several services; name one of: {}", known());
        return Err(Error::new(Code::NotFound, Side::Agent, Retry::Never, Label::NoService, m));
    }
    services.get_key_value(name).map(|(k, v)| (k.as_str(), v)).ok_or_else(|| {
        let m = format!("agent {agent:?} has no service {name:?} (it has: {})", known());
        Error::new(Code::NotFound, Side::Agent, Retry::Never, Label::NoService, m)
    })
}

/// Whether the client in `header` may reach `service` of `agent` (of
/// `cluster`): Ok when the service has no allow list or the client matches
/// it; otherwise PERMISSION_DENIED naming the agent, the service and the
/// client.
pub fn authorize(
    agent: &str,
    cluster: &str,
    name: &str,
    service: &Service,
    header: Option<&HeaderValue>,
) -> Result<(), Error> {
    let Some(allow) = &service.allow else { return Ok(()) };
    let denied = |m: String| Error::new(Code::PermissionDenied, Side::Agent, Retry::Never, Label::PermissionDenied, m);
    let Some(h) = header else {
        return Err(denied(format!(
            "agent {agent:?} refuses a dial for service {name:?}: it carries no client identity ({CLIENT_ID_HEADER})"
        )));
    };
    let text = h.to_str().unwrap_or("");
    let client = match SpiffeId::parse(text) {
        Ok(id) if id.role == Role::Client && id.cluster == cluster => id.name,
        _ => {
            let shown: String = text.chars().take(120).collect();
            return Err(denied(format!(
                "agent {agent:?} refuses a dial for service {name:?}: client identity {shown:?} is not a client of cluster {cluster:?}"
            )));
        }
    };
    if allow.iter().any(|p| p.matches(&client)) {
        return Ok(());
    }
    Err(denied(format!("agent {agent:?} refuses client {client:?} for service {name:?} (not in its allow list)")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(allow: Option<&[&str]>) -> Service {
        Service {
            addr: "127.0.0.1:22".into(),
            allow: allow.map(|l| l.iter().map(|p| Pattern::new(p).unwrap()).collect()),
        }
    }

    #[test]
    fn the_allow_list_admits_matching_clients_of_the_cluster_only() {
        let ssh = svc(Some(&["alice", "ci-*"]));
        let h = |s: &str| HeaderValue::from_str(s).unwrap();
        let ok = |v: &str| authorize("db-1", "demo", "ssh", &ssh, Some(&h(v)));
        assert!(ok("spiffe://demo/client/alice").is_ok());
        assert!(ok("spiffe://demo/client/ci-runner-7").is_ok());
        let e = ok("spiffe://demo/client/bob").unwrap_err();
        assert_eq!(
            (e.code, e.side, e.retry, e.label),
            (Code::PermissionDenied, Side::Agent, Retry::Never, Label::PermissionDenied)
        );
        assert_eq!(e.message, r#"agent "db-1" refuses client "bob" for service "ssh" (not in its allow list)"#);
        // Another cluster, another role, garbage, or no header at all: refused.
        for bad in ["spiffe://other/client/alice", "spiffe://demo/agent/alice", "alice", "spiffe://demo/client/a/b"] {
            let e = ok(bad).unwrap_err();
            assert!(e.message.contains("is not a client of cluster \"demo\""), "{bad}: {}", e.message);
        }
        let e = authorize("db-1", "demo", "ssh", &ssh, None).unwrap_err();
        assert!(e.message.contains("carries no client identity"), "{}", e.message);
        // No allow list: the proxies' grants decided; even no header passes.
        assert!(authorize("db-1", "demo", "ssh", &svc(None), None).is_ok());
    }

    #[test]
    fn an_empty_service_name_picks_the_only_or_the_default_service() {
        let mut s = Services::new();
        s.insert("ssh".into(), svc(None));
        assert_eq!(pick("a", &s, "").unwrap().0, "ssh");
        s.insert("web".into(), svc(None));
        assert!(pick("a", &s, "").unwrap_err().message.contains("name one of: ssh, web"));
        s.insert("default".into(), svc(None));
        assert_eq!(pick("a", &s, "").unwrap().0, "default");
        assert!(pick("a", &s, "nope").unwrap_err().message.contains("has no service \"nope\""));
    }
}
