//! Unmodified libnfc 1.8 (Debian's libnfc-bin and libnfc-examples) against nfcpay-pn532-sim:
//! libnfc opens the emulated readers, lists them, and runs an NFC-DEP exchange between two of
//! them through the shared virtual field.
//!
//! A missing libnfc tool fails the test with the Debian package to install.

// Test harness: a failed expectation here is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nfcpay_pn532_sim::command::code;
use nfcpay_pn532_sim::frame::{
    Frame, FrameDecoder, InformationFrame, TFI_PN532_TO_HOST, encode_command,
};
use rustix::event::{PollFd, PollFlags, Timespec, poll};
use rustix::process::{Pid, Signal, kill_process};
use support::{EMULATOR_EVENT_WAIT_MAX, Emulator};

/// Longest any libnfc tool may run in these tests.
const TOOL_RUN_MAX: Duration = Duration::from_secs(15);
/// Longest to wait for one frame on a line the test drives itself.
const LINE_FRAME_WAIT_MAX: Duration = Duration::from_secs(10);

/// Debian package of nfc-list and nfc-scan-device.
const PACKAGE_LIBNFC_BIN: &str = "libnfc-bin";
/// Debian package of nfc-dep-target and nfc-dep-initiator.
const PACKAGE_LIBNFC_EXAMPLES: &str = "libnfc-examples";

/// A libnfc command-line tool: its name, and the Debian package to install when it is missing.
#[derive(Clone, Copy)]
struct LibnfcTool(&'static str, &'static str);

const NFC_SCAN_DEVICE: LibnfcTool = LibnfcTool("nfc-scan-device", PACKAGE_LIBNFC_BIN);
const NFC_LIST: LibnfcTool = LibnfcTool("nfc-list", PACKAGE_LIBNFC_BIN);
const NFC_DEP_TARGET: LibnfcTool = LibnfcTool("nfc-dep-target", PACKAGE_LIBNFC_EXAMPLES);
const NFC_DEP_INITIATOR: LibnfcTool = LibnfcTool("nfc-dep-initiator", PACKAGE_LIBNFC_EXAMPLES);

/// A running libnfc tool; killed on drop.
struct Tool {
    name: &'static str,
    child: Option<Child>,
}

/// What a libnfc tool printed.
#[derive(Debug)]
struct ToolRun {
    tool: &'static str,
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Tool {
    /// Starts `tool` on one emulated reader.
    fn start(tool: LibnfcTool, args: &[&str], connstring: &str) -> Self {
        let LibnfcTool(name, package) = tool;
        let path = find_tool(name, package);
        let child = Command::new(path)
            .args(args)
            .env("LIBNFC_DEVICE", connstring)
            .env("LIBNFC_AUTO_SCAN", "false")
            .env("LIBNFC_INTRUSIVE_SCAN", "false")
            .env_remove("LIBNFC_DEFAULT_DEVICE")
            .env_remove("LIBNFC_LOG_LEVEL")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start {name}: {error}"));
        Self {
            name,
            child: Some(child),
        }
    }

    /// Waits for the tool to exit, killing it after [`TOOL_RUN_MAX`].
    fn finish(mut self) -> ToolRun {
        let child = self.child.take().expect("finish is called once");
        let pid = Pid::from_child(&child);
        let (sender, receiver) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = sender.send(child.wait_with_output());
        });
        match receiver.recv_timeout(TOOL_RUN_MAX) {
            Ok(Ok(output)) => ToolRun {
                tool: self.name,
                status: output.status,
                stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            },
            Ok(Err(error)) => panic!("{} failed to run: {error}", self.name),
            Err(_) => {
                let _ = kill_process(pid, Signal::KILL);
                let partial = receiver.recv_timeout(EMULATOR_EVENT_WAIT_MAX);
                panic!(
                    "{} still running after {TOOL_RUN_MAX:?} (hang); output: {partial:?}",
                    self.name
                );
            }
        }
    }

    fn interrupt(&self) {
        if let Some(child) = &self.child {
            let _ = kill_process(Pid::from_child(child), Signal::INT);
        }
    }
}

impl Drop for Tool {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl ToolRun {
    fn assert_success(&self) {
        assert!(self.status.success(), "{} failed: {self:#?}", self.tool);
    }

    fn assert_stdout_contains(&self, text: &str) {
        assert!(
            self.stdout.contains(text),
            "{text:?} not printed: {self:#?}"
        );
    }

    fn assert_stderr_contains(&self, text: &str) {
        assert!(
            self.stderr.contains(text),
            "{text:?} not printed: {self:#?}"
        );
    }
}

fn run_tool(tool: LibnfcTool, args: &[&str], connstring: &str) -> ToolRun {
    Tool::start(tool, args, connstring).finish()
}

/// Finds a libnfc tool on PATH, failing with the package to install when it is missing.
fn find_tool(name: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{name} not found on PATH: install Debian package {package} \
                 (apt-get install -y {package}); these tests need unmodified libnfc 1.8"
            )
        })
}

/// Starts nfc-dep-target on reader 0 and returns once it is armed: the emulator says device 0
/// runs TgInitAsTarget. Also returns the `pty=` field that names reader 0 in the emulator's log.
fn arm_dep_target(emulator: &Emulator) -> (Tool, String) {
    let target = Tool::start(NFC_DEP_TARGET, &[], emulator.connstring(0));
    let pty = format!("pty={:?}", emulator.pty_path(0).display().to_string());
    emulator.wait_for_log(&["target armed", &pty]);
    (target, pty)
}

#[test]
fn nfc_scan_device_opens_the_emulated_pn532() {
    let emulator = Emulator::start(2);
    for device in 0..2 {
        let connstring = emulator.connstring(device);
        let run = run_tool(NFC_SCAN_DEVICE, &["-v"], connstring);
        run.assert_success();
        run.assert_stdout_contains("1 NFC device(s) found");
        run.assert_stdout_contains(connstring);
        // libnfc read the firmware version and decoded it as a PN532 v1.6.
        run.assert_stdout_contains("chip: PN532 v1.6");
        run.assert_stdout_contains("D.E.P.");
    }
}

#[test]
fn nfc_list_opens_the_emulated_pn532_and_finds_no_card() {
    let emulator = Emulator::start(1);
    let run = run_tool(NFC_LIST, &["-v"], emulator.connstring(0));
    run.assert_success();
    run.assert_stdout_contains("NFC device: ");
    run.assert_stdout_contains(" opened");
    run.assert_stdout_contains("0 ISO14443A passive target(s) found");
    run.assert_stdout_contains("0 Felica (212 kbps) passive target(s) found");
    assert!(!run.stderr.contains("Unable to open"), "{run:#?}");
}

#[test]
fn nfc_dep_target_and_initiator_exchange_through_the_shared_field() {
    let emulator = Emulator::start(2);
    let (target, _) = arm_dep_target(&emulator);

    let initiator = run_tool(NFC_DEP_INITIATOR, &[], emulator.connstring(1));
    let target = target.finish();

    initiator.assert_success();
    target.assert_success();
    // nfc-dep-initiator sends "Hello World!" and prints the target's answer.
    initiator.assert_stdout_contains("Sending: Hello World!");
    initiator.assert_stdout_contains("Received: Hello Mars!");
    // The initiator saw the target's NFCID3 and general bytes from TgInitAsTarget.
    initiator.assert_stdout_contains("NFCID3: 12  34  56  78  9a  bc  de  ff  00  00");
    // nfc-dep-target prints what it received and what it answered.
    target.assert_stdout_contains("Received: Hello World!");
    target.assert_stdout_contains("Sending: Hello Mars!");
    target.assert_stdout_contains("Data sent.");
}

#[test]
fn nfc_list_sees_an_armed_dep_target_as_an_iso14443a_card() {
    let emulator = Emulator::start(2);
    let (target, _) = arm_dep_target(&emulator);

    let run = run_tool(NFC_LIST, &["-t", "1"], emulator.connstring(1));
    run.assert_success();
    run.assert_stdout_contains("1 ISO14443A passive target(s) found");
    // UID: 0x08 then the three NFCID1 bytes nfc-dep-target configures; SAK 0x40 (NFC-DEP).
    run.assert_stdout_contains("08  12  34  56");
    run.assert_stdout_contains("SAK (SEL_RES): 40");

    // SIGINT makes nfc-dep-target abort TgInitAsTarget with an ACK frame; it then exits.
    target.interrupt();
    let target = target.finish();
    assert!(!target.status.success(), "{target:#?}");
    target.assert_stdout_contains("Waiting for initiator request");
}

#[test]
fn initiator_without_a_target_fails_instead_of_hanging() {
    let emulator = Emulator::start(2);
    let run = run_tool(NFC_DEP_INITIATOR, &[], emulator.connstring(1));
    assert!(!run.status.success(), "{run:#?}");
    run.assert_stderr_contains("nfc_initiator_select_dep_target");
    // The reader is still usable afterwards.
    let run = run_tool(NFC_LIST, &[], emulator.connstring(1));
    run.assert_success();
    run.assert_stdout_contains(" opened");
}

#[test]
fn a_killed_libnfc_process_leaves_the_field_and_the_reader_usable() {
    let emulator = Emulator::start(2);
    let (target, pty) = arm_dep_target(&emulator);
    // SIGKILL: libnfc neither releases the target nor restores the line settings.
    drop(target);
    emulator.wait_for_log(&["host line closed", &pty]);

    // The armed target left the field with its host...
    let run = run_tool(NFC_LIST, &["-v", "-t", "1"], emulator.connstring(1));
    run.assert_success();
    run.assert_stdout_contains("0 ISO14443A passive target(s) found");
    // ...and its reader opens again.
    let run = run_tool(NFC_LIST, &["-t", "1"], emulator.connstring(0));
    run.assert_success();
    run.assert_stdout_contains(" opened");
}

/// The test plays the target's host itself on device 0, speaking PN532 frames, and closes its
/// line in the middle of the exchange; libnfc's initiator on device 1 must get an error.
#[test]
fn initiator_gets_an_error_when_the_target_vanishes_mid_exchange() {
    let emulator = Emulator::start(2);
    let mut line = HostLine::open(&emulator.pty_path(0));

    let mut target_config = vec![0x02, 0x08, 0x00, 0x12, 0x34, 0x56, 0x40];
    target_config.extend([0; 18]);
    target_config.extend([0xA1, 0xA2, 0xA3, 0xA4, 0xA5, 0xA6, 0xA7, 0xA8, 0xA9, 0xAA]);
    target_config.extend([0x00, 0x00]);
    line.send(code::TG_INIT_AS_TARGET, &target_config);
    assert_eq!(line.next_frame(), Frame::Ack);
    // The ACK comes once the target is armed, so the initiator can start now.
    let initiator = Tool::start(NFC_DEP_INITIATOR, &[], emulator.connstring(1));
    let activation = line.next_response(code::TG_INIT_AS_TARGET);
    assert_eq!(
        activation[0] & 0x04,
        0x04,
        "activated in DEP mode: {activation:02x?}"
    );

    line.send(code::TG_GET_DATA, &[]);
    assert_eq!(line.next_frame(), Frame::Ack);
    let data = line.next_response(code::TG_GET_DATA);
    assert_eq!(data, b"\x00Hello World!\0");

    // The target's host goes away without answering.
    drop(line);
    let run = initiator.finish();
    assert!(!run.status.success(), "{run:#?}");
    run.assert_stderr_contains("nfc_initiator_transceive_bytes");
    assert!(!run.stdout.contains("Received:"), "{run:#?}");
    emulator.wait_for_log(&["DEP target left the field"]);
}

#[test]
fn sigterm_stops_the_emulator_cleanly() {
    let emulator = Emulator::start(2);
    let status = emulator.stop_with(Signal::TERM);
    assert!(status.success(), "emulator exit status {status}");
}

#[test]
fn sigint_stops_the_emulator_cleanly() {
    let emulator = Emulator::start(1);
    let status = emulator.stop_with(Signal::INT);
    assert!(status.success(), "emulator exit status {status}");
}

/// The slave side of an emulated reader's line, driven by the test as a PN532 host would.
struct HostLine {
    file: std::fs::File,
    decoder: FrameDecoder,
    frames: std::collections::VecDeque<Frame>,
}

impl HostLine {
    fn open(path: &std::path::Path) -> Self {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(rustix::fs::OFlags::NOCTTY.bits() as i32)
            .open(path)
            .unwrap_or_else(|error| panic!("open {}: {error}", path.display()));
        Self {
            file,
            decoder: FrameDecoder::new(),
            frames: std::collections::VecDeque::new(),
        }
    }

    fn send(&mut self, command_code: u8, params: &[u8]) {
        let frame = encode_command(command_code, params).expect("command fits a frame");
        self.file.write_all(&frame).expect("write to the line");
    }

    fn next_frame(&mut self) -> Frame {
        let deadline = Instant::now() + LINE_FRAME_WAIT_MAX;
        while self.frames.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no frame from the emulator");
            let timeout = Timespec::try_from(left).expect("small timeout");
            let mut fds = [PollFd::new(&self.file, PollFlags::IN)];
            poll(&mut fds, Some(&timeout)).expect("poll the line");
            if fds[0].revents().is_empty() {
                continue;
            }
            let mut buffer = [0_u8; 512];
            let read = rustix::io::read(self.file.as_fd(), &mut buffer).expect("read the line");
            for frame in self.decoder.feed(&buffer[..read]) {
                self.frames.push_back(frame.expect("well-formed frame"));
            }
        }
        self.frames.pop_front().expect("a frame is queued")
    }

    /// Next frame, which must be the response to `command_code`; returns its data.
    fn next_response(&mut self, command_code: u8) -> Vec<u8> {
        match self.next_frame() {
            Frame::Information(InformationFrame { tfi, payload })
                if tfi == TFI_PN532_TO_HOST && payload.first() == Some(&(command_code + 1)) =>
            {
                payload[1..].to_vec()
            }
            other => panic!("expected response to {command_code:#04x}, got {other:?}"),
        }
    }
}
