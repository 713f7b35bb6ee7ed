//! `sov-collector pki issue --p12` writes a PKCS#12 bundle for a browser that a real tool
//! reads: `openssl pkcs12 -info` with the printed password shows the certificate, the CA and
//! the very key of the `.key` file, verifies the MAC, and refuses a wrong password.
//! `.ci/run` installs `openssl`; elsewhere the test skips loudly without it.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::process::Command;

use sov_e2e::bin_path;

fn openssl_pkcs12(file: &std::path::Path, password: &str) -> (bool, String) {
    let out = Command::new("openssl")
        .args(["pkcs12", "-info", "-noenc", "-in"])
        .arg(file)
        .args(["-passin", &format!("pass:{password}")])
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn a_p12_bundle_is_read_by_openssl_with_the_printed_password_and_holds_the_key_and_both_certificates()
 {
    if Command::new("openssl").arg("version").output().is_err() {
        assert!(
            std::env::var("CI").is_err(),
            "openssl is required in CI (.ci/run installs it)"
        );
        sov_e2e::skipped(
            "p12",
            "openssl is not installed: apt-get install -y openssl",
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let pki_arg = pki.to_str().unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(bin_path("e2e-collector"))
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    run(&["pki", "init", "--dir", pki_arg]);
    let printed = run(&[
        "pki",
        "issue",
        "--dir",
        pki_arg,
        "--role",
        "regulator",
        "--name",
        "analyst",
        "--p12",
    ]);
    let password = printed
        .lines()
        .find_map(|l| l.strip_prefix("bundle password:"))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    let bundle = pki.join("analyst.p12");
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&bundle).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let (ok, info) = openssl_pkcs12(&bundle, &password);
    assert!(ok, "{info}");
    assert!(info.contains("MAC: sha256"), "{info}");
    assert!(
        info.contains("CN = analyst") && info.contains("CN = Sovereign CA"),
        "{info}"
    );
    assert_eq!(info.matches("BEGIN CERTIFICATE").count(), 2, "{info}");
    let key = std::fs::read_to_string(pki.join("analyst.key")).unwrap();
    assert!(
        info.contains(key.trim()),
        "the bundle's key is the .key file's:\n{info}\n{key}"
    );
    let (ok, info) = openssl_pkcs12(&bundle, "not-the-password");
    assert!(!ok, "a wrong password is refused: {info}");
}
