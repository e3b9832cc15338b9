//! `cargo xtask demo`: the whole system on one machine, from a fresh SoftHSM2 token to a
//! settled payment between two terminals over emulated NFC.
//!
//! Makes a demo directory with its own token (random PINs in files, never printed), a
//! `nfcpay.toml` pointing the keystore at it, then runs the operator's CLI,
//! `nfcpay-admin`, to generate one BDK in the token and import another from two
//! components, list them, and derive DUKPT keys for a few KSNs (only check values are
//! shown); finally `pkcs11-tool` lists the token's objects to show that the BDKs are
//! sensitive and not extractable and that no derived key was left on the token.
//!
//! Then the platform: `nfcpay-admin init` (terminal CA, server certificate, receipt key, all
//! keys in the token), `nfcpayd` on SQLite on free loopback ports, two accounts (the payer
//! funded), two terminals enrolled by `nfcpay-agent enroll` with one-time codes (passed in
//! 0600 files, never printed), the PN532 emulator; the payee requests 12.50 EUR, the payer
//! consents, both print verified receipts and the balances move. Last, the captured half A
//! is re-sent: byte-identical (the same answer, nothing booked twice), tampered (refused), and
//! from the other terminal (refused). The payment part is in [`crate::payment`].

use std::fs::OpenOptions;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::payment::{
    self, AMOUNT, Addresses, Binaries, CURRENCY, PAYEE_ACCOUNT, PAYEE_TERMINAL, PAYER_ACCOUNT,
    PAYER_FUNDS, PAYER_TERMINAL,
};
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

/// Runs the demo in `dir` (default `target/demo/<UTC timestamp>`); with `serve`, keeps the
/// daemon and the emulator running until SIGINT or SIGTERM.
pub fn run(root: &Path, dir: Option<PathBuf>, serve: bool) -> Result<()> {
    // Caught before anything starts: a Ctrl-C then stops the children cleanly.
    let mut signals = Signals::new([SIGINT, SIGTERM]).context("cannot catch SIGINT/SIGTERM")?;
    let dir = dir.unwrap_or_else(|| root.join("target/demo").join(clock::utc_timestamp_now()));
    let binaries = Binaries::new(root);
    let mut steps = Steps::new("demo");
    steps.run("system packages", || packages::ensure(packages::FOR_DEMO))?;
    steps.run(
        "build the binaries (cargo build --workspace --bins)",
        || {
            command::run(command::cargo().current_dir(root).args([
                "build",
                "--quiet",
                "--workspace",
                "--bins",
            ]))
        },
    )?;
    let demo = steps.run("demo directory and random PINs", || prepare(root, &dir))?;
    steps.run("SoftHSM2 token 'nfcpay-demo'", || init_token(&demo))?;
    let addresses = Addresses::free(root)?;
    steps.run("nfcpay.toml", || write_config(&demo, &addresses))?;
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
    steps.run(
        "platform CA, server certificate, receipt key (nfcpay-admin init)",
        || command::run(&mut admin(&demo, &["init"])),
    )?;
    let daemon = steps.run("start nfcpayd on SQLite", || {
        payment::start_daemon(
            &binaries,
            &demo.config_file(),
            &demo.softhsm_config(),
            &demo.dir.join("nfcpayd.log"),
            &addresses.ops,
        )
    })?;
    steps.run("accounts: shop, and alice funded with 100.00 EUR", || {
        command::run(&mut admin(
            &demo,
            &[
                "accounts",
                "create",
                "--id",
                PAYEE_ACCOUNT,
                "--currency",
                CURRENCY,
            ],
        ))?;
        command::run(&mut admin(
            &demo,
            &[
                "accounts",
                "create",
                "--id",
                PAYER_ACCOUNT,
                "--currency",
                CURRENCY,
            ],
        ))?;
        command::run(&mut admin(
            &demo,
            &[
                "accounts",
                "fund",
                "--id",
                PAYER_ACCOUNT,
                "--amount",
                PAYER_FUNDS,
            ],
        ))
    })?;
    let payee = demo.dir.join("terminal-shop-1");
    let payer = demo.dir.join("terminal-alice-phone");
    for (terminal, account, terminal_dir) in [
        (PAYEE_TERMINAL, PAYEE_ACCOUNT, &payee),
        (PAYER_TERMINAL, PAYER_ACCOUNT, &payer),
    ] {
        steps.run(
            &format!("enroll terminal {terminal} with a one-time code (nfcpay-agent enroll)"),
            || {
                enroll(
                    &demo,
                    &binaries,
                    &addresses,
                    terminal,
                    account,
                    terminal_dir,
                )
            },
        )?;
    }
    let mut emulator = steps.run("PN532 emulator with two readers", || {
        payment::start_emulator(&binaries, &demo.dir.join("pn532-sim.log"))
    })?;
    let readers = Readers {
        payee: emulator.connstrings[0].clone(),
        payer: emulator.connstrings[1].clone(),
    };
    println!("payee {PAYEE_TERMINAL}: {} (NFC initiator)", readers.payee);
    println!("payer {PAYER_TERMINAL}: {} (NFC target)", readers.payer);
    let before = steps.run("balances before", || balances(&demo))?;
    let settled = steps.run(
        &format!("the payee requests {AMOUNT} {CURRENCY}, the payer consents (--yes)"),
        || pay(&demo, &binaries, &readers, &payee, &payer),
    )?;
    let after = steps.run("balances after", || balances(&demo))?;
    if after.payer != "87.50 EUR" || after.payee != "12.50 EUR" {
        bail!("unexpected balances after the payment: {after:?}");
    }
    let replays = steps.run("re-send the captured half A", || {
        replay(&demo, &binaries, &payee, &payer, &settled)
    })?;
    steps.run("audit log verifies", || {
        command::run(&mut admin(&demo, &["audit", "verify"]))
    })?;
    steps.finish();
    println!("\nSummary");
    println!("  demo directory: {}", demo.dir.display());
    println!(
        "  NFC readers:    payee {PAYEE_TERMINAL} {} (initiator), payer {PAYER_TERMINAL} {} (target)",
        readers.payee, readers.payer
    );
    println!(
        "  payment:        {AMOUNT} {CURRENCY} settled, settlement id {}, both receipts verified",
        settled.settlement_id
    );
    println!(
        "  balances:       before {PAYER_ACCOUNT} {}, {PAYEE_ACCOUNT} {}; after {PAYER_ACCOUNT} {}, {PAYEE_ACCOUNT} {}",
        before.payer, before.payee, after.payer, after.payee
    );
    for line in &replays {
        println!("  replay:         {line}");
    }
    let mut daemon = daemon;
    if serve {
        println!("\nServing. Pay by hand with nfcpay-agent, for example:");
        println!(
            "  {} --dir {} request --amount 1.00 --currency EUR --device {}",
            binaries.path("nfcpay-agent").display(),
            payee.display(),
            readers.payee
        );
        println!(
            "  {} --dir {} pay --device {}",
            binaries.path("nfcpay-agent").display(),
            payer.display(),
            readers.payer
        );
        println!(
            "  (admin: SOFTHSM2_CONF={} {} --config {} accounts show --id alice)",
            demo.softhsm_config().display(),
            binaries.path("nfcpay-admin").display(),
            demo.config_file().display()
        );
        println!("NFCPAY_DEMO_DIR={}", demo.dir.display());
        println!("NFCPAY_DAEMON_ADDR={}", addresses.terminal);
        println!("Press Ctrl-C to stop.");
        std::io::stdout().flush()?;
        if let Some(signal) = signals.forever().next() {
            println!("\nsignal {signal}: stopping nfcpayd and the emulator");
        }
    }
    println!("nfcpayd: {}", daemon.stop()?);
    println!("nfcpay-pn532-sim: {}", emulator.service.stop()?);
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

fn write_config(demo: &Demo, addresses: &Addresses) -> Result<()> {
    let root_user = rustix::process::geteuid().is_root();
    if root_user {
        println!(
            "Running as root: nfcpayd refuses root unless `[platform] allow_root = true`, which \
             this demo's configuration (only) sets. Run the real daemon as its own user."
        );
    }
    let config = keystore_config(&demo.module, &demo.pin_file())?
        + &payment::platform_config(&demo.dir, addresses, GENERATED_BDK_ID, root_user);
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

/// `nfcpay-admin --config DIR/nfcpay.toml ARGS` (the built binary), with the demo's SoftHSM2.
fn admin(demo: &Demo, arguments: &[&str]) -> Command {
    let mut admin = Command::new(Binaries::new(&demo.root).path("nfcpay-admin"));
    admin
        .env("SOFTHSM2_CONF", demo.softhsm_config())
        .arg("--config")
        .arg(demo.config_file())
        .args(arguments);
    admin
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

/// The two terminals' readers.
struct Readers {
    payee: String,
    payer: String,
}

/// The two accounts' balances.
#[derive(Debug)]
struct Balances {
    payer: String,
    payee: String,
}

fn balances(demo: &Demo) -> Result<Balances> {
    let show = |account: &str| {
        let output = command::stdout_of(&mut admin(demo, &["accounts", "show", "--id", account]))?;
        payment::balance(&output)
    };
    let balances = Balances {
        payer: show(PAYER_ACCOUNT)?,
        payee: show(PAYEE_ACCOUNT)?,
    };
    println!("{PAYER_ACCOUNT}: {}", balances.payer);
    println!("{PAYEE_ACCOUNT}: {}", balances.payee);
    Ok(balances)
}

/// Registers `terminal` (the operator) and enrolls it (the installer) with the one-time code,
/// handed over in a 0600 file that is removed afterwards; the code is never printed.
fn enroll(
    demo: &Demo,
    binaries: &Binaries,
    addresses: &payment::Addresses,
    terminal: &str,
    account: &str,
    terminal_dir: &Path,
) -> Result<()> {
    let mut add = admin(
        demo,
        &["terminals", "add", "--id", terminal, "--account", account],
    );
    println!("$ {}", command::describe(&add));
    let output = command::capture(&mut add)?;
    if !output.status.success() {
        bail!(
            "terminals add failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let shown = String::from_utf8_lossy(&output.stdout);
    for line in shown.lines() {
        if line.starts_with("enrollment code:") {
            println!("enrollment code: (handed to the installer in a 0600 file; not shown)");
        } else {
            println!("{line}");
        }
    }
    let code_file = demo.dir.join(format!("{terminal}.code"));
    write_secret_file(&code_file, &payment::enrollment_code(&shown)?)?;
    let ca = demo.dir.join("pki/ca.pem");
    let mut arguments = vec![
        "enroll".to_owned(),
        "--platform".to_owned(),
        addresses.terminal.clone(),
        "--server-name".to_owned(),
        "localhost".to_owned(),
        "--ca".to_owned(),
        path_text(&ca)?.to_owned(),
        "--terminal-id".to_owned(),
        terminal.to_owned(),
        "--account".to_owned(),
        account.to_owned(),
        "--code-file".to_owned(),
        path_text(&code_file)?.to_owned(),
    ];
    if let Some(enroll_address) = &addresses.enroll {
        arguments.extend(["--enroll-address".to_owned(), enroll_address.clone()]);
    }
    let arguments: Vec<&str> = arguments.iter().map(String::as_str).collect();
    let result = payment::run_agent(
        terminal,
        &mut payment::agent(binaries, terminal_dir, &arguments),
    );
    std::fs::remove_file(&code_file)
        .with_context(|| format!("could not remove {}", code_file.display()))?;
    let output = result?;
    if !output.status.success() {
        bail!("nfcpay-agent enroll {terminal} failed");
    }
    Ok(())
}

/// What the settled payment left behind.
struct Settled {
    settlement_id: String,
    half_a: PathBuf,
    payee_receipt: String,
}

/// The payment: payer and payee agents at once, each on its emulated reader.
fn pay(
    demo: &Demo,
    binaries: &Binaries,
    readers: &Readers,
    payee: &Path,
    payer: &Path,
) -> Result<Settled> {
    let half_a = demo.dir.join("captured-half-a.bin");
    let half_b = demo.dir.join("captured-half-b.bin");
    let mut pay = payment::agent(
        binaries,
        payer,
        &[
            "pay",
            "--yes",
            "--device",
            &readers.payer,
            "--save-half",
            path_text(&half_b)?,
        ],
    );
    let mut request = payment::agent(
        binaries,
        payee,
        &[
            "request",
            "--amount",
            AMOUNT,
            "--currency",
            CURRENCY,
            "--description",
            "coffee and cake",
            "--device",
            &readers.payee,
            "--save-half",
            path_text(&half_a)?,
        ],
    );
    println!("$ {}", command::describe(&pay));
    println!("$ {}", command::describe(&request));
    let payer_child = pay.spawn().context("could not start the payer agent")?;
    let payee_child = request.spawn().context("could not start the payee agent")?;
    let payee_output = payee_child.wait_with_output()?;
    let payer_output = payer_child.wait_with_output()?;
    payment::show(PAYEE_TERMINAL, &payee_output);
    payment::show(PAYER_TERMINAL, &payer_output);
    let payee_text = String::from_utf8_lossy(&payee_output.stdout).into_owned();
    let payer_text = String::from_utf8_lossy(&payer_output.stdout).into_owned();
    for (name, output, text) in [
        (PAYEE_TERMINAL, &payee_output, &payee_text),
        (PAYER_TERMINAL, &payer_output, &payer_text),
    ] {
        if !output.status.success() || payment::field(text, "status:") != Some("settled") {
            bail!("{name} did not print a settled receipt");
        }
    }
    let settlement_id = payment::field(&payee_text, "settlement id:")
        .context("no settlement id in the payee's receipt")?
        .to_owned();
    if payment::field(&payer_text, "settlement id:") != Some(settlement_id.as_str()) {
        bail!("the two receipts name different settlements");
    }
    Ok(Settled {
        settlement_id,
        half_a,
        payee_receipt: payee_text,
    })
}

/// Re-sends the captured half A three ways; returns one summary line each.
fn replay(
    demo: &Demo,
    binaries: &Binaries,
    payee: &Path,
    payer: &Path,
    settled: &Settled,
) -> Result<Vec<String>> {
    let half = path_text(&settled.half_a)?;
    let before = balances_text(demo)?;
    let mut lines = Vec::new();

    println!(
        "1. Byte-identical: a terminal that lost the answer may send its half again; the \
         platform answers as before and books nothing twice."
    );
    let output = payment::run_agent(
        PAYEE_TERMINAL,
        &mut payment::agent(binaries, payee, &["resend", half]),
    )?;
    let text = String::from_utf8_lossy(&output.stdout);
    let same = output.status.success()
        && payment::field(&text, "status:") == Some("settled")
        && payment::field(&text, "settlement id:") == Some(settled.settlement_id.as_str())
        && payment::field(&text, "transaction:")
            == payment::field(&settled.payee_receipt, "transaction:");
    if !same || balances_text(demo)? != before {
        bail!("a byte-identical re-send must get the same receipt and move no money");
    }
    println!(
        "=> the same settled receipt (settlement id {}), balances unchanged",
        settled.settlement_id
    );
    lines.push(format!(
        "byte-identical re-send: the same receipt (settlement id {}), balances unchanged",
        settled.settlement_id
    ));

    println!(
        "2. The same KSN with other bytes (one bit of the GCM tag flipped): a replay cannot be \
         re-sealed without the terminal's key, so the platform refuses it."
    );
    let output = payment::run_agent(
        PAYEE_TERMINAL,
        &mut payment::agent(binaries, payee, &["resend", "--tamper", half]),
    )?;
    lines.push(expect_refusal(
        &output,
        "authentication-failed",
        "tampered re-send",
    )?);

    println!("3. The captured half sent by the other terminal (its own TLS identity).");
    let output = payment::run_agent(
        PAYER_TERMINAL,
        &mut payment::agent(binaries, payer, &["resend", half]),
    )?;
    lines.push(expect_refusal(
        &output,
        "terminal-mismatch",
        "re-send by another terminal",
    )?);
    if balances_text(demo)? != before {
        bail!("a refused re-send moved money");
    }
    println!("=> balances unchanged");
    Ok(lines)
}

fn expect_refusal(output: &std::process::Output, code: &str, what: &str) -> Result<String> {
    let stderr = String::from_utf8_lossy(&output.stderr);
    if output.status.code() != Some(1) || !stderr.contains(&format!("problem code: {code}")) {
        bail!("{what}: expected the platform to refuse it with {code}");
    }
    println!("=> refused: {code}");
    Ok(format!("{what}: refused ({code})"))
}

fn balances_text(demo: &Demo) -> Result<String> {
    let balances = balances(demo)?;
    Ok(format!("{} {}", balances.payer, balances.payee))
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
