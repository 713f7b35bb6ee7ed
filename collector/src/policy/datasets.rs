//! Dataset classes: `[[dataset]]` rules matched against the dataset files training runs read.
//!
//! A rule's `match` is one of:
//! - `sha256:<64 hex>`: the file's content hash, when the agent reported one (it hashes dataset
//!   files up to `[training] dataset_hash_max_bytes`; larger ones are known by path and name
//!   only);
//! - `path:<glob>`, or a bare glob that starts with `/`: the file's path as the process sees it
//!   (`/srv/data/national/*`);
//! - `name:<glob>`: the file name alone (`darija-*.parquet`);
//! - `repo:<glob>`, or any other bare glob: the Hugging Face dataset id the cache layout names
//!   (`…/datasets--org--name/…` → `org/name`), as models are matched by repository id.
//!
//! Globs are those of `[[model]]` ([`glob_match`]: case-insensitive, `*` any run of characters,
//! `/` included, `?` exactly one). The first matching rule wins; a dataset no rule matches is
//! unclassified. The class is the models' ([`ModelClass`]): "restricted" or "public".

use super::models::{ModelClass, glob_match};

/// The prefixes a dataset `match` may carry.
pub const DATASET_MATCH_PREFIXES: &[&str] = &["sha256:", "path:", "name:", "repo:"];

/// What is known of one dataset file a run reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DatasetFacts<'a> {
    /// Path as the process sees it.
    pub path: &'a str,
    /// Lower-case hex sha256 ("" when the agent did not hash it).
    pub sha256: &'a str,
    /// Hugging Face dataset id ("" outside a datasets cache).
    pub repo: &'a str,
}

/// How a `[[dataset]]` rule matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatasetMatcher {
    /// Lower-case hex digest.
    Sha256(String),
    /// Whole-path glob.
    Path(String),
    /// File-name glob.
    Name(String),
    /// Dataset-id glob.
    Repo(String),
}

/// One parsed `[[dataset]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetRule {
    /// Position in `[[dataset]]`.
    pub index: usize,
    /// The `match` as written.
    pub pattern: String,
    /// How it matches.
    pub matcher: DatasetMatcher,
    /// Restricted or public (never unclassified).
    pub class: ModelClass,
}

impl DatasetRule {
    /// Parse one rule; the problems are `(field, message)` pairs (`match`, `class`).
    pub fn parse(
        index: usize,
        pattern: &str,
        class: &str,
    ) -> Result<DatasetRule, Vec<(&'static str, String)>> {
        let mut problems = Vec::new();
        let class = match class {
            "restricted" => Some(ModelClass::Restricted),
            "public" => Some(ModelClass::Public),
            other => {
                problems.push((
                    "class",
                    format!("{other:?} is not \"restricted\" or \"public\""),
                ));
                None
            }
        };
        let matcher = parse_matcher(pattern).map_err(|e| problems.push(("match", e)));
        match (matcher, class) {
            (Ok(matcher), Some(class)) => Ok(DatasetRule {
                index,
                pattern: pattern.to_owned(),
                matcher,
                class,
            }),
            _ => Err(problems),
        }
    }

    /// True when the rule matches the dataset file.
    pub fn matches(&self, d: &DatasetFacts<'_>) -> bool {
        match &self.matcher {
            DatasetMatcher::Sha256(hex) => {
                let got = d.sha256.trim();
                let got = got.strip_prefix("sha256:").unwrap_or(got);
                !got.is_empty() && got.eq_ignore_ascii_case(hex)
            }
            DatasetMatcher::Path(glob) => !d.path.is_empty() && glob_match(glob, d.path),
            DatasetMatcher::Name(glob) => {
                let name = d.path.rsplit('/').next().unwrap_or_default();
                !name.is_empty() && glob_match(glob, name)
            }
            DatasetMatcher::Repo(glob) => !d.repo.is_empty() && glob_match(glob, d.repo),
        }
    }
}

fn parse_matcher(pattern: &str) -> Result<DatasetMatcher, String> {
    let p = pattern.trim();
    if p.is_empty() {
        return Err(
            "is empty: give a dataset-id glob, a path glob starting with \"/\", or one of sha256:, path:, name:, repo:"
                .to_owned(),
        );
    }
    let lower = p.to_ascii_lowercase();
    let rest_of = |prefix: &str| {
        lower
            .starts_with(prefix)
            .then(|| p.get(prefix.len()..).unwrap_or_default().trim())
    };
    if let Some(hex) = rest_of("sha256:") {
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "{pattern:?}: a sha256 is 64 hexadecimal digits, got {} characters",
                hex.len()
            ));
        }
        return Ok(DatasetMatcher::Sha256(hex.to_ascii_lowercase()));
    }
    for (prefix, make) in [
        (
            "path:",
            DatasetMatcher::Path as fn(String) -> DatasetMatcher,
        ),
        ("name:", DatasetMatcher::Name),
        ("repo:", DatasetMatcher::Repo),
    ] {
        if let Some(rest) = rest_of(prefix) {
            if rest.is_empty() {
                return Err(format!("{pattern:?} has nothing after {prefix:?}"));
            }
            return Ok(make(rest.to_owned()));
        }
    }
    if p.starts_with('/') {
        return Ok(DatasetMatcher::Path(p.to_owned()));
    }
    if let Some((prefix, _)) = p.split_once(':') {
        return Err(format!(
            "{pattern:?}: unknown prefix \"{prefix}:\" (known: {}; a dataset id has no \":\")",
            DATASET_MATCH_PREFIXES.join(" ")
        ));
    }
    Ok(DatasetMatcher::Repo(p.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "ab3f000000000000000000000000000000000000000000000000000000000001";

    fn rule(pattern: &str) -> DatasetRule {
        DatasetRule::parse(0, pattern, "restricted").unwrap()
    }

    fn facts<'a>(path: &'a str, sha256: &'a str, repo: &'a str) -> DatasetFacts<'a> {
        DatasetFacts { path, sha256, repo }
    }

    #[test]
    fn each_match_kind_matches_what_it_names() {
        let f = facts(
            "/h/datasets--gov-ma--census/snapshots/r/train-0.parquet",
            HEX,
            "gov-ma/census",
        );
        for hit in [
            format!("sha256:{}", HEX.to_uppercase()),
            "path:/h/datasets--gov-ma--*".to_owned(),
            "/h/*.parquet".to_owned(),
            "name:train-?.parquet".to_owned(),
            "repo:gov-ma/*".to_owned(),
            "GOV-MA/census".to_owned(),
        ] {
            assert!(rule(&hit).matches(&f), "{hit}");
        }
        for miss in [
            format!("sha256:{}", "0".repeat(64)),
            "path:/srv/*".to_owned(),
            "name:train-0.arrow".to_owned(),
            "other/*".to_owned(),
        ] {
            assert!(!rule(&miss).matches(&f), "{miss}");
        }
        // A name rule looks at the file name only; a repo rule needs a dataset id.
        assert!(!rule("name:h").matches(&facts("/h/x.parquet", "", "")));
        assert!(!rule("*").matches(&facts("/d/x.parquet", "", "")));
        assert!(!rule(&format!("sha256:{HEX}")).matches(&facts("/d/x", "", "")));
    }

    #[test]
    fn bad_matches_and_classes_name_their_field() {
        let e = DatasetRule::parse(0, "", "secret").unwrap_err();
        assert_eq!(
            e.iter().map(|p| p.0).collect::<Vec<_>>(),
            ["class", "match"]
        );
        for bad in ["sha256:abc", "path:", "name: ", "hf:org/x"] {
            let e = DatasetRule::parse(0, bad, "public").unwrap_err();
            assert_eq!(e[0].0, "match", "{bad}");
        }
        let e = DatasetRule::parse(0, "hf:x", "public").unwrap_err();
        assert!(e[0].1.contains("unknown prefix \"hf:\""), "{e:?}");
        assert_eq!(
            rule("nameless/ds").matcher,
            DatasetMatcher::Repo("nameless/ds".into())
        );
    }
}
