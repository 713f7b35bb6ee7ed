//! Address ranges → values, for the text databases ([`super::delegated`], [`super::csv`]):
//! sorted, non-overlapping `start..=end` ranges per family, found by binary search.
//!
//! Overlapping input is flattened so that the narrower range wins inside it (the usual
//! meaning of a more specific entry); a later range wins over an equal one.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::net::IpAddr;

/// An address key: `u32` for IPv4, `u128` for IPv6.
trait Key: Copy + Ord + std::fmt::Debug {
    fn pred(self) -> Self;
    fn succ(self) -> Self;
    fn width(self, end: Self) -> u128;
}

impl Key for u32 {
    fn pred(self) -> Self {
        self - 1
    }
    fn succ(self) -> Self {
        self + 1
    }
    fn width(self, end: Self) -> u128 {
        u128::from(end - self)
    }
}

impl Key for u128 {
    fn pred(self) -> Self {
        self - 1
    }
    fn succ(self) -> Self {
        self + 1
    }
    fn width(self, end: Self) -> u128 {
        end - self
    }
}

/// Disjoint ranges of one family, sorted by start.
#[derive(Default)]
struct Ranges<K> {
    starts: Vec<K>,
    ends: Vec<K>,
    values: Vec<u32>,
}

impl<K: Key> Ranges<K> {
    fn get(&self, ip: K) -> Option<u32> {
        let i = self.starts.partition_point(|s| *s <= ip).checked_sub(1)?;
        (self.ends[i] >= ip).then(|| self.values[i])
    }

    /// Build from `(start, end, value)` in input order; returns the ranges and how many
    /// overlapped another one.
    fn build(mut input: Vec<(K, K, u32)>) -> (Self, usize) {
        // Stable sort keeps input order among equal ranges.
        input.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        let overlaps = input.windows(2).filter(|w| w[1].0 <= w[0].1).count();
        if overlaps > 0 {
            input = flatten(input);
        }
        let mut out = Ranges {
            starts: Vec::with_capacity(input.len()),
            ends: Vec::with_capacity(input.len()),
            values: Vec::with_capacity(input.len()),
        };
        for (s, e, v) in input {
            out.starts.push(s);
            out.ends.push(e);
            out.values.push(v);
        }
        (out, overlaps)
    }
}

/// Paint ranges widest first, so that a narrower one overwrites what it covers.
fn flatten<K: Key>(mut input: Vec<(K, K, u32)>) -> Vec<(K, K, u32)> {
    // Widest first; among equal widths keep the sorted (then input) order, later wins.
    input.sort_by_key(|r| std::cmp::Reverse(r.0.width(r.1)));
    let mut painted: BTreeMap<K, (K, u32)> = BTreeMap::new();
    for (s, e, v) in input {
        let covered: Vec<(K, K, u32)> = painted
            .range(..=e)
            .rev()
            .take_while(|(_, (end, _))| *end >= s)
            .map(|(start, (end, val))| (*start, *end, *val))
            .collect();
        for (cs, ce, cv) in covered {
            painted.remove(&cs);
            if cs < s {
                painted.insert(cs, (s.pred(), cv));
            }
            if ce > e {
                painted.insert(e.succ(), (ce, cv));
            }
        }
        painted.insert(s, (e, v));
    }
    painted.into_iter().map(|(s, (e, v))| (s, e, v)).collect()
}

/// Ranges of both families mapping to values of type `V` (stored once each).
pub(crate) struct RangeTable<V> {
    v4: Ranges<u32>,
    v6: Ranges<u128>,
    values: Vec<V>,
}

impl<V> RangeTable<V> {
    /// The value of the range holding `ip`.
    pub(crate) fn get(&self, ip: IpAddr) -> Option<&V> {
        let i = match ip {
            IpAddr::V4(v4) => self.v4.get(v4.to_bits()),
            IpAddr::V6(v6) => self.v6.get(v6.to_bits()),
        }?;
        self.values.get(i as usize)
    }

    /// Number of IPv4 and IPv6 ranges.
    pub(crate) fn counts(&self) -> (usize, usize) {
        (self.v4.starts.len(), self.v6.starts.len())
    }
}

/// Collects ranges, then [`RangeBuilder::build`]s a [`RangeTable`].
pub(crate) struct RangeBuilder<V> {
    v4: Vec<(u32, u32, u32)>,
    v6: Vec<(u128, u128, u32)>,
    values: Vec<V>,
    index: HashMap<V, u32>,
}

impl<V: Clone + Eq + Hash> RangeBuilder<V> {
    pub(crate) fn new() -> Self {
        Self {
            v4: Vec::new(),
            v6: Vec::new(),
            values: Vec::new(),
            index: HashMap::new(),
        }
    }

    /// Add `start..=end`. Both ends must be of one family (IPv4-mapped IPv6 ends count as
    /// IPv4) and in order.
    pub(crate) fn push(&mut self, start: IpAddr, end: IpAddr, value: V) -> Result<(), String> {
        enum Family {
            V4(u32, u32),
            V6(u128, u128),
        }
        let family = match (start.to_canonical(), end.to_canonical()) {
            (IpAddr::V4(s), IpAddr::V4(e)) if s <= e => Family::V4(s.to_bits(), e.to_bits()),
            (IpAddr::V6(s), IpAddr::V6(e)) if s <= e => Family::V6(s.to_bits(), e.to_bits()),
            (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => {
                return Err(format!("range end {end} is before its start {start}"));
            }
            _ => return Err(format!("range {start} to {end} mixes IPv4 and IPv6")),
        };
        let v = match self.index.get(&value) {
            Some(v) => *v,
            None => {
                let v = u32::try_from(self.values.len()).map_err(|_| "too many distinct values")?;
                self.index.insert(value.clone(), v);
                self.values.push(value);
                v
            }
        };
        match family {
            Family::V4(s, e) => self.v4.push((s, e, v)),
            Family::V6(s, e) => self.v6.push((s, e, v)),
        }
        Ok(())
    }

    /// True when no range was added.
    pub(crate) fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }

    /// The table, and how many ranges overlapped another one.
    pub(crate) fn build(self) -> (RangeTable<V>, usize) {
        let (v4, o4) = Ranges::build(self.v4);
        let (v6, o6) = Ranges::build(self.v6);
        (
            RangeTable {
                v4,
                v6,
                values: self.values,
            },
            o4 + o6,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn binary_search_finds_the_range_and_nothing_between_ranges() {
        let mut b = RangeBuilder::new();
        b.push(ip("1.0.0.0"), ip("1.0.0.255"), "AU").unwrap();
        b.push(ip("1.0.2.0"), ip("1.0.3.255"), "CN").unwrap();
        b.push(ip("2001:db8::"), ip("2001:db8::ffff"), "FR")
            .unwrap();
        let (t, overlaps) = b.build();
        assert_eq!(overlaps, 0);
        assert_eq!(t.get(ip("1.0.0.7")), Some(&"AU"));
        assert_eq!(t.get(ip("1.0.1.7")), None);
        assert_eq!(t.get(ip("1.0.3.255")), Some(&"CN"));
        assert_eq!(t.get(ip("1.0.4.0")), None);
        assert_eq!(t.get(ip("0.0.0.1")), None);
        assert_eq!(t.get(ip("2001:db8::1")), Some(&"FR"));
        assert_eq!(t.get(ip("2001:db8::1:0")), None);
    }

    #[test]
    fn a_narrower_overlapping_range_wins_inside_it_and_the_wider_one_around_it() {
        let mut b = RangeBuilder::new();
        b.push(ip("10.0.0.0"), ip("10.255.255.255"), "A").unwrap();
        b.push(ip("10.1.0.0"), ip("10.1.255.255"), "B").unwrap();
        b.push(ip("10.1.2.0"), ip("10.1.2.255"), "C").unwrap();
        let (t, overlaps) = b.build();
        assert_eq!(overlaps, 2);
        assert_eq!(t.get(ip("10.0.0.1")), Some(&"A"));
        assert_eq!(t.get(ip("10.1.0.1")), Some(&"B"));
        assert_eq!(t.get(ip("10.1.2.1")), Some(&"C"));
        assert_eq!(t.get(ip("10.1.3.1")), Some(&"B"));
        assert_eq!(t.get(ip("10.2.0.0")), Some(&"A"));
        assert_eq!(t.get(ip("10.255.255.255")), Some(&"A"));
    }

    #[test]
    fn ipv4_mapped_ranges_are_stored_as_ipv4_and_bad_ranges_are_refused() {
        let mut b = RangeBuilder::new();
        b.push(ip("::ffff:1.2.3.0"), ip("::ffff:1.2.3.255"), "X")
            .unwrap();
        assert!(b.push(ip("1.2.3.4"), ip("1.2.3.3"), "X").is_err());
        assert!(b.push(ip("1.2.3.4"), ip("::1"), "X").is_err());
        let (t, _) = b.build();
        assert_eq!(t.get(ip("1.2.3.4")), Some(&"X"));
        assert_eq!(t.counts(), (1, 0));
    }
}
