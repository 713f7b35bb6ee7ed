//! The architecture invariants that the compiler does not check, checked here
//! (`cargo test -p sov-collector --test architecture`; see docs/ARCHITECTURE.md):
//!
//! 1. the collector's library modules form layers: a module's code (tests aside) names only
//!    modules of lower layers ([`LAYERS`]), so there is no import circle and nothing imports a
//!    part above it (nothing imports the CLI, config and store import nothing above them);
//! 2. only the dev mode embeds an agent: `sov_agent` appears in `dev` and nowhere else, and
//!    only the RPC edges ([`RPC_EDGES`]) speak `tonic::Status`;
//! 3. the workspace's crates depend on each other only as [`CRATES`] declares, and `sovctl`
//!    builds without a database driver or a geolocation reader ([`SOVCTL_NEVER`]).
//!
//! The module check reads the sources the way the compiler reaches them (from `lib.rs`,
//! following `mod` declarations, leaving out `#[cfg(test)]` items and modules), with comments
//! and string literals blanked, and resolves every `crate::…` and `super::…` path to its
//! top-level module. A failure names the file, the line and the path.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The collector's top-level modules, bottom layer first. A module may name modules of lower
/// layers only (not of its own layer: two parts that need each other are one part).
const LAYERS: &[&[&str]] = &[
    // The domain error, mapped to gRPC and HTTP at the edges.
    &["error"],
    // Vocabulary: identities and roles, breaches.
    &["auth", "breach"],
    // Certificates and storage: the store imports nothing above this line.
    &["pki", "p12", "store"],
    // Parts over the store: API tokens, geolocation, the counters.
    &["token", "geo", "metrics", "checkpoint"],
    // Concepts: the TLS front door, the policy and its rules, alerts, enrollment.
    &["tls", "policy", "alert", "enroll"],
    // The deriver: what is computed from committed reports after the ack.
    &["derive"],
    // The services regulators and agents talk to.
    &["ingest", "query"],
    // The configuration file's root (each section lives with its part, below).
    &["config"],
    // The gRPC edge.
    &["server"],
    // Startup: build, then spawn.
    &["app"],
    // The all-in-one quickstart (embeds a real agent).
    &["dev"],
    // The command line: nothing imports it.
    &["cli"],
];

/// Modules that may name the `sov_agent` crate.
const MAY_USE_AGENT: &[&str] = &["dev"];

/// The RPC edges: the only files that may speak `tonic::Status` (everything below them
/// returns its own error or [`sov_collector::error::ApiError`], turned into a status there).
const RPC_EDGES: &[&str] = &[
    "ingest.rs",
    "enroll.rs",
    "query/mod.rs",
    "server.rs",
    "tls.rs",
    "error.rs",
];

/// Workspace crates and the workspace crates each may depend on (normal and build
/// dependencies; dev-dependencies are the tests' business).
const CRATES: &[(&str, &[&str])] = &[
    ("sov-proto", &[]),
    ("sov-common", &[]),
    ("sov-evidence", &["sov-proto"]),
    ("sov-agent", &["sov-proto", "sov-common"]),
    (
        "sov-collector",
        &["sov-proto", "sov-common", "sov-evidence", "sov-agent"],
    ),
    ("sovctl", &["sov-proto", "sov-common", "sov-evidence"]),
    (
        "sov-e2e",
        &[
            "sov-proto",
            "sov-common",
            "sov-evidence",
            "sov-agent",
            "sov-collector",
            "sovctl",
        ],
    ),
];

/// Crates that must not be in `sovctl`'s build, however indirectly.
const SOVCTL_NEVER: &[&str] = &["rusqlite", "tokio-postgres", "maxminddb", "sov-collector"];

/// Rust source with comments, string and char literals replaced by spaces (newlines kept), so
/// that braces and paths are only those of code.
fn code_only(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    let blank = |out: &mut Vec<u8>, c: u8| out.push(if c == b'\n' { b'\n' } else { b' ' });
    while i < b.len() {
        let c = b[i];
        if c == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                out.push(b' ');
                i += 1;
            }
        } else if c == b'/' && b.get(i + 1) == Some(&b'*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                    depth += 1;
                    out.extend_from_slice(b"  ");
                    i += 2;
                } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                    depth -= 1;
                    out.extend_from_slice(b"  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    blank(&mut out, b[i]);
                    i += 1;
                }
            }
        } else if c == b'r'
            && (b.get(i + 1) == Some(&b'"') || b.get(i + 1) == Some(&b'#'))
            && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_'))
        {
            // Raw string r"…" or r#"…"#.
            let mut j = i + 1;
            let mut hashes = 0;
            while b.get(j) == Some(&b'#') {
                hashes += 1;
                j += 1;
            }
            if b.get(j) != Some(&b'"') {
                out.push(c);
                i += 1;
                continue;
            }
            let close: Vec<u8> = std::iter::once(b'"')
                .chain(std::iter::repeat_n(b'#', hashes))
                .collect();
            let mut k = j + 1;
            while k < b.len() && !b[k..].starts_with(&close) {
                k += 1;
            }
            let end = (k + close.len()).min(b.len());
            for &x in &b[i..end] {
                blank(&mut out, x);
            }
            i = end;
        } else if c == b'"' {
            blank(&mut out, c);
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    blank(&mut out, b[i]);
                    i += 1;
                }
                if i < b.len() {
                    blank(&mut out, b[i]);
                    i += 1;
                }
            }
            if i < b.len() {
                out.push(b' ');
                i += 1;
            }
        } else if c == b'\'' {
            // A char literal ('x', '\n', '\u{..}') or a lifetime ('a).
            let end = if b.get(i + 1) == Some(&b'\\') {
                b[i + 2..]
                    .iter()
                    .position(|&x| x == b'\'')
                    .map(|p| i + 2 + p)
            } else if b.get(i + 2) == Some(&b'\'') {
                Some(i + 2)
            } else {
                None
            };
            match end {
                Some(e) => {
                    out.resize(out.len() + (e + 1 - i), b' ');
                    i = e + 1;
                }
                None => {
                    out.push(c);
                    i += 1;
                }
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether an attribute line keeps the next item out of a normal (non-test) build.
fn test_only(attr: &str) -> bool {
    let a: String = attr.chars().filter(|c| !c.is_whitespace()).collect();
    a == "#[cfg(test)]" || a.starts_with("#[cfg(any(test,")
}

/// The lines of `code` without its test-only items; the names of test-only `mod x;`
/// declarations go to `test_mods`.
fn without_tests(code: &str, test_mods: &mut BTreeSet<String>) -> Vec<(usize, String)> {
    let lines: Vec<&str> = code.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if !test_only(lines[i].trim()) {
            out.push((i + 1, lines[i].to_owned()));
            i += 1;
            continue;
        }
        // Skip the attribute, further attributes, then the item: to its `;` or its block.
        i += 1;
        while i < lines.len() && lines[i].trim().starts_with("#[") {
            i += 1;
        }
        let mut depth = 0i32;
        let mut opened = false;
        while i < lines.len() {
            let line = lines[i];
            let t = line.trim();
            if !opened
                && let Some(name) = t
                    .strip_prefix("pub mod ")
                    .or_else(|| t.strip_prefix("pub(crate) mod "))
                    .or_else(|| t.strip_prefix("mod "))
                    .and_then(|r| r.strip_suffix(';'))
            {
                test_mods.insert(name.trim().to_owned());
            }
            for ch in line.chars() {
                match ch {
                    '{' => {
                        depth += 1;
                        opened = true;
                    }
                    '}' => depth -= 1,
                    _ => {}
                }
            }
            i += 1;
            if (opened && depth <= 0) || (!opened && t.ends_with(';')) {
                break;
            }
        }
    }
    out
}

/// Where a module's own files (its children) live.
fn child_dir(file: &Path) -> PathBuf {
    let stem = file.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    let parent = file.parent().unwrap_or(Path::new("")).to_path_buf();
    if stem == "mod" || stem == "lib" {
        parent
    } else {
        parent.join(stem)
    }
}

/// One path that names another part of the crate.
#[derive(Debug)]
struct Use {
    file: PathBuf,
    line: usize,
    text: String,
    target: String,
}

/// Identifiers at the start of each item of a `{a, b::c, self}` group.
fn group_heads(group: &str) -> Vec<String> {
    let mut heads = Vec::new();
    let mut depth = 0;
    let mut item = String::new();
    for ch in group.chars() {
        match ch {
            '{' => {
                depth += 1;
                item.push(ch);
            }
            '}' => {
                depth -= 1;
                item.push(ch);
            }
            ',' if depth == 0 => {
                heads.push(std::mem::take(&mut item));
            }
            _ => item.push(ch),
        }
    }
    heads.push(item);
    heads
        .iter()
        .map(|h| {
            h.trim()
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect::<String>()
        })
        .filter(|h| !h.is_empty())
        .collect()
}

/// Every `crate::x` and `super::…::x` path of `lines` that leaves the module `module` (its
/// path from the crate root), as the top-level module it names.
fn paths_out(file: &Path, module: &[String], lines: &[(usize, String)], uses: &mut Vec<Use>) {
    let text: String = lines
        .iter()
        .map(|(_, l)| l.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    let line_of = |offset: usize| {
        let n = text[..offset].matches('\n').count();
        lines[n].0
    };
    let bytes = text.as_bytes();
    let ident_start = |i: usize| {
        i == 0
            || !(bytes[i - 1].is_ascii_alphanumeric()
                || bytes[i - 1] == b'_'
                || bytes[i - 1] == b':')
    };
    let push = |offset: usize, target: String, uses: &mut Vec<Use>| {
        if target.is_empty() || Some(&target) == module.first() {
            return;
        }
        let end = text[offset..]
            .find(['\n', ';', '('])
            .map_or(text.len(), |e| offset + e);
        uses.push(Use {
            file: file.to_path_buf(),
            line: line_of(offset),
            text: text[offset..end].trim().to_owned(),
            target,
        });
    };
    let after = |i: usize| -> String {
        text[i..]
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    for (start, _) in text.match_indices("crate::") {
        if !ident_start(start) {
            continue;
        }
        let rest = start + "crate::".len();
        if text[rest..].starts_with('{') {
            let close = text[rest..].find('}').map_or(text.len(), |c| rest + c);
            // Nested groups: take up to the matching brace.
            let mut depth = 0;
            let mut end = rest;
            for (k, ch) in text[rest..].char_indices() {
                match ch {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            end = rest + k;
                            break;
                        }
                    }
                    _ => {}
                }
            }
            let end = end.max(close.min(end.max(rest)));
            for head in group_heads(&text[rest + 1..end]) {
                push(start, head, uses);
            }
        } else {
            push(start, after(rest), uses);
        }
    }
    for (start, _) in text.match_indices("super::") {
        if !ident_start(start) {
            continue;
        }
        let mut rest = start;
        let mut ups = 0;
        while text[rest..].starts_with("super::") {
            ups += 1;
            rest += "super::".len();
        }
        // `super` from a file at depth d (its module path has d parts) reaches the crate root
        // after d steps; before that it stays inside the same top-level module.
        if ups >= module.len() {
            if text[rest..].starts_with('{') {
                let end = text[rest..].find('}').map_or(text.len(), |e| rest + e);
                for head in group_heads(&text[rest + 1..end]) {
                    push(start, head, uses);
                }
            } else {
                push(start, after(rest), uses);
            }
        }
    }
}

/// One source file of the library: its path, its module path, and its non-test code lines
/// with their numbers.
type SourceFile = (PathBuf, Vec<String>, Vec<(usize, String)>);

/// Every non-test source file of the library, with its module path, from `lib.rs`.
fn library_files(src: &Path) -> Vec<SourceFile> {
    let mut out = Vec::new();
    let mut queue = vec![(src.join("lib.rs"), Vec::<String>::new())];
    while let Some((file, module)) = queue.pop() {
        let text = std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
        let mut test_mods = BTreeSet::new();
        let lines = without_tests(&code_only(&text), &mut test_mods);
        for (_, line) in &lines {
            let t = line.trim();
            let decl = t
                .strip_prefix("pub mod ")
                .or_else(|| t.strip_prefix("pub(crate) mod "))
                .or_else(|| t.strip_prefix("mod "))
                .and_then(|r| r.strip_suffix(';'));
            if let Some(name) = decl {
                let name = name.trim();
                let dir = child_dir(&file);
                let child = [
                    dir.join(format!("{name}.rs")),
                    dir.join(name).join("mod.rs"),
                ]
                .into_iter()
                .find(|p| p.exists())
                .unwrap_or_else(|| panic!("{}: mod {name}: no file", file.display()));
                let mut m = module.clone();
                m.push(name.to_owned());
                queue.push((child, m));
            }
        }
        out.push((file, module, lines));
    }
    out
}

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn the_code_only_view_blanks_comments_and_literals_but_keeps_lines() {
    let src = "let a = \"crate::x {\"; // crate::y\nlet b = r#\"}\"#; let c = '{';\n/* crate::z */ crate::w";
    let code = code_only(src);
    assert_eq!(code.lines().count(), 3);
    assert!(!code.contains("crate::x") && !code.contains("crate::y"));
    assert!(!code.contains("crate::z") && code.contains("crate::w"));
    assert!(!code.contains('{') && !code.contains('}'), "{code}");
    let mut mods = BTreeSet::new();
    let kept = without_tests(
        "use a;\n#[cfg(test)]\nmod tests {\n    use crate::cli;\n}\n#[cfg(test)]\nmod suite;\nfn f() {}\n",
        &mut mods,
    );
    let kept: Vec<&str> = kept.iter().map(|(_, l)| l.as_str()).collect();
    assert_eq!(kept, ["use a;", "fn f() {}"]);
    assert_eq!(mods.into_iter().collect::<Vec<_>>(), ["suite"]);
}

#[test]
fn paths_resolve_to_their_top_level_module() {
    let mut uses = Vec::new();
    let lines: Vec<(usize, String)> = [
        "use crate::{store::{Store, StoreError}, auth};",
        "let x = crate::geo::normalise(ip);",
        "use super::super::super::tls::ServerTls;",
        "use super::Rule;",
    ]
    .iter()
    .enumerate()
    .map(|(i, l)| (i + 1, (*l).to_owned()))
    .collect();
    let module = ["policy".to_owned(), "rules".to_owned(), "x".to_owned()];
    paths_out(Path::new("f.rs"), &module, &lines, &mut uses);
    let targets: Vec<&str> = uses.iter().map(|u| u.target.as_str()).collect();
    assert_eq!(targets, ["store", "auth", "geo", "tls"]);
    assert_eq!(uses[2].line, 2);
}

#[test]
fn no_module_names_a_module_of_its_own_or_a_higher_layer() {
    let layer: BTreeMap<&str, usize> = LAYERS
        .iter()
        .enumerate()
        .flat_map(|(i, mods)| mods.iter().map(move |m| (*m, i)))
        .collect();
    let files = library_files(&src_dir());
    let mut tops = BTreeSet::new();
    let mut uses = Vec::new();
    for (file, module, lines) in &files {
        if let Some(top) = module.first() {
            tops.insert(top.clone());
            paths_out(file, module, lines, &mut uses);
        }
    }
    let unknown: Vec<&String> = tops
        .iter()
        .filter(|t| !layer.contains_key(t.as_str()))
        .collect();
    assert!(
        unknown.is_empty(),
        "modules missing from LAYERS in {}: {unknown:?}",
        file!()
    );
    let mut bad = Vec::new();
    for u in &uses {
        let from = u
            .file
            .strip_prefix(src_dir())
            .unwrap_or(&u.file)
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .map(|s| s.trim_end_matches(".rs").to_owned())
            .unwrap_or_default();
        let (Some(&lf), Some(&lt)) = (layer.get(from.as_str()), layer.get(u.target.as_str()))
        else {
            continue;
        };
        if lt >= lf {
            bad.push(format!(
                "{}:{}: `{}` ({from}, layer {lf}) names {} (layer {lt})",
                u.file.display(),
                u.line,
                u.text,
                u.target
            ));
        }
    }
    assert!(
        bad.is_empty(),
        "imports that run sideways or up the layers (LAYERS in {}):\n{}",
        file!(),
        bad.join("\n")
    );
    // The check saw the crate: every layer's modules were read.
    assert!(files.len() > 40, "{} files", files.len());
}

#[test]
fn only_the_dev_mode_embeds_an_agent() {
    let mut bad = Vec::new();
    for (file, module, lines) in library_files(&src_dir()) {
        let top = module.first().map_or("lib", String::as_str);
        if MAY_USE_AGENT.contains(&top) {
            continue;
        }
        for (n, line) in &lines {
            if line.contains("sov_agent") {
                bad.push(format!("{}:{n}: {}", file.display(), line.trim()));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "sov_agent outside {MAY_USE_AGENT:?}:\n{}",
        bad.join("\n")
    );
}

#[test]
fn only_the_rpc_edges_speak_tonic_status() {
    let mut bad = Vec::new();
    for (file, _, lines) in library_files(&src_dir()) {
        let rel = file
            .strip_prefix(src_dir())
            .unwrap_or(&file)
            .to_string_lossy()
            .into_owned();
        if RPC_EDGES.contains(&rel.as_str()) {
            continue;
        }
        for (n, line) in &lines {
            let t = line.trim();
            if t.contains("tonic::Status") || (t.starts_with("use tonic::") && t.contains("Status"))
            {
                bad.push(format!("{}:{n}: {t}", file.display()));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "tonic::Status outside {RPC_EDGES:?}:\n{}",
        bad.join("\n")
    );
}

/// The host's target triple (`rustc -vV`).
fn host_triple() -> String {
    let out = std::process::Command::new("rustc")
        .arg("-vV")
        .output()
        .expect("rustc -vV runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .expect("rustc -vV names the host")
        .to_owned()
}

/// `cargo metadata` of the workspace, resolved for this host (offline: the build that runs
/// this test already fetched every crate it needs).
fn metadata() -> serde_json::Value {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let host = host_triple();
    let out = std::process::Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--offline"])
        .args(["--filter-platform", &host])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("cargo metadata prints JSON")
}

#[test]
fn workspace_crates_depend_on_each_other_only_as_declared_and_sovctl_has_no_store() {
    let meta = metadata();
    let packages = meta["packages"].as_array().expect("packages");
    let name_of: BTreeMap<&str, &str> = packages
        .iter()
        .filter_map(|p| Some((p["id"].as_str()?, p["name"].as_str()?)))
        .collect();
    let members: BTreeSet<&str> = meta["workspace_members"]
        .as_array()
        .expect("members")
        .iter()
        .filter_map(|m| name_of.get(m.as_str()?).copied())
        .collect();
    let declared: BTreeMap<&str, &[&str]> = CRATES.iter().copied().collect();
    assert_eq!(
        members,
        declared.keys().copied().collect(),
        "workspace members vs CRATES in {}",
        file!()
    );
    // Normal and build dependencies of every package in the resolved graph.
    let mut deps: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for node in meta["resolve"]["nodes"].as_array().expect("resolve") {
        let id = node["id"].as_str().unwrap_or("");
        let list = node["deps"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|d| {
                d["dep_kinds"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|k| k["kind"].as_str() != Some("dev"))
            })
            .filter_map(|d| d["pkg"].as_str())
            .collect();
        deps.insert(id, list);
    }
    let id_of: BTreeMap<&str, &str> = name_of
        .iter()
        .filter(|(_, n)| members.contains(*n))
        .map(|(id, n)| (*n, *id))
        .collect();
    for (krate, allowed) in CRATES {
        let direct: BTreeSet<&str> = deps[id_of[krate]]
            .iter()
            .map(|d| name_of[d])
            .filter(|n| members.contains(n))
            .collect();
        let extra: Vec<&&str> = direct.iter().filter(|d| !allowed.contains(d)).collect();
        assert!(
            extra.is_empty(),
            "{krate} depends on {extra:?}, which CRATES in {} does not allow",
            file!()
        );
    }
    // Everything sovctl builds, however indirectly.
    let mut seen = BTreeSet::new();
    let mut todo = vec![id_of["sovctl"]];
    while let Some(id) = todo.pop() {
        if seen.insert(id) {
            todo.extend(deps.get(id).into_iter().flatten().copied());
        }
    }
    let built: BTreeSet<&str> = seen.iter().map(|id| name_of[id]).collect();
    for never in SOVCTL_NEVER {
        assert!(!built.contains(never), "sovctl builds {never}");
    }
    assert!(
        built.contains("sov-evidence") && built.contains("tonic"),
        "{built:?}"
    );
}
