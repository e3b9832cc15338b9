//! A throwaway PostgreSQL cluster of a test's own, for fault tests that restart, crash or
//! freeze the server (the shared cluster of `cargo xtask test` must not be touched).
//!
//! [`Cluster::start`] runs `initdb` in a temporary directory and starts the server with
//! `pg_ctl` on a free port of 127.0.0.1 and a socket directory inside it, with a database
//! [`DATABASE`]. Connections from 127.0.0.1 are trusted: the cluster lives for one test, on
//! loopback only. As root the server runs as the `postgres` user (PostgreSQL refuses root),
//! through `runuser`. Signals go only to this cluster's own processes: the postmaster named in
//! its `postmaster.pid` and that process's children. Dropping the cluster stops the server
//! (`pg_ctl stop -m immediate`, then SIGKILL of its own processes if that fails) and removes
//! its files.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Overrides the directory holding `initdb`, `pg_ctl` and `psql` (as for `cargo xtask`).
pub const BIN_DIR_VARIABLE: &str = "NFCPAY_POSTGRES_BIN_DIR";
/// The database the cluster makes.
pub const DATABASE: &str = "nfcpay";
/// The user the server runs as when the tests run as root.
const SERVER_USER: &str = "postgres";
/// How long `pg_ctl` may take to start or stop the server.
const PG_CTL_TIMEOUT_SECONDS: &str = "60";

/// The directory of the PostgreSQL server programs, if they are installed: `$NFCPAY_POSTGRES_BIN_DIR`,
/// else the newest `/usr/lib/postgresql/<version>/bin` holding `initdb` (Debian's layout).
pub fn bin_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os(BIN_DIR_VARIABLE) {
        return Some(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

/// A running cluster of the test's own.
pub struct Cluster {
    directory: tempfile::TempDir,
    bin_dir: PathBuf,
    as_server_user: bool,
    port: u16,
    /// Set once [`Self::kill`] has killed the server: its process IDs are then stale and
    /// must not be signalled again.
    killed: std::sync::atomic::AtomicBool,
}

/// A cluster of the calling test's own, or `None` (the test skips) where PostgreSQL is not
/// installed and not required ([`crate::postgres_required`]: there a missing PostgreSQL fails
/// the test instead).
///
/// # Panics
/// When PostgreSQL is required but not installed, or the cluster does not start.
#[allow(clippy::panic, clippy::expect_used)] // how a test fails
pub fn own_cluster() -> Option<Cluster> {
    let Some(bin_dir) = bin_dir() else {
        assert!(
            !crate::postgres_required(),
            "PostgreSQL is not installed, but it is required here (CI or \
             NFCPAY_REQUIRE_POSTGRES): refusing to skip"
        );
        eprintln!("PostgreSQL not installed: test skipped");
        return None;
    };
    Some(Cluster::start(&bin_dir).expect("a PostgreSQL cluster of the test's own"))
}

impl Cluster {
    /// Makes and starts a cluster with the programs in `bin_dir` (see [`bin_dir`]).
    pub fn start(bin_dir: &Path) -> Result<Self> {
        let cluster = Self::new(bin_dir)?;
        let port = cluster.port;
        cluster.run(
            "initdb",
            &[
                "-D",
                &cluster.data_dir(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ],
        )?;
        let settings = format!(
            "\nlisten_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{}'\n\
             fsync = on\nsynchronous_commit = on\n",
            cluster.directory.path().display()
        );
        let conf = cluster.directory.path().join("data/postgresql.conf");
        let mut text = std::fs::read_to_string(&conf)?;
        text.push_str(&settings);
        std::fs::write(&conf, text)?;
        cluster.start_server()?;
        cluster.run(
            "psql",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-U",
                "postgres",
                "-q",
                "-c",
                &format!("CREATE DATABASE {DATABASE}"),
            ],
        )?;
        Ok(cluster)
    }

    /// An empty cluster directory, its server not started.
    fn new(bin_dir: &Path) -> Result<Self> {
        let directory = tempfile::Builder::new()
            .prefix("nfcpay-pg-fault")
            .tempdir()?;
        let [port] = crate::free_ports()?;
        let cluster = Self {
            directory,
            bin_dir: bin_dir.to_owned(),
            as_server_user: rustix::process::geteuid().is_root(),
            port,
            killed: std::sync::atomic::AtomicBool::new(false),
        };
        if cluster.as_server_user {
            let status = Command::new("chown")
                .arg(format!("{SERVER_USER}:"))
                .arg(cluster.directory.path())
                .status()?;
            if !status.success() {
                bail!("could not hand the cluster directory to {SERVER_USER}");
            }
        }
        Ok(cluster)
    }

    /// A streaming-replication standby of `primary` (a real `pg_basebackup -R`), started,
    /// on a port of its own; `primary` then waits for it at every commit
    /// (`synchronous_standby_names = '*'`, `synchronous_commit = on`), once it streams.
    pub fn start_synchronous_standby(primary: &Self) -> Result<Self> {
        let standby = Self::new(&primary.bin_dir)?;
        standby.run(
            "pg_basebackup",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &primary.port.to_string(),
                "-U",
                "postgres",
                "-D",
                &standby.data_dir(),
                "-R",
                "-X",
                "stream",
                "--checkpoint=fast",
                "--no-sync",
            ],
        )?;
        let conf = standby.directory.path().join("data/postgresql.conf");
        let mut text = std::fs::read_to_string(&conf)?;
        text.push_str(&format!(
            "\nport = {}\nunix_socket_directories = '{}'\n",
            standby.port,
            standby.directory.path().display()
        ));
        std::fs::write(&conf, text)?;
        standby.start_server()?;
        primary.psql("ALTER SYSTEM SET synchronous_standby_names = '*'")?;
        primary.psql("SELECT pg_reload_conf()")?;
        let streaming = wait_until(Duration::from_secs(30), || {
            primary
                .psql_value("SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'")
                .is_ok_and(|count| count == "1")
        });
        if streaming.is_none() {
            bail!(
                "the standby is not streaming synchronously:\n{}",
                standby.log()
            );
        }
        Ok(standby)
    }

    /// Promotes a standby to primary (`pg_ctl promote`, waiting until it accepts writes).
    pub fn promote(&self) -> Result<()> {
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data_dir(),
                "-w",
                "-t",
                PG_CTL_TIMEOUT_SECONDS,
                "promote",
            ],
        )
    }

    /// Kills every process of the server with SIGKILL (the machine dying, as far as the
    /// database can tell); the cluster is not signalled again.
    pub fn kill(&self) -> Result<()> {
        let pids = self.pids()?;
        self.killed.store(true, std::sync::atomic::Ordering::SeqCst);
        for pid in pids {
            signal(pid, rustix::process::Signal::KILL)?;
        }
        Ok(())
    }

    /// `host:port` of the server, for multi-host URLs.
    pub fn host_port(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `postgres://postgres@127.0.0.1:PORT/nfcpay`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{DATABASE}", self.port)
    }

    /// Starts the server again after [`Self::stop`] or [`Self::crash`].
    pub fn start_server(&self) -> Result<()> {
        let options = format!("-p {}", self.port);
        let log = self.directory.path().join("server.log");
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data_dir(),
                "-l",
                &log.display().to_string(),
                "-o",
                &options,
                "-w",
                "-t",
                PG_CTL_TIMEOUT_SECONDS,
                "start",
            ],
        )
    }

    /// Stops the server cleanly (`pg_ctl stop -m fast`: sessions are terminated).
    pub fn stop(&self) -> Result<()> {
        self.pg_ctl_stop("fast")
    }

    /// Stops the server as a crash would (`pg_ctl stop -m immediate`: no shutdown
    /// checkpoint; the next start recovers from the WAL).
    pub fn crash(&self) -> Result<()> {
        self.pg_ctl_stop("immediate")
    }

    /// Freezes every process of the server (SIGSTOP): connections stay open, nothing answers.
    pub fn freeze(&self) -> Result<Vec<u32>> {
        let pids = self.pids()?;
        for &pid in &pids {
            signal(pid, rustix::process::Signal::STOP)?;
        }
        Ok(pids)
    }

    /// Lets the processes [`Self::freeze`] stopped go on (SIGCONT).
    pub fn thaw(&self, pids: &[u32]) -> Result<()> {
        for &pid in pids {
            signal(pid, rustix::process::Signal::CONT)?;
        }
        Ok(())
    }

    /// The server's processes: the postmaster (from `postmaster.pid`) and its children.
    pub fn pids(&self) -> Result<Vec<u32>> {
        let pid_file = self.directory.path().join("data/postmaster.pid");
        let postmaster: u32 = std::fs::read_to_string(&pid_file)
            .with_context(|| format!("{}", pid_file.display()))?
            .lines()
            .next()
            .context("empty postmaster.pid")?
            .trim()
            .parse()?;
        let mut pids = vec![postmaster];
        for entry in std::fs::read_dir("/proc")? {
            let Some(pid) = entry?
                .file_name()
                .to_str()
                .and_then(|name| name.parse::<u32>().ok())
            else {
                continue;
            };
            if parent_of(pid) == Some(postmaster) {
                pids.push(pid);
            }
        }
        Ok(pids)
    }

    /// Runs `sql` as the superuser in [`DATABASE`].
    pub fn psql(&self, sql: &str) -> Result<()> {
        self.psql_value(sql).map(drop)
    }

    /// Runs `sql` as the superuser in [`DATABASE`]; its output, trimmed.
    pub fn psql_value(&self, sql: &str) -> Result<String> {
        let output = Command::new(self.bin_dir.join("psql"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", "postgres", "-d", DATABASE, "-X", "-A", "-t", "-q"])
            .args(["-v", "ON_ERROR_STOP=1", "-c", sql])
            .output()?;
        if !output.status.success() {
            bail!("psql {sql:?}: {}", String::from_utf8_lossy(&output.stderr));
        }
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.directory.path().join("server.log")).unwrap_or_default()
    }

    fn pg_ctl_stop(&self, mode: &str) -> Result<()> {
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data_dir(),
                "-m",
                mode,
                "-w",
                "-t",
                PG_CTL_TIMEOUT_SECONDS,
                "stop",
            ],
        )
    }

    fn data_dir(&self) -> String {
        self.directory.path().join("data").display().to_string()
    }

    /// Runs one of the server programs, as the server's user when running as root.
    fn run(&self, program: &str, args: &[&str]) -> Result<()> {
        let path = self.bin_dir.join(program);
        let mut command = if self.as_server_user {
            let mut command = Command::new("runuser");
            command.args(["-u", SERVER_USER, "--"]).arg(&path);
            command
        } else {
            Command::new(&path)
        };
        let output = command
            .args(args)
            .current_dir(self.directory.path())
            .output()
            .with_context(|| format!("{}", path.display()))?;
        if !output.status.success() {
            bail!(
                "{program} {args:?}: {}{}\n{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr),
                self.log()
            );
        }
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.killed.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        // A frozen server would not stop: let it go on first.
        if let Ok(pids) = self.pids() {
            let _ = self.thaw(&pids);
            if self.pg_ctl_stop("immediate").is_err() {
                for pid in pids {
                    let _ = signal(pid, rustix::process::Signal::KILL);
                }
            }
        }
    }
}

/// The parent process of `pid`, from `/proc/<pid>/stat` (field 4, after the command name).
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(1)?.parse().ok()
}

fn signal(pid: u32, signal: rustix::process::Signal) -> Result<()> {
    let pid = rustix::process::Pid::from_raw(i32::try_from(pid)?).context("pid 0")?;
    rustix::process::kill_process(pid, signal)?;
    Ok(())
}

/// Waits until `ready` holds, at most `timeout`; how long it took.
pub fn wait_until(timeout: Duration, mut ready: impl FnMut() -> bool) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < timeout {
        if ready() {
            return Some(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}
