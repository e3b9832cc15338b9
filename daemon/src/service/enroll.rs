//! Enrollment (remote key loading, docs/protocol.md §6.3): a terminal with a one-time code
//! gets its client certificate and its initial key, wrapped under a key-encryption key that
//! both sides derive with ECDH inside their keystores — the initial key never exists in clear
//! outside the HSM and the terminal's keystore. The JSON shapes and the KEK context are
//! `nfcpay_protocol::enrollment`'s, shared with the terminal agent.

use nfcpay_keystore::dukpt::{TransientKey, initial_key};
use nfcpay_keystore::{EcPublicKey, KeyPurpose};
use nfcpay_protocol::TerminalId;
use nfcpay_protocol::enrollment::{EnrollmentAnswer, EnrollmentRequest, kek_context};
use sha2::{Digest, Sha256};

use super::{Inner, TERMINAL_CERTIFICATE_VALIDITY, now_ms, problems};
use crate::pki;
use crate::server::problem::{Problem, ProblemCode};
use crate::storage::TerminalState;

/// Label of the platform's ephemeral ECDH key (transient: never stored).
const EPHEMERAL_KEY_LABEL: &str = "nfcpay-enrollment-ecdh";

fn refused() -> Problem {
    Problem::new(
        ProblemCode::EnrollmentRefused,
        problems::enrollment_detail(),
    )
}

/// Enrolls a terminal. Blocking.
pub(super) fn enroll(inner: &Inner, body: &[u8]) -> Result<bytes::Bytes, Problem> {
    let request: EnrollmentRequest = serde_json::from_slice(body)
        .map_err(|_| Problem::new(ProblemCode::Malformed, "not an enrollment request"))?;
    let terminal_id: TerminalId = request
        .terminal_id
        .parse()
        .map_err(|error: nfcpay_protocol::ProtocolError| problems::malformed(&error))?;
    let peer = hex::decode(&request.ecdh_public_key)
        .ok()
        .and_then(|bytes| EcPublicKey::try_from(&bytes[..]).ok())
        .ok_or_else(|| {
            Problem::new(
                ProblemCode::Malformed,
                "ecdh_public_key is not a P-256 point",
            )
        })?;
    let terminal = inner
        .storage
        .terminal(&terminal_id)
        .map_err(problems::storage)?
        .filter(|terminal| terminal.state == TerminalState::Pending)
        .ok_or_else(refused)?;
    let certificate = pki::issue_terminal_certificate(
        &inner.keystore,
        &inner.pki_dir,
        &request.csr,
        &terminal_id,
        TERMINAL_CERTIFICATE_VALIDITY,
    )
    .map_err(|error| {
        tracing::info!(terminal = %terminal_id, %error, "enrollment CSR refused");
        refused()
    })?;
    let ca_certificate = std::fs::read_to_string(inner.pki_dir.join(pki::CA_CERTIFICATE_FILE))
        .map_err(|_| problems::internal("CA certificate unreadable"))?;

    // Key transport: ephemeral ECDH key, KEK, initial key derived exportable, wrapped.
    let store = inner.keystore.as_ref();
    let label = EPHEMERAL_KEY_LABEL.parse().map_err(problems::keystore)?;
    let (ephemeral, platform_public) = store
        .generate_ec_p256(&label, false)
        .map_err(problems::keystore)?;
    let transported = (|| {
        let kek = TransientKey::new(
            store,
            store.ecdh_kek(&ephemeral, &peer, &kek_context(&terminal_id))?,
        );
        let ik = TransientKey::new(
            store,
            initial_key(store, terminal.initial_key_id, KeyPurpose::Export)?,
        );
        let wrapped = store.wrap_key(kek.handle(), ik.handle())?;
        let check = TransientKey::new(
            store,
            initial_key(store, terminal.initial_key_id, KeyPurpose::Check)?,
        );
        let kcv = store.kcv(check.handle())?;
        Ok::<_, nfcpay_keystore::KeystoreError>((wrapped, kcv, ik.handle().algorithm()))
    })();
    if let Err(error) = store.destroy_ec(ephemeral) {
        tracing::warn!(%error, "could not destroy the ephemeral enrollment key");
    }
    let (wrapped, kcv, algorithm) = transported.map_err(problems::keystore)?;

    // Last: the code, once only. Until here nothing was recorded.
    let code_sha256: [u8; 32] = Sha256::digest(request.code.as_bytes()).into();
    inner
        .storage
        .redeem_enrollment_code(
            &terminal_id,
            code_sha256,
            i64::try_from(now_ms()).unwrap_or(i64::MAX),
            &certificate.serial_hex,
        )
        .map_err(|error| {
            tracing::info!(terminal = %terminal_id, %error, "enrollment code refused");
            refused()
        })?;
    tracing::info!(terminal = %terminal_id, serial = %certificate.serial_hex, initial_key_kcv = %kcv, "terminal enrolled");
    let answer = EnrollmentAnswer {
        terminal_id: terminal_id.to_string(),
        certificate: certificate.pem,
        ca_certificate,
        initial_key_id: terminal.initial_key_id.to_string(),
        initial_key_algorithm: algorithm.name().to_owned(),
        platform_ecdh_public_key: hex::encode_upper(platform_public.as_bytes()),
        wrapped_initial_key: hex::encode_upper(&wrapped),
        initial_key_kcv: kcv.to_string(),
        receipt_public_key: hex::encode_upper(inner.receipt_public_key.as_bytes()),
    };
    serde_json::to_vec(&answer)
        .map(bytes::Bytes::from)
        .map_err(|_| problems::internal("enrollment answer"))
}
