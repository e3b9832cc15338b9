//! The PKCS#11 backend: every key lives in the token, through `cryptoki`.
//!
//! This file holds the store itself: opening the token, the gate every call passes, and
//! *Recovery* (re-opening a lost token, epochs, the readiness canary). What a key *is* in the
//! token lives in the file of its kind, below; touch this file only to change how the token is
//! opened, guarded or recovered.
//!
//! # Layout
//!
//! - [`Pkcs11Keystore`] (here): the store, its gate, recovery and the canary.
//! - `keystore`: the [`Keystore`] implementation, one line per method, each naming the file
//!   that does the work.
//! - `handles`: transient key handles, epochs, and the one `unsafe` raw object handle.
//! - `bdks`: BDKs (generate, import, describe, list), their cache under the owner session,
//!   and derivation.
//! - `symmetric`: AES with transient keys: GCM, CMAC, KCV, key wrap, destroy.
//! - `ec_keys`: P-256 key pairs (generate, find, sign, ECDH, destroy), persistent ones named
//!   by label so that they survive a recovery.
//! - `persistent`: persistent symmetric keys stored by label (persist, load, delete).
//! - `pool`: the bounded pool of logged-in sessions ([`SESSIONS_MAX`]), with a bounded wait
//!   ([`SESSION_WAIT`]) and a bounded number of waiters ([`SESSION_WAITERS_MAX`]).
//! - `ecb_derive`: `CKM_AES_ECB_ENCRYPT_DATA`, which cryptoki cannot name, through cryptoki's
//!   own `C_DeriveKey` (one module instance, one function list).
//! - `templates`: the attributes of BDKs, transient keys and EC key pairs.
//! - `errors`: `map_error`, the one mapping of `CKR_*` codes to [`KeystoreError`].
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

mod bdks;
mod ec_keys;
mod ecb_derive;
mod errors;
mod handles;
mod keystore;
mod persistent;
mod pool;
mod symmetric;
mod templates;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::session::Session;
use cryptoki::slot::Slot;
use nfcpay_protocol::InitialKeyId;
use nfcpay_protocol::dukpt::{DerivationData, KeyAlgorithm};
use parking_lot::{RwLock, RwLockReadGuard};

use self::bdks::Owner;
pub use self::bdks::{BDK_SEARCHES_PER_SECOND_MAX, UNKNOWN_BDK_RECHECK_INTERVAL, UNKNOWN_BDKS_MAX};
use self::ec_keys::EcKeys;
pub(crate) use self::errors::map_error;
use self::handles::next_epoch;
use self::pool::{Connector, SessionPool};
pub use self::pool::{SESSION_WAIT, SESSION_WAITERS_MAX, SESSIONS_MAX};
use crate::uri::Pkcs11Uri;
use crate::{DeriveBase, KeyPurpose, Keystore, KeystoreError};

/// First wait before a failed recovery is tried again.
pub const RECOVERY_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest wait between recovery attempts.
pub const RECOVERY_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Longest a recovery waits for the calls in progress to leave the module.
const RECOVERY_GATE_WAIT: Duration = Duration::from_secs(5);

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
    /// What the store last failed on (the loss, then each failed attempt), shared by every
    /// [`KeystoreError::Recovering`] until the token is back.
    last_failure: Option<Arc<KeystoreError>>,
}

impl Recovery {
    /// The failure of a call made while the next attempt is not due yet.
    fn waiting(&self) -> KeystoreError {
        KeystoreError::Recovering {
            reason: "the token was lost; waiting to re-open it".to_owned(),
            last_failure: self.last_failure.clone(),
        }
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
        let context = Pkcs11::new(&module).map_err(|error| KeystoreError::ModuleLoad {
            path: module.clone(),
            source: error.into(),
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
            owner: Mutex::new(Owner::new(owner_session)),
            ec_keys: Mutex::new(EcKeys::default()),
            recovery: Mutex::new(Recovery {
                needed: false,
                since: now,
                failures: 0,
                next_attempt: now,
                last_failure: None,
            }),
            lost: AtomicBool::new(false),
            recovering: Mutex::new(()),
        };
        store.health()?;
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
            tracing::error!(
                error = error as &dyn std::error::Error,
                "HSM token or session lost; re-opening it"
            );
            let now = Instant::now();
            recovery.needed = true;
            self.lost.store(true, Ordering::Release);
            recovery.since = now;
            recovery.failures = 0;
            recovery.next_attempt = now;
            recovery.last_failure = error.recovery_record().map(Arc::new);
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
                return Err(recovery.waiting());
            }
        }
        let Ok(_alone) = self.recovering.try_lock() else {
            return Err(KeystoreError::Recovering {
                reason: "the token is being re-opened".to_owned(),
                last_failure: self.recovery().last_failure.clone(),
            });
        };
        {
            // Another thread may have finished a recovery meanwhile.
            let recovery = self.recovery();
            if !recovery.needed {
                return Ok(());
            }
            if Instant::now() < recovery.next_attempt {
                return Err(recovery.waiting());
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
                tracing::warn!(
                    error = &error as &dyn std::error::Error,
                    attempt = recovery.failures,
                    retry_in_ms = backoff.as_millis() as u64,
                    "HSM token could not be re-opened yet"
                );
                let error = Arc::new(error);
                recovery.last_failure = Some(Arc::clone(&error));
                Err(KeystoreError::Recovering {
                    reason: "the token could not be re-opened yet".to_owned(),
                    last_failure: Some(error),
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
        self.owner().forget_all();
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
        live.epoch = next_epoch(live.epoch);
        Ok(live.epoch)
    }

    /// [`Keystore::check_health`]: a logged-in session, then the canary.
    fn health(&self) -> Result<(), KeystoreError> {
        self.with_session(|session, _| {
            let info = session.get_session_info().ck("C_GetSessionInfo")?;
            if info.session_state() == cryptoki::session::SessionState::RwUser {
                Ok(())
            } else {
                // Logged out behind our back: re-open; the next session logs in.
                Err(KeystoreError::SessionLost {
                    function: "C_GetSessionInfo",
                    code: "not logged in".to_owned(),
                    source: None,
                })
            }
        })?;
        self.canary()
    }

    /// The canary of readiness: a derivation from each cached BDK (destroyed at once) and a
    /// signature by each persistent key pair in use — with its token object, not the session
    /// copy that signs otherwise, so that a token gone is seen — each failure naming its part.
    fn canary(&self) -> Result<(), KeystoreError> {
        let bdks = self.owner().cached_ids();
        for bdk_id in bdks {
            let mut id = [0u8; 8];
            id[..4].copy_from_slice(&bdk_id.to_bytes());
            let data = DerivationData::initial_key(KeyAlgorithm::Aes128, InitialKeyId::from(id));
            let key = self
                .derive(DeriveBase::Bdk(bdk_id), &data, KeyPurpose::Derive)
                .map_err(|error| part_failed(format!("derive from BDK {bdk_id}"), error))?;
            self.destroy(key)?;
        }
        let pairs = self.ec_keys().persistent_in_use();
        for (key, label) in pairs {
            ec_keys::sign(
                self,
                &key,
                b"nfcpay readiness canary",
                ec_keys::PairObject::Token,
            )
            .map_err(|error| part_failed(format!("sign with {label}"), error))?;
        }
        Ok(())
    }
}

/// `error` under the part of the canary that failed; keeps it retryable or not.
fn part_failed(part: String, error: KeystoreError) -> KeystoreError {
    if error.is_unavailable() {
        KeystoreError::Recovering {
            reason: part,
            last_failure: Some(Arc::new(error)),
        }
    } else {
        KeystoreError::CanaryFailed {
            part,
            source: Box::new(error),
        }
    }
}
