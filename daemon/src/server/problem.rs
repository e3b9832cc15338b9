//! RFC 9457 problem details: every refusal the platform sends, with the stable codes of
//! docs/protocol.md §8. The codes and the document's shape are `nfcpay_protocol::api`'s,
//! shared with the terminal agent; this module adds the HTTP status type and the bytes.

use std::fmt;

use bytes::Bytes;
use http::StatusCode;
use nfcpay_protocol::api::ProblemDocument;
pub use nfcpay_protocol::api::{PROBLEM_CONTENT_TYPE, PROBLEM_TYPE_PREFIX, ProblemCode};

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
        http_status(self.code)
    }

    /// The detail for people.
    pub fn detail(&self) -> &str {
        &self.detail
    }

    /// The `application/problem+json` document.
    pub fn to_json(&self) -> Bytes {
        let document = ProblemDocument::new(self.code, self.detail.as_str());
        // A struct of strings and a number always serializes.
        #[allow(clippy::expect_used)]
        let json = serde_json::to_vec(&document).expect("a problem document serializes");
        Bytes::from(json)
    }
}

/// The HTTP status that carries `code`. Every code's status is a valid one (the table in
/// `nfcpay_protocol::api` holds only 4xx and 5xx; a test checks them all); should one not be,
/// the refusal still goes out, as a 500.
pub fn http_status(code: ProblemCode) -> StatusCode {
    StatusCode::from_u16(code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
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

    /// The codes themselves are checked in `protocol::api`; here, their HTTP statuses.
    #[test]
    fn every_code_maps_to_its_http_error_status() {
        for code in ProblemCode::ALL {
            let status = StatusCode::from_u16(code.status()).unwrap();
            assert!(status.is_client_error() || status.is_server_error());
            assert_eq!(http_status(*code), status);
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
