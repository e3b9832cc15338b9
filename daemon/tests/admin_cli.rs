//! `nfcpay-admin` key ceremony, end to end: the real binary against a fresh SoftHSM2 token,
//! checked with the published X9.24-3-2017 vectors and with OpenSC's `pkcs11-tool`.

// A panic is how a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use nfcpay_keystore::components::clear_key_kcv;

const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
const PIN: &str = "admin-cli-pin";

/// A fresh token and a configuration naming it; removed on drop.
struct Ceremony {
    dir: tempfile::TempDir,
    label: String,
}

impl Ceremony {
    fn new(label: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../softhsm-setup/init-token");
        let output = Command::new(script)
            .arg("--dir")
            .arg(dir.path())
            .args([
                "--label",
                label,
                "--pin",
                PIN,
                "--so-pin",
                "admin-cli-so-pin",
            ])
            .output()
            .expect("softhsm-setup/init-token runs (`cargo xtask test` installs softhsm2)");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        std::fs::write(dir.path().join("pin"), PIN).unwrap();
        let config = format!(
            "[keystore]\nbackend = \"pkcs11\"\nuri = \"pkcs11:token={label}?module-path={MODULE}&pin-source=file:{}\"\n",
            dir.path().join("pin").display()
        );
        std::fs::write(dir.path().join("nfcpay.toml"), config).unwrap();
        Self {
            dir,
            label: label.to_owned(),
        }
    }

    fn softhsm_conf(&self) -> PathBuf {
        self.dir.path().join("softhsm2.conf")
    }

    fn admin(&self, args: &[&str], stdin: &str) -> Output {
        let mut child = Command::new(env!("CARGO_BIN_EXE_nfcpay-admin"))
            .arg("--config")
            .arg(self.dir.path().join("nfcpay.toml"))
            .args(args)
            .env("SOFTHSM2_CONF", self.softhsm_conf())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    }

    fn ok(&self, args: &[&str], stdin: &str) -> String {
        let output = self.admin(args, stdin);
        assert!(
            output.status.success(),
            "{args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    /// Runs a command that must fail with `code`, and returns its error text.
    fn fails(&self, args: &[&str], stdin: &str, code: i32) -> String {
        let output = self.admin(args, stdin);
        assert_eq!(output.status.code(), Some(code), "{args:?}: {output:?}");
        String::from_utf8(output.stderr).unwrap()
    }

    /// `pkcs11-tool --list-objects` of the token, logged in.
    fn list_objects(&self) -> String {
        let output = Command::new("pkcs11-tool")
            .args([
                "--module",
                MODULE,
                "--token-label",
                &self.label,
                "--login",
                "--pin",
                PIN,
            ])
            .arg("--list-objects")
            .env("SOFTHSM2_CONF", self.softhsm_conf())
            .output()
            .expect("pkcs11-tool runs (`cargo xtask test` installs opensc)");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }
}

fn kcv_of(hex_digits: &str) -> String {
    clear_key_kcv(&hex::decode(hex_digits).unwrap())
        .unwrap()
        .to_string()
}

fn xor_hex(a: &str, b: &str) -> String {
    let (a, b) = (hex::decode(a).unwrap(), hex::decode(b).unwrap());
    hex::encode_upper(a.iter().zip(&b).map(|(x, y)| x ^ y).collect::<Vec<_>>())
}

/// The AES-128 BDK of the X9.24-3-2017 supplement, split into two components, gives the
/// published key check values for its transaction and working keys.
#[test]
fn imported_bdk_reproduces_the_published_vectors() {
    let ceremony = Ceremony::new("admin-kat");
    let bdk = "FEDCBA9876543210F1F1F1F1F1F1F1F1";
    let first = "0123456789ABCDEFFEDCBA9876543210";
    let second = xor_hex(bdk, first);
    let out = ceremony.ok(
        &[
            "bdk",
            "import",
            "--bdk-id",
            "12345678",
            "--components",
            "2",
            "--algorithm",
            "aes128",
        ],
        &format!("{first}\n{second}\n"),
    );
    assert!(
        out.contains(&format!("component 1 of 2: KCV {}", kcv_of(first))),
        "{out}"
    );
    assert!(
        out.contains(&format!("component 2 of 2: KCV {}", kcv_of(&second))),
        "{out}"
    );
    assert!(
        out.contains(&format!("combined key: KCV {}", kcv_of(bdk))),
        "{out}"
    );
    assert!(
        !out.contains(first) && !out.contains(&second) && !out.contains(bdk),
        "a key was printed"
    );

    // Published: transaction key of counter 1, and its AES-128 PIN and MAC-generation keys.
    let out = ceremony.ok(&["dukpt", "kcv", "--ksn", "123456789012345600000001"], "");
    assert!(
        out.contains(&format!(
            "KCV {}",
            kcv_of("4F21B565BAD9835E112B6465635EAE44")
        )),
        "{out}"
    );
    let out = ceremony.ok(
        &[
            "dukpt",
            "kcv",
            "--ksn",
            "123456789012345600000001",
            "--usage",
            "pin",
        ],
        "",
    );
    assert!(
        out.contains(&format!(
            "KCV {}",
            kcv_of("AF8CB133A78F8DC2D1359F18527593FB")
        )),
        "{out}"
    );
    let out = ceremony.ok(
        &[
            "dukpt",
            "kcv",
            "--ksn",
            "123456789012345600000001",
            "--usage",
            "mac-gen",
        ],
        "",
    );
    assert!(
        out.contains(&format!(
            "KCV {}",
            kcv_of("A2DC23DE6FDE0824A2BC321E08E4B8B7")
        )),
        "{out}"
    );

    // The BDK is sensitive and not extractable, and no derived key is left on the token.
    let objects = ceremony.list_objects();
    let secret_keys: Vec<&str> = objects.split("Secret Key Object").skip(1).collect();
    assert_eq!(secret_keys.len(), 1, "only the BDK remains: {objects}");
    let bdk_object = secret_keys[0];
    assert!(bdk_object.contains("nfcpay-bdk-12345678"), "{objects}");
    let line = |name: &str| {
        bdk_object
            .lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} line: {objects}"))
            .trim()
            .to_owned()
    };
    assert_eq!(
        line("Usage:"),
        "derive",
        "the BDK can only derive: {objects}"
    );
    let access = line("Access:");
    assert!(access.split(", ").any(|a| a == "sensitive"), "{objects}");
    assert!(!access.split(", ").any(|a| a == "extractable"), "{objects}");
}

#[test]
fn generate_then_list_shows_id_algorithm_and_kcv() {
    let ceremony = Ceremony::new("admin-list");
    let generated = ceremony.ok(&["bdk", "generate", "--bdk-id", "0123ABCD"], "");
    let kcv = generated.trim().rsplit(' ').next().unwrap().to_owned();
    assert_eq!(kcv.len(), 6, "{generated}");
    ceremony.ok(
        &[
            "bdk",
            "generate",
            "--bdk-id",
            "0123ABCE",
            "--algorithm",
            "aes128",
        ],
        "",
    );
    let listed = ceremony.ok(&["bdk", "list"], "");
    let line = listed.lines().find(|l| l.starts_with("0123ABCD")).unwrap();
    assert!(line.contains("aes256") && line.contains(&kcv), "{listed}");
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with("0123ABCE") && l.contains("aes128")),
        "{listed}"
    );
    let objects = ceremony.list_objects();
    assert_eq!(objects.matches("Secret Key Object").count(), 2, "{objects}");
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let ceremony = Ceremony::new("admin-neg");
    ceremony.ok(&["bdk", "generate", "--bdk-id", "0A0A0A0A"], "");
    let before = ceremony.ok(&["bdk", "list"], "");

    let error = ceremony.fails(&["bdk", "generate", "--bdk-id", "0A0A0A0A"], "", 1);
    assert!(error.contains("already"), "{error}");
    // clap refuses malformed arguments with its own usage code (2).
    ceremony.fails(&["bdk", "generate", "--bdk-id", "0A0A0A"], "", 2);
    ceremony.fails(
        &[
            "bdk",
            "generate",
            "--bdk-id",
            "0B0B0B0B",
            "--algorithm",
            "des",
        ],
        "",
        2,
    );
    ceremony.fails(
        &["dukpt", "kcv", "--ksn", "0A0A0A0A000000010001FFFF"],
        "",
        2,
    );
    ceremony.fails(
        &[
            "dukpt",
            "kcv",
            "--ksn",
            "0A0A0A0A0000000100000001",
            "--usage",
            "data",
        ],
        "",
        2,
    );

    let component = "11".repeat(16);
    let import = |count: &str, stdin: &str, code: i32| {
        ceremony.fails(
            &[
                "bdk",
                "import",
                "--bdk-id",
                "0C0C0C0C",
                "--components",
                count,
            ],
            stdin,
            code,
        )
    };
    assert!(import("1", &format!("{component}\n"), 64).contains("--components"));
    assert!(import("4", "", 64).contains("--components"));
    assert!(import("2", &format!("{component}\n"), 64).contains("ended"));
    assert!(import("2", &format!("{component}\nnot-hex\n"), 64).contains("component 2"));
    assert!(
        import("2", &format!("{component}\n{}\n", "22".repeat(32)), 64).contains("same length")
    );
    assert!(import("2", &format!("{component}\n{component}00\n"), 64).contains("component 2"));
    assert!(import("2", &format!("{component}\n{}\n", "00".repeat(16)), 64).contains("cancel"));
    assert!(import("2", &format!("{}\n", "1".repeat(300)), 64).contains("too long"));
    let wrong_algorithm = ceremony.fails(
        &[
            "bdk",
            "import",
            "--bdk-id",
            "0C0C0C0C",
            "--components",
            "2",
            "--algorithm",
            "aes256",
        ],
        &format!("{component}\n{component}\n"),
        64,
    );
    assert!(wrong_algorithm.contains("aes256"), "{wrong_algorithm}");

    let unknown = ceremony.fails(
        &["dukpt", "kcv", "--ksn", "0D0D0D0D0000000100000001"],
        "",
        1,
    );
    assert!(unknown.contains("0D0D0D0D"), "{unknown}");

    assert_eq!(ceremony.ok(&["bdk", "list"], ""), before, "state changed");
    assert!(!ceremony.list_objects().contains("0C0C0C0C"));
}

#[test]
fn configuration_errors_exit_with_usage() {
    let ceremony = Ceremony::new("admin-config");
    let missing = Command::new(env!("CARGO_BIN_EXE_nfcpay-admin"))
        .args(["--config", "/nonexistent/nfcpay.toml", "bdk", "list"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(64));
    let bad = ceremony.dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[keystore]\nbackend = \"pkcs11\"\nuri = \"pkcs11:token=x?pin-value=1234\"\n",
    )
    .unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_nfcpay-admin"))
        .arg("--config")
        .arg(&bad)
        .args(["bdk", "list"])
        .env("SOFTHSM2_CONF", ceremony.softhsm_conf())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    let error = String::from_utf8_lossy(&output.stderr);
    assert!(
        error.contains("pin-value") && !error.contains("1234"),
        "{error}"
    );
}
