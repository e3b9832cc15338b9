//! `cargo xtask test`: the whole test suite, exactly as CI (`.ci/run`) runs it.

use std::path::Path;
use std::process::Command;

use anyhow::Result;

use crate::postgres::{self, DATABASE_URL_VARIABLE, REQUIRE_VARIABLE};
use crate::steps::Steps;
use crate::{command, deploy, fuzz, package, packages};

/// Runs every step in order and stops at the first failure.
pub fn run(root: &Path) -> Result<()> {
    let mut steps = Steps::new("test");
    steps.run("system packages", || packages::ensure(packages::FOR_TEST))?;
    steps.run("free disk space for the builds", || {
        disk_space(root);
        Ok(())
    })?;
    steps.run("cargo fmt --check", || {
        command::run(cargo_in(root).args(["fmt", "--all", "--", "--check"]))
    })?;
    steps.run("cargo clippy", || {
        command::run(cargo_in(root).args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))
    })?;
    steps.run("softhsm-setup/test-init-token", || {
        command::run(
            Command::new("bash")
                .arg(root.join("softhsm-setup/test-init-token"))
                .current_dir(root),
        )
    })?;
    // The end-to-end tests run the binaries of other packages (nfcpayd, nfcpay-admin,
    // nfcpay-agent, nfcpay-pn532-sim), which only this builds for sure.
    steps.run("cargo build --workspace --bins", || {
        command::run(cargo_in(root).args(["build", "--workspace", "--bins"]))
    })?;
    steps.run("cargo tests (with a throwaway PostgreSQL)", || {
        postgres::with_postgres(|cluster| cargo_tests(root, &cluster.url()))
    })?;
    steps.run("PKCS#11 through p11-kit's proxy module", || {
        through_p11_kit_proxy(root)
    })?;
    // The production walk-through of docs/operations.md, on the binaries built above.
    steps.run("cargo xtask deploy-check", || deploy::run(root))?;
    steps.run(
        "cargo xtask package --check (lintian, systemd-analyze)",
        || package::check(root),
    )?;
    steps.run("fuzz targets, a few seconds each", || {
        fuzz::run(root, fuzz::CI_SECONDS)
    })?;
    steps.finish();
    Ok(())
}

/// About what a run from a clean clone writes under `target/` (7.9 GiB measured on 2026-12-03:
/// the debug build and tests, the release build, the fuzz targets' builds and corpora), with a
/// margin.
const DISK_NEEDED_GIB: u64 = 10;

/// Says how much space is free where the builds go, and warns when it is less than a clean
/// run needs: a build that fills the disk fails much later and less clearly ("No space left on
/// device" from a linker). Only a warning: an existing `target/` needs less.
fn disk_space(root: &Path) {
    let target = root.join("target");
    let place = if target.exists() { &target } else { root };
    match rustix::fs::statvfs(place) {
        Ok(stats) => {
            let free_gib = stats.f_bavail.saturating_mul(stats.f_frsize) >> 30;
            println!("{free_gib} GiB free under {}", place.display());
            if free_gib < DISK_NEEDED_GIB {
                println!(
                    "warning: a run from a clean clone writes about {DISK_NEEDED_GIB} GiB under \
                     {}; with {free_gib} GiB free the builds may fail with \
                     \"No space left on device\" (free space, or `cargo clean` old checkouts)",
                    target.display()
                );
            }
        }
        Err(error) => println!(
            "could not read the free space under {}: {error}",
            place.display()
        ),
    }
}

/// The workspace's tests, with the database URL in their environment. nextest runs the
/// unit and integration tests when it is installed (it does not run doctests).
fn cargo_tests(root: &Path, database_url: &str) -> Result<()> {
    let with_database = |command: &mut Command| -> Result<()> {
        command
            .env(DATABASE_URL_VARIABLE, database_url)
            .env(REQUIRE_VARIABLE, "1");
        command::run(command)
    };
    if has_nextest(root) {
        with_database(cargo_in(root).args(["nextest", "run", "--workspace"]))?;
        with_database(cargo_in(root).args(["test", "--doc", "--workspace"]))
    } else {
        println!("cargo-nextest not found: using cargo test");
        with_database(cargo_in(root).args(["test", "--workspace"]))
    }
}

/// p11-kit's proxy module (Debian's `p11-kit-modules`): the standard way to reach the system's
/// configured tokens, and a PKCS#11 module that is not SoftHSM2 itself.
const P11_KIT_PROXY: &str = "/usr/lib/x86_64-linux-gnu/p11-kit-proxy.so";
/// Read by the keystore's conformance suite and the end-to-end fixture.
const PKCS11_MODULE_VARIABLE: &str = "NFCPAY_TEST_PKCS11_MODULE";

/// The keystore conformance suite and one end-to-end payment again, through p11-kit's proxy
/// (which loads SoftHSM2 through its registration in `/usr/share/p11-kit/modules/`).
fn through_p11_kit_proxy(root: &Path) -> Result<()> {
    let through_proxy = |args: &[&str]| {
        command::run(
            cargo_in(root)
                .args(args)
                .env(PKCS11_MODULE_VARIABLE, P11_KIT_PROXY),
        )
    };
    // One check at a time: the suite opens several keystores in one process, and through the
    // proxy, checks run side by side once failed C_GenerateKeyPair with CKR_GENERAL_ERROR (a
    // keystore that re-opens the module ends the other keystores' sessions with it).
    through_proxy(&[
        "test",
        "-p",
        "nfcpay-keystore",
        "--test",
        "conformance",
        "--",
        "--test-threads=1",
    ])?;
    through_proxy(&[
        "test",
        "-p",
        "nfcpay-tests",
        "--test",
        "platform",
        "sqlite_a_payment_settles_and_balances_move",
    ])
}

fn has_nextest(root: &Path) -> bool {
    command::succeeds(cargo_in(root).args(["nextest", "--version"]))
}

fn cargo_in(root: &Path) -> Command {
    let mut cargo = command::cargo();
    cargo.current_dir(root);
    cargo
}
