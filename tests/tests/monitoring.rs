//! The monitoring shipped in `daemon/monitoring/`: the Prometheus alert rules pass `promtool
//! check rules` and their unit tests (`promtool test rules`), and every metric the rules and
//! the Grafana dashboard use is one a running `nfcpayd` exports, of the type the expression
//! assumes (scraped from a real daemon after a payment and a refusal).
//!
//! `promtool` comes with Debian's `prometheus` package, which `cargo xtask test` installs; on a
//! developer's machine without it the promtool checks are skipped (under `cargo xtask test` or
//! in CI they fail instead).

// A panic is how a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use nfcpay_protocol::messages::HalfKind;
use nfcpay_tests::{Ledger, PlatformFixture, postgres_required, workspace_root};

fn monitoring() -> PathBuf {
    workspace_root().join("daemon/monitoring")
}

/// `promtool` with `args` in `daemon/monitoring`; `None` when it is not installed and need
/// not be.
fn promtool(args: &[&str]) -> Option<std::process::Output> {
    match Command::new("promtool")
        .args(args)
        .current_dir(monitoring())
        .output()
    {
        Ok(output) => Some(output),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            // The same rule as the PostgreSQL tests: skipping is for a developer's machine.
            assert!(
                !postgres_required(),
                "promtool not found, but `cargo xtask test` or CI is running: install the \
                 Debian package prometheus"
            );
            eprintln!("promtool not found (Debian package prometheus): skipped");
            None
        }
        Err(error) => panic!("promtool: {error}"),
    }
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    for args in [
        &["check", "rules", "alerts.yml"][..],
        &["test", "rules", "alerts.test.yml"],
    ] {
        let Some(output) = promtool(args) else {
            return;
        };
        assert!(
            output.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// Every `nfcpayd_…` name in the rules and the dashboard's expressions.
fn names_used() -> BTreeSet<String> {
    let rules = std::fs::read_to_string(monitoring().join("alerts.yml")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(monitoring().join("dashboard.json")).unwrap(),
    )
    .unwrap();
    let mut texts = vec![rules];
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            texts.push(target["expr"].as_str().unwrap().to_owned());
        }
    }
    let mut names = BTreeSet::new();
    for text in &texts {
        let mut rest = text.as_str();
        while let Some(start) = rest.find("nfcpayd_") {
            let tail = &rest[start..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            names.insert(tail[..end].to_owned());
            rest = &tail[end..];
        }
    }
    names
}

/// The metric family a sample name belongs to, and the type its suffix implies.
fn family_of(name: &str) -> (&str, Option<&'static str>) {
    for (suffix, kind) in [
        ("_bucket", "histogram"),
        ("_count", "histogram"),
        ("_sum", "histogram"),
        ("_total", "counter"),
    ] {
        if let Some(family) = name.strip_suffix(suffix) {
            return (family, Some(kind));
        }
    }
    (name, None)
}

fn scrape(address: &str) -> String {
    let mut stream = TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    answer
}

#[tokio::test]
async fn every_metric_the_rules_and_dashboard_use_is_exported() {
    let names = names_used();
    assert!(names.len() >= 15, "{names:?}");

    let platform = PlatformFixture::start(&Ledger::Sqlite).unwrap();
    platform.account("shop", "EUR", None).unwrap();
    platform.account("alice", "EUR", Some("100.00")).unwrap();
    let mut payee = platform.enroll("shop-1", "shop").await.unwrap();
    let mut payer = platform.enroll("alice-phone", "alice").await.unwrap();
    let request = payee.request("1.00", "EUR", "metrics").unwrap();
    let (_, half_a) = payee.seal(HalfKind::A, &request).unwrap();
    payee
        .submit(HalfKind::A, half_a, Duration::ZERO)
        .await
        .unwrap();
    let instruction = payer.instruction(&request).unwrap();
    let (_, half_b) = payer.seal(HalfKind::B, &instruction).unwrap();
    let settled = payer
        .submit(HalfKind::B, half_b, Duration::ZERO)
        .await
        .unwrap();
    assert!(settled.settled, "{}", platform.daemon_log());
    // A refusal, so that the refusal counters have a series too.
    assert!(
        payee
            .submit(HalfKind::A, b"not a half".to_vec(), Duration::ZERO)
            .await
            .is_err()
    );

    let text = scrape(&platform.ops_address);
    let mut missing = Vec::new();
    for name in &names {
        let (family, implied) = family_of(name);
        let declared = text.lines().find_map(|line| {
            line.strip_prefix(&format!("# TYPE {family} "))
                .map(str::trim)
        });
        match (declared, implied) {
            (None, _) => missing.push(format!("{name}: no metric {family}")),
            (Some(kind), Some(implied)) if kind != implied => {
                missing.push(format!("{name}: {family} is a {kind}, not a {implied}"));
            }
            _ => {}
        }
    }
    assert!(missing.is_empty(), "{missing:#?}\n{text}");

    // The gauges the alerts read are set, not merely declared.
    for line in [
        r#"nfcpayd_component_ready{component="hsm"} 1"#,
        r#"nfcpayd_component_ready{component="database"} 1"#,
    ] {
        assert!(text.contains(line), "{line}\n{text}");
    }
    for certificate in ["server", "client_ca"] {
        let prefix = format!(
            r#"nfcpayd_certificate_expiry_timestamp_seconds{{certificate="{certificate}"}} "#
        );
        let value: i64 = text
            .lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("{prefix}\n{text}"))
            .parse()
            .unwrap();
        let now = i64::try_from(nfcpay_daemon::service::now_ms() / 1000).unwrap();
        assert!(
            value > now + 86_400,
            "{certificate} expires at {value}, now {now}"
        );
    }
    assert!(
        text.contains(r#"nfcpayd_refusals_total{route="half_a",code="malformed"} 1"#),
        "{text}"
    );
    // The database pool, read at the scrape.
    let gauge = |prefix: &str| -> i64 {
        text.lines()
            .find_map(|line| line.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("{prefix}\n{text}"))
            .trim()
            .parse()
            .unwrap()
    };
    let idle = gauge(r#"nfcpayd_database_connections{state="idle"} "#);
    let in_use = gauge(r#"nfcpayd_database_connections{state="in_use"} "#);
    let max = gauge("nfcpayd_database_connections_max ");
    assert!(max >= 1 && idle + in_use <= max, "{idle} {in_use} {max}");
}
