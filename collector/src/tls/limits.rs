//! What one client may hold, so that no client (with a certificate or without) can take the
//! slots or the memory that the others need:
//!
//! - [`PerAddress`]: connections open at once from one source address, on gRPC and HTTPS
//!   (more are closed as soon as they are accepted);
//! - connections without a client certificate (enrollment, bearer tokens, probes) live at
//!   most `anonymous_connection_secs` on gRPC (an enrollment is one call) and are cut when
//!   idle (no request headers within the header timeout) on HTTPS;
//! - reports being received, decoded and stored at once, per client certificate and in all
//!   (`crate::server`'s admission, configured here).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

use serde::Deserialize;
use sov_common::config::Problems;

/// Default of `max_connections_per_address`.
pub const DEFAULT_MAX_CONNECTIONS_PER_ADDRESS: usize = 64;
/// Default of `anonymous_connection_secs`.
pub const DEFAULT_ANONYMOUS_CONNECTION_SECS: u64 = 30;
/// Default of `max_reports_in_flight`.
pub const DEFAULT_MAX_REPORTS_IN_FLIGHT: usize = 64;
/// Default of `max_reports_in_flight_per_node`.
pub const DEFAULT_MAX_REPORTS_IN_FLIGHT_PER_NODE: usize = 1;

/// `[limits]`: what one client may hold.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Most connections open at once from one source address, on the gRPC port and on the
    /// HTTPS port each; more are closed at once. Keep it well under `max_connections` (and
    /// under the HTTPS limit of 256), so that one address cannot take every slot. Nodes behind
    /// one NAT address count together. Default 64.
    #[serde(default = "default_max_connections_per_address")]
    pub max_connections_per_address: usize,
    /// Longest a gRPC connection without a client certificate (enrollment) stays open,
    /// seconds, 1..=3600. Default 30.
    #[serde(default = "default_anonymous_connection_secs")]
    pub anonymous_connection_secs: u64,
    /// Most reports being received, decoded and stored at once, all nodes together; more
    /// wait. The memory they may take is about this × `max_report_bytes` × a small factor.
    /// Default 64.
    #[serde(default = "default_max_reports_in_flight")]
    pub max_reports_in_flight: usize,
    /// Most reports in flight at once from one client certificate; more are refused at once
    /// with UNAVAILABLE (an agent sends one at a time, and retries). Default 1.
    #[serde(default = "default_max_reports_in_flight_per_node")]
    pub max_reports_in_flight_per_node: usize,
}

fn default_max_connections_per_address() -> usize {
    DEFAULT_MAX_CONNECTIONS_PER_ADDRESS
}
fn default_anonymous_connection_secs() -> u64 {
    DEFAULT_ANONYMOUS_CONNECTION_SECS
}
fn default_max_reports_in_flight() -> usize {
    DEFAULT_MAX_REPORTS_IN_FLIGHT
}
fn default_max_reports_in_flight_per_node() -> usize {
    DEFAULT_MAX_REPORTS_IN_FLIGHT_PER_NODE
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_connections_per_address: DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
            anonymous_connection_secs: DEFAULT_ANONYMOUS_CONNECTION_SECS,
            max_reports_in_flight: DEFAULT_MAX_REPORTS_IN_FLIGHT,
            max_reports_in_flight_per_node: DEFAULT_MAX_REPORTS_IN_FLIGHT_PER_NODE,
        }
    }
}

impl LimitsConfig {
    /// Record every out-of-range value in `p`.
    pub fn validate(&self, p: &mut Problems) {
        let mut range = |field: &str, v: u64, lo: u64, hi: u64| {
            if !(lo..=hi).contains(&v) {
                p.push(field, format!("{v} is out of range {lo}..={hi}"));
            }
        };
        range(
            "limits.max_connections_per_address",
            self.max_connections_per_address as u64,
            1,
            1_000_000,
        );
        range(
            "limits.anonymous_connection_secs",
            self.anonymous_connection_secs,
            1,
            3600,
        );
        range(
            "limits.max_reports_in_flight",
            self.max_reports_in_flight as u64,
            1,
            4096,
        );
        range(
            "limits.max_reports_in_flight_per_node",
            self.max_reports_in_flight_per_node as u64,
            1,
            4096,
        );
    }
}

/// Connections open per source address, under one limit.
#[derive(Debug, Clone)]
pub struct PerAddress {
    limit: usize,
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// One connection's place under [`PerAddress`]'s limit, given back when dropped.
#[derive(Debug)]
pub struct AddressSlot {
    ip: IpAddr,
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl PerAddress {
    /// At most `limit` connections per address.
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            open: Arc::default(),
        }
    }

    /// A place for a connection from `ip`, or `None` when the address holds `limit` already.
    pub fn take(&self, ip: IpAddr) -> Option<AddressSlot> {
        let ip = crate::geo::normalise(ip);
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let n = open.entry(ip).or_insert(0);
        if *n >= self.limit {
            return None;
        }
        *n += 1;
        Some(AddressSlot {
            ip,
            open: self.open.clone(),
        })
    }

    /// The limit.
    pub fn limit(&self) -> usize {
        self.limit
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = open.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_gets_its_limit_and_its_places_back() {
        let per = PerAddress::new(2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let s1 = per.take(a).unwrap();
        let _s2 = per.take(a).unwrap();
        assert!(per.take(a).is_none());
        assert!(per.take(b).is_some());
        drop(s1);
        assert!(per.take(a).is_some());
    }

    #[test]
    fn out_of_range_limits_are_named() {
        let mut p = Problems::default();
        LimitsConfig {
            max_connections_per_address: 0,
            anonymous_connection_secs: 0,
            max_reports_in_flight: 0,
            max_reports_in_flight_per_node: 0,
        }
        .validate(&mut p);
        assert_eq!(p.0.len(), 4, "{:?}", p.0);
        assert!(p.0[0].starts_with("limits.max_connections_per_address"));
    }
}
