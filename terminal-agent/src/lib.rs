//! nfcpay-agent: the terminal side of nfcpay.
//!
//! - [`keys`]: the terminal's DUKPT keys (X9.24-3 terminal algorithm) over a keystore, saved
//!   so that they survive restarts and crashes.
//! - [`enroll`]: enrollment (certificate and initial key), and opening an enrolled terminal.
//! - [`halves`]: sealing halves and opening receipts with the terminal's DUKPT keys.
//! - [`pending`]: sealed halves kept on disk until the platform's final answer;
//!   [`delivery`]: sending one again, the same bytes, with bounded backoff.
//! - [`platform`]: the HTTPS client of the platform, with the terminal's client certificate;
//!   routes and problem documents are `nfcpay_protocol::api`'s.
//! - [`nfc`]: NFC-DEP between two terminals; the framing itself is `nfcpay_protocol::nfc_frame`.
//! - [`commands`]: what each `nfcpay-agent` command does, one file per command; [`cli`]: the
//!   command line.
//!
//! The PN532 emulator the tests and the demo use is its own crate, `nfcpay-pn532-sim`
//! (`terminal-agent/pn532-sim/`); this crate does not depend on it.
#![forbid(unsafe_code)]

/// The `nfcpay-agent` command line.
pub mod cli;
pub mod commands;
pub mod delivery;
pub mod enroll;
pub mod halves;
pub mod keys;
/// NFC-DEP transport between two terminals through libnfc readers (or an in-memory link).
pub mod nfc;
pub mod pending;
pub mod platform;
