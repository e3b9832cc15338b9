//! RFC 9457 problem details: every refusal the platform sends, with the stable codes of
//! docs/protocol.md §8.

use std::fmt;

use bytes::Bytes;
use http::StatusCode;

/// Prefix of a problem's `type` URI; the code follows it.
pub const PROBLEM_TYPE_PREFIX: &str = "https://nfcpay.dev/problems/";
/// Media type of a problem document.
pub const PROBLEM_CONTENT_TYPE: &str = "application/problem+json";

/// Declares the codes with their wire spelling, HTTP status and title in one table.
macro_rules! problem_codes {
    ($($(#[$doc:meta])* $variant:ident = $code:literal, $status:ident, $title:literal;)*) => {
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

            /// The HTTP status that carries it.
            pub fn status(self) -> StatusCode {
                match self { $(ProblemCode::$variant => StatusCode::$status,)* }
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
    Malformed = "malformed", BAD_REQUEST, "Malformed request";
    /// Half A on the half B route or vice versa.
    WrongHalfType = "wrong-half-type", BAD_REQUEST, "Wrong half type for this route";
    /// The GCM tag does not verify.
    AuthenticationFailed = "authentication-failed", BAD_REQUEST, "Message authentication failed";
    /// The KSN names no BDK.
    UnknownBdk = "unknown-bdk", BAD_REQUEST, "Unknown BDK";
    /// Envelope terminal differs from the certificate's, or the KSN is not the terminal's.
    TerminalMismatch = "terminal-mismatch", FORBIDDEN, "Terminal mismatch";
    /// The terminal is suspended.
    TerminalSuspended = "terminal-suspended", FORBIDDEN, "Terminal suspended";
    /// The terminal is revoked.
    TerminalRevoked = "terminal-revoked", FORBIDDEN, "Terminal revoked";
    /// Status asked by a terminal that is neither payee nor payer.
    NotAParty = "not-a-party", FORBIDDEN, "Not a party to this transaction";
    /// No such transaction.
    UnknownTransaction = "unknown-transaction", NOT_FOUND, "Unknown transaction";
    /// `sent_at` too far from platform time.
    ClockSkew = "clock-skew", BAD_REQUEST, "Clock skew too large";
    /// The request expired before settlement.
    Expired = "expired", GONE, "Request expired";
    /// The KSN counter was already used by other bytes.
    ReplayedKsn = "replayed-ksn", CONFLICT, "KSN already used";
    /// The KSN counter is below the replay window.
    StaleKsn = "stale-ksn", CONFLICT, "KSN counter too old";
    /// Another half already stands under this transaction ID.
    Conflict = "conflict", CONFLICT, "Conflicting half";
    /// The halves disagree.
    Mismatch = "mismatch", UNPROCESSABLE_ENTITY, "Halves disagree";
    /// Half B's request digest differs from SHA-256 of half A's request.
    DigestMismatch = "digest-mismatch", UNPROCESSABLE_ENTITY, "Request digest mismatch";
    /// The payer's balance would go below its limit.
    InsufficientFunds = "insufficient-funds", UNPROCESSABLE_ENTITY, "Insufficient funds";
    /// The body is larger than the limit.
    BodyTooLarge = "body-too-large", PAYLOAD_TOO_LARGE, "Body too large";
    /// Headers or body too slow.
    Timeout = "timeout", REQUEST_TIMEOUT, "Request too slow";
    /// Per-terminal (or per-address, for enrollment) request rate exceeded.
    RateLimited = "rate-limited", TOO_MANY_REQUESTS, "Too many requests";
    /// Enrollment code wrong, used or expired; CSR not matching.
    EnrollmentRefused = "enrollment-refused", FORBIDDEN, "Enrollment refused";
    /// HSM or database unavailable.
    Unavailable = "unavailable", SERVICE_UNAVAILABLE, "Service unavailable";
    /// No such route.
    NotFound = "not-found", NOT_FOUND, "No such route";
    /// The route exists but not with this method (the answer has an `Allow` header).
    MethodNotAllowed = "method-not-allowed", METHOD_NOT_ALLOWED, "Method not allowed";
    /// A fault of the platform itself; details are in its log, not in the answer.
    Internal = "internal", INTERNAL_SERVER_ERROR, "Internal error";
}

impl fmt::Display for ProblemCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One refusal: a code (which fixes status and title) and a detail for people.
///
/// The detail is sent to the peer: it must never hold key material, a PIN or an enrollment
/// code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    code: ProblemCode,
    detail: String,
}

impl Problem {
    /// A refusal with `code` and a human-readable `detail`.
    pub fn new(code: ProblemCode, detail: impl Into<String>) -> Self {
        Self {
            code,
            detail: detail.into(),
        }
    }

    /// The stable code.
    pub fn code(&self) -> ProblemCode {
        self.code
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.code.status()
    }

    /// The detail for people.
    pub fn detail(&self) -> &str {
        &self.detail
    }

    /// The `application/problem+json` document.
    pub fn to_json(&self) -> Bytes {
        let document = serde_json::json!({
            "type": format!("{PROBLEM_TYPE_PREFIX}{}", self.code.as_str()),
            "title": self.code.title(),
            "status": self.code.status().as_u16(),
            "code": self.code.as_str(),
            "detail": self.detail,
        });
        Bytes::from(document.to_string())
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}): {}", self.code, self.status(), self.detail)
    }
}

impl std::error::Error for Problem {}

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
            assert!(code.status().is_client_error() || code.status().is_server_error());
        }
    }

    #[test]
    fn serializes_as_rfc_9457() {
        let problem = Problem::new(ProblemCode::ReplayedKsn, "counter 7 \"again\"");
        let value: serde_json::Value = serde_json::from_slice(&problem.to_json()).unwrap();
        assert_eq!(
            value,
            serde_json::json!({
                "type": "https://nfcpay.dev/problems/replayed-ksn",
                "title": "KSN already used",
                "status": 409,
                "code": "replayed-ksn",
                "detail": "counter 7 \"again\"",
            })
        );
    }
}
