//! Identity: which model a weight file belongs to, and where that claim came from.
//!
//! Sources, in the order [`Identifier::identify`] tries them:
//! 1. the Hugging Face cache layout ([`from_hf_cache`]): `<hub>/models--<org>--<name>/snapshots/<rev>/<path>`
//!    gives the repository id, the revision, the ref names pointing at it (`refs/`) and the path in
//!    the repository;
//! 2. an Ollama store ([`OllamaIndex`]): manifests (`manifests/` and `manifests-v2/`) name the blobs
//!    (`blobs/sha256-<hex>`) of each `name:tag`;
//! 3. what the file's header says (GGUF `general.name`, safetensors `__metadata__`), which the caller
//!    parses and passes in;
//! 4. the nearest meaningful directory name ([`from_directory`]).
//!
//! Shards: [`shard_of`] reads `model-00001-of-00005.safetensors` style names, [`shard_index_path`]
//! names the index file beside them and [`read_shard_index`] lists the shards its `weight_map` names.
//!
//! Only manifests, refs and index files are read, each bounded; weight files are never opened here.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use serde_json::Value;

use super::discover::Candidate;
use super::formats::Format;
use super::lineage::{Lineage, LineageReader};

/// A ref file in a Hugging Face cache (`refs/main`) holds a 40-character commit; read at most this.
pub const MAX_HF_REF_BYTES: u64 = 4096;
/// At most this many refs are read per Hugging Face repository.
pub const MAX_HF_REFS: usize = 1000;
/// Ollama manifests larger than this are skipped (Ollama itself reads at most 1 MiB).
pub const MAX_OLLAMA_MANIFEST_BYTES: u64 = 1 << 20;
/// At most this many Ollama manifests are read per store.
pub const MAX_OLLAMA_MANIFESTS: usize = 100_000;
/// Shard index files larger than this are refused.
pub const MAX_SHARD_INDEX_BYTES: u64 = 16 << 20;
/// Ollama's default registry: its names are shown without the host.
pub const OLLAMA_DEFAULT_REGISTRY: &str = "registry.ollama.ai";
/// Ollama's default namespace: its names are shown without it.
pub const OLLAMA_DEFAULT_NAMESPACE: &str = "library";
/// The manifest trees of an Ollama store.
pub const OLLAMA_MANIFEST_DIRS: [&str; 2] = ["manifests", "manifests-v2"];

/// How deep below `refs/` (`refs/refs/pr/1`) and below an Ollama manifest tree files are looked for.
const MAX_TREE_DEPTH: usize = 8;
/// At most this many unreadable manifests are remembered per store.
const MAX_OLLAMA_ERRORS: usize = 100;
/// Media types (before any `;` parameter) of the Ollama layers that hold weights.
const OLLAMA_WEIGHT_MEDIA_TYPES: [&str; 4] = [
    "application/vnd.ollama.image.model",
    "application/vnd.ollama.image.projector",
    "application/vnd.ollama.image.adapter",
    "application/vnd.ollama.image.tensor",
];
/// Directory names that say nothing about which model is inside (compared case-insensitively).
const GENERIC_DIR_NAMES: [&str; 40] = [
    "snapshots",
    "blobs",
    "refs",
    "models",
    "model",
    "weights",
    "checkpoints",
    "checkpoint",
    "ckpt",
    "hub",
    "huggingface",
    "cache",
    "manifests",
    "manifests-v2",
    "ollama",
    "data",
    "datasets",
    "srv",
    "opt",
    "mnt",
    "media",
    "home",
    "root",
    "var",
    "lib",
    "usr",
    "share",
    "local",
    "tmp",
    "gguf",
    "safetensors",
    "onnx",
    "files",
    "artifacts",
    "output",
    "outputs",
    "storage",
    "volumes",
    "scratch",
    "shared",
];

/// Who a model is, and where that claim came from.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Identity {
    /// Repository id (`org/name`), Ollama `name:tag`, header name, or a directory name.
    pub model: String,
    /// Revision (commit) when known.
    pub revision: String,
    /// Ref names pointing at the revision (`main`, `refs/pr/1`); for Ollama, every `name:tag`
    /// whose manifest names this blob.
    pub refs: Vec<String>,
    /// Path of the file within its repository (or below the directory that named it).
    pub repo_path: String,
    /// Where the identity came from.
    pub source: IdentitySource,
    /// Publisher / organisation when known.
    pub publisher: String,
    /// `sha256:<hex>` of the layer when the identity came from an Ollama manifest.
    pub ollama_digest: String,
}

/// Where an [`Identity`] came from; `as_str` is the wire form (`ModelIdentity.source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IdentitySource {
    HfCache,
    OllamaManifest,
    GgufMetadata,
    SafetensorsMetadata,
    Directory,
    /// The file's content hash is all that is known.
    ContentHash,
    #[default]
    Unknown,
}

impl IdentitySource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::HfCache => "hf-cache",
            Self::OllamaManifest => "ollama-manifest",
            Self::GgufMetadata => "gguf-metadata",
            Self::SafetensorsMetadata => "safetensors-metadata",
            Self::Directory => "directory",
            Self::ContentHash => "sha256",
            Self::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for IdentitySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The fallback chain with its caches: Hugging Face refs per repository and one Ollama index per
/// store, each read once, on first need. Make one per scan so that new pulls are seen.
#[derive(Debug, Default)]
pub struct Identifier {
    hf: HfRefs,
    ollama: HashMap<PathBuf, OllamaIndex>,
    lineage: LineageReader,
}

impl Identifier {
    pub fn new() -> Self {
        Self::default()
    }

    /// The identity of a file reached by `paths` (the first one preferred): the Hugging Face cache
    /// layout of any path, else an Ollama manifest naming any path's blob, else `from_header`
    /// (what the caller parsed from the file's header, e.g. GGUF `general.name` with source
    /// [`IdentitySource::GgufMetadata`]), else the directory name of the first path.
    pub fn identify(&mut self, paths: &[&Path], from_header: Option<Identity>) -> Identity {
        let Some(first) = paths.first() else {
            return from_header.unwrap_or_default();
        };
        self.identify_at(paths, first, from_header)
    }

    /// [`Identifier::identify`] for a file inside a container: `paths` are where the agent reads
    /// it (below `/proc/<pid>/root`, so that the repository's refs and the Ollama manifests are
    /// read from the container's filesystem), `shown` is its path inside the container, which
    /// the directory-name fallback uses.
    pub fn identify_at(
        &mut self,
        paths: &[&Path],
        shown: &Path,
        from_header: Option<Identity>,
    ) -> Identity {
        // A snapshot path says more than a blob path: try every path for a snapshot first.
        let mut blob_only = None;
        for path in paths {
            if let Some(id) = self.hf.identify(path) {
                if !id.revision.is_empty() {
                    return id;
                }
                blob_only.get_or_insert(id);
            }
        }
        if let Some(id) = blob_only {
            return id;
        }
        for path in paths {
            if let Some(store) = ollama_store_of(path) {
                let index = self
                    .ollama
                    .entry(store.to_path_buf())
                    .or_insert_with(|| OllamaIndex::load(store));
                if let Some(id) = index.lookup(path) {
                    return id;
                }
            }
        }
        if let Some(id) = from_header.filter(|id| !id.model.is_empty()) {
            return id;
        }
        from_directory(shown)
    }

    /// The bases a parsed file reached by `paths` declares (its header's `meta`, and the side
    /// files of the first of its directories that has any), for a file identified as `own_model`.
    pub fn lineage(
        &mut self,
        paths: &[&Path],
        format: Format,
        meta: &std::collections::BTreeMap<String, String>,
        own_model: &str,
    ) -> Lineage {
        self.lineage.lineage(paths, format, meta, own_model)
    }

    /// [`Identifier::lineage`] over a candidate's path, aliases and real path.
    pub fn lineage_candidate(
        &mut self,
        c: &Candidate,
        format: Format,
        meta: &std::collections::BTreeMap<String, String>,
        own_model: &str,
    ) -> Lineage {
        let mut paths: Vec<&Path> = Vec::with_capacity(c.aliases.len() + 2);
        paths.push(&c.path);
        paths.extend(c.aliases.iter().map(PathBuf::as_path));
        paths.push(&c.real_path);
        self.lineage(&paths, format, meta, own_model)
    }

    /// [`Identifier::identify`] over a candidate's path, aliases and real path.
    pub fn identify_candidate(&mut self, c: &Candidate, from_header: Option<Identity>) -> Identity {
        let mut paths: Vec<&Path> = Vec::with_capacity(c.aliases.len() + 2);
        paths.push(&c.path);
        paths.extend(c.aliases.iter().map(PathBuf::as_path));
        paths.push(&c.real_path);
        self.identify(&paths, from_header)
    }
}

/// Hugging Face cache layout of `path`, with the ref names read from the repository's `refs/`.
///
/// `<hub>/models--<org>--<name>/snapshots/<rev>/<repo path>` → model `org/name` (only the first
/// `--` separates the organisation; `models--gpt2` → `gpt2`), revision `<rev>`, refs whose file
/// holds `<rev>`, publisher `org`. A blob reached directly (`models--<org>--<name>/blobs/<hash>`)
/// → the model, with no revision, refs or repo path. Datasets and spaces (`datasets--`,
/// `spaces--`) are not models: `None`, as for any path outside that layout.
pub fn from_hf_cache(path: &Path) -> Option<Identity> {
    HfRefs::default().identify(path)
}

/// Hugging Face identities with each repository's refs read once.
#[derive(Debug, Default)]
pub struct HfRefs {
    /// Repository directory → (ref name, revision) pairs.
    by_repo: HashMap<PathBuf, Vec<(String, String)>>,
}

impl HfRefs {
    /// As [`from_hf_cache`], reading each repository's `refs/` only the first time.
    pub fn identify(&mut self, path: &Path) -> Option<Identity> {
        let (mut id, repo_dir) = hf_layout(path)?;
        if !id.revision.is_empty() {
            let refs = self
                .by_repo
                .entry(repo_dir)
                .or_insert_with_key(|dir| read_hf_refs(&dir.join("refs")));
            id.refs = refs
                .iter()
                .filter(|(_, rev)| *rev == id.revision)
                .map(|(name, _)| name.clone())
                .collect();
        }
        Some(id)
    }
}

/// The Hugging Face identity `path`'s components give (no refs), and the repository directory.
fn hf_layout(path: &Path) -> Option<(Identity, PathBuf)> {
    let comps: Vec<&str> = path
        .components()
        .map(|c| c.as_os_str().to_str())
        .collect::<Option<_>>()?;
    // The innermost `<kind>--<id>/{snapshots,blobs}` pair.
    let i = (0..comps.len().saturating_sub(1)).rev().find(|&i| {
        let kind = comps[i];
        (kind.starts_with("models--")
            || kind.starts_with("datasets--")
            || kind.starts_with("spaces--"))
            && matches!(comps[i + 1], "snapshots" | "blobs")
    })?;
    let folder = comps[i].strip_prefix("models--")?;
    if folder.is_empty() {
        return None;
    }
    let (model, publisher) = match folder.split_once("--") {
        Some((org, name)) if !org.is_empty() && !name.is_empty() => {
            (format!("{org}/{name}"), org.to_owned())
        }
        _ => (folder.to_owned(), String::new()),
    };
    let rest = &comps[i + 2..];
    let (revision, repo_path) = match comps[i + 1] {
        "snapshots" if rest.len() >= 2 => (rest[0].to_owned(), rest[1..].join("/")),
        "blobs" if rest.len() == 1 => (String::new(), String::new()),
        _ => return None,
    };
    let repo_dir: PathBuf = path.components().take(i + 1).collect();
    let id = Identity {
        model,
        revision,
        repo_path,
        source: IdentitySource::HfCache,
        publisher,
        ..Identity::default()
    };
    Some((id, repo_dir))
}

/// Every ref below `refs_dir` as (name relative to it with `/` separators, trimmed content),
/// sorted by name. `refs/main` → `main`; `refs/refs/pr/1` → `refs/pr/1`.
fn read_hf_refs(refs_dir: &Path) -> Vec<(String, String)> {
    let mut refs = Vec::new();
    for (file, rel) in files_below(refs_dir, MAX_TREE_DEPTH, MAX_HF_REFS) {
        if let Ok(text) = read_bounded(&file, MAX_HF_REF_BYTES) {
            let rev = String::from_utf8_lossy(&text).trim().to_owned();
            if !rev.is_empty() {
                refs.push((rel.join("/"), rev));
            }
        }
    }
    refs.sort();
    refs
}

/// The Ollama store (the directory holding `blobs/` and `manifests/`) of a blob path
/// `<store>/blobs/sha256-<hex>`, from the path alone.
pub fn ollama_store_of(blob_path: &Path) -> Option<&Path> {
    let name = blob_path.file_name()?.to_str()?;
    let blobs = blob_path.parent()?;
    if blob_digest_hex(name).is_none() || blobs.file_name()? != "blobs" {
        return None;
    }
    blobs.parent()
}

/// The lower-case hex digest of a blob file name `sha256-<hex>` (or the older `sha256:<hex>`).
fn blob_digest_hex(file_name: &str) -> Option<String> {
    let hex = file_name
        .strip_prefix("sha256-")
        .or_else(|| file_name.strip_prefix("sha256:"))?;
    is_hex(hex).then(|| hex.to_ascii_lowercase())
}

fn is_hex(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Every weight layer of every manifest in one Ollama store, by blob digest.
#[derive(Debug, Default, Clone)]
pub struct OllamaIndex {
    /// Lower-case hex digest → identity.
    blobs: HashMap<String, Identity>,
    manifests: usize,
    errors: Vec<(PathBuf, String)>,
}

impl OllamaIndex {
    /// Read every manifest under `<models_dir>/manifests/` (classic tree:
    /// `<registry host>/<namespace>/<model>/<tag>`) and `<models_dir>/manifests-v2/` (read the same
    /// way, lenient about depth: the last two components are model and tag, a first component that
    /// looks like a host is the registry, the ones between are the namespace). Unreadable or
    /// oversized manifests are skipped (see [`OllamaIndex::errors`]).
    ///
    /// A blob named by several manifests (`llama3:8b` and `llama3:latest`) gets the smallest name as
    /// `model` and all of them in `refs`.
    pub fn load(models_dir: &Path) -> OllamaIndex {
        let mut index = OllamaIndex::default();
        // digest → (names, publisher per name)
        let mut names: HashMap<String, BTreeSet<(String, String)>> = HashMap::new();
        for tree in OLLAMA_MANIFEST_DIRS {
            let root = models_dir.join(tree);
            let budget = MAX_OLLAMA_MANIFESTS.saturating_sub(index.manifests);
            for (file, rel) in files_below(&root, MAX_TREE_DEPTH, budget) {
                let Some((name, publisher)) = ollama_name(&rel) else {
                    continue;
                };
                let digests = match read_bounded(&file, MAX_OLLAMA_MANIFEST_BYTES)
                    .and_then(|bytes| weight_layer_digests(&bytes))
                {
                    Ok(d) => d,
                    Err(e) => {
                        if index.errors.len() < MAX_OLLAMA_ERRORS {
                            index.errors.push((file, e));
                        }
                        continue;
                    }
                };
                index.manifests += 1;
                for hex in digests {
                    names
                        .entry(hex)
                        .or_default()
                        .insert((name.clone(), publisher.clone()));
                }
            }
        }
        for (hex, named) in names {
            let Some((model, publisher)) = named.first().cloned() else {
                continue;
            };
            let refs: BTreeSet<String> = named.into_iter().map(|(n, _)| n).collect();
            let id = Identity {
                model,
                refs: refs.into_iter().collect(),
                source: IdentitySource::OllamaManifest,
                publisher,
                ollama_digest: format!("sha256:{hex}"),
                ..Identity::default()
            };
            index.blobs.insert(hex, id);
        }
        index
    }

    /// The identity of a blob, by its file name (`sha256-<hex>`), wherever the path lies.
    pub fn lookup(&self, blob_path: &Path) -> Option<Identity> {
        let name = blob_path.file_name()?.to_str()?;
        self.blobs.get(&blob_digest_hex(name)?).cloned()
    }

    /// Manifests read successfully.
    pub fn manifests(&self) -> usize {
        self.manifests
    }

    /// Weight blobs named by the manifests.
    pub fn len(&self) -> usize {
        self.blobs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blobs.is_empty()
    }

    /// Manifests that could not be read or parsed (the first [`MAX_OLLAMA_ERRORS`]).
    pub fn errors(&self) -> &[(PathBuf, String)] {
        &self.errors
    }
}

/// The display name (`llama3:8b`, `ns/model:tag`, `hf.co/ns/model:tag`) and publisher of a manifest
/// from its path components below the manifest tree.
fn ollama_name(rel: &[String]) -> Option<(String, String)> {
    let [prefix @ .., model, tag] = rel else {
        return None;
    };
    if model.is_empty() || tag.is_empty() {
        return None;
    }
    let (host, namespace) = match prefix {
        [first, rest @ ..] if looks_like_host(first) => (first.as_str(), rest.join("/")),
        _ => (OLLAMA_DEFAULT_REGISTRY, prefix.join("/")),
    };
    let publisher = if namespace == OLLAMA_DEFAULT_NAMESPACE {
        String::new()
    } else {
        namespace.clone()
    };
    let mut name = String::new();
    if host != OLLAMA_DEFAULT_REGISTRY {
        name.push_str(host);
        name.push('/');
    }
    if !publisher.is_empty() {
        name.push_str(&publisher);
        name.push('/');
    }
    name.push_str(model);
    name.push(':');
    name.push_str(tag);
    Some((name, publisher))
}

fn looks_like_host(s: &str) -> bool {
    s.contains('.') || s.contains(':') || s == "localhost"
}

/// Lower-case hex digests of the weight layers of an Ollama manifest (public for the fuzz
/// targets: manifests come from disk, written by whoever can write the models directory).
pub fn weight_layer_digests(bytes: &[u8]) -> Result<Vec<String>, String> {
    let manifest: Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
    let layers = manifest
        .get("layers")
        .and_then(Value::as_array)
        .ok_or("no layers array")?;
    let digests = layers
        .iter()
        .filter(|layer| {
            let media = layer.get("mediaType").and_then(Value::as_str).unwrap_or("");
            let base = media.split(';').next().unwrap_or("").trim();
            OLLAMA_WEIGHT_MEDIA_TYPES.contains(&base)
        })
        .filter_map(|layer| layer.get("digest").and_then(Value::as_str))
        .filter_map(|d| d.strip_prefix("sha256:"))
        .filter(|hex| is_hex(hex))
        .map(str::to_ascii_lowercase)
        .collect();
    Ok(digests)
}

/// Fallback: the nearest directory above `path` whose name means something, skipping generic
/// names (`snapshots`, `blobs`, `models`, `weights`, `checkpoints`, …), hidden directories,
/// revision-like hex names, content-addressed names and user names under `home`. A Hugging Face
/// folder name (`models--org--name`) is turned back into `org/name`. `repo_path` is the path
/// below that directory. When no directory qualifies, the file name without its extension
/// (unless it is itself a hash); when nothing qualifies, source [`IdentitySource::Unknown`].
pub fn from_directory(path: &Path) -> Identity {
    let names: Vec<String> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_string_lossy().into_owned()),
            _ => None,
        })
        .collect();
    let Some((file, dirs)) = names.split_last() else {
        return Identity::default();
    };
    for i in (0..dirs.len()).rev() {
        let name = &dirs[i];
        let under_home = i > 0 && dirs[i - 1] == "home";
        if under_home || !meaningful(name) {
            continue;
        }
        let (model, publisher) = match name
            .strip_prefix("models--")
            .and_then(|f| f.split_once("--"))
        {
            Some((org, n)) if !org.is_empty() && !n.is_empty() => {
                (format!("{org}/{n}"), org.to_owned())
            }
            _ => (
                name.strip_prefix("models--").unwrap_or(name).to_owned(),
                String::new(),
            ),
        };
        return Identity {
            model,
            repo_path: names[i + 1..].join("/"),
            source: IdentitySource::Directory,
            publisher,
            ..Identity::default()
        };
    }
    let stem = Path::new(file)
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    if stem.is_empty() || !meaningful(&stem) {
        return Identity {
            repo_path: file.clone(),
            ..Identity::default()
        };
    }
    Identity {
        model: stem,
        repo_path: file.clone(),
        source: IdentitySource::Directory,
        ..Identity::default()
    }
}

/// Whether a directory or file name can stand for a model.
fn meaningful(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    let hex_like = name.len() >= 7 && is_hex(name);
    !(name.is_empty()
        || name.starts_with('.')
        || hex_like
        || blob_digest_hex(name).is_some()
        || GENERIC_DIR_NAMES.contains(&lower.as_str()))
}

/// A shard name `<prefix>-<i>-of-<n>[.<ext>]` → `(i, n, prefix)`, 1 ≤ i ≤ n:
/// `model-00001-of-00005.safetensors` → `(1, 5, "model")`,
/// `pytorch_model-00001-of-00002.bin` → `(1, 2, "pytorch_model")`; also GGUF splits
/// (`Llama-3-70B-Q4_K_M-00001-of-00002.gguf`).
pub fn shard_of(file_name: &str) -> Option<(u32, u32, String)> {
    shard_parts(file_name).map(|(i, n, prefix, _)| (i, n, prefix.to_owned()))
}

/// `(index, count, prefix, extension with its dot or "")`.
fn shard_parts(file_name: &str) -> Option<(u32, u32, &str, &str)> {
    let at = file_name.rfind("-of-")?;
    let (head, tail) = (&file_name[..at], &file_name[at + 4..]);
    let digits = tail.bytes().take_while(u8::is_ascii_digit).count();
    let (count, ext) = tail.split_at(digits);
    if !(ext.is_empty() || ext.starts_with('.')) {
        return None;
    }
    let (prefix, index) = head.rsplit_once('-')?;
    if prefix.is_empty() || index.is_empty() || !index.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (index, count): (u32, u32) = (index.parse().ok()?, count.parse().ok()?);
    (1 <= index && index <= count).then_some((index, count, prefix, ext))
}

/// The index file that lists a shard's set, beside it: `model-00001-of-00005.safetensors` →
/// `model.safetensors.index.json`, `pytorch_model-00001-of-00002.bin` →
/// `pytorch_model.bin.index.json`. `None` for names that are not shards of those two kinds
/// (GGUF splits carry their set in their own header).
pub fn shard_index_path(shard_path: &Path) -> Option<PathBuf> {
    let name = shard_path.file_name()?.to_str()?;
    let (_, _, prefix, ext) = shard_parts(name)?;
    if ext != ".safetensors" && ext != ".bin" {
        return None;
    }
    Some(shard_path.with_file_name(format!("{prefix}{ext}.index.json")))
}

/// Whether a file name is a shard index (`*.safetensors.index.json`, `*.bin.index.json`).
pub fn is_shard_index(file_name: &str) -> bool {
    file_name.ends_with(".safetensors.index.json") || file_name.ends_with(".bin.index.json")
}

/// The shard file names an index file's `weight_map` names (sorted, each once), read from at
/// most [`MAX_SHARD_INDEX_BYTES`]. Names that would leave the index's directory (absolute, `..`)
/// are dropped. The shard set's id is the index file's path.
pub fn read_shard_index(path: &Path) -> Result<Vec<String>, String> {
    let bytes = read_bounded(path, MAX_SHARD_INDEX_BYTES)?;
    let index: Value = serde_json::from_slice(&bytes).map_err(|e| format!("not JSON: {e}"))?;
    let map = index
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or("no weight_map object")?;
    let shards: BTreeSet<&str> = map
        .values()
        .filter_map(Value::as_str)
        .filter(|name| {
            !name.is_empty()
                && Path::new(name)
                    .components()
                    .all(|c| matches!(c, Component::Normal(_)))
        })
        .collect();
    Ok(shards.into_iter().map(str::to_owned).collect())
}

/// The whole file, refused when larger than `limit` bytes.
fn read_bounded(path: &Path, limit: u64) -> Result<Vec<u8>, String> {
    let file = fs::File::open(path).map_err(|e| e.to_string())?;
    let mut bytes = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > limit {
        return Err(format!("larger than {limit} bytes"));
    }
    Ok(bytes)
}

/// Regular files (symlinks followed for files, never for directories) below `root`, at most
/// `max_depth` levels deep and `max_files` of them, sorted, each with its path components
/// relative to `root`.
fn files_below(root: &Path, max_depth: usize, max_files: usize) -> Vec<(PathBuf, Vec<String>)> {
    let mut out = Vec::new();
    let mut stack = vec![(root.to_path_buf(), Vec::<String>::new())];
    while let Some((dir, rel)) = stack.pop() {
        let Ok(reader) = fs::read_dir(&dir) else {
            continue;
        };
        let mut entries: Vec<_> = reader.filter_map(Result::ok).collect();
        entries.sort_by_key(fs::DirEntry::file_name);
        let mut subdirs = Vec::new();
        for entry in entries {
            let Ok(file_type) = entry.file_type() else {
                continue;
            };
            let mut child_rel = rel.clone();
            child_rel.push(entry.file_name().to_string_lossy().into_owned());
            if file_type.is_dir() {
                if rel.len() + 1 < max_depth {
                    subdirs.push((entry.path(), child_rel));
                }
            } else if fs::metadata(entry.path()).is_ok_and(|m| m.is_file()) {
                if out.len() >= max_files {
                    return out;
                }
                out.push((entry.path(), child_rel));
            }
        }
        stack.extend(subdirs.into_iter().rev());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    const REV: &str = "0123456789abcdef0123456789abcdef01234567";
    const OTHER_REV: &str = "fedcba9876543210fedcba9876543210fedcba98";
    const MODEL_HEX: &str = "6a0746a1ec1aef3e7ec53868f220ff6e389f6f8ef87a01d77c96807de94ca2aa";
    const ORG_HEX: &str = "00e1317cbf74d901080d7100f57580ba8dd8de57203072dc6f668324ba545f29";
    const LICENSE_HEX: &str = "4fa551d4f938f68b8c1e6afa9d28befb70e3f33f75d0753248d530364aeea40f";

    fn write(path: &Path, bytes: &[u8]) {
        fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        fs::write(path, bytes).expect("write");
    }

    fn hf_repo(hub: &Path) -> PathBuf {
        let repo = hub.join("models--meta-llama--Llama-3.1-8B");
        write(&repo.join("blobs/abc123"), &[0; 2048]);
        let snap = repo.join("snapshots").join(REV);
        fs::create_dir_all(snap.join("original")).expect("mkdir");
        symlink(
            "../../blobs/abc123",
            snap.join("model-00001-of-00002.safetensors"),
        )
        .expect("ln");
        symlink(
            "../../../blobs/abc123",
            snap.join("original/consolidated.00.pth"),
        )
        .expect("ln");
        write(&repo.join("refs/main"), REV.as_bytes());
        write(&repo.join("refs/refs/pr/1"), format!("{REV}\n").as_bytes());
        write(&repo.join("refs/old"), OTHER_REV.as_bytes());
        repo
    }

    #[test]
    fn a_snapshot_path_gives_repo_id_revision_refs_and_repo_path() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let repo = hf_repo(tmp.path());
        let snap = repo.join("snapshots").join(REV);
        let id = from_hf_cache(&snap.join("model-00001-of-00002.safetensors")).expect("hf");
        assert_eq!(
            id,
            Identity {
                model: "meta-llama/Llama-3.1-8B".into(),
                revision: REV.into(),
                refs: vec!["main".into(), "refs/pr/1".into()],
                repo_path: "model-00001-of-00002.safetensors".into(),
                source: IdentitySource::HfCache,
                publisher: "meta-llama".into(),
                ollama_digest: String::new(),
            }
        );
        let nested = from_hf_cache(&snap.join("original/consolidated.00.pth")).expect("hf");
        assert_eq!(nested.repo_path, "original/consolidated.00.pth");
        assert_eq!(id.source.as_str(), "hf-cache");
    }

    #[test]
    fn hugging_face_names_without_org_blobs_and_non_models() {
        let id =
            from_hf_cache(Path::new("/h/models--gpt2/snapshots/r1/model.safetensors")).expect("hf");
        assert_eq!((id.model.as_str(), id.publisher.as_str()), ("gpt2", ""));
        assert!(id.refs.is_empty()); // no refs directory: no refs, no error

        let id = from_hf_cache(Path::new(
            "/h/models--org--name--with--dashes/snapshots/r/x.bin",
        ))
        .expect("hf");
        assert_eq!(id.model, "org/name--with--dashes");

        let id = from_hf_cache(Path::new("/h/models--a--b/blobs/0a1b2c")).expect("blob");
        assert_eq!(id.model, "a/b");
        assert_eq!((id.revision.as_str(), id.repo_path.as_str()), ("", ""));

        assert_eq!(
            from_hf_cache(Path::new("/h/datasets--a--b/snapshots/r/x.bin")),
            None
        );
        assert_eq!(from_hf_cache(Path::new("/h/spaces--a--b/blobs/0a1b")), None);
        assert_eq!(from_hf_cache(Path::new("/models/llama/x.bin")), None);
        assert_eq!(
            from_hf_cache(Path::new("/h/models--a--b/snapshots/r")),
            None
        );
    }

    fn manifest(layers: &[(&str, &str)]) -> String {
        let layers: Vec<Value> = layers
            .iter()
            .map(|(media, hex)| {
                serde_json::json!({"mediaType": media, "digest": format!("sha256:{hex}"), "size": 2048})
            })
            .collect();
        serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                       "digest": format!("sha256:{LICENSE_HEX}"), "size": 10},
            "layers": layers,
        })
        .to_string()
    }

    fn ollama_store(models: &Path, tree: &str) {
        let llama = manifest(&[
            ("application/vnd.ollama.image.model", MODEL_HEX),
            ("application/vnd.ollama.image.license", LICENSE_HEX),
        ]);
        let m = models.join(tree);
        write(
            &m.join("registry.ollama.ai/library/llama3/8b"),
            llama.as_bytes(),
        );
        write(
            &m.join("registry.ollama.ai/library/llama3/latest"),
            llama.as_bytes(),
        );
        let org = manifest(&[("application/vnd.ollama.image.model", ORG_HEX)]);
        write(&m.join("registry.ollama.ai/acme/tuned/q4"), org.as_bytes());
        write(
            &m.join("registry.ollama.ai/library/broken/1b"),
            b"{not json",
        );
        write(
            &models.join(format!("blobs/sha256-{MODEL_HEX}")),
            &[0; 2048],
        );
        write(&models.join(format!("blobs/sha256-{ORG_HEX}")), &[0; 2048]);
    }

    fn check_ollama(models: &Path) {
        let index = OllamaIndex::load(models);
        assert_eq!(index.manifests(), 3);
        assert_eq!(index.errors().len(), 1, "{:?}", index.errors());
        assert_eq!(index.len(), 2); // license layers are not weights
        let id = index
            .lookup(&models.join(format!("blobs/sha256-{MODEL_HEX}")))
            .expect("llama3");
        assert_eq!(id.model, "llama3:8b");
        assert_eq!(
            id.refs,
            vec!["llama3:8b".to_owned(), "llama3:latest".to_owned()]
        );
        assert_eq!(id.ollama_digest, format!("sha256:{MODEL_HEX}"));
        assert_eq!(id.source, IdentitySource::OllamaManifest);
        assert_eq!(id.publisher, "");
        let id = index
            .lookup(&models.join(format!("blobs/sha256-{ORG_HEX}")))
            .expect("acme");
        assert_eq!(
            (id.model.as_str(), id.publisher.as_str()),
            ("acme/tuned:q4", "acme")
        );
        assert_eq!(
            index.lookup(&models.join(format!("blobs/sha256-{LICENSE_HEX}"))),
            None
        );
    }

    #[test]
    fn an_ollama_classic_manifest_tree_names_its_blobs() {
        let tmp = tempfile::tempdir().expect("tempdir");
        ollama_store(tmp.path(), "manifests");
        check_ollama(tmp.path());
    }

    #[test]
    fn an_ollama_manifests_v2_tree_names_its_blobs_the_same_way() {
        let tmp = tempfile::tempdir().expect("tempdir");
        ollama_store(tmp.path(), "manifests-v2");
        check_ollama(tmp.path());
    }

    #[test]
    fn ollama_names_from_other_registries_keep_their_host() {
        let rel = |s: &str| s.split('/').map(str::to_owned).collect::<Vec<_>>();
        let name = |s: &str| ollama_name(&rel(s)).map(|(n, _)| n);
        assert_eq!(
            name("registry.ollama.ai/library/llama3/8b").as_deref(),
            Some("llama3:8b")
        );
        assert_eq!(
            name("hf.co/bartowski/Llama-GGUF/Q4_K_M").as_deref(),
            Some("hf.co/bartowski/Llama-GGUF:Q4_K_M")
        );
        assert_eq!(name("library/llama3/8b").as_deref(), Some("llama3:8b"));
        assert_eq!(name("llama3/8b").as_deref(), Some("llama3:8b"));
        assert_eq!(name("8b"), None);
    }

    #[test]
    fn the_identifier_prefers_hf_then_ollama_then_header_then_directory() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let repo = hf_repo(&tmp.path().join("hub"));
        ollama_store(&tmp.path().join("ollama"), "manifests");
        let mut identifier = Identifier::new();

        let blob = repo.join("blobs/abc123");
        let snap = repo
            .join("snapshots")
            .join(REV)
            .join("model-00001-of-00002.safetensors");
        let id = identifier.identify(&[&blob, &snap], None);
        assert_eq!(
            (id.source, id.revision.as_str()),
            (IdentitySource::HfCache, REV)
        );

        let ollama_blob = tmp.path().join(format!("ollama/blobs/sha256-{MODEL_HEX}"));
        let header = Identity {
            model: "Meta Llama 3 8B".into(),
            source: IdentitySource::GgufMetadata,
            ..Identity::default()
        };
        let id = identifier.identify(&[&ollama_blob], Some(header.clone()));
        assert_eq!(id.model, "llama3:8b");

        let plain = tmp.path().join("srv/models/mistral-7b/model.gguf");
        assert_eq!(identifier.identify(&[&plain], Some(header.clone())), header);
        let id = identifier.identify(&[&plain], None);
        assert_eq!(
            (id.model.as_str(), id.source),
            ("mistral-7b", IdentitySource::Directory)
        );
    }

    #[test]
    fn from_directory_skips_generic_names() {
        let id = from_directory(Path::new(
            "/data/models/Qwen2-7B/checkpoints/weights/model.bin",
        ));
        assert_eq!(id.model, "Qwen2-7B");
        assert_eq!(id.repo_path, "checkpoints/weights/model.bin");
        assert_eq!(id.source, IdentitySource::Directory);

        let id = from_directory(Path::new(
            "/srv/x/models--org--name/snapshots/0a1b2c3d4e5f/w.bin",
        ));
        assert_eq!(
            (id.model.as_str(), id.publisher.as_str()),
            ("org/name", "org")
        );

        let id = from_directory(Path::new("/home/alice/.cache/llama-3-8b.Q4_K_M.gguf"));
        assert_eq!(id.model, "llama-3-8b.Q4_K_M");
        assert_eq!(id.repo_path, "llama-3-8b.Q4_K_M.gguf");

        let id = from_directory(Path::new(&format!("/models/blobs/sha256-{MODEL_HEX}")));
        assert_eq!(
            (id.model.as_str(), id.source),
            ("", IdentitySource::Unknown)
        );
    }

    #[test]
    fn shard_names_are_parsed() {
        assert_eq!(
            shard_of("model-00001-of-00005.safetensors"),
            Some((1, 5, "model".into()))
        );
        assert_eq!(
            shard_of("pytorch_model-00002-of-00002.bin"),
            Some((2, 2, "pytorch_model".into()))
        );
        assert_eq!(
            shard_of("Llama-3.1-70B-Q4_K_M-00003-of-00004.gguf"),
            Some((3, 4, "Llama-3.1-70B-Q4_K_M".into()))
        );
        assert_eq!(shard_of("model.safetensors"), None);
        assert_eq!(shard_of("model-00006-of-00005.safetensors"), None);
        assert_eq!(shard_of("model-00000-of-00005.safetensors"), None);
        assert_eq!(shard_of("-00001-of-00005.safetensors"), None);
        assert_eq!(shard_of("model-0000a-of-00005.safetensors"), None);
        assert_eq!(shard_of("model-00001-of-00005x"), None);

        assert_eq!(
            shard_index_path(Path::new("/s/model-00001-of-00005.safetensors")),
            Some(PathBuf::from("/s/model.safetensors.index.json"))
        );
        assert_eq!(
            shard_index_path(Path::new("/s/pytorch_model-00001-of-00002.bin")),
            Some(PathBuf::from("/s/pytorch_model.bin.index.json"))
        );
        assert_eq!(
            shard_index_path(Path::new("/s/m-00001-of-00002.gguf")),
            None
        );
        assert!(is_shard_index("model.safetensors.index.json"));
        assert!(is_shard_index("pytorch_model.bin.index.json"));
        assert!(!is_shard_index("config.json"));
    }

    #[test]
    fn a_shard_index_lists_each_shard_once() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("model.safetensors.index.json");
        let index = serde_json::json!({
            "metadata": {"total_size": 16060522496u64},
            "weight_map": {
                "lm_head.weight": "model-00002-of-00002.safetensors",
                "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                "model.norm.weight": "model-00002-of-00002.safetensors",
                "evil": "../../etc/passwd"
            }
        });
        write(&path, index.to_string().as_bytes());
        assert_eq!(
            read_shard_index(&path),
            Ok(vec![
                "model-00001-of-00002.safetensors".to_owned(),
                "model-00002-of-00002.safetensors".to_owned()
            ])
        );

        write(&path, br#"{"metadata": {}}"#);
        assert!(read_shard_index(&path).is_err());
        write(&path, b"not json");
        assert!(read_shard_index(&path).is_err());
        assert!(read_shard_index(&tmp.path().join("missing.json")).is_err());
    }

    #[test]
    fn an_oversized_shard_index_is_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("model.safetensors.index.json");
        let file = fs::File::create(&path).expect("create");
        file.set_len(MAX_SHARD_INDEX_BYTES + 1).expect("sparse");
        let err = read_shard_index(&path).expect_err("too large");
        assert!(err.contains("larger than"), "{err}");
    }

    #[test]
    fn every_source_has_its_wire_name() {
        let all = [
            (IdentitySource::HfCache, "hf-cache"),
            (IdentitySource::OllamaManifest, "ollama-manifest"),
            (IdentitySource::GgufMetadata, "gguf-metadata"),
            (IdentitySource::SafetensorsMetadata, "safetensors-metadata"),
            (IdentitySource::Directory, "directory"),
            (IdentitySource::ContentHash, "sha256"),
            (IdentitySource::Unknown, "unknown"),
        ];
        for (source, name) in all {
            assert_eq!(source.as_str(), name);
            assert_eq!(source.to_string(), name);
        }
        assert_eq!(IdentitySource::default(), IdentitySource::Unknown);
    }
}
