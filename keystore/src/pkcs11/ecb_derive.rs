//! `CKM_AES_ECB_ENCRYPT_DATA` (0x1104) through one raw `C_DeriveKey` call.
//!
//! cryptoki 0.12.1 has no `Mechanism` for it, and its vendor-defined constructor refuses
//! values below `CKM_VENDOR_DEFINED`. `CKM_AES_CBC_ENCRYPT_DATA` chains blocks, so it equals
//! ECB only for one block. So this module loads the same PKCS#11 module a second time
//! (`dlopen` returns the already loaded, already initialised instance and only counts a
//! reference), takes `C_DeriveKey` from its function list, and calls it with the session and
//! object handles cryptoki gave us. Nothing else here is unsafe, and nothing else is raw.
//!
//! SoftHSM 2.6.1 (`SoftHSM::deriveSymmetric`) encrypts all of the data (a multiple of 16
//! bytes) and truncates the result to `CKA_VALUE_LEN` from the end, which is exactly the
//! X9.24-3 rule: an AES-192 key is the first 24 bytes of the two encrypted blocks. It needs
//! `CKA_VALUE_LEN` in the template for AES keys.

#![allow(unsafe_code)]

use std::ffi::c_void;
use std::path::Path;

use cryptoki::context::Function;
use cryptoki::error::Rv;
use cryptoki::object::{Attribute, ObjectHandle};
use cryptoki::session::Session;
use cryptoki_sys::{
    CK_ATTRIBUTE, CK_C_DeriveKey, CK_FUNCTION_LIST, CK_KEY_DERIVATION_STRING_DATA, CK_MECHANISM,
    CK_OBJECT_HANDLE, CK_ULONG, CKM_AES_ECB_ENCRYPT_DATA, CKR_OK,
};

use crate::KeystoreError;

/// The module's `C_DeriveKey`, and the library reference that keeps it mapped.
pub(super) struct EcbDerive {
    /// Held only so that the module stays loaded while `derive_key` may be called.
    _library: cryptoki_sys::Pkcs11,
    derive_key: CK_C_DeriveKey,
}

impl EcbDerive {
    /// Loads `module` (already loaded and initialised by cryptoki) and finds `C_DeriveKey`.
    pub(super) fn load(module: &Path) -> Result<Self, KeystoreError> {
        let failed = |what: &str| {
            KeystoreError::Configuration(format!("PKCS#11 module {}: {what}", module.display()))
        };
        // SAFETY: loading a shared library runs its initialisers. This module has already been
        // loaded by cryptoki in this process, so `dlopen` returns the same instance and only
        // increments its reference count; no initialiser runs again.
        let library = unsafe { cryptoki_sys::Pkcs11::new(module) }
            .map_err(|error| failed(&format!("cannot load it a second time: {error}")))?;
        let get_function_list = *library
            .C_GetFunctionList
            .as_ref()
            .map_err(|_| failed("no C_GetFunctionList"))?;
        let mut list: *mut CK_FUNCTION_LIST = std::ptr::null_mut();
        // SAFETY: `C_GetFunctionList` writes one pointer into `list`, which lives on this stack
        // frame for the whole call.
        let rv = unsafe { get_function_list(&mut list) };
        if rv != CKR_OK || list.is_null() {
            return Err(failed("C_GetFunctionList failed"));
        }
        // SAFETY: `list` is non-null and points to the module's function list, which stays
        // valid while the module is loaded; we copy one function pointer out of it.
        let derive_key = unsafe { (*list).C_DeriveKey };
        if derive_key.is_none() {
            return Err(failed("no C_DeriveKey"));
        }
        Ok(Self {
            _library: library,
            derive_key,
        })
    }

    /// `C_DeriveKey` with `CKM_AES_ECB_ENCRYPT_DATA` over `data` under `base`, making an object
    /// with `template`.
    pub(super) fn derive(
        &self,
        session: &Session,
        base: ObjectHandle,
        data: &[u8],
        template: &[Attribute],
    ) -> Result<ObjectHandle, cryptoki::error::Error> {
        let Some(derive_key) = self.derive_key else {
            return Err(cryptoki::error::Error::NullFunctionPointer);
        };
        let mut parameter = CK_KEY_DERIVATION_STRING_DATA {
            // The module only reads the data (PKCS#11 declares it non-const for history).
            pData: data.as_ptr().cast_mut(),
            ulLen: CK_ULONG::try_from(data.len())?,
        };
        let mut mechanism = CK_MECHANISM {
            mechanism: CKM_AES_ECB_ENCRYPT_DATA,
            pParameter: (&raw mut parameter).cast::<c_void>(),
            ulParameterLen: CK_ULONG::try_from(size_of::<CK_KEY_DERIVATION_STRING_DATA>())?,
        };
        // Each CK_ATTRIBUTE points into its `Attribute` in `template`, borrowed for this call.
        let mut raw_template: Vec<CK_ATTRIBUTE> = template.iter().map(CK_ATTRIBUTE::from).collect();
        let template_len = CK_ULONG::try_from(raw_template.len())?;
        let mut new_key: CK_OBJECT_HANDLE = 0;
        // SAFETY: every pointer passed lives until the call returns: `mechanism` and `parameter`
        // on this frame, `data` and `template` borrowed by this function, `raw_template` owned
        // here with `template_len` entries, `new_key` on this frame. The lengths are those of
        // the buffers. The session handle comes from a live `Session` that this thread holds
        // exclusively (pooled sessions are checked out to one caller), so no other thread uses
        // the session during the call. `derive_key` is the module's own `C_DeriveKey`, and the
        // module stays loaded because `self` holds a reference to it.
        let rv = unsafe {
            derive_key(
                session.handle(),
                &raw mut mechanism,
                base.handle(),
                raw_template.as_mut_ptr(),
                template_len,
                &raw mut new_key,
            )
        };
        Rv::from(rv).into_result(Function::DeriveKey)?;
        // SAFETY: `new_key` is the handle the module just returned for the new object
        // (cryptoki marks this constructor unsafe only because a made-up handle could be wrong).
        Ok(unsafe { ObjectHandle::new_from_raw(new_key) })
    }
}
