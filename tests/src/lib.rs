//! Fixtures for end-to-end tests of the whole nfcpay system, shared by the tests in
//! `tests/tests/`, the load generator and the demo.
//!
//! [`PlatformFixture`] brings up a real platform in a temporary directory: its own SoftHSM2
//! token (made by `softhsm-setup/init-token`), a BDK generated in it, the ledger in SQLite (or
//! the PostgreSQL named by `NFCPAY_TEST_DATABASE_URL`, in a fresh schema), the PKI made by
//! `nfcpay-admin init`, and `nfcpayd` itself as a child process on free loopback ports.
//! [`TestTerminal`] enrolls a terminal against it through the real enrollment route, with a
//! software keystore. Everything is removed when dropped.
//!
//! The binaries (`nfcpayd`, `nfcpay-admin`) are looked up beside the test executable, in the
//! cargo target directory: `cargo xtask test` builds them first.
//!
//! A fixture may run more daemons on the same token, PKI and ledger
//! ([`PlatformFixture::start_extra_daemon`]), each on its own ports, so that a payment's two
//! halves can meet only in the database. [`loadgen`] holds what the load generator measures.
#![forbid(unsafe_code)]

pub mod faults;
pub mod loadgen;
pub mod postgres;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nfcpay_keystore::dukpt::TerminalKeys;
use nfcpay_keystore::software::SoftwareKeystore;
use nfcpay_keystore::{KeyHandle, Keystore};
use nfcpay_protocol::TerminalId;
use nfcpay_protocol::dukpt::{FUTURE_KEY_REGISTERS, TerminalState};
use nfcpay_terminal_agent::enroll::{EnrollmentTarget, Terminal, enroll};
use nfcpay_terminal_agent::keys::{register_counter, register_label};
use zeroize::Zeroizing;

/// The SoftHSM2 module on Debian.
pub const SOFTHSM_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
/// Names another PKCS#11 module for the fixture's daemon and `nfcpay-admin` (e.g. p11-kit's
/// proxy, `/usr/lib/x86_64-linux-gnu/p11-kit-proxy.so`, which reaches SoftHSM2 through its
/// registration in `/usr/share/p11-kit/modules/`); `cargo xtask test` sets it for one run.
pub const PKCS11_MODULE_VARIABLE: &str = "NFCPAY_TEST_PKCS11_MODULE";

/// The PKCS#11 module the fixture's platform uses: [`PKCS11_MODULE_VARIABLE`], or SoftHSM2.
pub fn platform_pkcs11_module() -> String {
    std::env::var(PKCS11_MODULE_VARIABLE).unwrap_or_else(|_| SOFTHSM_MODULE.to_owned())
}
/// The BDK every fixture generates (AES-256).
pub const FIXTURE_BDK_ID: &str = "0123ABCD";
/// How long the daemon may take to become ready.
pub const DAEMON_START_TIMEOUT: Duration = Duration::from_secs(30);

/// The workspace's root directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// A binary of the workspace, beside the running executable (`target/<profile>/NAME`).
pub fn binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    for dir in exe.ancestors().skip(1).take(3) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "binary {name} not found near {}: run `cargo build --workspace --bins` first",
        exe.display()
    )
}

/// `N` distinct free TCP ports on the loopback interface (free when asked; the daemon binds
/// them soon after, and [`PlatformFixture`] retries with others if one was taken meanwhile).
pub fn free_ports<const N: usize>() -> Result<[u16; N]> {
    // All bound at once, so the kernel cannot hand out the same port twice.
    let listeners = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    let mut ports = [0u16; N];
    for (port, listener) in ports.iter_mut().zip(&listeners) {
        *port = listener.local_addr()?.port();
    }
    Ok(ports)
}

/// How many times the fixture tries fresh ports when another process took one first.
const DAEMON_START_ATTEMPTS: usize = 3;

/// Which ledger the fixture's daemon uses.
#[derive(Debug, Clone)]
pub enum Ledger {
    /// SQLite in the fixture's directory.
    Sqlite,
    /// PostgreSQL at this URL (a fresh schema is made for the fixture).
    Postgres(String),
}

impl Ledger {
    /// SQLite, or PostgreSQL when `NFCPAY_TEST_DATABASE_URL` is set and `postgres` is asked.
    ///
    /// `None` (the PostgreSQL case is skipped) only where PostgreSQL is optional: when
    /// [`postgres_required`], a missing URL panics, so the test fails instead of passing.
    pub fn from_environment(postgres: bool) -> Option<Self> {
        if !postgres {
            return Some(Self::Sqlite);
        }
        nfcpay_daemon::testing::postgres_url("PostgreSQL case").map(Self::Postgres)
    }
}

pub use nfcpay_daemon::testing::{
    DATABASE_URL_VARIABLE, REQUIRE_POSTGRES_VARIABLE, postgres_required,
};

/// A running platform.
pub struct PlatformFixture {
    dir: tempfile::TempDir,
    daemon: Option<Child>,
    /// Daemons started by [`Self::start_extra_daemon`], on their own ports.
    extra_daemons: Vec<ExtraDaemon>,
    /// `127.0.0.1:port` of the terminal listener (client certificate required).
    pub address: String,
    /// `127.0.0.1:port` of the enrollment listener (no client certificate).
    pub enroll_address: String,
    /// `127.0.0.1:port` of the operations listener.
    pub ops_address: String,
    /// The database URL the daemon uses.
    pub database_url: String,
    /// Extra lines of the daemon's `[database]` section (e.g. `write_timeout_ms = 1000`).
    database_settings: String,
    /// The daemon's `NFCPAY_LOG` filter (`info` unless [`Self::restart_logging`] changed it).
    log_filter: String,
    /// Extra lines of the daemon's `[server]` section (e.g. `enrollment_connections_max = 8`).
    server_settings: String,
}

impl PlatformFixture {
    /// Makes a token, a BDK, the ledger and the PKI, and starts `nfcpayd`.
    pub fn start(ledger: &Ledger) -> Result<Self> {
        Self::start_with_database_settings(ledger, "")
    }

    /// [`Self::start`], with `settings` (TOML lines) added to the daemon's `[database]`.
    pub fn start_with_database_settings(ledger: &Ledger, settings: &str) -> Result<Self> {
        Self::start_with_settings(ledger, settings, "")
    }

    /// [`Self::start`], with `database_settings` and `server_settings` (TOML lines) added to
    /// the daemon's `[database]` and `[server]` sections.
    pub fn start_with_settings(
        ledger: &Ledger,
        database_settings: &str,
        server_settings: &str,
    ) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("nfcpay-fixture")
            .tempdir()?;
        let [port, enroll_port, ops_port] = free_ports()?;
        let database_url = match ledger {
            Ledger::Sqlite => format!("sqlite://{}", dir.path().join("ledger.db").display()),
            Ledger::Postgres(url) => fresh_postgres_schema(url)?,
        };
        let mut fixture = Self {
            address: format!("127.0.0.1:{port}"),
            enroll_address: format!("127.0.0.1:{enroll_port}"),
            ops_address: format!("127.0.0.1:{ops_port}"),
            database_url,
            database_settings: database_settings.to_owned(),
            log_filter: "info".to_owned(),
            server_settings: server_settings.to_owned(),
            daemon: None,
            extra_daemons: Vec::new(),
            dir,
        };
        fixture.make_token()?;
        fixture.write_config()?;
        fixture.admin_ok(&["bdk", "generate", "--bdk-id", FIXTURE_BDK_ID])?;
        fixture.admin_ok(&["init"])?;
        for attempt in 1..=DAEMON_START_ATTEMPTS {
            match fixture.start_daemon() {
                Ok(()) => break,
                // Another test's process took one of the ports between choosing and binding.
                Err(error)
                    if attempt < DAEMON_START_ATTEMPTS
                        && error.to_string().contains("Address already in use") =>
                {
                    let [port, enroll_port, ops_port] = free_ports()?;
                    fixture.address = format!("127.0.0.1:{port}");
                    fixture.enroll_address = format!("127.0.0.1:{enroll_port}");
                    fixture.ops_address = format!("127.0.0.1:{ops_port}");
                    fixture.write_config()?;
                }
                Err(error) => return Err(error),
            }
        }
        Ok(fixture)
    }

    /// The fixture's directory (config, token, PKI, logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The configuration file.
    pub fn config_path(&self) -> PathBuf {
        self.dir().join("nfcpay.toml")
    }

    /// `SOFTHSM2_CONF` of the fixture's token.
    pub fn softhsm_conf(&self) -> PathBuf {
        self.dir().join("softhsm2.conf")
    }

    /// The platform CA certificate (PEM), as the operator gives it to terminals.
    pub fn ca_pem(&self) -> Result<Vec<u8>> {
        Ok(std::fs::read(self.dir().join("pki/ca.pem"))?)
    }

    /// The daemon's log so far.
    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.dir().join("nfcpayd.log")).unwrap_or_default()
    }

    fn make_token(&self) -> Result<()> {
        let pin = self.dir().join("pin");
        let mut pin_bytes = [0u8; 12];
        getrandom::fill(&mut pin_bytes)?;
        std::fs::write(&pin, hex::encode(pin_bytes))?;
        // The keystore refuses a PIN file its group or others can read.
        std::fs::set_permissions(&pin, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        let output = Command::new(workspace_root().join("softhsm-setup/init-token"))
            .arg("--dir")
            .arg(self.dir())
            .args(["--label", "nfcpay-e2e", "--pin-file"])
            .arg(&pin)
            .arg("--so-pin-file")
            .arg(&pin)
            .output()
            .context(
                "softhsm-setup/init-token (is softhsm2 installed? `cargo xtask test` installs it)",
            )?;
        if !output.status.success() {
            bail!("init-token: {}", String::from_utf8_lossy(&output.stderr));
        }
        Ok(())
    }

    fn write_config(&self) -> Result<()> {
        std::fs::write(self.config_path(), self.config_text(&self.endpoints()))?;
        Ok(())
    }

    /// The daemon configuration for one daemon listening on `endpoints`: all daemons of the
    /// fixture share the token, the PKI and the database.
    fn config_text(&self, endpoints: &DaemonEndpoints) -> String {
        let dir = self.dir().display();
        format!(
            r#"[keystore]
backend = "pkcs11"
uri = "pkcs11:token=nfcpay-e2e?module-path={module}&pin-source=file:{dir}/pin"

[database]
url = "{database}"
{database_settings}

[server]
listen = "{address}"
enroll_listen = "{enroll}"
ops_listen = "{ops}"
certificate_chain = "{dir}/pki/server.pem"
client_ca = "{dir}/pki/ca.pem"
# Tests and the load generator enroll and pay from one address, fast.
enrollment_requests_per_second = 1000
enrollment_request_burst = 1000
terminal_requests_per_second = 100000
terminal_request_burst = 100000
{server_settings}

[platform]
pki_dir = "{dir}/pki"
allow_root = true
"#,
            database = self.database_url,
            database_settings = self.database_settings,
            server_settings = self.server_settings,
            module = platform_pkcs11_module(),
            address = endpoints.address,
            enroll = endpoints.enroll_address,
            ops = endpoints.ops_address,
        )
    }

    /// Runs `nfcpay-admin` with the fixture's configuration.
    pub fn admin(&self, args: &[&str], stdin: &str) -> Result<Output> {
        let mut child = Command::new(binary("nfcpay-admin")?)
            .arg("--config")
            .arg(self.config_path())
            .args(args)
            .env("SOFTHSM2_CONF", self.softhsm_conf())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        if let Some(mut input) = child.stdin.take() {
            input.write_all(stdin.as_bytes())?;
        }
        Ok(child.wait_with_output()?)
    }

    /// Runs `nfcpay-admin` and returns its output, failing when it fails.
    pub fn admin_ok(&self, args: &[&str]) -> Result<String> {
        let output = self.admin(args, "")?;
        if !output.status.success() {
            bail!(
                "nfcpay-admin {args:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(String::from_utf8(output.stdout)?)
    }

    /// Creates an account and funds it with `funds` (e.g. `100.00`; `None`: no funds).
    pub fn account(&self, id: &str, currency: &str, funds: Option<&str>) -> Result<()> {
        self.admin_ok(&["accounts", "create", "--id", id, "--currency", currency])?;
        if let Some(funds) = funds {
            self.admin_ok(&["accounts", "fund", "--id", id, "--amount", funds])?;
        }
        Ok(())
    }

    /// Registers a terminal for `account`; returns its one-time enrollment code.
    pub fn add_terminal(&self, id: &str, account: &str) -> Result<Zeroizing<String>> {
        let out = self.admin_ok(&["terminals", "add", "--id", id, "--account", account])?;
        let code = out
            .lines()
            .find_map(|line| line.strip_prefix("enrollment code: "))
            .context("no enrollment code in `terminals add` output")?;
        Ok(Zeroizing::new(code.trim().to_owned()))
    }

    /// The account's balance line from `accounts show`, e.g. `87.50 EUR`.
    pub fn balance(&self, account: &str) -> Result<String> {
        let out = self.admin_ok(&["accounts", "show", "--id", account])?;
        let first = out.lines().next().unwrap_or_default();
        let balance = first
            .split("balance ")
            .nth(1)
            .and_then(|rest| rest.split(" (").next())
            .context("no balance in `accounts show`")?;
        Ok(balance.to_owned())
    }

    /// Opens the fixture's ledger directly (for "nothing changed" checks).
    pub fn storage(&self) -> Result<nfcpay_daemon::storage::Storage> {
        Ok(nfcpay_daemon::storage::Storage::open(&self.database_url)?)
    }

    fn start_daemon(&mut self) -> Result<()> {
        let child = self.spawn_daemon(
            &self.config_path(),
            &self.dir().join("nfcpayd.log"),
            &self.ops_address,
        )?;
        self.daemon = Some(child);
        Ok(())
    }

    /// Starts `nfcpayd` with `config`, its log in `log`, and waits until it says it listens
    /// and `/readyz` on `ops_address` answers 200. A daemon that does not get there is killed.
    fn spawn_daemon(&self, config: &Path, log_path: &Path, ops_address: &str) -> Result<Child> {
        let log = std::fs::File::create(log_path)?;
        let mut child = Command::new(binary("nfcpayd")?)
            .arg("--config")
            .arg(config)
            .env("SOFTHSM2_CONF", self.softhsm_conf())
            .env("NFCPAY_LOG", &self.log_filter)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        let log_text = || std::fs::read_to_string(log_path).unwrap_or_default();
        let deadline = Instant::now() + DAEMON_START_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait()? {
                bail!("nfcpayd exited with {status}:\n{}", log_text());
            }
            // Ours listening (not another process's on a reused port), and ready.
            if log_text().contains("listening")
                && http_get(ops_address, "/readyz").is_ok_and(|(status, _)| status == 200)
            {
                return Ok(child);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        bail!("nfcpayd not ready in time:\n{}", log_text())
    }

    /// Waits up to `within` for the daemon to exit by itself; returns its exit status code,
    /// or `None` (the daemon is left running) if it did not.
    pub fn wait_for_exit(&mut self, within: Duration) -> Result<Option<i32>> {
        let Some(child) = self.daemon.as_mut() else {
            bail!("no daemon running");
        };
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait()? {
                self.daemon = None;
                return Ok(status.code());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(None)
    }

    /// Stops the daemon with SIGTERM and waits for it; returns its exit status code.
    pub fn stop(&mut self) -> Result<Option<i32>> {
        let Some(mut child) = self.daemon.take() else {
            return Ok(None);
        };
        let pid = rustix_pid(&child);
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait()? {
                return Ok(status.code());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        child.kill()?;
        bail!("nfcpayd did not stop on SIGTERM")
    }

    /// Enrolls a terminal with a software keystore in a directory of its own.
    pub async fn enroll(&self, terminal_id: &str, account: &str) -> Result<TestTerminal> {
        self.enroll_at(terminal_id, account, &self.endpoints())
            .await
    }

    /// Enrolls a terminal through the daemon at `endpoints` (one of [`Self::all_endpoints`]),
    /// which its payments then go to, with a software keystore in a directory of its own.
    pub async fn enroll_at(
        &self,
        terminal_id: &str,
        account: &str,
        endpoints: &DaemonEndpoints,
    ) -> Result<TestTerminal> {
        let code = self.add_terminal(terminal_id, account)?;
        let dir = tempfile::Builder::new()
            .prefix("nfcpay-terminal")
            .tempdir()?;
        let store: Arc<dyn Keystore> =
            Arc::new(SoftwareKeystore::open(&dir.path().join("keystore.json"))?);
        let ca = self.ca_pem()?;
        let target = EnrollmentTarget {
            address: &endpoints.address,
            enroll_address: &endpoints.enroll_address,
            server_name: "localhost",
            ca_pem: &ca,
        };
        let id: TerminalId = terminal_id.parse()?;
        let terminal = enroll(Arc::clone(&store), dir.path(), &target, &id, &code).await?;
        Ok(TestTerminal {
            terminal,
            store,
            account: account.parse()?,
            memory_keys: None,
            _dir: dir,
        })
    }

    /// Where the first daemon listens.
    pub fn endpoints(&self) -> DaemonEndpoints {
        DaemonEndpoints {
            address: self.address.clone(),
            enroll_address: self.enroll_address.clone(),
            ops_address: self.ops_address.clone(),
        }
    }

    /// Where every daemon listens: the first one, then those of
    /// [`Self::start_extra_daemon`] in the order they started.
    pub fn all_endpoints(&self) -> Vec<DaemonEndpoints> {
        std::iter::once(self.endpoints())
            .chain(
                self.extra_daemons
                    .iter()
                    .map(|extra| extra.endpoints.clone()),
            )
            .collect()
    }

    /// The process IDs of the running daemons, first one first.
    pub fn daemon_pids(&self) -> Vec<u32> {
        self.daemon
            .iter()
            .chain(self.extra_daemons.iter().map(|extra| &extra.child))
            .map(Child::id)
            .collect()
    }

    /// Starts one more `nfcpayd` with the same configuration (token, PKI, database) on ports
    /// of its own; returns where it listens. Its configuration and log are
    /// `nfcpay-<n>.toml` and `nfcpayd-<n>.log` in the fixture's directory (`n` from 2).
    pub fn start_extra_daemon(&mut self) -> Result<DaemonEndpoints> {
        let number = self.extra_daemons.len() + 2;
        let config = self.dir().join(format!("nfcpay-{number}.toml"));
        let log = self.dir().join(format!("nfcpayd-{number}.log"));
        for attempt in 1..=DAEMON_START_ATTEMPTS {
            let [port, enroll_port, ops_port] = free_ports()?;
            let endpoints = DaemonEndpoints {
                address: format!("127.0.0.1:{port}"),
                enroll_address: format!("127.0.0.1:{enroll_port}"),
                ops_address: format!("127.0.0.1:{ops_port}"),
            };
            std::fs::write(&config, self.config_text(&endpoints))?;
            match self.spawn_daemon(&config, &log, &endpoints.ops_address) {
                Ok(child) => {
                    self.extra_daemons.push(ExtraDaemon {
                        child,
                        endpoints: endpoints.clone(),
                    });
                    return Ok(endpoints);
                }
                // Another process took one of the ports between choosing and binding.
                Err(error)
                    if attempt < DAEMON_START_ATTEMPTS
                        && error.to_string().contains("Address already in use") => {}
                Err(error) => return Err(error),
            }
        }
        bail!("nfcpayd {number}: no free ports after {DAEMON_START_ATTEMPTS} attempts")
    }
}

/// Where one daemon of a [`PlatformFixture`] listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonEndpoints {
    /// `127.0.0.1:port` of the terminal listener (client certificate required).
    pub address: String,
    /// `127.0.0.1:port` of the enrollment listener (no client certificate).
    pub enroll_address: String,
    /// `127.0.0.1:port` of the operations listener (`/metrics`, `/readyz`).
    pub ops_address: String,
}

/// A daemon beyond the fixture's first one.
struct ExtraDaemon {
    child: Child,
    endpoints: DaemonEndpoints,
}

impl Drop for PlatformFixture {
    fn drop(&mut self) {
        let extras = self.extra_daemons.drain(..).map(|extra| extra.child);
        for mut child in self.daemon.take().into_iter().chain(extras) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn rustix_pid(child: &Child) -> String {
    child.id().to_string()
}

/// A minimal HTTP/1.1 GET over plain TCP (the operations listener): status and body.
pub fn http_get(address: &str, path: &str) -> Result<(u16, String)> {
    let address: SocketAddr = address.parse()?;
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .context("no HTTP status")?;
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    Ok((status, body.to_owned()))
}

/// A fresh schema on the PostgreSQL server at `url`; returns a URL whose connections use it.
fn fresh_postgres_schema(url: &str) -> Result<String> {
    let mut suffix = [0u8; 6];
    getrandom::fill(&mut suffix)?;
    let schema = format!("e2e_{}", hex::encode(suffix));
    let status = Command::new("psql")
        .arg(url)
        .args(["-v", "ON_ERROR_STOP=1", "-q", "-c"])
        .arg(format!("CREATE SCHEMA {schema}"))
        .status()
        .context("psql")?;
    if !status.success() {
        bail!("could not create schema {schema}");
    }
    let separator = if url.contains('?') { '&' } else { '?' };
    Ok(format!("{url}{separator}options=-csearch_path%3D{schema}"))
}

/// An enrolled terminal with a software keystore, for tests and the load generator.
pub struct TestTerminal {
    /// The terminal: ID, DUKPT keys, platform client, receipt key.
    pub terminal: Terminal,
    /// Its keystore.
    pub store: Arc<dyn Keystore>,
    /// Its account.
    pub account: nfcpay_protocol::AccountId,
    /// Its DUKPT state when kept in memory only
    /// ([`TestTerminal::danger_keep_keys_in_memory`]); `None`: the durable state in
    /// `terminal.keys`.
    memory_keys: Option<MemoryKeys>,
    _dir: tempfile::TempDir,
}

impl TestTerminal {
    /// The terminal's ID.
    pub fn id(&self) -> &TerminalId {
        &self.terminal.terminal_id
    }

    /// A payment request from this terminal as payee: `amount` (e.g. `12.50`) of `currency`,
    /// valid for five minutes from now.
    pub fn request(&self, amount: &str, currency: &str, description: &str) -> Result<Vec<u8>> {
        use nfcpay_protocol::messages::{PaymentKind, PaymentRequest, RequestValidity};
        let mut txn_id = [0u8; 16];
        getrandom::fill(&mut txn_id)?;
        let now = nfcpay_daemon::service::now_ms();
        let currency = currency.parse()?;
        Ok(PaymentRequest {
            txn_id: nfcpay_protocol::TxnId::try_from(txn_id)?,
            payee_terminal_id: self.id().clone(),
            payee_account_id: self.account.clone(),
            amount: nfcpay_protocol::Amount::parse_decimal(amount, currency)?,
            kind: PaymentKind::Purchase,
            validity: RequestValidity::new(now, now + 300_000)?,
            description: description.parse()?,
        }
        .encode())
    }

    /// This terminal's instruction, as payer, for `request` (the bytes as received).
    pub fn instruction(&self, request: &[u8]) -> Result<Vec<u8>> {
        use nfcpay_protocol::messages::PaymentInstruction;
        Ok(PaymentInstruction::consenting_to(
            request,
            self.id().clone(),
            self.account.clone(),
            nfcpay_daemon::service::now_ms(),
        )?
        .encode())
    }

    /// Seals `plaintext` as half `kind` under this terminal's next KSN. With the durable
    /// state (the default) the advanced state is saved (fsync) before the key is used, as a
    /// real terminal does; in memory it is not.
    pub fn seal(
        &mut self,
        kind: nfcpay_protocol::messages::HalfKind,
        plaintext: &[u8],
    ) -> Result<(nfcpay_terminal_agent::halves::TransactionKeys, Vec<u8>)> {
        use nfcpay_terminal_agent::halves::TransactionKeys;
        let keys = match &mut self.memory_keys {
            Some(memory) => {
                // Not saved anywhere: a crash now could hand the same KSN out again.
                let (ksn, transaction_key) = memory
                    .state
                    .next_transaction_key(&mut TerminalKeys(self.store.as_ref()))?;
                let keys = TransactionKeys::derive(Arc::clone(&self.store), ksn, &transaction_key);
                self.store.destroy(transaction_key)?;
                keys?
            }
            None => {
                // Saved durably before it is returned; destroyed (dropped) at the end of this
                // block, once its working keys exist.
                let (ksn, transaction_key) = self.terminal.keys.next_transaction()?;
                TransactionKeys::derive(Arc::clone(&self.store), ksn, transaction_key.handle())?
            }
        };
        let envelope =
            keys.seal_half(kind, self.id(), plaintext, nfcpay_daemon::service::now_ms())?;
        Ok((keys, envelope))
    }

    /// Submits a sealed half.
    pub async fn submit(
        &self,
        kind: nfcpay_protocol::messages::HalfKind,
        envelope: Vec<u8>,
        wait: Duration,
    ) -> Result<
        nfcpay_terminal_agent::platform::HalfReply,
        nfcpay_terminal_agent::platform::PlatformError,
    > {
        self.terminal
            .platform
            .submit_half(kind, envelope, wait)
            .await
    }

    /// Opens a receipt for the half sealed with `keys`.
    pub fn open_receipt(
        &self,
        keys: &nfcpay_terminal_agent::halves::TransactionKeys,
        receipt: &[u8],
    ) -> Result<nfcpay_protocol::messages::Receipt> {
        Ok(keys.open_receipt(receipt, self.id(), &self.terminal.receipt_public_key)?)
    }
}

/// What a ledger holds, for "nothing changed" checks: every row but the audit log
/// ([`Storage::dump_state`](nfcpay_daemon::storage::Storage::dump_state)), and how many audit
/// records there are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerSnapshot {
    /// The text dump of every ledger row except the audit log.
    pub state: String,
    /// Audit records in the (verified) chain.
    pub audit_records: u64,
}

impl LedgerSnapshot {
    /// Takes a snapshot; fails when the audit chain does not verify.
    pub fn of(storage: &nfcpay_daemon::storage::Storage) -> Result<Self> {
        let report = storage.audit_verify()?;
        if let Some(broken) = &report.first_break {
            bail!(
                "audit chain broken at record {}: {}",
                broken.seq,
                broken.reason
            );
        }
        Ok(Self {
            state: storage.dump_state()?,
            audit_records: report.records,
        })
    }
}

impl PlatformFixture {
    /// The SoftHSM2 token directory (`tokens/` beside `softhsm2.conf`).
    pub fn token_dir(&self) -> PathBuf {
        self.dir().join("tokens")
    }

    /// Kills the daemon with SIGKILL (a crash: nothing is drained or flushed beyond what was
    /// committed) and starts it again on the same ports, with the same configuration.
    pub fn kill_and_restart(&mut self) -> Result<()> {
        if let Some(mut child) = self.daemon.take() {
            child.kill()?;
            child.wait()?;
        }
        self.start_daemon()
    }

    /// Restarts the daemon (as [`Self::restart`]) logging with `filter` as `NFCPAY_LOG` (e.g.
    /// `trace`, to see everything it could ever log). Its log starts afresh.
    pub fn restart_logging(&mut self, filter: &str) -> Result<()> {
        self.stop()?;
        filter.clone_into(&mut self.log_filter);
        self.start_daemon()
    }

    /// Stops the daemon (SIGTERM) and starts it again on the same ports, with the same
    /// configuration, token and ledger. Clients must reconnect.
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.start_daemon()
    }

    /// Registers a terminal with extra `terminals add` arguments (e.g. `--bdk-id`,
    /// `--code-validity-hours`); returns its one-time enrollment code.
    pub fn add_terminal_with(
        &self,
        id: &str,
        account: &str,
        extra: &[&str],
    ) -> Result<Zeroizing<String>> {
        let mut args = vec!["terminals", "add", "--id", id, "--account", account];
        args.extend_from_slice(extra);
        let out = self.admin_ok(&args)?;
        let code = out
            .lines()
            .find_map(|line| line.strip_prefix("enrollment code: "))
            .context("no enrollment code in `terminals add` output")?;
        Ok(Zeroizing::new(code.trim().to_owned()))
    }

    /// Enrolls a terminal registered already (with [`Self::add_terminal`] or
    /// [`Self::add_terminal_with`]) using `code`, with a software keystore of its own.
    pub async fn enroll_with_code(
        &self,
        terminal_id: &str,
        account: &str,
        code: &Zeroizing<String>,
    ) -> Result<TestTerminal> {
        let dir = tempfile::Builder::new()
            .prefix("nfcpay-terminal")
            .tempdir()?;
        let store: Arc<dyn Keystore> =
            Arc::new(SoftwareKeystore::open(&dir.path().join("keystore.json"))?);
        let ca = self.ca_pem()?;
        let id: TerminalId = terminal_id.parse()?;
        let target = self.enrollment_target(&ca);
        let terminal = enroll(Arc::clone(&store), dir.path(), &target, &id, code).await?;
        Ok(TestTerminal {
            terminal,
            store,
            account: account.parse()?,
            memory_keys: None,
            _dir: dir,
        })
    }

    /// Where a terminal enrolls (the listener serving `POST /v1/enroll`), trusting `ca_pem`
    /// (normally [`Self::ca_pem`]).
    pub fn enrollment_target<'a>(&'a self, ca_pem: &'a [u8]) -> EnrollmentTarget<'a> {
        EnrollmentTarget {
            address: &self.address,
            enroll_address: &self.enroll_address,
            server_name: "localhost",
            ca_pem,
        }
    }
}

impl TestTerminal {
    /// The terminal's directory: `terminal.json`, its certificate, the DUKPT state.
    pub fn dir(&self) -> &Path {
        self._dir.path()
    }

    /// Another client of the platform as this terminal, on a connection of its own (the
    /// DUKPT state is not opened): for holding many connections.
    pub fn another_client(&self) -> Result<nfcpay_terminal_agent::platform::PlatformClient> {
        Ok(nfcpay_terminal_agent::enroll::platform_client(
            &self.store,
            self.dir(),
        )?)
    }

    /// From now on keeps the DUKPT state in memory only: [`Self::seal`] no longer saves it
    /// before each key, so a crash could hand out a KSN again. For the load generator, so
    /// that its figure measures the platform rather than the simulated terminals' fsyncs;
    /// never for a real terminal. The saved state is left as it is now and must not be
    /// opened again after this (its counter falls behind).
    pub fn danger_keep_keys_in_memory(&mut self) -> Result<()> {
        if self.memory_keys.is_some() {
            return Ok(());
        }
        let status = self.terminal.keys.status();
        // The registers the saved state uses, loaded as `TerminalKeyState::open` loads them.
        let mut registers: [Option<KeyHandle>; FUTURE_KEY_REGISTERS] =
            std::array::from_fn(|_| None);
        for (register, slot) in registers.iter_mut().enumerate() {
            if status
                .next_counter
                .and_then(|next| register_counter(register, next))
                .is_some()
            {
                *slot = self.store.load_key(&register_label(register))?;
            }
        }
        let state = TerminalState::from_parts(
            status.initial_key_id,
            status.algorithm,
            status.next_counter,
            registers,
        )?;
        self.memory_keys = Some(MemoryKeys {
            store: Arc::clone(&self.store),
            state,
        });
        Ok(())
    }
}

/// A terminal's DUKPT state held in memory only; its register keys are transient keystore
/// objects, destroyed on drop.
struct MemoryKeys {
    store: Arc<dyn Keystore>,
    state: TerminalState<KeyHandle>,
}

impl Drop for MemoryKeys {
    fn drop(&mut self) {
        self.state
            .discard_all(&mut TerminalKeys(self.store.as_ref()));
    }
}
