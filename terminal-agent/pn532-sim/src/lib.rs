//! An emulator of PN532 NFC readers on pseudo-terminals, good enough for unmodified libnfc 1.8
//! (`pn532_uart:/dev/pts/N`) to open them, and for one emulated reader acting as NFC-DEP
//! initiator to exchange data with another acting as target, through a shared virtual RF
//! field. See `docs/pn532-emulator.md`.
//!
//! # Layout
//! - [`frame`]: the host-link frame codec (normal and extended frames, ACK, NACK, error frame).
//! - [`command`]: host commands, parsed from frame payloads.
//! - [`device`]: one emulated chip: registers, parameters, RF settings, role, pending command.
//! - [`field`]: the shared RF field, pure state: initiators meet targets, DEP data crosses.
//! - [`pty`]: pseudo-terminals and the per-line reader loop.
//!
//! [`Simulator`] ties them together: one reader thread per line feeds a single field thread,
//! which owns all device state and writes the answers.
//!
//! This crate is test infrastructure (the `tests` crate, the demo, and the agent's NFC link
//! tests use it); the terminal agent itself does not depend on it. Its binary is
//! `nfcpay-pn532-sim`.
#![forbid(unsafe_code)]

pub mod command;
pub mod device;
pub mod field;
pub mod frame;
pub mod pty;

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::Instant;

use thiserror::Error;
use tracing::{debug, info};

use field::{Field, Output};
use pty::{LineEvent, Pty};

/// Most devices one simulator runs.
pub const DEVICES_MAX: usize = 16;
/// Line events queued for the field thread before readers wait.
pub const LINE_EVENT_QUEUE_DEPTH: usize = 64;
/// libnfc driver name in connection strings.
pub const LIBNFC_DRIVER: &str = "pn532_uart";

/// Why the simulator could not start.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    /// The device count is zero or above [`DEVICES_MAX`].
    #[error("device count {0} outside 1..={max}", max = DEVICES_MAX)]
    DeviceCount(usize),
    /// A pseudo-terminal could not be set up.
    #[error("cannot set up a pseudo-terminal ({step})")]
    Pty {
        /// The failing call.
        step: &'static str,
        /// The system error.
        #[source]
        source: std::io::Error,
    },
    /// The stop pipe could not be made.
    #[error("cannot create the stop pipe")]
    StopPipe(#[source] std::io::Error),
    /// A thread could not be started.
    #[error("cannot start a thread")]
    Thread(#[source] std::io::Error),
}

/// Running emulated PN532 devices. Dropping it stops them and closes their lines.
#[derive(Debug)]
pub struct Simulator {
    connstrings: Vec<String>,
    /// Write end of the stop pipe: closing it wakes and ends every reader.
    stop: Option<OwnedFd>,
    threads: Vec<JoinHandle<()>>,
}

impl Simulator {
    /// Creates `device_count` pseudo-terminals and starts answering on them.
    pub fn start(device_count: usize) -> Result<Self, Error> {
        if device_count == 0 || device_count > DEVICES_MAX {
            return Err(Error::DeviceCount(device_count));
        }
        let ptys = (0..device_count)
            .map(|_| Pty::open())
            .collect::<Result<Vec<_>, _>>()?;
        let (stop_read, stop_write) =
            rustix::pipe::pipe().map_err(|errno| Error::StopPipe(errno.into()))?;
        let stop_read = Arc::new(stop_read);

        let mut simulator = Self {
            connstrings: ptys
                .iter()
                .map(|pty| format!("{LIBNFC_DRIVER}:{}", pty.path.display()))
                .collect(),
            stop: Some(stop_write),
            threads: Vec::with_capacity(device_count + 1),
        };
        // Declared after `simulator` so that, on an early return, the sender is dropped before
        // `simulator` joins the field thread (which ends only once every sender is gone).
        let (sender, receiver) = mpsc::sync_channel(LINE_EVENT_QUEUE_DEPTH);
        let names = ptys
            .iter()
            .map(|pty| pty.path.display().to_string())
            .collect();
        let masters: Vec<Arc<OwnedFd>> = ptys.iter().map(|pty| Arc::clone(&pty.master)).collect();
        let field_thread = std::thread::Builder::new()
            .name("pn532-field".into())
            .spawn(move || run_field(Field::new(names), &masters, &receiver))
            .map_err(Error::Thread)?;
        simulator.threads.push(field_thread);
        for (device, pty) in ptys.into_iter().enumerate() {
            let master = Arc::clone(&pty.master);
            let stop = Arc::clone(&stop_read);
            let events = sender.clone();
            let reader = std::thread::Builder::new()
                .name(format!("pn532-line-{device}"))
                .spawn(move || pty::run_reader(device, master, stop, events))
                .map_err(Error::Thread)?;
            simulator.threads.push(reader);
        }
        info!(connstrings = ?simulator.connstrings, "PN532 simulator running");
        Ok(simulator)
    }

    /// libnfc connection strings, one per device: `pn532_uart:/dev/pts/N`.
    pub fn connstrings(&self) -> &[String] {
        &self.connstrings
    }

    /// Stops every thread and closes the lines.
    pub fn shutdown(mut self) {
        self.stop_threads();
    }

    fn stop_threads(&mut self) {
        // Closing the write end makes the read end readable (hang-up) in every reader; when
        // the readers are gone the field thread's channel disconnects and it ends too.
        self.stop = None;
        for thread in self.threads.drain(..) {
            if thread.join().is_err() {
                debug!("a simulator thread panicked");
            }
        }
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        self.stop_threads();
    }
}

/// The field thread: applies line events and deadlines to the field, writes the answers.
fn run_field(mut field: Field, masters: &[Arc<OwnedFd>], events: &Receiver<LineEvent>) {
    loop {
        let event = match field.next_deadline() {
            Some(deadline) => {
                match events.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                    Ok(event) => Some(event),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
            None => match events.recv() {
                Ok(event) => Some(event),
                Err(mpsc::RecvError) => return,
            },
        };
        let now = Instant::now();
        let mut outputs = match event {
            Some(LineEvent::Bytes { device, bytes }) => field.receive(device, &bytes, now),
            Some(LineEvent::HangUp { device }) => field.hang_up(device),
            None => Vec::new(),
        };
        outputs.extend(field.expire(now));
        for Output { device, bytes } in outputs {
            if let Some(master) = masters.get(device) {
                pty::write_line(device, master, &bytes);
            }
        }
    }
}
