//! The nfcpay platform: `nfcpayd`, the daemon that decrypts, verifies, matches and settles
//! what terminals send, and `nfcpay-admin`, its operator's command line.
//!
//! # Layout
//!
//! - [`config`]: the TOML configuration with `NFCPAY_*` overrides, shared by both binaries.
//! - [`daemon`]: `nfcpayd` from start to stop.
//! - [`admin`]: the operator CLI's commands (one file per group).
//! - [`pki`]: the terminal CA, server and receipt keys in the keystore, and the certificates.
//! - [`service`]: the platform service — verify a half, hand it to the ledger, seal receipts, enroll.
//! - [`server`]: the network front end — mutual TLS 1.3, HTTP routes, limits, metrics, signals.
//! - [`storage`]: the ledger in SQLite or PostgreSQL — settlement, replay state, group commit, audit chain.
#![forbid(unsafe_code)]

pub mod admin;
pub mod config;
pub mod daemon;
pub mod pki;
pub mod server;
pub mod service;
pub mod storage;
