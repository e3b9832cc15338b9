//! The HTTPS API between a terminal and the platform (docs/protocol.md §6 and §8): the route
//! paths, the `wait_ms` bound, the stable problem codes and the RFC 9457 problem document.
//!
//! Both sides take these from here — the daemon to route and refuse, the agent to call and to
//! read refusals — so the two cannot disagree on a path, a code or a field name. This module
//! only names things; it opens no connection and knows no HTTP library.

use std::fmt;
use std::str::FromStr;

use crate::TxnId;
use crate::messages::HalfKind;

/// `POST`: the payee's sealed payment request (half A).
pub const HALF_A_PATH: &str = "/v1/halves/a";
/// `POST`: the payer's sealed payment instruction (half B).
pub const HALF_B_PATH: &str = "/v1/halves/b";
/// Media type of a half (the request body) and of a receipt (the answer's body).
pub const HALF_CONTENT_TYPE: &str = "application/octet-stream";
/// `GET`, followed by a transaction ID in hex: the latest receipt of a payment.
pub const TRANSACTIONS_PATH_PREFIX: &str = "/v1/transactions/";
/// `POST`: enrollment, on the enrollment listener (no client certificate).
pub const ENROLL_PATH: &str = "/v1/enroll";
/// Media type of an enrollment request (the request body) and of its answer.
pub const ENROLL_CONTENT_TYPE: &str = "application/json";
/// The one query parameter of the half routes: how long, in milliseconds, the client will wait
/// for the other half before a `pending` answer.
pub const WAIT_QUERY_PARAMETER: &str = "wait_ms";
/// Longest a client may ask the platform to hold a pending answer, in milliseconds
/// (docs/protocol.md §6.2). The platform caps larger values to its configured maximum, which
/// is at most this.
pub const WAIT_MS_MAX: u64 = 10_000;

/// The route a half of `kind` is posted to.
pub fn half_path(kind: HalfKind) -> &'static str {
    match kind {
        HalfKind::A => HALF_A_PATH,
        HalfKind::B => HALF_B_PATH,
    }
}

/// The request target of a half of `kind` that waits `wait_ms` for the other half.
pub fn half_target(kind: HalfKind, wait_ms: u128) -> String {
    format!("{}?{WAIT_QUERY_PARAMETER}={wait_ms}", half_path(kind))
}

/// The route of one transaction's receipt.
pub fn transaction_path(txn_id: TxnId) -> String {
    format!("{TRANSACTIONS_PATH_PREFIX}{txn_id}")
}

/// Prefix of a problem's `type` URI; the code follows it.
pub const PROBLEM_TYPE_PREFIX: &str = "https://nfcpay.dev/problems/";
/// Media type of a problem document.
pub const PROBLEM_CONTENT_TYPE: &str = "application/problem+json";

/// Declares the codes with their wire spelling, HTTP status and title in one table.
macro_rules! problem_codes {
    ($($(#[$doc:meta])* $variant:ident = $code:literal, $status:literal, $title:literal;)*) => {
        /// A stable, machine-readable refusal reason (docs/protocol.md §8).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum ProblemCode {
            $($(#[$doc])* $variant,)*
        }

        impl ProblemCode {
            /// Every code, in table order.
            pub const ALL: &'static [ProblemCode] = &[$(ProblemCode::$variant,)*];

            /// The wire spelling, as in `"code"` and at the end of `"type"`.
            pub fn as_str(self) -> &'static str {
                match self { $(ProblemCode::$variant => $code,)* }
            }

            /// The HTTP status code that carries it.
            pub fn status(self) -> u16 {
                match self { $(ProblemCode::$variant => $status,)* }
            }

            /// A short, fixed summary for people.
            pub fn title(self) -> &'static str {
                match self { $(ProblemCode::$variant => $title,)* }
            }
        }
    };
}

problem_codes! {
    /// The envelope or plaintext does not decode, or the request line or query is malformed.
    Malformed = "malformed", 400, "Malformed request";
    /// Half A on the half B route or vice versa.
    WrongHalfType = "wrong-half-type", 400, "Wrong half type for this route";
    /// The GCM tag does not verify.
    AuthenticationFailed = "authentication-failed", 400, "Message authentication failed";
    /// The KSN is the terminal's, but its BDK is no longer in the platform's keystore. (A KSN
    /// whose initial key ID is not the terminal's is `terminal-mismatch`, whatever its BDK ID:
    /// that check comes first.)
    UnknownBdk = "unknown-bdk", 400, "Unknown BDK";
    /// Envelope terminal differs from the certificate's, the certificate is not the terminal's
    /// enrolled one, or the KSN is not the terminal's.
    TerminalMismatch = "terminal-mismatch", 403, "Terminal mismatch";
    /// The terminal is suspended.
    TerminalSuspended = "terminal-suspended", 403, "Terminal suspended";
    /// The terminal is revoked.
    TerminalRevoked = "terminal-revoked", 403, "Terminal revoked";
    /// Status asked by a terminal that is neither payee nor payer.
    NotAParty = "not-a-party", 403, "Not a party to this transaction";
    /// No such transaction.
    UnknownTransaction = "unknown-transaction", 404, "Unknown transaction";
    /// `sent_at` too far from platform time.
    ClockSkew = "clock-skew", 400, "Clock skew too large";
    /// The request expired before settlement.
    Expired = "expired", 410, "Request expired";
    /// The KSN counter was already used by other bytes.
    ReplayedKsn = "replayed-ksn", 409, "KSN already used";
    /// The KSN counter is below the replay window.
    StaleKsn = "stale-ksn", 409, "KSN counter too old";
    /// Another half already stands under this transaction ID.
    Conflict = "conflict", 409, "Conflicting half";
    /// The halves disagree (payee terminal, amount, currency, or the same terminal on both
    /// sides).
    Mismatch = "mismatch", 422, "Halves disagree";
    /// The half names an account the ledger does not have.
    UnknownAccount = "unknown-account", 422, "Unknown account";
    /// The half names an existing account that is not its terminal's.
    ForeignAccount = "foreign-account", 403, "Account not the terminal's";
    /// The payee's or payer's account is in another currency than the payment.
    AccountCurrency = "account-currency", 422, "Account in another currency";
    /// Half B's request digest differs from SHA-256 of half A's request.
    DigestMismatch = "digest-mismatch", 422, "Request digest mismatch";
    /// The payer's balance would go below its limit.
    InsufficientFunds = "insufficient-funds", 422, "Insufficient funds";
    /// The body is larger than the limit.
    BodyTooLarge = "body-too-large", 413, "Body too large";
    /// A half's `Content-Type` is not `application/octet-stream`, or an enrollment's is not
    /// `application/json`.
    UnsupportedMediaType = "unsupported-media-type", 415, "Unsupported media type";
    /// Headers or body too slow.
    Timeout = "timeout", 408, "Request too slow";
    /// Per-terminal (or per-address, for enrollment) request rate exceeded.
    RateLimited = "rate-limited", 429, "Too many requests";
    /// Enrollment code wrong, used or expired; CSR not matching.
    EnrollmentRefused = "enrollment-refused", 403, "Enrollment refused";
    /// HSM or database unavailable.
    Unavailable = "unavailable", 503, "Service unavailable";
    /// No such route.
    NotFound = "not-found", 404, "No such route";
    /// The route exists but not with this method (the answer has an `Allow` header).
    MethodNotAllowed = "method-not-allowed", 405, "Method not allowed";
    /// A fault of the platform itself; details are in its log, not in the answer.
    Internal = "internal", 500, "Internal error";
}

impl fmt::Display for ProblemCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A code this crate does not know (perhaps from a newer platform).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("not a known problem code")]
pub struct UnknownProblemCode;

impl FromStr for ProblemCode {
    type Err = UnknownProblemCode;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .iter()
            .copied()
            .find(|code| code.as_str() == text)
            .ok_or(UnknownProblemCode)
    }
}

/// The `application/problem+json` document of RFC 9457 with nfcpay's `code` extension.
///
/// Fields are declared in the order they are serialized (alphabetical), so the bytes are the
/// same whichever JSON map the serializer would have used. Every field defaults when missing, so
/// a reader can still make sense of a document that is not quite one (a proxy's, an older
/// platform's).
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct ProblemDocument {
    /// The stable machine-readable code (docs/protocol.md §8); empty when missing.
    pub code: String,
    /// What the platform says, for people. Never key material, a PIN or an enrollment code.
    pub detail: String,
    /// The HTTP status.
    pub status: u16,
    /// The code's fixed title.
    pub title: String,
    /// [`PROBLEM_TYPE_PREFIX`] followed by the code.
    #[serde(rename = "type")]
    pub problem_type: String,
}

impl ProblemDocument {
    /// The document refusing with `code`, explained by `detail`.
    pub fn new(code: ProblemCode, detail: impl Into<String>) -> Self {
        Self {
            code: code.as_str().to_owned(),
            detail: detail.into(),
            status: code.status(),
            title: code.title().to_owned(),
            problem_type: format!("{PROBLEM_TYPE_PREFIX}{}", code.as_str()),
        }
    }

    /// The code, if it is one this crate knows.
    pub fn known_code(&self) -> Option<ProblemCode> {
        self.code.parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_well_formed() {
        let mut seen = std::collections::HashSet::new();
        for code in ProblemCode::ALL {
            assert!(seen.insert(code.as_str()), "{code} twice");
            assert!(
                code.as_str()
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'-')
            );
            assert!((400..600).contains(&code.status()), "{code}");
            assert_eq!(code.as_str().parse::<ProblemCode>(), Ok(*code));
        }
        assert_eq!("gone".parse::<ProblemCode>(), Err(UnknownProblemCode));
    }

    #[test]
    fn document_bytes_are_fixed() {
        let document = ProblemDocument::new(ProblemCode::ReplayedKsn, "counter 7 \"again\"");
        let json = serde_json::to_string(&document).unwrap();
        assert_eq!(
            json,
            r#"{"code":"replayed-ksn","detail":"counter 7 \"again\"","status":409,"title":"KSN already used","type":"https://nfcpay.dev/problems/replayed-ksn"}"#
        );
        let back: ProblemDocument = serde_json::from_str(&json).unwrap();
        assert_eq!(back, document);
        assert_eq!(back.known_code(), Some(ProblemCode::ReplayedKsn));
    }

    #[test]
    fn a_partial_document_still_reads() {
        let document: ProblemDocument = serde_json::from_str(r#"{"status":502}"#).unwrap();
        assert_eq!(document.status, 502);
        assert_eq!(document.code, "");
        assert_eq!(document.known_code(), None);
    }

    #[test]
    fn paths() {
        assert_eq!(half_path(HalfKind::A), "/v1/halves/a");
        assert_eq!(half_path(HalfKind::B), "/v1/halves/b");
        for kind in [HalfKind::A, HalfKind::B] {
            assert!(half_path(kind).ends_with(&format!("/{}", kind.letter())));
        }
        assert_eq!(half_target(HalfKind::B, 250), "/v1/halves/b?wait_ms=250");
        let txn_id: TxnId = "000102030405060708090a0b0c0d0e0f".parse().unwrap();
        assert_eq!(
            transaction_path(txn_id),
            "/v1/transactions/000102030405060708090A0B0C0D0E0F"
        );
    }
}
