//! The project's task runner, run as `cargo xtask <task>` (an alias in `.cargo/config.toml`).
//!
//! # Layout
//!
//! - [`demo`]: `cargo xtask demo`, the key ceremony on a fresh SoftHSM2 token, then a payment
//!   between two terminals over emulated NFC through the real daemon ([`payment`]).
//! - [`test`]: `cargo xtask test`, the whole test suite as CI runs it.
//! - [`fuzz`]: `cargo xtask fuzz`, every cargo-fuzz target built and run for a while.
//! - [`postgres`]: a throwaway PostgreSQL cluster for tests (`cargo xtask pg-check`).
//! - [`packages`]: installs the Debian packages a task needs.
//! - [`steps`]: named, timed steps that stop at the first failure.
//! - [`command`]: runs programs (never through a shell) and says what it runs.
#![forbid(unsafe_code)]

mod clock;
mod command;
mod demo;
mod fuzz;
mod packages;
mod payment;
mod postgres;
mod random;
mod steps;
mod test;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// The nfcpay task runner.
#[derive(Parser)]
#[command(name = "cargo xtask", version, about)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// The whole system on this machine: key ceremony on a fresh SoftHSM2 token, the daemon,
    /// two enrolled terminals paying 12.50 EUR over emulated NFC, and a replayed half.
    Demo {
        /// Demo directory (default: target/demo/<UTC timestamp>); must be new or empty.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Keep the daemon and the emulator running afterwards (until Ctrl-C), to go on
        /// paying by hand with nfcpay-agent.
        #[arg(long)]
        serve: bool,
    },
    /// Run the whole test suite: packages, fmt, clippy, softhsm-setup, cargo tests, fuzzing.
    Test,
    /// Build every cargo-fuzz target (protocol/fuzz, keystore/fuzz) and run each for a while
    /// (with the stable toolchain and RUSTC_BOOTSTRAP=1; installs cargo-fuzz if missing).
    Fuzz {
        /// Seconds each target runs.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Start a throwaway PostgreSQL cluster, run `select 1` against it, stop it.
    PgCheck,
}

fn main() -> Result<()> {
    let root = workspace_root();
    match Cli::parse().task {
        Task::Demo { dir, serve } => demo::run(&root, dir, serve),
        Task::Test => test::run(&root),
        Task::Fuzz { seconds } => fuzz::run(&root, seconds),
        Task::PgCheck => postgres::check(),
    }
}

/// The workspace root: xtask lives in `<root>/xtask`.
fn workspace_root() -> PathBuf {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map_or_else(|| manifest_dir.clone(), PathBuf::from)
}
