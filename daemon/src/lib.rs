//! nfcpay platform: the daemon and the operator CLI.
#![forbid(unsafe_code)]
