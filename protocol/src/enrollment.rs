//! The enrollment exchange (docs/protocol.md §6.3): the JSON a terminal posts to
//! `POST /v1/enroll` and the JSON the platform answers, and the context bound into the
//! key-encryption key both sides derive with ECDH.
//!
//! The daemon reads [`EnrollmentRequest`] and writes [`EnrollmentAnswer`]; the agent does the
//! opposite. Fields are strings as on the wire (hex, PEM); each side parses them into its own
//! types. Field order is the serialization order.

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::TerminalId;

/// The context bound into the enrollment KEK: this prefix, then the terminal ID.
pub const KEK_CONTEXT_PREFIX: &[u8] = b"nfcpay enrollment v1|";

/// The KEK context for `terminal_id`: [`KEK_CONTEXT_PREFIX`] then the terminal ID's bytes.
pub fn kek_context(terminal_id: &TerminalId) -> Vec<u8> {
    [KEK_CONTEXT_PREFIX, terminal_id.as_str().as_bytes()].concat()
}

/// The enrollment request. Holds the one-time code, so it has no `Debug`.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollmentRequest {
    /// The terminal the code was issued for.
    pub terminal_id: String,
    /// The one-time enrollment code. Never logged.
    pub code: Zeroizing<String>,
    /// PKCS#10 CSR, PEM, subject CN = the terminal ID, P-256 key.
    pub csr: String,
    /// The terminal's ECDH public key: hex of a 65-byte uncompressed P-256 point.
    pub ecdh_public_key: String,
}

/// The enrollment answer. Holds no secret: the initial key is wrapped.
///
/// Unknown fields are ignored when reading, so a platform may add one without breaking
/// terminals.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct EnrollmentAnswer {
    /// The enrolled terminal.
    pub terminal_id: String,
    /// Its client certificate, PEM.
    pub certificate: String,
    /// The terminal CA's certificate, PEM (the platform's server certificate chains to it).
    pub ca_certificate: String,
    /// The Initial Key ID: BDK ID ‖ derivation ID, 16 hex digits.
    pub initial_key_id: String,
    /// `aes128`, `aes192` or `aes256`.
    pub initial_key_algorithm: String,
    /// The platform's ephemeral ECDH public key, hex.
    pub platform_ecdh_public_key: String,
    /// The initial key wrapped (RFC 3394) under the ECDH-derived KEK, hex.
    pub wrapped_initial_key: String,
    /// The initial key's KCV, for the terminal to check after unwrapping.
    pub initial_key_kcv: String,
    /// The receipt-signing public key, hex of a 65-byte point.
    pub receipt_public_key: String,
    /// The account the operator registered the terminal for (the one its halves must name).
    /// Optional on the wire: platforms before it was added send none, and terminals that do
    /// not know it ignore it; absent, not `null`, when there is none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account_id: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kek_context_is_prefix_then_terminal_id() {
        let terminal_id: TerminalId = "T-0001".parse().unwrap();
        assert_eq!(kek_context(&terminal_id), b"nfcpay enrollment v1|T-0001");
    }

    #[test]
    fn request_bytes_are_fixed_and_strict() {
        let request = EnrollmentRequest {
            terminal_id: "T-0001".into(),
            code: Zeroizing::new("ABCD".into()),
            csr: "PEM".into(),
            ecdh_public_key: "04AA".into(),
        };
        let json = serde_json::to_string(&request).unwrap();
        assert_eq!(
            json,
            r#"{"terminal_id":"T-0001","code":"ABCD","csr":"PEM","ecdh_public_key":"04AA"}"#
        );
        let back: EnrollmentRequest = serde_json::from_str(&json).unwrap();
        assert_eq!(back.code.as_str(), "ABCD");
        let extra = json.replace('}', r#","more":1}"#);
        assert!(serde_json::from_str::<EnrollmentRequest>(&extra).is_err());
    }

    #[test]
    fn answer_round_trips_and_tolerates_new_fields() {
        let answer = EnrollmentAnswer {
            terminal_id: "T-0001".into(),
            certificate: "cert".into(),
            ca_certificate: "ca".into(),
            initial_key_id: "1234567890123456".into(),
            initial_key_algorithm: "aes256".into(),
            platform_ecdh_public_key: "04".into(),
            wrapped_initial_key: "00".into(),
            initial_key_kcv: "ABCDEF".into(),
            receipt_public_key: "04".into(),
            account_id: None,
        };
        let json = serde_json::to_string(&answer).unwrap();
        assert!(json.starts_with(r#"{"terminal_id":"T-0001","certificate":"cert","#));
        assert!(!json.contains("account_id"), "absent, not null: {json}");
        let extra = json.replace('}', r#","more":1}"#);
        assert_eq!(
            serde_json::from_str::<EnrollmentAnswer>(&extra).unwrap(),
            answer
        );
        // The account, when the platform says it, is the last field; an answer without it
        // (an older platform) reads as None, as above.
        let with_account = EnrollmentAnswer {
            account_id: Some("shop".into()),
            ..answer
        };
        let json = serde_json::to_string(&with_account).unwrap();
        assert!(json.ends_with(r#","account_id":"shop"}"#), "{json}");
        assert_eq!(
            serde_json::from_str::<EnrollmentAnswer>(&json).unwrap(),
            with_account
        );
    }
}
