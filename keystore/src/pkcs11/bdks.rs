//! BDKs in the token: generate, import, describe, list, cache, and derive from them.
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
//! the copies belong to one long-lived *owner* session outside the pool. A BDK ID not seen
//! yet is searched in the token on first use (so a BDK added while the daemon runs needs no
//! restart); an ID found missing is remembered as missing for
//! [`UNKNOWN_BDK_RECHECK_INTERVAL`], and at most [`BDK_SEARCHES_PER_SECOND_MAX`] searches for
//! unknown IDs run per second (KSNs come from outside).
//!
//! The owner session and its cache are this file's alone: the store only asks it to forget
//! everything ([`Owner::forget_all`]) when it re-opens the token, and for the cached IDs the
//! readiness canary derives from.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use nfcpay_protocol::BdkId;
use nfcpay_protocol::dukpt::{DerivationData, KeyAlgorithm};
use zeroize::{Zeroize, Zeroizing};

use super::handles::object;
use super::symmetric::kcv_of;
use super::{Checked, Gate, Pkcs11Keystore, ecb_derive, map_error, templates};
use crate::{BdkInfo, DeriveBase, Kcv, KeyHandle, KeyPurpose, KeystoreError};

/// How long an unknown BDK ID is remembered as unknown before the token is searched again
/// (a search is slow, and KSNs come from outside).
pub const UNKNOWN_BDK_RECHECK_INTERVAL: Duration = Duration::from_secs(10);
/// Most unknown BDK IDs remembered; the memory is cleared when it is full.
pub const UNKNOWN_BDKS_MAX: usize = 1024;
/// Most token searches for BDK IDs not cached yet, per second; beyond it a lookup fails as
/// busy (retryable) rather than as unknown.
pub const BDK_SEARCHES_PER_SECOND_MAX: u32 = 20;

/// Longest BDK description value read back from the token, in bytes.
const BDK_DESCRIPTION_BYTES_MAX: usize = 256;

/// The owner session and the objects cached under it.
pub(super) struct Owner {
    pub(super) session: Option<Session>,
    bdks: HashMap<BdkId, CachedBdk>,
    unknown_bdks: HashMap<BdkId, Instant>,
    /// How long an unknown ID stays remembered ([`UNKNOWN_BDK_RECHECK_INTERVAL`]; tests
    /// shorten it).
    unknown_recheck: Duration,
    /// Searches for uncached BDK IDs in the current second.
    searches: (Instant, u32),
}

impl Default for Owner {
    fn default() -> Self {
        Self {
            session: None,
            bdks: HashMap::new(),
            unknown_bdks: HashMap::new(),
            unknown_recheck: UNKNOWN_BDK_RECHECK_INTERVAL,
            searches: (Instant::now(), 0),
        }
    }
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

impl Owner {
    /// The owner session `session`, nothing cached yet.
    pub(super) fn new(session: Session) -> Self {
        Self {
            session: Some(session),
            ..Self::default()
        }
    }

    /// Forgets the owner session and every cached BDK (the token is being re-opened).
    pub(super) fn forget_all(&mut self) {
        self.session = None;
        self.bdks.clear();
        self.unknown_bdks.clear();
    }

    /// The IDs of the cached BDKs.
    pub(super) fn cached_ids(&self) -> Vec<BdkId> {
        self.bdks.keys().copied().collect()
    }
}

/// [`Keystore::generate_bdk`]: a new BDK made inside the token.
pub(super) fn generate(
    store: &Pkcs11Keystore,
    bdk_id: BdkId,
    algorithm: KeyAlgorithm,
) -> Result<BdkInfo, KeystoreError> {
    store.create_bdk(bdk_id, algorithm, |session| {
        session
            .generate_key(
                &Mechanism::AesKeyGen,
                &templates::bdk(bdk_id, algorithm, true),
            )
            .ck("C_GenerateKey")
    })
}

/// [`Keystore::import_bdk`]: the combined clear components stored as a BDK.
pub(super) fn import(
    store: &Pkcs11Keystore,
    bdk_id: BdkId,
    key: &Zeroizing<Vec<u8>>,
) -> Result<BdkInfo, KeystoreError> {
    let algorithm =
        KeyAlgorithm::from_key_bytes(key.len()).map_err(|_| KeystoreError::InvalidInput {
            what: "a BDK must be 16, 24 or 32 bytes",
        })?;
    store.create_bdk(bdk_id, algorithm, |session| {
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

/// [`Keystore::bdk_info`]: from the cache, else looked up once.
pub(super) fn info(store: &Pkcs11Keystore, bdk_id: BdkId) -> Result<BdkInfo, KeystoreError> {
    if let Some(cached) = store.owner().bdks.get(&bdk_id) {
        return Ok(cached.info.into());
    }
    store.call(|gate| Ok(store.cached_bdk(gate, bdk_id)?.info.into()))
}

/// [`Keystore::list_bdks`]: every description object in the token.
pub(super) fn list(store: &Pkcs11Keystore) -> Result<Vec<BdkInfo>, KeystoreError> {
    let mut infos = store.with_session(|session, _| {
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

/// [`Keystore::derive`]: from a transient key, or from a BDK's session copy.
pub(super) fn derive(
    store: &Pkcs11Keystore,
    base: DeriveBase<'_>,
    data: &DerivationData,
    purpose: KeyPurpose,
) -> Result<KeyHandle, KeystoreError> {
    match base {
        DeriveBase::Key(key) => store.derive_from(DeriveFrom::Key(key), data, purpose),
        DeriveBase::Bdk(bdk_id) => {
            match store.derive_from(DeriveFrom::Bdk(bdk_id), data, purpose) {
                // The copy went with a lost owner session or login: rebuild it once.
                Err(KeystoreError::UnknownKey) => {
                    store.forget_bdk(bdk_id);
                    store.derive_from(DeriveFrom::Bdk(bdk_id), data, purpose)
                }
                other => other,
            }
        }
    }
}

impl Pkcs11Keystore {
    /// Runs `work` with the owner session, whose objects live as long as the token stays
    /// open (the key pairs' working copies, too).
    pub(super) fn with_owner_session<T>(
        &self,
        gate: &Gate<'_>,
        work: impl FnOnce(&Session) -> Result<T, KeystoreError>,
    ) -> Result<T, KeystoreError> {
        let mut owner = self.owner();
        self.with_owner(gate, &mut owner, |session, _| work(session))
    }

    /// Runs `work` on the owner session (opened again if lost).
    fn with_owner<T>(
        &self,
        gate: &Gate<'_>,
        owner: &mut Owner,
        work: impl FnOnce(&Session, &mut HashMap<BdkId, CachedBdk>) -> Result<T, KeystoreError>,
    ) -> Result<T, KeystoreError> {
        if owner.session.is_none() {
            owner.session = Some(self.connector.open(gate.slot())?);
        }
        let Some(session) = owner.session.as_ref() else {
            unreachable!("owner session opened above")
        };
        self.connector.ensure_logged_in(session)?;
        work(session, &mut owner.bdks)
    }

    /// The cached BDK, looked up (and its session copy made) on first use.
    fn cached_bdk(&self, gate: &Gate<'_>, bdk_id: BdkId) -> Result<CachedBdk, KeystoreError> {
        let mut owner = self.owner();
        if let Some(cached) = owner.bdks.get(&bdk_id) {
            return Ok(*cached);
        }
        if let Some(since) = owner.unknown_bdks.get(&bdk_id)
            && since.elapsed() < owner.unknown_recheck
        {
            return Err(KeystoreError::UnknownBdk(bdk_id));
        }
        let now = Instant::now();
        if now.duration_since(owner.searches.0) >= Duration::from_secs(1) {
            owner.searches = (now, 0);
        }
        if owner.searches.1 >= BDK_SEARCHES_PER_SECOND_MAX {
            return Err(KeystoreError::Busy {
                what: "too many searches for new BDK IDs this second",
            });
        }
        owner.searches.1 += 1;
        let found = self.with_owner(gate, &mut owner, |session, bdks| {
            let Some((token_key, info)) = find_bdk(session, bdk_id)? else {
                return Ok(None);
            };
            let session_copy = session
                .copy_object(token_key, &[Attribute::Token(false)])
                .ck("C_CopyObject")?;
            let cached = CachedBdk { info, session_copy };
            bdks.insert(bdk_id, cached);
            tracing::info!(bdk_id = %bdk_id, kcv = %info.kcv, "BDK found in the token");
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

    /// Shortens (or lengthens) how long a BDK ID found missing is remembered as missing, so a
    /// test can see the token searched again without waiting
    /// [`UNKNOWN_BDK_RECHECK_INTERVAL`].
    #[cfg(feature = "testing")]
    pub fn set_unknown_bdk_recheck_interval(&self, interval: Duration) {
        self.owner().unknown_recheck = interval;
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
        let info = self.call(|gate| {
            let mut owner = self.owner();
            if owner.bdks.contains_key(&bdk_id) {
                return Err(KeystoreError::BdkExists(bdk_id));
            }
            let info = self.with_owner(gate, &mut owner, |session, bdks| {
                create_bdk_objects(session, bdks, bdk_id, algorithm, create)
            })?;
            owner.unknown_bdks.remove(&bdk_id);
            Ok(info)
        })?;
        tracing::info!(bdk_id = %bdk_id, kcv = %info.kcv, algorithm = %algorithm, "BDK stored");
        Ok(info.into())
    }

    /// One derivation on a pooled session.
    fn derive_from(
        &self,
        base: DeriveFrom<'_>,
        data: &DerivationData,
        purpose: KeyPurpose,
    ) -> Result<KeyHandle, KeystoreError> {
        let algorithm = data.derived_algorithm();
        let template = templates::transient_key(algorithm, purpose, true);
        self.with_session(|session, gate| {
            let base = match base {
                DeriveFrom::Key(key) => object(key, gate)?,
                DeriveFrom::Bdk(bdk_id) => self.cached_bdk(gate, bdk_id)?.session_copy,
            };
            let key = ecb_derive::derive(session, base, data.as_bytes(), &template)
                .ck("C_DeriveKey(CKM_AES_ECB_ENCRYPT_DATA)")?;
            Ok(KeyHandle::with_epoch(key.handle(), algorithm, gate.epoch()))
        })
    }
}

/// What a derivation starts from, inside the store.
enum DeriveFrom<'a> {
    Key(&'a KeyHandle),
    Bdk(BdkId),
}

/// The objects of a new BDK (see [`Pkcs11Keystore::create_bdk`]).
fn create_bdk_objects(
    session: &Session,
    bdks: &mut HashMap<BdkId, CachedBdk>,
    bdk_id: BdkId,
    algorithm: KeyAlgorithm,
    create: impl FnOnce(&Session) -> Result<ObjectHandle, KeystoreError>,
) -> Result<BdkInfoCopy, KeystoreError> {
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
