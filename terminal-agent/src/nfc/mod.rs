//! The terminal's NFC transport: one message (a payment request, at most
//! [`MESSAGE_BYTES_MAX`] bytes) from one terminal to another over NFC-DEP, through libnfc
//! readers, with this terminal as NFC initiator or as NFC target.
//!
//! # Layout
//! - this module: the two link roles ([`DepInitiator`], [`DepTarget`], joined in [`NfcLink`]),
//!   [`Connstring`], [`Timeouts`] and the one error type [`NfcError`].
//! - [`message`]: [`send_message`] and [`receive_message`], the framing of
//!   `nfcpay_protocol::nfc_frame` (chunks, acks, digest) driven over a link, in both layouts
//!   (sender is initiator, sender is target), with timeouts and bounded resends.
//! - [`libnfc`]: the links over real readers through the `nfc1` crate ([`LibnfcInitiator`],
//!   [`LibnfcTarget`]) and [`devices`], the readers libnfc finds.
//! - [`memory`]: an in-memory link pair for tests.
//!
//! Every frame handed to a link is checked against the 262-byte NFC-DEP exchange limit
//! (`nfc_frame::check_exchange_length`) in the libnfc links themselves, before libnfc sees it:
//! libnfc 1.8 writes past its buffer beyond that and neither libnfc nor `nfc1` checks.
//! `docs/nfc-framing.md` specifies the framing; `docs/terminal.md` (section "NFC") says how the
//! agent talks to readers.

pub mod libnfc;
pub mod memory;
pub mod message;

use std::time::Duration;

pub use libnfc::{DeviceReport, LibnfcInitiator, LibnfcTarget, devices};
pub use message::{random_message_id, receive_message, send_message};
pub use nfcpay_protocol::nfc_frame::{FrameError, MESSAGE_BYTES_MAX, MessageId};

/// How often one exchange is tried (first try included) when it times out or meets an RF
/// error, before the message is given up: a brief detuning of the two antennas is survived, a
/// terminal taken away is not waited for long.
pub const EXCHANGE_ATTEMPTS_MAX: u32 = 3;
/// Longest connection string libnfc accepts (`NFC_BUFSIZE_CONNSTRING` is 1024 with its NUL).
pub const CONNSTRING_BYTES_MAX: usize = 1023;
/// Shortest timeout handed to libnfc: it reads 0 ms as "wait forever".
pub const LIBNFC_TIMEOUT_MIN: Duration = Duration::from_millis(1);

/// Which side of the NFC-DEP link this terminal is: the initiator speaks first and polls, the
/// target answers. Either may send the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// NFC-DEP initiator (`nfc_initiator_*`).
    Initiator,
    /// NFC-DEP target (`nfc_target_*`).
    Target,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Initiator => "initiator",
            Self::Target => "target",
        })
    }
}

/// A libnfc connection string such as `pn532_uart:/dev/ttyUSB0` or `acr122_usb`.
///
/// Checked before it reaches libnfc: not empty, at most [`CONNSTRING_BYTES_MAX`] bytes, no NUL
/// byte (`nfc1` copies it into a C string unchecked, and libnfc truncates longer ones).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Connstring(String);

impl Connstring {
    /// The connection string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<&str> for Connstring {
    type Error = NfcError;

    fn try_from(value: &str) -> Result<Self, NfcError> {
        let invalid = |why| NfcError::InvalidConnstring { why };
        if value.is_empty() {
            return Err(invalid("empty"));
        }
        if value.len() > CONNSTRING_BYTES_MAX {
            return Err(invalid("longer than 1023 bytes"));
        }
        if value.contains('\0') {
            return Err(invalid("contains a NUL byte"));
        }
        Ok(Self(value.to_owned()))
    }
}

impl TryFrom<String> for Connstring {
    type Error = NfcError;

    fn try_from(value: String) -> Result<Self, NfcError> {
        Self::try_from(value.as_str())
    }
}

impl std::fmt::Display for Connstring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The initiator's side of an NFC-DEP link: one exchange sends a frame and returns the
/// target's answer.
pub trait DepInitiator {
    /// One NFC-DEP exchange (`InDataExchange`): sends `frame` (at most 262 bytes) and returns
    /// the answer (at most 262 bytes), waiting at most `timeout`.
    fn exchange(&mut self, frame: &[u8], timeout: Duration) -> Result<Vec<u8>, NfcError>;

    /// Releases the target, which ends its wait for more frames. Idempotent.
    fn release(&mut self) -> Result<(), NfcError>;
}

/// The target's side of an NFC-DEP link: it receives the initiator's frame and answers it.
pub trait DepTarget {
    /// Waits at most `timeout` for the initiator's next frame (at most 262 bytes).
    fn receive(&mut self, timeout: Duration) -> Result<Vec<u8>, NfcError>;

    /// Answers the frame just received with `frame` (at most 262 bytes).
    fn send(&mut self, frame: &[u8], timeout: Duration) -> Result<(), NfcError>;
}

/// A link in one of the two roles: what [`send_message`] and [`receive_message`] drive.
pub enum NfcLink<'a> {
    /// This terminal is the NFC-DEP initiator.
    Initiator(&'a mut dyn DepInitiator),
    /// This terminal is the NFC-DEP target.
    Target(&'a mut dyn DepTarget),
}

impl NfcLink<'_> {
    /// The role this terminal plays on the link.
    pub fn role(&self) -> Role {
        match self {
            Self::Initiator(_) => Role::Initiator,
            Self::Target(_) => Role::Target,
        }
    }
}

impl std::fmt::Debug for NfcLink<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("NfcLink").field(&self.role()).finish()
    }
}

/// How long each step of a message may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// One exchange (initiator), or one answer (target): tried up to
    /// [`EXCHANGE_ATTEMPTS_MAX`] times.
    pub exchange: Duration,
    /// How long a target waits for the initiator's first frame of a message.
    pub first_frame: Duration,
    /// How long a target that has received a whole message keeps answering a resent last
    /// chunk (its final ack was lost) before it returns, unless the initiator releases it.
    pub linger: Duration,
}

impl Timeouts {
    /// Defaults for two terminals held together: 1 s per exchange, 5 s for the first frame,
    /// 1 s of linger.
    pub const DEFAULT: Self = Self {
        exchange: Duration::from_secs(1),
        first_frame: Duration::from_secs(5),
        linger: Duration::from_secs(1),
    };

    /// How long a target waits for the next frame mid-message: as long as the initiator
    /// keeps trying one exchange.
    pub fn peer_silence(&self) -> Duration {
        self.exchange.saturating_mul(EXCHANGE_ATTEMPTS_MAX)
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// How the other terminal left the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkLoss {
    /// The initiator released the target (libnfc `NFC_ETGRELEASED`).
    Released,
    /// The RF transmission failed: the target left the field (libnfc `NFC_ERFTRANS`).
    RfError,
    /// The other end of an in-memory link was dropped.
    Closed,
}

impl std::fmt::Display for LinkLoss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Released => "the initiator released the link",
            Self::RfError => "RF transmission failed (the other terminal left the field)",
            Self::Closed => "the other end closed the link",
        })
    }
}

/// How far a message had got when it failed: chunks the receiver had confirmed (or stored).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Transfer {
    /// Chunks acknowledged so far.
    pub chunks_done: u16,
    /// Chunks in the message, once known (the receiver learns it from the first chunk).
    pub chunk_count: Option<u16>,
}

impl std::fmt::Display for Transfer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.chunk_count {
            Some(count) => write!(f, "after {} of {count} chunks", self.chunks_done),
            None => f.write_str("before the first chunk"),
        }
    }
}

/// Why an NFC operation failed. Messages name lengths, roles and libnfc errors, never message
/// bytes, so they are safe to log.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NfcError {
    /// A connection string libnfc must not be given.
    #[error("invalid libnfc connection string: {why}")]
    InvalidConnstring {
        /// What is wrong with it.
        why: &'static str,
    },
    /// libnfc could not be initialised (it could not allocate its context).
    #[error("cannot initialise libnfc")]
    Init(#[source] nfc1::Error),
    /// No reader answered at the connection string.
    #[error("cannot open NFC reader {connstring}")]
    Open {
        /// The reader asked for.
        connstring: Connstring,
        /// libnfc's error.
        #[source]
        source: nfc1::Error,
    },
    /// The reader opened but would not take the role.
    #[error("NFC reader {connstring} cannot act as {role}")]
    RoleSetup {
        /// The reader.
        connstring: Connstring,
        /// The role asked for.
        role: Role,
        /// libnfc's error.
        #[source]
        source: nfc1::Error,
    },
    /// As initiator, no NFC-DEP target came into the field in time.
    #[error("no NFC-DEP target found within {waited:?}")]
    NoTarget {
        /// How long the initiator looked.
        waited: Duration,
    },
    /// As target, no initiator activated this reader in time.
    #[error("no NFC-DEP initiator came within {waited:?}")]
    NoInitiator {
        /// How long the target waited.
        waited: Duration,
    },
    /// A frame longer than one NFC-DEP exchange may carry was refused before libnfc saw it.
    #[error("frame of {length} bytes refused: an NFC-DEP exchange carries at most {max}")]
    ExchangeTooLong {
        /// Bytes offered.
        length: usize,
        /// `NFC_EXCHANGE_BYTES_MAX` (262).
        max: usize,
    },
    /// One exchange got no answer in time.
    #[error("no answer within {waited:?}")]
    ExchangeTimeout {
        /// How long it waited.
        waited: Duration,
    },
    /// The other terminal left the link during one exchange.
    #[error("link lost: {0}")]
    LinkLost(LinkLoss),
    /// Any other libnfc failure during an exchange.
    #[error("libnfc {operation} failed")]
    Libnfc {
        /// The libnfc call.
        operation: &'static str,
        /// libnfc's error.
        #[source]
        source: nfc1::Error,
    },
    /// The message could not be sent or received: it was refused by the framing (ours or the
    /// peer's, an abort included). Nothing partial is delivered.
    #[error("message {transfer} refused as {role}")]
    Refused {
        /// This terminal's role.
        role: Role,
        /// How far the message had got.
        transfer: Transfer,
        /// Why.
        #[source]
        source: FrameError,
    },
    /// The other terminal stopped answering mid-message. The partial message is discarded.
    #[error("the other terminal stopped answering {transfer} (waited {waited:?} as {role})")]
    Timeout {
        /// This terminal's role.
        role: Role,
        /// How far the message had got.
        transfer: Transfer,
        /// How long the last step waited, all attempts together.
        waited: Duration,
    },
    /// The other terminal was taken away mid-message. The partial message is discarded.
    #[error("the other terminal was taken away {transfer} ({cause}; as {role})")]
    PeerGone {
        /// This terminal's role.
        role: Role,
        /// How far the message had got.
        transfer: Transfer,
        /// How the link was lost.
        cause: LinkLoss,
    },
    /// A link failure that is not the other terminal going away, mid-message.
    #[error("message interrupted {transfer} as {role}")]
    Interrupted {
        /// This terminal's role.
        role: Role,
        /// How far the message had got.
        transfer: Transfer,
        /// The link's error.
        #[source]
        source: Box<NfcError>,
    },
    /// No random message ID could be drawn.
    #[error("cannot draw a random message ID")]
    Random(#[source] getrandom::Error),
}

impl NfcError {
    /// Whether one exchange failing this way is worth trying again: a timeout or an RF error
    /// may be a brief detuning; a released target, a refused frame or a dead device are not.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::ExchangeTimeout { .. } | Self::LinkLost(LinkLoss::RfError)
        )
    }
}

/// The 262-byte guard: refuses `bytes` if one NFC-DEP exchange must not carry them. Every
/// libnfc call that sends or receives DEP data goes through it first.
pub fn check_exchange(bytes: &[u8]) -> Result<&[u8], NfcError> {
    nfcpay_protocol::nfc_frame::check_exchange_length(bytes).map_err(|error| match error {
        FrameError::ExchangeTooLong { length, max } => NfcError::ExchangeTooLong { length, max },
        // check_exchange_length refuses only by length; keep the numbers anyway.
        _ => NfcError::ExchangeTooLong {
            length: bytes.len(),
            max: nfcpay_protocol::nfc_frame::NFC_EXCHANGE_BYTES_MAX,
        },
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn connstrings_are_checked_before_libnfc_sees_them() {
        assert_eq!(
            Connstring::try_from("pn532_uart:/dev/ttyUSB0")
                .unwrap()
                .as_str(),
            "pn532_uart:/dev/ttyUSB0"
        );
        for bad in [String::new(), "acr122_usb\0".to_owned(), "x".repeat(1024)] {
            assert!(
                matches!(
                    Connstring::try_from(bad.as_str()),
                    Err(NfcError::InvalidConnstring { .. })
                ),
                "{bad:?}"
            );
        }
        assert!(Connstring::try_from("x".repeat(CONNSTRING_BYTES_MAX)).is_ok());
    }

    #[test]
    fn the_guard_passes_262_bytes_and_refuses_263() {
        assert_eq!(check_exchange(&[0; 262]).unwrap().len(), 262);
        assert!(matches!(
            check_exchange(&[0; 263]),
            Err(NfcError::ExchangeTooLong {
                length: 263,
                max: 262
            })
        ));
    }

    #[test]
    fn transfer_says_how_far_a_message_got() {
        let transfer = Transfer {
            chunks_done: 2,
            chunk_count: Some(5),
        };
        assert_eq!(transfer.to_string(), "after 2 of 5 chunks");
        assert_eq!(Transfer::default().to_string(), "before the first chunk");
        let error = NfcError::PeerGone {
            role: Role::Initiator,
            transfer,
            cause: LinkLoss::RfError,
        };
        assert_eq!(
            error.to_string(),
            "the other terminal was taken away after 2 of 5 chunks (RF transmission failed \
             (the other terminal left the field); as initiator)"
        );
    }
}
