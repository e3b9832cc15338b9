//! `cargo xtask demo`: the key ceremony on a fresh SoftHSM2 token.
//!
//! Makes a demo directory with its own token (random PINs in files, never printed), a
//! `nfcpay.toml` pointing the keystore at it, then runs the operator's CLI,
//! `nfcpay-admin`, to generate one BDK in the token and import another from two
//! components, list them, and derive DUKPT keys for a few KSNs (only check values are
//! shown); finally `pkcs11-tool` lists the token's objects to show that the BDKs are
//! sensitive and not extractable and that no derived key was left on the token.

use std::fs::OpenOptions;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::steps::Steps;
use crate::{clock, command, packages, random};

const TOKEN_LABEL: &str = "nfcpay-demo";
const PIN_BYTES: usize = 16;
const PIN_ENV_VARIABLE: &str = "NFCPAY_DEMO_PIN";
const GENERATED_BDK_ID: &str = "0123ABCD";
const IMPORTED_BDK_ID: &str = "0BDC0002";
/// Public demo values: anyone can rebuild this BDK, so it protects nothing real.
const DEMO_COMPONENTS: [&str; 2] = [
    "0123456789ABCDEFFEDCBA98765432100123456789ABCDEFFEDCBA9876543210",
    "00112233445566778899AABBCCDDEEFF0F1E2D3C4B5A69788796A5B4C3D2E1F0",
];
/// KSN = BDK ID (8 hex) | derivation ID (8 hex) | transaction counter (8 hex).
const KCV_REQUESTS: [(&str, Option<&str>); 5] = [
    ("0123ABCD1122334400000001", None),
    ("0123ABCD1122334400000002", None),
    ("0123ABCD1122334400020000", None),
    ("0123ABCD1122334400000001", Some("data-both")),
    ("0BDC00025566778800000001", None),
];
/// The number of BDKs the ceremony makes: the only secret keys the token may hold.
const BDK_COUNT: usize = 2;

/// Files and settings of one demo run.
struct Demo {
    root: PathBuf,
    dir: PathBuf,
    module: PathBuf,
}

impl Demo {
    fn pin_file(&self) -> PathBuf {
        self.dir.join("pin")
    }

    fn so_pin_file(&self) -> PathBuf {
        self.dir.join("so-pin")
    }

    fn config_file(&self) -> PathBuf {
        self.dir.join("nfcpay.toml")
    }

    fn softhsm_config(&self) -> PathBuf {
        self.dir.join("softhsm2.conf")
    }
}

/// Runs the demo in `dir` (default `target/demo/<UTC timestamp>`).
pub fn run(root: &Path, dir: Option<PathBuf>, serve: bool) -> Result<()> {
    if serve {
        bail!("--serve needs the platform daemon, which is not built yet; run without it");
    }
    let dir = dir.unwrap_or_else(|| root.join("target/demo").join(clock::utc_timestamp_now()));
    let mut steps = Steps::new("demo");
    steps.run("system packages", || packages::ensure(packages::FOR_DEMO))?;
    let demo = steps.run("demo directory and random PINs", || prepare(root, &dir))?;
    steps.run("SoftHSM2 token 'nfcpay-demo'", || init_token(&demo))?;
    steps.run("nfcpay.toml", || write_config(&demo))?;
    steps.run("build nfcpay-admin", || {
        command::run(command::cargo().current_dir(&demo.root).args([
            "build",
            "--quiet",
            "-p",
            "nfcpay-daemon",
            "--bin",
            "nfcpay-admin",
        ]))
    })?;
    steps.run("generate BDK 0123ABCD in the HSM", || {
        println!("The HSM generates an AES-256 BDK; only its check value (KCV) is shown.");
        command::run(&mut admin(
            &demo,
            &[
                "bdk",
                "generate",
                "--bdk-id",
                GENERATED_BDK_ID,
                "--algorithm",
                "aes256",
            ],
        ))
    })?;
    steps.run("import BDK 0BDC0002 from two components", || {
        import_bdk(&demo)
    })?;
    steps.run("list the BDKs", || {
        command::run(&mut admin(&demo, &["bdk", "list"]))
    })?;
    steps.run("derive DUKPT keys inside the HSM", || derive_keys(&demo))?;
    steps.run("inspect the token with pkcs11-tool", || {
        inspect_token(&demo)
    })?;
    steps.finish();
    println!(
        "\nThe demo lives in {}; its token PIN is in {}.",
        demo.dir.display(),
        demo.pin_file().display()
    );
    Ok(())
}

/// Makes the (new or empty) demo directory and writes random PINs into it.
fn prepare(root: &Path, dir: &Path) -> Result<Demo> {
    std::fs::create_dir_all(dir).with_context(|| format!("could not make {}", dir.display()))?;
    let dir = dir
        .canonicalize()
        .with_context(|| format!("could not resolve {}", dir.display()))?;
    if std::fs::read_dir(&dir)?.next().is_some() {
        bail!("{} is not empty; give a new --dir", dir.display());
    }
    let module = command::stdout_of(&mut Command::new(root.join("softhsm-setup/find-module")))?;
    let demo = Demo {
        root: root.to_path_buf(),
        dir,
        module: PathBuf::from(module.trim_end()),
    };
    write_secret_file(&demo.pin_file(), &random::hex(PIN_BYTES)?)?;
    write_secret_file(&demo.so_pin_file(), &random::hex(PIN_BYTES)?)?;
    println!("demo directory: {}", demo.dir.display());
    println!("user and SO PINs: random, in pin and so-pin there (mode 0600), not shown");
    println!("PKCS#11 module: {}", demo.module.display());
    Ok(demo)
}

/// Writes `secret` and a newline to a new file that only its owner can read.
fn write_secret_file(path: &Path, secret: &str) -> Result<()> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut file| file.write_all(format!("{secret}\n").as_bytes()))
        .with_context(|| format!("could not write {}", path.display()))
}

fn init_token(demo: &Demo) -> Result<()> {
    let export = command::stdout_of(
        Command::new(demo.root.join("softhsm-setup/init-token"))
            .arg("--dir")
            .arg(&demo.dir)
            .args(["--label", TOKEN_LABEL, "--pin-file"])
            .arg(demo.pin_file())
            .arg("--so-pin-file")
            .arg(demo.so_pin_file()),
    )?;
    let expected = format!("export SOFTHSM2_CONF={}", demo.softhsm_config().display());
    if export.trim_end() != expected {
        bail!("init-token printed {export:?}, expected {expected:?}");
    }
    println!("{expected}");
    Ok(())
}

fn write_config(demo: &Demo) -> Result<()> {
    let config = keystore_config(&demo.module, &demo.pin_file())?;
    std::fs::write(demo.config_file(), &config)
        .with_context(|| format!("could not write {}", demo.config_file().display()))?;
    println!("{}:\n{config}", demo.config_file().display());
    Ok(())
}

/// The `[keystore]` section addressing the demo token by an RFC 7512 URI.
fn keystore_config(module: &Path, pin_file: &Path) -> Result<String> {
    let module = path_text(module)?;
    let pin_file = path_text(pin_file)?;
    Ok(format!(
        "[keystore]\nbackend = \"pkcs11\"\nuri = \"pkcs11:token={}?module-path={}&pin-source={}\"\n",
        percent_encode(TOKEN_LABEL),
        percent_encode(module),
        percent_encode(&format!("file:{pin_file}"))
    ))
}

fn path_text(path: &Path) -> Result<&str> {
    path.to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))
}

/// Percent-encodes everything but RFC 3986 unreserved characters and `/ : @`, which is
/// safe in both the path and the query of a `pkcs11:` URI (RFC 7512) and in a TOML string.
fn percent_encode(value: &str) -> String {
    value
        .bytes()
        .map(|byte| {
            if byte.is_ascii_alphanumeric() || b"-._~/:@".contains(&byte) {
                char::from(byte).to_string()
            } else {
                format!("%{byte:02X}")
            }
        })
        .collect()
}

/// `cargo run … nfcpay-admin -- --config DIR/nfcpay.toml ARGS`, with the demo's SoftHSM2.
fn admin(demo: &Demo, arguments: &[&str]) -> Command {
    let mut cargo = command::cargo();
    cargo
        .current_dir(&demo.root)
        .env("SOFTHSM2_CONF", demo.softhsm_config())
        .args([
            "run",
            "--quiet",
            "-p",
            "nfcpay-daemon",
            "--bin",
            "nfcpay-admin",
            "--",
            "--config",
        ])
        .arg(demo.config_file())
        .args(arguments);
    cargo
}

fn import_bdk(demo: &Demo) -> Result<()> {
    println!(
        "Two key custodians each enter one 32-byte component; the HSM combines them.\n\
         These demo components are public: never use them for real money."
    );
    let input: String = DEMO_COMPONENTS
        .iter()
        .map(|component| format!("{component}\n"))
        .collect();
    let mut import = admin(
        demo,
        &[
            "bdk",
            "import",
            "--bdk-id",
            IMPORTED_BDK_ID,
            "--components",
            "2",
            "--algorithm",
            "aes256",
        ],
    );
    command::run_with_input(&mut import, input.as_bytes())
}

fn derive_keys(demo: &Demo) -> Result<()> {
    println!(
        "Each KSN is BDK ID | derivation ID | counter. The HSM derives the terminal's initial \
         key, the transaction key and the working key from the BDK named in the KSN; only \
         check values leave it."
    );
    for (ksn, usage) in KCV_REQUESTS {
        let mut arguments = vec!["dukpt", "kcv", "--ksn", ksn];
        if let Some(usage) = usage {
            arguments.extend(["--usage", usage]);
        }
        command::run(&mut admin(demo, &arguments))?;
    }
    Ok(())
}

fn inspect_token(demo: &Demo) -> Result<()> {
    let pin = std::fs::read_to_string(demo.pin_file()).context("could not read the PIN file")?;
    let mut list = Command::new("pkcs11-tool");
    list.env("SOFTHSM2_CONF", demo.softhsm_config())
        .env(PIN_ENV_VARIABLE, pin.trim_end())
        .arg("--module")
        .arg(&demo.module)
        .args(["--token-label", TOKEN_LABEL, "--login", "--pin"])
        .arg(format!("env:{PIN_ENV_VARIABLE}"))
        .arg("--list-objects");
    println!("$ {}", command::describe(&list));
    let output = command::capture(&mut list)?;
    print!("{}", String::from_utf8_lossy(&output.stdout));
    print!("{}", String::from_utf8_lossy(&output.stderr));
    if !output.status.success() {
        bail!("pkcs11-tool failed ({})", output.status);
    }
    println!(
        "(pkcs11-tool's CKR_ATTRIBUTE_SENSITIVE warnings are the token refusing to reveal key values.)"
    );
    check_secret_keys(&secret_keys(&String::from_utf8_lossy(&output.stdout)))
}

/// A secret key as `pkcs11-tool --list-objects` shows it.
#[derive(Debug, PartialEq)]
struct SecretKey {
    label: String,
    access: Vec<String>,
}

impl SecretKey {
    fn has(&self, flag: &str) -> bool {
        self.access.iter().any(|access| access == flag)
    }
}

/// The secret key objects in a `pkcs11-tool --list-objects` listing: each starts with a
/// `Secret Key Object;` line, followed by indented `label:` and `Access:` lines.
fn secret_keys(listing: &str) -> Vec<SecretKey> {
    let mut keys = Vec::new();
    let mut current: Option<SecretKey> = None;
    for line in listing.lines() {
        if !line.starts_with(char::is_whitespace) {
            keys.extend(current.take());
            if line.starts_with("Secret Key Object") {
                current = Some(SecretKey {
                    label: String::new(),
                    access: Vec::new(),
                });
            }
            continue;
        }
        let Some(key) = current.as_mut() else {
            continue;
        };
        let line = line.trim();
        if let Some(label) = line.strip_prefix("label:") {
            key.label = label.trim().to_owned();
        } else if let Some(access) = line.strip_prefix("Access:") {
            key.access = access
                .split(',')
                .map(|flag| flag.trim().to_owned())
                .collect();
        }
    }
    keys.extend(current);
    keys
}

/// The token must hold exactly the BDKs, all sensitive and not extractable.
fn check_secret_keys(keys: &[SecretKey]) -> Result<()> {
    for key in keys {
        let sensitive = key.has("sensitive");
        let extractable = key.has("extractable");
        println!(
            "secret key '{}': sensitive: {}, extractable: {}, never extractable: {}",
            key.label,
            yes_no(sensitive),
            yes_no(extractable),
            yes_no(key.has("never extractable")),
        );
        if !sensitive || extractable {
            bail!(
                "secret key '{}' could leave the HSM (access: {:?})",
                key.label,
                key.access
            );
        }
    }
    if keys.len() != BDK_COUNT {
        bail!(
            "the token holds {} secret keys, expected exactly the {BDK_COUNT} BDKs \
             (a derived key left on the token?)",
            keys.len()
        );
    }
    println!(
        "The token holds only the {BDK_COUNT} BDKs, sensitive and not extractable; no derived \
         key was left on it. (An imported BDK is never 'never extractable': its components \
         existed outside the HSM.)"
    );
    Ok(())
}

fn yes_no(value: bool) -> &'static str {
    if value { "yes" } else { "no" }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LISTING: &str = "\
Secret Key Object; AES length 32
  label:      bdk-0123ABCD
  ID:         0123abcd
  Usage:      derive
  Access:     sensitive, always sensitive, never extractable, local
Public Key Object; EC  EC_POINT 256 bits
  label:      ca
  Access:     local
Secret Key Object; AES length 32
  label:      bdk-0BDC0002
  Usage:      derive
  Access:     sensitive
";

    #[test]
    fn secret_keys_are_read_from_the_listing() {
        let keys = secret_keys(LISTING);
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0].label, "bdk-0123ABCD");
        assert!(keys[0].has("never extractable") && keys[0].has("sensitive"));
        assert!(!keys[0].has("extractable"));
        assert_eq!(
            keys[1],
            SecretKey {
                label: "bdk-0BDC0002".into(),
                access: vec!["sensitive".into()]
            }
        );
    }

    #[test]
    fn the_bdks_pass_the_check() {
        check_secret_keys(&secret_keys(LISTING)).expect("two sensitive, non-extractable keys");
    }

    #[test]
    fn an_extractable_or_extra_key_fails_the_check() {
        let extractable = LISTING.replace(
            "Access:     sensitive\n",
            "Access:     sensitive, extractable\n",
        );
        assert!(check_secret_keys(&secret_keys(&extractable)).is_err());
        let not_sensitive = LISTING.replace("Access:     sensitive\n", "Access:     local\n");
        assert!(check_secret_keys(&secret_keys(&not_sensitive)).is_err());
        let extra = format!("{LISTING}Secret Key Object; AES length 32\n  Access:     sensitive\n");
        assert!(check_secret_keys(&secret_keys(&extra)).is_err());
        assert!(check_secret_keys(&[]).is_err());
    }

    #[test]
    fn the_keystore_uri_is_percent_encoded() {
        let config = keystore_config(
            Path::new("/usr/lib/softhsm/libsofthsm2.so"),
            Path::new("/tmp/demo dir/pin"),
        )
        .expect("UTF-8 paths");
        assert_eq!(
            config,
            "[keystore]\nbackend = \"pkcs11\"\nuri = \"pkcs11:token=nfcpay-demo?module-path=\
             /usr/lib/softhsm/libsofthsm2.so&pin-source=file:/tmp/demo%20dir/pin\"\n"
        );
        assert_eq!(percent_encode("a&b=c;d%\"\\"), "a%26b%3Dc%3Bd%25%22%5C");
    }

    #[test]
    fn demo_constants_are_well_formed() {
        for component in DEMO_COMPONENTS {
            assert_eq!(component.len(), 64);
            assert!(component.chars().all(|c| c.is_ascii_hexdigit()));
        }
        for (ksn, _) in KCV_REQUESTS {
            assert_eq!(ksn.len(), 24);
            assert!(ksn.starts_with(GENERATED_BDK_ID) || ksn.starts_with(IMPORTED_BDK_ID));
        }
    }
}
