//! A small concurrent cache of verdicts: sharded `Mutex<HashMap>`, bounded.
//!
//! Policy when full: a shard that reaches its share of the bound is cleared before the next
//! insert, so memory stays bounded and a working set smaller than the bound stays cached.
//! The cache belongs to one set of sources and is dropped with them on reload.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

use super::Verdict;

/// Default bound on cached verdicts (all shards together).
pub const DEFAULT_CACHE_ENTRIES: usize = 65_536;
/// Number of shards (a power of two).
const SHARDS: usize = 16;

/// One shard: verdicts by normalised address.
type Shard = Mutex<HashMap<IpAddr, Arc<Verdict>>>;

/// Verdicts by normalised address.
pub struct Cache {
    shards: Box<[Shard]>,
    per_shard: usize,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("entries", &self.len())
            .field("bound", &(self.per_shard * SHARDS))
            .finish()
    }
}

impl Cache {
    /// A cache holding at most about `bound` verdicts.
    pub fn new(bound: usize) -> Self {
        let per_shard = bound.div_ceil(SHARDS).max(1);
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            per_shard,
        }
    }

    fn shard(&self, ip: &IpAddr) -> &Shard {
        // Fibonacci hashing of the address bits; the map itself keeps SipHash.
        let bits = match ip {
            IpAddr::V4(v4) => u64::from(v4.to_bits()),
            IpAddr::V6(v6) => {
                let b = v6.to_bits();
                (b as u64) ^ ((b >> 64) as u64)
            }
        };
        let i = (bits.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 60) as usize;
        &self.shards[i % SHARDS]
    }

    /// The cached verdict for `ip`.
    pub fn get(&self, ip: &IpAddr) -> Option<Arc<Verdict>> {
        self.shard(ip)
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(ip)
            .cloned()
    }

    /// Remember a verdict (clearing the shard first when it is full).
    pub fn insert(&self, ip: IpAddr, v: Arc<Verdict>) {
        let mut shard = self
            .shard(&ip)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if shard.len() >= self.per_shard && !shard.contains_key(&ip) {
            shard.clear();
        }
        shard.insert(ip, v);
    }

    /// Number of cached verdicts.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_never_holds_more_than_its_bound() {
        let c = Cache::new(64);
        for i in 0..10_000u32 {
            c.insert(IpAddr::from(i.to_be_bytes()), Arc::default());
            assert!(c.len() <= 64, "{} entries", c.len());
        }
        let ip = IpAddr::from([1, 2, 3, 4]);
        let v = Arc::new(Verdict {
            country: "FR".into(),
            ..Verdict::default()
        });
        c.insert(ip, v.clone());
        assert_eq!(c.get(&ip), Some(v));
    }
}
