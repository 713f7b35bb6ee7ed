//! Lineage: the base model(s) a weight file declares it was derived from, and whether it is an
//! adapter.
//!
//! Sources, all declared by the files themselves (what a training run was *observed* to map is
//! the collector's business, from the training runs the agent reports):
//! - a PEFT/LoRA adapter directory: `adapter_config.json` beside the file names
//!   `base_model_name_or_path` and `peft_type` ([`from_adapter_config`]);
//! - GGUF `general.base_model.count` and `general.base_model.N.{name,organization,repo_url}`
//!   ([`from_header`]);
//! - safetensors `__metadata__` keys that name a base (`base_model`, `base_model_name_or_path`,
//!   `ss_sd_model_name`) ([`from_header`]);
//! - a model card beside the file (`README.md` front matter `base_model:`, one value or a list),
//!   which merged and fine-tuned repositories carry ([`from_model_card`]);
//! - `config.json` beside the file: `_name_or_path` when it names a repository other than the
//!   model itself ([`from_model_config`]); local paths are left out there, because transformers
//!   writes whatever path the model was loaded from, which says nothing about its base.
//!
//! Only these small side files are read, each bounded and each directory once per scan
//! ([`LineageReader`]); weight files are never opened here (their header was parsed already).

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::formats::Format;

/// A PEFT adapter directory's configuration file.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// A transformers model directory's configuration file.
pub const MODEL_CONFIG: &str = "config.json";
/// A repository's model card.
pub const MODEL_CARD: &str = "README.md";
/// `adapter_config.json` and `config.json` larger than this are not read.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// At most this many bytes of a model card are read (its front matter is at the top).
pub const MAX_CARD_BYTES: u64 = 64 << 10;
/// At most this many base models are kept per file.
pub const MAX_BASE_MODELS: usize = 8;
/// Names, organisations and URLs are cut to this many bytes.
pub const MAX_BASE_FIELD_BYTES: usize = 512;
/// safetensors `__metadata__` keys that name a base model, in order of preference.
pub const SAFETENSORS_BASE_KEYS: [&str; 3] =
    ["base_model_name_or_path", "base_model", "ss_sd_model_name"];
/// At most this many directories' side files are remembered per scan.
const MAX_DIRS: usize = 10_000;

/// Where a declared base came from; `as_str` is the wire form (`BaseModel.source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineageSource {
    AdapterConfig,
    GgufMetadata,
    SafetensorsMetadata,
    ModelCard,
    ModelConfig,
}

impl LineageSource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AdapterConfig => "adapter-config",
            Self::GgufMetadata => "gguf-metadata",
            Self::SafetensorsMetadata => "safetensors-metadata",
            Self::ModelCard => "model-card",
            Self::ModelConfig => "config-json",
        }
    }
}

/// One declared base model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseModel {
    /// Repository id (`org/name`) when one is known (from the value itself or from the last two
    /// segments of a repository URL), else the name as declared (a local path for an adapter
    /// trained on a local base).
    pub name: String,
    /// Organisation / publisher when declared or when `name` is `org/name`.
    pub organization: String,
    /// Repository URL when declared (GGUF `repo_url`).
    pub repo_url: String,
    pub source: LineageSource,
}

/// What a file declares about where it comes from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Lineage {
    /// Declared bases, strongest source first, each name once, at most [`MAX_BASE_MODELS`].
    pub base_models: Vec<BaseModel>,
    /// The adapter kind (`LORA`, `IA3`, …) when the file is a PEFT adapter; empty otherwise.
    pub adapter_type: String,
}

/// A base from a declared value: `org/name` gives the organisation.
fn base(
    value: &str,
    organization: &str,
    repo_url: &str,
    source: LineageSource,
) -> Option<BaseModel> {
    let value = clean(value);
    let repo_url = clean(repo_url);
    let from_url = repo_id_of_url(&repo_url);
    let name = if value.is_empty() || (!looks_like_repo_id(&value) && from_url.is_some()) {
        from_url.clone().unwrap_or_default()
    } else {
        value
    };
    if name.is_empty() {
        return None;
    }
    let mut organization = clean(organization);
    if organization.is_empty()
        && looks_like_repo_id(&name)
        && let Some((org, _)) = name.split_once('/')
    {
        org.clone_into(&mut organization);
    }
    Some(BaseModel {
        name,
        organization,
        repo_url,
        source,
    })
}

/// Trimmed, without control characters, cut to [`MAX_BASE_FIELD_BYTES`] on a char boundary.
fn clean(s: &str) -> String {
    let s: String = s.trim().chars().filter(|c| !c.is_control()).collect();
    if s.len() <= MAX_BASE_FIELD_BYTES {
        return s;
    }
    let mut end = MAX_BASE_FIELD_BYTES;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// `org/name`: exactly two non-empty segments, neither `.`/`..`, not a path.
fn looks_like_repo_id(s: &str) -> bool {
    let Some((org, name)) = s.split_once('/') else {
        return false;
    };
    let ok = |p: &str| {
        !p.is_empty()
            && p != "."
            && p != ".."
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    };
    ok(org) && ok(name)
}

/// The last two path segments of an `http(s)://host/org/name[/…]` URL as `org/name` (the
/// repository id on a model hub), when they look like one.
fn repo_id_of_url(url: &str) -> Option<String> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))?;
    let (_host, path) = rest.split_once('/')?;
    let path = path.split(['?', '#']).next().unwrap_or("");
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let id = match segs.as_slice() {
        [org, name, ..] => format!("{org}/{name}"),
        _ => return None,
    };
    looks_like_repo_id(&id).then_some(id)
}

/// The bases a file's own header declares (GGUF `general.base_model.*`, safetensors
/// `__metadata__`).
pub fn from_header(format: Format, meta: &BTreeMap<String, String>) -> Vec<BaseModel> {
    let get = |k: &str| meta.get(k).map(String::as_str).unwrap_or("");
    match format {
        Format::Gguf => {
            let count: usize = get("general.base_model.count").trim().parse().unwrap_or(0);
            (0..count.min(MAX_BASE_MODELS))
                .filter_map(|i| {
                    let key = |f: &str| format!("general.base_model.{i}.{f}");
                    base(
                        get(&key("name")),
                        get(&key("organization")),
                        get(&key("repo_url")),
                        LineageSource::GgufMetadata,
                    )
                })
                .collect()
        }
        Format::Safetensors => SAFETENSORS_BASE_KEYS
            .iter()
            .find_map(|k| base(get(k), "", "", LineageSource::SafetensorsMetadata))
            .into_iter()
            .collect(),
        _ => vec![],
    }
}

/// A PEFT `adapter_config.json`: its base (`base_model_name_or_path`, kept even when it is a
/// local path: the adapter was trained on that file) and its `peft_type` (`LORA` when absent).
pub fn from_adapter_config(bytes: &[u8]) -> Option<(Option<BaseModel>, String)> {
    let v: Value = serde_json::from_slice(bytes).ok()?;
    let obj = v.as_object()?;
    let base_name = obj
        .get("base_model_name_or_path")
        .and_then(Value::as_str)
        .unwrap_or("");
    let peft_type = obj
        .get("peft_type")
        .and_then(Value::as_str)
        .map(clean)
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| "LORA".to_owned());
    Some((
        base(base_name, "", "", LineageSource::AdapterConfig),
        peft_type,
    ))
}

/// A transformers `config.json`'s `_name_or_path`, when it is a repository id other than
/// `own_model` (a local path, or the model's own id, says nothing about a base).
pub fn from_model_config(bytes: &[u8], own_model: &str) -> Option<BaseModel> {
    let v: Value = serde_json::from_slice(bytes).ok()?;
    let name = v.get("_name_or_path")?.as_str()?;
    let name = clean(name);
    if !looks_like_repo_id(&name) || name.eq_ignore_ascii_case(own_model.trim()) {
        return None;
    }
    base(&name, "", "", LineageSource::ModelConfig)
}

/// A model card's front matter `base_model:` (a scalar or a YAML list of scalars), without a
/// YAML parser: the block between the leading `---` lines, one key per line.
pub fn from_model_card(text: &str, own_model: &str) -> Vec<BaseModel> {
    let mut lines = text.lines();
    if lines.next().map(str::trim_end) != Some("---") {
        return vec![];
    }
    let unquote = |s: &str| {
        let s = s.trim();
        s.strip_prefix('"')
            .and_then(|s| s.strip_suffix('"'))
            .or_else(|| s.strip_prefix('\'').and_then(|s| s.strip_suffix('\'')))
            .unwrap_or(s)
            .to_owned()
    };
    let mut names = Vec::new();
    let mut in_list = false;
    for line in lines {
        if line.trim_end() == "---" {
            break;
        }
        if in_list {
            if let Some(item) = line.trim_start().strip_prefix("- ") {
                names.push(unquote(item));
                continue;
            }
            if line.starts_with(' ') || line.trim().is_empty() {
                continue;
            }
            in_list = false;
        }
        if let Some(value) = line.strip_prefix("base_model:") {
            let value = value.trim();
            if value.is_empty() {
                in_list = true;
            } else if let Some(inline) = value.strip_prefix('[').and_then(|v| v.strip_suffix(']')) {
                names.extend(inline.split(',').map(unquote));
            } else {
                names.push(unquote(value));
            }
        }
    }
    names
        .iter()
        .filter(|n| !n.eq_ignore_ascii_case(own_model.trim()))
        .filter_map(|n| base(n, "", "", LineageSource::ModelCard))
        .take(MAX_BASE_MODELS)
        .collect()
}

/// What the side files of one directory declare.
#[derive(Debug, Clone, Default)]
struct DirFiles {
    adapter: Option<(Option<BaseModel>, String)>,
    config: Option<Vec<u8>>,
    card: Option<String>,
}

/// Reads each directory's side files once per scan (make one per scan, like the identifier).
#[derive(Debug, Default)]
pub struct LineageReader {
    dirs: HashMap<PathBuf, DirFiles>,
}

impl LineageReader {
    pub fn new() -> Self {
        Self::default()
    }

    /// The lineage of a parsed file reached by `paths` (the first path whose directory holds
    /// side files wins: a Hugging Face snapshot path before the blob it points at), declaring
    /// `meta` in its header and identified as `own_model`.
    pub fn lineage(
        &mut self,
        paths: &[&Path],
        format: Format,
        meta: &BTreeMap<String, String>,
        own_model: &str,
    ) -> Lineage {
        let mut out = Lineage::default();
        let mut dir = DirFiles::default();
        for d in paths.iter().filter_map(|p| p.parent()) {
            let f = self.dir(d);
            if f.adapter.is_some() || f.config.is_some() || f.card.is_some() {
                dir = f.clone();
                break;
            }
        }
        let mut all = Vec::new();
        if let Some((b, kind)) = dir.adapter {
            out.adapter_type = kind;
            all.extend(b);
        }
        all.extend(from_header(format, meta));
        if let Some(card) = &dir.card {
            all.extend(from_model_card(card, own_model));
        }
        if let Some(config) = &dir.config {
            all.extend(from_model_config(config, own_model));
        }
        for b in all {
            if out.base_models.len() >= MAX_BASE_MODELS {
                break;
            }
            if b.name.eq_ignore_ascii_case(own_model.trim()) && !own_model.trim().is_empty() {
                continue;
            }
            if !out.base_models.iter().any(|x| x.name == b.name) {
                out.base_models.push(b);
            }
        }
        out
    }

    fn dir(&mut self, dir: &Path) -> &DirFiles {
        if self.dirs.len() >= MAX_DIRS && !self.dirs.contains_key(dir) {
            self.dirs.clear();
        }
        self.dirs
            .entry(dir.to_path_buf())
            .or_insert_with(|| DirFiles {
                adapter: read_bounded(&dir.join(ADAPTER_CONFIG), MAX_CONFIG_BYTES)
                    .and_then(|b| from_adapter_config(&b)),
                config: read_bounded(&dir.join(MODEL_CONFIG), MAX_CONFIG_BYTES),
                card: read_prefix(&dir.join(MODEL_CARD), MAX_CARD_BYTES)
                    .map(|b| String::from_utf8_lossy(&b).into_owned()),
            })
    }
}

/// The whole file when it is a regular file of at most `limit` bytes.
fn read_bounded(path: &Path, limit: u64) -> Option<Vec<u8>> {
    let meta = fs::metadata(path).ok()?;
    if !meta.is_file() || meta.len() > limit {
        return None;
    }
    read_prefix(path, limit)
}

/// At most the first `limit` bytes of a regular file.
fn read_prefix(path: &Path, limit: u64) -> Option<Vec<u8>> {
    let file = fs::File::open(path).ok()?;
    if !file.metadata().ok()?.is_file() {
        return None;
    }
    let mut bytes = Vec::new();
    file.take(limit).read_to_end(&mut bytes).ok()?;
    Some(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collect::weights::formats;

    /// A GGUF v3 header with string (`Ok`) and u32 (`Err`) values and no tensors.
    fn gguf(kv: &[(&str, Result<&str, u32>)]) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend(0u64.to_le_bytes());
        out.extend((kv.len() as u64).to_le_bytes());
        let string = |out: &mut Vec<u8>, s: &str| {
            out.extend((s.len() as u64).to_le_bytes());
            out.extend(s.as_bytes());
        };
        for (k, v) in kv {
            string(&mut out, k);
            match v {
                Ok(s) => {
                    out.extend(8u32.to_le_bytes());
                    string(&mut out, s);
                }
                Err(n) => {
                    out.extend(4u32.to_le_bytes());
                    out.extend(n.to_le_bytes());
                }
            }
        }
        out
    }

    fn write(path: &Path, bytes: &[u8]) {
        fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        fs::write(path, bytes).expect("write");
    }

    fn names(l: &Lineage) -> Vec<(&str, &str, &str)> {
        l.base_models
            .iter()
            .map(|b| (b.name.as_str(), b.organization.as_str(), b.source.as_str()))
            .collect()
    }

    /// A real safetensors file written by the safetensors crate, with `metadata`.
    fn safetensors_file(path: &Path, metadata: &[(&str, &str)]) {
        let data = vec![0u8; 16];
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2, 2], &data)
            .expect("view");
        let meta: std::collections::HashMap<String, String> = metadata
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let bytes = safetensors::serialize([("w", view)], Some(meta)).expect("serialize");
        write(path, &bytes);
    }

    fn lineage_of(path: &Path, own: &str) -> Lineage {
        let parsed = formats::parse_path(path).expect("parse").expect("weights");
        LineageReader::new().lineage(&[path], parsed.format, &parsed.header.metadata, own)
    }

    #[test]
    fn a_peft_adapter_directory_names_its_base_and_kind() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("my-adapter");
        write(
            &dir.join(ADAPTER_CONFIG),
            br#"{"base_model_name_or_path": "mistralai/Mistral-7B-v0.1", "peft_type": "LORA",
                 "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}"#,
        );
        let file = dir.join("adapter_model.safetensors");
        safetensors_file(&file, &[("format", "pt")]);
        let l = lineage_of(&file, "my-adapter");
        assert_eq!(l.adapter_type, "LORA");
        assert_eq!(
            names(&l),
            vec![("mistralai/Mistral-7B-v0.1", "mistralai", "adapter-config")]
        );
    }

    #[test]
    fn an_adapter_trained_on_a_local_base_keeps_the_path_and_defaults_to_lora() {
        let (b, kind) = from_adapter_config(br#"{"base_model_name_or_path": "/data/bases/llama"}"#)
            .expect("adapter");
        assert_eq!(kind, "LORA");
        let b = b.expect("base");
        assert_eq!(
            (b.name.as_str(), b.organization.as_str()),
            ("/data/bases/llama", "")
        );
        assert_eq!(from_adapter_config(b"not json"), None);
        assert_eq!(
            from_adapter_config(br#"{"peft_type": "IA3"}"#),
            Some((None, "IA3".into()))
        );
    }

    #[test]
    fn a_gguf_file_declares_its_bases_by_name_organization_and_repo_url() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let file = tmp.path().join("tuned.Q4_K_M.gguf");
        let bytes = gguf(&[
            ("general.name", Ok("Tuned 7B")),
            ("general.base_model.count", Err(2)),
            ("general.base_model.0.name", Ok("Mistral 7B v0.1")),
            ("general.base_model.0.organization", Ok("Mistral AI")),
            (
                "general.base_model.0.repo_url",
                Ok("https://hub.example/mistralai/Mistral-7B-v0.1"),
            ),
            ("general.base_model.1.name", Ok("Croissant")),
        ]);
        write(&file, &bytes);
        let l = lineage_of(&file, "Tuned 7B");
        assert_eq!(
            names(&l),
            vec![
                ("mistralai/Mistral-7B-v0.1", "Mistral AI", "gguf-metadata"),
                ("Croissant", "", "gguf-metadata"),
            ]
        );
        assert_eq!(
            l.base_models[0].repo_url,
            "https://hub.example/mistralai/Mistral-7B-v0.1"
        );
        assert_eq!(l.adapter_type, "");
    }

    #[test]
    fn a_hostile_gguf_base_model_count_is_bounded() {
        let mut meta = BTreeMap::new();
        meta.insert("general.base_model.count".into(), "4294967295".into());
        for i in 0..20 {
            meta.insert(format!("general.base_model.{i}.name"), format!("b{i}"));
        }
        assert_eq!(from_header(Format::Gguf, &meta).len(), MAX_BASE_MODELS);
        meta.insert("general.base_model.count".into(), "-1".into());
        assert!(from_header(Format::Gguf, &meta).is_empty());
        let long = "x".repeat(10_000);
        meta.insert("general.base_model.count".into(), "1".into());
        meta.insert("general.base_model.0.name".into(), long);
        assert_eq!(
            from_header(Format::Gguf, &meta)[0].name.len(),
            MAX_BASE_FIELD_BYTES
        );
    }

    #[test]
    fn safetensors_metadata_naming_a_base_is_lineage() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let file = tmp.path().join("merged.safetensors");
        safetensors_file(
            &file,
            &[("format", "pt"), ("base_model", "meta-llama/Llama-3.1-8B")],
        );
        assert_eq!(
            names(&lineage_of(&file, "merged")),
            vec![(
                "meta-llama/Llama-3.1-8B",
                "meta-llama",
                "safetensors-metadata"
            )]
        );
        let plain = tmp.path().join("plain/model.safetensors");
        safetensors_file(&plain, &[("format", "pt")]);
        assert_eq!(lineage_of(&plain, "plain"), Lineage::default());
    }

    #[test]
    fn config_json_names_a_base_only_when_it_is_another_repository() {
        assert_eq!(
            from_model_config(
                br#"{"_name_or_path": "meta-llama/Llama-2-7b-hf"}"#,
                "acme/tuned"
            )
            .map(|b| b.name),
            Some("meta-llama/Llama-2-7b-hf".to_owned())
        );
        // Its own id, a local path, nothing, or not JSON: no base.
        for text in [
            r#"{"_name_or_path": "acme/tuned"}"#,
            r#"{"_name_or_path": "/fsx/runs/ckpt-1000"}"#,
            r#"{"_name_or_path": "./out"}"#,
            r#"{"architectures": ["LlamaForCausalLM"]}"#,
            "{",
        ] {
            assert_eq!(
                from_model_config(text.as_bytes(), "acme/tuned"),
                None,
                "{text}"
            );
        }
    }

    #[test]
    fn a_model_card_front_matter_names_one_or_several_bases() {
        let one = "---\nlicense: apache-2.0\nbase_model: mistralai/Mistral-7B-v0.1\ntags:\n- x\n---\n# Card\nbase_model: ignored\n";
        assert_eq!(
            from_model_card(one, "acme/tuned")
                .iter()
                .map(|b| b.name.as_str())
                .collect::<Vec<_>>(),
            vec!["mistralai/Mistral-7B-v0.1"]
        );
        let list = "---\nbase_model:\n  - \"a/one\"\n  - 'b/two'\nlicense: mit\n---\n";
        assert_eq!(
            from_model_card(list, "")
                .iter()
                .map(|b| b.name.as_str())
                .collect::<Vec<_>>(),
            vec!["a/one", "b/two"]
        );
        let inline = "---\nbase_model: [a/one, b/two]\n---\n";
        assert_eq!(from_model_card(inline, "").len(), 2);
        assert!(from_model_card("# no front matter\nbase_model: x/y\n", "").is_empty());
    }

    #[test]
    fn sources_are_merged_strongest_first_and_each_name_once() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("out");
        write(
            &dir.join(ADAPTER_CONFIG),
            br#"{"base_model_name_or_path": "mistralai/Mistral-7B-v0.1"}"#,
        );
        write(
            &dir.join(MODEL_CONFIG),
            br#"{"_name_or_path": "mistralai/Mistral-7B-v0.1"}"#,
        );
        write(
            &dir.join(MODEL_CARD),
            b"---\nbase_model:\n- mistralai/Mistral-7B-v0.1\n- other/base\n---\n",
        );
        let file = dir.join("adapter_model.safetensors");
        safetensors_file(&file, &[]);
        assert_eq!(
            names(&lineage_of(&file, "out")),
            vec![
                ("mistralai/Mistral-7B-v0.1", "mistralai", "adapter-config"),
                ("other/base", "other", "model-card"),
            ]
        );
    }

    #[test]
    fn oversized_side_files_are_not_read() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("big");
        fs::create_dir_all(&dir).expect("mkdir");
        let f = fs::File::create(dir.join(ADAPTER_CONFIG)).expect("create");
        f.set_len(MAX_CONFIG_BYTES + 1).expect("sparse");
        let file = dir.join("adapter_model.safetensors");
        safetensors_file(&file, &[]);
        assert_eq!(lineage_of(&file, "big"), Lineage::default());
    }

    #[test]
    fn repo_ids_come_from_hub_urls_only_when_they_look_like_one() {
        assert_eq!(
            repo_id_of_url("https://hub.example/org/name/tree/main").as_deref(),
            Some("org/name")
        );
        assert_eq!(repo_id_of_url("https://hub.example/name"), None);
        assert_eq!(repo_id_of_url("ftp://x/org/name"), None);
        assert!(looks_like_repo_id("Qwen/Qwen2.5-7B"));
        assert!(!looks_like_repo_id("/abs/path"));
        assert!(!looks_like_repo_id("a/b/c"));
        assert!(!looks_like_repo_id("../x"));
    }

    #[test]
    fn every_source_has_its_wire_name() {
        for (s, name) in [
            (LineageSource::AdapterConfig, "adapter-config"),
            (LineageSource::GgufMetadata, "gguf-metadata"),
            (LineageSource::SafetensorsMetadata, "safetensors-metadata"),
            (LineageSource::ModelCard, "model-card"),
            (LineageSource::ModelConfig, "config-json"),
        ] {
            assert_eq!(s.as_str(), name);
        }
    }
}
