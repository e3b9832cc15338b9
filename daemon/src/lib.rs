//! The nfcpay platform: `nfcpayd`, the daemon that decrypts, verifies, matches and settles
//! what terminals send, and `nfcpay-admin`, its operator's command line.
//!
//! # Layout
//!
//! - [`config`]: the TOML configuration with `NFCPAY_*` overrides, shared by both binaries.
//! - [`admin`]: the operator CLI's commands (one file per group).
//! - [`pki`]: the terminal CA, server and receipt keys in the keystore, and the certificates.
//! - [`server`]: the network front end — mutual TLS 1.3, HTTP routes, limits, metrics, signals.
#![forbid(unsafe_code)]

pub mod admin;
pub mod config;
pub mod pki;
pub mod server;
