//! The nfcpay platform: `nfcpayd`, the daemon that decrypts, verifies, matches and settles
//! what terminals send, and `nfcpay-admin`, its operator's command line.
//!
//! # Layout
//!
//! - [`config`]: the TOML configuration with `NFCPAY_*` overrides, shared by both binaries.
//! - [`admin`]: the operator CLI's commands (one file per group).
#![forbid(unsafe_code)]

pub mod admin;
pub mod config;
