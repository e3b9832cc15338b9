//! nfcpay-agent: the terminal side of nfcpay.
#![forbid(unsafe_code)]

/// NFC-DEP transport between two terminals through libnfc readers (or an in-memory link).
pub mod nfc;
pub mod pn532;
