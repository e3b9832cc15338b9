//! The canonical encodings of `docs/protocol.md`: the payment request (§3), the payment
//! instruction (§4), the sealed halves (§5) and the receipts (§7).
//!
//! Every message has exactly one encoding. Each type's `decode` refuses any deviation from it —
//! an unknown version or type, a length out of range, an invalid identifier, currency or amount,
//! truncation, trailing bytes — and checks every length before it reads what the length covers,
//! so a peer cannot make it allocate more than the limits below. What `decode` returns is valid
//! by construction, and `encode` gives back exactly the bytes it was decoded from.
//!
//! No cryptography with keys happens here: a [`HalfEnvelope`] carries its GCM body opaquely and
//! gives the exact AAD ([`HalfEnvelope::header_bytes`]); a [`SealedReceipt`] carries its CMAC and
//! signature and the exact bytes they cover ([`SealedReceipt::body_bytes`]). The keystore seals
//! and checks them.
//!
//! # Layout
//!
//! - [`PaymentRequest`] (§3) with its [`PaymentKind`], [`RequestValidity`] and [`Description`].
//! - [`PaymentInstruction`] (§4).
//! - [`HalfEnvelope`] (§5): a [`HalfHeader`] of a [`HalfKind`] and the GCM body.
//! - [`Receipt`] (§7, built from [`ReceiptFields`], with a [`ReceiptStatus`]) and
//!   [`SealedReceipt`].
//! - The limits of §9 and the type bytes, as constants.

mod codec;
mod half;
mod instruction;
mod receipt;
mod request;

pub use half::{HalfEnvelope, HalfHeader, HalfKind};
pub use instruction::PaymentInstruction;
pub use receipt::{Receipt, ReceiptFields, ReceiptStatus, SealedReceipt};
pub use request::{Description, PaymentKind, PaymentRequest, RequestValidity};

use crate::ids::IDENTIFIER_BYTES_MAX;
use crate::{Ksn, TxnId};

/// The protocol version every message opens with.
pub const PROTOCOL_VERSION: u8 = 0x01;
/// Type byte of a payment request (§3).
pub const MESSAGE_TYPE_PAYMENT_REQUEST: u8 = 0x01;
/// Type byte of a payment instruction (§4).
pub const MESSAGE_TYPE_PAYMENT_INSTRUCTION: u8 = 0x02;
/// Type byte of half A, whose body is a payment request (§5).
pub const MESSAGE_TYPE_HALF_A: u8 = 0x41;
/// Type byte of half B, whose body is a payment instruction (§5).
pub const MESSAGE_TYPE_HALF_B: u8 = 0x42;
/// Type byte of a receipt (§7).
pub const MESSAGE_TYPE_RECEIPT: u8 = 0x52;

/// Longest description of a payment request, in UTF-8 bytes.
pub const DESCRIPTION_BYTES_MAX: usize = 140;
/// Longest time from a request's creation to its expiry.
pub const REQUEST_LIFETIME_MS_MAX: u64 = 600_000;
/// Bytes of a SHA-256 digest of a payment request.
pub const REQUEST_DIGEST_BYTES: usize = 32;
/// Bytes of a GCM nonce.
pub const GCM_NONCE_BYTES: usize = 12;
/// Bytes of a GCM tag.
pub const GCM_TAG_BYTES: usize = 16;
/// Shortest GCM body of a half: a tag over an empty ciphertext.
pub const HALF_BODY_BYTES_MIN: usize = GCM_TAG_BYTES;
/// Longest GCM body of a half: 2048 bytes of ciphertext and the tag.
pub const HALF_BODY_BYTES_MAX: usize = 2048 + GCM_TAG_BYTES;
/// Bytes of a receipt's AES-CMAC.
pub const RECEIPT_CMAC_BYTES: usize = 16;
/// Bytes of a receipt's ECDSA P-256 signature, raw `r ‖ s`.
pub const RECEIPT_SIGNATURE_BYTES: usize = 64;
/// Longest HTTP body the platform reads (§6.1 step 1).
pub const HTTP_BODY_BYTES_MAX: usize = 4096;
/// Largest difference between a half's `sent_at` and the platform's clock (§6.1 step 6).
pub const CLOCK_SKEW_MS_MAX: u64 = 300_000;
/// How far below a terminal's highest accepted KSN counter a counter may still be accepted
/// (§6.1 step 7).
pub const REPLAY_WINDOW_COUNTERS: u32 = 1024;
/// Longest a terminal may ask the platform to hold a pending answer (§6.2).
pub const WAIT_MS_MAX: u64 = 10_000;

/// Bytes of a `str8` identifier field at its longest: length byte and 32 characters.
const IDENTIFIER_FIELD_BYTES_MAX: usize = 1 + IDENTIFIER_BYTES_MAX;
/// Bytes of an amount and its currency.
const AMOUNT_FIELD_BYTES: usize = 8 + 3;

/// Longest encoded payment request.
pub const PAYMENT_REQUEST_BYTES_MAX: usize = 2 // version, type
    + TxnId::LEN
    + 2 * IDENTIFIER_FIELD_BYTES_MAX // payee terminal, payee account
    + AMOUNT_FIELD_BYTES
    + 1 // kind
    + 8 + 8 // created_at, expires_at
    + 1 + DESCRIPTION_BYTES_MAX;
/// Longest encoded payment instruction.
pub const PAYMENT_INSTRUCTION_BYTES_MAX: usize = 2 // version, type
    + TxnId::LEN
    + REQUEST_DIGEST_BYTES
    + 3 * IDENTIFIER_FIELD_BYTES_MAX // payer terminal, payer account, payee terminal
    + AMOUNT_FIELD_BYTES
    + 8; // consented_at
/// Longest half header (the AAD), `version` through `body_length`.
pub const HALF_HEADER_BYTES_MAX: usize = 2 // version, type
    + IDENTIFIER_FIELD_BYTES_MAX
    + Ksn::LEN
    + 8 // sent_at
    + GCM_NONCE_BYTES
    + 2; // body_length
/// Longest encoded half: header and the longest body.
pub const HALF_BYTES_MAX: usize = HALF_HEADER_BYTES_MAX + HALF_BODY_BYTES_MAX;
/// Longest receipt body (what the CMAC and the signature cover).
pub const RECEIPT_BODY_BYTES_MAX: usize = 3 // version, type, status
    + TxnId::LEN
    + IDENTIFIER_FIELD_BYTES_MAX // recipient terminal
    + Ksn::LEN
    + REQUEST_DIGEST_BYTES
    + 4 * IDENTIFIER_FIELD_BYTES_MAX // payee terminal and account, payer terminal and account
    + AMOUNT_FIELD_BYTES
    + 8 + 8; // settlement_id, settled_at
/// Bytes after a receipt body: its CMAC and its signature.
pub const RECEIPT_SEAL_BYTES: usize = RECEIPT_CMAC_BYTES + RECEIPT_SIGNATURE_BYTES;
/// Longest sealed receipt.
pub const SEALED_RECEIPT_BYTES_MAX: usize = RECEIPT_BODY_BYTES_MAX + RECEIPT_SEAL_BYTES;

// The limits fit each other: every request and instruction can be sealed in a half, every half
// and receipt fits an HTTP body, every request fits one NFC message, and body_length fits a u16.
const _: () = assert!(PAYMENT_REQUEST_BYTES_MAX + GCM_TAG_BYTES <= HALF_BODY_BYTES_MAX);
const _: () = assert!(PAYMENT_INSTRUCTION_BYTES_MAX + GCM_TAG_BYTES <= HALF_BODY_BYTES_MAX);
const _: () = assert!(HALF_BYTES_MAX <= HTTP_BODY_BYTES_MAX);
const _: () = assert!(SEALED_RECEIPT_BYTES_MAX <= HTTP_BODY_BYTES_MAX);
const _: () = assert!(PAYMENT_REQUEST_BYTES_MAX <= crate::nfc_frame::MESSAGE_BYTES_MAX);
const _: () = assert!(HALF_BODY_BYTES_MAX <= u16::MAX as usize);
const _: () = assert!(DESCRIPTION_BYTES_MAX <= u8::MAX as usize);

#[cfg(test)]
mod strategies;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_match_docs_protocol_md() {
        assert_eq!(PAYMENT_REQUEST_BYTES_MAX, 253);
        assert_eq!(PAYMENT_INSTRUCTION_BYTES_MAX, 168);
        assert_eq!(HALF_HEADER_BYTES_MAX, 69);
        assert_eq!(HALF_BODY_BYTES_MIN, 16);
        assert_eq!(HALF_BODY_BYTES_MAX, 2064);
        assert_eq!(HALF_BYTES_MAX, 2133);
        assert_eq!(RECEIPT_BODY_BYTES_MAX, 255);
        assert_eq!(SEALED_RECEIPT_BYTES_MAX, 335);
        assert_eq!(REQUEST_LIFETIME_MS_MAX, 10 * 60 * 1000);
        assert_eq!(CLOCK_SKEW_MS_MAX, 5 * 60 * 1000);
    }
}
