//! The terminal's side of docs/protocol.md §5 and §7: seal a half under the DUKPT working key
//! of a fresh KSN, and open the platform's receipt — its AES-CMAC under the same KSN's
//! MAC-verification key, and its ECDSA signature by the platform's receipt key.

use std::sync::Arc;

use nfcpay_keystore::dukpt::working_key_from;
use nfcpay_keystore::{EcPublicKey, KeyHandle, KeyPurpose, Keystore, KeystoreError};
use nfcpay_protocol::dukpt::WorkingKeyUsage;
use nfcpay_protocol::messages::{
    GCM_NONCE_BYTES, HalfEnvelope, HalfHeader, HalfKind, Receipt, SealedReceipt,
};
use nfcpay_protocol::{Ksn, ProtocolError, TerminalId};

/// Why a half could not be sealed or a receipt could not be trusted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SealError {
    /// The keystore failed.
    #[error("keystore")]
    Keystore(#[from] KeystoreError),
    /// A message did not encode or decode.
    #[error("protocol")]
    Protocol(#[from] ProtocolError),
    /// No randomness for the nonce.
    #[error("no randomness from the OS")]
    Random,
    /// The receipt's CMAC does not verify under this transaction's key.
    #[error("receipt MAC does not verify: not from the platform, or not for this half")]
    ReceiptMac,
    /// The receipt's signature does not verify under the platform's receipt key.
    #[error("receipt signature does not verify under the platform's receipt key")]
    ReceiptSignature,
    /// The receipt is for another terminal or another half.
    #[error("receipt is addressed to {terminal} / KSN {ksn}, not to this half")]
    ReceiptRecipient {
        /// The terminal it names.
        terminal: TerminalId,
        /// The KSN it names.
        ksn: Ksn,
    },
}

/// The two working keys of one transaction: GCM for the half, CMAC for its receipt. Both are
/// destroyed when this is dropped; the transaction key they come from is not kept.
pub struct TransactionKeys {
    store: Arc<dyn Keystore>,
    ksn: Ksn,
    encrypt: Option<KeyHandle>,
    receipt_mac: Option<KeyHandle>,
}

impl TransactionKeys {
    /// Derives both working keys of `ksn` from its transaction key.
    pub fn derive(
        store: Arc<dyn Keystore>,
        ksn: Ksn,
        transaction_key: &KeyHandle,
    ) -> Result<Self, SealError> {
        let derive = |usage, purpose| {
            working_key_from(store.as_ref(), transaction_key, ksn, usage, None, purpose)
        };
        let encrypt = derive(WorkingKeyUsage::DataEncrypt, KeyPurpose::Encrypt)?;
        let mut keys = Self {
            store: Arc::clone(&store),
            ksn,
            encrypt: Some(encrypt),
            receipt_mac: None,
        };
        keys.receipt_mac = Some(derive(WorkingKeyUsage::MacVerification, KeyPurpose::Mac)?);
        Ok(keys)
    }

    /// The KSN these keys belong to.
    pub fn ksn(&self) -> Ksn {
        self.ksn
    }

    fn encrypt(&self) -> Result<&KeyHandle, SealError> {
        self.encrypt
            .as_ref()
            .ok_or(SealError::Keystore(KeystoreError::UnknownKey))
    }

    fn receipt_mac(&self) -> Result<&KeyHandle, SealError> {
        self.receipt_mac
            .as_ref()
            .ok_or(SealError::Keystore(KeystoreError::UnknownKey))
    }

    /// Seals `plaintext` (a payment request for half A, an instruction for half B) as the
    /// half `kind` of `terminal_id`, sent at `sent_at_ms`.
    pub fn seal_half(
        &self,
        kind: HalfKind,
        terminal_id: &TerminalId,
        plaintext: &[u8],
        sent_at_ms: u64,
    ) -> Result<Vec<u8>, SealError> {
        let mut nonce = [0u8; GCM_NONCE_BYTES];
        getrandom::fill(&mut nonce).map_err(|_| SealError::Random)?;
        let header = HalfHeader {
            kind,
            terminal_id: terminal_id.clone(),
            ksn: self.ksn,
            sent_at_ms,
            nonce,
        };
        let body_length = plaintext.len() + nfcpay_keystore::GCM_TAG_BYTES;
        let aad = header.encode(body_length)?;
        let body = self
            .store
            .gcm_encrypt(self.encrypt()?, &nonce, &aad, plaintext)?;
        Ok(HalfEnvelope::new(header, body)?.encode())
    }

    /// Opens the platform's answer to the half sealed with these keys: checks its CMAC (only
    /// the platform could make it for this KSN), its signature, and that it is addressed to
    /// `terminal_id` and this KSN.
    pub fn open_receipt(
        &self,
        bytes: &[u8],
        terminal_id: &TerminalId,
        receipt_public_key: &EcPublicKey,
    ) -> Result<Receipt, SealError> {
        let sealed = SealedReceipt::decode(bytes)?;
        self.store
            .cmac_verify(self.receipt_mac()?, sealed.body_bytes(), sealed.cmac())
            .map_err(|error| match error {
                KeystoreError::AuthenticationFailed => SealError::ReceiptMac,
                other => SealError::Keystore(other),
            })?;
        verify_signature(&sealed, receipt_public_key)?;
        let fields = sealed.receipt().fields();
        if &fields.recipient_terminal_id != terminal_id || fields.recipient_ksn != self.ksn {
            return Err(SealError::ReceiptRecipient {
                terminal: fields.recipient_terminal_id.clone(),
                ksn: fields.recipient_ksn,
            });
        }
        Ok(sealed.receipt().clone())
    }
}

impl Drop for TransactionKeys {
    fn drop(&mut self) {
        for key in [self.encrypt.take(), self.receipt_mac.take()]
            .into_iter()
            .flatten()
        {
            if let Err(error) = self.store.destroy(key) {
                tracing::warn!(%error, "could not destroy a working key");
            }
        }
    }
}

/// Checks a receipt's platform signature only: what a third party holding the platform's
/// receipt public key can check.
pub fn verify_receipt_signature(
    bytes: &[u8],
    receipt_public_key: &EcPublicKey,
) -> Result<Receipt, SealError> {
    let sealed = SealedReceipt::decode(bytes)?;
    verify_signature(&sealed, receipt_public_key)?;
    Ok(sealed.receipt().clone())
}

/// Checks a receipt's platform signature and that it is addressed to `terminal_id` (and to
/// `ksn`, when given): what a terminal can check of an answer about a half whose MAC key it
/// no longer holds (a half re-sent after a restart, a payment looked up later).
pub fn verify_receipt_addressed(
    bytes: &[u8],
    terminal_id: &TerminalId,
    ksn: Option<Ksn>,
    receipt_public_key: &EcPublicKey,
) -> Result<Receipt, SealError> {
    let receipt = verify_receipt_signature(bytes, receipt_public_key)?;
    let fields = receipt.fields();
    if &fields.recipient_terminal_id != terminal_id
        || ksn.is_some_and(|ksn| fields.recipient_ksn != ksn)
    {
        return Err(SealError::ReceiptRecipient {
            terminal: fields.recipient_terminal_id.clone(),
            ksn: fields.recipient_ksn,
        });
    }
    Ok(receipt)
}

/// ECDSA P-256 / SHA-256 over the receipt body, the signature as `r ‖ s` (64 bytes), with
/// ring's verifier: a signature check is public-key work, and ring's is about ten times
/// faster than the constant-time arithmetic of the `p256` crate (it was half of the load
/// generator's CPU).
fn verify_signature(sealed: &SealedReceipt, public_key: &EcPublicKey) -> Result<(), SealError> {
    ring::signature::UnparsedPublicKey::new(
        &ring::signature::ECDSA_P256_SHA256_FIXED,
        public_key.as_bytes(),
    )
    .verify(sealed.body_bytes(), sealed.signature())
    .map_err(|_| SealError::ReceiptSignature)
}

#[cfg(test)]
mod tests {
    use nfcpay_protocol::messages::{ReceiptFields, ReceiptStatus};
    use nfcpay_protocol::{Amount, Currency, TxnId};
    use p256::ecdsa::signature::Signer;
    use p256::elliptic_curve::sec1::ToSec1Point;

    use super::*;

    fn id(text: &str) -> TerminalId {
        text.parse().unwrap_or_else(|error| panic!("{error}"))
    }

    fn ksn(counter: &str) -> Ksn {
        format!("1234567890123456{counter}")
            .parse()
            .unwrap_or_else(|error| panic!("{error}"))
    }

    /// A pending receipt for `shop-1`'s half under KSN counter 1, signed by a fixed key;
    /// returns it sealed and the key's public half.
    fn signed_receipt() -> (Vec<u8>, EcPublicKey) {
        let currency: Currency = "EUR".parse().unwrap_or_else(|error| panic!("{error}"));
        let fields = ReceiptFields {
            status: ReceiptStatus::Pending,
            txn_id: TxnId::try_from([9u8; 16]).unwrap_or_else(|error| panic!("{error}")),
            recipient_terminal_id: id("shop-1"),
            recipient_ksn: ksn("00000001"),
            request_digest: [3; 32],
            payee_terminal_id: id("shop-1"),
            payee_account_id: Some("shop".parse().unwrap_or_else(|error| panic!("{error}"))),
            payer_terminal_id: None,
            payer_account_id: None,
            amount: Amount::new(1250, currency).unwrap_or_else(|error| panic!("{error}")),
            settlement_id: 0,
            settled_at_ms: 0,
        };
        let receipt = Receipt::new(fields).unwrap_or_else(|error| panic!("{error}"));
        let signing_key = p256::ecdsa::SigningKey::from_slice(&[7u8; 32])
            .unwrap_or_else(|error| panic!("{error}"));
        let signature: p256::ecdsa::Signature = signing_key.sign(&receipt.encode());
        let signature: [u8; 64] = signature.to_bytes().into();
        let public = p256::PublicKey::from(signing_key.verifying_key()).to_sec1_point(false);
        let public_key =
            EcPublicKey::try_from(public.as_bytes()).unwrap_or_else(|error| panic!("{error}"));
        (
            SealedReceipt::new(receipt, [0; 16], signature).encode(),
            public_key,
        )
    }

    #[test]
    fn a_receipt_is_accepted_only_when_signed_and_addressed_to_this_half() {
        let (sealed, key) = signed_receipt();
        let shop = id("shop-1");
        assert!(verify_receipt_addressed(&sealed, &shop, Some(ksn("00000001")), &key).is_ok());
        assert!(verify_receipt_addressed(&sealed, &shop, None, &key).is_ok());
        assert!(matches!(
            verify_receipt_addressed(&sealed, &shop, Some(ksn("00000002")), &key),
            Err(SealError::ReceiptRecipient { .. })
        ));
        assert!(matches!(
            verify_receipt_addressed(&sealed, &id("alice-phone"), None, &key),
            Err(SealError::ReceiptRecipient { .. })
        ));
        let mut tampered = sealed.clone();
        if let Some(last) = tampered.last_mut() {
            *last ^= 1;
        }
        assert!(matches!(
            verify_receipt_addressed(&tampered, &shop, None, &key),
            Err(SealError::ReceiptSignature)
        ));
        // Another key's public half does not verify it.
        let other = p256::ecdsa::SigningKey::from_slice(&[8u8; 32])
            .unwrap_or_else(|error| panic!("{error}"));
        let other = p256::PublicKey::from(other.verifying_key()).to_sec1_point(false);
        let other =
            EcPublicKey::try_from(other.as_bytes()).unwrap_or_else(|error| panic!("{error}"));
        assert!(matches!(
            verify_receipt_addressed(&sealed, &shop, None, &other),
            Err(SealError::ReceiptSignature)
        ));
        assert!(matches!(
            verify_receipt_addressed(&sealed[..10], &shop, None, &key),
            Err(SealError::Protocol(_))
        ));
    }
}
