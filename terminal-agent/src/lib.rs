//! nfcpay-agent: the terminal side of nfcpay.
#![forbid(unsafe_code)]

pub mod pn532;
