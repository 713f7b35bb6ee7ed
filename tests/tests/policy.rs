//! The jurisdiction policy as an operator uses it: `sov-collector policy check` on the
//! example and on a broken file, and a running collector's view of a file replaced on disk.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::Path;
use std::process::Command;

use sov_collector::policy::PolicyWatch;
use sov_e2e::bin_path;

fn check(file: &Path) -> (i32, String, String) {
    let out = Command::new(bin_path("e2e-collector"))
        .args(["policy", "check", file.to_str().unwrap()])
        .output()
        .expect("run");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn example() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/policy.toml"))
        .unwrap()
}

/// Write through a temporary file and a rename, as editors and config managers do.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[test]
fn the_example_policy_passes_the_check() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.toml");
    std::fs::write(&file, example()).unwrap();
    let (code, out, err) = check(&file);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        out.trim(),
        format!(
            "{}: policy is valid (2 sites, 6 model rules, 2 dataset rules, 4 allow entries)",
            file.display()
        )
    );
}

#[test]
fn an_expired_allow_entry_is_printed_as_a_warning_and_passes() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.toml");
    std::fs::write(
        &file,
        "jurisdiction = \"MA\"\n[[allow]]\ncountry = \"FR\"\nreason = \"old\"\nexpires = \"2020-01-01T00:00:00Z\"\n",
    )
    .unwrap();
    let (code, out, err) = check(&file);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("warning: allow[0].expires"), "{out}");
}

#[test]
fn a_broken_policy_lists_every_problem_and_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.toml");
    let broken = example()
        .replace("jurisdiction = \"MA\"", "jurisdiction = \"Morocco\"")
        .replace("class = \"public\"", "class = \"open\"")
        .replace(
            "reason = \"Operating-system package mirrors (public software only)\"",
            "reason = \"\"",
        );
    std::fs::write(&file, broken).unwrap();
    let (code, out, err) = check(&file);
    assert_eq!(code, 64, "{out}{err}");
    for needle in [
        "jurisdiction: \"Morocco\"",
        "model[3].class: \"open\"",
        "model[4].class: \"open\"",
        "allow[1].reason: is required",
    ] {
        assert!(err.contains(needle), "{needle} not reported in:\n{err}");
    }

    let (code, _, err) = check(&dir.path().join("missing.toml"));
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("missing.toml"), "{err}");
}

#[test]
fn a_policy_replaced_on_disk_is_picked_up_and_an_invalid_replacement_keeps_the_old_one() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.toml");
    std::fs::write(&file, example()).unwrap();
    let watch = PolicyWatch::new(&file).unwrap();
    assert_eq!(watch.current().jurisdiction, "MA");
    assert!(!watch.reload_if_changed());

    replace(&file, &example().replace("\"MA\"", "\"SN\""));
    assert!(watch.reload_if_changed());
    let policy = watch.current();
    assert_eq!(policy.jurisdiction, "SN");
    assert_eq!(policy.node_country("rabat-2", "FR"), "SN");

    replace(
        &file,
        &example().replace("window_secs = 300", "window_secs = 1"),
    );
    assert!(!watch.reload_if_changed());
    assert_eq!(watch.current().jurisdiction, "SN", "the old policy stays");
    assert_eq!(watch.current().thresholds.window_secs, 300);
}

/// The example policy of docs/OPERATOR.md's "Training runs, lineage and dataset classes",
/// exactly as written there.
fn operator_training_example() -> String {
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/OPERATOR.md"))
            .unwrap();
    let start = "```toml\n# policy.toml: training runs and dataset classes\n";
    let block = doc.split_once(start).unwrap().1;
    let block = block.split_once("```").unwrap().0;
    format!("# policy.toml: training runs and dataset classes\n{block}")
}

#[test]
fn the_operator_guide_s_dataset_classes_example_passes_the_check_and_classes_as_it_says() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.toml");
    let text = operator_training_example();
    std::fs::write(&file, &text).unwrap();
    let (code, out, err) = check(&file);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("(1 sites, 1 model rules, 5 dataset rules, 0 allow entries)"),
        "{out}"
    );

    use sov_collector::policy::{DatasetFacts, ModelClass, ModelFacts, Policy};
    let p = Policy::parse(&text, "OPERATOR.md").unwrap();
    let class = |path: &str, sha256: &str, repo: &str| {
        p.dataset_class(&DatasetFacts { path, sha256, repo })
    };
    let hf = "/root/.cache/huggingface/hub/datasets--gov-ma--census-2024/snapshots/r/train.parquet";
    assert_eq!(
        class(hf, "", "gov-ma/census-2024"),
        (ModelClass::Restricted, Some(0))
    );
    assert_eq!(
        class("/srv/datasets/national/health/part-0.arrow", "", ""),
        (ModelClass::Restricted, Some(1))
    );
    assert_eq!(
        class("/home/ml/data/darija-chat.parquet", "", ""),
        (ModelClass::Restricted, Some(2))
    );
    let sha = "5f2b7c1e0a9d8c7b6a5f4e3d2c1b0a99887766554433221100ffeeddccbbaa99";
    assert_eq!(
        class("/tmp/x.jsonl", &sha.to_uppercase(), ""),
        (ModelClass::Restricted, Some(3))
    );
    assert_eq!(
        class("/srv/datasets/c4/en/c4-train.00001.json.gz", "", ""),
        (ModelClass::Public, Some(4)),
        "first match wins: the national directory before the rest"
    );
    assert_eq!(
        class("/home/ml/data/wiki.parquet", "", "wikimedia/wikipedia"),
        (ModelClass::Unclassified, None)
    );
    // And the base weights rule of the same example.
    let base = ModelFacts {
        model: "atlas-lab/atlas-7b",
        ..Default::default()
    };
    assert_eq!(p.model_class(&base).0, ModelClass::Restricted);
    assert_eq!(p.node_country("paris-gpu", "MA"), "FR");
}
