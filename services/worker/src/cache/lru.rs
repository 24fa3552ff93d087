//! The memory tier: a least-recently-used map with a budget in bytes (key + value lengths), not in entries.
//! A value that alone exceeds the budget is not kept.

use std::sync::Arc;

use lru::LruCache;

/// An LRU map from cache keys to shared values, evicting the least recently used entries past `budget` bytes.
pub(crate) struct ByteLru {
    map: LruCache<String, Arc<[u8]>>,
    bytes: usize,
    budget: usize,
}

/// What an entry counts against the budget.
fn cost(key: &str, value: &[u8]) -> usize {
    key.len() + value.len()
}

impl ByteLru {
    pub(crate) fn new(budget: usize) -> Self {
        Self {
            map: LruCache::unbounded(),
            bytes: 0,
            budget,
        }
    }

    /// The value under `key`, marked most recently used.
    pub(crate) fn get(&mut self, key: &str) -> Option<Arc<[u8]>> {
        self.map.get(key).cloned()
    }

    /// Stores `value` under `key` (replacing any old value), then evicts until the budget holds. Returns whether
    /// the value was kept (false when it alone is larger than the budget).
    pub(crate) fn insert(&mut self, key: &str, value: Arc<[u8]>) -> bool {
        self.remove(key);
        let c = cost(key, &value);
        if c > self.budget {
            return false;
        }
        self.map.put(key.to_owned(), value);
        self.bytes += c;
        while self.bytes > self.budget {
            match self.map.pop_lru() {
                Some((k, v)) => self.bytes -= cost(&k, &v),
                None => break,
            }
        }
        true
    }

    /// Removes the entry under `key`.
    pub(crate) fn remove(&mut self, key: &str) -> Option<Arc<[u8]>> {
        let old = self.map.pop(key)?;
        self.bytes -= cost(key, &old);
        Some(old)
    }

    /// Removes the entry under `key` only if it still holds `value` (the same allocation), so a corrupt value found
    /// by one caller does not remove a fresh one another caller stored meanwhile.
    pub(crate) fn remove_if_same(&mut self, key: &str, value: &Arc<[u8]>) {
        if self.map.peek(key).is_some_and(|v| Arc::ptr_eq(v, value)) {
            self.remove(key);
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// Bytes held (keys + values).
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn val(n: usize, b: u8) -> Arc<[u8]> {
        vec![b; n].into()
    }

    #[test]
    fn evicts_least_recently_used_past_the_byte_budget() {
        let mut lru = ByteLru::new(3 * 101);
        assert!(lru.insert("a", val(100, 1)));
        assert!(lru.insert("b", val(100, 2)));
        assert!(lru.insert("c", val(100, 3)));
        assert_eq!(lru.bytes(), 303);
        // Touch `a` so `b` is the least recently used.
        assert!(lru.get("a").is_some());
        assert!(lru.insert("d", val(100, 4)));
        assert!(lru.get("b").is_none(), "b was the least recently used");
        assert!(lru.get("a").is_some() && lru.get("c").is_some() && lru.get("d").is_some());
        assert_eq!((lru.len(), lru.bytes()), (3, 303));
    }

    #[test]
    fn a_value_larger_than_the_budget_is_not_kept() {
        let mut lru = ByteLru::new(50);
        assert!(lru.insert("small", val(10, 1)));
        assert!(!lru.insert("big", val(100, 2)));
        assert!(lru.get("big").is_none());
        assert!(lru.get("small").is_some(), "a refused value evicts nothing");
        assert_eq!(lru.bytes(), 15);
    }

    #[test]
    fn replacing_a_value_keeps_the_accounting_right() {
        let mut lru = ByteLru::new(1000);
        lru.insert("k", val(100, 1));
        lru.insert("k", val(10, 2));
        assert_eq!((lru.len(), lru.bytes()), (1, 11));
        assert_eq!(lru.get("k").as_deref(), Some(&[2u8; 10][..]));
        assert!(lru.remove("k").is_some());
        assert_eq!((lru.len(), lru.bytes()), (0, 0));
    }

    #[test]
    fn remove_if_same_spares_a_newer_value() {
        let mut lru = ByteLru::new(1000);
        let old = val(4, 1);
        lru.insert("k", old.clone());
        lru.insert("k", val(4, 2));
        lru.remove_if_same("k", &old);
        assert!(lru.get("k").is_some());
        let cur = lru.get("k").expect("present");
        lru.remove_if_same("k", &cur);
        assert!(lru.get("k").is_none());
    }
}
