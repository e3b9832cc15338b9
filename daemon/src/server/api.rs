//! The contract between the network front end and the platform service: [`Api`].
//!
//! The front end owns everything about transport — TLS, client certificates, routing, limits,
//! timeouts, rate limits, problem documents — and hands the service only requests that passed
//! those checks. The service owns everything about payments and knows nothing about HTTP.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use nfcpay_protocol::TxnId;
use nfcpay_protocol::messages::HalfKind;

use super::problem::Problem;
use crate::pki::ClientTerminal;

/// What the terminal routes do; implemented by the platform service.
///
/// # What the front end guarantees before calling
///
/// - `client` is what a client certificate that chained to the platform's terminal CA in a
///   completed TLS 1.3 handshake names, read by [`crate::pki::client_terminal`]: the terminal
///   (its subject's one common name) and the certificate's serial. Whether that terminal
///   exists, is active, has that certificate (the serial of its enrollment) and is the one
///   named inside the half is the service's to check (docs/protocol.md §6.1 step 3).
/// - `body` is complete and at most `body_bytes_max` bytes (4096 by default); it arrived within
///   the body read timeout. It has not been parsed.
/// - The terminal is within its request rate.
///
/// # What the service promises
///
/// - Each method returns either an answer or a [`Problem`] whose code is one of
///   docs/protocol.md §8. A problem's detail goes to the peer verbatim: no key material, PIN or
///   enrollment code in it.
/// - A method never panics on any input.
/// - [`Api::submit_half`] returns within about `wait` plus the time of its own work: the front
///   end does not cut it short (it would have to guess whether a settlement committed), but a
///   shutdown waits for it only until the drain deadline.
/// - A future dropped before completion (client gone, drain deadline passed) must leave no
///   half-done state: the service commits atomically or not at all.
pub trait Api: Send + Sync + 'static {
    /// `POST /v1/halves/a|b`: verify, record, and if both halves are in, settle.
    ///
    /// `kind` is the route the half arrived on (the envelope's type must match it);
    /// `wait` (0 to `wait_ms_max`, already capped) is how long the client is willing to wait
    /// for the other half before a `pending` answer. Answers `200` with the receipt when
    /// [`HalfAnswer::settled`] and `202` otherwise, as `application/octet-stream`.
    fn submit_half(
        &self,
        kind: HalfKind,
        client: ClientTerminal,
        body: Bytes,
        wait: Duration,
    ) -> impl Future<Output = Result<HalfAnswer, Problem>> + Send;

    /// `GET /v1/transactions/{txn_id}`: the latest receipt for `client`, who must be a party
    /// and present its enrolled certificate. Answers `200` with the receipt as
    /// `application/octet-stream`.
    fn transaction(
        &self,
        client: ClientTerminal,
        txn_id: TxnId,
    ) -> impl Future<Output = Result<Bytes, Problem>> + Send;

    /// `POST /v1/enroll`: the JSON request of docs/protocol.md §6.3, reached without a client
    /// certificate. Answers `200` with the returned bytes as `application/json`.
    fn enroll(&self, body: Bytes) -> impl Future<Output = Result<Bytes, Problem>> + Send;

    /// For `/readyz` on the operations listener: checks the HSM session and the database.
    /// Should answer within a second or two; the probe does not wait forever (see
    /// [`READY_TIMEOUT_MS`](super::READY_TIMEOUT_MS)).
    fn ready(&self) -> impl Future<Output = Result<(), NotReady>> + Send;
}

/// The service's answer to a half.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HalfAnswer {
    /// `true`: the payment is settled and durable (`200`); `false`: pending (`202`).
    pub settled: bool,
    /// The receipt bytes (docs/protocol.md §7), sent as the body.
    pub receipt: Bytes,
}

/// Why the platform is not ready: which dependency, and what is wrong with it.
///
/// Shown on the local operations listener only; still, no secret in `reason`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{component}: {reason}")]
pub struct NotReady {
    /// The dependency that failed, e.g. `"hsm"` or `"database"`.
    pub component: &'static str,
    /// What is wrong with it.
    pub reason: String,
}
