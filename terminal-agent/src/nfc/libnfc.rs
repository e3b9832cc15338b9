//! NFC-DEP links over real readers through libnfc (the `nfc1` crate, linked against the
//! system's libnfc 1.8): [`LibnfcInitiator`], [`LibnfcTarget`], and [`devices`].
//!
//! Readers are opened by connection string (`pn532_uart:/dev/ttyUSB0`, `acr122_usb`, or an
//! emulated `pn532_uart:/dev/pts/N`). Each link owns its own libnfc context and device, so a
//! link can move to another thread but is never shared.
//!
//! The 262-byte NFC-DEP limit is enforced here, in our code, on every frame before libnfc is
//! called, and on every answer: libnfc 1.8 copies a longer frame past its 264-byte command
//! buffer (`pn53x_initiator_transceive_bytes`, `pn53x_target_send_bytes`) and neither libnfc nor
//! `nfc1` checks. Receive buffers are exactly 262 bytes.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use nfc1::target_info::{Dep, TargetInfo};
use nfc1::{BaudRate, DepMode, Modulation, ModulationType, Target, Timeout};
use nfcpay_protocol::nfc_frame::NFC_EXCHANGE_BYTES_MAX;
use tracing::{debug, info};

use super::{
    Connstring, DepInitiator, DepTarget, LIBNFC_TIMEOUT_MIN, LinkLoss, NfcError, Role,
    check_exchange,
};

/// Most readers [`devices`] asks libnfc to list.
pub const DEVICES_LISTED_MAX: usize = 16;
/// Longest timeout handed to libnfc (it takes milliseconds as a C `int`).
pub const LIBNFC_TIMEOUT_MAX: Duration = Duration::from_secs(3600);
/// Bytes of an NFCID3 (the NFC-DEP identifier of initiator and target).
const NFCID3_BYTES: usize = 10;

/// libnfc's `nfc_init` is called by one thread at a time. libnfc built with environment
/// variables (Debian's is) calls `setenv("LIBNFC_LOG_LEVEL")` in every `nfc_init`; two
/// concurrent calls would race on the environment. (Once set, the variable is replaced in
/// place, so readers of the environment in other threads see a valid pointer either way.)
static LIBNFC_INIT: Mutex<()> = Mutex::new(());

/// Speed of the passive NFC-DEP activation an initiator asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DepSpeed {
    /// 106 kbps (ISO/IEC 14443-A framing).
    Kbps106,
    /// 212 kbps (FeliCa framing), as libnfc's `nfc-dep-initiator` uses.
    #[default]
    Kbps212,
    /// 424 kbps.
    Kbps424,
}

impl DepSpeed {
    fn baud_rate(self) -> BaudRate {
        match self {
            Self::Kbps106 => BaudRate::Baud106,
            Self::Kbps212 => BaudRate::Baud212,
            Self::Kbps424 => BaudRate::Baud424,
        }
    }
}

/// The libnfc calls a DEP link makes once the reader is open; the seam where tests record what
/// would reach libnfc.
pub(crate) trait DepChip: Send {
    fn transceive(
        &mut self,
        frame: &[u8],
        answer_bytes_max: usize,
        timeout: Timeout,
    ) -> Result<Vec<u8>, nfc1::Error>;
    fn deselect(&mut self) -> Result<(), nfc1::Error>;
    fn target_receive(
        &mut self,
        frame_bytes_max: usize,
        timeout: Timeout,
    ) -> Result<Vec<u8>, nfc1::Error>;
    fn target_send(&mut self, frame: &[u8], timeout: Timeout) -> Result<(), nfc1::Error>;
}

/// An open reader: its device and the libnfc context it belongs to.
struct Reader {
    // Field order is drop order: the device is closed before its context is freed.
    device: nfc1::Device,
    _context: nfc1::Context,
}

impl Reader {
    fn open(connstring: &Connstring) -> Result<Self, NfcError> {
        let mut context = {
            let _init = LIBNFC_INIT.lock().unwrap_or_else(PoisonError::into_inner);
            nfc1::Context::new().map_err(NfcError::Init)?
        };
        let device = context
            .open_with_connstring(connstring.as_str())
            .map_err(|source| NfcError::Open {
                connstring: connstring.clone(),
                source,
            })?;
        debug!(%connstring, name = device.name(), "NFC reader opened");
        Ok(Self {
            device,
            _context: context,
        })
    }
}

impl DepChip for Reader {
    fn transceive(
        &mut self,
        frame: &[u8],
        answer_bytes_max: usize,
        timeout: Timeout,
    ) -> Result<Vec<u8>, nfc1::Error> {
        self.device
            .initiator_transceive_bytes(frame, answer_bytes_max, timeout)
    }

    fn deselect(&mut self) -> Result<(), nfc1::Error> {
        self.device.initiator_deselect_target()
    }

    fn target_receive(
        &mut self,
        frame_bytes_max: usize,
        timeout: Timeout,
    ) -> Result<Vec<u8>, nfc1::Error> {
        self.device.target_receive_bytes(frame_bytes_max, timeout)
    }

    fn target_send(&mut self, frame: &[u8], timeout: Timeout) -> Result<(), nfc1::Error> {
        self.device.target_send_bytes(frame, timeout)
    }
}

/// A libnfc timeout: at least [`LIBNFC_TIMEOUT_MIN`] (0 would mean "forever"), at most
/// [`LIBNFC_TIMEOUT_MAX`].
fn libnfc_timeout(timeout: Duration) -> Timeout {
    Timeout::Duration(timeout.clamp(LIBNFC_TIMEOUT_MIN, LIBNFC_TIMEOUT_MAX))
}

/// What a failed libnfc exchange means for the link.
fn exchange_error(source: nfc1::Error, operation: &'static str, waited: Duration) -> NfcError {
    match source {
        nfc1::Error::Timeout => NfcError::ExchangeTimeout { waited },
        nfc1::Error::TargetReleased => NfcError::LinkLost(LinkLoss::Released),
        nfc1::Error::RfTransmissionError => NfcError::LinkLost(LinkLoss::RfError),
        source => NfcError::Libnfc { operation, source },
    }
}

fn random_nfcid3() -> Result<[u8; NFCID3_BYTES], NfcError> {
    let mut nfcid3 = [0; NFCID3_BYTES];
    getrandom::fill(&mut nfcid3).map_err(NfcError::Random)?;
    Ok(nfcid3)
}

fn dep_info(nfcid3: [u8; NFCID3_BYTES]) -> Dep {
    Dep {
        nfcid3,
        did: 0,
        bs: 0,
        br: 0,
        to: 0,
        // PP: no general bytes, 64-byte frames; the chip sets what it supports.
        pp: 0,
        gb: [0; 48],
        gb_len: 0,
        dep_mode: DepMode::Undefined,
    }
}

/// This terminal as NFC-DEP initiator on one reader, with a target selected.
pub struct LibnfcInitiator {
    chip: Box<dyn DepChip>,
    connstring: Connstring,
    released: bool,
}

impl std::fmt::Debug for LibnfcInitiator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LibnfcInitiator")
            .field("connstring", &self.connstring)
            .field("released", &self.released)
            .finish_non_exhaustive()
    }
}

impl LibnfcInitiator {
    /// Opens the reader at `connstring` as initiator and selects a passive NFC-DEP target at
    /// `speed` (`nfc_initiator_init`, `nfc_initiator_select_dep_target`), waiting at most
    /// `select_wait` for one to come into the field.
    pub fn connect(
        connstring: &Connstring,
        speed: DepSpeed,
        select_wait: Duration,
    ) -> Result<Self, NfcError> {
        let mut reader = Reader::open(connstring)?;
        let role_error = |source| NfcError::RoleSetup {
            connstring: connstring.clone(),
            role: Role::Initiator,
            source,
        };
        reader.device.initiator_init().map_err(role_error)?;
        let initiator = dep_info(random_nfcid3()?);
        let target = reader
            .device
            .initiator_select_dep_target(
                DepMode::Passive,
                speed.baud_rate(),
                &initiator,
                libnfc_timeout(select_wait),
            )
            .map_err(|source| match source {
                nfc1::Error::Timeout | nfc1::Error::RfTransmissionError => NfcError::NoTarget {
                    waited: select_wait,
                },
                source => NfcError::Libnfc {
                    operation: "nfc_initiator_select_dep_target",
                    source,
                },
            })?;
        if let TargetInfo::Dep(dep) = target.target_info {
            info!(%connstring, nfcid3 = %hex_bytes(&dep.nfcid3), ?speed, "NFC-DEP target selected");
        }
        Ok(Self::with_chip(Box::new(reader), connstring.clone()))
    }

    pub(crate) fn with_chip(chip: Box<dyn DepChip>, connstring: Connstring) -> Self {
        Self {
            chip,
            connstring,
            released: false,
        }
    }

    /// The reader's connection string.
    pub fn connstring(&self) -> &Connstring {
        &self.connstring
    }
}

impl DepInitiator for LibnfcInitiator {
    fn exchange(&mut self, frame: &[u8], timeout: Duration) -> Result<Vec<u8>, NfcError> {
        // The guard, before libnfc sees the frame.
        let frame = check_exchange(frame)?;
        if self.released {
            return Err(NfcError::LinkLost(LinkLoss::Released));
        }
        let answer = self
            .chip
            .transceive(frame, NFC_EXCHANGE_BYTES_MAX, libnfc_timeout(timeout))
            .map_err(|source| exchange_error(source, "nfc_initiator_transceive_bytes", timeout))?;
        check_exchange(&answer)?;
        Ok(answer)
    }

    fn release(&mut self) -> Result<(), NfcError> {
        if self.released {
            return Ok(());
        }
        self.released = true;
        self.chip.deselect().map_err(|source| NfcError::Libnfc {
            operation: "nfc_initiator_deselect_target",
            source,
        })
    }
}

impl Drop for LibnfcInitiator {
    fn drop(&mut self) {
        // Closing the device releases the target too; deselecting first says so explicitly.
        let _ = self.release();
    }
}

/// This terminal as NFC-DEP target on one reader, activated by an initiator.
pub struct LibnfcTarget {
    chip: Box<dyn DepChip>,
    connstring: Connstring,
}

impl std::fmt::Debug for LibnfcTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LibnfcTarget")
            .field("connstring", &self.connstring)
            .finish_non_exhaustive()
    }
}

impl LibnfcTarget {
    /// Opens the reader at `connstring` as an NFC-DEP target (`nfc_target_init`, as libnfc's
    /// `nfc-dep-target` does) and waits at most `activation_wait` for an initiator to activate
    /// it.
    pub fn listen(connstring: &Connstring, activation_wait: Duration) -> Result<Self, NfcError> {
        let mut reader = Reader::open(connstring)?;
        let target = Target {
            target_info: TargetInfo::Dep(dep_info(random_nfcid3()?)),
            modulation: Modulation {
                modulation_type: ModulationType::Dep,
                baud_rate: BaudRate::Undefined,
            },
        };
        reader
            .device
            .target_init(
                &target,
                NFC_EXCHANGE_BYTES_MAX,
                libnfc_timeout(activation_wait),
            )
            .map_err(|source| match source {
                nfc1::Error::Timeout => NfcError::NoInitiator {
                    waited: activation_wait,
                },
                source => NfcError::RoleSetup {
                    connstring: connstring.clone(),
                    role: Role::Target,
                    source,
                },
            })?;
        info!(%connstring, "NFC-DEP target activated by an initiator");
        Ok(Self::with_chip(Box::new(reader), connstring.clone()))
    }

    pub(crate) fn with_chip(chip: Box<dyn DepChip>, connstring: Connstring) -> Self {
        Self { chip, connstring }
    }

    /// The reader's connection string.
    pub fn connstring(&self) -> &Connstring {
        &self.connstring
    }
}

impl DepTarget for LibnfcTarget {
    fn receive(&mut self, timeout: Duration) -> Result<Vec<u8>, NfcError> {
        let frame = self
            .chip
            .target_receive(NFC_EXCHANGE_BYTES_MAX, libnfc_timeout(timeout))
            .map_err(|source| exchange_error(source, "nfc_target_receive_bytes", timeout))?;
        check_exchange(&frame)?;
        Ok(frame)
    }

    fn send(&mut self, frame: &[u8], timeout: Duration) -> Result<(), NfcError> {
        // The guard, before libnfc sees the frame.
        let frame = check_exchange(frame)?;
        self.chip
            .target_send(frame, libnfc_timeout(timeout))
            .map_err(|source| exchange_error(source, "nfc_target_send_bytes", timeout))
    }
}

/// Where [`devices`] got a connection string from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceOrigin {
    /// libnfc's `nfc_list_devices` (configuration file, `LIBNFC_DEVICE`, USB scan).
    Listed,
    /// Given by the user.
    Given,
}

/// What opening a reader showed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// The reader opened.
    Opened {
        /// libnfc's name for it.
        name: String,
        /// The chip named in libnfc's description (`PN532 v1.6` of `chip: PN532 v1.6`), if any.
        chip: Option<String>,
    },
    /// The reader did not open.
    Failed {
        /// Why.
        error: String,
    },
}

/// One reader for the agent's `devices` command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceReport {
    /// Its connection string.
    pub connstring: String,
    /// Where the connection string came from.
    pub origin: DeviceOrigin,
    /// What opening it showed.
    pub probe: Probe,
}

/// The chip libnfc's device description names (`PN532 v1.6` of its `chip: PN532 v1.6` line).
fn chip_of(about: &str) -> Option<String> {
    about
        .lines()
        .map(str::trim)
        .find_map(|line| line.strip_prefix("chip:"))
        .map(|chip| chip.trim().to_owned())
}

/// The readers to report: the `given` connection strings, each opened to see whether a reader
/// answers there; or, when none is given, those libnfc lists (`nfc_list_devices`: the
/// configuration file, `LIBNFC_DEVICE`, and a USB scan unless `LIBNFC_AUTO_SCAN=false`).
pub fn devices(given: &[Connstring]) -> Result<Vec<DeviceReport>, NfcError> {
    if !given.is_empty() {
        return Ok(given
            .iter()
            .map(|connstring| DeviceReport {
                connstring: connstring.to_string(),
                origin: DeviceOrigin::Given,
                probe: probe(connstring),
            })
            .collect());
    }
    let listed = {
        let mut context = {
            let _init = LIBNFC_INIT.lock().unwrap_or_else(PoisonError::into_inner);
            nfc1::Context::new().map_err(NfcError::Init)?
        };
        context
            .list_devices(DEVICES_LISTED_MAX)
            .map_err(|source| NfcError::Libnfc {
                operation: "nfc_list_devices",
                source,
            })?
    };
    Ok(listed
        .into_iter()
        .map(|connstring| {
            let probe = match Connstring::try_from(connstring.as_str()) {
                Ok(valid) => probe(&valid),
                Err(error) => Probe::Failed {
                    error: error.to_string(),
                },
            };
            DeviceReport {
                connstring,
                origin: DeviceOrigin::Listed,
                probe,
            }
        })
        .collect())
}

fn probe(connstring: &Connstring) -> Probe {
    match Reader::open(connstring) {
        Ok(mut reader) => {
            let name = reader.device.name().to_owned();
            let chip = reader
                .device
                .get_information_about()
                .ok()
                .and_then(|about| chip_of(&about));
            Probe::Opened { name, chip }
        }
        Err(error) => Probe::Failed {
            error: nfcpay_protocol::ErrorChain(&error).to_string(),
        },
    }
}

fn hex_bytes(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::sync::{Arc, Mutex};

    use super::*;

    /// What reached the (fake) libnfc.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Call {
        Transceive { length: usize, answer_max: usize },
        Deselect,
        TargetReceive { frame_max: usize },
        TargetSend { length: usize },
    }

    /// A chip that records every call and answers with `answer`.
    struct RecordingChip {
        calls: Arc<Mutex<Vec<Call>>>,
        answer: Result<Vec<u8>, nfc1::Error>,
    }

    impl DepChip for RecordingChip {
        fn transceive(
            &mut self,
            frame: &[u8],
            answer_bytes_max: usize,
            _timeout: Timeout,
        ) -> Result<Vec<u8>, nfc1::Error> {
            self.calls.lock().unwrap().push(Call::Transceive {
                length: frame.len(),
                answer_max: answer_bytes_max,
            });
            self.answer.clone()
        }

        fn deselect(&mut self) -> Result<(), nfc1::Error> {
            self.calls.lock().unwrap().push(Call::Deselect);
            Ok(())
        }

        fn target_receive(
            &mut self,
            frame_bytes_max: usize,
            _timeout: Timeout,
        ) -> Result<Vec<u8>, nfc1::Error> {
            self.calls.lock().unwrap().push(Call::TargetReceive {
                frame_max: frame_bytes_max,
            });
            self.answer.clone()
        }

        fn target_send(&mut self, frame: &[u8], _timeout: Timeout) -> Result<(), nfc1::Error> {
            self.calls.lock().unwrap().push(Call::TargetSend {
                length: frame.len(),
            });
            Ok(())
        }
    }

    fn recording(
        answer: Result<Vec<u8>, nfc1::Error>,
    ) -> (Box<RecordingChip>, Arc<Mutex<Vec<Call>>>) {
        let calls = Arc::new(Mutex::new(Vec::new()));
        (
            Box::new(RecordingChip {
                calls: Arc::clone(&calls),
                answer,
            }),
            calls,
        )
    }

    fn connstring() -> Connstring {
        Connstring::try_from("pn532_uart:/dev/null").unwrap()
    }

    const WAIT: Duration = Duration::from_millis(100);

    #[test]
    fn initiator_refuses_263_bytes_before_libnfc_sees_them() {
        let (chip, calls) = recording(Ok(vec![1, 2, 3]));
        let mut initiator = LibnfcInitiator::with_chip(chip, connstring());
        let error = initiator.exchange(&[0xAA; 263], WAIT).unwrap_err();
        assert!(
            matches!(
                error,
                NfcError::ExchangeTooLong {
                    length: 263,
                    max: 262
                }
            ),
            "{error:?}"
        );
        assert!(calls.lock().unwrap().is_empty(), "libnfc was called");

        // 262 bytes pass, with a 262-byte answer buffer.
        assert_eq!(initiator.exchange(&[0xAA; 262], WAIT).unwrap(), [1, 2, 3]);
        assert_eq!(
            *calls.lock().unwrap(),
            [Call::Transceive {
                length: 262,
                answer_max: 262
            }]
        );
    }

    #[test]
    fn target_refuses_to_send_263_bytes_before_libnfc_sees_them() {
        let (chip, calls) = recording(Ok(vec![1]));
        let mut target = LibnfcTarget::with_chip(chip, connstring());
        assert!(matches!(
            target.send(&[0; 263], WAIT),
            Err(NfcError::ExchangeTooLong { length: 263, .. })
        ));
        assert!(calls.lock().unwrap().is_empty(), "libnfc was called");
        target.send(&[0; 262], WAIT).unwrap();
        assert_eq!(target.receive(WAIT).unwrap(), [1]);
        assert_eq!(
            *calls.lock().unwrap(),
            [
                Call::TargetSend { length: 262 },
                Call::TargetReceive { frame_max: 262 }
            ]
        );
    }

    #[test]
    fn an_oversized_answer_is_refused() {
        let (chip, _calls) = recording(Ok(vec![0; 300]));
        let mut initiator = LibnfcInitiator::with_chip(chip, connstring());
        assert!(matches!(
            initiator.exchange(&[1], WAIT),
            Err(NfcError::ExchangeTooLong { length: 300, .. })
        ));
        let (chip, _calls) = recording(Ok(vec![0; 263]));
        let mut target = LibnfcTarget::with_chip(chip, connstring());
        assert!(matches!(
            target.receive(WAIT),
            Err(NfcError::ExchangeTooLong { length: 263, .. })
        ));
    }

    #[test]
    fn a_message_over_the_guarded_link_never_hands_libnfc_more_than_262_bytes() {
        // The framing's frames all fit; the guard is the second line of defence. Send a
        // 4096-byte message to a chip that answers nothing useful: every frame offered is
        // recorded, and none is longer than the limit.
        let (chip, calls) = recording(Err(nfc1::Error::RfTransmissionError));
        let mut initiator = LibnfcInitiator::with_chip(chip, connstring());
        let id = super::super::random_message_id().unwrap();
        let error = super::super::send_message(
            super::super::NfcLink::Initiator(&mut initiator),
            id,
            &[7; 4096],
            &super::super::Timeouts::DEFAULT,
        )
        .unwrap_err();
        assert!(matches!(error, NfcError::PeerGone { .. }), "{error:?}");
        let calls = calls.lock().unwrap();
        assert_eq!(calls.len(), super::super::EXCHANGE_ATTEMPTS_MAX as usize);
        for call in calls.iter() {
            assert!(
                matches!(call, Call::Transceive { length: 262, .. }),
                "{call:?}"
            );
        }
    }

    #[test]
    fn libnfc_errors_map_to_link_errors() {
        assert!(matches!(
            exchange_error(nfc1::Error::Timeout, "x", WAIT),
            NfcError::ExchangeTimeout { waited } if waited == WAIT
        ));
        assert!(matches!(
            exchange_error(nfc1::Error::TargetReleased, "x", WAIT),
            NfcError::LinkLost(LinkLoss::Released)
        ));
        assert!(matches!(
            exchange_error(nfc1::Error::RfTransmissionError, "x", WAIT),
            NfcError::LinkLost(LinkLoss::RfError)
        ));
        assert!(matches!(
            exchange_error(nfc1::Error::Io, "x", WAIT),
            NfcError::Libnfc {
                operation: "x",
                source: nfc1::Error::Io
            }
        ));
    }

    #[test]
    fn links_move_between_threads() {
        fn assert_send<T: Send>() {}
        assert_send::<LibnfcInitiator>();
        assert_send::<LibnfcTarget>();
    }

    #[test]
    fn timeouts_never_reach_libnfc_as_zero() {
        assert_eq!(
            libnfc_timeout(Duration::ZERO),
            Timeout::Duration(LIBNFC_TIMEOUT_MIN)
        );
        assert_eq!(
            libnfc_timeout(Duration::from_secs(1 << 40)),
            Timeout::Duration(LIBNFC_TIMEOUT_MAX)
        );
    }

    #[test]
    fn release_deselects_once() {
        let (chip, calls) = recording(Ok(vec![]));
        let mut initiator = LibnfcInitiator::with_chip(chip, connstring());
        initiator.release().unwrap();
        initiator.release().unwrap();
        assert!(matches!(
            initiator.exchange(&[1], WAIT),
            Err(NfcError::LinkLost(LinkLoss::Released))
        ));
        drop(initiator);
        assert_eq!(*calls.lock().unwrap(), [Call::Deselect]);
    }

    #[test]
    fn a_reader_that_is_not_there_is_reported() {
        let missing = Connstring::try_from("pn532_uart:/nonexistent/nfcpay-test").unwrap();
        let reports = devices(std::slice::from_ref(&missing)).unwrap();
        assert_eq!(reports.len(), 1);
        assert_eq!(reports[0].origin, DeviceOrigin::Given);
        assert!(
            matches!(reports[0].probe, Probe::Failed { .. }),
            "{reports:?}"
        );
    }

    #[test]
    fn the_chip_is_named_without_its_label() {
        let about = "pn532_uart:/dev/pts/3 (PN532) - PN532 v1.6 (0x07)\n  chip: PN532 v1.6\n";
        assert_eq!(super::chip_of(about).as_deref(), Some("PN532 v1.6"));
        assert_eq!(super::chip_of("no chip line"), None);
    }
}
