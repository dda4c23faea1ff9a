//! The control thread's view of the grants: folded from full loads and
//! grant events, and the immutable [`GrantTable`] every snapshot shares.
//!
//! Invariants: the table is rebuilt only when a grant actually changed
//! (a resync that finds the same grants keeps the same `Arc`, so shards
//! see no change); the kill counter only grows, across resyncs too, so a
//! shard that saw a `--kill-streams` removal never sees it again and never
//! misses one that arrived between two snapshots.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::route::grants::{Grant, GrantTable};

/// Grants by name, and the table built from them.
#[derive(Debug, Default)]
pub struct GrantView {
    by_name: BTreeMap<String, Grant>,
    table: Arc<GrantTable>,
    kills: u64,
}

impl GrantView {
    /// A view of `grants` (a full load), keeping `prev`'s kill counter.
    pub fn from_loaded(grants: &[Grant], prev: &GrantView) -> GrantView {
        let by_name: BTreeMap<_, _> = grants.iter().map(|g| (g.name.clone(), g.clone())).collect();
        let table =
            if by_name == prev.by_name { prev.table.clone() } else { Arc::new(GrantTable::new(grants.to_vec())) };
        GrantView { by_name, table, kills: prev.kills }
    }

    /// Whether `other` holds different grants.
    pub fn differs(&self, other: &GrantView) -> bool {
        self.by_name != other.by_name || self.kills != other.kills
    }

    /// A grant written; true when it changed anything.
    pub fn up(&mut self, g: Grant) -> bool {
        if self.by_name.get(&g.name) == Some(&g) {
            return false;
        }
        self.by_name.insert(g.name.clone(), g);
        self.rebuild();
        true
    }

    /// A grant removed; true when it changed anything (a `kill_streams`
    /// removal always does: its streams must be re-checked even if a
    /// resync already dropped the grant).
    pub fn down(&mut self, name: &str, kill_streams: bool) -> bool {
        let removed = self.by_name.remove(name).is_some();
        if removed {
            self.rebuild();
        }
        if kill_streams {
            self.kills += 1;
        }
        removed || kill_streams
    }

    fn rebuild(&mut self) {
        self.table = Arc::new(GrantTable::new(self.by_name.values().cloned().collect()));
    }

    /// The table for the next snapshot.
    pub fn table(&self) -> Arc<GrantTable> {
        self.table.clone()
    }

    /// How many `--kill-streams` removals were seen.
    pub fn kills(&self) -> u64 {
        self.kills
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(name: &str, client: &str) -> Grant {
        Grant::new(name, &[client.into()], &["*".into()], &["*".into()]).unwrap()
    }

    #[test]
    fn a_resync_with_the_same_grants_keeps_the_table_and_the_kills() {
        let mut v = GrantView::default();
        assert!(v.up(g("a", "alice")));
        assert!(!v.up(g("a", "alice")), "rewriting the same grant changes nothing");
        assert!(v.down("a", true));
        assert_eq!(v.kills(), 1);
        assert!(v.up(g("b", "bob")));
        let t = v.table();
        let fresh = GrantView::from_loaded(&[g("b", "bob")], &v);
        assert!(Arc::ptr_eq(&t, &fresh.table()), "same grants: same table");
        assert_eq!(fresh.kills(), 1);
        assert!(!v.differs(&fresh));
        let other = GrantView::from_loaded(&[g("b", "carol")], &v);
        assert!(v.differs(&other));
        assert_eq!(other.table().allows("carol", "x", "y"), Some("b"));
        assert_eq!(other.table().allows("bob", "x", "y"), None);
    }
}
