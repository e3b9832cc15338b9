//! `nfcpay-agent` end to end: two terminals enrolled through the agent binary against the real
//! platform (`nfcpayd`, SoftHSM2, SQLite), paying each other through unmodified libnfc over
//! the PN532 emulator, each agent a process of its own.
//!
//! What the NFC layer guarantees below the agent is tested in `terminal-agent`: a peer taken
//! away after each possible number of chunks, and frames over 262 bytes refused before libnfc
//! sees them (`nfc::libnfc` unit tests, `terminal-agent/pn532-sim/tests/nfc_link.rs`). Here the agent
//! level: a payment settles with either terminal as NFC initiator; a missing other terminal
//! leaves the platform untouched; bad enrollment codes load no key; a counter taken for a half
//! that never landed is not used again; a half kept through a platform outage is sent again,
//! byte-identical, by `pending --resend` and settles; a payment left pending is asked about
//! with `status --txn`; through `503`s (the platform's PostgreSQL frozen) each agent waits the
//! platform's `Retry-After`, sends the same bytes again, and the payment settles once.

// A panic is how a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use std::time::{Duration, Instant};

use nfcpay_keystore::testing::SoftHsmDir;
use nfcpay_tests::postgres;
use nfcpay_tests::{Ledger, PlatformFixture, SOFTHSM_MODULE, binary, http_get};
use tempfile::TempDir;

/// The label and the user PIN of a token terminal's SoftHSM2 token.
const TOKEN_LABEL: &str = "terminal";
const TOKEN_PIN: &str = "terminal-pin";

/// The emulator process (`nfcpay-pn532-sim`), killed on drop.
struct Emulator {
    child: Child,
    connstrings: Vec<String>,
}

impl Emulator {
    fn start(devices: usize) -> Self {
        let mut child = Command::new(binary("nfcpay-pn532-sim").unwrap())
            .args(["--devices", &devices.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nfcpay-pn532-sim");
        let stdout = child.stdout.take().expect("piped");
        let connstrings: Vec<String> = BufReader::new(stdout)
            .lines()
            .take(devices)
            .map_while(Result::ok)
            .collect();
        assert_eq!(
            connstrings.len(),
            devices,
            "emulator printed {connstrings:?}"
        );
        Self { child, connstrings }
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A terminal directory of the agent (software keystore inside).
struct AgentTerminal {
    dir: TempDir,
    /// For a terminal whose keys are in a SoftHSM2 token: the token's directory (the token
    /// labelled [`TOKEN_LABEL`]).
    token: Option<SoftHsmDir>,
}

impl AgentTerminal {
    fn new() -> Self {
        Self {
            dir: tempfile::Builder::new()
                .prefix("nfcpay-agent-test")
                .tempdir()
                .unwrap(),
            token: None,
        }
    }

    /// A terminal whose keys live in a SoftHSM2 token of its own.
    fn with_token() -> Self {
        let hsm = SoftHsmDir::new(TOKEN_PIN);
        hsm.make_token(TOKEN_LABEL);
        Self {
            token: Some(hsm),
            ..Self::new()
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `nfcpay-agent --dir DIR ARGS`, with libnfc told to open only the readers it is given.
    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(binary("nfcpay-agent").unwrap());
        command.arg("--dir").arg(self.path());
        if let Some(hsm) = &self.token {
            let uri = format!(
                "pkcs11:token={TOKEN_LABEL}?module-path={SOFTHSM_MODULE}&pin-source=file:{}",
                hsm.pin_file().display()
            );
            command
                .args(["--keystore", &uri])
                .env("SOFTHSM2_CONF", hsm.conf());
        }
        command
            .args(args)
            .env("LIBNFC_AUTO_SCAN", "false")
            .env("LIBNFC_INTRUSIVE_SCAN", "false")
            .env_remove("LIBNFC_DEVICE")
            .env_remove("LIBNFC_DEFAULT_DEVICE")
            .env("NFCPAY_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        command
    }

    fn spawn(&self, args: &[&str]) -> Child {
        self.command(args).spawn().expect("start nfcpay-agent")
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run nfcpay-agent")
    }

    fn status(&self) -> String {
        let output = self.run(&["status"]);
        assert!(output.status.success(), "status: {}", text(&output));
        String::from_utf8(output.stdout).unwrap()
    }

    fn next_counter(&self) -> u32 {
        let status = self.status();
        status
            .lines()
            .find_map(|line| line.strip_prefix("next KSN counter:"))
            .unwrap_or_else(|| panic!("no counter in {status}"))
            .trim()
            .parse()
            .unwrap()
    }

    fn has_dukpt_state(&self) -> bool {
        self.path().join("dukpt-state.json").exists()
    }

    /// The files in `DIR/pending/` (the halves kept until their final answer), sorted.
    fn pending_files(&self) -> Vec<PathBuf> {
        let Ok(entries) = std::fs::read_dir(self.path().join("pending")) else {
            return Vec::new();
        };
        let mut files: Vec<PathBuf> = entries.map(|entry| entry.unwrap().path()).collect();
        files.sort();
        files
    }
}

fn text(output: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The code `terminals add` prints.
fn code_of(admin_output: &str) -> String {
    admin_output
        .lines()
        .find_map(|line| line.strip_prefix("enrollment code: "))
        .expect("an enrollment code")
        .trim()
        .to_owned()
}

fn ca_file(platform: &PlatformFixture) -> PathBuf {
    let path = platform.dir().join("agent-ca.pem");
    if !path.exists() {
        std::fs::write(&path, platform.ca_pem().unwrap()).unwrap();
    }
    path
}

/// `nfcpay-agent enroll` with the code in a file.
fn enroll_with_code(
    platform: &PlatformFixture,
    terminal: &AgentTerminal,
    id: &str,
    account: &str,
    code: &str,
) -> Output {
    let code_dir = tempfile::tempdir().unwrap();
    let code_file = code_dir.path().join("code");
    std::fs::write(&code_file, format!("{code}\n")).unwrap();
    let ca = ca_file(platform);
    terminal.run(&[
        "enroll",
        "--platform",
        &platform.address,
        "--enroll-address",
        &platform.enroll_address,
        "--server-name",
        "localhost",
        "--ca",
        ca.to_str().unwrap(),
        "--terminal-id",
        id,
        "--account",
        account,
        "--code-file",
        code_file.to_str().unwrap(),
    ])
}

/// Registers and enrolls a terminal through the agent binary.
fn enrolled(platform: &PlatformFixture, id: &str, account: &str) -> AgentTerminal {
    enrolled_as(platform, id, account, AgentTerminal::new())
}

/// Registers and enrolls `terminal` through the agent binary.
fn enrolled_as(
    platform: &PlatformFixture,
    id: &str,
    account: &str,
    terminal: AgentTerminal,
) -> AgentTerminal {
    let code = platform.add_terminal(id, account).unwrap();
    let output = enroll_with_code(platform, &terminal, id, account, &code);
    assert!(output.status.success(), "enroll {id}: {}", text(&output));
    let shown = stdout(&output);
    assert!(
        shown.contains(&format!("terminal ID:       {id}")),
        "{shown}"
    );
    assert!(shown.contains("initial key KCV:"), "{shown}");
    assert!(!shown.contains(code.as_str()) && !stderr(&output).contains(code.as_str()));
    assert!(terminal.has_dukpt_state());
    terminal
}

/// A platform with `shop` (empty) and `alice` (100.00 EUR), and their two terminals.
fn platform_and_terminals() -> (PlatformFixture, AgentTerminal, AgentTerminal) {
    let platform = PlatformFixture::start(&Ledger::Sqlite).unwrap();
    platform.account("shop", "EUR", None).unwrap();
    platform.account("alice", "EUR", Some("100.00")).unwrap();
    let payee = enrolled(&platform, "shop-1", "shop");
    let payer = enrolled(&platform, "alice-phone", "alice");
    (platform, payee, payer)
}

/// Runs the payer and the payee at once; returns (payee, payer) outputs.
fn pay_concurrently(
    payee: &AgentTerminal,
    payee_args: &[&str],
    payer: &AgentTerminal,
    payer_args: &[&str],
) -> (Output, Output) {
    let payer_child = payer.spawn(payer_args);
    let payee_child = payee.spawn(payee_args);
    let payee_output = payee_child.wait_with_output().unwrap();
    let payer_output = payer_child.wait_with_output().unwrap();
    (payee_output, payer_output)
}

/// `nfcpay-agent request` of `amount` EUR on the reader `device`, waiting up to 20 s for the
/// payer's phone, then `extra`.
fn request_args<'a>(amount: &'a str, device: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "request",
        "--amount",
        amount,
        "--currency",
        "EUR",
        "--device",
        device,
        "--nfc-wait-s",
        "20",
    ];
    args.extend_from_slice(extra);
    args
}

/// `nfcpay-agent pay` on the reader `device`, waiting up to 20 s for the payee's terminal,
/// then `extra` (consent among them, or none).
fn pay_args<'a>(device: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["pay", "--device", device, "--nfc-wait-s", "20"];
    args.extend_from_slice(extra);
    args
}

/// The agent exited 1 (refused or failed) and said `message` on stderr.
fn assert_fails_saying(output: &Output, message: &str) {
    assert_eq!(output.status.code(), Some(1), "{}", text(output));
    assert!(stderr(output).contains(message), "{}", text(output));
}

fn assert_settled_receipt(output: &Output, amount: &str) {
    assert!(output.status.success(), "{}", text(output));
    let shown = stdout(output);
    assert!(
        shown.contains("receipt (verified: the platform's signature and this half's DUKPT MAC)"),
        "{shown}"
    );
    assert!(shown.contains("  status:        settled"), "{shown}");
    assert!(
        shown.contains(&format!("  amount:        {amount}")),
        "{shown}"
    );
    assert!(
        shown.contains("  payee:         shop-1 (account shop)"),
        "{shown}"
    );
    assert!(
        shown.contains("  payer:         alice-phone (account alice)"),
        "{shown}"
    );
    assert!(shown.contains("  settlement id: "), "{shown}");
}

#[test]
fn two_agents_pay_each_other_over_the_emulator_in_either_nfc_role() {
    let (platform, payee, payer) = platform_and_terminals();
    let emulator = Emulator::start(2);
    let (payee_reader, payer_reader) = (&emulator.connstrings[0], &emulator.connstrings[1]);

    // The payee's reader as NFC initiator, the payer's as target (the defaults).
    let (payee_output, payer_output) = pay_concurrently(
        &payee,
        &request_args("12.50", payee_reader, &["--description", "coffee and cake"]),
        &payer,
        &pay_args(payer_reader, &["--yes"]),
    );
    assert_settled_receipt(&payee_output, "12.50 EUR");
    assert_settled_receipt(&payer_output, "12.50 EUR");
    let shown = stdout(&payer_output);
    assert!(shown.contains("  description:  coffee and cake"), "{shown}");
    assert!(
        shown.contains("  payee:        shop-1 (account shop)"),
        "{shown}"
    );
    assert_eq!(platform.balance("alice").unwrap(), "87.50 EUR");
    assert_eq!(platform.balance("shop").unwrap(), "12.50 EUR");
    assert!(
        stdout(&payee_output).contains("kept in "),
        "{}",
        text(&payee_output)
    );
    assert_eq!(
        payee.pending_files(),
        Vec::<PathBuf>::new(),
        "answered: forgotten"
    );
    assert_eq!(
        payer.pending_files(),
        Vec::<PathBuf>::new(),
        "answered: forgotten"
    );

    // Roles swapped: the payee's reader as target, the payer's as initiator; consent by limit.
    let (payee_output, payer_output) = pay_concurrently(
        &payee,
        &request_args("2.25", payee_reader, &["--role", "target"]),
        &payer,
        &pay_args(
            payer_reader,
            &["--max-amount", "20.00", "--role", "initiator"],
        ),
    );
    assert_settled_receipt(&payee_output, "2.25 EUR");
    assert_settled_receipt(&payer_output, "2.25 EUR");
    assert_eq!(platform.balance("alice").unwrap(), "85.25 EUR");
    assert_eq!(platform.balance("shop").unwrap(), "14.75 EUR");
    let audit = platform.admin_ok(&["audit", "verify"]).unwrap();
    assert!(audit.contains("intact"), "{audit}");
}

#[test]
fn a_payer_over_its_limit_or_without_consent_pays_nothing() {
    let (platform, payee, payer) = platform_and_terminals();
    let emulator = Emulator::start(2);
    let before = platform.storage().unwrap().dump_state().unwrap();
    let (payee_reader, payer_reader) = (&emulator.connstrings[0], &emulator.connstrings[1]);
    for payer_consent in [&["--max-amount", "10.00"][..], &[][..]] {
        let payer_args = pay_args(payer_reader, payer_consent);
        let (payee_output, payer_output) = pay_concurrently(
            &payee,
            &request_args(
                "12.50",
                payee_reader,
                &["--wait-ms", "0", "--settle-wait-s", "0"],
            ),
            &payer,
            &payer_args,
        );
        // The payer refuses before sealing anything; the payee's half A stands alone.
        assert_fails_saying(&payer_output, "no consent");
        assert_fails_saying(&payee_output, "still pending");
        // The message names the command that asks again, and that command answers.
        let shown = stderr(&payee_output);
        let command = shown
            .split('`')
            .nth(1)
            .unwrap_or_else(|| panic!("no command in {shown}"));
        let prefix = format!(
            "nfcpay-agent --dir {} status --txn ",
            payee.path().display()
        );
        let txn = command
            .strip_prefix(&prefix)
            .unwrap_or_else(|| panic!("{command}"));
        let asked = payee.run(&["status", "--txn", txn]);
        assert!(asked.status.success(), "{}", text(&asked));
        assert!(
            stdout(&asked).contains("  status:        pending")
                && stdout(&asked).contains(&format!("  transaction:   {txn}")),
            "{}",
            text(&asked)
        );
        assert_eq!(payee.pending_files(), Vec::<PathBuf>::new());
        assert_eq!(payer.next_counter(), 1, "the payer took no counter");
    }
    assert_eq!(platform.balance("alice").unwrap(), "100.00 EUR");
    let after = platform.storage().unwrap().dump_state().unwrap();
    assert_ne!(before, after, "the payee's pending halves are recorded");
}

#[test]
fn a_missing_other_terminal_leaves_no_state_and_a_clear_error() {
    let (platform, payee, payer) = platform_and_terminals();
    // Each terminal's reader in a field of its own (one emulator each): they never meet.
    let payee_field = Emulator::start(1);
    let payer_field = Emulator::start(1);
    let before = platform.storage().unwrap().dump_state().unwrap();

    // The payer is out of the payee's reach: the payee's initiator finds no target, the
    // payer's target is never activated.
    let (payee_output, payer_output) = pay_concurrently(
        &payee,
        &[
            "request",
            "--amount",
            "12.50",
            "--currency",
            "EUR",
            "--device",
            &payee_field.connstrings[0],
            "--nfc-wait-s",
            "2",
        ],
        &payer,
        &[
            "pay",
            "--yes",
            "--device",
            &payer_field.connstrings[0],
            "--role",
            "target",
            "--nfc-wait-s",
            "2",
        ],
    );
    assert_fails_saying(&payee_output, "NFC: no NFC-DEP target found within");
    assert_fails_saying(&payer_output, "NFC: no NFC-DEP initiator came within");
    // The payer taken away while the payee waits as target (the payer process is killed
    // before it reaches the field).
    let mut payer_child = payer.spawn(&[
        "pay",
        "--yes",
        "--device",
        &payer_field.connstrings[0],
        "--role",
        "initiator",
    ]);
    payer_child.kill().unwrap();
    let _ = payer_child.wait();
    let payee_output = payee.run(&[
        "request",
        "--amount",
        "12.50",
        "--currency",
        "EUR",
        "--device",
        &payee_field.connstrings[0],
        "--role",
        "target",
        "--nfc-wait-s",
        "2",
    ]);
    assert_fails_saying(&payee_output, "NFC: no NFC-DEP initiator came within");

    let after = platform.storage().unwrap().dump_state().unwrap();
    assert_eq!(before, after, "the platform must not change");
    assert_eq!(
        payee.next_counter(),
        1,
        "no counter is taken before NFC succeeds"
    );
    assert_eq!(payer.next_counter(), 1);
}

#[test]
fn enrollment_with_a_wrong_used_or_expired_code_loads_no_key() {
    let platform = PlatformFixture::start(&Ledger::Sqlite).unwrap();
    platform.account("shop", "EUR", None).unwrap();

    let check_refused = |output: &Output, terminal: &AgentTerminal, code: &str| {
        assert_eq!(output.status.code(), Some(1), "{}", text(output));
        let shown = text(output);
        assert!(
            shown.contains("problem code: enrollment-refused"),
            "{shown}"
        );
        assert!(
            !shown.contains(code),
            "the code must not be echoed: {shown}"
        );
        assert!(!terminal.has_dukpt_state(), "no key may be loaded");
        assert!(!terminal.path().join("terminal.json").exists());
    };

    // Wrong: a code for this terminal exists, but this is not it.
    let good = platform.add_terminal("shop-1", "shop").unwrap();
    let wrong = AgentTerminal::new();
    let wrong_code = "WRONG-CODE-0000";
    check_refused(
        &enroll_with_code(&platform, &wrong, "shop-1", "shop", wrong_code),
        &wrong,
        wrong_code,
    );

    // Used: it works once (given on stdin), then never again.
    let first = AgentTerminal::new();
    let ca = ca_file(&platform);
    let mut child = first
        .command(&[
            "enroll",
            "--platform",
            &platform.address,
            "--enroll-address",
            &platform.enroll_address,
            "--server-name",
            "localhost",
            "--ca",
            ca.to_str().unwrap(),
            "--terminal-id",
            "shop-1",
            "--account",
            "shop",
            "--code-stdin",
        ])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{}\n", good.as_str()).as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "{}", text(&output));
    assert!(first.has_dukpt_state());
    let again = AgentTerminal::new();
    check_refused(
        &enroll_with_code(&platform, &again, "shop-1", "shop", &good),
        &again,
        &good,
    );

    // Expired: valid for 0 hours.
    let added = platform
        .admin_ok(&[
            "terminals",
            "add",
            "--id",
            "shop-2",
            "--account",
            "shop",
            "--code-validity-hours",
            "0",
        ])
        .unwrap();
    let expired_code = code_of(&added);
    std::thread::sleep(std::time::Duration::from_millis(20));
    let late = AgentTerminal::new();
    check_refused(
        &enroll_with_code(&platform, &late, "shop-2", "shop", &expired_code),
        &late,
        &expired_code,
    );

    // A usage error is not a refusal: no code source at all exits 64.
    let output = late.run(&[
        "enroll",
        "--platform",
        "x:1",
        "--server-name",
        "x",
        "--ca",
        "x",
        "--terminal-id",
        "t",
    ]);
    assert_eq!(output.status.code(), Some(64), "{}", text(&output));
}

#[test]
fn a_counter_taken_for_a_half_that_never_landed_is_not_used_again() {
    let (platform, payee, payer) = platform_and_terminals();
    let emulator = Emulator::start(2);
    let (payee_reader, payer_reader) = (&emulator.connstrings[0], &emulator.connstrings[1]);
    assert_eq!(payee.next_counter(), 1);

    // The platform refuses the payee's half (terminal suspended): the counter was taken and
    // saved before sealing, and the half never landed.
    platform
        .admin_ok(&["terminals", "suspend", "--id", "shop-1"])
        .unwrap();
    let (payee_output, _payer_output) = pay_concurrently(
        &payee,
        &request_args("12.50", payee_reader, &[]),
        &payer,
        &pay_args(
            payer_reader,
            &["--yes", "--wait-ms", "0", "--settle-wait-s", "0"],
        ),
    );
    assert_fails_saying(&payee_output, "problem code: terminal-suspended");
    assert!(
        stdout(&payee_output).contains("(counter 1)"),
        "{}",
        text(&payee_output)
    );
    assert_eq!(payee.next_counter(), 2, "the taken counter is spent");
    assert_eq!(
        payee.pending_files(),
        Vec::<PathBuf>::new(),
        "a definitive refusal is final: the half is not kept"
    );

    platform
        .admin_ok(&["terminals", "reactivate", "--id", "shop-1"])
        .unwrap();
    let (payee_output, payer_output) = pay_concurrently(
        &payee,
        &request_args("12.50", payee_reader, &[]),
        &payer,
        &pay_args(payer_reader, &["--yes"]),
    );
    assert_settled_receipt(&payee_output, "12.50 EUR");
    assert_settled_receipt(&payer_output, "12.50 EUR");
    assert!(
        stdout(&payee_output).contains("(counter 2)"),
        "{}",
        text(&payee_output)
    );
    assert_eq!(payee.next_counter(), 3);
    assert_eq!(platform.balance("alice").unwrap(), "87.50 EUR");
}

/// Issue 4, item 2: with PKCS#11 the terminal's TLS client key and DUKPT keys stay in its
/// token. A payer whose keystore is a SoftHSM2 token enrolls, pays over the emulator, and its
/// token then holds its TLS key (sensitive, never extractable) and its DUKPT registers, and no
/// initial key or working key.
#[test]
fn a_terminal_with_its_keys_in_a_pkcs11_token_enrolls_and_pays() {
    let platform = PlatformFixture::start(&Ledger::Sqlite).unwrap();
    platform.account("shop", "EUR", None).unwrap();
    platform.account("alice", "EUR", Some("100.00")).unwrap();
    let payee = enrolled(&platform, "shop-1", "shop");
    let payer = enrolled_as(
        &platform,
        "alice-phone",
        "alice",
        AgentTerminal::with_token(),
    );
    assert!(
        !payer.path().join("keystore.json").exists(),
        "no software keystore for a token terminal"
    );
    let emulator = Emulator::start(2);
    let (payee_output, payer_output) = pay_concurrently(
        &payee,
        &request_args("3.10", &emulator.connstrings[0], &[]),
        &payer,
        &pay_args(&emulator.connstrings[1], &["--yes"]),
    );
    assert_settled_receipt(&payee_output, "3.10 EUR");
    assert_settled_receipt(&payer_output, "3.10 EUR");
    assert_eq!(platform.balance("alice").unwrap(), "96.90 EUR");

    let objects = payer.token.as_ref().unwrap().list_objects(TOKEN_LABEL);
    let private_keys: Vec<&str> = objects.split("Private Key Object").skip(1).collect();
    assert_eq!(private_keys.len(), 1, "only the TLS key: {objects}");
    assert!(private_keys[0].contains("nfcpay-terminal-tls"), "{objects}");
    assert!(
        private_keys[0].contains("never extractable") && private_keys[0].contains("sensitive"),
        "{objects}"
    );
    let secret_keys: Vec<&str> = objects.split("Secret Key Object").skip(1).collect();
    assert!(
        !secret_keys.is_empty() && secret_keys.len() <= 32,
        "the future-key registers, at most 32: {objects}"
    );
    assert!(
        secret_keys.iter().all(|key| key.contains("nfcpay-dukpt-r")),
        "nothing but registers: {objects}"
    );
    assert!(
        secret_keys
            .iter()
            .all(|key| key.contains("sensitive") && !key.contains("Access:     extractable")),
        "{objects}"
    );
}

/// Issue 8 item 7: each sealed half is kept on disk before it is sent. With the platform down
/// (stopped by its pid) both agents give up after their bounded attempts, keep their halves and
/// name the command that sends them again; their counters are not spent twice. With the
/// platform back, `pending --resend` sends the identical bytes and the payment settles. A file
/// in the pending directory that is not this terminal's half is reported and never sent; after
/// the answers nothing stays pending. Issue 11: `status --txn` asks about the payment.
#[test]
fn halves_kept_through_a_platform_outage_are_resent_byte_identical_and_settle() {
    let (mut platform, payee, payer) = platform_and_terminals();
    let emulator = Emulator::start(2);
    let saved = tempfile::tempdir().unwrap();
    let saved_a = saved.path().join("half-a");
    let saved_b = saved.path().join("half-b");

    platform.stop().unwrap();
    let (payee_output, payer_output) = pay_concurrently(
        &payee,
        &request_args(
            "12.50",
            &emulator.connstrings[0],
            &["--attempts", "2", "--save-half", saved_a.to_str().unwrap()],
        ),
        &payer,
        &pay_args(
            &emulator.connstrings[1],
            &[
                "--yes",
                "--attempts",
                "2",
                "--save-half",
                saved_b.to_str().unwrap(),
            ],
        ),
    );
    let mut kept = Vec::new();
    for (output, terminal, saved, suffix) in [
        (&payee_output, &payee, &saved_a, "-A.half"),
        (&payer_output, &payer, &saved_b, "-B.half"),
    ] {
        assert_eq!(output.status.code(), Some(1), "{}", text(output));
        let shown = stderr(output);
        assert!(
            shown.contains("not delivered") && shown.contains("no answer after 2 attempt(s)"),
            "{}",
            text(output)
        );
        assert!(
            shown.contains(&format!(
                "`nfcpay-agent --dir {} pending --resend`",
                terminal.path().display()
            )),
            "{}",
            text(output)
        );
        let files = terminal.pending_files();
        assert_eq!(files.len(), 1, "{files:?}");
        assert!(files[0].to_str().unwrap().ends_with(suffix), "{files:?}");
        assert_eq!(
            std::fs::read(&files[0]).unwrap(),
            std::fs::read(saved).unwrap(),
            "the kept half is the sealed half"
        );
        assert_eq!(terminal.next_counter(), 2);
        kept.push(files[0].clone());
    }
    let (kept_a, kept_b) = (&kept[0], &kept[1]);
    let kept_a_bytes = std::fs::read(kept_a).unwrap();
    let txn = kept_a
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .strip_suffix("-A.half")
        .unwrap()
        .to_owned();

    // Listing: transaction, half, KSN; nothing is sent.
    let listing = payee.run(&["pending"]);
    assert!(listing.status.success(), "{}", text(&listing));
    let shown = stdout(&listing);
    assert!(
        shown.contains(&format!("pending: transaction {txn}  half A  KSN "))
            && shown.contains("(counter 1)")
            && shown.contains("pending --resend"),
        "{shown}"
    );

    // A corrupt file and the other terminal's half in the payee's pending directory.
    let pending_dir = payee.path().join("pending");
    std::fs::write(pending_dir.join("notes.txt"), "not a half").unwrap();
    let garbage = pending_dir.join(format!("{}-B.half", "AB".repeat(16)));
    std::fs::write(&garbage, b"\x01\x42 not an envelope").unwrap();
    let foreign = pending_dir.join(format!("{txn}-B.half"));
    std::fs::copy(kept_b, &foreign).unwrap();

    platform.restart().unwrap();
    let output = payee.run(&["pending", "--resend"]);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    let shown = stdout(&output);
    assert!(
        shown.contains(&format!(
            "re-sending half A of transaction {txn} under KSN "
        )) && shown.contains("byte-identical"),
        "{shown}"
    );
    assert!(shown.contains("  status:        pending"), "{shown}");
    assert!(shown.contains("answered (pending); forgotten"), "{shown}");
    assert_eq!(
        shown.matches("re-sending").count(),
        1,
        "only the payee's own half is sent: {shown}"
    );
    assert!(
        shown.contains(&format!(
            "unusable: {}: not a pending half (its name is not",
            pending_dir.join("notes.txt").display()
        )),
        "{shown}"
    );
    assert!(
        shown.contains(&format!(
            "unusable: {}: not a pending half (not a sealed half",
            garbage.display()
        )),
        "{shown}"
    );
    assert!(
        shown.contains(&format!(
            "unusable: {}: a half of terminal alice-phone, not of this terminal; it is not sent",
            foreign.display()
        )),
        "{shown}"
    );
    assert!(stderr(&output).contains("3 file(s)"), "{}", text(&output));
    assert!(!kept_a.exists(), "answered: forgotten");
    assert!(
        foreign.exists() && garbage.exists(),
        "unusable files are left alone"
    );

    // The payer's half B, sent again, settles the payment under its first KSN.
    let output = payer.run(&["pending", "--resend"]);
    assert!(output.status.success(), "{}", text(&output));
    let shown = stdout(&output);
    assert!(shown.contains("  status:        settled"), "{shown}");
    assert!(
        shown.contains("  for terminal:  alice-phone (KSN ") && shown.contains("00000001)"),
        "{shown}"
    );
    assert_eq!(payer.pending_files(), Vec::<PathBuf>::new());
    assert_eq!(platform.balance("alice").unwrap(), "87.50 EUR");
    assert_eq!(platform.balance("shop").unwrap(), "12.50 EUR");
    assert_eq!(payee.next_counter(), 2, "no new KSN for a re-send");
    assert_eq!(payer.next_counter(), 2, "no new KSN for a re-send");

    // The identical half A once more (as `resend`, the diagnostic, sends it): the same
    // payment, now settled; nothing moves.
    std::fs::write(saved.path().join("again"), &kept_a_bytes).unwrap();
    let output = payee.run(&["resend", saved.path().join("again").to_str().unwrap()]);
    assert!(output.status.success(), "{}", text(&output));
    assert!(stdout(&output).contains("  status:        settled"));
    assert_eq!(platform.balance("alice").unwrap(), "87.50 EUR");

    // The payee asks about its payment by transaction ID.
    let output = payee.run(&["status", "--txn", &txn]);
    assert!(output.status.success(), "{}", text(&output));
    let shown = stdout(&output);
    assert!(
        shown.contains("  status:        settled")
            && shown.contains(&format!("  transaction:   {txn}"))
            && shown.contains("  payer:         alice-phone (account alice)"),
        "{shown}"
    );

    // After the unusable files are moved away nothing is pending.
    for file in payee.pending_files() {
        std::fs::remove_file(file).unwrap();
    }
    let output = payee.run(&["pending", "--resend"]);
    assert!(output.status.success(), "{}", text(&output));
    assert!(
        stdout(&output).contains("no pending halves"),
        "{}",
        text(&output)
    );

    // A transaction the platform does not know, and one this terminal is no party to.
    let output = payee.run(&["status", "--txn", &"0F".repeat(16)]);
    assert_fails_saying(&output, "problem code: unknown-transaction");
    platform.account("bob", "EUR", None).unwrap();
    let stranger = enrolled(&platform, "bob-phone", "bob");
    let output = stranger.run(&["status", "--txn", &txn]);
    assert_fails_saying(&output, "problem code: not-a-party");
}

/// Issue 8 with the real agent: while the platform answers `503 unavailable` with
/// `Retry-After: 1` (its PostgreSQL frozen; the daemon's write and read timeouts 1 s), each
/// agent waits what the platform asked — 1 s, not its own first backoff of 250 ms — and sends
/// the same bytes again. PostgreSQL thaws once the daemon has counted a half answered 503 (a
/// signal, not a guess), and the payment settles once, with both receipts.
#[test]
fn agents_wait_the_platforms_retry_after_through_503s_and_settle_once_it_is_back() {
    let Some(cluster) = postgres::own_cluster() else {
        return;
    };
    let platform = PlatformFixture::start_with_database_settings(
        &Ledger::Postgres(cluster.url()),
        "write_timeout_ms = 1000\nread_timeout_ms = 1000",
    )
    .unwrap();
    platform.account("shop", "EUR", None).unwrap();
    platform.account("alice", "EUR", Some("100.00")).unwrap();
    let payee = enrolled(&platform, "shop-1", "shop");
    let payer = enrolled(&platform, "alice-phone", "alice");
    let emulator = Emulator::start(2);

    let frozen = cluster.freeze().expect("PostgreSQL frozen");
    let ops = platform.ops_address.clone();
    let thaw = std::thread::spawn(move || {
        // Thawed once a half was answered 503, or after 30 s whatever happened.
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline && !answered_unavailable(&ops) {
            std::thread::sleep(Duration::from_millis(50));
        }
        cluster.thaw(&frozen).expect("PostgreSQL thawed");
        cluster
    });
    let (payee_output, payer_output) = pay_concurrently(
        &payee,
        &request_args("12.50", &emulator.connstrings[0], &["--attempts", "10"]),
        &payer,
        &pay_args(&emulator.connstrings[1], &["--yes", "--attempts", "10"]),
    );
    let _cluster = thaw.join().unwrap();

    assert_settled_receipt(&payee_output, "12.50 EUR");
    assert_settled_receipt(&payer_output, "12.50 EUR");
    let retries: Vec<String> = [&payee_output, &payer_output]
        .into_iter()
        .flat_map(|output| {
            stderr(output)
                .lines()
                .filter(|line| line.contains("sending the same bytes again"))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect();
    println!("re-sends: {retries:#?}");
    assert!(
        retries
            .iter()
            .any(|line| line.contains("503") && line.contains("pause_ms=1000")),
        "no re-send after a 503 waited the platform's Retry-After: {retries:#?}\n{}\n{}",
        text(&payee_output),
        text(&payer_output)
    );
    assert_eq!(platform.balance("shop").unwrap(), "12.50 EUR");
    assert_eq!(platform.balance("alice").unwrap(), "87.50 EUR");
}

/// Whether the daemon behind `ops` has answered a half `503 unavailable`
/// (`nfcpayd_halves_total{…,outcome="unavailable"}` above zero).
fn answered_unavailable(ops: &str) -> bool {
    let Ok((200, metrics)) = http_get(ops, "/metrics") else {
        return false;
    };
    metrics.lines().any(|line| {
        line.starts_with("nfcpayd_halves_total{")
            && line.contains("outcome=\"unavailable\"")
            && line
                .rsplit(' ')
                .next()
                .and_then(|count| count.parse::<f64>().ok())
                .is_some_and(|count| count > 0.0)
    })
}
