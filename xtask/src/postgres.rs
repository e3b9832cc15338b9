//! A throwaway local PostgreSQL cluster for tests.
//!
//! [`with_postgres`] makes a temporary directory, runs `initdb` in it, starts the server
//! with `pg_ctl` on a socket directory inside it and a free port on 127.0.0.1, creates a
//! role and a database, runs the given work with [`Cluster::url`] at hand and stops the
//! server and removes the directory afterwards, also when the work fails. As root the
//! server runs as the `postgres` user (PostgreSQL refuses to run as root), through
//! `runuser`; otherwise as the current user.
//!
//! Local (socket) connections are trusted, but the socket directory is private to the
//! server's user; TCP connections need the role's random password (SCRAM).

use std::fs::OpenOptions;
use std::io::Write as _;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use tempfile::TempDir;

use crate::{command, packages, random};

/// The environment variable through which the tests get the database URL.
pub const DATABASE_URL_VARIABLE: &str = "NFCPAY_TEST_DATABASE_URL";
/// Set to `1` for the tests `cargo xtask test` runs: a PostgreSQL test that finds no
/// database then fails instead of skipping.
pub const REQUIRE_VARIABLE: &str = "NFCPAY_REQUIRE_POSTGRES";
/// Overrides the directory holding `initdb`, `pg_ctl` and `psql`.
pub const BIN_DIR_VARIABLE: &str = "NFCPAY_POSTGRES_BIN_DIR";

const SERVER_USER: &str = "postgres";
const SUPERUSER: &str = "postgres";
const TEST_ROLE: &str = "nfcpay_test";
const TEST_DATABASE: &str = "nfcpay_test";
const HOST: Ipv4Addr = Ipv4Addr::LOCALHOST;
const PASSWORD_BYTES: usize = 16;
const START_TIMEOUT_SECONDS: &str = "60";

/// Starts a cluster, runs `work` with it, stops it (whether `work` failed or not).
pub fn with_postgres<T>(work: impl FnOnce(&Cluster) -> Result<T>) -> Result<T> {
    let cluster = Cluster::start()?;
    let result = work(&cluster);
    let stopped = cluster.stop();
    let value = result?;
    stopped?;
    println!("postgres: cluster stopped and removed");
    Ok(value)
}

/// `cargo xtask pg-check`: start a cluster, `select 1` over TCP as the test role, stop.
pub fn check() -> Result<()> {
    with_postgres(|cluster| {
        let answer = command::stdout_of(&mut cluster.psql_as_test_role("select 1"))?;
        if answer.trim() != "1" {
            bail!("`select 1` answered {answer:?}");
        }
        println!(
            "pg-check: `select 1` answered 1 at {}",
            cluster.url_without_password()
        );
        Ok(())
    })
}

/// A running throwaway cluster; dropping it stops the server and removes its files.
pub struct Cluster {
    directory: TempDir,
    bin_dir: PathBuf,
    as_server_user: bool,
    port: u16,
    password: String,
    running: bool,
}

impl Cluster {
    /// Creates, starts and prepares a new cluster.
    pub fn start() -> Result<Self> {
        let bin_dir = bin_dir()?;
        let directory = tempfile::Builder::new()
            .prefix("nfcpay-postgres-")
            .tempdir()
            .context("could not make a temporary directory")?;
        let mut cluster = Self {
            directory,
            bin_dir,
            as_server_user: packages::is_root(),
            port: free_port()?,
            password: random::hex(PASSWORD_BYTES)?,
            running: false,
        };
        println!(
            "postgres: starting a throwaway cluster in {} on {HOST}:{}",
            cluster.directory.path().display(),
            cluster.port
        );
        cluster.hand_directory_to_server_user()?;
        cluster.init_database_directory()?;
        cluster.configure()?;
        cluster.start_server()?;
        cluster.create_role_and_database()?;
        Ok(cluster)
    }

    /// `postgresql://ROLE:PASSWORD@127.0.0.1:PORT/DATABASE`, for the tests.
    pub fn url(&self) -> String {
        format!(
            "postgresql://{TEST_ROLE}:{}@{HOST}:{}/{TEST_DATABASE}",
            self.password, self.port
        )
    }

    /// The URL with the password masked, for messages.
    pub fn url_without_password(&self) -> String {
        format!(
            "postgresql://{TEST_ROLE}:***@{HOST}:{}/{TEST_DATABASE}",
            self.port
        )
    }

    /// The cluster's directory (data, socket and log); gone after the cluster stops.
    #[cfg(test)]
    pub fn directory(&self) -> &Path {
        self.directory.path()
    }

    /// `psql` connecting over TCP as the test role (password in the environment),
    /// printing only the unaligned result of `sql`.
    pub fn psql_as_test_role(&self, sql: &str) -> Command {
        let mut psql = Command::new(self.program("psql"));
        psql.env("PGPASSWORD", &self.password)
            .env("PGCONNECT_TIMEOUT", "10")
            .args([
                "--no-psqlrc",
                "--tuples-only",
                "--no-align",
                "--set=ON_ERROR_STOP=1",
            ])
            .arg(format!("--host={HOST}"))
            .arg(format!("--port={}", self.port))
            .arg(format!("--username={TEST_ROLE}"))
            .arg(format!("--dbname={TEST_DATABASE}"))
            .arg(format!("--command={sql}"));
        psql
    }

    /// Stops the server and removes the cluster's directory.
    pub fn stop(mut self) -> Result<()> {
        self.stop_server()
        // Dropping `self.directory` removes the files.
    }

    fn data_dir(&self) -> PathBuf {
        self.directory.path().join("data")
    }

    fn socket_dir(&self) -> PathBuf {
        self.directory.path().join("socket")
    }

    fn log_file(&self) -> PathBuf {
        self.directory.path().join("postgres.log")
    }

    fn program(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }

    /// A command for one of the server programs, run as the server's user.
    fn server_command(&self, name: &str) -> Command {
        let mut command = if self.as_server_user {
            let mut runuser = Command::new("runuser");
            runuser
                .args(["-u", SERVER_USER, "--"])
                .arg(self.program(name));
            runuser
        } else {
            Command::new(self.program(name))
        };
        // The server's user may not be allowed into our working directory.
        command.current_dir(self.directory.path());
        command
    }

    fn hand_directory_to_server_user(&self) -> Result<()> {
        std::fs::create_dir(self.socket_dir()).context("could not make the socket directory")?;
        if self.as_server_user {
            command::run(
                Command::new("chown")
                    .args(["-R", &format!("{SERVER_USER}:")])
                    .arg(self.directory.path()),
            )?;
        }
        Ok(())
    }

    fn init_database_directory(&self) -> Result<()> {
        let output = command::capture(
            self.server_command("initdb")
                .arg(format!("--pgdata={}", self.data_dir().display()))
                .arg(format!("--username={SUPERUSER}"))
                .args(["--auth-local=trust", "--auth-host=scram-sha-256"])
                .args(["--encoding=UTF8", "--locale=C", "--no-sync"]),
        )?;
        if !output.status.success() {
            bail!(
                "initdb failed ({}):\n{}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }

    /// Appends our settings to postgresql.conf (later settings win), so that no path goes
    /// through `pg_ctl -o`, which hands its options to a shell.
    fn configure(&self) -> Result<()> {
        let settings = format!(
            "\n# Added by cargo xtask for a throwaway test cluster.\n\
             listen_addresses = '{HOST}'\n\
             port = {}\n\
             unix_socket_directories = '{}'\n\
             unix_socket_permissions = 0700\n\
             # Nothing here outlives the test run; durability is not what it tests.\n\
             fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off\n",
            self.port,
            quote_setting(&self.socket_dir())?,
        );
        OpenOptions::new()
            .append(true)
            .open(self.data_dir().join("postgresql.conf"))
            .and_then(|mut file| file.write_all(settings.as_bytes()))
            .context("could not write postgresql.conf")
    }

    fn start_server(&mut self) -> Result<()> {
        let status = self
            .server_command("pg_ctl")
            .args([
                "start",
                "--wait",
                "--silent",
                "--timeout",
                START_TIMEOUT_SECONDS,
            ])
            .arg(format!("--pgdata={}", self.data_dir().display()))
            .arg(format!("--log={}", self.log_file().display()))
            .status()
            .context("could not start pg_ctl")?;
        // pg_ctl may fail after the server started (e.g. on a timeout); stop it anyway.
        self.running = true;
        if !status.success() {
            bail!(
                "pg_ctl start failed ({status}); server log:\n{}",
                self.log_tail()
            );
        }
        Ok(())
    }

    fn create_role_and_database(&self) -> Result<()> {
        // The password is hex, so it needs no quoting; it goes through stdin, not argv.
        let sql = format!(
            "CREATE ROLE {TEST_ROLE} LOGIN PASSWORD '{}';\n\
             CREATE DATABASE {TEST_DATABASE} OWNER {TEST_ROLE};\n",
            self.password
        );
        let mut psql = self.server_command("psql");
        psql.args([
            "--no-psqlrc",
            "--quiet",
            "--set=ON_ERROR_STOP=1",
            "--file=-",
        ])
        .arg(format!("--host={}", self.socket_dir().display()))
        .arg(format!("--port={}", self.port))
        .arg(format!("--username={SUPERUSER}"))
        .arg("--dbname=postgres");
        command::run_with_input(&mut psql, sql.as_bytes())
            .context("could not create the test role and database")
    }

    fn stop_server(&mut self) -> Result<()> {
        if !self.running {
            return Ok(());
        }
        self.running = false;
        let stopped = command::capture(
            self.server_command("pg_ctl")
                .args(["stop", "--wait", "--silent", "--mode=fast"])
                .arg(format!("--pgdata={}", self.data_dir().display())),
        )?;
        if !stopped.status.success() {
            bail!(
                "pg_ctl stop failed ({}): {}",
                stopped.status,
                String::from_utf8_lossy(&stopped.stderr)
            );
        }
        Ok(())
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.log_file()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Err(error) = self.stop_server() {
            eprintln!(
                "postgres: could not stop the cluster in {}: {error:#}",
                self.directory.path().display()
            );
        }
    }
}

/// The directory with the server programs: `$NFCPAY_POSTGRES_BIN_DIR`, the newest
/// `/usr/lib/postgresql/<version>/bin` (Debian), or the directory of `initdb` in `PATH`.
fn bin_dir() -> Result<PathBuf> {
    if let Some(directory) = std::env::var_os(BIN_DIR_VARIABLE) {
        return Ok(PathBuf::from(directory));
    }
    let debian = Path::new("/usr/lib/postgresql");
    let versions = std::fs::read_dir(debian)
        .map(|entries| {
            entries
                .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    if let Some(version) = newest_version(&versions) {
        let directory = debian.join(version).join("bin");
        if directory.join("initdb").is_file() {
            return Ok(directory);
        }
    }
    command::find_in_path("initdb")
        .and_then(|initdb| initdb.parent().map(Path::to_path_buf))
        .context("PostgreSQL server programs not found (install the postgresql package)")
}

/// The highest of the numeric version directory names (`9.6`, `15`, `16`).
fn newest_version(names: &[String]) -> Option<&str> {
    names
        .iter()
        .filter_map(|name| {
            let mut parts = name.split('.').map(str::parse::<u32>);
            let major = parts.next()?.ok()?;
            let minor = parts.next().transpose().ok()?.unwrap_or(0);
            Some(((major, minor), name.as_str()))
        })
        .max()
        .map(|(_, name)| name)
}

/// A port that was free a moment ago on 127.0.0.1.
fn free_port() -> Result<u16> {
    let listener = TcpListener::bind((HOST, 0)).context("could not find a free port")?;
    Ok(listener.local_addr()?.port())
}

/// `path` as the inside of a single-quoted postgresql.conf string.
fn quote_setting(path: &Path) -> Result<String> {
    let text = path
        .to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))?;
    if text.contains(['\n', '\r']) {
        bail!("{text:?} contains a line break");
    }
    Ok(text.replace('\\', "\\\\").replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// PostgreSQL is optional on a developer's machine, but CI (`CI` set, or
    /// `cargo xtask test`, which installs it) always runs the cluster tests.
    fn postgres_available() -> bool {
        if bin_dir().is_ok() {
            return true;
        }
        assert!(
            std::env::var_os("CI").is_none(),
            "PostgreSQL must be installed in CI"
        );
        eprintln!("PostgreSQL not installed: skipping");
        false
    }

    #[test]
    fn newest_version_is_numeric_not_lexical() {
        let names = ["9.6", "15", "16", "README", "10"].map(String::from);
        assert_eq!(newest_version(&names), Some("16"));
        assert_eq!(newest_version(&["9.6".into(), "9.5".into()]), Some("9.6"));
        assert_eq!(newest_version(&[]), None);
    }

    #[test]
    fn settings_are_quoted() {
        assert_eq!(
            quote_setting(Path::new("/tmp/a'b")).expect("quotable"),
            "/tmp/a''b"
        );
        assert!(quote_setting(Path::new("/tmp/a\nb")).is_err());
    }

    #[test]
    fn with_postgres_gives_a_working_database_and_cleans_up() {
        if !postgres_available() {
            return;
        }
        let directory = with_postgres(|cluster| {
            let url = cluster.url();
            assert!(url.starts_with("postgresql://nfcpay_test:"), "{url}");
            assert!(!cluster.url_without_password().contains(&cluster.password));
            let answer = command::stdout_of(
                &mut cluster.psql_as_test_role("select current_user || ' ' || current_database()"),
            )?;
            assert_eq!(answer.trim(), "nfcpay_test nfcpay_test");
            Ok(cluster.directory().to_path_buf())
        })
        .expect("the cluster starts and answers");
        assert!(
            !directory.exists(),
            "{} is left behind",
            directory.display()
        );
    }

    #[test]
    fn with_postgres_stops_the_cluster_when_the_work_fails() {
        if !postgres_available() {
            return;
        }
        let mut seen = None;
        let error = with_postgres(|cluster| -> Result<()> {
            seen = Some((
                cluster.directory().to_path_buf(),
                cluster.psql_as_test_role("select 1"),
            ));
            bail!("the work failed")
        })
        .expect_err("the work's error comes back");
        assert_eq!(error.to_string(), "the work failed");
        let (directory, mut select_one) = seen.expect("the work ran");
        assert!(
            !directory.exists(),
            "{} is left behind",
            directory.display()
        );
        assert!(
            !command::succeeds(&mut select_one),
            "the server still answers"
        );
    }

    #[test]
    fn a_wrong_password_is_refused() {
        if !postgres_available() {
            return;
        }
        with_postgres(|cluster| {
            let mut psql = cluster.psql_as_test_role("select 1");
            psql.env("PGPASSWORD", "not-the-password");
            assert!(!command::succeeds(&mut psql), "a wrong password gets in");
            Ok(())
        })
        .expect("the cluster starts");
    }
}
