//! The terminal listener as an outsider sees it, with the real `openssl s_client` against the
//! real `nfcpayd` (docs/protocol.md §6): over TLS 1.2, without a client certificate, and with
//! a certificate from a CA the platform does not know, a request for a transaction's status
//! gets no HTTP answer at all — the handshake fails first. The positive control: the same
//! `openssl` command, without a certificate, does get an HTTP answer from the enrollment
//! listener, so the request really is sent and an answer really would be seen.

// A panic is how a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nfcpay_tests::{Ledger, PlatformFixture, http_get};

/// A status request for a transaction nobody made; a terminal would get `404` for it.
const STATUS_REQUEST: &str =
    "GET /v1/transactions/00000000000000000000000000000001 HTTP/1.1\r\nHost: x\r\n\r\n";
/// A route that exists on the enrollment listener, with the wrong method: `405`.
const ENROLL_GET_REQUEST: &str = "GET /v1/enroll HTTP/1.1\r\nHost: x\r\n\r\n";
/// Longest one `openssl s_client` run may take; the daemon closes every connection sooner.
const OPENSSL_TIMEOUT: Duration = Duration::from_secs(20);

/// Runs `openssl` with `args`, fails the test if it does not succeed; for making keys.
fn openssl_ok(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl (apt-get install openssl)");
    assert!(
        output.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A CA the platform never heard of, and a client certificate it issued for `shop-1` (the
/// terminal ID a real terminal might have): `stranger-client.pem` and `stranger-client.key`.
fn make_stranger_certificate(dir: &Path) {
    // No configuration file's default extensions: exactly those given here.
    std::fs::write(
        dir.join("minimal.cnf"),
        "[req]\ndistinguished_name = dn\nprompt = no\n[dn]\n",
    )
    .unwrap();
    let p256 = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let mut ca = vec!["req", "-config", "minimal.cnf", "-x509", "-days", "1"];
    ca.extend(p256);
    ca.extend([
        "-keyout",
        "stranger-ca.key",
        "-out",
        "stranger-ca.pem",
        "-subj",
        "/CN=stranger CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign",
    ]);
    openssl_ok(dir, &ca);
    let mut client = vec!["req", "-config", "minimal.cnf", "-x509", "-days", "1"];
    client.extend(p256);
    client.extend([
        "-keyout",
        "stranger-client.key",
        "-out",
        "stranger-client.pem",
        "-subj",
        "/CN=shop-1",
        "-CA",
        "stranger-ca.pem",
        "-CAkey",
        "stranger-ca.key",
        "-addext",
        "basicConstraints=critical,CA:FALSE",
        "-addext",
        "extendedKeyUsage=clientAuth",
    ]);
    openssl_ok(dir, &client);
}

/// Runs `openssl s_client` against `address` with `extra` arguments, writes `request` once
/// connected, and returns everything it printed once the server has closed the connection.
fn s_client(dir: &Path, address: &str, extra: &[&str], request: &str) -> String {
    let mut child = Command::new("openssl")
        .current_dir(dir)
        .args(["s_client", "-connect", address, "-servername", "localhost"])
        .args(["-CAfile", "platform-ca.pem", "-ign_eof"])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl s_client");
    // `-ign_eof`: the end of the request does not close the connection; the server does.
    child
        .stdin
        .take()
        .unwrap()
        .write_all(request.as_bytes())
        .unwrap();
    let deadline = Instant::now() + OPENSSL_TIMEOUT;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("openssl s_client {extra:?} still connected after {OPENSSL_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut printed = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut printed)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut printed)
        .unwrap();
    printed
}

/// The daemon's count of failed TLS handshakes, from its operations listener.
fn handshake_failures(platform: &PlatformFixture) -> u64 {
    let (status, metrics) = http_get(&platform.ops_address, "/metrics").unwrap();
    assert_eq!(status, 200);
    metrics
        .lines()
        .find_map(|line| line.strip_prefix("nfcpayd_tls_handshake_failures_total "))
        .map_or(0, |value| value.trim().parse().unwrap())
}

#[test]
fn openssl_gets_no_http_answer_from_the_terminal_listener_without_a_valid_certificate() {
    let platform = PlatformFixture::start(&Ledger::Sqlite).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("platform-ca.pem"),
        platform.ca_pem().unwrap(),
    )
    .unwrap();
    make_stranger_certificate(dir.path());
    let stranger = [
        "-cert",
        "stranger-client.pem",
        "-key",
        "stranger-client.key",
    ];

    // The positive control: no certificate, the enrollment listener, an HTTP answer.
    let printed = s_client(
        dir.path(),
        &platform.enroll_address,
        &["-tls1_3"],
        ENROLL_GET_REQUEST,
    );
    assert!(printed.contains("HTTP/1.1 405 "), "{printed}");
    assert!(printed.contains("method-not-allowed"), "{printed}");
    assert!(printed.contains("Verify return code: 0 (ok)"), "{printed}");
    // It asked for no client certificate.
    assert!(
        !printed.contains("Acceptable client certificate CA names"),
        "{printed}"
    );

    let failures_before = handshake_failures(&platform);
    // Each with the alert the daemon sends instead of an answer, as openssl prints it.
    let cases: [(&str, &[&str], &str); 3] = [
        ("TLS 1.2", &["-tls1_2"], "alert protocol version"),
        (
            "no client certificate",
            &["-tls1_3"],
            "tlsv13 alert certificate required",
        ),
        (
            "a certificate from an unknown CA",
            &stranger,
            "alert unknown ca",
        ),
    ];
    for (case, extra, alert) in cases {
        let printed = s_client(dir.path(), &platform.address, extra, STATUS_REQUEST);
        assert!(
            !printed.contains("HTTP/1.1"),
            "{case}: an HTTP answer from the terminal listener\n{printed}"
        );
        assert!(printed.contains(alert), "{case}: no `{alert}`\n{printed}");
        if case != "TLS 1.2" {
            // TLS 1.3 was reached: the server proved itself and asked for a certificate
            // before refusing the one it got, or its absence.
            assert!(
                printed.contains("Verify return code: 0 (ok)"),
                "{case}\n{printed}"
            );
            assert!(
                printed.contains("Acceptable client certificate CA names"),
                "{case}\n{printed}"
            );
        }
    }
    // TLS 1.2 is refused on the enrollment listener too; a stranger's certificate is not,
    // since none is asked for there (the control above).
    let printed = s_client(
        dir.path(),
        &platform.enroll_address,
        &["-tls1_2"],
        ENROLL_GET_REQUEST,
    );
    assert!(!printed.contains("HTTP/1.1"), "{printed}");
    assert!(printed.contains("alert protocol version"), "{printed}");
    // The connection closes as the daemon counts the failure: give it a moment.
    let deadline = Instant::now() + OPENSSL_TIMEOUT;
    while handshake_failures(&platform) < failures_before + 4 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        handshake_failures(&platform),
        failures_before + 4,
        "each refusal is a failed handshake\n{}",
        platform.daemon_log()
    );
    // Each refusal on the terminal listener is logged once at info, with the peer and
    // rustls's reason; the one on the enrollment listener (open to scanners) is not.
    let log = platform.daemon_log();
    let refusals: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("TLS handshake refused"))
        .collect();
    assert_eq!(refusals.len(), 3, "{log}");
    for line in &refusals {
        assert!(line.contains(" INFO "), "{line}");
        assert!(line.contains("peer=127.0.0.1:"), "{line}");
        assert!(line.contains("listener=\"terminals\""), "{line}");
        assert!(line.contains("reason="), "{line}");
    }
    assert!(
        refusals
            .iter()
            .any(|line| line.contains("peer sent no certificates")),
        "{log}"
    );
}

/// One address over its share of the terminal listener (1 here): the connection beyond it is
/// closed at accept, before any TLS, and the refusal is logged once at info with the peer and
/// the reason.
#[test]
fn a_connection_over_its_address_share_is_closed_and_logged_once() {
    let platform = PlatformFixture::start_with_settings(
        &Ledger::Sqlite,
        "",
        "connections_per_address_max = 1\n",
    )
    .unwrap();
    let _share = std::net::TcpStream::connect(&platform.address).unwrap();
    let mut over = std::net::TcpStream::connect(&platform.address).unwrap();
    over.set_read_timeout(Some(OPENSSL_TIMEOUT)).unwrap();
    let mut read = [0u8; 1];
    // Closed without a byte (EOF, or a reset if the kernel saw it first).
    assert!(matches!(over.read(&mut read), Ok(0) | Err(_)));
    let refused = |log: &str| {
        log.lines()
            .filter(|line| line.contains("connection refused"))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let deadline = Instant::now() + OPENSSL_TIMEOUT;
    while refused(&platform.daemon_log()).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = platform.daemon_log();
    let lines = refused(&log);
    assert_eq!(lines.len(), 1, "{log}");
    let line = &lines[0];
    assert!(line.contains(" INFO "), "{line}");
    assert!(line.contains("listener=\"terminals\""), "{line}");
    assert!(line.contains("peer=127.0.0.1:"), "{line}");
    assert!(
        line.contains("its address has its share of the listener open"),
        "{line}"
    );
}
