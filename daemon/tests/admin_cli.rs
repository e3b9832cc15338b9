//! `nfcpay-admin` key ceremony, end to end: the real binary against a fresh SoftHSM2 token,
//! checked with the published X9.24-3-2017 vectors and with OpenSC's `pkcs11-tool`.

// A panic is how a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use nfcpay_keystore::components::clear_key_kcv;
use nfcpay_keystore::testing::{SOFTHSM2_MODULE, SoftHsmDir};

const PIN: &str = "admin-cli-pin";

/// A fresh token and a configuration naming it; removed on drop.
struct Ceremony {
    hsm: SoftHsmDir,
    label: String,
}

impl Ceremony {
    fn new(label: &str) -> Self {
        let hsm = SoftHsmDir::new(PIN);
        hsm.make_token(label);
        let config = format!(
            "[keystore]\nbackend = \"pkcs11\"\nuri = \"pkcs11:token={label}?module-path={SOFTHSM2_MODULE}&pin-source=file:{}\"\n",
            hsm.pin_file().display()
        );
        std::fs::write(hsm.path().join("nfcpay.toml"), config).unwrap();
        Self {
            hsm,
            label: label.to_owned(),
        }
    }

    fn softhsm_conf(&self) -> PathBuf {
        self.hsm.conf()
    }

    fn admin(&self, args: &[&str], stdin: &str) -> Output {
        let mut child = Command::new(env!("CARGO_BIN_EXE_nfcpay-admin"))
            .arg("--config")
            .arg(self.hsm.path().join("nfcpay.toml"))
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
        self.hsm.list_objects(&self.label)
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
    for (usage, published_key) in [
        (None, "4F21B565BAD9835E112B6465635EAE44"),
        (Some("pin"), "AF8CB133A78F8DC2D1359F18527593FB"),
        (Some("mac-gen"), "A2DC23DE6FDE0824A2BC321E08E4B8B7"),
    ] {
        let mut args = vec!["dukpt", "kcv", "--ksn", "123456789012345600000001"];
        args.extend(usage.iter().flat_map(|usage| ["--usage", usage]));
        let out = ceremony.ok(&args, "");
        assert!(
            out.contains(&format!("KCV {}", kcv_of(published_key))),
            "{usage:?}: {out}"
        );
    }

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
    let bad = ceremony.hsm.path().join("bad.toml");
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

/// Log lines into a pipe or a file (journald, `2>log`) carry no terminal colour codes.
#[test]
fn log_lines_into_a_pipe_are_plain_text() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("nfcpay.toml");
    std::fs::write(
        &config,
        format!(
            "[keystore]\nbackend = \"software\"\npath = \"{}\"\n\n[database]\nurl = \"sqlite://{}\"\n",
            dir.path().join("keystore.json").display(),
            dir.path().join("ledger.db").display()
        ),
    )
    .unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_nfcpay-admin"))
        .arg("--config")
        .arg(&config)
        .args(["bdk", "list"])
        .env("NFCPAY_LOG", "debug")
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(log.contains("opened the software keystore"), "{log}");
    assert!(!log.contains('\x1b'), "{log:?}");
}

// ---------------------------------------------------------------------------------------
// `--format json`: a script's view of the ledger commands, on SQLite and PostgreSQL.

mod scripted {
    use std::os::unix::fs::PermissionsExt as _;
    use std::path::Path;
    use std::process::{Command, Output, Stdio};

    use diesel::Connection as _;
    use diesel::connection::SimpleConnection as _;
    use nfcpay_daemon::storage::{AcceptedHalf, HalfContent, Storage};
    use nfcpay_protocol::{Amount, InitialKeyId, Ksn, TxnId};
    use serde_json::Value;
    use sha2::{Digest as _, Sha256};

    /// A software keystore and a ledger (SQLite, or a fresh PostgreSQL schema), removed on
    /// drop.
    struct Platform {
        dir: tempfile::TempDir,
        url: String,
        postgres: Option<(String, String)>,
    }

    impl Platform {
        fn new(postgres: bool) -> Option<Self> {
            let dir = tempfile::tempdir().unwrap();
            let (url, postgres) = if postgres {
                let base = nfcpay_daemon::testing::postgres_url("PostgreSQL case")?;
                let schema = format!(
                    "admin_{}_{}",
                    std::process::id(),
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap()
                        .subsec_nanos()
                );
                diesel::PgConnection::establish(&base)
                    .unwrap()
                    .batch_execute(&format!("CREATE SCHEMA {schema}"))
                    .unwrap();
                let separator = if base.contains('?') { '&' } else { '?' };
                (
                    format!("{base}{separator}options=-csearch_path%3D{schema}"),
                    Some((base, schema)),
                )
            } else {
                (
                    format!("sqlite://{}", dir.path().join("ledger.db").display()),
                    None,
                )
            };
            std::fs::write(
                dir.path().join("nfcpay.toml"),
                format!(
                    "[keystore]\nbackend = \"software\"\npath = \"{}\"\n\n[database]\nurl = \"{url}\"\n",
                    dir.path().join("keystore.json").display()
                ),
            )
            .unwrap();
            Some(Self { dir, url, postgres })
        }

        fn command(&self, args: &[&str]) -> Command {
            let mut command = Command::new(env!("CARGO_BIN_EXE_nfcpay-admin"));
            command
                .arg("--config")
                .arg(self.dir.path().join("nfcpay.toml"))
                .args(args)
                .stdin(Stdio::null());
            command
        }

        fn run(&self, args: &[&str]) -> Output {
            self.command(args).output().unwrap()
        }

        /// Runs `args --format json`, which must succeed, and parses its one document.
        fn json(&self, args: &[&str]) -> Value {
            let mut args = args.to_vec();
            args.extend(["--format", "json"]);
            let output = self.run(&args);
            assert!(
                output.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            serde_json::from_slice(&output.stdout)
                .unwrap_or_else(|error| panic!("{args:?}: not one JSON document: {error}"))
        }

        /// Runs `args --format json`, which must fail with `code`; returns its JSON error.
        fn json_error(&self, args: &[&str], code: i32) -> Value {
            let mut args = args.to_vec();
            args.extend(["--format", "json"]);
            let output = self.run(&args);
            assert_eq!(output.status.code(), Some(code), "{args:?}: {output:?}");
            assert!(output.stdout.is_empty(), "{args:?}: {output:?}");
            let error: Value = serde_json::from_slice(&output.stderr)
                .unwrap_or_else(|e| panic!("{args:?}: stderr is not JSON ({e}): {output:?}"));
            assert_eq!(error["error"]["exit_code"], code, "{error}");
            assert!(error["error"]["message"].is_string(), "{error}");
            error
        }
    }

    impl Drop for Platform {
        fn drop(&mut self) {
            if let Some((base, schema)) = &self.postgres
                && let Ok(mut connection) = diesel::PgConnection::establish(base)
            {
                let _ = connection.batch_execute(&format!("DROP SCHEMA {schema} CASCADE"));
            }
        }
    }

    fn now_ms() -> i64 {
        i64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis(),
        )
        .unwrap()
    }

    fn txn(n: u8) -> TxnId {
        TxnId::try_from([n; 16]).unwrap()
    }

    /// Makes a terminal active as enrollment would, with the code the CLI handed out.
    fn enroll(storage: &Storage, terminal: &str, code: &str) -> InitialKeyId {
        let code_sha256: [u8; 32] = Sha256::digest(code.trim().as_bytes()).into();
        storage
            .redeem_enrollment_code(&terminal.parse().unwrap(), code_sha256, now_ms(), "01")
            .unwrap()
            .initial_key_id
    }

    fn half(
        txn_id: TxnId,
        terminal: &str,
        key: InitialKeyId,
        counter: u32,
        content: HalfContent,
    ) -> AcceptedHalf {
        AcceptedHalf {
            txn_id,
            terminal_id: terminal.parse().unwrap(),
            // The serial `enroll` recorded.
            certificate_serial: "01".parse().unwrap(),
            ksn: Ksn::new(key, counter.try_into().unwrap()),
            envelope_sha256: Sha256::digest(format!("{txn_id}{terminal}{counter}")).into(),
            received_at_ms: now_ms(),
            content,
        }
    }

    /// An operator's script: accounts, terminals (one code to a 0600 file), two payments made
    /// through the ledger, then every lookup, all through `--format json`.
    fn operator_script(platform: &Platform) {
        let bdk = platform.json(&["bdk", "generate", "--bdk-id", "0123ABCD"]);
        assert_eq!(bdk["bdk"]["bdk_id"], "0123ABCD");
        assert_eq!(bdk["bdk"]["kcv"].as_str().unwrap().len(), 6, "{bdk}");

        for id in ["acct-payee", "acct-payer"] {
            let created = platform.json(&["accounts", "create", "--id", id, "--currency", "EUR"]);
            assert_eq!(created["account"]["id"], id);
            assert_eq!(created["account"]["balance_minor"], 0);
            assert_eq!(created["account"]["limit_minor"], 0);
        }
        let funded = platform.json(&[
            "accounts",
            "fund",
            "--id",
            "acct-payer",
            "--amount",
            "100.00",
        ]);
        assert_eq!(funded["funded_minor"], 10_000, "{funded}");
        assert_eq!(funded["account"]["balance_minor"], 10_000);
        assert_eq!(funded["account"]["balance"], "100.00");

        // One code to a file (0600, never printed), one printed.
        let code_file = platform.dir.path().join("payee.code");
        let added = platform.json(&[
            "terminals",
            "add",
            "--id",
            "term-payee",
            "--account",
            "acct-payee",
            "--code-file",
            code_file.to_str().unwrap(),
        ]);
        let payee_code = std::fs::read_to_string(&code_file).unwrap();
        assert_eq!(payee_code.trim().len(), 20, "{payee_code:?}");
        assert_eq!(
            std::fs::metadata(&code_file).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(added["code_file"], code_file.to_str().unwrap());
        assert!(added.get("enrollment_code").is_none(), "{added}");
        assert!(
            !added.to_string().contains(payee_code.trim()),
            "the code was echoed"
        );
        assert_eq!(added["terminal"]["state"], "pending");
        let added = platform.json(&[
            "terminals",
            "add",
            "--id",
            "term-payer",
            "--account",
            "acct-payer",
        ]);
        let payer_code = added["enrollment_code"].as_str().unwrap().to_owned();

        // A code file that exists already is refused, and nothing is registered.
        let refused = platform.json_error(
            &[
                "terminals",
                "add",
                "--id",
                "term-third",
                "--account",
                "acct-payee",
                "--code-file",
                code_file.to_str().unwrap(),
            ],
            64,
        );
        assert_eq!(refused["error"]["kind"], "input", "{refused}");
        assert_eq!(std::fs::read_to_string(&code_file).unwrap(), payee_code);
        let missing = platform.json_error(&["terminals", "show", "term-third"], 1);
        assert_eq!(missing["error"]["kind"], "not-found", "{missing}");

        // Payments, through the ledger as the daemon would record them.
        let storage = Storage::open(&platform.url).unwrap();
        let payee_key = enroll(&storage, "term-payee", &payee_code);
        let payer_key = enroll(&storage, "term-payer", &payer_code);
        let eur = "EUR".parse().unwrap();
        let amount = Amount::new(1250, eur).unwrap();
        let digest = |txn_id: TxnId| -> [u8; 32] { Sha256::digest(txn_id.to_bytes()).into() };
        let request = |txn_id| HalfContent::A {
            request_digest: digest(txn_id),
            payee_account: "acct-payee".parse().unwrap(),
            amount,
            expires_at_ms: now_ms() + 60_000,
        };
        storage
            .accept_half(
                half(txn(1), "term-payee", payee_key, 1, request(txn(1))),
                now_ms(),
            )
            .unwrap();
        let instruction = HalfContent::B {
            request_digest: digest(txn(1)),
            payer_account: "acct-payer".parse().unwrap(),
            payee_terminal: "term-payee".parse().unwrap(),
            amount,
        };
        let settled = storage
            .accept_half(
                half(txn(1), "term-payer", payer_key, 1, instruction),
                now_ms(),
            )
            .unwrap();
        assert!(settled.settled_now);
        storage
            .accept_half(
                half(txn(2), "term-payee", payee_key, 2, request(txn(2))),
                now_ms(),
            )
            .unwrap();
        drop(storage);

        let shown = platform.json(&["transactions", "show", &txn(1).to_string()]);
        let payment = &shown["transaction"];
        assert_eq!(payment["txn_id"], txn(1).to_string());
        assert_eq!(payment["status"], "settled", "{shown}");
        assert_eq!(payment["amount_minor"], 1250);
        assert_eq!(payment["amount"], "12.50");
        assert_eq!(payment["currency"], "EUR");
        assert_eq!(payment["half_a"]["terminal"], "term-payee");
        assert_eq!(
            payment["half_a"]["ksn"],
            Ksn::new(payee_key, 1.try_into().unwrap()).to_string()
        );
        assert_eq!(payment["half_b"]["terminal"], "term-payer");
        assert_eq!(payment["half_b"]["account"], "acct-payer");
        assert_eq!(payment["half_b"]["payee_terminal"], "term-payee");
        let settlement_id = payment["settlement_id"].as_i64().unwrap();
        let postings = payment["postings"].as_array().unwrap();
        assert_eq!(postings.len(), 2, "{shown}");
        let amounts: Vec<i64> = postings
            .iter()
            .map(|p| p["amount_minor"].as_i64().unwrap())
            .collect();
        assert_eq!(amounts.iter().sum::<i64>(), 0, "{shown}");
        assert!(postings.iter().all(|p| p["transfer_id"] == settlement_id));
        let audit = payment["audit"].as_array().unwrap();
        assert_eq!(audit.len(), 1, "{shown}");
        assert_eq!(audit[0]["kind"], "transaction.settled");
        assert_eq!(audit[0]["details"]["settlement_id"], settlement_id);
        assert_eq!(audit[0]["details"]["amount_minor"], 1250);

        let pending = platform.json(&["transactions", "show", &txn(2).to_string()]);
        assert_eq!(pending["transaction"]["status"], "pending");
        assert!(pending["transaction"]["half_b"].is_null());
        assert_eq!(pending["transaction"]["postings"], serde_json::json!([]));

        let ids = |document: &Value| -> Vec<String> {
            document["transactions"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["txn_id"].as_str().unwrap().to_owned())
                .collect()
        };
        let all = platform.json(&["transactions", "list"]);
        assert_eq!(ids(&all).len(), 2, "{all}");
        let settled = platform.json(&["transactions", "list", "--status", "settled"]);
        assert_eq!(ids(&settled), [txn(1).to_string()]);
        let by_payer = platform.json(&["transactions", "list", "--terminal", "term-payer"]);
        assert_eq!(ids(&by_payer), [txn(1).to_string()]);
        let one = platform.json(&["transactions", "list", "--limit", "1"]);
        assert_eq!(ids(&one).len(), 1);
        let future = (now_ms() + 3_600_000).to_string();
        let none = platform.json(&["transactions", "list", "--since", &future]);
        assert!(ids(&none).is_empty(), "{none}");
        let since = platform.json(&["transactions", "list", "--since", "2000-01-01T00:00:00Z"]);
        assert_eq!(ids(&since).len(), 2);

        // Balances, accounts, terminals.
        let accounts = platform.json(&["accounts", "list"]);
        let accounts = accounts["accounts"].as_array().unwrap();
        let balance = |id: &str| {
            accounts
                .iter()
                .find(|a| a["id"] == id)
                .unwrap_or_else(|| panic!("no {id}"))["balance_minor"]
                .as_i64()
                .unwrap()
        };
        assert_eq!(balance("acct-payee"), 1250);
        assert_eq!(balance("acct-payer"), 10_000 - 1250);
        assert_eq!(balance("__funding-EUR"), -10_000);
        let account = platform.json(&["accounts", "show", "--id", "acct-payee"]);
        assert_eq!(
            account["postings"].as_array().unwrap().len(),
            1,
            "{account}"
        );
        let terminal = platform.json(&["terminals", "show", "term-payer"]);
        assert_eq!(terminal["terminal"]["state"], "active");
        assert_eq!(terminal["terminal"]["highest_counter"], 1);
        assert_eq!(
            terminal["terminal"]["initial_key_id"],
            payer_key.to_string()
        );
        let suspended = platform.json(&["terminals", "suspend", "--id", "term-payer"]);
        assert_eq!(suspended["terminal"]["state"], "suspended");
        let terminals = platform.json(&["terminals", "list"]);
        assert_eq!(terminals["terminals"].as_array().unwrap().len(), 2);
        let audit = platform.json(&["audit", "verify"]);
        assert_eq!(audit["intact"], true, "{audit}");

        // Errors a script can tell apart.
        let unknown = platform.json_error(&["transactions", "show", &txn(3).to_string()], 1);
        assert_eq!(unknown["error"]["kind"], "not-found");
        let malformed = platform.json_error(&["transactions", "show", "not-hex"], 2);
        assert_eq!(malformed["error"]["kind"], "arguments");
        let bad_status = platform.json_error(&["transactions", "list", "--status", "done"], 2);
        assert_eq!(bad_status["error"]["kind"], "arguments");
        let bad_since = platform.json_error(&["transactions", "list", "--since", "yesterday"], 2);
        assert_eq!(bad_since["error"]["kind"], "arguments");
        let zero_limit = platform.json_error(&["transactions", "list", "--limit", "0"], 2);
        assert_eq!(zero_limit["error"]["kind"], "arguments");
        let bad_amount = platform.json_error(
            &[
                "accounts",
                "fund",
                "--id",
                "acct-payer",
                "--amount",
                "1.234",
            ],
            64,
        );
        assert_eq!(bad_amount["error"]["kind"], "input");
        // Unknown accounts and terminals, whichever command names them, are `not-found` as
        // unknown transactions are.
        for args in [
            &["accounts", "show", "--id", "nobody"][..],
            &["accounts", "fund", "--id", "nobody", "--amount", "1.00"],
            &["terminals", "suspend", "--id", "nobody"],
        ] {
            let unknown = platform.json_error(args, 1);
            assert_eq!(unknown["error"]["kind"], "not-found", "{args:?}: {unknown}");
        }
        assert_eq!(balance("acct-payer"), 10_000 - 1250, "state changed");
    }

    #[test]
    fn operator_script_sqlite() {
        operator_script(&Platform::new(false).unwrap());
    }

    #[test]
    fn operator_script_postgres() {
        if let Some(platform) = Platform::new(true) {
            operator_script(&platform);
        }
    }

    /// `nfcpay-admin … | head`: a reader that goes away is not an error.
    #[test]
    fn closed_standard_output_is_quiet_success() {
        let platform = Platform::new(false).unwrap();
        for id in ["a", "b", "c"] {
            platform.json(&["accounts", "create", "--id", id, "--currency", "EUR"]);
        }
        for format in ["human", "json"] {
            let mut child = platform
                .command(&["accounts", "list", "--format", format])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            // Closed before the command has opened its ledger, so its first write meets EPIPE.
            drop(child.stdout.take());
            let output = child.wait_with_output().unwrap();
            assert_eq!(output.status.code(), Some(0), "{format}: {output:?}");
            assert!(output.stderr.is_empty(), "{format}: {output:?}");
        }
    }

    /// Amount flags say their unit; the human output stays the default.
    #[test]
    fn help_names_units_and_human_output_is_the_default() {
        let platform = Platform::new(false).unwrap();
        let help = platform.run(&["accounts", "fund", "--help"]);
        let help = String::from_utf8(help.stdout).unwrap();
        assert!(
            help.contains("MAJOR units") && help.contains("minor units"),
            "{help}"
        );
        let help = platform.run(&["accounts", "create", "--help"]);
        assert!(
            String::from_utf8(help.stdout)
                .unwrap()
                .contains("MAJOR units")
        );
        let created = platform.run(&["accounts", "create", "--id", "x", "--currency", "EUR"]);
        let text = String::from_utf8(created.stdout).unwrap();
        assert!(text.starts_with("created account x"), "{text}");
        assert!(serde_json::from_str::<Value>(&text).is_err());
        let error = platform.run(&["accounts", "show", "--id", "nobody"]);
        assert_eq!(error.status.code(), Some(1));
        let error = String::from_utf8(error.stderr).unwrap();
        assert!(
            error.starts_with("nfcpay-admin: unknown account nobody"),
            "{error}"
        );
    }

    /// `--format json`: a usage error is a JSON error document too, a missing subcommand
    /// included; without it, clap's own text stays. `--config` goes anywhere, as `--format`.
    #[test]
    fn usage_errors_in_json_and_global_options() {
        let platform = Platform::new(false).unwrap();
        let config = platform.dir.path().join("nfcpay.toml");
        let admin = |args: &[&str]| {
            Command::new(env!("CARGO_BIN_EXE_nfcpay-admin"))
                .args(args)
                .env_remove("NFCPAY_CONFIG")
                .env_remove("NFCPAY_LOG")
                .stdin(Stdio::null())
                .output()
                .unwrap()
        };
        let config = config.to_str().unwrap();
        for args in [
            &["--config", config, "--format", "json", "accounts"][..],
            &["--config", config, "accounts", "--format", "json"],
            &["--format=json", "--config", config],
        ] {
            let output = admin(args);
            assert_eq!(output.status.code(), Some(2), "{args:?}: {output:?}");
            assert!(output.stdout.is_empty(), "{args:?}: {output:?}");
            let error: Value = serde_json::from_slice(&output.stderr).unwrap_or_else(|e| {
                panic!("{args:?}: stderr is not one JSON document ({e}): {output:?}")
            });
            assert_eq!(error["error"]["kind"], "arguments", "{error}");
            assert_eq!(error["error"]["exit_code"], 2, "{error}");
            let message = error["error"]["message"].as_str().unwrap();
            assert!(message.contains("subcommand"), "{message}");
        }
        let human = admin(&["--config", config, "accounts"]);
        assert_eq!(human.status.code(), Some(2), "{human:?}");
        let text = String::from_utf8(human.stderr).unwrap();
        assert!(text.contains("Usage: nfcpay-admin accounts"), "{text}");
        assert!(serde_json::from_str::<Value>(&text).is_err(), "{text}");

        // --config after the subcommand.
        let listed = admin(&["accounts", "list", "--config", config, "--format", "json"]);
        assert!(listed.status.success(), "{listed:?}");
        let listed: Value = serde_json::from_slice(&listed.stdout).unwrap();
        assert!(listed["accounts"].is_array(), "{listed}");
    }

    /// With `--format json` the error document is all there is on standard error, even when
    /// the ledger's connection pool (r2d2, through the `log` crate) logs errors; asked for with
    /// `NFCPAY_LOG`, log events come as JSON lines. The pool logs here because PostgreSQL
    /// refuses the `statement_timeout` every pooled connection sets (above its 2^31 - 1 ms):
    /// the first connection (migrations) works, every pooled one fails and is logged.
    #[test]
    fn json_mode_writes_no_log_text_beside_the_error() {
        let Some(platform) = Platform::new(true) else {
            return;
        };
        let config = platform.dir.path().join("refused.toml");
        std::fs::write(
            &config,
            format!(
                "[keystore]\nbackend = \"software\"\npath = \"{}\"\n\n[database]\n\
                 url = \"{}\"\nconnect_timeout_ms = 500\nstatement_timeout_ms = 3000000000\n",
                platform.dir.path().join("keystore.json").display(),
                platform.url
            ),
        )
        .unwrap();
        let admin = |log: Option<&str>| {
            let mut command = Command::new(env!("CARGO_BIN_EXE_nfcpay-admin"));
            command
                .arg("--config")
                .arg(&config)
                .args(["--format", "json", "accounts", "list"])
                .env_remove("NFCPAY_LOG")
                .stdin(Stdio::null());
            if let Some(log) = log {
                command.env("NFCPAY_LOG", log);
            }
            command.output().unwrap()
        };

        let quiet = admin(None);
        assert!(!quiet.status.success(), "{quiet:?}");
        assert!(quiet.stdout.is_empty(), "{quiet:?}");
        let error: Value = serde_json::from_slice(&quiet.stderr).unwrap_or_else(|e| {
            panic!(
                "stderr is not one JSON document ({e}):\n{}",
                String::from_utf8_lossy(&quiet.stderr)
            )
        });
        assert!(error["error"]["kind"].is_string(), "{error}");

        // The same failure logs errors when asked: the quiet run above had something to hide.
        let logged = admin(Some("error"));
        let stderr = String::from_utf8(logged.stderr).unwrap();
        let lines: Vec<Value> = stderr
            .lines()
            .map(|line| {
                serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}\n{stderr}"))
            })
            .collect();
        assert!(lines.len() >= 2, "no log event: {stderr}");
        assert_eq!(lines.last().unwrap()["error"], error["error"], "{stderr}");
        assert!(
            lines[..lines.len() - 1]
                .iter()
                .all(|event| event["level"] == "ERROR"),
            "{stderr}"
        );
    }

    /// The ` ```sh admin-cli-script ` blocks of docs/admin-cli.md, in order, verbatim.
    fn documented_script_blocks() -> Vec<String> {
        const FENCE: &str = "```sh admin-cli-script\n";
        let doc = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/admin-cli.md"),
        )
        .unwrap();
        let mut blocks = Vec::new();
        let mut rest = doc.as_str();
        while let Some(start) = rest.find(FENCE) {
            let body = &rest[start + FENCE.len()..];
            let end = body.find("\n```\n").expect("the block is closed");
            blocks.push(body[..=end].to_owned());
            rest = &body[end..];
        }
        blocks
    }

    /// Runs one block with `bash -euo pipefail`, `nfcpay-admin` on `PATH`; its standard output.
    fn run_script_block(script: &str, config: &Path, codes: &Path) -> String {
        // Not skipped when missing: `cargo xtask test` installs jq (xtask/src/packages.rs).
        let jq = Command::new("jq").arg("--version").output();
        assert!(
            jq.as_ref().is_ok_and(|output| output.status.success()),
            "jq is needed to run docs/admin-cli.md's script: install the Debian package jq \
             (`cargo xtask test` does): {jq:?}"
        );
        let bin = Path::new(env!("CARGO_BIN_EXE_nfcpay-admin"))
            .parent()
            .unwrap();
        let path = std::env::join_paths(std::iter::once(bin.to_owned()).chain(
            std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()),
        ))
        .unwrap();
        let output = Command::new("bash")
            .args(["-euo", "pipefail", "-c", script])
            .env("PATH", path)
            .env("NFCPAY_CONFIG", config)
            .env("NFCPAY_CODES", codes)
            .env_remove("NFCPAY_LOG")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stdout = String::from_utf8(output.stdout).unwrap();
        let stderr = String::from_utf8(output.stderr).unwrap();
        assert!(
            output.status.success() && stderr.is_empty(),
            "the script failed ({}):\n{script}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
            output.status
        );
        stdout
    }

    /// docs/admin-cli.md's script, run as an operator would with jq, against a throwaway
    /// software keystore and SQLite ledger: the terminals enrolled and one payment recorded
    /// between its two blocks.
    #[test]
    fn documented_script() {
        let blocks = documented_script_blocks();
        assert_eq!(blocks.len(), 2, "{blocks:#?}");
        let platform = Platform::new(false).unwrap();
        let config = platform.dir.path().join("script.toml");
        let mut text = std::fs::read_to_string(platform.dir.path().join("nfcpay.toml")).unwrap();
        text.push_str(&format!(
            "\n[platform]\npki_dir = \"{}\"\n",
            platform.dir.path().join("pki").display()
        ));
        std::fs::write(&config, text).unwrap();
        let codes = platform.dir.path().join("codes");

        let first = run_script_block(&blocks[0], &config, &codes);
        for line in [
            "BDK 0123ABCD, KCV ",
            "alice 100.00 EUR\n",
            "shop-42 0.00 EUR\n",
            &format!(
                "pos-42 pending, code in {}\n",
                codes.join("pos-42.code").display()
            ),
            &format!(
                "alice-phone pending, code in {}\n",
                codes.join("alice-phone.code").display()
            ),
        ] {
            assert!(first.contains(line), "{line:?} not in:\n{first}");
        }
        assert!(platform.dir.path().join("pki/ca.pem").exists());
        let code = |terminal: &str| {
            let file = codes.join(format!("{terminal}.code"));
            assert_eq!(
                std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
                0o600
            );
            let code = std::fs::read_to_string(file).unwrap();
            assert!(!first.contains(code.trim()), "the code was printed");
            code
        };

        // The installers enroll, and alice pays the shop 12.50 EUR.
        let storage = Storage::open(&platform.url).unwrap();
        let shop_key = enroll(&storage, "pos-42", &code("pos-42"));
        let alice_key = enroll(&storage, "alice-phone", &code("alice-phone"));
        let amount = Amount::new(1250, "EUR".parse().unwrap()).unwrap();
        let request_digest: [u8; 32] = Sha256::digest(txn(7).to_bytes()).into();
        let request = HalfContent::A {
            request_digest,
            payee_account: "shop-42".parse().unwrap(),
            amount,
            expires_at_ms: now_ms() + 60_000,
        };
        storage
            .accept_half(half(txn(7), "pos-42", shop_key, 1, request), now_ms())
            .unwrap();
        let instruction = HalfContent::B {
            request_digest,
            payer_account: "alice".parse().unwrap(),
            payee_terminal: "pos-42".parse().unwrap(),
            amount,
        };
        let settled = storage
            .accept_half(
                half(txn(7), "alice-phone", alice_key, 1, instruction),
                now_ms(),
            )
            .unwrap();
        assert!(settled.settled_now);
        drop(storage);

        let second = run_script_block(&blocks[1], &config, &codes);
        for line in [
            "pos-42 active counter 1\n".to_owned(),
            format!("{} 12.50 EUR alice-phone -> pos-42\n", txn(7)),
            "shop-42 12.50\n".to_owned(),
            "alice -12.50\n".to_owned(),
            "audit intact: true, ".to_owned(),
            "errors as documented\n".to_owned(),
        ] {
            assert!(second.contains(&line), "{line:?} not in:\n{second}");
        }
    }
}
