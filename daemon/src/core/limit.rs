//! A per-key budget for the current second: how many of something each key (a source, a
//! claimed peer and its source) may have before the rest are refused. The caller starts a new
//! second with [`PerSecond::reset`]. Bounded: past [`MAX_KEYS`] keys in one second, new keys
//! are refused outright, so a flood from ever-new sources cannot grow it.

use std::collections::HashMap;
use std::hash::Hash;

/// Keys tracked within one second at most.
pub const MAX_KEYS: usize = 4096;

pub struct PerSecond<K> {
    counts: HashMap<K, u32>,
    limit: u32,
}

impl<K: Hash + Eq> PerSecond<K> {
    /// `limit` a second per key.
    pub fn new(limit: u32) -> Self {
        PerSecond {
            counts: HashMap::new(),
            limit,
        }
    }

    /// Takes one from `key`'s budget: false when it is spent (or the table is full).
    pub fn allow(&mut self, key: K) -> bool {
        let full = self.counts.len() >= MAX_KEYS;
        match self.counts.get_mut(&key) {
            Some(n) => {
                *n += 1;
                *n <= self.limit
            }
            None if full => false,
            None => {
                self.counts.insert(key, 1);
                self.limit >= 1
            }
        }
    }

    /// A new second: every budget is whole again.
    pub fn reset(&mut self) {
        self.counts.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_key_has_its_own_budget_until_the_reset() {
        let mut p = PerSecond::new(2);
        assert!(p.allow("a") && p.allow("a"));
        assert!(!p.allow("a"));
        assert!(p.allow("b"), "another key is not limited by the first");
        p.reset();
        assert!(p.allow("a"));
    }

    #[test]
    fn new_keys_are_refused_once_the_table_is_full() {
        let mut p = PerSecond::new(5);
        for k in 0..MAX_KEYS {
            assert!(p.allow(k));
        }
        assert!(
            !p.allow(MAX_KEYS),
            "a flood of new sources does not grow the table"
        );
        assert!(p.allow(0), "known keys keep their budget");
        p.reset();
        assert!(p.allow(MAX_KEYS));
    }
}
