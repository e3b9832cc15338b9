//! `cargo xtask deploy-check`: the production walk-through of docs/operations.md, executed.
//!
//! The documentation's shell blocks tagged ` ```sh deploy-check ` (and `deploy-check-postgres`,
//! `deploy-check-rotate` in key-management.md, `deploy-check-backup-<database>`) are extracted
//! in document order and run, as root, with `bash -euo pipefail`: so a command changed in the
//! doc changes what CI runs, and a command that no longer works fails CI. Between them this
//! harness does what a terminal installer does: adds terminals, enrolls them with
//! `nfcpay-agent` and settles payments over the PN532 emulator.
//!
//! Each database (SQLite, then PostgreSQL) gets a fresh run in private mount and network
//! namespaces (`unshare --mount --net`): a copy of `/etc` (so `useradd` and the PostgreSQL
//! configuration touch only the copy), empty `/var/lib`, `/run`, `/var/log`, `/var/backups`,
//! and a loopback of its own (the documented ports 8443, 8444, 9443, 5432 are free there).
//! Nothing of the machine changes. PostgreSQL is a Debian cluster made by `pg_createcluster`,
//! as on a production host.
//!
//! systemd need not be running (CI runs in a container): a `systemctl` stand-in
//! ([`systemctl`]) starts `nfcpayd` as the unit says: `User=`, `Group=`, `Environment=`,
//! `UMask=`, `StateDirectory=`, `ConfigurationDirectory=`, `LoadCredential=` copied into
//! `$CREDENTIALS_DIRECTORY`, and `Type=notify` readiness through `$NOTIFY_SOCKET`.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::payment::{self, Binaries, Emulator};
use crate::steps::Steps;
use crate::{command, packages};

/// The databases the walk-through runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Database {
    Sqlite,
    Postgres,
}

impl Database {
    fn name(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgres",
        }
    }
}

/// Where the stand-in keeps the service's pid, log and notify socket (in the private `/run`).
const SHIM_DIR: &str = "/run/nfcpay-deploy-check";
/// The unit under test, as the walk-through installs it.
const UNIT: &str = "nfcpayd";
/// What the walk-through's `init --server-name` names, and what the terminals check.
const SERVER_NAME: &str = "pay.example.com";
/// The documented listeners (sample configuration), reachable in the private network.
const TERMINAL_ADDRESS: &str = "127.0.0.1:8443";
const ENROLL_ADDRESS: &str = "127.0.0.1:8444";
const CA_FILE: &str = "/var/lib/nfcpay/pki/ca.pem";
/// The BDK the rotation block of key-management.md adds while the daemon runs.
const ROTATED_BDK_ID: &str = "0BDC0002";
/// How long one walk-through may take (it takes seconds; this only bounds a hang).
const RUN_TIMEOUT: Duration = Duration::from_secs(150);
/// The highest overall exposure `systemd-analyze security` may give the shipped unit, in
/// tenths (its `--threshold`): 2.0. The unit scores 1.4; the stand-in does not apply the
/// sandboxing, so this is what keeps it from eroding.
const UNIT_EXPOSURE_MAX_TENTHS: u32 = 20;
/// The file systems made private and empty for a run.
const PRIVATE_DIRECTORIES: [&str; 4] = ["/var/lib", "/run", "/var/log", "/var/backups"];

/// Runs the walk-through on SQLite, then on PostgreSQL, each in fresh namespaces.
pub fn run(root: &Path) -> Result<()> {
    if !packages::is_root() {
        bail!(
            "deploy-check runs the documented production set-up as root (useradd, chown, \
             runuser) in private namespaces: run it as root (CI does)"
        );
    }
    let mut steps = Steps::new("deploy-check");
    steps.run("system packages", || {
        packages::ensure(packages::FOR_DEPLOY_CHECK)
    })?;
    steps.run(
        "the unit's sandboxing (systemd-analyze security, offline)",
        || check_sandboxing(&root.join("daemon/systemd/nfcpayd.service")),
    )?;
    let binaries = Binaries::new(root);
    for name in [
        "nfcpayd",
        "nfcpay-admin",
        "nfcpay-agent",
        "nfcpay-pn532-sim",
    ] {
        if !binaries.path(name).is_file() {
            steps.run("cargo build --workspace --bins", || {
                command::run(command::cargo().current_dir(root).args([
                    "build",
                    "--workspace",
                    "--bins",
                ]))
            })?;
            break;
        }
    }
    let xtask = own_copy(root)?;
    let outcome = walk_throughs(root, &xtask, &mut steps);
    // Best effort: the copy is only a file under target/.
    let _ = fs::remove_file(&xtask);
    outcome?;
    steps.finish();
    Ok(())
}

/// The systemctl stand-in runs the unit's `ExecStart=` without its sandboxing settings
/// (`ProtectSystem=`, `SystemCallFilter=`, …): `systemd-analyze security --offline` reads them
/// from the file and scores the exposure they leave, which must stay at most
/// [`UNIT_EXPOSURE_MAX_TENTHS`].
fn check_sandboxing(unit: &Path) -> Result<()> {
    command::run(
        Command::new("systemd-analyze")
            .args([
                "security",
                "--offline=true",
                "--no-pager",
                &format!("--threshold={UNIT_EXPOSURE_MAX_TENTHS}"),
            ])
            .arg(unit),
    )
    .with_context(|| {
        format!(
            "{}: its sandboxing scores above an exposure of {}.{} (a setting removed?)",
            unit.display(),
            UNIT_EXPOSURE_MAX_TENTHS / 10,
            UNIT_EXPOSURE_MAX_TENTHS % 10
        )
    })
}

/// A copy of this executable under `target/` that later builds cannot replace: `cargo xtask
/// test` builds the workspace (which re-links `target/debug/xtask`) while this program runs,
/// and the namespaced walk-through and its `systemctl` stand-in run this program again.
fn own_copy(root: &Path) -> Result<PathBuf> {
    let dir = root.join("target/deploy-check");
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let copy = dir.join(format!("xtask-{}", std::process::id()));
    // /proc/self/exe is this program even when its file has been replaced since it started.
    fs::copy("/proc/self/exe", &copy).context("cannot copy the xtask executable")?;
    fs::set_permissions(&copy, fs::Permissions::from_mode(0o755))?;
    Ok(copy)
}

/// The walk-through on each database, each in its own namespaces.
fn walk_throughs(root: &Path, xtask: &Path, steps: &mut Steps) -> Result<()> {
    for database in [Database::Sqlite, Database::Postgres] {
        steps.run(
            &format!("the production walk-through on {}", database.name()),
            || {
                let mut child = Command::new("unshare")
                    .args(["--mount", "--net", "--propagation", "private", "--"])
                    .arg(xtask)
                    .args(["deploy-check-inside", "--database", database.name()])
                    .current_dir(root)
                    .spawn()
                    .context("cannot run unshare")?;
                let deadline = Instant::now() + RUN_TIMEOUT;
                loop {
                    if let Some(status) = child.try_wait()? {
                        if status.success() {
                            return Ok(());
                        }
                        bail!("the walk-through failed ({status})");
                    }
                    if Instant::now() > deadline {
                        child.kill()?;
                        child.wait()?;
                        bail!("the walk-through took over {RUN_TIMEOUT:?}: killed");
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            },
        )?;
    }
    Ok(())
}

/// One walk-through, inside the namespaces `run` made.
pub fn inside(root: &Path, database: Database) -> Result<()> {
    let work = tempfile::Builder::new()
        .prefix("nfcpay-deploy-check.")
        .tempdir()
        .context("cannot make a work directory")?;
    privatise(work.path())?;
    let binaries = Binaries::new(root);
    let bin = Path::new(SHIM_DIR).join("bin");
    fs::create_dir_all(&bin)?;
    write_shim(&bin)?;
    let path = format!(
        "{}:{}:{}",
        bin.display(),
        binaries.path("").display(),
        std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into())
    );
    let mut run = Run {
        root: root.to_path_buf(),
        work: Path::new(SHIM_DIR).to_path_buf(),
        binaries,
        path,
        exports: BTreeMap::new(),
        postgres: None,
        emulator: None,
    };
    let mut steps = Steps::new(database.name());
    if database == Database::Postgres {
        steps.run("a Debian PostgreSQL cluster (pg_createcluster)", || {
            run.start_postgres()
        })?;
    }
    let operations = fs::read_to_string(root.join("docs/operations.md"))?;
    let key_management = fs::read_to_string(root.join("docs/key-management.md"))?;
    let mut install_tags = vec!["deploy-check"];
    if database == Database::Postgres {
        install_tags.push("deploy-check-postgres");
    }
    let install = blocks(&operations, &install_tags);
    run.exports = exports(&install);
    steps.run(
        "operations.md §2–§5: install, token, ceremony, start",
        || run.script(&install),
    )?;
    steps.run(
        "root's nfcpay-admin is refused in the service's directory",
        || run.expect_refused_as_root(),
    )?;
    run.emulator = Some(steps.run("PN532 emulator with two readers", || {
        payment::start_emulator(&run.binaries, &run.work.join("pn532-sim.log"))
    })?);
    steps.run(
        "enroll shop-1 and alice-phone (nfcpay-agent enroll)",
        || {
            run.add_and_enroll("shop-1", "shop", None, true)?;
            run.add_and_enroll("alice-phone", "alice", None, true)
        },
    )?;
    steps.run("alice pays shop-1 12.50 EUR over NFC", || {
        run.pay("shop-1", "alice-phone")?;
        run.expect_balance("alice", "87.50 EUR")
    })?;
    steps.run("key-management.md: a BDK added while nfcpayd runs", || {
        run.script(&blocks(&key_management, &["deploy-check-rotate"]))
    })?;
    steps.run("enroll shop-2 under the new BDK and pay it", || {
        // No restart: the running daemon finds the new BDK in the HSM by itself.
        // Without --account: the platform's enrollment answer names it.
        run.add_and_enroll("shop-2", "shop", Some(ROTATED_BDK_ID), false)?;
        run.pay("shop-2", "alice-phone")?;
        run.expect_balance("alice", "75.00 EUR")
    })?;
    let backup_tag = format!("deploy-check-backup-{}", database.name());
    steps.run("operations.md §10: back up and restore the ledger", || {
        run.script(&blocks(&operations, &[&backup_tag]))?;
        run.expect_balance("alice", "75.00 EUR")
    })?;
    steps.run("systemctl stop nfcpayd", || run.systemctl(&["stop", UNIT]))?;
    steps.finish();
    Ok(())
}

/// Makes this mount namespace's `/etc` a copy and the [`PRIVATE_DIRECTORIES`] empty, and
/// brings up its loopback.
fn privatise(work: &Path) -> Result<()> {
    command::run(Command::new("ip").args(["link", "set", "lo", "up"]))?;
    let etc = work.join("etc");
    command::run(Command::new("cp").args(["-a", "/etc"]).arg(&etc))?;
    command::run(Command::new("mount").arg("--bind").arg(&etc).arg("/etc"))?;
    for directory in PRIVATE_DIRECTORIES {
        if Path::new(directory).is_dir() {
            command::run(Command::new("mount").args([
                "-t",
                "tmpfs",
                "-o",
                "mode=0755",
                "tmpfs",
                directory,
            ]))?;
        }
    }
    Ok(())
}

/// `SHIM_DIR/bin/systemctl`: runs this program's [`systemctl`].
fn write_shim(bin: &Path) -> Result<()> {
    let xtask = std::env::current_exe()?;
    let path = bin.join("systemctl");
    fs::write(
        &path,
        format!(
            "#!/bin/sh\n# deploy-check's stand-in for systemctl (no systemd here).\nexec '{}' systemctl-shim \"$@\"\n",
            xtask.display()
        ),
    )?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// The code blocks of `markdown` whose fence is ` ```sh TAG ` for one of `tags`, in order,
/// each without the indentation of its fence.
pub fn blocks(markdown: &str, tags: &[&str]) -> Vec<String> {
    let mut found = Vec::new();
    let mut lines = markdown.lines();
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start();
        let Some(info) = trimmed.strip_prefix("```sh ") else {
            continue;
        };
        if !tags.contains(&info.trim()) {
            continue;
        }
        let indent = line.len() - trimmed.len();
        let mut block = String::new();
        for line in lines.by_ref() {
            if line.trim() == "```" {
                break;
            }
            block.push_str(line.get(indent..).unwrap_or(line.trim_start()));
            block.push('\n');
        }
        found.push(block);
    }
    found
}

/// The `export NAME=VALUE` lines of `blocks` (a single-quoted value unquoted), for the later
/// steps and blocks, which run in other shells.
pub fn exports(blocks: &[String]) -> BTreeMap<String, String> {
    blocks
        .iter()
        .flat_map(|block| block.lines())
        .filter_map(|line| line.trim().strip_prefix("export "))
        .filter_map(|assignment| assignment.split_once('='))
        .map(|(name, value)| {
            let value = value
                .strip_prefix('\'')
                .and_then(|value| value.strip_suffix('\''))
                .unwrap_or(value);
            (name.to_owned(), value.to_owned())
        })
        .collect()
}

/// One walk-through's state.
struct Run {
    root: PathBuf,
    work: PathBuf,
    binaries: Binaries,
    path: String,
    exports: BTreeMap<String, String>,
    postgres: Option<String>,
    emulator: Option<Emulator>,
}

impl Run {
    /// A command with the walk-through's `PATH` and the doc's exports.
    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new(program);
        command
            .env("PATH", &self.path)
            .envs(&self.exports)
            .current_dir(&self.root);
        command
    }

    /// Runs the blocks as one bash script (printed first; `set -x` would print PINs).
    fn script(&self, blocks: &[String]) -> Result<()> {
        if blocks.is_empty() {
            bail!("no such block in the documentation: has its tag changed?");
        }
        let exports: String = self
            .exports
            .iter()
            .map(|(name, value)| format!("export {name}='{value}'\n"))
            .collect();
        let script: String = blocks.concat();
        for line in script.lines() {
            println!("  doc$ {line}");
        }
        command::run(
            self.command("bash")
                .args(["-euo", "pipefail", "-c"])
                .arg(exports + &script),
        )
    }

    fn systemctl(&self, arguments: &[&str]) -> Result<()> {
        command::run(self.command("systemctl").args(arguments))
    }

    /// `runuser -u nfcpay -- nfcpay-admin ARGS`, as the doc runs it; its stdout.
    fn admin(&self, arguments: &[&str]) -> Result<String> {
        let mut admin = self.command("runuser");
        admin
            .args(["-u", "nfcpay", "--", "nfcpay-admin"])
            .args(arguments);
        let output = command::capture(&mut admin)?;
        if !output.status.success() {
            bail!(
                "nfcpay-admin {} failed ({}): {}",
                arguments.join(" "),
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    fn start_postgres(&mut self) -> Result<()> {
        let version = fs::read_dir("/usr/lib/postgresql")?
            .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
            .filter_map(|name| name.parse::<u32>().ok())
            .max()
            .context("no PostgreSQL in /usr/lib/postgresql")?
            .to_string();
        // The copy of /etc may name the machine's own cluster, whose data is not here.
        let _ = fs::remove_dir_all(format!("/etc/postgresql/{version}/main"));
        command::run(
            self.command("pg_createcluster")
                .args([&version, "main", "--start"]),
        )?;
        self.postgres = Some(version);
        Ok(())
    }

    fn expect_refused_as_root(&self) -> Result<()> {
        let output = command::capture(self.command("nfcpay-admin").args(["bdk", "list"]))?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        if output.status.code() != Some(64) || !stderr.contains("runuser -u nfcpay") {
            bail!("root's `nfcpay-admin bdk list` was not refused with advice: {output:?}");
        }
        println!("refused as it should be: {}", stderr.trim());
        let output = command::capture(self.command("nfcpayd").arg("--check-config"))?;
        if output.status.code() != Some(64) {
            bail!("`nfcpayd --check-config` as root without --as-user: {output:?}");
        }
        Ok(())
    }

    /// `terminals add` (the code into a 0600 file, never shown), then `nfcpay-agent enroll`
    /// (with `--account`, checked against the platform's, when `give_account`).
    fn add_and_enroll(
        &self,
        terminal: &str,
        account: &str,
        bdk_id: Option<&str>,
        give_account: bool,
    ) -> Result<()> {
        let mut arguments = vec!["terminals", "add", "--id", terminal, "--account", account];
        if let Some(bdk_id) = bdk_id {
            arguments.extend(["--bdk-id", bdk_id]);
        }
        let code = payment::enrollment_code(&self.admin(&arguments)?)?;
        let code_file = self.work.join(format!("{terminal}.code"));
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&code_file)?
            .write_all(code.as_bytes())?;
        let ca = CA_FILE.to_owned();
        let code_path = code_file.display().to_string();
        let mut arguments = vec![
            "enroll",
            "--platform",
            TERMINAL_ADDRESS,
            "--enroll-address",
            ENROLL_ADDRESS,
            "--server-name",
            SERVER_NAME,
            "--ca",
            &ca,
            "--terminal-id",
            terminal,
            "--code-file",
            &code_path,
        ];
        if give_account {
            arguments.extend(["--account", account]);
        }
        let mut enroll = payment::agent(&self.binaries, &self.terminal_dir(terminal), &arguments);
        let output = payment::run_agent(terminal, &mut enroll)?;
        fs::remove_file(&code_file)?;
        if !output.status.success() {
            bail!("nfcpay-agent enroll {terminal} failed");
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        if payment::field(&stdout, "account:") != Some(account) {
            bail!("{terminal} was not enrolled for account {account}:\n{stdout}");
        }
        Ok(())
    }

    fn terminal_dir(&self, terminal: &str) -> PathBuf {
        self.work.join("terminals").join(terminal)
    }

    /// The payee requests 12.50 EUR on reader 0, the payer consents on reader 1.
    fn pay(&self, payee: &str, payer: &str) -> Result<()> {
        let readers = &self
            .emulator
            .as_ref()
            .context("the emulator is not running")?
            .connstrings;
        let mut pay = payment::agent(
            &self.binaries,
            &self.terminal_dir(payer),
            &["pay", "--yes", "--device", &readers[1]],
        );
        let mut request = payment::agent(
            &self.binaries,
            &self.terminal_dir(payee),
            &[
                "request",
                "--amount",
                payment::AMOUNT,
                "--currency",
                payment::CURRENCY,
                "--device",
                &readers[0],
            ],
        );
        let payer_child = pay.spawn().context("could not start the payer agent")?;
        let payee_child = request.spawn().context("could not start the payee agent")?;
        let payee_output = payee_child.wait_with_output()?;
        let payer_output = payer_child.wait_with_output()?;
        for (name, output) in [(payee, &payee_output), (payer, &payer_output)] {
            payment::show(name, output);
            let text = String::from_utf8_lossy(&output.stdout);
            if !output.status.success() || payment::field(&text, "status:") != Some("settled") {
                bail!("{name} did not print a settled receipt");
            }
        }
        Ok(())
    }

    fn expect_balance(&self, account: &str, expected: &str) -> Result<()> {
        let balance = payment::balance(&self.admin(&["accounts", "show", "--id", account])?)?;
        if balance != expected {
            bail!("{account}: balance {balance}, expected {expected}");
        }
        println!("{account}: {balance}");
        Ok(())
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        // Stops only what this run started: the service by its pid file, the emulator by its
        // child handle, the cluster by pg_ctlcluster.
        if let Err(error) = stop_unit(UNIT) {
            eprintln!("stopping {UNIT}: {error:#}");
        }
        if let Some(mut emulator) = self.emulator.take()
            && let Err(error) = emulator.service.stop()
        {
            eprintln!("stopping the emulator: {error:#}");
        }
        if let Some(version) = &self.postgres
            && let Err(error) = command::run(
                Command::new("pg_ctlcluster").args([version, "main", "stop", "-m", "fast"]),
            )
        {
            eprintln!("stopping PostgreSQL: {error:#}");
        }
    }
}

/// The `[Service]` settings the stand-in honours, from the installed unit file.
#[derive(Debug, Default)]
pub struct Unit {
    exec_start: Vec<String>,
    user: String,
    group: Option<String>,
    environment: Vec<(String, String)>,
    credentials: Vec<(String, PathBuf)>,
    state_directory: Option<(String, u32)>,
    configuration_directory: Option<(String, u32)>,
    umask: Option<u32>,
    start_timeout: Duration,
    stop_timeout: Duration,
}

impl Unit {
    /// Parses the `[Service]` section; refuses settings the stand-in cannot honour, so that
    /// a unit using them is not "checked" without them.
    pub fn parse(text: &str) -> Result<Self> {
        let mut unit = Self {
            start_timeout: Duration::from_secs(90),
            stop_timeout: Duration::from_secs(90),
            ..Self::default()
        };
        let mut section = "";
        let (mut state_mode, mut configuration_mode) = (0o755, 0o755);
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if line.starts_with('[') {
                section = line;
                continue;
            }
            if section != "[Service]" {
                continue;
            }
            let (key, value) = line
                .split_once('=')
                .with_context(|| format!("not a setting: {line}"))?;
            let octal = || u32::from_str_radix(value, 8).context("not an octal mode");
            let seconds = || -> Result<Duration> {
                Ok(Duration::from_secs(value.parse().context("not seconds")?))
            };
            match key {
                "ExecStart" => {
                    unit.exec_start = value.split_whitespace().map(str::to_owned).collect()
                }
                "User" => unit.user = value.to_owned(),
                "Group" => unit.group = Some(value.to_owned()),
                "Environment" => {
                    let (name, value) = value
                        .split_once('=')
                        .context("Environment= needs NAME=VALUE")?;
                    unit.environment.push((name.to_owned(), value.to_owned()));
                }
                "LoadCredential" => {
                    let (id, path) = value.split_once(':').context("LoadCredential=ID:PATH")?;
                    unit.credentials.push((id.to_owned(), PathBuf::from(path)));
                }
                "StateDirectory" => unit.state_directory = Some((value.to_owned(), 0)),
                "StateDirectoryMode" => state_mode = octal()?,
                "ConfigurationDirectory" => {
                    unit.configuration_directory = Some((value.to_owned(), 0));
                }
                "ConfigurationDirectoryMode" => configuration_mode = octal()?,
                "UMask" => unit.umask = Some(octal()?),
                "TimeoutStartSec" => unit.start_timeout = seconds()?,
                "TimeoutStopSec" => unit.stop_timeout = seconds()?,
                "Type" if value != "notify" => bail!("Type={value}: the stand-in knows notify"),
                "SupplementaryGroups"
                | "DynamicUser"
                | "RuntimeDirectory"
                | "ExecStartPre"
                | "EnvironmentFile"
                | "LoadCredentialEncrypted" => {
                    bail!("{key}= is not honoured by deploy-check's systemctl stand-in: add it")
                }
                _ => {}
            }
        }
        if let Some((_, mode)) = &mut unit.state_directory {
            *mode = state_mode;
        }
        if let Some((_, mode)) = &mut unit.configuration_directory {
            *mode = configuration_mode;
        }
        if unit.exec_start.is_empty() || unit.user.is_empty() {
            bail!("the unit has no ExecStart= or no User=");
        }
        Ok(unit)
    }
}

/// deploy-check's `systemctl`: `daemon-reload`, `enable [--now]`, `start`, `stop`,
/// `restart`, `is-active` of one unit.
pub fn systemctl(arguments: &[String]) -> Result<()> {
    let arguments: Vec<&str> = arguments.iter().map(String::as_str).collect();
    match arguments.as_slice() {
        ["daemon-reload"] => Ok(()),
        ["enable", unit] => unit_name(unit).map(drop),
        ["enable", "--now", unit] | ["start", unit] => start_unit(unit_name(unit)?),
        ["stop", unit] => stop_unit(unit_name(unit)?),
        ["restart", unit] => {
            let unit = unit_name(unit)?;
            stop_unit(unit)?;
            start_unit(unit)
        }
        ["is-active", unit] => {
            if running_pid(unit_name(unit)?)?.is_some() {
                println!("active");
                Ok(())
            } else {
                println!("inactive");
                bail!("inactive")
            }
        }
        _ => bail!("deploy-check's systemctl stand-in cannot do: systemctl {arguments:?}"),
    }
}

fn unit_name(unit: &str) -> Result<&str> {
    let name = unit.strip_suffix(".service").unwrap_or(unit);
    if name != UNIT {
        bail!("deploy-check's systemctl knows only {UNIT}.service");
    }
    Ok(name)
}

fn pid_file(unit: &str) -> PathBuf {
    Path::new(SHIM_DIR).join(format!("{unit}.pid"))
}

fn log_file(unit: &str) -> PathBuf {
    Path::new(SHIM_DIR).join(format!("{unit}.log"))
}

/// The pid of the running service, if it runs (a zombie has stopped).
fn running_pid(unit: &str) -> Result<Option<i32>> {
    let Ok(text) = fs::read_to_string(pid_file(unit)) else {
        return Ok(None);
    };
    let pid: i32 = text.trim().parse().context("a bad pid file")?;
    let alive = fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit_once(") ")
                .map(|(_, rest)| !rest.starts_with('Z'))
        })
        .unwrap_or(false);
    Ok(alive.then_some(pid))
}

fn id_of(arguments: &[&str]) -> Result<u32> {
    let text = command::stdout_of(Command::new("id").args(arguments))?;
    text.trim().parse().context("id printed no number")
}

fn start_unit(unit: &str) -> Result<()> {
    if running_pid(unit)?.is_some() {
        return Ok(());
    }
    let unit_path = format!("/etc/systemd/system/{unit}.service");
    let service =
        Unit::parse(&fs::read_to_string(&unit_path).with_context(|| format!("no {unit_path}"))?)?;
    let uid = id_of(&["-u", &service.user])?;
    let gid = match &service.group {
        Some(group) => {
            let entry = command::stdout_of(Command::new("getent").args(["group", group]))?;
            entry
                .split(':')
                .nth(2)
                .and_then(|gid| gid.trim().parse().ok())
                .context("getent group printed no gid")?
        }
        None => id_of(&["-g", &service.user])?,
    };
    fs::create_dir_all(SHIM_DIR)?;
    // StateDirectory=: made if missing, given to the user (recursively, as systemd does when
    // the owner differs), its mode set. ConfigurationDirectory=: made root-owned.
    if let Some((name, mode)) = &service.state_directory {
        let path = Path::new("/var/lib").join(name);
        fs::create_dir_all(&path)?;
        command::run(
            Command::new("chown")
                .arg("-R")
                .arg(format!("{uid}:{gid}"))
                .arg(&path),
        )?;
        fs::set_permissions(&path, fs::Permissions::from_mode(*mode))?;
    }
    if let Some((name, mode)) = &service.configuration_directory {
        let path = Path::new("/etc").join(name);
        if !path.exists() {
            fs::create_dir_all(&path)?;
            fs::set_permissions(&path, fs::Permissions::from_mode(*mode))?;
        }
    }
    // LoadCredential=: copied, readable by the service only.
    let credentials = Path::new("/run/credentials").join(format!("{unit}.service"));
    let _ = fs::remove_dir_all(&credentials);
    fs::create_dir_all(&credentials)?;
    for (id, source) in &service.credentials {
        let target = credentials.join(id);
        fs::copy(source, &target)
            .with_context(|| format!("LoadCredential={id}:{}", source.display()))?;
        fs::set_permissions(&target, fs::Permissions::from_mode(0o400))?;
        std::os::unix::fs::chown(&target, Some(uid), Some(gid))?;
    }
    fs::set_permissions(&credentials, fs::Permissions::from_mode(0o500))?;
    std::os::unix::fs::chown(&credentials, Some(uid), Some(gid))?;
    let notify_path = Path::new(SHIM_DIR).join(format!("{unit}.notify"));
    let _ = fs::remove_file(&notify_path);
    let notify = UnixDatagram::bind(&notify_path)?;
    fs::set_permissions(&notify_path, fs::Permissions::from_mode(0o777))?;
    notify.set_read_timeout(Some(Duration::from_millis(100)))?;
    let mut program = PathBuf::from(&service.exec_start[0]);
    if !program.is_file() {
        let name = program.file_name().context("ExecStart= names no program")?;
        program = command::find_in_path(&name.to_string_lossy())
            .with_context(|| format!("{} is not installed nor on PATH", program.display()))?;
        println!(
            "(ExecStart={}: using {})",
            service.exec_start[0],
            program.display()
        );
    }
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_file(unit))?;
    let mut command = Command::new(&program);
    command
        .args(&service.exec_start[1..])
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .envs(
            service
                .environment
                .iter()
                .map(|(name, value)| (name, value)),
        )
        .env("CREDENTIALS_DIRECTORY", &credentials)
        .env("NOTIFY_SOCKET", &notify_path)
        .uid(uid)
        .gid(gid)
        .current_dir("/")
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let umask = service
        .umask
        .map(|mask| rustix::process::umask(rustix::fs::Mode::from_bits_truncate(mask)));
    let spawned = command.spawn();
    if let Some(previous) = umask {
        rustix::process::umask(previous);
    }
    let mut child = spawned.with_context(|| format!("cannot start {}", program.display()))?;
    fs::write(pid_file(unit), child.id().to_string())?;
    let deadline = Instant::now() + service.start_timeout;
    let mut buffer = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(length) = notify.recv(&mut buffer)
            && String::from_utf8_lossy(&buffer[..length])
                .lines()
                .any(|line| line == "READY=1")
        {
            println!("{unit}.service: started (READY=1, pid {})", child.id());
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            let _ = fs::remove_file(pid_file(unit));
            bail!(
                "{unit}.service failed to start ({status}); its log:\n{}",
                fs::read_to_string(log_file(unit)).unwrap_or_default()
            );
        }
    }
    bail!(
        "{unit}.service sent no READY=1 within {:?}",
        service.start_timeout
    )
}

fn stop_unit(unit: &str) -> Result<()> {
    let Some(pid) = running_pid(unit)? else {
        let _ = fs::remove_file(pid_file(unit));
        return Ok(());
    };
    let unit_path = format!("/etc/systemd/system/{unit}.service");
    let timeout = fs::read_to_string(&unit_path)
        .ok()
        .and_then(|text| Unit::parse(&text).ok())
        .map_or(Duration::from_secs(90), |unit| unit.stop_timeout);
    let process = rustix::process::Pid::from_raw(pid).context("a bad pid")?;
    rustix::process::kill_process(process, rustix::process::Signal::TERM)?;
    let deadline = Instant::now() + timeout;
    while running_pid(unit)?.is_some() {
        if Instant::now() > deadline {
            rustix::process::kill_process(process, rustix::process::Signal::KILL)?;
            bail!("{unit}.service did not stop within {timeout:?} of SIGTERM: killed");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    fs::remove_file(pid_file(unit))?;
    println!("{unit}.service: stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tagged_blocks_are_extracted_in_order_without_their_indentation() {
        let markdown = "text\n```sh\nnot tagged\n```\n1. step\n   ```sh deploy-check\n   \
                        id -u nfcpay\n     indented more\n   ```\n```sh other\nno\n```\n\
                        ```sh deploy-check-postgres\npsql\n```\n";
        assert_eq!(
            blocks(markdown, &["deploy-check"]),
            ["id -u nfcpay\n  indented more\n"]
        );
        assert_eq!(
            blocks(markdown, &["deploy-check", "deploy-check-postgres"]),
            ["id -u nfcpay\n  indented more\n", "psql\n"]
        );
        assert!(blocks(markdown, &["deploy"]).is_empty());
    }

    #[test]
    fn exports_are_read_and_unquoted() {
        let exports = exports(&["export A=/x\n  export B='p?q&r'\nexport_not=1\n".to_owned()]);
        assert_eq!(exports.get("A").map(String::as_str), Some("/x"));
        assert_eq!(exports.get("B").map(String::as_str), Some("p?q&r"));
        assert_eq!(exports.len(), 2);
    }

    #[test]
    fn the_shipped_units_sandboxing_passes_and_a_weakened_copy_fails() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let shipped = root.join("daemon/systemd/nfcpayd.service");
        check_sandboxing(&shipped).expect("the shipped unit's sandboxing");

        let dir = tempfile::tempdir().unwrap();
        let weakened = dir.path().join("nfcpayd.service");
        let text = fs::read_to_string(&shipped).unwrap();
        let kept: Vec<&str> = text
            .lines()
            .filter(|line| {
                ![
                    "SystemCallFilter=",
                    "ProtectSystem=",
                    "PrivateUsers=",
                    "MemoryDeny",
                ]
                .iter()
                .any(|setting| line.starts_with(setting))
            })
            .collect();
        fs::write(&weakened, kept.join("\n")).unwrap();
        let error = check_sandboxing(&weakened).unwrap_err();
        assert!(format!("{error:#}").contains("exposure"), "{error:#}");
    }

    #[test]
    fn the_shipped_unit_parses_and_the_stand_in_refuses_what_it_cannot_honour() {
        let text = include_str!("../../daemon/systemd/nfcpayd.service");
        let unit = Unit::parse(text).expect("the shipped unit parses");
        assert_eq!(unit.user, "nfcpay");
        assert_eq!(unit.exec_start[0], "/usr/bin/nfcpayd");
        assert!(
            unit.environment
                .iter()
                .any(|(name, _)| name == "SOFTHSM2_CONF")
        );
        assert_eq!(unit.credentials[0].0, "hsm-pin");
        assert_eq!(unit.state_directory, Some(("nfcpay".to_owned(), 0o700)));
        assert_eq!(unit.umask, Some(0o077));
        let with_groups = format!("{text}\n[Service]\nSupplementaryGroups=softhsm\n");
        assert!(Unit::parse(&with_groups).is_err());
    }

    #[test]
    fn the_docs_hold_every_tagged_block_the_check_runs() {
        let operations = include_str!("../../docs/operations.md");
        let key_management = include_str!("../../docs/key-management.md");
        for tag in [
            "deploy-check",
            "deploy-check-postgres",
            "deploy-check-backup-sqlite",
            "deploy-check-backup-postgres",
        ] {
            assert!(!blocks(operations, &[tag]).is_empty(), "{tag}");
        }
        assert!(!blocks(key_management, &["deploy-check-rotate"]).is_empty());
        let install = blocks(operations, &["deploy-check"]);
        assert!(exports(&install).contains_key("SOFTHSM2_CONF"));
    }
}
