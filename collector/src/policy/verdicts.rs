//! `[verdicts]`: how a destination counts when its sources disagree or physics rules its
//! country out.
//!
//! A stored verdict keeps every source's answer, each with its speed-of-light check
//! (`geo::physics`). [`VerdictRules::count`] reads them in this order:
//! 1. an operator override decides, never second-guessed;
//! 2. answers the speed of light rules out are set aside; when that leaves none, the
//!    destination is [`Counted::Review`] (default `impossible = "review"`: not foreign, shown
//!    for review) — or, with `impossible = "foreign"`, physics is ignored altogether;
//! 3. the remaining answers agree: their country decides;
//! 4. they disagree (contested): `contested = "strict"` counts the destination outside when
//!    any of them is outside the jurisdiction (the first such country names it), else inside;
//!    `contested = "source:PREFIX"` takes the answer of the first source whose build starts
//!    with PREFIX (strict when that source did not answer).
//!
//! A row stored before answers were kept has only its country and its check.

use serde_json::json;
use sov_proto::pb;

use super::file::VerdictsConfig;

/// How a contested verdict counts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Contested {
    /// Any source outside means outside.
    #[default]
    Strict,
    /// The first source whose build starts with this prefix decides.
    Source(String),
}

/// How a physically impossible database verdict counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Impossible {
    /// Not foreign; surfaced for review.
    #[default]
    Review,
    /// As its country says (physics ignored).
    Foreign,
}

/// `[verdicts]`, validated.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VerdictRules {
    /// `contested`.
    pub contested: Contested,
    /// `impossible`.
    pub impossible: Impossible,
}

/// How one destination counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Counted {
    /// No source places it.
    Unresolved,
    /// Inside the jurisdiction.
    Inside,
    /// Outside, in this country.
    Outside(String),
    /// Every answer is ruled out by the speed of light; the country claimed first is kept
    /// for the reviewer.
    Review(String),
}

impl VerdictRules {
    /// Validate `[verdicts]`: every problem as (field, message).
    pub fn parse(cfg: &VerdictsConfig) -> Result<VerdictRules, Vec<(&'static str, String)>> {
        let mut problems = Vec::new();
        let contested = match cfg.contested.as_str() {
            "strict" => Contested::Strict,
            other => match other.strip_prefix("source:") {
                Some(prefix) if !prefix.trim().is_empty() => Contested::Source(prefix.to_owned()),
                _ => {
                    problems.push((
                        "contested",
                        format!(
                            "{other:?} is neither \"strict\" nor \"source:PREFIX\" (e.g. \"source:geofeed\")"
                        ),
                    ));
                    Contested::Strict
                }
            },
        };
        let impossible = match cfg.impossible.as_str() {
            "review" => Impossible::Review,
            "foreign" => Impossible::Foreign,
            other => {
                problems.push((
                    "impossible",
                    format!("{other:?} is neither \"review\" nor \"foreign\""),
                ));
                Impossible::Review
            }
        };
        if problems.is_empty() {
            Ok(VerdictRules {
                contested,
                impossible,
            })
        } else {
            Err(problems)
        }
    }

    /// The rules as JSON (the policy view).
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "contested": match &self.contested {
                Contested::Strict => "strict".to_owned(),
                Contested::Source(p) => format!("source:{p}"),
            },
            "impossible": match self.impossible {
                Impossible::Review => "review",
                Impossible::Foreign => "foreign",
            },
        })
    }

    /// How the destination of `row` counts; `inside` says whether a country is inside the
    /// jurisdiction.
    pub fn count(&self, row: &pb::EgressRow, inside: impl Fn(&str) -> bool) -> Counted {
        let place = |c: &str| {
            if c.is_empty() {
                Counted::Unresolved
            } else if inside(c) {
                Counted::Inside
            } else {
                Counted::Outside(c.to_owned())
            }
        };
        let honour_physics = self.impossible == Impossible::Review;
        if row.answers.is_empty() {
            if honour_physics && row.physics == "impossible" && !row.country.is_empty() {
                return Counted::Review(row.country.clone());
            }
            return place(&row.country);
        }
        if let Some(o) = row.answers.iter().find(|a| a.kind == "override") {
            return place(&o.country);
        }
        let candidates: Vec<&pb::GeoAnswer> = row
            .answers
            .iter()
            .filter(|a| !honour_physics || !a.impossible)
            .collect();
        let Some(first) = candidates.first() else {
            return Counted::Review(row.answers[0].country.clone());
        };
        if candidates.iter().all(|a| a.country == first.country) {
            return place(&first.country);
        }
        if let Contested::Source(prefix) = &self.contested
            && let Some(a) = candidates
                .iter()
                .find(|a| a.source.starts_with(prefix.as_str()))
        {
            return place(&a.country);
        }
        match candidates.iter().find(|a| !inside(&a.country)) {
            Some(a) => place(&a.country),
            None => Counted::Inside,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(source: &str, country: &str, kind: &str, impossible: bool) -> pb::GeoAnswer {
        pb::GeoAnswer {
            source: source.into(),
            country: country.into(),
            kind: kind.into(),
            impossible,
            distance_km: 0,
        }
    }

    fn row(answers: Vec<pb::GeoAnswer>) -> pb::EgressRow {
        pb::EgressRow {
            country: answers
                .first()
                .map(|a| a.country.clone())
                .unwrap_or_default(),
            answers,
            ..pb::EgressRow::default()
        }
    }

    fn rules(contested: &str, impossible: &str) -> VerdictRules {
        VerdictRules::parse(&VerdictsConfig {
            contested: contested.into(),
            impossible: impossible.into(),
        })
        .unwrap()
    }

    const MA: fn(&str) -> bool = |c| c == "MA";

    #[test]
    fn strict_counts_a_contested_destination_outside_when_any_source_is_outside() {
        let r = row(vec![
            answer("geofeed:cloud@2026-11-01", "MA", "geofeed", false),
            answer("embedded:iptocc-1.4.175", "US", "registry", false),
        ]);
        assert_eq!(
            rules("strict", "review").count(&r, MA),
            Counted::Outside("US".into())
        );
        assert_eq!(
            rules("source:geofeed", "review").count(&r, MA),
            Counted::Inside
        );
        assert_eq!(
            rules("source:embedded", "review").count(&r, MA),
            Counted::Outside("US".into())
        );
        // The named source did not answer: strict.
        assert_eq!(
            rules("source:mmdb", "review").count(&r, MA),
            Counted::Outside("US".into())
        );
        let agree = row(vec![
            answer("a", "MA", "database", false),
            answer("b", "MA", "registry", false),
        ]);
        assert_eq!(rules("strict", "review").count(&agree, MA), Counted::Inside);
    }

    #[test]
    fn physics_sets_impossible_answers_aside_and_an_override_is_never_second_guessed() {
        let only_fr = row(vec![answer("geofeed:test", "FR", "geofeed", true)]);
        assert_eq!(
            rules("strict", "review").count(&only_fr, MA),
            Counted::Review("FR".into())
        );
        assert_eq!(
            rules("strict", "foreign").count(&only_fr, MA),
            Counted::Outside("FR".into())
        );
        // Physics settles a contest: France is ruled out, Morocco is possible.
        let settled = row(vec![
            answer("mmdb:x", "FR", "database", true),
            answer("embedded:iptocc", "MA", "registry", false),
        ]);
        assert_eq!(
            rules("strict", "review").count(&settled, MA),
            Counted::Inside
        );
        let overridden = row(vec![
            answer("override:192.0.2.0/24", "FR", "override", false),
            answer("geofeed:test", "FR", "geofeed", true),
        ]);
        assert_eq!(
            rules("strict", "review").count(&overridden, MA),
            Counted::Outside("FR".into())
        );
        assert_eq!(
            rules("strict", "review").count(&row(vec![]), MA),
            Counted::Unresolved
        );
    }

    #[test]
    fn bad_verdict_rules_are_refused_naming_the_field() {
        let e = VerdictRules::parse(&VerdictsConfig {
            contested: "majority".into(),
            impossible: "ignore".into(),
        })
        .unwrap_err();
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].0, "contested");
        assert!(e[0].1.contains("\"majority\""), "{e:?}");
        assert_eq!(e[1].0, "impossible");
        assert!(
            VerdictRules::parse(&VerdictsConfig {
                contested: "source:".into(),
                impossible: "review".into(),
            })
            .is_err()
        );
    }
}
