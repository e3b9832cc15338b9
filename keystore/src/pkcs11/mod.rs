//! The PKCS#11 backend: every key lives in the token, through `cryptoki`.
//!
//! # Layout
//!
//! - [`Pkcs11Keystore`]: the [`Keystore`] implementation.
//! - `pool`: the bounded pool of logged-in sessions ([`SESSIONS_MAX`]), with a bounded wait
//!   ([`SESSION_WAIT`]) and a bounded number of waiters ([`SESSION_WAITERS_MAX`]).
//! - `ecb_derive`: `CKM_AES_ECB_ENCRYPT_DATA`, which cryptoki cannot name, through cryptoki's
//!   own `C_DeriveKey` (one module instance, one function list).
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
//! the copies belong to one long-lived *owner* session outside the pool. A BDK ID not seen
//! yet is searched in the token on first use (so a BDK added while the daemon runs needs no
//! restart); an ID found missing is remembered as missing for
//! [`UNKNOWN_BDK_RECHECK_INTERVAL`], and at most [`BDK_SEARCHES_PER_SECOND_MAX`] searches for
//! unknown IDs run per second (KSNs come from outside). Transient keys (derived, unwrapped,
//! ECDH) are session objects of the pooled session that made them; their [`KeyHandle`] id is
//! the raw object handle.
//!
//! A persistent P-256 key pair found or made under a label gets a handle that names the
//! label, not the object: the store looks the object up again when the token was re-opened,
//! so long-lived users (the TLS server key, the CA, the receipt key) survive a recovery.
//!
//! A persistent symmetric key ([`Keystore::persist_key`]) is a token copy of a transient key
//! (`C_CopyObject` with `CKA_TOKEN=true`, its label, and `CKA_ID` `nfcpay-persistent-key`, which
//! keeps these apart from BDKs and key pairs); every other attribute is copied, so it stays
//! sensitive, not extractable and limited to its purpose. Replacing one creates the new object
//! first and then destroys the old; a crash in between leaves both, which `load_key` reports
//! rather than guess. `load_key` makes a session copy; `delete_key` destroys the token object.
//!
//! # Recovery
//!
//! Every call passes a gate (a read lock, taken within [`SESSION_WAIT`]). A lost session or
//! login only retires that session (the next one logs in again). A call that finds the token
//! or the device gone, or a persistent key's handle stale ([`KeystoreError::needs_recovery`]),
//! marks the store lost. The next call re-opens it, alone
//! behind the gate's write lock (so no other thread is inside the module): it closes every
//! session, forgets every cached handle, finalises and initialises the module again
//! (SoftHSM2 sees a token that went away and came back only after `C_Initialize`), finds the
//! token by label, logs in, and starts a new *epoch*. Handles of transient keys from an older
//! epoch are refused as [`KeystoreError::UnknownKey`] (and destroying one is a no-op) without
//! reaching the module, whose new handles may reuse their numbers. A failed attempt is
//! retried after a backoff ([`RECOVERY_BACKOFF_MIN`] doubling to [`RECOVERY_BACKOFF_MAX`]);
//! meanwhile calls fail at once with [`KeystoreError::Recovering`]. Finalising affects every
//! user of the module in the process: one store per process.

mod ecb_derive;
mod errors;
mod pool;
mod templates;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::elliptic_curve::{EcKdf, Ecdh1DeriveParams};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use cryptoki::slot::Slot;
use nfcpay_protocol::dukpt::{DerivationData, KeyAlgorithm};
use nfcpay_protocol::{BdkId, InitialKeyId};
use parking_lot::{RwLock, RwLockReadGuard};
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, Zeroizing};

pub(crate) use self::errors::map_error;
use self::errors::{GCM_DECRYPT, UNWRAP};
use self::pool::{Connector, SessionPool};
pub use self::pool::{SESSION_WAIT, SESSION_WAITERS_MAX, SESSIONS_MAX};
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
/// Most token searches for BDK IDs not cached yet, per second; beyond it a lookup fails as
/// busy (retryable) rather than as unknown.
pub const BDK_SEARCHES_PER_SECOND_MAX: u32 = 20;
/// First wait before a failed recovery is tried again.
pub const RECOVERY_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest wait between recovery attempts.
pub const RECOVERY_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Longest a recovery waits for the calls in progress to leave the module.
const RECOVERY_GATE_WAIT: Duration = Duration::from_secs(5);
/// The epoch of persistent key pair handles, which name a label rather than an object.
const PERSISTENT_EPOCH: u32 = u32::MAX;
/// Longest BDK description value read back from the token, in bytes.
const BDK_DESCRIPTION_BYTES_MAX: usize = 256;
/// Tag length of AES-GCM, in bits.
const GCM_TAG_BITS: u64 = 128;
/// Length of an AES key-wrap (RFC 3394) integrity block, in bytes.
const KEY_WRAP_OVERHEAD_BYTES: usize = 8;

/// A key store in a PKCS#11 token, named by a `pkcs11:` URI.
pub struct Pkcs11Keystore {
    connector: Connector,
    /// The token's label (slots are found by it, again after each recovery).
    token: String,
    /// The slot and epoch of the current opening; the gate every call passes.
    live: RwLock<Live>,
    pool: SessionPool,
    owner: Mutex<Owner>,
    ec_keys: Mutex<EcKeys>,
    recovery: Mutex<Recovery>,
    /// `recovery.needed`, readable without the lock: the fast path of every call.
    lost: AtomicBool,
    /// Held by the one thread re-opening the token.
    recovering: Mutex<()>,
}

/// The current opening of the token.
struct Live {
    slot: Slot,
    epoch: u32,
}

/// Whether the token must be re-opened, and when to try next.
struct Recovery {
    needed: bool,
    /// When the loss was first seen.
    since: Instant,
    failures: u32,
    next_attempt: Instant,
    /// The last failure, for [`KeystoreError::Recovering`] and readiness.
    reason: String,
}

/// The owner session and the objects cached under it.
struct Owner {
    session: Option<Session>,
    bdks: HashMap<BdkId, CachedBdk>,
    unknown_bdks: HashMap<BdkId, Instant>,
    /// Searches for uncached BDK IDs in the current second.
    searches: (Instant, u32),
}

impl Default for Owner {
    fn default() -> Self {
        Self {
            session: None,
            bdks: HashMap::new(),
            unknown_bdks: HashMap::new(),
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

/// P-256 key pairs this store knows: persistent ones by label (their handles index
/// `persistent`), and transient private keys' public halves (to destroy both).
#[derive(Default)]
struct EcKeys {
    persistent: Vec<PersistentPair>,
    by_label: HashMap<KeyLabel, usize>,
    public_of: HashMap<(u32, u64), ObjectHandle>,
}

/// A persistent key pair: its label, public key, and its objects in the epoch that found them.
struct PersistentPair {
    label: KeyLabel,
    point: EcPublicKey,
    objects: Option<PairObjects>,
    destroyed: bool,
}

#[derive(Clone, Copy)]
struct PairObjects {
    epoch: u32,
    private_key: ObjectHandle,
    public_key: ObjectHandle,
}

impl EcKeys {
    /// The handle of the persistent pair labelled `label` with these objects, registered
    /// (or updated) here.
    fn register(
        &mut self,
        label: &KeyLabel,
        point: EcPublicKey,
        objects: PairObjects,
    ) -> PrivateKeyHandle {
        let index = match self.by_label.get(label) {
            Some(&index) => {
                let pair = &mut self.persistent[index];
                pair.point = point;
                pair.objects = Some(objects);
                index
            }
            None => {
                self.persistent.push(PersistentPair {
                    label: label.clone(),
                    point,
                    objects: Some(objects),
                    destroyed: false,
                });
                let index = self.persistent.len() - 1;
                self.by_label.insert(label.clone(), index);
                index
            }
        };
        PrivateKeyHandle::with_epoch(index as u64, PERSISTENT_EPOCH)
    }

    /// Forgets every object handle (the token is being re-opened); labels stay.
    fn forget_objects(&mut self) {
        for pair in &mut self.persistent {
            pair.objects = None;
        }
        self.public_of.clear();
    }
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

/// A call's pass through the gate: the current slot and epoch, stable while it is held.
struct Gate<'s>(RwLockReadGuard<'s, Live>);

impl Gate<'_> {
    fn slot(&self) -> Slot {
        self.0.slot
    }

    fn epoch(&self) -> u32 {
        self.0.epoch
    }
}

/// Initialises the module, sharing it if another store in this process already did.
fn initialize(context: &Pkcs11) -> Result<(), KeystoreError> {
    match context.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(())
        | Err(cryptoki::error::Error::Pkcs11(
            cryptoki::error::RvError::CryptokiAlreadyInitialized,
            _,
        )) => Ok(()),
        Err(error) => Err(map_error("C_Initialize", error)),
    }
}

/// The slot holding the token labelled `label` (slot IDs change when tokens are initialised).
fn find_slot(context: &Pkcs11, label: &str) -> Result<Slot, KeystoreError> {
    context
        .get_slots_with_token()
        .ck("C_GetSlotList")?
        .into_iter()
        .find(|slot| {
            context
                .get_token_info(*slot)
                .is_ok_and(|info| info.label().trim_end() == label)
        })
        .ok_or_else(|| KeystoreError::TokenNotFound(label.to_owned()))
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
        initialize(&context)?;
        let slot = find_slot(&context, &label)?;
        let connector = Connector {
            context,
            uri: uri.clone(),
        };
        let owner_session = connector.open(slot)?;
        let now = Instant::now();
        let store = Self {
            connector,
            token: label.clone(),
            live: RwLock::new(Live { slot, epoch: 1 }),
            pool: SessionPool::new(),
            owner: Mutex::new(Owner {
                session: Some(owner_session),
                ..Owner::default()
            }),
            ec_keys: Mutex::new(EcKeys::default()),
            recovery: Mutex::new(Recovery {
                needed: false,
                since: now,
                failures: 0,
                next_attempt: now,
                reason: String::new(),
            }),
            lost: AtomicBool::new(false),
            recovering: Mutex::new(()),
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

    fn recovery(&self) -> MutexGuard<'_, Recovery> {
        self.recovery.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `work` past the gate (re-opening the token first when it was lost and an attempt
    /// is due), and marks the token lost when `work` says so.
    fn call<T>(
        &self,
        work: impl FnOnce(&Gate<'_>) -> Result<T, KeystoreError>,
    ) -> Result<T, KeystoreError> {
        self.recover_if_due()?;
        let gate = Gate(
            self.live
                .try_read_for(SESSION_WAIT)
                .ok_or(KeystoreError::Busy {
                    what: "the HSM is being re-opened",
                })?,
        );
        let result = work(&gate);
        drop(gate);
        if let Err(error) = &result
            && error.needs_recovery()
        {
            self.mark_lost(error);
        }
        result
    }

    /// Runs `work` with a pooled session, past the gate.
    fn with_session<T>(
        &self,
        work: impl FnOnce(&Session, &Gate<'_>) -> Result<T, KeystoreError>,
    ) -> Result<T, KeystoreError> {
        self.call(|gate| {
            self.pool
                .with_session(&self.connector, gate.slot(), |session| work(session, gate))
        })
    }

    fn mark_lost(&self, error: &KeystoreError) {
        let mut recovery = self.recovery();
        if !recovery.needed {
            tracing::error!(%error, "HSM token or session lost; re-opening it");
            let now = Instant::now();
            recovery.needed = true;
            self.lost.store(true, Ordering::Release);
            recovery.since = now;
            recovery.failures = 0;
            recovery.next_attempt = now;
            recovery.reason = error.to_string();
        }
    }

    /// Re-opens the token if it was lost and an attempt is due; fails at once while a
    /// recovery waits for its next attempt or runs on another thread.
    fn recover_if_due(&self) -> Result<(), KeystoreError> {
        if !self.lost.load(Ordering::Acquire) {
            return Ok(());
        }
        {
            let recovery = self.recovery();
            if !recovery.needed {
                return Ok(());
            }
            if Instant::now() < recovery.next_attempt {
                return Err(KeystoreError::Recovering {
                    reason: recovery.reason.clone(),
                });
            }
        }
        let Ok(_alone) = self.recovering.try_lock() else {
            return Err(KeystoreError::Recovering {
                reason: "the token is being re-opened".to_owned(),
            });
        };
        {
            // Another thread may have finished a recovery meanwhile.
            let recovery = self.recovery();
            if !recovery.needed {
                return Ok(());
            }
            if Instant::now() < recovery.next_attempt {
                return Err(KeystoreError::Recovering {
                    reason: recovery.reason.clone(),
                });
            }
        }
        let reopened = self.reopen();
        let mut recovery = self.recovery();
        match reopened {
            Ok(epoch) => {
                recovery.needed = false;
                self.lost.store(false, Ordering::Release);
                tracing::info!(
                    epoch,
                    failed_attempts = recovery.failures,
                    lost_for_ms = recovery.since.elapsed().as_millis() as u64,
                    "HSM token re-opened"
                );
                Ok(())
            }
            Err(error) => {
                recovery.failures = recovery.failures.saturating_add(1);
                let backoff = RECOVERY_BACKOFF_MIN
                    .saturating_mul(1 << recovery.failures.min(10).saturating_sub(1))
                    .min(RECOVERY_BACKOFF_MAX);
                recovery.next_attempt = Instant::now() + backoff;
                recovery.reason = error.to_string();
                tracing::warn!(
                    %error,
                    attempt = recovery.failures,
                    retry_in_ms = backoff.as_millis() as u64,
                    "HSM token could not be re-opened yet"
                );
                Err(KeystoreError::Recovering {
                    reason: recovery.reason.clone(),
                })
            }
        }
    }

    /// Closes everything, finalises and initialises the module, finds the token and logs in.
    /// Returns the new epoch.
    fn reopen(&self) -> Result<u32, KeystoreError> {
        let mut live = self
            .live
            .try_write_for(RECOVERY_GATE_WAIT)
            .ok_or(KeystoreError::Busy {
                what: "HSM calls in progress did not finish",
            })?;
        // Nobody is past the gate: no session is checked out, no module call runs.
        self.pool.close_all();
        {
            let mut owner = self.owner();
            owner.session = None;
            owner.bdks.clear();
            owner.unknown_bdks.clear();
        }
        self.ec_keys().forget_objects();
        let context = &self.connector.context;
        if let Err(error) = context.clone().finalize() {
            tracing::debug!(error = %map_error("C_Finalize", error), "finalising before re-opening");
        }
        initialize(context)?;
        let slot = find_slot(context, &self.token)?;
        let session = self.connector.open(slot)?;
        self.owner().session = Some(session);
        live.slot = slot;
        live.epoch = match live.epoch.wrapping_add(1) {
            0 | PERSISTENT_EPOCH => 1,
            next => next,
        };
        Ok(live.epoch)
    }

    /// The object behind a transient key handle of the current epoch.
    fn object(key: &KeyHandle, gate: &Gate<'_>) -> Result<ObjectHandle, KeystoreError> {
        if key.epoch() != gate.epoch() {
            // It died with the sessions of an earlier opening of the token.
            return Err(KeystoreError::UnknownKey);
        }
        Ok(raw_object(key.id()))
    }

    /// The private key object behind `key`: a transient key of the current epoch, or a
    /// persistent pair, looked up again by label when the token was re-opened since.
    fn private_object(
        &self,
        key: &PrivateKeyHandle,
        session: &Session,
        gate: &Gate<'_>,
    ) -> Result<ObjectHandle, KeystoreError> {
        if key.epoch() != PERSISTENT_EPOCH {
            if key.epoch() != gate.epoch() {
                return Err(KeystoreError::UnknownKey);
            }
            return Ok(raw_object(key.id()));
        }
        let label = {
            let ec_keys = self.ec_keys();
            let pair = usize::try_from(key.id())
                .ok()
                .and_then(|index| ec_keys.persistent.get(index))
                .filter(|pair| !pair.destroyed)
                .ok_or(KeystoreError::UnknownKey)?;
            if let Some(objects) = pair.objects
                && objects.epoch == gate.epoch()
            {
                return Ok(objects.private_key);
            }
            pair.label.clone()
        };
        match find_pair(session, &label)? {
            Some((private_key, public_key, point)) => {
                let objects = PairObjects {
                    epoch: gate.epoch(),
                    private_key,
                    public_key,
                };
                self.ec_keys().register(&label, point, objects);
                Ok(private_key)
            }
            // It was there: the token does not show its objects (yet).
            None => Err(KeystoreError::StaleHandle {
                function: "C_FindObjects",
            }),
        }
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
            && since.elapsed() < UNKNOWN_BDK_RECHECK_INTERVAL
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
                DeriveFrom::Key(key) => Self::object(key, gate)?,
                DeriveFrom::Bdk(bdk_id) => self.cached_bdk(gate, bdk_id)?.session_copy,
            };
            let key = ecb_derive::derive(session, base, data.as_bytes(), &template)
                .ck("C_DeriveKey(CKM_AES_ECB_ENCRYPT_DATA)")?;
            Ok(KeyHandle::with_epoch(key.handle(), algorithm, gate.epoch()))
        })
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

    /// The canary of readiness: a derivation from each cached BDK (destroyed at once) and a
    /// signature by each persistent key pair in use, each failure naming its part.
    fn canary(&self) -> Result<(), KeystoreError> {
        let bdks: Vec<BdkId> = self.owner().bdks.keys().copied().collect();
        for bdk_id in bdks {
            let mut id = [0u8; 8];
            id[..4].copy_from_slice(&bdk_id.to_bytes());
            let data = DerivationData::initial_key(KeyAlgorithm::Aes128, InitialKeyId::from(id));
            let key = self
                .derive(DeriveBase::Bdk(bdk_id), &data, KeyPurpose::Derive)
                .map_err(|error| part_failed(&format!("derive from BDK {bdk_id}"), &error))?;
            self.destroy(key)?;
        }
        let pairs: Vec<(usize, KeyLabel)> = {
            let ec_keys = self.ec_keys();
            ec_keys
                .persistent
                .iter()
                .enumerate()
                .filter(|(_, pair)| !pair.destroyed)
                .map(|(index, pair)| (index, pair.label.clone()))
                .collect()
        };
        for (index, label) in pairs {
            let key = PrivateKeyHandle::with_epoch(index as u64, PERSISTENT_EPOCH);
            self.sign_p256_sha256(&key, b"nfcpay readiness canary")
                .map_err(|error| part_failed(&format!("sign with {label}"), &error))?;
        }
        Ok(())
    }
}

/// What a derivation starts from, inside the store.
enum DeriveFrom<'a> {
    Key(&'a KeyHandle),
    Bdk(BdkId),
}

/// `error` with the part of the canary that failed in front; keeps it retryable or not.
fn part_failed(part: &str, error: &KeystoreError) -> KeystoreError {
    if error.is_unavailable() {
        KeystoreError::Recovering {
            reason: format!("{part}: {error}"),
        }
    } else {
        KeystoreError::Configuration(format!("{part}: {error}"))
    }
}

/// The objects and public key of the persistent pair labelled `label`, if there is one.
fn find_pair(
    session: &Session,
    label: &KeyLabel,
) -> Result<Option<(ObjectHandle, ObjectHandle, EcPublicKey)>, KeystoreError> {
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
            let point = Pkcs11Keystore::read_ec_point(session, *public_key)?;
            Ok(Some((*private_key, *public_key, point)))
        }
        _ => Err(KeystoreError::Configuration(format!(
            "the token holds {} private and {} public keys labelled {label}; expected one pair",
            private_keys.len(),
            public_keys.len()
        ))),
    }
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
        if let Some(cached) = self.owner().bdks.get(&bdk_id) {
            return Ok(cached.info.into());
        }
        self.call(|gate| Ok(self.cached_bdk(gate, bdk_id)?.info.into()))
    }

    fn list_bdks(&self) -> Result<Vec<BdkInfo>, KeystoreError> {
        let mut infos = self.with_session(|session, _| {
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
            DeriveBase::Key(key) => self.derive_from(DeriveFrom::Key(key), data, purpose),
            DeriveBase::Bdk(bdk_id) => {
                match self.derive_from(DeriveFrom::Bdk(bdk_id), data, purpose) {
                    // The copy went with a lost owner session or login: rebuild it once.
                    Err(KeystoreError::UnknownKey) => {
                        self.forget_bdk(bdk_id);
                        self.derive_from(DeriveFrom::Bdk(bdk_id), data, purpose)
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
        self.with_session(|session, gate| {
            session
                .encrypt(
                    &Mechanism::AesGcm(params),
                    Self::object(key, gate)?,
                    plaintext,
                )
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
        self.with_session(|session, gate| {
            session
                .decrypt(
                    &Mechanism::AesGcm(params),
                    Self::object(key, gate)?,
                    ciphertext_and_tag,
                )
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
        self.with_session(|session, gate| cmac(session, Self::object(key, gate)?, data))
    }

    fn cmac_verify(&self, key: &KeyHandle, data: &[u8], mac: &[u8]) -> Result<(), KeystoreError> {
        if mac.len() != CMAC_BYTES {
            return Err(KeystoreError::AuthenticationFailed);
        }
        self.with_session(|session, gate| {
            session
                .verify(&Mechanism::AesCMac, Self::object(key, gate)?, data, mac)
                .ck("C_Verify(CKM_AES_CMAC)")
        })
    }

    fn kcv(&self, key: &KeyHandle) -> Result<Kcv, KeystoreError> {
        self.with_session(|session, gate| kcv_of(session, Self::object(key, gate)?))
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
        self.with_session(|session, gate| {
            let (public_key, private_key) = session
                .generate_key_pair(
                    &Mechanism::EccKeyPairGen,
                    &templates::ec_public(label.as_str(), persistent),
                    &templates::ec_private(label.as_str(), persistent),
                )
                .ck("C_GenerateKeyPair")?;
            let point = match Self::read_ec_point(session, public_key) {
                Ok(point) => point,
                Err(error) => {
                    let _ = session.destroy_object(private_key);
                    let _ = session.destroy_object(public_key);
                    return Err(error);
                }
            };
            let mut ec_keys = self.ec_keys();
            let handle = if persistent {
                let objects = PairObjects {
                    epoch: gate.epoch(),
                    private_key,
                    public_key,
                };
                ec_keys.register(label, point.clone(), objects)
            } else {
                ec_keys
                    .public_of
                    .insert((gate.epoch(), private_key.handle()), public_key);
                PrivateKeyHandle::with_epoch(private_key.handle(), gate.epoch())
            };
            Ok((handle, point))
        })
    }

    fn find_ec_p256(
        &self,
        label: &KeyLabel,
    ) -> Result<Option<(PrivateKeyHandle, EcPublicKey)>, KeystoreError> {
        self.with_session(|session, gate| {
            {
                let ec_keys = self.ec_keys();
                if let Some(&index) = ec_keys.by_label.get(label)
                    && let Some(pair) = ec_keys.persistent.get(index)
                    && pair
                        .objects
                        .is_some_and(|objects| objects.epoch == gate.epoch())
                {
                    let handle = PrivateKeyHandle::with_epoch(index as u64, PERSISTENT_EPOCH);
                    return Ok(Some((handle, pair.point.clone())));
                }
            }
            let Some((private_key, public_key, point)) = find_pair(session, label)? else {
                // A pair this store found or made before and did not destroy: the token does
                // not show its objects (it went away), which recovery may fix.
                if self.ec_keys().by_label.contains_key(label) {
                    return Err(KeystoreError::StaleHandle {
                        function: "C_FindObjects",
                    });
                }
                return Ok(None);
            };
            let objects = PairObjects {
                epoch: gate.epoch(),
                private_key,
                public_key,
            };
            let handle = self.ec_keys().register(label, point.clone(), objects);
            Ok(Some((handle, point)))
        })
    }

    fn sign_p256_sha256(
        &self,
        key: &PrivateKeyHandle,
        message: &[u8],
    ) -> Result<[u8; ECDSA_P256_SIGNATURE_BYTES], KeystoreError> {
        let digest = Sha256::digest(message);
        let signature = self.with_session(|session, gate| {
            let private_key = self.private_object(key, session, gate)?;
            session
                .sign(&Mechanism::Ecdsa, private_key, &digest)
                .ck("C_Sign(CKM_ECDSA)")
                .map_err(|error| stale_if_persistent(key, error, "C_Sign(CKM_ECDSA)"))
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
        self.with_session(|session, gate| {
            let private_key = self.private_object(key, session, gate)?;
            let parameters = Ecdh1DeriveParams::new(EcKdf::null(), peer.as_bytes());
            let shared = session
                .derive_key(
                    &Mechanism::Ecdh1Derive(parameters),
                    private_key,
                    &shared_template,
                )
                .ck("C_DeriveKey(CKM_ECDH1_DERIVE)")
                .map_err(|error| stale_if_persistent(key, error, "C_DeriveKey(CKM_ECDH1_DERIVE)"))?;
            let kek = ecb_derive::derive(session, shared, &context_digest, &kek_template)
                .ck("C_DeriveKey(CKM_AES_ECB_ENCRYPT_DATA)");
            // Z is never needed again, whatever happened.
            if let Err(error) = session.destroy_object(shared) {
                tracing::warn!(error = %map_error("C_DestroyObject", error), "could not destroy an ECDH secret");
            }
            Ok(KeyHandle::with_epoch(
                kek?.handle(),
                KeyAlgorithm::Aes256,
                gate.epoch(),
            ))
        })
    }

    fn wrap_key(&self, kek: &KeyHandle, key: &KeyHandle) -> Result<Vec<u8>, KeystoreError> {
        self.with_session(|session, gate| {
            session
                .wrap_key(
                    &Mechanism::AesKeyWrap,
                    Self::object(kek, gate)?,
                    Self::object(key, gate)?,
                )
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
        self.with_session(|session, gate| {
            let key = session
                .unwrap_key(
                    &Mechanism::AesKeyWrap,
                    Self::object(kek, gate)?,
                    wrapped,
                    &template,
                )
                .ck(UNWRAP)?;
            Ok(KeyHandle::with_epoch(key.handle(), algorithm, gate.epoch()))
        })
    }

    fn destroy(&self, key: KeyHandle) -> Result<(), KeystoreError> {
        self.call(|gate| {
            // A key of an earlier opening died with its session: nothing to destroy, and its
            // number may name a new object now.
            if key.epoch() != gate.epoch() {
                return Ok(());
            }
            self.pool
                .with_session(&self.connector, gate.slot(), |session| {
                    session
                        .destroy_object(raw_object(key.id()))
                        .ck("C_DestroyObject")
                })
        })
    }

    fn persist_key(&self, key: &KeyHandle, label: &KeyLabel) -> Result<(), KeystoreError> {
        self.with_session(|session, gate| {
            let key = Self::object(key, gate)?;
            // Looked up first, so that only these are destroyed once the new object exists.
            let replaced = session
                .find_objects(&templates::persistent_key_search(label.as_str()))
                .ck("C_FindObjects")?;
            session
                .copy_object(key, &templates::persistent_key_copy(label.as_str()))
                .ck("C_CopyObject")?;
            for old in &replaced {
                session.destroy_object(*old).ck("C_DestroyObject")?;
            }
            tracing::debug!(%label, replaced = replaced.len(), "stored a persistent key");
            Ok(())
        })
    }

    fn load_key(&self, label: &KeyLabel) -> Result<Option<KeyHandle>, KeystoreError> {
        self.with_session(|session, gate| {
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
            Ok(Some(KeyHandle::with_epoch(
                copy.handle(),
                algorithm,
                gate.epoch(),
            )))
        })
    }

    fn delete_key(&self, label: &KeyLabel) -> Result<bool, KeystoreError> {
        self.with_session(|session, _| {
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
        self.with_session(|session, gate| {
            let (private_key, public_key) = if key.epoch() == PERSISTENT_EPOCH {
                let private_key = self.private_object(&key, session, gate)?;
                let mut ec_keys = self.ec_keys();
                let index = usize::try_from(key.id()).unwrap_or(usize::MAX);
                let Some(pair) = ec_keys.persistent.get_mut(index) else {
                    return Err(KeystoreError::UnknownKey);
                };
                pair.destroyed = true;
                let public_key = pair.objects.map(|objects| objects.public_key);
                let label = pair.label.clone();
                ec_keys.by_label.remove(&label);
                (private_key, public_key)
            } else if key.epoch() != gate.epoch() {
                // Died with an earlier opening of the token.
                return Ok(());
            } else {
                let public_key = self.ec_keys().public_of.remove(&(key.epoch(), key.id()));
                (raw_object(key.id()), public_key)
            };
            session.destroy_object(private_key).ck("C_DestroyObject")?;
            if let Some(public_key) = public_key {
                session.destroy_object(public_key).ck("C_DestroyObject")?;
            }
            Ok(())
        })
    }

    fn check_health(&self) -> Result<(), KeystoreError> {
        self.with_session(|session, _| {
            let info = session.get_session_info().ck("C_GetSessionInfo")?;
            if info.session_state() == cryptoki::session::SessionState::RwUser {
                Ok(())
            } else {
                // Logged out behind our back: re-open; the next session logs in.
                Err(KeystoreError::SessionLost {
                    function: "C_GetSessionInfo",
                    code: "not logged in".to_owned(),
                })
            }
        })?;
        self.canary()
    }
}

/// A persistent pair's handle that the module calls invalid is stale (the token was replaced
/// or re-initialised under the store), which recovery fixes; a transient one is just unknown.
fn stale_if_persistent(
    key: &PrivateKeyHandle,
    error: KeystoreError,
    function: &'static str,
) -> KeystoreError {
    match error {
        KeystoreError::UnknownKey if key.epoch() == PERSISTENT_EPOCH => {
            KeystoreError::StaleHandle { function }
        }
        other => other,
    }
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
