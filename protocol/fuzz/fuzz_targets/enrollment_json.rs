//! Fuzzes the enrollment JSON (docs/protocol.md §6.3) as both sides read it: the daemon's
//! `EnrollmentRequest` (strict: unknown fields refused) and the agent's `EnrollmentAnswer`
//! (lenient: unknown fields ignored). Neither may panic, and whatever one accepts must come
//! back the same after writing and reading it again; a terminal ID that parses must print
//! as itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nfcpay_protocol::TerminalId;
use nfcpay_protocol::enrollment::{EnrollmentAnswer, EnrollmentRequest, kek_context};

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = serde_json::from_slice::<EnrollmentRequest>(data) {
        let json = serde_json::to_vec(&request).expect("a read request writes");
        let again: EnrollmentRequest = serde_json::from_slice(&json).expect("and reads back");
        assert_eq!(again.terminal_id, request.terminal_id);
        assert_eq!(again.code.as_str(), request.code.as_str());
        assert_eq!(again.csr, request.csr);
        assert_eq!(again.ecdh_public_key, request.ecdh_public_key);
        if let Ok(terminal_id) = request.terminal_id.parse::<TerminalId>() {
            assert_eq!(terminal_id.as_str(), request.terminal_id);
            assert!(kek_context(&terminal_id).ends_with(request.terminal_id.as_bytes()));
        }
    }
    if let Ok(answer) = serde_json::from_slice::<EnrollmentAnswer>(data) {
        let json = serde_json::to_vec(&answer).expect("a read answer writes");
        let again: EnrollmentAnswer = serde_json::from_slice(&json).expect("and reads back");
        assert_eq!(again, answer);
    }
});
