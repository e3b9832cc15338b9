//! What an operator deploying `nfcpayd` meets: `nfcpayd --check-config` naming each failure
//! with the exit code start-up would use, start-up errors printed once with their cause, and a
//! SIGHUP that says which changed settings it cannot apply. The whole documented production
//! layout (service user, token ownership, the unit's environment) is run by
//! `cargo xtask deploy-check`.

// A panic is how a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use nfcpay_tests::{Ledger, PlatformFixture, SOFTHSM_MODULE, binary};

/// `nfcpayd --check-config` (or start-up itself, without `check`) on the fixture's
/// configuration, with the fixture's token and `environment` on top.
fn nfcpayd(platform: &PlatformFixture, check: bool, environment: &[(&str, &str)]) -> Output {
    let mut command = Command::new(binary("nfcpayd").unwrap());
    command
        .arg("--config")
        .arg(platform.config_path())
        .env("SOFTHSM2_CONF", platform.softhsm_conf())
        .env_remove("NOTIFY_SOCKET")
        .envs(environment.iter().copied());
    if check {
        command.arg("--check-config");
    }
    command.output().unwrap()
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn expect(output: &Output, code: i32, words: &[&str]) {
    let text = text(output);
    assert_eq!(output.status.code(), Some(code), "{text}");
    for word in words {
        assert!(text.contains(word), "{word:?} missing from:\n{text}");
    }
}

fn pin_uri(pin_file: &Path) -> String {
    format!(
        "pkcs11:token=nfcpay-e2e?module-path={SOFTHSM_MODULE}&pin-source=file:{}",
        pin_file.display()
    )
}

#[test]
fn check_config_checks_what_start_up_would_and_names_each_failure_with_its_exit_code() {
    let platform = PlatformFixture::start(&Ledger::Sqlite).unwrap();
    let pin = platform.dir().join("pin");
    std::fs::set_permissions(&pin, std::fs::Permissions::from_mode(0o600)).unwrap();

    let ok = nfcpayd(&platform, true, &[]);
    expect(
        &ok,
        0,
        &[
            "ok    keystore open, logged in",
            "ok    platform keys",
            "ok    database reachable",
            "ok    TLS",
            "configuration OK",
        ],
    );
    assert!(!text(&ok).contains("warn"), "{}", text(&ok));
    // `init` says what it did to the schema: nothing on the fixture's database, which is
    // already set up; everything on a fresh one.
    let init = platform.admin_ok(&["init"]).unwrap();
    assert!(
        init.contains("ledger schema: up to date (nothing to migrate)"),
        "{init}"
    );
    let fresh = tempfile::tempdir().unwrap();
    let fresh_url = format!("sqlite://{}", fresh.path().join("ledger.db").display());
    let output = Command::new(binary("nfcpay-admin").unwrap())
        .arg("--config")
        .arg(platform.config_path())
        .args(["--format", "json", "init"])
        .env("SOFTHSM2_CONF", platform.softhsm_conf())
        .env("NFCPAY_DATABASE__URL", &fresh_url)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", text(&output));
    let answer: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(answer["ledger_schema"], "created", "{answer}");
    assert!(
        answer["migrations_applied"].as_u64().unwrap() > 0,
        "{answer}"
    );

    // A PIN file its group or others can read is refused, naming the file and its mode (78),
    // before anyone logs in; nfcpay-admin refuses it too.
    for mode in [0o644, 0o640] {
        std::fs::set_permissions(&pin, std::fs::Permissions::from_mode(mode)).unwrap();
        let shown = format!("mode {mode:04o}");
        let pin_path = pin.display().to_string();
        let refused = nfcpayd(&platform, true, &[]);
        expect(
            &refused,
            78,
            &[&pin_path, &shown, "refused", "start-up would exit 78"],
        );
        let pin_text = std::fs::read_to_string(&pin).unwrap();
        assert!(
            !text(&refused).contains(pin_text.trim()),
            "{}",
            text(&refused)
        );
        let admin = platform.admin(&["bdk", "list"], "").unwrap();
        assert!(!admin.status.success());
        let admin_text = text(&admin);
        assert!(admin_text.contains(&shown), "{admin_text}");
        assert!(!admin_text.contains(pin_text.trim()), "{admin_text}");
    }
    std::fs::set_permissions(&pin, std::fs::Permissions::from_mode(0o600)).unwrap();

    // Configuration (64): a database URL scheme this build cannot open.
    expect(
        &nfcpayd(
            &platform,
            true,
            &[("NFCPAY_DATABASE__URL", "mysql://db/nfcpay")],
        ),
        64,
        &["unknown scheme", "start-up would exit 64"],
    );
    // Unusable files, keys, PIN (78).
    expect(
        &nfcpayd(
            &platform,
            true,
            &[(
                "NFCPAY_SERVER__CERTIFICATE_CHAIN",
                "/nonexistent/server.pem",
            )],
        ),
        78,
        &[
            "/nonexistent/server.pem",
            "No such file",
            "start-up would exit 78",
        ],
    );
    let missing_pin = platform.dir().join("no-such-pin");
    expect(
        &nfcpayd(
            &platform,
            true,
            &[("NFCPAY_KEYSTORE__URI", &pin_uri(&missing_pin))],
        ),
        78,
        &["no-such-pin", "No such file", "start-up would exit 78"],
    );
    // A PKCS#11 module that cannot be loaded: named, with the loader's words once.
    let module_uri = pin_uri(&pin).replace(SOFTHSM_MODULE, "/nonexistent/libnothing.so");
    let no_module = nfcpayd(&platform, true, &[("NFCPAY_KEYSTORE__URI", &module_uri)]);
    expect(
        &no_module,
        78,
        &[
            "cannot load PKCS#11 module /nonexistent/libnothing.so",
            "start-up would exit 78",
        ],
    );
    assert_eq!(
        text(&no_module).matches("No such file").count(),
        1,
        "{}",
        text(&no_module)
    );
    let wrong_pin = platform.dir().join("wrong-pin");
    std::fs::write(&wrong_pin, "0000000000").unwrap();
    std::fs::set_permissions(&wrong_pin, std::fs::Permissions::from_mode(0o600)).unwrap();
    expect(
        &nfcpayd(
            &platform,
            true,
            &[("NFCPAY_KEYSTORE__URI", &pin_uri(&wrong_pin))],
        ),
        78,
        &["PIN incorrect", "start-up would exit 78"],
    );
    expect(
        &nfcpayd(
            &platform,
            true,
            &[("NFCPAY_PLATFORM__ENROLLMENT_BDK_ID", "0BAD0BAD")],
        ),
        78,
        &["0BAD0BAD", "no such BDK", "start-up would exit 78"],
    );
    // Unavailable (69): no token where SOFTHSM2_CONF points, a database that refuses.
    let elsewhere = platform.dir().join("elsewhere.conf");
    std::fs::write(
        &elsewhere,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\n",
            platform.dir().join("empty-tokens").display()
        ),
    )
    .unwrap();
    std::fs::create_dir_all(platform.dir().join("empty-tokens")).unwrap();
    expect(
        &nfcpayd(
            &platform,
            true,
            &[("SOFTHSM2_CONF", elsewhere.to_str().unwrap())],
        ),
        69,
        &["nfcpay-e2e", "start-up would exit 69"],
    );
    let closed_port = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "postgres://nfcpay@127.0.0.1:{}/nfcpay?connect_timeout=2",
        closed_port.local_addr().unwrap().port()
    );
    drop(closed_port);
    expect(
        &nfcpayd(
            &platform,
            true,
            &[
                ("NFCPAY_DATABASE__URL", &url),
                ("NFCPAY_DATABASE__CONNECT_TIMEOUT_MS", "2000"),
            ],
        ),
        69,
        &["database", "Connection refused", "start-up would exit 69"],
    );
}

#[test]
fn start_up_errors_are_printed_once_with_their_cause() {
    let mut platform = PlatformFixture::start(&Ledger::Sqlite).unwrap();
    // The fixture's daemon holds its ports: a second one on the same configuration cannot
    // listen, and says why.
    let output = nfcpayd(&platform, false, &[]);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(71), "{stderr}");
    assert_eq!(stderr.matches("cannot listen on").count(), 1, "{stderr}");
    assert!(stderr.contains("Address already in use"), "{stderr}");
    platform.stop().unwrap();

    let closed_port = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "postgres://nfcpay@127.0.0.1:{}/nfcpay",
        closed_port.local_addr().unwrap().port()
    );
    drop(closed_port);
    let output = nfcpayd(
        &platform,
        false,
        &[
            ("NFCPAY_DATABASE__URL", &url),
            ("NFCPAY_DATABASE__CONNECT_TIMEOUT_MS", "2000"),
        ],
    );
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(69), "{stderr}");
    assert_eq!(stderr.matches("Connection refused").count(), 1, "{stderr}");
    assert_eq!(stderr.matches(" ERROR ").count(), 1, "{stderr}");

    // A configuration file that cannot be read says why, not "not found".
    let output = Command::new(binary("nfcpayd").unwrap())
        .args(["--config", "/nonexistent/nfcpay.toml"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("cannot read the file: No such file"),
        "{stderr}"
    );
}

/// A SQLite ledger file that is not a database (garbage written over it while the daemon was
/// stopped): `nfcpayd` exits with `EX_UNAVAILABLE` (69) and prints SQLite's own cause once.
#[test]
fn a_sqlite_file_that_is_not_a_database_exits_69_with_sqlites_cause() {
    let mut platform = PlatformFixture::start(&Ledger::Sqlite).unwrap();
    platform.stop().unwrap();
    let ledger = platform.dir().join("ledger.db");
    for journal in ["ledger.db-wal", "ledger.db-shm"] {
        let _ = std::fs::remove_file(platform.dir().join(journal));
    }
    let garbage: Vec<u8> = b"this is no SQLite file\n"
        .iter()
        .copied()
        .cycle()
        .take(8192)
        .collect();
    std::fs::write(&ledger, garbage).unwrap();

    let started = Instant::now();
    let output = nfcpayd(&platform, false, &[]);
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    println!(
        "SQLite file not a database: exit {:?} after {took:.2?}; stderr:\n{stderr}",
        output.status.code()
    );
    assert_eq!(output.status.code(), Some(69), "{stderr}");
    assert_eq!(
        stderr.matches("file is not a database").count(),
        1,
        "{stderr}"
    );
    assert_eq!(stderr.matches(" ERROR ").count(), 1, "{stderr}");
}

#[test]
fn a_wrong_command_line_exits_64_like_a_wrong_configuration_and_help_exits_0() {
    let nfcpayd = |args: &[&str]| {
        Command::new(binary("nfcpayd").unwrap())
            .args(args)
            .env_remove("NFCPAY_CONFIG")
            .output()
            .unwrap()
    };
    // 64 is in the unit's RestartPreventExitStatus=; clap's own 2 is not, so a bad option in
    // a drop-in would have systemd restart the daemon in a loop.
    expect(&nfcpayd(&["--no-such-option"]), 64, &["--no-such-option"]);
    expect(&nfcpayd(&["--as-user", "nobody"]), 64, &["--check-config"]);
    expect(&nfcpayd(&["--log-format", "xml"]), 64, &["xml"]);
    let help = nfcpayd(&["--help"]);
    expect(
        &help,
        0,
        &["Exit codes: 64", "70 the ledger writer stopped"],
    );
    let unit = std::fs::read_to_string(
        nfcpay_tests::workspace_root().join("daemon/systemd/nfcpayd.service"),
    )
    .unwrap();
    assert!(
        unit.lines()
            .any(|line| line.starts_with("RestartPreventExitStatus=")
                && line.split(['=', ' ']).any(|code| code == "64")),
        "{unit}"
    );
}

#[test]
fn as_root_check_config_checks_as_the_service_user_or_says_how() {
    let uid = Command::new("id").arg("-u").output().unwrap();
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        eprintln!("not root: --as-user needs root; CI runs this as root");
        return;
    }
    let platform = PlatformFixture::start(&Ledger::Sqlite).unwrap();
    // Without allow_root, root is told how to check.
    let config = tempfile::tempdir().unwrap();
    std::fs::set_permissions(config.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let file = config.path().join("nfcpay.toml");
    let text = std::fs::read_to_string(platform.config_path())
        .unwrap()
        .replace("allow_root = true", "");
    std::fs::write(&file, text).unwrap();
    let output = Command::new(binary("nfcpayd").unwrap())
        .arg("--config")
        .arg(&file)
        .arg("--check-config")
        .output()
        .unwrap();
    expect(&output, 64, &["root", "--as-user nfcpay"]);
    // As another user, a root-only configuration is "Permission denied", not "not found".
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let output = Command::new(binary("nfcpayd").unwrap())
        .arg("--config")
        .arg(&file)
        .args(["--check-config", "--as-user", "nobody"])
        .output()
        .unwrap();
    expect(
        &output,
        64,
        &[
            "cannot read the file: Permission denied",
            "start-up would exit 64",
        ],
    );
}

#[test]
fn sighup_names_the_changed_settings_it_does_not_apply() {
    let platform = PlatformFixture::start(&Ledger::Sqlite).unwrap();
    let config = std::fs::read_to_string(platform.config_path()).unwrap();
    let changed = config.replace(
        "terminal_requests_per_second = 100000",
        "terminal_requests_per_second = 7",
    );
    assert_ne!(config, changed, "the fixture's configuration changed shape");
    std::fs::write(platform.config_path(), changed).unwrap();
    let pid = platform.daemon_pids()[0].to_string();
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = platform.daemon_log();
        if log.contains("TLS certificates reloaded") || log.contains("reload failed") {
            assert!(
                log.contains("setting=[server] terminal_requests_per_second"),
                "{log}"
            );
            assert!(log.contains("restart nfcpayd to use it"), "{log}");
            assert_eq!(
                log.matches("SIGHUP: this setting changed").count(),
                1,
                "{log}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "no reload in the log:\n{log}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
