//! `location-mismatch` (warning): the address a node's reports arrive from (as the collector
//! sees it, after any NAT) geolocates to another country than the node's — its site's in the
//! policy, else the one it declares. Subject `location`.
//!
//! Only nodes that reported within `silence_secs` are judged (a silent node is
//! `agent-silent`'s), and only addresses some database places. Resolves after `quiet_secs`
//! once the two agree (the declaration was corrected, or the node moved back).

use serde_json::json;

use super::{Context, Rule, policy_quiet_ms, secs_to_ms};
use crate::breach::{Observation, Severity};

/// Rule name.
pub const LOCATION_MISMATCH: &str = "location-mismatch";

/// The rule.
pub const RULE: Rule = Rule {
    name: LOCATION_MISMATCH,
    observe,
    quiet_ms: policy_quiet_ms,
};

fn observe(ctx: &Context<'_>) -> Vec<Observation> {
    let silence_ms = secs_to_ms(ctx.policy.thresholds.silence_secs);
    ctx.facts
        .nodes
        .iter()
        .filter(|n| ctx.now_unix_ms.saturating_sub(n.last_seen_unix_ms) <= silence_ms)
        .filter_map(|n| {
            let peer = n.peer.as_ref()?;
            let expected = ctx.node_country(&n.node);
            if peer.country.is_empty()
                || expected.is_empty()
                || peer.country.eq_ignore_ascii_case(&expected)
            {
                return None;
            }
            Some(Observation {
                rule: LOCATION_MISMATCH.to_owned(),
                node: n.node.clone(),
                subject: "location".to_owned(),
                severity: Severity::Warning,
                evidence: json!({
                    "site": n.site,
                    "declared_country": n.declared_country,
                    "expected_country": expected,
                    "observed_country": peer.country,
                    "address": peer.address,
                    "asn": peer.asn,
                    "source": peer.source,
                }),
                at_unix_ms: ctx.now_unix_ms,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{NOW, node, policy, run};
    use super::*;
    use crate::policy::rules::Facts;
    use crate::store::NodePeer;

    fn peer(node: &str, country: &str) -> Option<NodePeer> {
        Some(NodePeer {
            node: node.to_owned(),
            address: "192.0.2.1".to_owned(),
            country: country.to_owned(),
            asn: 0,
            source: "override:192.0.2.0/24".to_owned(),
            seen_unix_ms: NOW,
        })
    }

    #[test]
    fn a_node_reporting_from_another_country_is_observed() {
        let p = policy("[[site]]\nname = \"paris\"\ncountry = \"FR\"\n");
        let mut liar = node("liar", "rabat", "MA");
        liar.peer = peer("liar", "ES");
        let mut honest = node("honest", "rabat", "MA");
        honest.peer = peer("honest", "ma");
        let mut sited = node("sited", "paris", "MA");
        sited.peer = peer("sited", "FR");
        let mut unknown = node("unknown", "rabat", "MA");
        unknown.peer = peer("unknown", "");
        let mut silent = node("silent", "rabat", "MA");
        silent.peer = peer("silent", "ES");
        silent.last_seen_unix_ms = NOW - 31_000;
        let f = Facts {
            nodes: vec![liar, honest, sited, unknown, silent],
            ..Facts::default()
        };
        let obs = run(&RULE, &p, &f);
        assert_eq!(obs.len(), 1, "{obs:?}");
        assert_eq!(obs[0].node, "liar");
        assert_eq!(obs[0].evidence["observed_country"], "ES");
        assert_eq!(obs[0].evidence["expected_country"], "MA");
    }
}
