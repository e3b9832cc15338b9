//! `CKM_AES_ECB_ENCRYPT_DATA` (0x1104) through cryptoki's own `C_DeriveKey`.
//!
//! cryptoki 0.12.1 has no `Mechanism` for it, and `MechanismType::new_vendor_defined` refuses
//! values below `CKM_VENDOR_DEFINED`. `CKM_AES_CBC_ENCRYPT_DATA` chains blocks, so it equals
//! ECB only for one block. So the mechanism type is made from its number (the crate's one
//! `unsafe` here: `MechanismType` is `#[repr(transparent)]` over `CK_MECHANISM_TYPE`), and the
//! call goes through [`Session::derive_key`] like every other: one module instance, one
//! initialised function list. (An earlier version loaded the module a second time and took
//! `C_DeriveKey` from a second function list; p11-kit's proxy hands each
//! `C_GetFunctionList` caller a separate, uninitialised instance, so that failed with
//! `CKR_CRYPTOKI_NOT_INITIALIZED`.)
//!
//! SoftHSM 2.6.1 (`SoftHSM::deriveSymmetric`) encrypts all of the data (a multiple of 16
//! bytes) and truncates the result to `CKA_VALUE_LEN` from the end, which is exactly the
//! X9.24-3 rule: an AES-192 key is the first 24 bytes of the two encrypted blocks. It needs
//! `CKA_VALUE_LEN` in the template for AES keys.

use cryptoki::mechanism::vendor_defined::VendorDefinedMechanism;
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, ObjectHandle};
use cryptoki::session::Session;
use cryptoki_sys::{CK_KEY_DERIVATION_STRING_DATA, CK_ULONG, CKM_AES_ECB_ENCRYPT_DATA};

/// `CKM_AES_ECB_ENCRYPT_DATA` as a cryptoki mechanism type.
#[allow(unsafe_code)]
fn aes_ecb_encrypt_data() -> MechanismType {
    // SAFETY: `MechanismType` is declared `#[repr(transparent)]` over its one field, a
    // `CK_MECHANISM_TYPE` (cryptoki relies on that layout itself for slices of them), so the
    // two types have the same size, alignment and valid values; every `CK_MECHANISM_TYPE` is a
    // valid `MechanismType`.
    unsafe {
        std::mem::transmute::<cryptoki_sys::CK_MECHANISM_TYPE, MechanismType>(
            CKM_AES_ECB_ENCRYPT_DATA,
        )
    }
}

/// `C_DeriveKey` with `CKM_AES_ECB_ENCRYPT_DATA` over `data` under `base`, making an object
/// with `template`.
pub(super) fn derive(
    session: &Session,
    base: ObjectHandle,
    data: &[u8],
    template: &[Attribute],
) -> Result<ObjectHandle, cryptoki::error::Error> {
    let parameter = CK_KEY_DERIVATION_STRING_DATA {
        // The module only reads the data (PKCS#11 declares it non-const for history); the
        // borrow of `data` outlives the call below.
        pData: data.as_ptr().cast_mut(),
        ulLen: CK_ULONG::try_from(data.len())?,
    };
    let mechanism = Mechanism::VendorDefined(VendorDefinedMechanism::new(
        aes_ecb_encrypt_data(),
        Some(&parameter),
    ));
    session.derive_key(&mechanism, base, template)
}
