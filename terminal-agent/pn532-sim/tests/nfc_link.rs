//! The agent's NFC transport through real libnfc (Debian's libnfc 1.8, through `nfc1`) and the
//! emulated PN532 readers of `nfcpay-pn532-sim`: one terminal as NFC-DEP initiator, the other as
//! target, each on its own thread with its own libnfc context and reader, in both layouts
//! (payee as initiator, payee as target), with a terminal taken away mid-message.
//!
//! Readers are opened by connection string, so no libnfc environment variable is needed, except
//! by the child process of `libnfc_lists_the_reader_named_by_libnfc_device`.

// Test harness: a failed expectation here is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use nfcpay_terminal_agent::nfc::libnfc::{DepSpeed, DeviceOrigin, Probe};
use nfcpay_terminal_agent::nfc::{
    Connstring, DepInitiator, DepTarget, LibnfcInitiator, LibnfcTarget, LinkLoss, NfcError,
    NfcLink, Role, Timeouts, devices, random_message_id, receive_message, send_message,
};
use support::Emulator;

/// Generous for a loaded 2-core machine; the emulator answers in microseconds.
const TIMEOUTS: Timeouts = Timeouts {
    exchange: Duration::from_secs(2),
    first_frame: Duration::from_secs(10),
    linger: Duration::from_secs(1),
};
/// How long an initiator looks for a target, and a target waits to be activated.
const CONNECT_WAIT: Duration = Duration::from_secs(10);
/// A failure must be reported within this: every attempt of one exchange, and some slack.
const FAILURE_REPORTED_WITHIN: Duration = Duration::from_secs(12);

fn connstring(emulator: &Emulator, device: usize) -> Connstring {
    Connstring::try_from(emulator.connstring(device)).unwrap()
}

fn payment_request(length: usize) -> Vec<u8> {
    (0..length).map(|i| (i % 251) as u8 ^ 0x5A).collect()
}

/// Payee as initiator sends `message`; payer as target receives it. Returns what the payer
/// received.
fn payee_initiates(message: &[u8]) -> Vec<u8> {
    let emulator = Emulator::start(2);
    let payer_reader = connstring(&emulator, 0);
    let payee_reader = connstring(&emulator, 1);
    let payer = thread::spawn(move || {
        let mut target = LibnfcTarget::listen(&payer_reader, CONNECT_WAIT)?;
        receive_message(NfcLink::Target(&mut target), &TIMEOUTS)
    });
    let mut initiator = LibnfcInitiator::connect(&payee_reader, DepSpeed::Kbps212, CONNECT_WAIT)
        .expect("payee selects the payer's reader");
    let id = random_message_id().unwrap();
    send_message(NfcLink::Initiator(&mut initiator), id, message, &TIMEOUTS)
        .expect("payee's message delivered");
    initiator.release().unwrap();
    payer.join().unwrap().expect("payer received the message")
}

/// Payee as target sends `message`; payer as initiator receives it.
fn payee_is_target(message: Vec<u8>) -> Vec<u8> {
    let emulator = Emulator::start(2);
    let payee_reader = connstring(&emulator, 0);
    let payer_reader = connstring(&emulator, 1);
    let payee = thread::spawn(move || {
        let mut target = LibnfcTarget::listen(&payee_reader, CONNECT_WAIT)?;
        let id = random_message_id()?;
        send_message(NfcLink::Target(&mut target), id, &message, &TIMEOUTS)
    });
    let mut initiator = LibnfcInitiator::connect(&payer_reader, DepSpeed::Kbps106, CONNECT_WAIT)
        .expect("payer selects the payee's reader");
    let received = receive_message(NfcLink::Initiator(&mut initiator), &TIMEOUTS)
        .expect("payer received the message");
    drop(initiator);
    payee.join().unwrap().expect("payee's message delivered");
    received
}

#[test]
fn payee_as_initiator_sends_1000_bytes_to_payer_as_target() {
    let message = payment_request(1000);
    assert_eq!(payee_initiates(&message), message);
}

#[test]
fn payee_as_target_sends_1000_bytes_to_payer_as_initiator() {
    let message = payment_request(1000);
    assert_eq!(payee_is_target(message.clone()), message);
}

#[test]
fn a_4096_byte_message_crosses_in_both_layouts() {
    let message = payment_request(4096);
    assert_eq!(payee_initiates(&message), message);
    assert_eq!(payee_is_target(message.clone()), message);
}

/// A target whose terminal is taken away after answering `answers` frames: its reader is
/// closed (libnfc's `nfc_close` releases it from the field), as when the agent dies or the
/// reader is unplugged.
struct TakenAwayTarget {
    target: Option<LibnfcTarget>,
    answers: usize,
}

impl DepTarget for TakenAwayTarget {
    fn receive(&mut self, timeout: Duration) -> Result<Vec<u8>, NfcError> {
        if self.answers == 0 {
            self.target = None;
        }
        match &mut self.target {
            Some(target) => target.receive(timeout),
            None => Err(NfcError::LinkLost(LinkLoss::RfError)),
        }
    }

    fn send(&mut self, frame: &[u8], timeout: Duration) -> Result<(), NfcError> {
        self.answers = self.answers.saturating_sub(1);
        match &mut self.target {
            Some(target) => target.send(frame, timeout),
            None => Err(NfcError::LinkLost(LinkLoss::RfError)),
        }
    }
}

#[test]
fn payer_target_taken_away_mid_message_fails_both_terminals_and_delivers_nothing() {
    let emulator = Emulator::start(2);
    let payer_reader = connstring(&emulator, 0);
    let payee_reader = connstring(&emulator, 1);
    let payer = thread::spawn(move || {
        let target = LibnfcTarget::listen(&payer_reader, CONNECT_WAIT)?;
        let mut taken_away = TakenAwayTarget {
            target: Some(target),
            answers: 2,
        };
        receive_message(NfcLink::Target(&mut taken_away), &TIMEOUTS)
    });
    let mut initiator =
        LibnfcInitiator::connect(&payee_reader, DepSpeed::Kbps212, CONNECT_WAIT).unwrap();
    let id = random_message_id().unwrap();
    let started = Instant::now();
    // 1000 bytes: 5 chunks. The payer acknowledges 2, then its reader goes.
    let error = send_message(
        NfcLink::Initiator(&mut initiator),
        id,
        &payment_request(1000),
        &TIMEOUTS,
    )
    .unwrap_err();
    let elapsed = started.elapsed();
    match &error {
        NfcError::PeerGone {
            role: Role::Initiator,
            transfer,
            ..
        } => {
            assert_eq!(transfer.chunks_done, 2, "{error}");
            assert_eq!(transfer.chunk_count, Some(5), "{error}");
        }
        other => panic!("payee expected PeerGone, got {other:?}"),
    }
    assert!(
        error.to_string().contains("taken away after 2 of 5 chunks"),
        "{error}"
    );
    assert!(elapsed < FAILURE_REPORTED_WITHIN, "took {elapsed:?}");
    emulator.wait_for_log(&["DEP target left the field"]);

    // The payer got an error, not a message.
    match payer.join().unwrap() {
        Err(NfcError::PeerGone {
            role: Role::Target,
            transfer,
            ..
        }) => assert_eq!(transfer.chunks_done, 2),
        other => panic!("payer expected PeerGone, got {other:?}"),
    }
}

/// An initiator whose terminal is taken away after `exchanges` exchanges: its reader is closed.
struct TakenAwayInitiator {
    initiator: Option<LibnfcInitiator>,
    exchanges: usize,
}

impl DepInitiator for TakenAwayInitiator {
    fn exchange(&mut self, frame: &[u8], timeout: Duration) -> Result<Vec<u8>, NfcError> {
        if self.exchanges == 0 {
            // Closed without a release: the line just goes away.
            self.initiator = None;
        }
        self.exchanges = self.exchanges.saturating_sub(1);
        match &mut self.initiator {
            Some(initiator) => initiator.exchange(frame, timeout),
            None => Err(NfcError::LinkLost(LinkLoss::RfError)),
        }
    }

    fn release(&mut self) -> Result<(), NfcError> {
        self.initiator = None;
        Ok(())
    }
}

#[test]
fn payer_initiator_taken_away_mid_message_fails_the_sending_payee_target() {
    let emulator = Emulator::start(2);
    let payee_reader = connstring(&emulator, 0);
    let payer_reader = connstring(&emulator, 1);
    let payee = thread::spawn(move || {
        let mut target = LibnfcTarget::listen(&payee_reader, CONNECT_WAIT)?;
        let id = random_message_id()?;
        let started = Instant::now();
        let result = send_message(
            NfcLink::Target(&mut target),
            id,
            &payment_request(1000),
            &TIMEOUTS,
        );
        Ok::<_, NfcError>((result, started.elapsed()))
    });
    let initiator =
        LibnfcInitiator::connect(&payer_reader, DepSpeed::Kbps424, CONNECT_WAIT).unwrap();
    let mut taken_away = TakenAwayInitiator {
        initiator: Some(initiator),
        exchanges: 3,
    };
    let received = receive_message(NfcLink::Initiator(&mut taken_away), &TIMEOUTS);
    match received {
        Err(NfcError::PeerGone {
            role: Role::Initiator,
            transfer,
            ..
        }) => assert_eq!(transfer.chunks_done, 3),
        other => panic!("payer expected PeerGone, got {other:?}"),
    }
    let (sent, elapsed) = payee.join().unwrap().unwrap();
    match sent {
        // The payer's reader closed: the payee's reader reports the target released.
        Err(NfcError::PeerGone {
            role: Role::Target,
            transfer,
            cause: LinkLoss::Released,
        }) => assert_eq!(transfer.chunks_done, 2),
        other => panic!("payee expected PeerGone, got {other:?}"),
    }
    assert!(elapsed < FAILURE_REPORTED_WITHIN, "took {elapsed:?}");
}

#[test]
fn a_target_that_stops_answering_is_a_timeout_for_the_initiator() {
    let emulator = Emulator::start(2);
    let payer_reader = connstring(&emulator, 0);
    let payee_reader = connstring(&emulator, 1);
    let (stop_sender, stop) = std::sync::mpsc::channel::<()>();
    let payer = thread::spawn(move || {
        // Stays in the field, reads the first frame, never answers.
        let mut target = LibnfcTarget::listen(&payer_reader, CONNECT_WAIT).unwrap();
        let first = target.receive(CONNECT_WAIT).unwrap();
        let _ = stop.recv();
        first.len()
    });
    let timeouts = Timeouts {
        exchange: Duration::from_millis(500),
        ..TIMEOUTS
    };
    let mut initiator =
        LibnfcInitiator::connect(&payee_reader, DepSpeed::Kbps212, CONNECT_WAIT).unwrap();
    let id = random_message_id().unwrap();
    let error = send_message(
        NfcLink::Initiator(&mut initiator),
        id,
        &payment_request(300),
        &timeouts,
    )
    .unwrap_err();
    match &error {
        NfcError::Timeout {
            role: Role::Initiator,
            transfer,
            ..
        } => assert_eq!(transfer.chunks_done, 0, "{error}"),
        other => panic!("expected Timeout, got {other:?}"),
    }
    stop_sender.send(()).unwrap();
    assert_eq!(payer.join().unwrap(), 262, "the target saw the first chunk");
}

#[test]
fn devices_opens_the_connstrings_given() {
    let emulator = Emulator::start(2);
    let given = [connstring(&emulator, 0), connstring(&emulator, 1)];
    let reports = devices(&given).unwrap();
    assert_eq!(reports.len(), 2);
    for (report, connstring) in reports.iter().zip(&given) {
        assert_eq!(report.connstring, connstring.as_str());
        assert_eq!(report.origin, DeviceOrigin::Given);
        match &report.probe {
            Probe::Opened { chip, .. } => {
                assert_eq!(chip.as_deref(), Some("PN532 v1.6"), "{report:?}");
            }
            Probe::Failed { error } => panic!("{connstring} did not open: {error}"),
        }
    }
}

/// libnfc reads `LIBNFC_DEVICE` when the process starts using it; a child process of this test
/// binary gets it in its environment, and lists the reader named there.
#[test]
fn libnfc_lists_the_reader_named_by_libnfc_device() {
    let emulator = Emulator::start(1);
    let output = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "list_devices_in_a_child_process",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("LIBNFC_DEVICE", emulator.connstring(0))
        .env("LIBNFC_AUTO_SCAN", "false")
        .env("LIBNFC_INTRUSIVE_SCAN", "false")
        .env_remove("LIBNFC_DEFAULT_DEVICE")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    let line = format!("LISTED {} PN532 v1.6", emulator.connstring(0));
    assert!(stdout.contains(&line), "{stdout}");
}

/// Run only by `libnfc_lists_the_reader_named_by_libnfc_device`, with the environment set.
#[test]
#[ignore = "run in a child process by libnfc_lists_the_reader_named_by_libnfc_device"]
fn list_devices_in_a_child_process() {
    assert!(
        std::env::var_os("LIBNFC_DEVICE").is_some(),
        "run by libnfc_lists_the_reader_named_by_libnfc_device"
    );
    let reports = devices(&[]).unwrap();
    assert_eq!(reports.len(), 1, "{reports:?}");
    assert_eq!(reports[0].origin, DeviceOrigin::Listed);
    match &reports[0].probe {
        Probe::Opened {
            chip: Some(chip), ..
        } => println!(
            "LISTED {} {}",
            reports[0].connstring,
            chip.trim_start_matches("chip: ")
        ),
        other => panic!("listed reader did not open: {other:?}"),
    }
}
