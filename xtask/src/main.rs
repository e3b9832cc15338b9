//! The project's task runner, run as `cargo xtask <task>` (an alias in `.cargo/config.toml`).
//!
//! # Layout
//!
//! - [`demo`]: `cargo xtask demo`, the key ceremony on a fresh SoftHSM2 token, then a payment
//!   between two terminals over emulated NFC through the real daemon ([`payment`]).
//! - [`test`]: `cargo xtask test`, the whole test suite as CI runs it.
//! - [`fuzz`]: `cargo xtask fuzz`, every cargo-fuzz target built and run for a while.
//! - [`package`]: `cargo xtask package`, the Debian package, checked by lintian.
//! - [`deploy`]: `cargo xtask deploy-check`, docs/operations.md's production walk-through run
//!   as root in private namespaces, with a `systemctl` stand-in.
//! - [`postgres`]: a throwaway PostgreSQL cluster for tests (`cargo xtask pg-check`).
//! - [`packages`]: installs the Debian packages a task needs.
//! - [`steps`]: named, timed steps that stop at the first failure.
//! - [`command`]: runs programs (never through a shell) and says what it runs.
#![forbid(unsafe_code)]

mod clock;
mod command;
mod demo;
mod deploy;
mod fuzz;
mod package;
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
    /// Run docs/operations.md's production walk-through (service user, token, ceremony,
    /// nfcpayd as the unit runs it, a BDK added live, payments, backup and restore) on SQLite
    /// and PostgreSQL, as root, in private mount and network namespaces.
    DeployCheck,
    /// Build the Debian package (target/package/nfcpay_<version>_<arch>.deb) from a release
    /// build; with --check, from the debug build, then lintian and systemd-analyze verify.
    Package {
        /// Use the debug binaries (as the tests do) and check the package.
        #[arg(long)]
        check: bool,
    },
    /// One walk-through, inside the namespaces `deploy-check` made (internal).
    #[command(hide = true)]
    DeployCheckInside {
        #[arg(long, value_enum)]
        database: deploy::Database,
    },
    /// deploy-check's stand-in for `systemctl` (internal).
    #[command(hide = true)]
    SystemctlShim {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        arguments: Vec<String>,
    },
}

fn main() -> Result<()> {
    let root = workspace_root();
    match Cli::parse().task {
        Task::Demo { dir, serve } => demo::run(&root, dir, serve),
        Task::Test => test::run(&root),
        Task::Fuzz { seconds } => fuzz::run(&root, seconds),
        Task::PgCheck => postgres::check(),
        Task::DeployCheck => deploy::run(&root),
        Task::Package { check: false } => package::build(&root, true).map(drop),
        Task::Package { check: true } => package::check(&root),
        Task::DeployCheckInside { database } => deploy::inside(&root, database),
        Task::SystemctlShim { arguments } => deploy::systemctl(&arguments),
    }
}

/// The workspace root: xtask lives in `<root>/xtask`.
fn workspace_root() -> PathBuf {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map_or_else(|| manifest_dir.clone(), PathBuf::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The members listed in the root Cargo.toml's `[workspace] members`.
    fn members(root_manifest: &str) -> Vec<String> {
        let list = root_manifest
            .split_once("members = [")
            .and_then(|(_, rest)| rest.split_once(']'))
            .map(|(list, _)| list)
            .expect("the root Cargo.toml lists its members");
        list.split(',')
            .map(|member| member.trim().trim_matches('"').to_owned())
            .filter(|member| !member.is_empty())
            .collect()
    }

    /// `[workspace.package] rust-version` only binds a member that inherits it: without
    /// `rust-version.workspace = true` cargo does not refuse an older toolchain and clippy's
    /// `incompatible_msrv` lint does not look at that crate.
    #[test]
    fn every_member_inherits_the_workspace_rust_version() {
        let root = workspace_root();
        let root_manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
        assert!(
            root_manifest.contains("\nrust-version = \""),
            "no workspace rust-version"
        );
        let members = members(&root_manifest);
        assert!(members.len() >= 7, "members: {members:?}");
        for member in members {
            let manifest = std::fs::read_to_string(root.join(&member).join("Cargo.toml")).unwrap();
            assert!(
                manifest
                    .lines()
                    .any(|line| line.trim() == "rust-version.workspace = true"),
                "{member}/Cargo.toml does not inherit rust-version"
            );
        }
    }

    /// Dependencies no code names, each with the reason it is there anyway.
    const USED_WITHOUT_A_PATH: &[(&str, &str)] = &[(
        "libsqlite3-sys",
        "daemon: its `bundled` feature, so that diesel links a SQLite built from source",
    )];

    /// The dependency names of every `[*dependencies]` table of a Cargo.toml.
    fn dependencies(manifest: &str) -> Vec<String> {
        let mut names = Vec::new();
        let mut in_table = false;
        for line in manifest.lines().map(str::trim) {
            if line.starts_with('[') {
                in_table = line.ends_with("dependencies]");
                continue;
            }
            if !in_table || line.is_empty() || line.starts_with('#') {
                continue;
            }
            let name = line
                .split(['=', '.'])
                .next()
                .map(str::trim)
                .unwrap_or_default();
            names.push(name.to_owned());
        }
        names
    }

    /// Every `.rs` file under `directory`, except other packages nested in it (a `Cargo.toml`
    /// of their own: terminal-agent/pn532-sim, the fuzz crates) and `target/`.
    fn sources(directory: &std::path::Path, top: bool, texts: &mut String) {
        if !top && directory.join("Cargo.toml").exists() || directory.ends_with("target") {
            return;
        }
        for entry in std::fs::read_dir(directory).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                sources(&path, false, texts);
            } else if path.extension().is_some_and(|extension| extension == "rs") {
                texts.push_str(&std::fs::read_to_string(&path).unwrap());
                texts.push('\n');
            }
        }
    }

    /// A dependency a crate lists but never names (`name::…`, `use name`) is a build cost and
    /// an audit surface for nothing: each one is either used, or listed above with its reason.
    #[test]
    fn every_dependency_is_used() {
        let root = workspace_root();
        let root_manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
        let mut unused = Vec::new();
        for member in members(&root_manifest) {
            let directory = root.join(&member);
            let manifest = std::fs::read_to_string(directory.join("Cargo.toml")).unwrap();
            let mut texts = String::new();
            sources(&directory, true, &mut texts);
            for name in dependencies(&manifest) {
                if USED_WITHOUT_A_PATH
                    .iter()
                    .any(|(allowed, _)| *allowed == name)
                {
                    continue;
                }
                let ident = name.replace('-', "_");
                let named = [
                    format!("{ident}::"),
                    format!("use {ident}"),
                    format!("extern crate {ident}"),
                ]
                .iter()
                .any(|pattern| texts.contains(pattern.as_str()));
                if !named {
                    unused.push(format!("{member}: {name}"));
                }
            }
        }
        assert!(unused.is_empty(), "listed but never used: {unused:#?}");
    }

    /// Every `[workspace.dependencies]` entry is one some member (or fuzz crate) inherits.
    #[test]
    fn every_workspace_dependency_is_inherited() {
        let root = workspace_root();
        let root_manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
        let table = root_manifest
            .split_once("[workspace.dependencies]")
            .and_then(|(_, rest)| rest.split("\n[").next())
            .expect("the root Cargo.toml has [workspace.dependencies]");
        let mut manifests = String::new();
        let fuzz = ["protocol/fuzz".to_owned(), "keystore/fuzz".to_owned()];
        for member in members(&root_manifest).iter().chain(&fuzz) {
            manifests
                .push_str(&std::fs::read_to_string(root.join(member).join("Cargo.toml")).unwrap());
        }
        let inherited: Vec<String> = dependencies(&manifests);
        let mut unused = Vec::new();
        for line in table.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let name = line.split([' ', '=']).next().unwrap_or_default();
            if !inherited.iter().any(|inherited| inherited == name) {
                unused.push(name.to_owned());
            }
        }
        assert!(unused.is_empty(), "no member uses: {unused:?}");
    }
}
