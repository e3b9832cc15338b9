//! Wire formats and key arithmetic shared by the nfcpay platform and its terminals.
//!
//! This crate is pure code: no I/O, no threads, no clocks, no cryptography with real keys.
//! Everything a peer can send is parsed here into a type that cannot hold an invalid value
//! ("parse, don't validate"), so the daemon and the terminal agent never handle raw bytes.
//!
//! # Layout
//!
//! - [`ids`]: identifiers — [`AccountId`], [`BdkId`], [`DerivationId`], [`InitialKeyId`],
//!   [`TransactionCounter`], [`Ksn`], [`TerminalId`], [`TxnId`].
//! - [`api`]: the HTTPS API between terminal and platform — route paths, the `wait_ms` bound,
//!   problem codes and the problem document.
//! - [`amount`]: [`Amount`] in integer minor units of an ISO 4217 [`Currency`].
//! - [`dukpt`]: the AES DUKPT arithmetic of ANSI X9.24-3-2017 — derivation data, the host's
//!   derivation path for a KSN and the terminal's future-key state machine. The block cipher is
//!   supplied by the caller (a keystore), so keys never pass through this crate.
//! - [`enrollment`]: the enrollment request and answer (JSON) and the KEK context.
//! - [`error`]: the crate's one error type.
//! - [`error_chain`]: [`ErrorChain`], how the binaries print an error with its causes.
//! - [`messages`]: the canonical encodings of requests, instructions, halves and receipts.
//! - `test_vectors` (feature `test-vectors`, for other crates' tests): the published ANSI
//!   X9.24-3-2017 known-answer vectors.
//! - [`nfc_frame`]: framing of one message over NFC-DEP exchanges of at most 262 bytes.
#![forbid(unsafe_code)]

pub mod amount;
pub mod api;
pub mod dukpt;
pub mod enrollment;
pub mod error;
pub mod error_chain;
pub mod ids;
pub mod messages;
pub mod nfc_frame;
#[cfg(feature = "test-vectors")]
pub mod test_vectors;

pub use amount::{Amount, Currency};
pub use error::ProtocolError;
pub use error_chain::ErrorChain;
pub use ids::{
    AccountId, BdkId, DerivationId, InitialKeyId, Ksn, TerminalId, TransactionCounter, TxnId,
};
