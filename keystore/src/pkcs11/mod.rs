//! The PKCS#11 backend: every key lives in the token, through `cryptoki`.
//!
//! # Layout
//!
//! - [`Pkcs11Keystore`]: the [`Keystore`] implementation.
//! - `pool`: the bounded pool of logged-in sessions ([`SESSIONS_MAX`]); a lost session or
//!   login is reopened on the next call.
//! - `ecb_derive`: `CKM_AES_ECB_ENCRYPT_DATA`, which cryptoki cannot name, through one raw
//!   `C_DeriveKey` call (the crate's only `unsafe`).
//! - `templates`: the attributes of BDKs, transient keys and EC key pairs.
//! - `errors`: `map_error`, the one mapping of `CKR_*` codes to [`KeystoreError`].
//!
//! # Objects
//!
//! A BDK is a token AES key labelled `nfcpay-bdk-<ID>` with `CKA_ID` the 4 ID bytes:
//! sensitive, never extractable, derive only (`CKA_SIGN` is on while its KCV is computed,
//! then cleared). Next to it a token data object with the same label holds
//! `created=<unix seconds>;kcv=<hex>;algorithm=<aes…>`, never the key.
//!
//! `C_FindObjects` is slow (SoftHSM reads every object file: ~30 look-ups/s with 1,000
//! objects), so BDKs are looked up once and cached, each with a session copy
//! (`C_CopyObject`, `CKA_TOKEN=false`, still sensitive and not extractable) that derivations
//! use (1.7–2.5× faster in SoftHSM). Session objects die with the session that made them, so
//! the copies belong to one long-lived *owner* session outside the pool; if it or the login
//! is lost, the cache is rebuilt. Transient keys (derived, unwrapped, ECDH) are session
//! objects of the pooled session that made them; their [`KeyHandle`] id is the raw object
//! handle.
//!
//! A persistent symmetric key ([`Keystore::persist_key`]) is a token copy of a transient key
//! (`C_CopyObject` with `CKA_TOKEN=true`, its label, and `CKA_ID` `nfcpay-persistent-key`, which
//! keeps these apart from BDKs and key pairs); every other attribute is copied, so it stays
//! sensitive, not extractable and limited to its purpose. Replacing one creates the new object
//! first and then destroys the old; a crash in between leaves both, which `load_key` reports
//! rather than guess. `load_key` makes a session copy; `delete_key` destroys the token object.

mod ecb_derive;
mod errors;
mod pool;
mod templates;

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::elliptic_curve::{EcKdf, Ecdh1DeriveParams};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use nfcpay_protocol::BdkId;
use nfcpay_protocol::dukpt::{DerivationData, KeyAlgorithm};
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, Zeroizing};

use self::ecb_derive::EcbDerive;
pub(crate) use self::errors::map_error;
use self::errors::{GCM_DECRYPT, UNWRAP};
pub use self::pool::SESSIONS_MAX;
use self::pool::{Connector, SessionPool};
use crate::types::EC_P256_PUBLIC_KEY_BYTES;
use crate::uri::Pkcs11Uri;
use crate::{
    BdkInfo, CMAC_BYTES, DeriveBase, ECDSA_P256_SIGNATURE_BYTES, EcPublicKey, GCM_NONCE_BYTES,
    GCM_TAG_BYTES, Kcv, KeyHandle, KeyLabel, KeyPurpose, Keystore, KeystoreError, PrivateKeyHandle,
};

/// How long an unknown BDK ID is remembered as unknown before the token is searched again
/// (a search is slow, and KSNs come from outside).
pub const UNKNOWN_BDK_RECHECK_INTERVAL: Duration = Duration::from_secs(10);
/// Most unknown BDK IDs remembered; the memory is cleared when it is full.
pub const UNKNOWN_BDKS_MAX: usize = 1024;
/// Longest BDK description value read back from the token, in bytes.
const BDK_DESCRIPTION_BYTES_MAX: usize = 256;
/// Tag length of AES-GCM, in bits.
const GCM_TAG_BITS: u64 = 128;
/// Length of an AES key-wrap (RFC 3394) integrity block, in bytes.
const KEY_WRAP_OVERHEAD_BYTES: usize = 8;

/// A key store in a PKCS#11 token, named by a `pkcs11:` URI.
pub struct Pkcs11Keystore {
    pool: SessionPool,
    ecb: EcbDerive,
    owner: Mutex<Owner>,
    ec_keys: Mutex<EcKeys>,
}

/// The owner session and the objects cached under it.
#[derive(Default)]
struct Owner {
    session: Option<Session>,
    bdks: HashMap<BdkId, CachedBdk>,
    unknown_bdks: HashMap<BdkId, Instant>,
}

#[derive(Clone, Copy)]
struct CachedBdk {
    info: BdkInfoCopy,
    session_copy: ObjectHandle,
}

/// `BdkInfo` is not `Copy`; its fields are.
#[derive(Clone, Copy)]
struct BdkInfoCopy {
    bdk_id: BdkId,
    algorithm: KeyAlgorithm,
    kcv: Kcv,
    created_unix_seconds: i64,
}

impl From<BdkInfoCopy> for BdkInfo {
    fn from(info: BdkInfoCopy) -> Self {
        BdkInfo {
            bdk_id: info.bdk_id,
            algorithm: info.algorithm,
            kcv: info.kcv,
            created_unix_seconds: info.created_unix_seconds,
        }
    }
}

/// P-256 key pairs this store knows: persistent ones by label, and every private key's
/// public half (to destroy both).
#[derive(Default)]
struct EcKeys {
    by_label: HashMap<KeyLabel, (u64, EcPublicKey)>,
    public_of: HashMap<u64, ObjectHandle>,
}

/// `result.ck("C_Function")?`: maps a cryptoki error through [`map_error`].
trait Checked<T> {
    fn ck(self, function: &'static str) -> Result<T, KeystoreError>;
}

impl<T> Checked<T> for cryptoki::error::Result<T> {
    fn ck(self, function: &'static str) -> Result<T, KeystoreError> {
        self.map_err(|error| map_error(function, error))
    }
}

impl Pkcs11Keystore {
    /// Loads the module, initialises it, selects the token by label, logs in with the PIN
    /// from `pin-source` and checks that a session works.
    pub fn open(uri: &Pkcs11Uri) -> Result<Self, KeystoreError> {
        let module = uri.require_module_path()?;
        let label = uri.require_token()?.to_owned();
        if uri.pin_source().is_none() {
            return Err(KeystoreError::Configuration(
                "the pkcs11: URI must give pin-source=file:/path/to/pin".to_owned(),
            ));
        }
        let context = Pkcs11::new(&module).map_err(|error| {
            KeystoreError::Configuration(format!(
                "cannot load PKCS#11 module {}: {error}",
                module.display()
            ))
        })?;
        match context.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            // Another store in this process initialised the module already: share it.
            Ok(())
            | Err(cryptoki::error::Error::Pkcs11(
                cryptoki::error::RvError::CryptokiAlreadyInitialized,
                _,
            )) => {}
            Err(error) => return Err(map_error("C_Initialize", error)),
        }
        // Slot IDs change when tokens are initialised: select by label.
        let slot = context
            .get_slots_with_token()
            .ck("C_GetSlotList")?
            .into_iter()
            .find(|slot| {
                context
                    .get_token_info(*slot)
                    .is_ok_and(|info| info.label().trim_end() == label)
            })
            .ok_or_else(|| KeystoreError::TokenNotFound(label.clone()))?;
        let ecb = EcbDerive::load(&module)?;
        let connector = Connector {
            context,
            slot,
            uri: uri.clone(),
        };
        let owner_session = connector.open()?;
        let store = Self {
            pool: SessionPool::new(connector),
            ecb,
            owner: Mutex::new(Owner {
                session: Some(owner_session),
                ..Owner::default()
            }),
            ec_keys: Mutex::new(EcKeys::default()),
        };
        store.check_health()?;
        tracing::info!(token = %label, module = %module.display(), "PKCS#11 keystore open");
        Ok(store)
    }

    fn owner(&self) -> MutexGuard<'_, Owner> {
        // Cache updates are single inserts or clears: consistent even after a panic.
        self.owner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn ec_keys(&self) -> MutexGuard<'_, EcKeys> {
        self.ec_keys.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `work` on the owner session (opened again if lost). A lost session or handle
    /// empties the caches, since every cached handle may be stale.
    fn with_owner<T>(
        &self,
        owner: &mut Owner,
        work: impl FnOnce(&Session, &mut HashMap<BdkId, CachedBdk>) -> Result<T, KeystoreError>,
    ) -> Result<T, KeystoreError> {
        if owner.session.is_none() {
            owner.session = Some(self.pool.connector().open()?);
        }
        let Some(session) = owner.session.as_ref() else {
            unreachable!("owner session opened above")
        };
        self.pool.connector().ensure_logged_in(session)?;
        let result = work(session, &mut owner.bdks);
        if let Err(KeystoreError::SessionLost { .. }) = &result {
            owner.session = None;
            owner.bdks.clear();
            self.ec_keys().by_label.clear();
        }
        result
    }

    /// The cached BDK, looked up (and its session copy made) on first use.
    fn cached_bdk(&self, bdk_id: BdkId) -> Result<CachedBdk, KeystoreError> {
        let mut owner = self.owner();
        if let Some(cached) = owner.bdks.get(&bdk_id) {
            return Ok(*cached);
        }
        if let Some(since) = owner.unknown_bdks.get(&bdk_id)
            && since.elapsed() < UNKNOWN_BDK_RECHECK_INTERVAL
        {
            return Err(KeystoreError::UnknownBdk(bdk_id));
        }
        let found = self.with_owner(&mut owner, |session, bdks| {
            let Some((token_key, info)) = find_bdk(session, bdk_id)? else {
                return Ok(None);
            };
            let session_copy = session
                .copy_object(token_key, &[Attribute::Token(false)])
                .ck("C_CopyObject")?;
            let cached = CachedBdk { info, session_copy };
            bdks.insert(bdk_id, cached);
            Ok(Some(cached))
        })?;
        match found {
            Some(cached) => {
                owner.unknown_bdks.remove(&bdk_id);
                Ok(cached)
            }
            None => {
                if owner.unknown_bdks.len() >= UNKNOWN_BDKS_MAX {
                    owner.unknown_bdks.clear();
                }
                owner.unknown_bdks.insert(bdk_id, Instant::now());
                Err(KeystoreError::UnknownBdk(bdk_id))
            }
        }
    }

    /// Forgets a cached BDK whose session copy turned out to be gone.
    fn forget_bdk(&self, bdk_id: BdkId) {
        let mut owner = self.owner();
        if let Some(cached) = owner.bdks.remove(&bdk_id)
            && let Some(session) = owner.session.as_ref()
        {
            // Most likely already gone; nothing to do if it is.
            let _ = session.destroy_object(cached.session_copy);
        }
    }

    /// Generates or imports a BDK: refuses an existing ID, creates the key, computes its KCV,
    /// clears `CKA_SIGN`, stores the description, and destroys what it made if a step fails.
    fn create_bdk(
        &self,
        bdk_id: BdkId,
        algorithm: KeyAlgorithm,
        create: impl FnOnce(&Session) -> Result<ObjectHandle, KeystoreError>,
    ) -> Result<BdkInfo, KeystoreError> {
        let mut owner = self.owner();
        if owner.bdks.contains_key(&bdk_id) {
            return Err(KeystoreError::BdkExists(bdk_id));
        }
        let info = self.with_owner(&mut owner, |session, bdks| {
            let label = templates::bdk_label(bdk_id);
            let existing = session
                .find_objects(&[Attribute::Label(label.clone().into_bytes())])
                .ck("C_FindObjects")?;
            if !existing.is_empty() {
                return Err(KeystoreError::BdkExists(bdk_id));
            }
            let mut made = Vec::with_capacity(3);
            let result = (|| {
                let key = create(session)?;
                made.push(key);
                let kcv = kcv_of(session, key)?;
                session
                    .update_attributes(key, &[Attribute::Sign(false)])
                    .ck("C_SetAttributeValue")?;
                let info = BdkInfoCopy {
                    bdk_id,
                    algorithm,
                    kcv,
                    created_unix_seconds: unix_seconds_now(),
                };
                let description = session
                    .create_object(&templates::bdk_description(
                        bdk_id,
                        describe(&info).into_bytes(),
                    ))
                    .ck("C_CreateObject")?;
                made.push(description);
                let session_copy = session
                    .copy_object(key, &[Attribute::Token(false)])
                    .ck("C_CopyObject")?;
                made.push(session_copy);
                Ok(CachedBdk { info, session_copy })
            })();
            match result {
                Ok(cached) => {
                    bdks.insert(bdk_id, cached);
                    Ok(cached.info)
                }
                Err(error) => {
                    for object in made.into_iter().rev() {
                        if let Err(destroy_error) = session.destroy_object(object) {
                            tracing::error!(
                                bdk_id = %bdk_id,
                                error = %map_error("C_DestroyObject", destroy_error),
                                "could not roll back a half-made BDK"
                            );
                        }
                    }
                    Err(error)
                }
            }
        })?;
        owner.unknown_bdks.remove(&bdk_id);
        tracing::info!(bdk_id = %bdk_id, kcv = %info.kcv, algorithm = %algorithm, "BDK stored");
        Ok(info.into())
    }

    /// One derivation on a pooled session.
    fn derive_from(
        &self,
        base: ObjectHandle,
        data: &DerivationData,
        purpose: KeyPurpose,
    ) -> Result<KeyHandle, KeystoreError> {
        let algorithm = data.derived_algorithm();
        let template = templates::transient_key(algorithm, purpose, true);
        let key = self.pool.with_session(|session| {
            self.ecb
                .derive(session, base, data.as_bytes(), &template)
                .ck("C_DeriveKey(CKM_AES_ECB_ENCRYPT_DATA)")
        })?;
        Ok(KeyHandle::new(key.handle(), algorithm))
    }

    /// A P-256 key pair's public key, from `CKA_EC_POINT` (a DER OCTET STRING around the
    /// 65-byte point; some modules give the bare point).
    fn read_ec_point(
        session: &Session,
        public_key: ObjectHandle,
    ) -> Result<EcPublicKey, KeystoreError> {
        let attributes = session
            .get_attributes(public_key, &[AttributeType::EcPoint])
            .ck("C_GetAttributeValue")?;
        let Some(Attribute::EcPoint(point)) = attributes.into_iter().next() else {
            return Err(KeystoreError::Pkcs11 {
                function: "C_GetAttributeValue",
                code: "no CKA_EC_POINT".to_owned(),
            });
        };
        let bare = match point.as_slice() {
            [0x04, length, rest @ ..]
                if usize::from(*length) == EC_P256_PUBLIC_KEY_BYTES
                    && rest.len() == EC_P256_PUBLIC_KEY_BYTES =>
            {
                rest
            }
            other => other,
        };
        EcPublicKey::try_from(bare)
    }
}

impl Keystore for Pkcs11Keystore {
    fn generate_bdk(
        &self,
        bdk_id: BdkId,
        algorithm: KeyAlgorithm,
    ) -> Result<BdkInfo, KeystoreError> {
        self.create_bdk(bdk_id, algorithm, |session| {
            session
                .generate_key(
                    &Mechanism::AesKeyGen,
                    &templates::bdk(bdk_id, algorithm, true),
                )
                .ck("C_GenerateKey")
        })
    }

    fn import_bdk(
        &self,
        bdk_id: BdkId,
        key: &Zeroizing<Vec<u8>>,
    ) -> Result<BdkInfo, KeystoreError> {
        let algorithm =
            KeyAlgorithm::from_key_bytes(key.len()).map_err(|_| KeystoreError::InvalidInput {
                what: "a BDK must be 16, 24 or 32 bytes",
            })?;
        self.create_bdk(bdk_id, algorithm, |session| {
            let mut template = templates::bdk(bdk_id, algorithm, false);
            template.push(Attribute::Value(key.to_vec()));
            let created = session.create_object(&template).ck("C_CreateObject");
            // The template's copy of the key is wiped whatever happened.
            for attribute in &mut template {
                if let Attribute::Value(value) = attribute {
                    value.zeroize();
                }
            }
            created
        })
    }

    fn bdk_info(&self, bdk_id: BdkId) -> Result<BdkInfo, KeystoreError> {
        Ok(self.cached_bdk(bdk_id)?.info.into())
    }

    fn list_bdks(&self) -> Result<Vec<BdkInfo>, KeystoreError> {
        let mut infos = self.pool.with_session(|session| {
            let descriptions = session
                .find_objects(&[
                    Attribute::Class(ObjectClass::DATA),
                    Attribute::Application(templates::APPLICATION.to_vec()),
                ])
                .ck("C_FindObjects")?;
            let mut infos = Vec::with_capacity(descriptions.len());
            for description in descriptions {
                let attributes = session
                    .get_attributes(description, &[AttributeType::Label, AttributeType::Value])
                    .ck("C_GetAttributeValue")?;
                if let Some(info) = parse_description(&attributes) {
                    infos.push(BdkInfo::from(info));
                } else {
                    tracing::warn!("skipping an nfcpay data object that does not describe a BDK");
                }
            }
            Ok(infos)
        })?;
        infos.sort_by_key(|info| info.bdk_id);
        Ok(infos)
    }

    fn derive(
        &self,
        base: DeriveBase<'_>,
        data: &DerivationData,
        purpose: KeyPurpose,
    ) -> Result<KeyHandle, KeystoreError> {
        match base {
            DeriveBase::Key(key) => self.derive_from(object(key), data, purpose),
            DeriveBase::Bdk(bdk_id) => {
                let cached = self.cached_bdk(bdk_id)?;
                match self.derive_from(cached.session_copy, data, purpose) {
                    // The copy went with a lost owner session or login: rebuild it once.
                    Err(KeystoreError::UnknownKey) => {
                        self.forget_bdk(bdk_id);
                        let cached = self.cached_bdk(bdk_id)?;
                        self.derive_from(cached.session_copy, data, purpose)
                    }
                    other => other,
                }
            }
        }
    }

    fn gcm_encrypt(
        &self,
        key: &KeyHandle,
        nonce: &[u8; GCM_NONCE_BYTES],
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<Vec<u8>, KeystoreError> {
        let mut iv = *nonce;
        let params = GcmParams::new(&mut iv, aad, GCM_TAG_BITS.into()).ck("C_EncryptInit")?;
        self.pool.with_session(|session| {
            session
                .encrypt(&Mechanism::AesGcm(params), object(key), plaintext)
                .ck("C_Encrypt(CKM_AES_GCM)")
        })
    }

    fn gcm_decrypt(
        &self,
        key: &KeyHandle,
        nonce: &[u8; GCM_NONCE_BYTES],
        aad: &[u8],
        ciphertext_and_tag: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, KeystoreError> {
        if ciphertext_and_tag.len() < GCM_TAG_BYTES {
            return Err(KeystoreError::AuthenticationFailed);
        }
        let mut iv = *nonce;
        let params = GcmParams::new(&mut iv, aad, GCM_TAG_BITS.into()).ck("C_DecryptInit")?;
        self.pool.with_session(|session| {
            session
                .decrypt(&Mechanism::AesGcm(params), object(key), ciphertext_and_tag)
                .map(Zeroizing::new)
                // SoftHSM reports a bad tag as CKR_GENERAL_ERROR: map_error knows GCM_DECRYPT.
                .ck(GCM_DECRYPT)
        })
    }

    fn cmac_generate(
        &self,
        key: &KeyHandle,
        data: &[u8],
    ) -> Result<[u8; CMAC_BYTES], KeystoreError> {
        self.pool
            .with_session(|session| cmac(session, object(key), data))
    }

    fn cmac_verify(&self, key: &KeyHandle, data: &[u8], mac: &[u8]) -> Result<(), KeystoreError> {
        if mac.len() != CMAC_BYTES {
            return Err(KeystoreError::AuthenticationFailed);
        }
        self.pool.with_session(|session| {
            session
                .verify(&Mechanism::AesCMac, object(key), data, mac)
                .ck("C_Verify(CKM_AES_CMAC)")
        })
    }

    fn kcv(&self, key: &KeyHandle) -> Result<Kcv, KeystoreError> {
        self.pool
            .with_session(|session| kcv_of(session, object(key)))
    }

    fn generate_ec_p256(
        &self,
        label: &KeyLabel,
        persistent: bool,
    ) -> Result<(PrivateKeyHandle, EcPublicKey), KeystoreError> {
        if persistent && self.find_ec_p256(label)?.is_some() {
            return Err(KeystoreError::InvalidInput {
                what: "a key pair with this label already exists",
            });
        }
        let (private_key, public_key, point) = self.pool.with_session(|session| {
            let (public_key, private_key) = session
                .generate_key_pair(
                    &Mechanism::EccKeyPairGen,
                    &templates::ec_public(label.as_str(), persistent),
                    &templates::ec_private(label.as_str(), persistent),
                )
                .ck("C_GenerateKeyPair")?;
            match Self::read_ec_point(session, public_key) {
                Ok(point) => Ok((private_key, public_key, point)),
                Err(error) => {
                    let _ = session.destroy_object(private_key);
                    let _ = session.destroy_object(public_key);
                    Err(error)
                }
            }
        })?;
        let mut ec_keys = self.ec_keys();
        ec_keys.public_of.insert(private_key.handle(), public_key);
        if persistent {
            ec_keys
                .by_label
                .insert(label.clone(), (private_key.handle(), point.clone()));
        }
        Ok((PrivateKeyHandle::new(private_key.handle()), point))
    }

    fn find_ec_p256(
        &self,
        label: &KeyLabel,
    ) -> Result<Option<(PrivateKeyHandle, EcPublicKey)>, KeystoreError> {
        if let Some((private_key, point)) = self.ec_keys().by_label.get(label) {
            return Ok(Some((PrivateKeyHandle::new(*private_key), point.clone())));
        }
        let found = self.pool.with_session(|session| {
            let find = |class| {
                session
                    .find_objects(&[
                        Attribute::Class(class),
                        Attribute::KeyType(KeyType::EC),
                        Attribute::Token(true),
                        Attribute::Label(label.as_str().as_bytes().to_vec()),
                    ])
                    .ck("C_FindObjects")
            };
            let private_keys = find(ObjectClass::PRIVATE_KEY)?;
            let public_keys = find(ObjectClass::PUBLIC_KEY)?;
            match (private_keys.as_slice(), public_keys.as_slice()) {
                ([], _) => Ok(None),
                ([private_key], [public_key]) => {
                    let point = Self::read_ec_point(session, *public_key)?;
                    Ok(Some((*private_key, *public_key, point)))
                }
                _ => Err(KeystoreError::Configuration(format!(
                    "the token holds {} private and {} public keys labelled {label}; expected one pair",
                    private_keys.len(),
                    public_keys.len()
                ))),
            }
        })?;
        let Some((private_key, public_key, point)) = found else {
            return Ok(None);
        };
        let mut ec_keys = self.ec_keys();
        ec_keys.public_of.insert(private_key.handle(), public_key);
        ec_keys
            .by_label
            .insert(label.clone(), (private_key.handle(), point.clone()));
        Ok(Some((PrivateKeyHandle::new(private_key.handle()), point)))
    }

    fn sign_p256_sha256(
        &self,
        key: &PrivateKeyHandle,
        message: &[u8],
    ) -> Result<[u8; ECDSA_P256_SIGNATURE_BYTES], KeystoreError> {
        let digest = Sha256::digest(message);
        let signature = self.pool.with_session(|session| {
            session
                .sign(&Mechanism::Ecdsa, private_object(key), &digest)
                .ck("C_Sign(CKM_ECDSA)")
        })?;
        signature
            .as_slice()
            .try_into()
            .map_err(|_| KeystoreError::Pkcs11 {
                function: "C_Sign(CKM_ECDSA)",
                code: format!("a {}-byte signature, expected 64", signature.len()),
            })
    }

    fn ecdh_kek(
        &self,
        key: &PrivateKeyHandle,
        peer: &EcPublicKey,
        context: &[u8],
    ) -> Result<KeyHandle, KeystoreError> {
        let context_digest = Sha256::digest(context);
        let shared_template =
            templates::transient_key(KeyAlgorithm::Aes256, KeyPurpose::Derive, true);
        let kek_template = templates::transient_key(KeyAlgorithm::Aes256, KeyPurpose::Wrap, true);
        let kek = self.pool.with_session(|session| {
            let parameters = Ecdh1DeriveParams::new(EcKdf::null(), peer.as_bytes());
            let shared = session
                .derive_key(
                    &Mechanism::Ecdh1Derive(parameters),
                    private_object(key),
                    &shared_template,
                )
                .ck("C_DeriveKey(CKM_ECDH1_DERIVE)")?;
            let kek = self
                .ecb
                .derive(session, shared, &context_digest, &kek_template)
                .ck("C_DeriveKey(CKM_AES_ECB_ENCRYPT_DATA)");
            // Z is never needed again, whatever happened.
            if let Err(error) = session.destroy_object(shared) {
                tracing::warn!(error = %map_error("C_DestroyObject", error), "could not destroy an ECDH secret");
            }
            kek
        })?;
        Ok(KeyHandle::new(kek.handle(), KeyAlgorithm::Aes256))
    }

    fn wrap_key(&self, kek: &KeyHandle, key: &KeyHandle) -> Result<Vec<u8>, KeystoreError> {
        self.pool.with_session(|session| {
            session
                .wrap_key(&Mechanism::AesKeyWrap, object(kek), object(key))
                .ck("C_WrapKey(CKM_AES_KEY_WRAP)")
        })
    }

    fn unwrap_key(
        &self,
        kek: &KeyHandle,
        wrapped: &[u8],
        algorithm: KeyAlgorithm,
        purpose: KeyPurpose,
    ) -> Result<KeyHandle, KeystoreError> {
        if wrapped.len() != algorithm.key_bytes() + KEY_WRAP_OVERHEAD_BYTES {
            return Err(KeystoreError::InvalidInput {
                what: "wrapped key length does not match its algorithm",
            });
        }
        let template = templates::transient_key(algorithm, purpose, false);
        let key = self.pool.with_session(|session| {
            session
                .unwrap_key(&Mechanism::AesKeyWrap, object(kek), wrapped, &template)
                .ck(UNWRAP)
        })?;
        Ok(KeyHandle::new(key.handle(), algorithm))
    }

    fn destroy(&self, key: KeyHandle) -> Result<(), KeystoreError> {
        self.pool
            .with_session(|session| session.destroy_object(object(&key)).ck("C_DestroyObject"))
    }

    fn persist_key(&self, key: &KeyHandle, label: &KeyLabel) -> Result<(), KeystoreError> {
        self.pool.with_session(|session| {
            // Looked up first, so that only these are destroyed once the new object exists.
            let replaced = session
                .find_objects(&templates::persistent_key_search(label.as_str()))
                .ck("C_FindObjects")?;
            session
                .copy_object(object(key), &templates::persistent_key_copy(label.as_str()))
                .ck("C_CopyObject")?;
            for old in &replaced {
                session.destroy_object(*old).ck("C_DestroyObject")?;
            }
            tracing::debug!(%label, replaced = replaced.len(), "stored a persistent key");
            Ok(())
        })
    }

    fn load_key(&self, label: &KeyLabel) -> Result<Option<KeyHandle>, KeystoreError> {
        self.pool.with_session(|session| {
            let found = session
                .find_objects(&templates::persistent_key_search(label.as_str()))
                .ck("C_FindObjects")?;
            let stored = match found.as_slice() {
                [] => return Ok(None),
                [stored] => *stored,
                _ => {
                    return Err(KeystoreError::Configuration(format!(
                        "the token holds {} persistent keys labelled {label}, expected one \
                         (a replacement was interrupted): delete the label and store it again",
                        found.len()
                    )));
                }
            };
            let algorithm = key_algorithm_of(session, stored)?;
            let copy = session
                .copy_object(stored, &[Attribute::Token(false)])
                .ck("C_CopyObject")?;
            Ok(Some(KeyHandle::new(copy.handle(), algorithm)))
        })
    }

    fn delete_key(&self, label: &KeyLabel) -> Result<bool, KeystoreError> {
        self.pool.with_session(|session| {
            let found = session
                .find_objects(&templates::persistent_key_search(label.as_str()))
                .ck("C_FindObjects")?;
            for stored in &found {
                session.destroy_object(*stored).ck("C_DestroyObject")?;
            }
            if !found.is_empty() {
                tracing::debug!(%label, "deleted a persistent key");
            }
            Ok(!found.is_empty())
        })
    }

    fn destroy_ec(&self, key: PrivateKeyHandle) -> Result<(), KeystoreError> {
        let public_key = {
            let mut ec_keys = self.ec_keys();
            ec_keys
                .by_label
                .retain(|_, (private_key, _)| *private_key != key.id());
            ec_keys.public_of.remove(&key.id())
        };
        self.pool.with_session(|session| {
            session
                .destroy_object(private_object(&key))
                .ck("C_DestroyObject")?;
            if let Some(public_key) = public_key {
                session.destroy_object(public_key).ck("C_DestroyObject")?;
            }
            Ok(())
        })
    }

    fn check_health(&self) -> Result<(), KeystoreError> {
        self.pool.with_session(|session| {
            let info = session.get_session_info().ck("C_GetSessionInfo")?;
            if info.session_state() == cryptoki::session::SessionState::RwUser {
                Ok(())
            } else {
                // Logged out behind our back: retire the session; the next one logs in.
                Err(KeystoreError::SessionLost {
                    function: "C_GetSessionInfo",
                    code: "not logged in".to_owned(),
                })
            }
        })
    }
}

/// The object behind a transient key handle (its id is the raw object handle).
fn object(key: &KeyHandle) -> ObjectHandle {
    // SAFETY-free: cryptoki marks this unsafe only because a made-up handle may be wrong;
    // a wrong one yields CKR_OBJECT_HANDLE_INVALID, mapped to UnknownKey.
    raw_object(key.id())
}

fn private_object(key: &PrivateKeyHandle) -> ObjectHandle {
    raw_object(key.id())
}

#[allow(unsafe_code)]
fn raw_object(id: u64) -> ObjectHandle {
    // SAFETY: `ObjectHandle::new_from_raw` has no memory-safety precondition; cryptoki marks
    // it unsafe because an arbitrary number may name the wrong object. Our ids are handles the
    // module returned to this store, and a stale one fails with CKR_OBJECT_HANDLE_INVALID.
    unsafe { ObjectHandle::new_from_raw(id) }
}

/// The algorithm of an AES key object, from its `CKA_VALUE_LEN`.
fn key_algorithm_of(session: &Session, key: ObjectHandle) -> Result<KeyAlgorithm, KeystoreError> {
    let attributes = session
        .get_attributes(key, &[AttributeType::ValueLen])
        .ck("C_GetAttributeValue")?;
    let Some(Attribute::ValueLen(length)) = attributes.into_iter().next() else {
        return Err(KeystoreError::Pkcs11 {
            function: "C_GetAttributeValue",
            code: "no CKA_VALUE_LEN".to_owned(),
        });
    };
    Ok(KeyAlgorithm::from_key_bytes(usize::from(length))?)
}

fn cmac(
    session: &Session,
    key: ObjectHandle,
    data: &[u8],
) -> Result<[u8; CMAC_BYTES], KeystoreError> {
    let mac = session
        .sign(&Mechanism::AesCMac, key, data)
        .ck("C_Sign(CKM_AES_CMAC)")?;
    mac.as_slice()
        .try_into()
        .map_err(|_| KeystoreError::Pkcs11 {
            function: "C_Sign(CKM_AES_CMAC)",
            code: format!("a {}-byte CMAC, expected 16", mac.len()),
        })
}

/// KCV: the first 3 bytes of AES-CMAC over one zero block.
fn kcv_of(session: &Session, key: ObjectHandle) -> Result<Kcv, KeystoreError> {
    Ok(Kcv::from_cmac(&cmac(session, key, &[0u8; 16])?))
}

/// Finds a BDK's token key and reads its description.
fn find_bdk(
    session: &Session,
    bdk_id: BdkId,
) -> Result<Option<(ObjectHandle, BdkInfoCopy)>, KeystoreError> {
    let label = templates::bdk_label(bdk_id).into_bytes();
    let keys = session
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Token(true),
            Attribute::Label(label.clone()),
        ])
        .ck("C_FindObjects")?;
    let Some(key) = keys.first().copied() else {
        return Ok(None);
    };
    let descriptions = session
        .find_objects(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Application(templates::APPLICATION.to_vec()),
            Attribute::Label(label),
        ])
        .ck("C_FindObjects")?;
    let Some(description) = descriptions.first().copied() else {
        return Err(KeystoreError::Configuration(format!(
            "BDK {bdk_id} has no description object in the token"
        )));
    };
    let attributes = session
        .get_attributes(description, &[AttributeType::Label, AttributeType::Value])
        .ck("C_GetAttributeValue")?;
    let info = parse_description(&attributes).ok_or_else(|| {
        KeystoreError::Configuration(format!(
            "BDK {bdk_id} has a malformed description object in the token"
        ))
    })?;
    Ok(Some((key, info)))
}

/// `created=<unix seconds>;kcv=<hex>;algorithm=<aes…>`.
fn describe(info: &BdkInfoCopy) -> String {
    format!(
        "created={};kcv={};algorithm={}",
        info.created_unix_seconds, info.kcv, info.algorithm
    )
}

/// The BDK described by a data object's label and value, if they are well formed.
fn parse_description(attributes: &[Attribute]) -> Option<BdkInfoCopy> {
    let mut label = None;
    let mut value = None;
    for attribute in attributes {
        match attribute {
            Attribute::Label(bytes) => label = Some(bytes.as_slice()),
            Attribute::Value(bytes) if bytes.len() <= BDK_DESCRIPTION_BYTES_MAX => {
                value = Some(bytes.as_slice());
            }
            _ => {}
        }
    }
    let bdk_id: BdkId = std::str::from_utf8(label?)
        .ok()?
        .strip_prefix("nfcpay-bdk-")?
        .parse()
        .ok()?;
    let (mut created, mut kcv, mut algorithm) = (None, None, None);
    for field in std::str::from_utf8(value?).ok()?.split(';') {
        match field.split_once('=')? {
            ("created", seconds) => created = seconds.parse::<i64>().ok(),
            ("kcv", hex) => kcv = hex.parse::<Kcv>().ok(),
            ("algorithm", name) => algorithm = name.parse::<KeyAlgorithm>().ok(),
            _ => {}
        }
    }
    Some(BdkInfoCopy {
        bdk_id,
        algorithm: algorithm?,
        kcv: kcv?,
        created_unix_seconds: created?,
    })
}

fn unix_seconds_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            i64::try_from(elapsed.as_secs()).unwrap_or(i64::MAX)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptions_round_trip() {
        let info = BdkInfoCopy {
            bdk_id: BdkId::from([0x12, 0x34, 0x56, 0x78]),
            algorithm: KeyAlgorithm::Aes192,
            kcv: "A1B2C3".parse().unwrap(),
            created_unix_seconds: 1_700_000_000,
        };
        let attributes = [
            Attribute::Label(templates::bdk_label(info.bdk_id).into_bytes()),
            Attribute::Value(describe(&info).into_bytes()),
        ];
        let parsed = parse_description(&attributes).unwrap();
        assert_eq!(BdkInfo::from(parsed), BdkInfo::from(info));
        assert_eq!(
            describe(&info),
            "created=1700000000;kcv=A1B2C3;algorithm=aes192"
        );
    }

    #[test]
    fn malformed_descriptions_are_skipped() {
        let label = Attribute::Label(b"nfcpay-bdk-12345678".to_vec());
        for value in ["", "created=x;kcv=A1B2C3;algorithm=aes128", "kcv=A1B2C3"] {
            let attributes = [label.clone(), Attribute::Value(value.as_bytes().to_vec())];
            assert!(parse_description(&attributes).is_none(), "{value}");
        }
        let attributes = [
            Attribute::Label(b"other".to_vec()),
            Attribute::Value(b"created=1;kcv=A1B2C3;algorithm=aes128".to_vec()),
        ];
        assert!(parse_description(&attributes).is_none());
    }
}
