//! Key handles and epochs: how a [`KeyHandle`] names a token object, and when it stops.
//!
//! Transient keys (derived, unwrapped, ECDH) are session objects of the pooled session that
//! made them; their [`KeyHandle`] id is the raw object handle, and its epoch the opening of
//! the token that made it. Every recovery starts a new epoch: a handle of an older one is
//! refused as [`KeystoreError::UnknownKey`] without reaching the module, whose new handles
//! may reuse the numbers. Persistent P-256 key pairs have the epoch [`PERSISTENT_EPOCH`] and
//! name a label instead (see `ec_keys`).
//!
//! The one `unsafe` block of the store (a raw number made into an object handle) is here; a
//! reader may add a kind of handle here, and nowhere else.

use cryptoki::object::ObjectHandle;

use super::Gate;
use crate::{KeyHandle, KeystoreError};

/// The epoch of persistent key pair handles, which name a label rather than an object.
pub(super) const PERSISTENT_EPOCH: u32 = u32::MAX;

/// The epoch after `epoch`: never 0, never [`PERSISTENT_EPOCH`].
pub(super) fn next_epoch(epoch: u32) -> u32 {
    match epoch.wrapping_add(1) {
        0 | PERSISTENT_EPOCH => 1,
        next => next,
    }
}

/// The object behind a transient key handle of the current epoch.
pub(super) fn object(key: &KeyHandle, gate: &Gate<'_>) -> Result<ObjectHandle, KeystoreError> {
    if key.epoch() != gate.epoch() {
        // It died with the sessions of an earlier opening of the token.
        return Err(KeystoreError::UnknownKey);
    }
    Ok(raw_object(key.id()))
}

#[allow(unsafe_code)]
pub(super) fn raw_object(id: u64) -> ObjectHandle {
    // SAFETY: `ObjectHandle::new_from_raw` has no memory-safety precondition; cryptoki marks
    // it unsafe because an arbitrary number may name the wrong object. Our ids are handles the
    // module returned to this store, and a stale one fails with CKR_OBJECT_HANDLE_INVALID.
    unsafe { ObjectHandle::new_from_raw(id) }
}
