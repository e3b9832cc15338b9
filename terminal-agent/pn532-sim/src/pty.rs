//! Pseudo-terminals standing in for the PN532's UART: creation (openpt, grantpt, unlockpt,
//! ptsname), raw mode, and the reader loop that turns the master side into line events.
//!
//! The slave side (`/dev/pts/N`) is what libnfc opens. Its termios settings live in the kernel
//! for as long as the master is open, and termios calls made on the master apply to them, which
//! is how [`reset_line`] puts the line back to raw mode after a host went away without
//! restoring it. Baud rates are meaningless on a pseudo-terminal; libnfc's termios calls still
//! succeed on it.

use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::SyncSender;

use rustix::event::{PollFd, PollFlags, Timespec, poll};
use rustix::fs::OFlags;
use rustix::io::Errno;
use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
use rustix::termios::{InputModes, OptionalActions, tcgetattr, tcsetattr};
use tracing::{debug, warn};

use super::Error;

/// Bytes read from a line in one go.
pub const READ_CHUNK_BYTES: usize = 512;
/// How often (20 ms) a reader looks again for a host while nobody has the line open (the
/// master reports hang-up continuously then, so it cannot simply wait on it).
pub const HANG_UP_RECHECK_INTERVAL: Timespec = Timespec {
    tv_sec: 0,
    tv_nsec: 20_000_000,
};
/// Zero timeout: poll only looks.
const NO_WAIT: Timespec = Timespec {
    tv_sec: 0,
    tv_nsec: 0,
};
/// Longest name `ptsname` may return.
const PTS_NAME_BYTES_MAX: usize = 64;

/// An event on one device's line, for the field thread.
#[derive(Debug)]
pub enum LineEvent {
    /// The host wrote these bytes.
    Bytes {
        /// Device index.
        device: usize,
        /// The bytes.
        bytes: Vec<u8>,
    },
    /// Nobody has the slave side open any more.
    HangUp {
        /// Device index.
        device: usize,
    },
}

/// The master side of one pseudo-terminal and the path of its slave side.
#[derive(Debug)]
pub struct Pty {
    /// Master side, non-blocking, shared by the reader and the writer.
    pub master: Arc<OwnedFd>,
    /// Slave path, e.g. `/dev/pts/3`.
    pub path: PathBuf,
}

impl Pty {
    /// Opens a new pseudo-terminal with its line in raw mode and its master non-blocking.
    pub fn open() -> Result<Self, Error> {
        let pty_error = |step: &'static str| {
            move |errno: Errno| Error::Pty {
                step,
                source: errno.into(),
            }
        };
        let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)
            .map_err(pty_error("openpt"))?;
        grantpt(&master).map_err(pty_error("grantpt"))?;
        unlockpt(&master).map_err(pty_error("unlockpt"))?;
        let name = ptsname(&master, Vec::with_capacity(PTS_NAME_BYTES_MAX))
            .map_err(pty_error("ptsname"))?;
        let path = PathBuf::from(
            name.into_string()
                .map_err(|_| pty_error("ptsname")(Errno::INVAL))?,
        );
        reset_line(&master).map_err(pty_error("tcsetattr"))?;
        let flags = rustix::fs::fcntl_getfl(&master).map_err(pty_error("fcntl"))?;
        rustix::fs::fcntl_setfl(&master, flags | OFlags::NONBLOCK).map_err(pty_error("fcntl"))?;
        Ok(Self {
            master: Arc::new(master),
            path,
        })
    }
}

/// Puts the line in raw mode: no echo, no line editing, no translation, 8-bit characters, and
/// no input flags at all (which also drops libnfc's `CCLAIMED` mark where a kernel keeps it;
/// Linux does not).
pub fn reset_line(master: impl AsFd) -> Result<(), Errno> {
    let mut termios = tcgetattr(&master)?;
    termios.make_raw();
    termios.input_modes = InputModes::empty();
    tcsetattr(&master, OptionalActions::Now, &termios)
}

/// Writes `bytes` to a non-blocking master. A host that does not read its line loses what does
/// not fit, as with a real UART.
pub fn write_line(device: usize, master: &OwnedFd, bytes: &[u8]) {
    let mut rest = bytes;
    while !rest.is_empty() {
        match rustix::io::write(master, rest) {
            Ok(0) => break,
            Ok(written) => rest = &rest[written..],
            Err(Errno::INTR) => {}
            Err(Errno::AGAIN) => {
                warn!(device, dropped = rest.len(), "host is not reading its line");
                return;
            }
            Err(errno) => {
                debug!(device, %errno, "write to line failed");
                return;
            }
        }
    }
}

/// Reads one device's line until `stop` becomes readable or hangs up (its write end closed),
/// or the field thread is gone.
pub fn run_reader(
    device: usize,
    master: Arc<OwnedFd>,
    stop: Arc<OwnedFd>,
    events: SyncSender<LineEvent>,
) {
    let mut buffer = [0_u8; READ_CHUNK_BYTES];
    let mut hung_up = false;
    loop {
        let mut fds = [
            PollFd::new(&*master, PollFlags::IN),
            PollFd::new(&*stop, PollFlags::IN),
        ];
        // While the line is closed, only look (the master reports hang-up until a host opens
        // the slave); otherwise wait for bytes.
        let timeout = hung_up.then_some(&NO_WAIT);
        match poll(&mut fds, timeout) {
            Ok(_) => {}
            Err(Errno::INTR) => continue,
            Err(errno) => {
                warn!(device, %errno, "poll failed; reader stops");
                return;
            }
        }
        if !fds[1].revents().is_empty() {
            return;
        }
        let revents = fds[0].revents();
        let mut line_closed = revents.intersects(PollFlags::HUP | PollFlags::ERR);
        if revents.contains(PollFlags::IN) {
            match rustix::io::read(&*master, &mut buffer) {
                Ok(0) | Err(Errno::IO) => line_closed = true,
                Ok(read) => {
                    hung_up = false;
                    let event = LineEvent::Bytes {
                        device,
                        bytes: buffer[..read].to_vec(),
                    };
                    if events.send(event).is_err() {
                        return;
                    }
                    continue;
                }
                Err(Errno::AGAIN | Errno::INTR) => continue,
                Err(errno) => {
                    warn!(device, %errno, "read failed; reader stops");
                    return;
                }
            }
        }
        if !line_closed {
            // A host has the line open (possibly silent so far).
            hung_up = false;
            continue;
        }
        if !hung_up {
            hung_up = true;
            if let Err(errno) = reset_line(&*master) {
                warn!(device, %errno, "cannot reset the line");
            }
            if events.send(LineEvent::HangUp { device }).is_err() {
                return;
            }
        }
        // Nobody has the line open: wait a little (or for stop) before looking again.
        let mut stop_only = [PollFd::new(&*stop, PollFlags::IN)];
        match poll(&mut stop_only, Some(&HANG_UP_RECHECK_INTERVAL)) {
            Ok(0) | Err(Errno::INTR) => {}
            Ok(_) => return,
            Err(errno) => {
                warn!(device, %errno, "poll failed; reader stops");
                return;
            }
        }
    }
}
