//! Model classes: `[[model]]` rules matched against what is known of a model.
//!
//! A rule's `match` is one of:
//! - `sha256:<64 hex>`: the weight file's content hash (case-insensitive);
//! - `publisher:<glob>`: the model's publisher, or when none is known the organisation of its
//!   repository id;
//! - `ollama:<name:tag glob>`: an Ollama model name (`llama3:8b`, `ns/model:tag`); without a
//!   `:` it matches every tag (`ollama:llama3` matches `llama3:8b`), and a leading
//!   `registry.ollama.ai/` or `library/` is dropped as Ollama itself does;
//! - `gguf:<glob>`: a GGUF `general.name`;
//! - `repo:<glob>` or a bare glob such as `meta-llama/*`: a repository id;
//! - `image:<glob>`: a container image reference (`registry.example/llm/*`): the model is in
//!   such an image when one of its copies lives in, or one of its users runs in, a container
//!   of that image (weights baked into an image layer, or mounted into its containers);
//! - `namespace:<glob>`: a Kubernetes namespace, the same way (a copy in, or a user in, a pod
//!   of that namespace).
//!
//! `gguf:` and repository globs both test the model name (the collector does not know which
//! kind of name it holds); `ollama:` tests only names in `name:tag` form. Globs are
//! case-insensitive; `*` matches any run of characters (`/` included) and `?` exactly one.
//! The first matching rule wins.

use super::publishers::org_of;

/// The prefixes a `match` may carry.
pub const MATCH_PREFIXES: &[&str] = &[
    "sha256:",
    "publisher:",
    "ollama:",
    "gguf:",
    "repo:",
    "image:",
    "namespace:",
];

/// A model's class under the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ModelClass {
    /// Weights that must not leave the jurisdiction.
    Restricted,
    /// Weights anyone may hold anywhere.
    Public,
    /// No rule matched.
    Unclassified,
}

impl ModelClass {
    /// "restricted", "public" or "unclassified".
    pub fn as_str(self) -> &'static str {
        match self {
            ModelClass::Restricted => "restricted",
            ModelClass::Public => "public",
            ModelClass::Unclassified => "unclassified",
        }
    }
}

impl std::fmt::Display for ModelClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What is known of one model, as the agent reported it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ModelFacts<'a> {
    /// Repository id, GGUF name or Ollama `name:tag`.
    pub model: &'a str,
    /// Content hash of a weight file (lower-case hex, optionally `sha256:`-prefixed); "" when unknown.
    pub sha256: &'a str,
    /// Publisher / organisation; "" when unknown.
    pub publisher: &'a str,
    /// Images of the containers its copies live in or its users run in (see [`ModelPlaces`]).
    pub images: &'a [String],
    /// Kubernetes namespaces of the pods its copies live in or its users run in.
    pub namespaces: &'a [String],
}

/// Where a model's copies and users are, in container terms: the distinct images and
/// Kubernetes namespaces, for `image:` and `namespace:` rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelPlaces {
    /// Image references, sorted, once each.
    pub images: Vec<String>,
    /// Kubernetes namespaces, sorted, once each.
    pub namespaces: Vec<String>,
}

impl ModelPlaces {
    /// The places of a model as the collector lists it.
    pub fn of(m: &sov_proto::pb::ModelSummary) -> Self {
        let containers = m
            .copies
            .iter()
            .filter_map(|c| c.container.as_ref())
            .chain(m.users.iter().filter_map(|u| u.container.as_ref()));
        let mut p = Self::default();
        for c in containers {
            if !c.image.is_empty() {
                p.images.push(c.image.clone());
            }
            if !c.pod_namespace.is_empty() {
                p.namespaces.push(c.pod_namespace.clone());
            }
        }
        for v in [&mut p.images, &mut p.namespaces] {
            v.sort_unstable();
            v.dedup();
        }
        p
    }

    /// The model's facts with these places.
    pub fn facts<'a>(&'a self, m: &'a sov_proto::pb::ModelSummary) -> ModelFacts<'a> {
        ModelFacts {
            model: &m.model,
            sha256: &m.sha256,
            publisher: &m.publisher,
            images: &self.images,
            namespaces: &self.namespaces,
        }
    }
}

/// How a rule matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelMatcher {
    /// Lower-case hex digest.
    Sha256(String),
    /// Publisher glob.
    Publisher(String),
    /// Ollama `name:tag` glob (a tag is always present: `*` when none was written).
    Ollama(String),
    /// GGUF name glob.
    Gguf(String),
    /// Repository-id glob.
    Repo(String),
    /// Container image glob.
    Image(String),
    /// Kubernetes namespace glob.
    Namespace(String),
}

/// One parsed `[[model]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelRule {
    /// Position in `[[model]]`.
    pub index: usize,
    /// The `match` as written.
    pub pattern: String,
    /// How it matches.
    pub matcher: ModelMatcher,
    /// Restricted or public (never unclassified).
    pub class: ModelClass,
}

impl ModelRule {
    /// Parse one rule; the problems are `(field, message)` pairs (`match`, `class`).
    pub fn parse(
        index: usize,
        pattern: &str,
        class: &str,
    ) -> Result<ModelRule, Vec<(&'static str, String)>> {
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
            (Ok(matcher), Some(class)) => Ok(ModelRule {
                index,
                pattern: pattern.to_owned(),
                matcher,
                class,
            }),
            _ => Err(problems),
        }
    }

    /// True when the rule matches the model.
    pub fn matches(&self, m: &ModelFacts<'_>) -> bool {
        match &self.matcher {
            ModelMatcher::Sha256(hex) => {
                let got = m.sha256.trim();
                let got = strip_prefix_ci(got, "sha256:").unwrap_or(got);
                !got.is_empty() && got.eq_ignore_ascii_case(hex)
            }
            ModelMatcher::Publisher(glob) => {
                let publisher = if m.publisher.trim().is_empty() {
                    if m.model.contains('/') {
                        org_of(m.model)
                    } else {
                        ""
                    }
                } else {
                    m.publisher.trim()
                };
                !publisher.is_empty() && glob_match(glob, publisher)
            }
            ModelMatcher::Ollama(glob) => {
                let name = ollama_canonical(m.model.trim());
                name.contains(':') && glob_match(glob, &name)
            }
            ModelMatcher::Gguf(glob) | ModelMatcher::Repo(glob) => {
                let name = m.model.trim();
                !name.is_empty() && glob_match(glob, name)
            }
            ModelMatcher::Image(glob) => m.images.iter().any(|i| glob_match(glob, i)),
            ModelMatcher::Namespace(glob) => m.namespaces.iter().any(|n| glob_match(glob, n)),
        }
    }
}

/// `s` without `prefix` (ASCII case-insensitive). `s` may be anything (a model name from an
/// agent's report, a pattern from the policy file): a multi-byte character across the
/// prefix's length is no match, never a panic (found by the `policy` fuzz target).
fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| s.get(prefix.len()..))
        .flatten()
}

/// Drop Ollama's default registry and namespace, as Ollama names do.
fn ollama_canonical(name: &str) -> String {
    let name = strip_prefix_ci(name, "registry.ollama.ai/").unwrap_or(name);
    let name = strip_prefix_ci(name, "library/").unwrap_or(name);
    name.to_owned()
}

fn parse_matcher(pattern: &str) -> Result<ModelMatcher, String> {
    let p = pattern.trim();
    if p.is_empty() {
        return Err("is empty: give a repository-id glob or one of sha256:, publisher:, ollama:, gguf:, repo:".to_owned());
    }
    let empty = |kind: &str| format!("{pattern:?} has nothing after {kind:?}");
    if let Some(rest) = strip_prefix_ci(p, "sha256:") {
        let hex = rest.trim();
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "{pattern:?}: a sha256 is 64 hexadecimal digits, got {} characters",
                hex.len()
            ));
        }
        return Ok(ModelMatcher::Sha256(hex.to_ascii_lowercase()));
    }
    if let Some(rest) = strip_prefix_ci(p, "publisher:") {
        let rest = rest.trim();
        if rest.is_empty() {
            return Err(empty("publisher:"));
        }
        return Ok(ModelMatcher::Publisher(rest.to_owned()));
    }
    if let Some(rest) = strip_prefix_ci(p, "ollama:") {
        let rest = ollama_canonical(rest.trim());
        if rest.is_empty() || rest.starts_with(':') {
            return Err(empty("ollama:"));
        }
        let glob = if rest.contains(':') {
            rest
        } else {
            format!("{rest}:*")
        };
        return Ok(ModelMatcher::Ollama(glob));
    }
    if let Some(rest) = strip_prefix_ci(p, "gguf:") {
        let rest = rest.trim();
        if rest.is_empty() {
            return Err(empty("gguf:"));
        }
        return Ok(ModelMatcher::Gguf(rest.to_owned()));
    }
    for (prefix, make) in [
        ("image:", ModelMatcher::Image as fn(String) -> ModelMatcher),
        ("namespace:", ModelMatcher::Namespace),
    ] {
        if let Some(rest) = strip_prefix_ci(p, prefix) {
            let rest = rest.trim();
            if rest.is_empty() {
                return Err(empty(prefix));
            }
            return Ok(make(rest.to_owned()));
        }
    }
    if let Some(rest) = strip_prefix_ci(p, "repo:") {
        let rest = rest.trim();
        if rest.is_empty() {
            return Err(empty("repo:"));
        }
        return Ok(ModelMatcher::Repo(rest.to_owned()));
    }
    if let Some((prefix, _)) = p.split_once(':') {
        return Err(format!(
            "{pattern:?}: unknown prefix \"{prefix}:\" (known: {}; a repository id has no \":\")",
            MATCH_PREFIXES.join(" ")
        ));
    }
    Ok(ModelMatcher::Repo(p.to_owned()))
}

/// Case-insensitive glob: `*` matches any run of characters (none included), `?` exactly one.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().flat_map(char::to_lowercase).collect();
    let t: Vec<char> = text.chars().flat_map(char::to_lowercase).collect();
    let (mut pi, mut ti) = (0, 0);
    // Where the last `*` was, and the text position it currently stands for.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if p.get(pi) == Some(&'*') {
            star = Some((pi, ti));
            pi += 1;
        } else if p.get(pi).is_some_and(|&c| c == '?' || c == t[ti]) {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_check_across_a_multibyte_character_is_no_match_and_no_panic() {
        assert_eq!(strip_prefix_ci("gguf:A\u{fffd}tlas", "gguf:Ab"), None);
        assert_eq!(strip_prefix_ci("é", "e"), None);
        assert_eq!(strip_prefix_ci("GGUF:x", "gguf:"), Some("x"));
        assert_eq!(
            ollama_canonical("régistry.ollama.ai/x"),
            "régistry.ollama.ai/x"
        );
    }

    const HEX: &str = "ab3f000000000000000000000000000000000000000000000000000000000001";

    fn rule(i: usize, pattern: &str, class: &str) -> ModelRule {
        ModelRule::parse(i, pattern, class).unwrap()
    }

    fn facts<'a>(model: &'a str, sha256: &'a str, publisher: &'a str) -> ModelFacts<'a> {
        ModelFacts {
            model,
            sha256,
            publisher,
            ..ModelFacts::default()
        }
    }

    #[test]
    fn image_and_namespace_rules_match_where_the_model_is() {
        let images = vec!["registry.example/llm/vllm:0.6".to_owned()];
        let namespaces = vec!["inference".to_owned()];
        let placed = ModelFacts {
            model: "x",
            images: &images,
            namespaces: &namespaces,
            ..ModelFacts::default()
        };
        let image = rule(0, "image:registry.example/llm/*", "restricted");
        assert_eq!(
            image.matcher,
            ModelMatcher::Image("registry.example/llm/*".into())
        );
        assert!(image.matches(&placed));
        assert!(!image.matches(&facts("x", "", "")), "on no container");
        assert!(rule(0, "namespace:infer*", "restricted").matches(&placed));
        assert!(!rule(0, "namespace:default", "restricted").matches(&placed));
        assert_eq!(
            ModelRule::parse(0, "image: ", "public").unwrap_err()[0].0,
            "match"
        );
    }

    #[test]
    fn globs_handle_stars_question_marks_case_and_edges() {
        assert!(glob_match("meta-llama/*", "Meta-Llama/Llama-3.1-8B"));
        assert!(!glob_match("meta-llama/*", "meta-llamaX/x"));
        assert!(glob_match("*", ""));
        assert!(glob_match("", ""));
        assert!(!glob_match("", "a"));
        assert!(glob_match("**", "abc"));
        assert!(glob_match("a*b*c", "aXXbYYc"));
        assert!(!glob_match("a*b*c", "aXXbYY"));
        assert!(
            glob_match("*a", "*ba"),
            "a star in the text is just a character"
        );
        assert!(glob_match("?", "é"));
        assert!(!glob_match("?", ""));
        assert!(!glob_match("??", "a"));
        assert!(glob_match("llama?3*", "LLAMA-3.1"));
        assert!(
            glob_match("*/*", "org/name"),
            "star crosses nothing special"
        );
        assert!(glob_match("*aab", "aaaab"), "backtracks");
        assert!(!glob_match("abc", "ab"));
    }

    #[test]
    fn each_match_kind_matches_what_it_names() {
        let sha = rule(0, &format!("sha256:{}", HEX.to_uppercase()), "restricted");
        assert!(sha.matches(&facts("x", HEX, "")));
        assert!(sha.matches(&facts("x", &format!("sha256:{HEX}"), "")));
        assert!(!sha.matches(&facts("x", "", "")));

        let publisher = rule(0, "publisher:deepseek*", "restricted");
        assert!(publisher.matches(&facts("x", "", "DeepSeek-AI")));
        assert!(publisher.matches(&facts("deepseek-ai/DeepSeek-V3", "", "")));
        assert!(!publisher.matches(&facts("deepseek-v3", "", "")));

        let ollama = rule(0, "ollama:llama3", "public");
        assert!(ollama.matches(&facts("llama3:8b", "", "")));
        assert!(ollama.matches(&facts("registry.ollama.ai/library/llama3:latest", "", "")));
        assert!(!ollama.matches(&facts("llama3.1:8b", "", "")));
        assert!(
            !ollama.matches(&facts("llama3", "", "")),
            "not an Ollama name"
        );
        let tagged = rule(0, "ollama:library/qwen2:7b-*", "public");
        assert!(tagged.matches(&facts("qwen2:7b-instruct", "", "")));
        assert!(!tagged.matches(&facts("qwen2:72b", "", "")));

        let gguf = rule(0, "gguf:Meta Llama 3.1 *", "restricted");
        assert!(gguf.matches(&facts("Meta Llama 3.1 8B Instruct", "", "")));

        let repo = rule(0, "meta-llama/*", "restricted");
        assert!(repo.matches(&facts("meta-llama/Llama-3.1-8B", "", "")));
        assert!(!repo.matches(&facts("", "", "meta-llama")));
        assert_eq!(
            rule(0, "repo:a/b", "public").matcher,
            ModelMatcher::Repo("a/b".into())
        );
    }

    #[test]
    fn bad_matches_and_classes_name_their_field() {
        let e = ModelRule::parse(0, "", "secret").unwrap_err();
        assert_eq!(e.len(), 2, "{e:?}");
        assert_eq!(e[0].0, "class");
        assert!(e[0].1.contains("\"secret\""));
        assert_eq!(e[1].0, "match");
        for bad in [
            "hf:meta-llama/*",
            "sha256:abc",
            "publisher:",
            "ollama:",
            "gguf: ",
        ] {
            let e = ModelRule::parse(0, bad, "public").unwrap_err();
            assert_eq!(e[0].0, "match", "{bad}");
        }
        let e = ModelRule::parse(0, "hf:x", "public").unwrap_err();
        assert!(e[0].1.contains("unknown prefix \"hf:\""), "{e:?}");
    }
}
