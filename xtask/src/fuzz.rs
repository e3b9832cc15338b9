//! `cargo xtask fuzz`: builds every cargo-fuzz target of the workspace (`protocol/fuzz`,
//! `keystore/fuzz`) and runs each for a fixed time; `cargo xtask test` runs it for
//! [`CI_SECONDS`] per target, so a target that no longer builds, or an input that panics
//! within those seconds, fails CI.
//!
//! Builds with the machine's one toolchain, not a nightly: libFuzzer's instrumentation and
//! AddressSanitizer are unstable flags (`-Z`), which `RUSTC_BOOTSTRAP=1` allows on a stable
//! compiler (CI machines have no other toolchain and cannot fetch one). Installs `cargo-fuzz`
//! with `cargo install` when missing. Corpora and the build live under `target/fuzz/`, never
//! in the source tree; a crashing input is kept in `target/fuzz/artifacts/<target>/` and named
//! in the failure.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::command;

/// Seconds each target runs in `cargo xtask test`.
pub const CI_SECONDS: u64 = 5;
/// The cargo-fuzz projects, relative to the workspace root.
const PROJECTS: [&str; 2] = ["protocol/fuzz", "keystore/fuzz"];
/// Lines of a failed run's report shown.
const FAILURE_LINES: usize = 60;
/// Memory a target may use before libFuzzer calls it a leak or a blow-up, MiB.
const RSS_LIMIT_MB: u32 = 2048;

/// Builds and runs every target for `seconds`.
pub fn run(root: &Path, seconds: u64) -> Result<()> {
    ensure_cargo_fuzz()?;
    let target_dir = root.join("target/fuzz");
    for project in PROJECTS {
        let dir = root.join(project);
        let list = command::stdout_of(fuzz_cargo(&dir).args(["fuzz", "list"]))?;
        let targets: Vec<&str> = list
            .lines()
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .collect();
        if targets.is_empty() {
            bail!("{project} lists no fuzz target");
        }
        command::run(
            fuzz_cargo(&dir)
                .args(["fuzz", "build", "--target-dir"])
                .arg(&target_dir),
        )?;
        for target in targets {
            let corpus = target_dir.join("corpus").join(target);
            let artifacts = target_dir.join("artifacts").join(target);
            for directory in [&corpus, &artifacts] {
                std::fs::create_dir_all(directory)
                    .with_context(|| format!("creating {}", directory.display()))?;
            }
            println!("fuzz: {project} {target} for {seconds} s");
            let output = command::capture(
                fuzz_cargo(&dir)
                    .args(["fuzz", "run", "--target-dir"])
                    .arg(&target_dir)
                    .arg(target)
                    .arg(&corpus)
                    .arg("--")
                    .arg(format!("-max_total_time={seconds}"))
                    .arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"))
                    .arg(format!("-artifact_prefix={}/", artifacts.display())),
            )?;
            // libFuzzer reports on stderr; on success only its last line ("Done N runs in
            // S second(s)") is worth showing.
            let report = String::from_utf8_lossy(&output.stderr);
            if !output.status.success() {
                let tail: Vec<&str> = report.lines().rev().take(FAILURE_LINES).collect();
                for line in tail.into_iter().rev() {
                    eprintln!("{line}");
                }
                bail!(
                    "fuzz target {target} of {project} failed ({}); the input is in {}",
                    output.status,
                    artifacts.display()
                );
            }
            let done = report
                .lines()
                .rev()
                .find(|line| line.starts_with("Done "))
                .unwrap_or("(no summary)");
            println!("fuzz: {target}: {done}");
        }
    }
    Ok(())
}

fn ensure_cargo_fuzz() -> Result<()> {
    if command::succeeds(Command::new("cargo-fuzz").arg("--version")) {
        return Ok(());
    }
    println!("fuzz: cargo-fuzz not found: installing it with cargo install");
    command::run(command::cargo().args(["install", "cargo-fuzz", "--locked"]))
}

/// `cargo` in `dir`, allowed the unstable flags that cargo-fuzz passes to rustc.
fn fuzz_cargo(dir: &Path) -> Command {
    let mut cargo = command::cargo();
    cargo.current_dir(dir).env("RUSTC_BOOTSTRAP", "1");
    cargo
}
