//! `[[allow]]`: foreign destinations that are not breaches, each with a reason and an optional
//! expiry.
//!
//! An entry names at most one of a CIDR block, an autonomous system or a country, and may
//! scope itself to workloads: a Kubernetes `namespace` and/or a container `image` (globs);
//! a scoped entry allows its destination (every destination when it names none) only to
//! traffic from those pods or containers, never to host processes. An entry names a
//! destination, a scope, or both. The most specific entry answers: CIDR blocks (longest
//! prefix first), then ASNs, then countries, then scope-only entries; within a kind, file
//! order. An entry whose `expires` has passed allows nothing. Blocks are
//! parsed by [`crate::geo::overrides::parse_cidr`] (host bits masked off; IPv4-mapped IPv6
//! blocks stored as IPv4), and addresses are normalised with [`crate::geo::normalise`] as
//! geolocation does.

use std::net::{IpAddr, Ipv4Addr};

use super::models::glob_match;
use crate::geo::overrides::parse_cidr;

/// What an entry allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowTarget {
    /// A block: its network (host bits zero) and prefix length.
    Cidr {
        /// Network address.
        net: IpAddr,
        /// Prefix length.
        len: u8,
    },
    /// An autonomous system.
    Asn(u32),
    /// An ISO 3166-1 alpha-2 country.
    Country(String),
    /// Every destination (an entry that names only a namespace or image scope).
    Any,
}

impl AllowTarget {
    /// Parse a CIDR block.
    pub fn cidr(text: &str) -> Result<AllowTarget, String> {
        let (net, len) = parse_cidr(text)?;
        let (net, len) = match net {
            IpAddr::V6(v6) if len >= 96 && v6.to_ipv4_mapped().is_some() => (
                IpAddr::V4(Ipv4Addr::from_bits(v6.to_bits() as u32)),
                len - 96,
            ),
            _ => (net, len),
        };
        Ok(AllowTarget::Cidr { net, len })
    }

    /// Sort key: CIDR (longer prefix first), then ASN, then country.
    fn rank(&self) -> (u8, u8) {
        match self {
            AllowTarget::Cidr { len, .. } => (0, u8::MAX - len),
            AllowTarget::Asn(_) => (1, 0),
            AllowTarget::Country(_) => (2, 0),
            AllowTarget::Any => (3, 0),
        }
    }
}

impl std::fmt::Display for AllowTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AllowTarget::Cidr { net, len } => write!(f, "cidr {net}/{len}"),
            AllowTarget::Asn(asn) => write!(f, "asn {asn}"),
            AllowTarget::Country(c) => write!(f, "country {c}"),
            AllowTarget::Any => write!(f, "any destination"),
        }
    }
}

/// One parsed `[[allow]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowEntry {
    /// Position in `[[allow]]`.
    pub index: usize,
    /// What it allows.
    pub target: AllowTarget,
    /// Why (required).
    pub reason: String,
    /// `expires` as written (RFC 3339).
    pub expires: Option<String>,
    /// `expires` in Unix milliseconds.
    pub expires_unix_ms: Option<i64>,
    /// Only traffic from pods in a Kubernetes namespace matching this glob.
    pub namespace: Option<String>,
    /// Only traffic from containers whose image matches this glob.
    pub image: Option<String>,
}

/// Where traffic came from, in container terms, for scoped `[[allow]]` entries: "" for a
/// host process (or a container outside Kubernetes, for the namespace).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Workload<'a> {
    /// Kubernetes namespace.
    pub namespace: &'a str,
    /// Container image reference.
    pub image: &'a str,
}

impl AllowEntry {
    /// True unless `expires` is at or before `now_unix_ms`.
    pub fn is_active(&self, now_unix_ms: i64) -> bool {
        self.expires_unix_ms.is_none_or(|e| now_unix_ms < e)
    }

    fn matches(&self, ip: IpAddr, asn: Option<u32>, country: &str, from: &Workload<'_>) -> bool {
        let scoped = |glob: &Option<String>, value: &str| {
            glob.as_deref()
                .is_none_or(|g| !value.is_empty() && glob_match(g, value))
        };
        if !scoped(&self.namespace, from.namespace) || !scoped(&self.image, from.image) {
            return false;
        }
        match &self.target {
            AllowTarget::Cidr { net, len } => in_block(*net, *len, ip),
            AllowTarget::Asn(a) => asn == Some(*a),
            AllowTarget::Country(c) => !country.is_empty() && c.eq_ignore_ascii_case(country),
            AllowTarget::Any => true,
        }
    }
}

fn in_block(net: IpAddr, len: u8, ip: IpAddr) -> bool {
    let (net, ip, width) = match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(i)) => (u128::from(n.to_bits()), u128::from(i.to_bits()), 32),
        (IpAddr::V6(n), IpAddr::V6(i)) => (n.to_bits(), i.to_bits(), 128),
        _ => return false,
    };
    let host_bits = width - u32::from(len);
    net.checked_shr(host_bits).unwrap_or(0) == ip.checked_shr(host_bits).unwrap_or(0)
}

/// Why a destination is allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowVerdict {
    /// The entry's reason.
    pub reason: String,
    /// The entry's position in `[[allow]]` (file order).
    pub entry: usize,
}

/// The entries, most specific first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList {
    entries: Vec<AllowEntry>,
}

impl AllowList {
    /// Order the entries most specific first (stable: file order breaks ties).
    pub fn new(mut entries: Vec<AllowEntry>) -> Self {
        entries.sort_by_key(|e| e.target.rank());
        Self { entries }
    }

    /// The most specific active entry allowing the destination to a host process.
    pub fn allowed(
        &self,
        ip: IpAddr,
        asn: Option<u32>,
        country: &str,
        now_unix_ms: i64,
    ) -> Option<AllowVerdict> {
        self.allowed_from(ip, asn, country, &Workload::default(), now_unix_ms)
    }

    /// The most specific active entry allowing the destination to traffic from `from`.
    pub fn allowed_from(
        &self,
        ip: IpAddr,
        asn: Option<u32>,
        country: &str,
        from: &Workload<'_>,
        now_unix_ms: i64,
    ) -> Option<AllowVerdict> {
        let ip = crate::geo::normalise(ip);
        self.entries
            .iter()
            .find(|e| e.is_active(now_unix_ms) && e.matches(ip, asn, country, from))
            .map(|e| AllowVerdict {
                reason: e.reason.clone(),
                entry: e.index,
            })
    }

    /// The entries in file order.
    pub fn entries(&self) -> Vec<&AllowEntry> {
        let mut v: Vec<&AllowEntry> = self.entries.iter().collect();
        v.sort_by_key(|e| e.index);
        v
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing is allowed.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn entry(index: usize, target: AllowTarget, expires_unix_ms: Option<i64>) -> AllowEntry {
        AllowEntry {
            index,
            target,
            reason: format!("reason {index}"),
            expires: None,
            expires_unix_ms,
            namespace: None,
            image: None,
        }
    }

    #[test]
    fn scoped_entries_allow_only_their_namespace_or_image() {
        let mut fr = entry(0, AllowTarget::Country("FR".into()), None);
        fr.namespace = Some("backup".into());
        let mut any = entry(1, AllowTarget::Any, None);
        any.image = Some("registry.example/mirror/*".into());
        let list = AllowList::new(vec![fr, any]);
        let from = |namespace, image| Workload { namespace, image };
        let at = |c: &str, w: Workload<'_>| {
            list.allowed_from(ip("192.0.2.1"), None, c, &w, 0)
                .map(|v| v.entry)
        };
        assert_eq!(at("FR", from("backup", "")), Some(0));
        assert_eq!(at("FR", from("inference", "")), None, "another namespace");
        assert_eq!(at("FR", from("", "")), None, "a host process");
        assert_eq!(
            at("US", from("inference", "registry.example/mirror/sync:2")),
            Some(1),
            "every destination for that image"
        );
        assert_eq!(list.allowed(ip("192.0.2.1"), None, "FR", 0), None);
    }

    #[test]
    fn blocks_contain_their_addresses_only() {
        let t = |s| match AllowTarget::cidr(s).unwrap() {
            AllowTarget::Cidr { net, len } => (net, len),
            _ => unreachable!(),
        };
        let (n, l) = t("203.0.113.7/24");
        assert!(in_block(n, l, ip("203.0.113.200")));
        assert!(!in_block(n, l, ip("203.0.114.1")));
        assert!(!in_block(n, l, ip("2001:db8::1")));
        let (n, l) = t("0.0.0.0/0");
        assert!(in_block(n, l, ip("8.8.8.8")));
        let (n, l) = t("::/0");
        assert!(in_block(n, l, ip("2001:db8::1")));
        assert!(!in_block(n, l, ip("8.8.8.8")));
        let (n, l) = t("2001:db8::/32");
        assert!(in_block(n, l, ip("2001:db8:ffff::1")));
        assert_eq!(t("::ffff:198.51.100.0/120"), (ip("198.51.100.0"), 24));
        assert!(AllowTarget::cidr("10.0.0.0/33").is_err());
    }

    #[test]
    fn the_most_specific_active_entry_answers_and_expired_ones_allow_nothing() {
        let list = AllowList::new(vec![
            entry(0, AllowTarget::Country("FR".into()), None),
            entry(1, AllowTarget::Asn(16276), Some(2_000)),
            entry(2, AllowTarget::cidr("51.0.0.0/8").unwrap(), None),
            entry(3, AllowTarget::cidr("51.68.0.0/16").unwrap(), Some(1_000)),
        ]);
        let at = |ip_: &str, asn, c: &str, now| list.allowed(ip(ip_), asn, c, now).map(|v| v.entry);
        // Before every expiry: the /16 wins over the /8, the ASN and the country.
        assert_eq!(at("51.68.1.1", Some(16276), "FR", 500), Some(3));
        // The /16 has expired (expiry is exclusive): the /8 answers.
        assert_eq!(at("51.68.1.1", Some(16276), "FR", 1_000), Some(2));
        // Outside both blocks: the ASN, then after its expiry the country.
        assert_eq!(at("57.1.1.1", Some(16276), "FR", 1_999), Some(1));
        assert_eq!(at("57.1.1.1", Some(16276), "fr", 2_000), Some(0));
        assert_eq!(at("57.1.1.1", None, "DE", 0), None);
        assert_eq!(at("57.1.1.1", None, "", 0), None);
        // IPv4-mapped addresses are looked up as IPv4.
        assert_eq!(at("::ffff:51.1.1.1", None, "", 5_000), Some(2));
        let v = list.allowed(ip("51.1.1.1"), None, "", 0).unwrap();
        assert_eq!(v.reason, "reason 2");
        assert_eq!(
            list.entries().iter().map(|e| e.index).collect::<Vec<_>>(),
            [0, 1, 2, 3]
        );
    }
}
