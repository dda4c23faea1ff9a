//! The agent map inside a route snapshot: agent name → [`AgentRoutes`],
//! read on every dial, derived per batch of changes by the control thread.
//!
//! Layout: a copy-on-write table of `2^TOP × 2^MID` small hash tables
//! (`hashbrown::HashTable`), two levels of `Arc`ed slot arrays above them.
//! One hash of the name picks the slot (bits 32.. of the hash) and is then
//! reused inside the small table (which reads the low bits for the bucket
//! and the top 7 for its control bytes, so the three never overlap). A
//! lookup is: hash, two slot-array loads (small and hot), one hashbrown
//! probe, one key comparison.
//!
//! Invariants: a map is never changed once shared: [`AgentMap::insert`] and
//! [`AgentMap::remove`] copy, through `Arc::make_mut`, the top array (2^TOP
//! pointers), one middle array (2^MID pointers) and the one small table the
//! name falls in, and share everything else with the snapshot it came
//! from. So deriving a snapshot costs the changed agents (at 1M agents and
//! 65536 tables: 2 × 256 pointers and ~15 entries per changed table), not
//! the table size.
//! A map keeps its hasher (and seed) for its life and for every map
//! derived from it; maps with different seeds compare by content.
//!
//! Hasher: foldhash's `fast::RandomState`, seeded per process (and per
//! instance) at random. Agent names come from authenticated tunnel
//! identities and the backend, so an outsider cannot insert names at will;
//! the random seed keeps names chosen offline from colliding, and a
//! collision flood would only slow the one small table it lands in.
//!
//! Chosen and rejected by the interleaved comparison in
//! benches/route_lookup.rs at 1M agents (per-round ratios to the previous
//! structure, medians over rounds; perf/results/2026-11-26-routes/):
//! - `imbl::HashMap` with SipHash (before): 4–5 dependent HAMT node loads
//!   per lookup, plus the hash. Baseline 1.00.
//! - the same HAMT with foldhash: lookup ~0.5, one-agent copy ~1.0.
//!   Better, but the node loads stay.
//! - 4096 tables (64 × 64): lookup ~0.41, but a one-agent copy clones
//!   ~250 entries: ~5× the HAMT's. 256 tables: ~120× (3.5 ms).
//! - 16384 tables (128 × 128): lookup ~0.40, one-agent copy ~1.5×.
//! - 65536 tables (256 × 256, chosen): lookup ~0.37, one-agent copy ~0.8×,
//!   full build ~0.9×.
//! - one `hashbrown` table: the fastest lookup, but every snapshot would
//!   copy all 1M entries (a full build, seconds) — not measured further.
//! - `Arc<AgentRoutes>` values (cheaper copies): one more dependent load
//!   on every dial, which reads the routes at once; the 65536 split already
//!   makes copies cheap.

use std::fmt;
use std::hash::BuildHasher;
use std::sync::Arc;

use foldhash::fast::RandomState;
use hashbrown::hash_table::Entry as Slot;
use hashbrown::HashTable;

use super::AgentRoutes;

type Entry = (Arc<str>, AgentRoutes);
type Part = HashTable<Entry>;
type Mid = Arc<[Arc<Part>]>;

/// Agent name → routes; see the module header. `TOP` and `MID` are the
/// bits of each slot level (the bench compares other splits).
#[derive(Clone)]
pub struct ShardedMap<const TOP: u32, const MID: u32> {
    hasher: RandomState,
    top: Arc<[Mid]>,
    len: usize,
}

/// The snapshot's agent map: 256 × 256 = 65536 small tables (~15 agents
/// each at 1M).
pub type AgentMap = ShardedMap<8, 8>;

impl<const TOP: u32, const MID: u32> Default for ShardedMap<TOP, MID> {
    fn default() -> Self {
        // Every slot shares one empty table (and every middle array one
        // array) until first written: an empty map is three allocations.
        let empty: Arc<Part> = Arc::new(HashTable::new());
        let mid: Mid = (0..1usize << MID).map(|_| empty.clone()).collect();
        ShardedMap { hasher: RandomState::default(), top: (0..1usize << TOP).map(|_| mid.clone()).collect(), len: 0 }
    }
}

impl<const TOP: u32, const MID: u32> ShardedMap<TOP, MID> {
    #[inline]
    fn slot(h: u64) -> (usize, usize) {
        let t = (h >> 32) as usize & ((1 << TOP) - 1);
        let m = (h >> (32 + TOP)) as usize & ((1 << MID) - 1);
        (t, m)
    }

    #[inline]
    fn part(&self, h: u64) -> &Part {
        let (t, m) = Self::slot(h);
        &self.top[t][m]
    }

    /// The one small table `h` falls in, copied first if shared.
    fn part_mut(&mut self, h: u64) -> &mut Part {
        let (t, m) = Self::slot(h);
        let mid = &mut Arc::make_mut(&mut self.top)[t];
        Arc::make_mut(&mut Arc::make_mut(mid)[m])
    }

    /// Routes to `agent`.
    #[inline]
    pub fn get(&self, agent: &str) -> Option<&AgentRoutes> {
        let h = self.hasher.hash_one(agent);
        self.part(h).find(h, |(k, _)| **k == *agent).map(|(_, v)| v)
    }

    /// Whether `agent` has an entry.
    pub fn contains_key(&self, agent: &str) -> bool {
        self.get(agent).is_some()
    }

    /// Sets the routes to `agent`; returns the previous ones.
    pub fn insert(&mut self, agent: &str, routes: AgentRoutes) -> Option<AgentRoutes> {
        let h = self.hasher.hash_one(agent);
        let hasher = self.hasher.clone();
        let (t, m) = Self::slot(h);
        let mid = &mut Arc::make_mut(&mut self.top)[t];
        let part = Arc::make_mut(&mut Arc::make_mut(mid)[m]);
        match part.entry(h, |(k, _)| **k == *agent, |(k, _)| hasher.hash_one(&**k)) {
            Slot::Occupied(mut e) => Some(std::mem::replace(&mut e.get_mut().1, routes)),
            Slot::Vacant(e) => {
                e.insert((Arc::from(agent), routes));
                self.len += 1;
                None
            }
        }
    }

    /// Drops the entry of `agent`; returns its routes. Copies nothing when
    /// there is no such entry.
    pub fn remove(&mut self, agent: &str) -> Option<AgentRoutes> {
        let h = self.hasher.hash_one(agent);
        self.part(h).find(h, |(k, _)| **k == *agent)?;
        let ((_, routes), _) = self.part_mut(h).find_entry(h, |(k, _)| **k == *agent).ok()?.remove();
        self.len -= 1;
        Some(routes)
    }

    /// Number of agents.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every (agent, routes), in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &AgentRoutes)> + '_ {
        self.top.iter().flat_map(|mid| mid.iter()).flat_map(|p| p.iter()).map(|(k, v)| (&**k, v))
    }

    /// Every agent name.
    pub fn keys(&self) -> impl Iterator<Item = &str> + '_ {
        self.iter().map(|(k, _)| k)
    }

    /// Every agent's routes.
    pub fn values(&self) -> impl Iterator<Item = &AgentRoutes> + '_ {
        self.iter().map(|(_, v)| v)
    }
}

impl<K: AsRef<str>, const TOP: u32, const MID: u32> FromIterator<(K, AgentRoutes)> for ShardedMap<TOP, MID> {
    fn from_iter<I: IntoIterator<Item = (K, AgentRoutes)>>(iter: I) -> Self {
        let mut m = ShardedMap::default();
        for (k, v) in iter {
            m.insert(k.as_ref(), v);
        }
        m
    }
}

impl<const TOP: u32, const MID: u32> PartialEq for ShardedMap<TOP, MID> {
    fn eq(&self, o: &Self) -> bool {
        self.len == o.len && self.iter().all(|(k, v)| o.get(k) == Some(v))
    }
}

impl<const TOP: u32, const MID: u32> Eq for ShardedMap<TOP, MID> {}

impl<const TOP: u32, const MID: u32> fmt::Debug for ShardedMap<TOP, MID> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl<const TOP: u32, const MID: u32> serde::Serialize for ShardedMap<TOP, MID> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes(shard: u32) -> AgentRoutes {
        AgentRoutes {
            local: vec![crate::route::LocalRoute { shard, services: Arc::from(vec!["ssh".to_string()]) }],
            ..Default::default()
        }
    }

    #[test]
    fn a_derived_map_changes_only_itself() {
        let base: AgentMap = (0..10_000).map(|i| (format!("agent-{i}"), routes(i))).collect();
        assert_eq!(base.len(), 10_000);
        let mut next = base.clone();
        assert_eq!(next.insert("agent-7", routes(70)), Some(routes(7)));
        assert_eq!(next.insert("agent-new", routes(1)), None);
        assert_eq!(next.remove("agent-8"), Some(routes(8)));
        assert_eq!(next.remove("agent-absent"), None);
        assert_eq!((base.len(), next.len()), (10_000, 10_000));
        assert_eq!(base.get("agent-7"), Some(&routes(7)), "the snapshot it came from is untouched");
        assert_eq!(next.get("agent-7"), Some(&routes(70)));
        assert!(base.get("agent-new").is_none() && next.get("agent-8").is_none());
        assert!(base.get("agent-8").is_some());
        // Only the touched small tables were copied: all but at most 3 of
        // the 65536 are still shared.
        let shared = base
            .top
            .iter()
            .zip(next.top.iter())
            .flat_map(|(a, b)| a.iter().zip(b.iter()))
            .filter(|(a, b)| Arc::ptr_eq(a, b))
            .count();
        assert!(shared >= 65536 - 3, "{shared} of 65536 tables shared");
        // Same content under another seed compares equal.
        let again: AgentMap = next.iter().map(|(k, v)| (k, v.clone())).collect();
        assert_eq!(again, next);
        assert_ne!(again, base);
        assert_eq!(next.iter().count(), 10_000);
    }

    #[test]
    fn serializes_as_a_plain_map() {
        let m: AgentMap = [("a", routes(1))].into_iter().collect();
        let v = serde_json::to_value(&m).unwrap();
        assert_eq!(v["a"]["local"][0]["shard"], 1);
        assert_eq!(v.as_object().map(|o| o.len()), Some(1));
    }
}
