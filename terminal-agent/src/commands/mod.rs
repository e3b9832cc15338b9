//! What the `nfcpay-agent` commands do, with typed inputs; one file per command, as in
//! mini-redis. The command line itself (parsing, help, exit codes) is [`crate::cli`].
//!
//! # Layout
//!
//! - [`enroll`]: enroll the terminal (certificate and initial key) with a one-time code.
//! - [`request`]: the payee — payment request over NFC, half A, receipt.
//! - [`pay`]: the payer — request over NFC, consent, half B, receipt.
//! - [`pending`]: the halves kept until their final answer — list them, send them again.
//! - [`resend`]: diagnostic — submit a saved half again, as it is or tampered.
//! - [`status`]: the terminal's identity and key state, or one payment's receipt.
//! - [`devices`]: the NFC readers libnfc sees.
//! - [`shared`]: what they share — [`AgentError`], [`TerminalPlace`] (directory and keystore),
//!   the NFC and platform settings, and a half's way from its DUKPT counter to a verified,
//!   printed receipt.

pub mod devices;
pub mod enroll;
pub mod pay;
pub mod pending;
pub mod request;
pub mod resend;
pub mod shared;
pub mod status;

pub use enroll::EnrollOptions;
pub use pay::PayOptions;
pub use request::RequestOptions;
pub use shared::{
    AgentError, CODE_BYTES_MAX, KeystoreChoice, NfcSettings, PLATFORM_WAIT_MAX, PlatformWait,
    REQUEST_VALIDITY_MS, SAVED_HALF_BYTES_MAX, SOFTWARE_KEYSTORE_FILE, STATUS_POLL_INTERVAL,
    TerminalPlace, agent_command,
};
