//! Two daemons on one PostgreSQL: the load generator pays for a few seconds with the two
//! terminals of every pair on different daemons, so half A and half B of each payment meet
//! only in the database, and its ledger check must find every settled receipt booked exactly
//! once, postings summing to zero, and the audit chain intact.
//!
//! Needs `NFCPAY_TEST_DATABASE_URL` (`cargo xtask test` sets it). Without it the test is
//! skipped with a note — unless `CI` or `NFCPAY_REQUIRE_POSTGRES` is set, where it fails: a
//! test that passes when its database is missing proves nothing.

use std::process::Command;

use nfcpay_tests::binary;

#[test]
fn two_daemons_on_one_postgresql_settle_every_payment_exactly_once() {
    let Some(url) = nfcpay_daemon::testing::postgres_url("the two-daemon exactly-once run") else {
        return;
    };
    // Cargo builds the package's binaries for its integration tests; the loadgen finds
    // nfcpayd and nfcpay-admin beside itself.
    let loadgen = binary("nfcpay-loadgen").expect("nfcpay-loadgen is built");
    let output = Command::new(loadgen)
        .args(["--postgres-url", &url])
        .args(["--daemons", "2", "--terminals", "8", "--seconds", "3"])
        .args(["--terminal-state", "memory", "--no-hsm-probe", "--json"])
        .output()
        .expect("nfcpay-loadgen runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "nfcpay-loadgen failed ({}):\n{stderr}\n{stdout}",
        output.status
    );
    let report: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|error| panic!("not one JSON object ({error}):\n{stdout}"));
    let field = |name: &str| &report[name];
    assert_eq!(field("daemons"), 2, "{report}");
    assert_eq!(field("ledger"), "postgresql", "{report}");
    assert_eq!(field("exactly_once"), true, "{report}\n{stderr}");
    assert_eq!(field("postings_balanced"), true, "{report}\n{stderr}");
    assert_eq!(field("audit_ok"), true, "{report}\n{stderr}");
    assert_eq!(field("failed"), 0, "{report}\n{stderr}");
    let settled = field("settled").as_u64().expect("settled is a count");
    assert!(settled > 0, "nothing settled: {report}\n{stderr}");
    assert_eq!(
        field("ledger_settlements").as_u64(),
        Some(settled),
        "{report}"
    );
}
