//! Shared by the integration tests that need emulated readers: start `nfcpay-pn532-sim`, read
//! its connection strings, watch its log, and kill it on drop.

// Test harness: a failed expectation here is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, kill_process};

/// Longest to wait for the emulator to report something.
pub const EMULATOR_EVENT_WAIT_MAX: Duration = Duration::from_secs(10);

/// The emulator process; killed on drop.
pub struct Emulator {
    child: Option<Child>,
    connstrings: Vec<String>,
    log: Receiver<String>,
}

impl Emulator {
    /// Starts `nfcpay-pn532-sim --devices <devices>` and waits for its connection strings.
    pub fn start(devices: usize) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_nfcpay-pn532-sim"))
            .args(["--devices", &devices.to_string()])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start nfcpay-pn532-sim");
        let stderr = child.stderr.take().expect("stderr is piped");
        let (log_sender, log) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if log_sender.send(line).is_err() {
                    break;
                }
            }
        });
        let stdout = child.stdout.take().expect("stdout is piped");
        // The connection strings are the readiness signal; if the emulator dies instead,
        // stdout closes and reading ends.
        let connstrings: Vec<String> = BufReader::new(stdout)
            .lines()
            .take(devices)
            .map_while(Result::ok)
            .collect();
        let emulator = Self {
            child: Some(child),
            connstrings,
            log,
        };
        assert_eq!(
            emulator.connstrings.len(),
            devices,
            "emulator printed {:?}; its log: {:?}",
            emulator.connstrings,
            emulator.log.try_iter().collect::<Vec<_>>()
        );
        for connstring in &emulator.connstrings {
            assert!(
                connstring.starts_with("pn532_uart:/dev/pts/"),
                "unexpected connstring {connstring}"
            );
        }
        emulator
    }

    /// The connection string of reader `device`.
    pub fn connstring(&self, device: usize) -> &str {
        &self.connstrings[device]
    }

    /// The pseudo-terminal of reader `device`: the host's end of its line.
    pub fn pty_path(&self, device: usize) -> PathBuf {
        PathBuf::from(
            self.connstrings[device]
                .strip_prefix("pn532_uart:")
                .expect("connstring names the pn532_uart driver"),
        )
    }

    /// Waits until the emulator logs a line containing every one of `needles`.
    pub fn wait_for_log(&self, needles: &[&str]) {
        let deadline = Instant::now() + EMULATOR_EVENT_WAIT_MAX;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.log.recv_timeout(left) {
                Ok(line) if needles.iter().all(|needle| line.contains(needle)) => return,
                Ok(line) => seen.push(line),
                Err(_) => panic!("emulator never logged {needles:?}; it logged {seen:#?}"),
            }
        }
    }

    /// Sends `signal` and waits (bounded) for the emulator to exit.
    pub fn stop_with(mut self, signal: Signal) -> ExitStatus {
        let child = self.child.take().expect("the emulator runs until stopped");
        kill_process(Pid::from_child(&child), signal).expect("signal the emulator");
        let (sender, receiver) = mpsc::channel();
        let mut child = child;
        std::thread::spawn(move || {
            let _ = sender.send(child.wait());
        });
        receiver
            .recv_timeout(EMULATOR_EVENT_WAIT_MAX)
            .expect("emulator exits after the signal")
            .expect("wait for the emulator")
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
