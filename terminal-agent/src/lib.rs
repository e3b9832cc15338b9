//! nfcpay-agent: the terminal side of nfcpay.
//!
//! - [`keys`]: the terminal's DUKPT keys (X9.24-3 terminal algorithm) over a keystore, saved
//!   so that they survive restarts and crashes.
#![forbid(unsafe_code)]

pub mod keys;
/// NFC-DEP transport between two terminals through libnfc readers (or an in-memory link).
pub mod nfc;
pub mod pn532;
