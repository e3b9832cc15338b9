//! The payment part of `cargo xtask demo`: the platform daemon on SQLite, two accounts, two
//! terminals enrolled through `nfcpay-agent enroll` with one-time codes, the PN532 emulator,
//! a payment of 12.50 EUR from one agent to the other over emulated NFC, and re-sends of a
//! captured half to show what the platform does with a replay.
//!
//! The daemon and the emulator are child processes in process groups of their own (so a
//! Ctrl-C at the terminal reaches only the demo, which then stops them with SIGTERM and waits);
//! [`Service`] stops them on drop too, so a failed step leaves nothing running.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::command;

/// How long the daemon may take to answer `/readyz`.
const DAEMON_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a child has to stop after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// The payee: a shop terminal and its account.
pub const PAYEE_TERMINAL: &str = "shop-1";
pub const PAYEE_ACCOUNT: &str = "shop";
/// The payer: a phone and its account, funded with [`PAYER_FUNDS`].
pub const PAYER_TERMINAL: &str = "alice-phone";
pub const PAYER_ACCOUNT: &str = "alice";
pub const PAYER_FUNDS: &str = "100.00";
pub const CURRENCY: &str = "EUR";
pub const AMOUNT: &str = "12.50";

/// The workspace's built binaries (`cargo build --workspace --bins`).
pub struct Binaries {
    dir: PathBuf,
}

impl Binaries {
    pub fn new(root: &Path) -> Self {
        Self {
            dir: Self::target(root).join("debug"),
        }
    }

    /// The release build's binaries.
    pub fn release(root: &Path) -> Self {
        Self {
            dir: Self::target(root).join("release"),
        }
    }

    /// The cargo target directory.
    pub fn target(root: &Path) -> PathBuf {
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// A child process stopped with SIGTERM (then killed, if it must be) when dropped.
pub struct Service {
    name: &'static str,
    child: Option<Child>,
}

impl Service {
    /// Starts `command` in a process group of its own.
    fn start(name: &'static str, command: &mut Command) -> Result<Self> {
        let child = command
            .process_group(0)
            .spawn()
            .with_context(|| format!("could not start {name}"))?;
        Ok(Self {
            name,
            child: Some(child),
        })
    }

    fn child(&mut self) -> Result<&mut Child> {
        self.child.as_mut().context("already stopped")
    }

    /// SIGTERM, then waits; returns the exit status text.
    pub fn stop(&mut self) -> Result<String> {
        let Some(mut child) = self.child.take() else {
            return Ok("already stopped".into());
        };
        let pid = rustix::process::Pid::from_child(&child);
        // The child may already be gone; waiting below tells.
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait()? {
                return Ok(status.to_string());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        child.kill()?;
        child.wait()?;
        bail!(
            "{} did not stop within {STOP_TIMEOUT:?} of SIGTERM: killed",
            self.name
        )
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if self.child.is_some()
            && let Err(error) = self.stop()
        {
            eprintln!("{error:#}");
        }
    }
}

/// Where the platform listens.
pub struct Addresses {
    /// Terminal listener (mutual TLS).
    pub terminal: String,
    /// Enrollment listener, when the daemon has one apart from the terminal listener.
    pub enroll: Option<String>,
    /// Operations listener (`/readyz`).
    pub ops: String,
}

impl Addresses {
    /// Three distinct free loopback ports: terminals, enrollment, operations.
    pub fn free(_root: &Path) -> Result<Self> {
        // Bound all at once, so the kernel cannot hand out the same port twice.
        let listeners = (0..3)
            .map(|_| TcpListener::bind("127.0.0.1:0"))
            .collect::<std::io::Result<Vec<_>>>()?;
        let address = |index: usize| -> Result<String> {
            Ok(format!(
                "127.0.0.1:{}",
                listeners[index].local_addr()?.port()
            ))
        };
        Ok(Self {
            terminal: address(0)?,
            enroll: Some(address(1)?),
            ops: address(2)?,
        })
    }
}

/// The `[database]`, `[server]` and `[platform]` sections of the demo's configuration.
pub fn platform_config(dir: &Path, addresses: &Addresses, bdk_id: &str, root_user: bool) -> String {
    let dir = dir.display();
    let enroll = addresses
        .enroll
        .as_ref()
        .map(|address| format!("enroll_listen = \"{address}\"\n"))
        .unwrap_or_default();
    let allow_root = if root_user {
        "# The demo runs as root here (a container?): allowed for the demo only.\nallow_root = true\n"
    } else {
        ""
    };
    format!(
        "\n[database]\nurl = \"sqlite://{dir}/ledger.db\"\n\n[server]\nlisten = \"{terminal}\"\n\
         {enroll}ops_listen = \"{ops}\"\ncertificate_chain = \"{dir}/pki/server.pem\"\n\
         client_ca = \"{dir}/pki/ca.pem\"\n\n[platform]\npki_dir = \"{dir}/pki\"\n\
         enrollment_bdk_id = \"{bdk_id}\"\n{allow_root}",
        terminal = addresses.terminal,
        ops = addresses.ops,
    )
}

/// Starts `nfcpayd` and waits until `/readyz` answers 200.
pub fn start_daemon(
    binaries: &Binaries,
    config: &Path,
    softhsm_config: &Path,
    log: &Path,
    ops: &str,
) -> Result<Service> {
    let log_file = std::fs::File::create(log)?;
    let mut command = Command::new(binaries.path("nfcpayd"));
    command
        .arg("--config")
        .arg(config)
        .env("SOFTHSM2_CONF", softhsm_config)
        .env("NFCPAY_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file);
    println!(
        "$ {}    (log: {})",
        command::describe(&command),
        log.display()
    );
    let mut daemon = Service::start("nfcpayd", &mut command)?;
    let deadline = Instant::now() + DAEMON_READY_TIMEOUT;
    while Instant::now() < deadline {
        if let Some(status) = daemon.child()?.try_wait()? {
            daemon.child = None;
            bail!(
                "nfcpayd exited ({status}):\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        if http_status(ops, "/readyz").is_ok_and(|status| status == 200) {
            println!("nfcpayd is ready (GET http://{ops}/readyz: 200)");
            return Ok(daemon);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("nfcpayd not ready within {DAEMON_READY_TIMEOUT:?}")
}

/// The status code of a plain HTTP GET.
fn http_status(address: &str, path: &str) -> Result<u16> {
    let mut stream = TcpStream::connect(address)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head)?;
    let text = String::from_utf8_lossy(&head);
    text.get(9..12)
        .and_then(|code| code.parse().ok())
        .context("not an HTTP answer")
}

/// The running emulator and its readers.
pub struct Emulator {
    pub service: Service,
    pub connstrings: Vec<String>,
}

/// Starts `nfcpay-pn532-sim --devices 2` and reads its connection strings.
pub fn start_emulator(binaries: &Binaries, log: &Path) -> Result<Emulator> {
    let mut command = Command::new(binaries.path("nfcpay-pn532-sim"));
    command
        .args(["--devices", "2"])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log)?);
    println!(
        "$ {}    (log: {})",
        command::describe(&command),
        log.display()
    );
    let mut service = Service::start("nfcpay-pn532-sim", &mut command)?;
    let stdout = service.child()?.stdout.take().context("stdout is piped")?;
    let connstrings: Vec<String> = BufReader::new(stdout)
        .lines()
        .take(2)
        .map_while(Result::ok)
        .collect();
    if connstrings.len() != 2 || !connstrings.iter().all(|c| c.starts_with("pn532_uart:")) {
        bail!("the emulator printed {connstrings:?}");
    }
    Ok(Emulator {
        service,
        connstrings,
    })
}

/// `nfcpay-agent --dir DIR ARGS`, libnfc opening only the readers it is given.
pub fn agent(binaries: &Binaries, dir: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(binaries.path("nfcpay-agent"));
    command
        .arg("--dir")
        .arg(dir)
        .args(args)
        .env("LIBNFC_AUTO_SCAN", "false")
        .env("LIBNFC_INTRUSIVE_SCAN", "false")
        .env_remove("LIBNFC_DEVICE")
        .env_remove("LIBNFC_DEFAULT_DEVICE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// Runs an agent command, printing what it runs and what it printed (indented).
pub fn run_agent(name: &str, command: &mut Command) -> Result<Output> {
    println!("$ {}", command::describe(command));
    let output = command.output().context("could not run nfcpay-agent")?;
    show(name, &output);
    Ok(output)
}

/// Prints a finished agent's output, each line prefixed with its terminal's name.
pub fn show(name: &str, output: &Output) {
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        println!("  {name} | {line}");
    }
    for line in String::from_utf8_lossy(&output.stderr).lines() {
        println!("  {name} ! {line}");
    }
    println!("  {name}: exit {}", output.status.code().unwrap_or(-1));
}

/// The value after `label` on a line of `text` (e.g. `settlement id:`).
pub fn field<'a>(text: &'a str, label: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|line| line.trim_start().strip_prefix(label))
        .map(str::trim)
}

/// The enrollment code in `nfcpay-admin terminals add` output.
pub fn enrollment_code(admin_output: &str) -> Result<String> {
    field(admin_output, "enrollment code:")
        .map(str::to_owned)
        .context("no enrollment code in `terminals add` output")
}

/// The balance in `nfcpay-admin accounts show` output (`… balance 87.50 EUR (…`).
pub fn balance(accounts_show: &str) -> Result<String> {
    accounts_show
        .lines()
        .next()
        .and_then(|first| first.split("balance ").nth(1))
        .and_then(|rest| rest.split(" (").next())
        .map(|balance| balance.trim().to_owned())
        .context("no balance in `accounts show` output")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_codes_and_balances_are_read() {
        let receipt = "receipt (verified):\n  status:        settled\n  settlement id: 7\n";
        assert_eq!(field(receipt, "status:"), Some("settled"));
        assert_eq!(field(receipt, "settlement id:"), Some("7"));
        assert_eq!(field(receipt, "payer:"), None);
        assert_eq!(
            enrollment_code("terminal shop-1\nenrollment code: AB12-CD34\n").ok(),
            Some("AB12-CD34".into())
        );
        assert_eq!(
            balance("alice: balance 87.50 EUR (limit 0.00 EUR)\n").ok(),
            Some("87.50 EUR".into())
        );
        assert!(balance("nothing").is_err());
    }

    #[test]
    fn the_platform_config_allows_root_only_when_asked() {
        let addresses = Addresses {
            terminal: "127.0.0.1:1".into(),
            enroll: None,
            ops: "127.0.0.1:2".into(),
        };
        let config = platform_config(Path::new("/d"), &addresses, "0123ABCD", false);
        assert!(!config.contains("allow_root"));
        assert!(!config.contains("enroll_listen"));
        assert!(config.contains("listen = \"127.0.0.1:1\""));
        let addresses = Addresses {
            enroll: Some("127.0.0.1:3".into()),
            ..addresses
        };
        let config = platform_config(Path::new("/d"), &addresses, "0123ABCD", true);
        assert!(config.contains("allow_root = true"));
        assert!(config.contains("enroll_listen = \"127.0.0.1:3\""));
    }
}
