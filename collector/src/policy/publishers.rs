//! Publisher → origin country: a modest built-in table of well-known publishers, which
//! `[[publisher]]` entries extend or override.
//!
//! The defaults are where each organisation is headquartered, as an operator would look it
//! up; they are a starting point, not a legal finding, and any of them can be overridden.
//! Re-packagers (quantizers who republish other publishers' weights) are deliberately absent:
//! their country says nothing about a model's origin. Names compare case-insensitively; a
//! repository id (`org/name`, also `hf.co/org/name:tag`) is looked up by its organisation.

use std::collections::BTreeMap;

/// Built-in `(publisher, country)` defaults, lower-case names.
pub const DEFAULT_PUBLISHERS: &[(&str, &str)] = &[
    // United States
    ("meta-llama", "US"),
    ("meta", "US"),
    ("facebook", "US"),
    ("google", "US"),
    ("microsoft", "US"),
    ("openai", "US"),
    ("anthropic", "US"),
    ("nvidia", "US"),
    ("ibm-granite", "US"),
    ("ibm", "US"),
    ("eleutherai", "US"),
    ("allenai", "US"),
    ("huggingfacetb", "US"),
    ("xai-org", "US"),
    ("apple", "US"),
    // France
    ("mistralai", "FR"),
    ("mistral", "FR"),
    ("bigscience", "FR"),
    // China
    ("qwen", "CN"),
    ("alibaba", "CN"),
    ("deepseek-ai", "CN"),
    ("deepseek", "CN"),
    ("01-ai", "CN"),
    ("thudm", "CN"),
    ("zai-org", "CN"),
    ("baai", "CN"),
    ("internlm", "CN"),
    ("moonshotai", "CN"),
    // Others
    ("tiiuae", "AE"),
    ("cohereforai", "CA"),
    ("coherelabs", "CA"),
    ("cohere", "CA"),
    ("stabilityai", "GB"),
    ("ai21labs", "IL"),
];

/// Hosts that may prefix a repository id (Ollama pulls from Hugging Face, URLs).
const REPO_HOSTS: &[&str] = &["https://huggingface.co/", "huggingface.co/", "hf.co/"];

/// The organisation of a publisher name or repository id: `meta-llama/Llama-3.1-8B` →
/// `meta-llama`, `hf.co/Qwen/Qwen2-GGUF:Q4_K_M` → `Qwen`, `Meta` → `Meta`.
pub fn org_of(publisher_or_repo: &str) -> &str {
    let mut s = publisher_or_repo.trim();
    for host in REPO_HOSTS {
        if s.len() >= host.len() && s[..host.len()].eq_ignore_ascii_case(host) {
            s = &s[host.len()..];
            break;
        }
    }
    match s.split_once('/') {
        Some((org, _)) => org,
        None => s,
    }
}

/// The built-in default for one publisher (case-insensitive).
pub fn default_country(publisher: &str) -> Option<&'static str> {
    DEFAULT_PUBLISHERS
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(publisher))
        .map(|(_, country)| *country)
}

/// The policy's `[[publisher]]` entries, keyed by lower-case name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Publishers {
    entries: BTreeMap<String, String>,
}

impl Publishers {
    /// Add one entry; the first entry for a name wins (duplicates are refused by validation).
    pub(crate) fn insert(&mut self, name: &str, country: &str) {
        self.entries
            .entry(name.trim().to_ascii_lowercase())
            .or_insert_with(|| country.to_owned());
    }

    /// The origin country of a publisher or repository id: the policy's entry, else the
    /// built-in default, else none.
    pub fn country(&self, publisher_or_repo: &str) -> Option<String> {
        let org = org_of(publisher_or_repo);
        if org.is_empty() {
            return None;
        }
        if let Some(c) = self.entries.get(&org.to_ascii_lowercase()) {
            return Some(c.clone());
        }
        default_country(org).map(str::to_owned)
    }

    /// Number of `[[publisher]]` entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when the policy lists no publisher.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_organisation_is_taken_from_repository_ids_and_hosts() {
        assert_eq!(org_of("meta-llama/Llama-3.1-8B"), "meta-llama");
        assert_eq!(org_of("hf.co/Qwen/Qwen2-7B-GGUF:Q4_K_M"), "Qwen");
        assert_eq!(org_of("https://huggingface.co/mistralai/x"), "mistralai");
        assert_eq!(org_of(" Meta "), "Meta");
        assert_eq!(org_of(""), "");
    }

    #[test]
    fn built_in_defaults_answer_case_insensitively_and_unknowns_have_none() {
        let p = Publishers::default();
        assert_eq!(p.country("meta-llama/Llama-3.1-8B").as_deref(), Some("US"));
        assert_eq!(p.country("MistralAI").as_deref(), Some("FR"));
        assert_eq!(p.country("Qwen/Qwen2.5-7B").as_deref(), Some("CN"));
        assert_eq!(p.country("tiiuae/falcon-7b").as_deref(), Some("AE"));
        assert_eq!(p.country("bartowski/Llama-GGUF"), None);
        assert_eq!(p.country("llama3:8b"), None);
        assert_eq!(p.country(""), None);
    }

    #[test]
    fn policy_entries_override_and_extend_the_defaults() {
        let mut p = Publishers::default();
        p.insert("Meta-Llama", "IE");
        p.insert("atlas-lab", "MA");
        assert_eq!(p.country("meta-llama/Llama-3.1-8B").as_deref(), Some("IE"));
        assert_eq!(p.country("ATLAS-LAB/model").as_deref(), Some("MA"));
        assert_eq!(p.country("google/gemma-2b").as_deref(), Some("US"));
        assert_eq!(p.len(), 2);
    }

    #[test]
    fn the_default_table_is_lower_case_with_valid_countries_and_no_duplicates() {
        let mut seen = std::collections::BTreeSet::new();
        for (name, country) in DEFAULT_PUBLISHERS {
            assert_eq!(*name, name.to_ascii_lowercase());
            assert!(seen.insert(*name), "{name} twice");
            assert!(country.len() == 2 && country.bytes().all(|b| b.is_ascii_uppercase()));
        }
    }
}
