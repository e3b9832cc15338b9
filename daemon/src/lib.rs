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
//! - `testing` (feature `testing`): when a test's PostgreSQL cases may be skipped.
//!
//! A half goes `server::routes` → `service::halves` (verify, with the DUKPT key derived in the
//! keystore) → `storage` (settle in one durable transaction) → `service::receipts`. What the
//! daemon shares with terminals (messages, routes, problem codes, enrollment JSON) is defined in
//! `nfcpay_protocol`, never here. See docs/architecture.md, "Where things are".
#![forbid(unsafe_code)]

pub mod admin;
pub mod config;
pub mod daemon;
pub mod pki;
pub mod server;
pub mod service;
pub mod storage;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
