//! P-256 key pairs in the token: generate, find, sign, ECDH, destroy.
//!
//! A persistent P-256 key pair found or made under a label gets a handle that names the
//! label, not the object (its epoch is [`PERSISTENT_EPOCH`], its id an index into
//! [`EcKeys`]): the store looks the objects up again when the token was re-opened, so
//! long-lived users (the TLS server key, the CA, the receipt key) survive a recovery. A
//! transient pair's handle is its private key object in the epoch that made it; the store
//! remembers its public half to destroy both.
//!
//! A persistent pair signs with a session copy of its private key (`C_CopyObject`,
//! `CKA_TOKEN=false`, still sensitive and not extractable), owned by the store's long-lived
//! owner session like the BDKs' copies: SoftHSM2 opens, locks and reads a token object's file
//! on every use, two files per signature, which cost more than the signature itself under
//! load. A module that refuses the copy signs with the token object.
//!
//! What the store knows of key pairs is this file's alone: the store only asks it to forget
//! the objects ([`EcKeys::forget_objects`]) when it re-opens the token, and for the pairs in
//! use that the readiness canary signs with.

use std::collections::HashMap;

use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::elliptic_curve::{EcKdf, Ecdh1DeriveParams};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use nfcpay_protocol::dukpt::KeyAlgorithm;
use sha2::{Digest, Sha256};

use super::handles::{PERSISTENT_EPOCH, raw_object};
use super::{Checked, Gate, Pkcs11Keystore, ecb_derive, map_error, templates};
use crate::types::EC_P256_PUBLIC_KEY_BYTES;
use crate::{
    ECDSA_P256_SIGNATURE_BYTES, EcPublicKey, KeyHandle, KeyLabel, KeyPurpose, KeystoreError,
    PrivateKeyHandle,
};

/// P-256 key pairs this store knows: persistent ones by label (their handles index
/// `persistent`), and transient private keys' public halves (to destroy both).
#[derive(Default)]
pub(super) struct EcKeys {
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
    /// The session copy that signs and derives, if the module made one.
    working_copy: Option<ObjectHandle>,
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
    pub(super) fn forget_objects(&mut self) {
        for pair in &mut self.persistent {
            pair.objects = None;
        }
        self.public_of.clear();
    }

    /// The handles and labels of the persistent pairs not destroyed.
    pub(super) fn persistent_in_use(&self) -> Vec<(PrivateKeyHandle, KeyLabel)> {
        self.persistent
            .iter()
            .enumerate()
            .filter(|(_, pair)| !pair.destroyed)
            .map(|(index, pair)| {
                let key = PrivateKeyHandle::with_epoch(index as u64, PERSISTENT_EPOCH);
                (key, pair.label.clone())
            })
            .collect()
    }
}

/// [`Keystore::generate_ec_p256`].
pub(super) fn generate(
    store: &Pkcs11Keystore,
    label: &KeyLabel,
    persistent: bool,
) -> Result<(PrivateKeyHandle, EcPublicKey), KeystoreError> {
    if persistent && find(store, label)?.is_some() {
        return Err(KeystoreError::InvalidInput {
            what: "a key pair with this label already exists",
        });
    }
    store.with_session(|session, gate| {
        let (public_key, private_key) = session
            .generate_key_pair(
                &Mechanism::EccKeyPairGen,
                &templates::ec_public(label.as_str(), persistent),
                &templates::ec_private(label.as_str(), persistent),
            )
            .ck("C_GenerateKeyPair")?;
        let point = match read_ec_point(session, public_key) {
            Ok(point) => point,
            Err(error) => {
                let _ = session.destroy_object(private_key);
                let _ = session.destroy_object(public_key);
                return Err(error);
            }
        };
        let working_copy = persistent
            .then(|| store.working_copy(gate, private_key))
            .flatten();
        let mut ec_keys = store.ec_keys();
        let handle = if persistent {
            let objects = PairObjects {
                epoch: gate.epoch(),
                private_key,
                public_key,
                working_copy,
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

/// [`Keystore::find_ec_p256`]: from the store's memory in this epoch, else searched.
pub(super) fn find(
    store: &Pkcs11Keystore,
    label: &KeyLabel,
) -> Result<Option<(PrivateKeyHandle, EcPublicKey)>, KeystoreError> {
    store.with_session(|session, gate| {
        {
            let ec_keys = store.ec_keys();
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
            if store.ec_keys().by_label.contains_key(label) {
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
            working_copy: store.working_copy(gate, private_key),
        };
        let handle = store.ec_keys().register(label, point.clone(), objects);
        Ok(Some((handle, point)))
    })
}

/// Which object of a persistent pair a call uses.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum PairObject {
    /// The session copy when there is one: the fast path.
    Working,
    /// The token object itself: what readiness proves is still there.
    Token,
}

/// [`Keystore::sign_p256_sha256`] (with [`PairObject::Working`]).
pub(super) fn sign(
    store: &Pkcs11Keystore,
    key: &PrivateKeyHandle,
    message: &[u8],
    object: PairObject,
) -> Result<[u8; ECDSA_P256_SIGNATURE_BYTES], KeystoreError> {
    let digest = Sha256::digest(message);
    let signature = store.with_session(|session, gate| {
        let private_key = store.private_object(key, session, gate, object)?;
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
            source: None,
        })
}

/// [`Keystore::ecdh_kek`].
pub(super) fn ecdh_kek(
    store: &Pkcs11Keystore,
    key: &PrivateKeyHandle,
    peer: &EcPublicKey,
    context: &[u8],
) -> Result<KeyHandle, KeystoreError> {
    let context_digest = Sha256::digest(context);
    let shared_template = templates::transient_key(KeyAlgorithm::Aes256, KeyPurpose::Derive, true);
    let kek_template = templates::transient_key(KeyAlgorithm::Aes256, KeyPurpose::Wrap, true);
    store.with_session(|session, gate| {
        let private_key = store.private_object(key, session, gate, PairObject::Working)?;
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

/// [`Keystore::destroy_ec`].
pub(super) fn destroy(store: &Pkcs11Keystore, key: PrivateKeyHandle) -> Result<(), KeystoreError> {
    store.with_session(|session, gate| {
        let (private_key, public_key) = if key.epoch() == PERSISTENT_EPOCH {
            let private_key = store.private_object(&key, session, gate, PairObject::Working)?;
            let mut ec_keys = store.ec_keys();
            let index = usize::try_from(key.id()).unwrap_or(usize::MAX);
            let Some(pair) = ec_keys.persistent.get_mut(index) else {
                return Err(KeystoreError::UnknownKey);
            };
            pair.destroyed = true;
            let objects = pair.objects;
            let public_key = objects.map(|objects| objects.public_key);
            let label = pair.label.clone();
            ec_keys.by_label.remove(&label);
            // `private_object` gave the working copy: the token's private key goes too.
            if let Some(objects) = objects
                && objects.epoch == gate.epoch()
                && let Some(copy) = objects.working_copy
                && copy == private_key
            {
                drop(ec_keys);
                session
                    .destroy_object(objects.private_key)
                    .ck("C_DestroyObject")?;
            }
            (private_key, public_key)
        } else if key.epoch() != gate.epoch() {
            // Died with an earlier opening of the token.
            return Ok(());
        } else {
            let public_key = store.ec_keys().public_of.remove(&(key.epoch(), key.id()));
            (raw_object(key.id()), public_key)
        };
        session.destroy_object(private_key).ck("C_DestroyObject")?;
        if let Some(public_key) = public_key {
            session.destroy_object(public_key).ck("C_DestroyObject")?;
        }
        Ok(())
    })
}

impl Pkcs11Keystore {
    /// A session copy of the persistent private key `private_key`, owned by the owner session;
    /// `None` if the module does not make one (then the token object is used).
    fn working_copy(&self, gate: &Gate<'_>, private_key: ObjectHandle) -> Option<ObjectHandle> {
        let copied = self.with_owner_session(gate, |session| {
            session
                .copy_object(private_key, &[Attribute::Token(false)])
                .ck("C_CopyObject")
        });
        match copied {
            Ok(copy) => Some(copy),
            Err(error) => {
                tracing::debug!(%error, "no session copy of a key pair: signing with the token object");
                None
            }
        }
    }

    /// The private key object behind `key`: a transient key of the current epoch, or a
    /// persistent pair's `object`, looked up again by label when the token was re-opened since.
    fn private_object(
        &self,
        key: &PrivateKeyHandle,
        session: &Session,
        gate: &Gate<'_>,
        object: PairObject,
    ) -> Result<ObjectHandle, KeystoreError> {
        let choose = |token: ObjectHandle, working: Option<ObjectHandle>| match object {
            PairObject::Working => working.unwrap_or(token),
            PairObject::Token => token,
        };
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
                return Ok(choose(objects.private_key, objects.working_copy));
            }
            pair.label.clone()
        };
        match find_pair(session, &label)? {
            Some((private_key, public_key, point)) => {
                let working_copy = self.working_copy(gate, private_key);
                let objects = PairObjects {
                    epoch: gate.epoch(),
                    private_key,
                    public_key,
                    working_copy,
                };
                self.ec_keys().register(&label, point, objects);
                Ok(choose(private_key, working_copy))
            }
            // It was there: the token does not show its objects (yet).
            None => Err(KeystoreError::StaleHandle {
                function: "C_FindObjects",
            }),
        }
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
            let point = read_ec_point(session, *public_key)?;
            Ok(Some((*private_key, *public_key, point)))
        }
        _ => Err(KeystoreError::Configuration(format!(
            "the token holds {} private and {} public keys labelled {label}; expected one pair",
            private_keys.len(),
            public_keys.len()
        ))),
    }
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
            source: None,
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
