//! The speed of light: a verdict that places an address farther from the node than its
//! round-trip time allows is physically impossible.
//!
//! Light in optical fibre covers about 200 km per millisecond, so a round trip of 1 ms
//! reaches at most about [`KM_PER_RTT_MS`] = 100 km away. The bound used is looser on
//! purpose, so that no possible verdict is ever called impossible:
//! `limit = min_rtt_ms × 100 km × MARGIN_FACTOR + MARGIN_KM`, with [`MARGIN_FACTOR`] = 1.5 (a
//! path at the speed of light in vacuum, e.g. a microwave link, is the absolute limit) and
//! [`MARGIN_KM`] = 50 km (the resolution of 1:50 million country geometry and of a site's
//! coordinates). The agent's minimum RTT (`tcp_info.tcpi_min_rtt`) includes the hosts'
//! processing, so it only ever overstates the propagation time: the bound errs toward
//! "possible".
//!
//! The distance is from the site to the nearest point of the verdict's country
//! ([`super::shapes`], 0 inside it), never to a centroid. A site is a point (the policy's
//! `[[site]]` coordinates) or, when no coordinates are known, its whole country: then the
//! distance is between the two countries' nearest points, the most generous reading.
//! Distances are cached per (site, country), bounded.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use super::shapes::Countries;
use super::{SourceKind, Verdict};

/// Kilometres of distance per millisecond of round trip in fibre (one way at ~200 km/ms).
pub const KM_PER_RTT_MS: f64 = 100.0;
/// Factor on [`KM_PER_RTT_MS`]: 1.5 × 100 km/ms is the speed of light in vacuum.
pub const MARGIN_FACTOR: f64 = 1.5;
/// Kilometres added to every limit: geometry and site coordinate resolution.
pub const MARGIN_KM: f64 = 50.0;
/// Most (site, country) distances kept; the cache is cleared when full.
pub const MAX_CACHED_DISTANCES: usize = 65_536;

/// Where a node is, as far as the collector knows.
#[derive(Debug, Clone, PartialEq)]
pub enum Place {
    /// A site's coordinates, degrees.
    Point {
        /// Latitude, -90..=90.
        lat: f64,
        /// Longitude, -180..=180.
        lon: f64,
    },
    /// Somewhere in this country (ISO 3166-1 alpha-2).
    Country(String),
}

/// A cache key that costs no allocation: coordinates' bits, or a two-letter code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum PlaceKey {
    Point(u64, u64),
    Country([u8; 2]),
}

/// A two-letter code as bytes; `None` for anything else (no geometry has such a key).
fn code(country: &str) -> Option<[u8; 2]> {
    country.as_bytes().try_into().ok()
}

impl Place {
    fn key(&self) -> Option<PlaceKey> {
        Some(match self {
            Place::Point { lat, lon } => PlaceKey::Point(lat.to_bits(), lon.to_bits()),
            Place::Country(c) => PlaceKey::Country(code(c)?),
        })
    }
}

/// The outcome of one check: the distance, the farthest the RTT allows, and the judgement.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Check {
    /// From the site to the nearest point of the country, km.
    pub distance_km: f64,
    /// The farthest the minimum RTT allows, km ([`limit_km`]).
    pub limit_km: f64,
    /// `distance_km > limit_km`.
    pub impossible: bool,
}

/// The farthest a destination can be at this minimum round-trip time, km.
pub fn limit_km(min_rtt_us: u32) -> f64 {
    f64::from(min_rtt_us) / 1000.0 * KM_PER_RTT_MS * MARGIN_FACTOR + MARGIN_KM
}

/// The check of a measured distance (`None`: not measured) at `min_rtt_us`; `None` when either
/// is unknown. [`Physics::check`] is this after the distance.
pub fn check_at(distance_km: Option<f64>, min_rtt_us: u32) -> Option<Check> {
    if min_rtt_us == 0 {
        return None;
    }
    let distance_km = distance_km?;
    let limit_km = limit_km(min_rtt_us);
    Some(Check {
        distance_km,
        limit_km,
        impossible: distance_km > limit_km,
    })
}

/// Distances by (site, country); `None`: no geometry for one of them.
type Distances = HashMap<(PlaceKey, [u8; 2]), Option<f64>>;

/// Distances from sites to countries over the shipped geometry, cached.
#[derive(Debug, Default)]
pub struct Physics {
    cache: Mutex<Distances>,
}

impl Physics {
    /// Distance from `from` to the nearest point of `country`, km; `None` when either
    /// country has no geometry (e.g. a code the map does not draw).
    pub fn distance_km(&self, from: &Place, country: &str) -> Option<f64> {
        let key = (from.key()?, code(country)?);
        if let Some(d) = self
            .cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
        {
            return *d;
        }
        let shapes = Countries::shipped();
        let d = shapes.get(country).and_then(|to| match from {
            Place::Point { lat, lon } => Some(to.distance_km(*lon, *lat)),
            Place::Country(c) if c == country => Some(0.0),
            Place::Country(c) => shapes.get(c).map(|f| f.distance_to_km(to)),
        });
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.len() >= MAX_CACHED_DISTANCES {
            cache.clear();
        }
        cache.insert(key, d);
        d
    }

    /// Whether `country` can be where the address is, seen from `from` at `min_rtt_us`;
    /// `None` when the RTT is unknown (0) or the distance cannot be measured.
    pub fn check(&self, from: &Place, country: &str, min_rtt_us: u32) -> Option<Check> {
        if min_rtt_us == 0 {
            return None;
        }
        check_at(self.distance_km(from, country), min_rtt_us)
    }

    /// One check per answer of the verdict, in the same order; an override's answer is never
    /// second-guessed (`None`), nor anything when the node's place is unknown.
    pub fn judge(&self, v: &Verdict, from: Option<&Place>, min_rtt_us: u32) -> Vec<Option<Check>> {
        self.distances(v, from)
            .iter()
            .map(|d| check_at(*d, min_rtt_us))
            .collect()
    }

    /// The part of [`Physics::judge`] that does not depend on the RTT: per answer, in the same
    /// order, the distance from `from` to the answer's country, `None` where nothing is
    /// checked (an override's answer, an unknown place, a country without geometry). The
    /// deriver makes it once per (address, place) of a batch and each flow's checks from it
    /// with [`check_at`] (PERFORMANCE.md §8q).
    pub fn distances(&self, v: &Verdict, from: Option<&Place>) -> Vec<Option<f64>> {
        v.answers
            .iter()
            .map(|a| match from {
                Some(place) if a.kind != SourceKind::Override => {
                    self.distance_km(place, &a.country)
                }
                _ => None,
            })
            .collect()
    }

    /// How many distances are cached.
    pub fn cached(&self) -> usize {
        self.cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::super::Answer;
    use super::*;

    const RABAT: Place = Place::Point {
        lat: 34.0209,
        lon: -6.8498,
    };

    #[test]
    fn france_is_impossible_from_rabat_at_half_a_millisecond_and_possible_at_twenty() {
        let p = Physics::default();
        let c = p.check(&RABAT, "FR", 400).unwrap();
        assert!(c.impossible, "{c:?}");
        assert!((1000.0..1250.0).contains(&c.distance_km), "{c:?}");
        assert!((c.limit_km - 110.0).abs() < 1e-9, "{c:?}");
        let far = p.check(&RABAT, "FR", 20_000).unwrap();
        assert!(!far.impossible, "{far:?}");
        // Inside its own country nothing is impossible; unknown RTT checks nothing.
        assert!(!p.check(&RABAT, "MA", 50).unwrap().impossible);
        assert_eq!(p.check(&RABAT, "FR", 0), None);
        assert_eq!(p.check(&RABAT, "QQ", 50), None, "no geometry");
        assert_eq!(p.cached(), 3);
    }

    #[test]
    fn a_site_without_coordinates_is_its_whole_country() {
        let p = Physics::default();
        let ma = Place::Country("MA".into());
        // Morocco's nearest point to France is its Mediterranean coast.
        let d = p.distance_km(&ma, "FR").unwrap();
        let from_rabat = p.distance_km(&RABAT, "FR").unwrap();
        assert!(d <= from_rabat, "{d} vs {from_rabat}");
        assert!(p.check(&ma, "FR", 500).unwrap().impossible);
        assert!(!p.check(&ma, "ES", 500).unwrap().impossible);
    }

    #[test]
    fn overrides_are_never_second_guessed() {
        let v = Verdict {
            answers: vec![
                Answer {
                    source: "override:192.0.2.0/24".into(),
                    country: "FR".into(),
                    kind: SourceKind::Override,
                },
                Answer {
                    source: "geofeed:x@2026-11-01".into(),
                    country: "FR".into(),
                    kind: SourceKind::Geofeed,
                },
            ],
            ..Verdict::default()
        };
        let checks = Physics::default().judge(&v, Some(&RABAT), 100);
        assert_eq!(checks[0], None);
        assert!(checks[1].unwrap().impossible);
        assert!(
            Physics::default()
                .judge(&v, None, 100)
                .iter()
                .all(Option::is_none)
        );
    }
}
