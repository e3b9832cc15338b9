//! Enrollment (remote key loading, docs/protocol.md §6.3): a terminal with a one-time code
//! gets its client certificate and its initial key, wrapped under a key-encryption key that
//! both sides derive with ECDH inside their keystores — the initial key never exists in clear
//! outside the HSM and the terminal's keystore. The JSON shapes and the KEK context are
//! `nfcpay_protocol::enrollment`'s, shared with the terminal agent.

use nfcpay_keystore::dukpt::{TransientKey, initial_key};
use nfcpay_keystore::{EcPublicKey, KeyPurpose};
use nfcpay_protocol::enrollment::{EnrollmentAnswer, EnrollmentRequest, kek_context};
use nfcpay_protocol::{ErrorChain, TerminalId};
use sha2::{Digest, Sha256};

use super::{Inner, TERMINAL_CERTIFICATE_VALIDITY, now_ms, problems};
use crate::pki;
use crate::server::problem::{Problem, ProblemCode};
use crate::storage::StorageError;

/// Label of the platform's ephemeral ECDH key (transient: never stored).
const EPHEMERAL_KEY_LABEL: &str = "nfcpay-enrollment-ecdh";

fn refused() -> Problem {
    Problem::new(
        ProblemCode::EnrollmentRefused,
        problems::enrollment_detail(),
    )
}

/// Why no certificate was issued, as the terminal is told: the CA key in the HSM failing is
/// `unavailable` (try again), never "refused"; anything about the CSR is refused.
fn certificate_problem(terminal_id: &TerminalId, error: pki::PkiError) -> Problem {
    match error {
        pki::PkiError::Keystore(error) => problems::keystore(error),
        // rcgen fails only at the signature here (our parameters are valid): the HSM's.
        pki::PkiError::Certificate(error) => {
            tracing::warn!(
                terminal = %terminal_id,
                error = ErrorChain(&error).to_string(),
                "the CA key could not sign"
            );
            Problem::new(
                ProblemCode::Unavailable,
                "the HSM is unavailable; try again",
            )
        }
        error => {
            // Logged once, with the refusal, as the answer leaves (the request's span).
            tracing::Span::current().record("reason", tracing::field::display(&error));
            refused()
        }
    }
}

/// [`now_ms`] as the ledger stores it.
fn now_ms_signed() -> i64 {
    i64::try_from(now_ms()).unwrap_or(i64::MAX)
}

/// Enrolls a terminal: the one-time code is checked first, then the certificate issued and
/// the initial key wrapped, then the code redeemed. Blocking.
pub(super) fn enroll(inner: &Inner, body: &[u8]) -> Result<bytes::Bytes, Problem> {
    let request: EnrollmentRequest = serde_json::from_slice(body)
        .map_err(|_| Problem::new(ProblemCode::Malformed, "not an enrollment request"))?;
    let terminal_id: TerminalId = request
        .terminal_id
        .parse()
        .map_err(|error: nfcpay_protocol::ProtocolError| problems::malformed(&error))?;
    // The terminal it claims to be, for the log (`server::routes` logs a refusal once).
    let span = tracing::Span::current();
    span.record("terminal", tracing::field::display(&terminal_id));
    let peer = hex::decode(&request.ecdh_public_key)
        .ok()
        .and_then(|bytes| EcPublicKey::try_from(&bytes[..]).ok())
        .ok_or_else(|| {
            Problem::new(
                ProblemCode::Malformed,
                "ecdh_public_key is not a P-256 point",
            )
        })?;
    // First the code, checked without redeeming it: a stranger who only knows a pending
    // terminal's ID costs a database read, never HSM work.
    let code_sha256: [u8; 32] = Sha256::digest(request.code.as_bytes()).into();
    let terminal = inner
        .storage
        .check_enrollment_code(&terminal_id, &code_sha256, now_ms_signed())
        .map_err(|error| match error {
            StorageError::EnrollmentRefused(_) | StorageError::UnknownTerminal(_) => {
                // The reason goes to the log only (never the code): the answer is the same.
                span.record("reason", tracing::field::display(&error));
                refused()
            }
            other => problems::storage(other),
        })?;
    let certificate = pki::issue_terminal_certificate(
        &inner.keystore,
        &inner.pki_dir,
        &request.csr,
        &terminal_id,
        TERMINAL_CERTIFICATE_VALIDITY,
    )
    .map_err(|error| certificate_problem(&terminal_id, error))?;
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
        tracing::warn!(
            error = ErrorChain(&error).to_string(),
            "could not destroy the ephemeral enrollment key"
        );
    }
    let (wrapped, kcv, algorithm) = transported.map_err(problems::keystore)?;

    // Last: the code redeemed, once only, atomically (another enrollment may have redeemed it
    // since the check). Until here nothing was recorded.
    inner
        .storage
        .redeem_enrollment_code(
            &terminal_id,
            code_sha256,
            now_ms_signed(),
            &certificate.serial_hex,
        )
        .map_err(|error| {
            span.record("reason", tracing::field::display(&error));
            refused()
        })?;
    // Its certificate changed: the next half reads it from the ledger.
    inner.active_terminals.forget(&terminal_id);
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
        account_id: Some(terminal.account_id.to_string()),
    };
    serde_json::to_vec(&answer)
        .map(bytes::Bytes::from)
        .map_err(|_| problems::internal("enrollment answer"))
}

#[cfg(test)]
mod tests {
    // A panic is how a test fails.
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::sync::Arc;
    use std::time::Duration;

    use nfcpay_keystore::Keystore;
    use nfcpay_keystore::software::SoftwareKeystore;
    use nfcpay_protocol::dukpt::KeyAlgorithm;
    use nfcpay_protocol::{AccountId, BdkId, DerivationId, InitialKeyId};
    use prometheus_client::encoding::text::encode;
    use prometheus_client::registry::Registry;
    use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};
    use tempfile::TempDir;
    use zeroize::Zeroizing;

    use super::*;
    use crate::service::Platform;
    use crate::service::metered::MeteredKeystore;
    use crate::storage::{NewTerminal, Storage, TerminalState};

    const CODE: &str = "0123-4567-89AB";
    const TERMINAL: &str = "shop-1";

    /// A platform over a counted software keystore and an SQLite ledger, with one pending
    /// terminal whose code is [`CODE`].
    struct Fixture {
        metered: Arc<MeteredKeystore>,
        platform: Platform,
        _dir: TempDir,
    }

    impl Fixture {
        fn new(code_expires_at_ms: i64) -> Self {
            let dir = TempDir::new().unwrap();
            let metered = Arc::new(MeteredKeystore::new(
                Arc::new(SoftwareKeystore::in_memory()),
            ));
            let keystore: Arc<dyn Keystore> = metered.clone();
            let bdk_id = BdkId::from([0x0B, 0xD1, 0x00, 0x01]);
            keystore.generate_bdk(bdk_id, KeyAlgorithm::Aes128).unwrap();
            pki::init_ca(&keystore, dir.path(), Duration::from_secs(86_400)).unwrap();
            let storage = Storage::open(dir.path().join("ledger.db").to_str().unwrap()).unwrap();
            let account: AccountId = "shop".parse().unwrap();
            storage
                .create_account(&account, "EUR".parse().unwrap(), 0)
                .unwrap();
            storage
                .add_terminal(NewTerminal {
                    id: TERMINAL.parse().unwrap(),
                    account_id: account,
                    initial_key_id: InitialKeyId::new(bdk_id, DerivationId::from([0, 0, 0, 7])),
                    code_sha256: Sha256::digest(CODE.as_bytes()).into(),
                    code_expires_at_ms,
                })
                .unwrap();
            let platform = Platform::new(keystore, storage, dir.path().to_owned(), 16).unwrap();
            Self {
                metered,
                platform,
                _dir: dir,
            }
        }

        /// Every HSM operation asked of the keystore so far.
        fn hsm_operations(&self) -> u64 {
            let mut registry = Registry::default();
            registry.register("hsm_operations", "", self.metered.operations());
            let mut text = String::new();
            encode(&mut text, &registry).unwrap();
            text.lines()
                .filter(|line| !line.starts_with('#'))
                .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
                .sum()
        }

        /// An enrollment request for `terminal` with `code`, a valid CSR and ECDH key.
        fn request(terminal: &str, code: &str) -> Vec<u8> {
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            let mut params = CertificateParams::default();
            params.distinguished_name = DistinguishedName::new();
            params.distinguished_name.push(DnType::CommonName, terminal);
            let csr = params.serialize_request(&key).unwrap().pem().unwrap();
            let terminal_store = SoftwareKeystore::in_memory();
            let (_, ecdh_public) = terminal_store
                .generate_ec_p256(&"terminal-ecdh".parse().unwrap(), false)
                .unwrap();
            serde_json::to_vec(&EnrollmentRequest {
                terminal_id: terminal.to_owned(),
                code: Zeroizing::new(code.to_owned()),
                csr,
                ecdh_public_key: hex::encode_upper(ecdh_public.as_bytes()),
            })
            .unwrap()
        }

        fn enroll(&self, terminal: &str, code: &str) -> Result<bytes::Bytes, Problem> {
            enroll(&self.platform.inner, &Self::request(terminal, code))
        }

        fn state(&self) -> TerminalState {
            self.platform
                .storage()
                .terminal(&TERMINAL.parse().unwrap())
                .unwrap()
                .unwrap()
                .state
        }
    }

    fn far_future_ms() -> i64 {
        now_ms_signed() + 3_600_000
    }

    /// Refused with the one problem code every refusal has, and no HSM operation asked for.
    fn assert_refused_without_hsm_work(fixture: &Fixture, terminal: &str, code: &str) {
        let before = fixture.hsm_operations();
        let problem = fixture.enroll(terminal, code).unwrap_err();
        assert_eq!(problem.code(), ProblemCode::EnrollmentRefused);
        assert_eq!(
            fixture.hsm_operations(),
            before,
            "an enrollment refused for its code ({terminal}) made the HSM work"
        );
    }

    #[test]
    fn a_wrong_code_is_refused_before_any_hsm_work() {
        let fixture = Fixture::new(far_future_ms());
        assert_refused_without_hsm_work(&fixture, TERMINAL, "0123-4567-89AC");
        assert_refused_without_hsm_work(&fixture, TERMINAL, "");
        assert_eq!(fixture.state(), TerminalState::Pending);
        // The code was checked, not spent: the right one still enrolls, with HSM work.
        let before = fixture.hsm_operations();
        fixture.enroll(TERMINAL, CODE).unwrap();
        assert!(fixture.hsm_operations() > before);
        assert_eq!(fixture.state(), TerminalState::Active);
    }

    #[test]
    fn an_unknown_terminal_an_expired_or_used_code_are_refused_before_any_hsm_work() {
        let fixture = Fixture::new(far_future_ms());
        assert_refused_without_hsm_work(&fixture, "shop-2", CODE);
        fixture.enroll(TERMINAL, CODE).unwrap();
        assert_refused_without_hsm_work(&fixture, TERMINAL, CODE);

        let expired = Fixture::new(now_ms_signed() - 1);
        assert_refused_without_hsm_work(&expired, TERMINAL, CODE);
        assert_eq!(expired.state(), TerminalState::Pending);
    }

    #[test]
    fn a_suspended_terminal_is_refused_before_any_hsm_work() {
        let fixture = Fixture::new(far_future_ms());
        fixture
            .platform
            .storage()
            .set_terminal_state(&TERMINAL.parse().unwrap(), TerminalState::Suspended)
            .unwrap();
        assert_refused_without_hsm_work(&fixture, TERMINAL, CODE);
    }

    #[test]
    fn a_ca_key_that_cannot_sign_is_unavailable_and_a_bad_csr_is_refused() {
        let terminal: TerminalId = "shop-1".parse().unwrap();
        let problem = |error| certificate_problem(&terminal, error).code();
        assert_eq!(
            problem(pki::PkiError::Keystore(
                nfcpay_keystore::KeystoreError::Recovering {
                    reason: "token gone".into(),
                    last_failure: None,
                }
            )),
            ProblemCode::Unavailable
        );
        assert_eq!(
            problem(pki::PkiError::Certificate(rcgen::Error::RemoteKeyError)),
            ProblemCode::Unavailable
        );
        assert_eq!(
            problem(pki::PkiError::CsrSignatureInvalid),
            ProblemCode::EnrollmentRefused
        );
    }
}
