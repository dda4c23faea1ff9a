//! Grants: which client identities may reach which agents and services.
//!
//! A [`Grant`] holds three lists of [`Pattern`]s (clients, agents,
//! services); a dial is allowed when one grant matches all three. Grants
//! live in the route backend (`grant:<name>`, a prost `Grant`) and change
//! through its event stream, so a control plane writes them like routes;
//! the control thread folds them into a [`GrantTable`] that every route
//! snapshot carries, so the check on the hot path reads an immutable table
//! with no lock.
//!
//! Invariants: every pattern is validated when it is built (names of the
//! route alphabet plus `*`), so garbage in the backend is a [`BadValue`],
//! never a panic or a grant wider than written; an empty list matches
//! nothing (a grant is never "allow all" by omission: `*` must be written);
//! a lookup allocates nothing.
//!
//! Rejected: a regex engine (a pattern language operators must learn, and
//! costlier per dial than globs); a linear scan of every grant per dial
//! (fleets hold thousands of grants: the table indexes grants by exact
//! client name and scans only those plus the wildcard-client ones).

use std::collections::HashMap;
use std::fmt;

use prost::Message;

use super::model::{decode_checked, BadValue};
use crate::transport::identity::valid_name;
use crate::wire::pb::v1 as pb;

/// The proxy's authorization policy (`authorization` in its config).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Authorization {
    /// Deny every dial that no grant allows (the default).
    #[default]
    Grants,
    /// Allow every authenticated client (the behaviour before grants).
    AllowAll,
}

/// A name, or a glob where `*` matches any run of characters.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Pattern {
    text: Box<str>,
    wild: bool,
}

impl Pattern {
    /// Parses a pattern: a valid name, or one where `*` stands for any run.
    pub fn new(s: &str) -> Result<Pattern, String> {
        let wild = s.contains('*');
        let ok = if wild {
            s.len() <= 253 && s.split('*').all(|part| part.is_empty() || valid_name(part))
        } else {
            valid_name(s)
        };
        if !ok {
            return Err(format!("{s:?} is not a name or a glob (letters, digits, '-', '_', '.', '*')"));
        }
        Ok(Pattern { text: s.into(), wild })
    }

    /// Whether the pattern has a `*`.
    pub fn is_wild(&self) -> bool {
        self.wild
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether `s` matches.
    pub fn matches(&self, s: &str) -> bool {
        if !self.wild {
            return *self.text == *s;
        }
        glob(self.text.as_bytes(), s.as_bytes())
    }
}

/// `*`-only glob match, iterative with one backtrack point (linear in
/// practice, no allocation, no recursion on attacker-chosen input).
fn glob(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, si));
            pi += 1;
        } else if pi < p.len() && p[pi] == s[si] {
            pi += 1;
            si += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.text)
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl serde::Serialize for Pattern {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

/// Whether any pattern of `list` matches `s`.
pub fn any_match(list: &[Pattern], s: &str) -> bool {
    list.iter().any(|p| p.matches(s))
}

/// One grant: clients × agents × services.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Grant {
    /// Its name (the key under `grant:<name>`).
    pub name: String,
    /// Client names (`spiffe://<cluster>/client/<name>`) or globs.
    pub clients: Vec<Pattern>,
    /// Agent ids or globs.
    pub agents: Vec<Pattern>,
    /// Service names or globs.
    pub services: Vec<Pattern>,
}

fn patterns(field: &str, v: &[String]) -> Result<Vec<Pattern>, String> {
    if v.is_empty() {
        return Err(format!("{field} is empty (write \"*\" to mean any)"));
    }
    v.iter().map(|s| Pattern::new(s).map_err(|e| format!("{field}: {e}"))).collect()
}

impl Grant {
    /// Builds a grant from its lists, validating every pattern.
    pub fn new(name: &str, clients: &[String], agents: &[String], services: &[String]) -> Result<Grant, String> {
        if !valid_name(name) {
            return Err(format!("grant name {name:?} is not a valid name"));
        }
        Ok(Grant {
            name: name.to_string(),
            clients: patterns("clients", clients)?,
            agents: patterns("agents", agents)?,
            services: patterns("services", services)?,
        })
    }

    /// Whether this grant lets `client` reach `service` on `agent`.
    pub fn allows(&self, client: &str, agent: &str, service: &str) -> bool {
        any_match(&self.clients, client) && any_match(&self.agents, agent) && any_match(&self.services, service)
    }

    pub(super) fn to_pb(&self) -> pb::Grant {
        let strs = |v: &[Pattern]| v.iter().map(|p| p.as_str().to_string()).collect();
        pb::Grant {
            name: self.name.clone(),
            clients: strs(&self.clients),
            agents: strs(&self.agents),
            services: strs(&self.services),
        }
    }

    pub(super) fn from_pb(g: pb::Grant) -> Result<Grant, BadValue> {
        Grant::new(&g.name, &g.clients, &g.agents, &g.services).map_err(|why| BadValue { what: "Grant", why })
    }

    /// Encodes as a `Grant` message.
    pub fn encode(&self) -> Vec<u8> {
        self.to_pb().encode_to_vec()
    }

    /// Decodes a `Grant` message (size-checked, then validated).
    pub fn decode(b: &[u8]) -> Result<Grant, BadValue> {
        Self::from_pb(decode_checked("Grant", b)?)
    }
}

/// An immutable, indexed set of grants.
#[derive(Debug, Default, serde::Serialize)]
pub struct GrantTable {
    grants: Vec<Grant>,
    #[serde(skip)]
    by_client: HashMap<String, Vec<u32>>,
    #[serde(skip)]
    wild_clients: Vec<u32>,
}

impl GrantTable {
    /// Indexes `grants`.
    pub fn new(mut grants: Vec<Grant>) -> GrantTable {
        grants.sort_by(|a, b| a.name.cmp(&b.name));
        let mut t = GrantTable::default();
        for (i, g) in grants.iter().enumerate() {
            let i = i as u32;
            if g.clients.iter().any(Pattern::is_wild) {
                t.wild_clients.push(i);
            }
            for c in g.clients.iter().filter(|c| !c.is_wild()) {
                let v = t.by_client.entry(c.as_str().to_string()).or_default();
                if v.last() != Some(&i) {
                    v.push(i);
                }
            }
        }
        t.grants = grants;
        t
    }

    /// The name of a grant that lets `client` reach `service` on `agent`.
    pub fn allows(&self, client: &str, agent: &str, service: &str) -> Option<&str> {
        let exact = self.by_client.get(client).map(Vec::as_slice).unwrap_or_default();
        exact
            .iter()
            .chain(&self.wild_clients)
            .map(|&i| &self.grants[i as usize])
            .find(|g| g.allows(client, agent, service))
            .map(|g| g.name.as_str())
    }

    /// The grants, by name.
    pub fn grants(&self) -> &[Grant] {
        &self.grants
    }

    /// Number of grants.
    pub fn len(&self) -> usize {
        self.grants.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.grants.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn globs_match_as_written() {
        let p = |x| Pattern::new(x).unwrap();
        assert!(p("ci-*").matches("ci-runner-7"));
        assert!(p("ci-*").matches("ci-"));
        assert!(!p("ci-*").matches("xci-1"));
        assert!(p("*-db-*").matches("eu-db-3"));
        assert!(!p("*-db-*").matches("eu-web-3"));
        assert!(p("*").matches("anything"));
        assert!(p("a*b*c").matches("aXXbYYc"));
        assert!(!p("a*b*c").matches("aXXbYY"));
        assert!(!p("alice").matches("alice2"));
        for bad in ["", "a/b", "a b", "x?", "é"] {
            assert!(Pattern::new(bad).is_err(), "{bad:?}");
        }
        // Pathological input stays linear-ish: no exponential backtracking.
        let long = "a".repeat(200);
        assert!(!p("*a*a*a*a*a*a*a*b").matches(&long));
    }

    #[test]
    fn a_dial_needs_one_grant_matching_all_three() {
        let t = GrantTable::new(vec![
            Grant::new("db", &s(&["alice", "ci-*"]), &s(&["db-*"]), &s(&["postgres"])).unwrap(),
            Grant::new("ops", &s(&["*"]), &s(&["bastion"]), &s(&["ssh"])).unwrap(),
        ]);
        assert_eq!(t.allows("alice", "db-1", "postgres"), Some("db"));
        assert_eq!(t.allows("ci-42", "db-9", "postgres"), Some("db"));
        assert_eq!(t.allows("alice", "db-1", "ssh"), None);
        assert_eq!(t.allows("bob", "db-1", "postgres"), None);
        assert_eq!(t.allows("bob", "bastion", "ssh"), Some("ops"));
        assert!(Grant::new("x", &[], &s(&["a"]), &s(&["b"])).is_err(), "an empty list is refused");
    }

    #[test]
    fn backend_values_round_trip_and_garbage_is_refused() {
        let g = Grant::new("db", &s(&["alice"]), &s(&["db-*"]), &s(&["*"])).unwrap();
        assert_eq!(Grant::decode(&g.encode()).unwrap(), g);
        assert!(Grant::decode(b"\xff\xff").is_err());
        let evil = pb::Grant { name: "x".into(), clients: s(&["../etc"]), agents: s(&["a"]), services: s(&["b"]) };
        assert!(Grant::decode(&evil.encode_to_vec()).is_err());
    }
}
