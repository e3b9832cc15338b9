//! The symmetric primitives of the software backend — AES-ECB (DUKPT derivation and the ECDH
//! KEK), AES-GCM, AES-CMAC and RFC 3394 key wrap — over key bytes the caller keeps in zeroizing
//! memory. The AES variant follows the key's length, as a PKCS#11 token's would.
//!
//! Every function returns secrets in [`Zeroizing`] buffers, and the cipher instances zeroize
//! their round keys on drop (the `zeroize` features of `aes`, `aes-gcm` and `aes-kw`).

use aes::cipher::{Array, BlockCipherEncrypt, KeyInit, consts::U16};
use aes_gcm::AeadInOut;
use cmac::{Cmac, Mac};
use zeroize::Zeroizing;

use crate::{CMAC_BYTES, GCM_NONCE_BYTES, GCM_TAG_BYTES, Kcv, KeystoreError};

/// Length of an AES block, in bytes.
pub(super) const AES_BLOCK_BYTES: usize = 16;
/// What RFC 3394 adds to a wrapped key: the 8-byte integrity check value.
pub(super) const KEY_WRAP_OVERHEAD_BYTES: usize = aes_kw::IV_LEN;

/// Runs `$body` with `$cipher` standing for the AES whose key length is `$key.len()`.
macro_rules! with_aes {
    ($key:expr, $cipher:ident => $body:expr) => {
        match $key.len() {
            16 => {
                type $cipher = aes::Aes128;
                $body
            }
            24 => {
                type $cipher = aes::Aes192;
                $body
            }
            32 => {
                type $cipher = aes::Aes256;
                $body
            }
            _ => Err(bad_key_length()),
        }
    };
}

fn bad_key_length() -> KeystoreError {
    KeystoreError::InvalidInput {
        what: "AES key must be 16, 24 or 32 bytes",
    }
}

/// AES-ECB encryption of `data` (whole blocks) under `key`.
pub(super) fn ecb_encrypt(key: &[u8], data: &[u8]) -> Result<Zeroizing<Vec<u8>>, KeystoreError> {
    if data.is_empty() || !data.len().is_multiple_of(AES_BLOCK_BYTES) {
        return Err(KeystoreError::InvalidInput {
            what: "data to encrypt with AES-ECB must be whole 16-byte blocks",
        });
    }
    let mut output = Zeroizing::new(data.to_vec());
    let (blocks, _) = Array::<u8, U16>::slice_as_chunks_mut(output.as_mut_slice());
    with_aes!(key, Cipher => {
        let cipher = Cipher::new_from_slice(key).map_err(|_| bad_key_length())?;
        cipher.encrypt_blocks(blocks);
        Ok(())
    })?;
    Ok(output)
}

/// AES-GCM encryption; returns ciphertext ‖ tag.
pub(super) fn gcm_encrypt(
    key: &[u8],
    nonce: &[u8; GCM_NONCE_BYTES],
    aad: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, KeystoreError> {
    let nonce = Array::from(*nonce);
    let mut output = Vec::with_capacity(plaintext.len().saturating_add(GCM_TAG_BYTES));
    output.extend_from_slice(plaintext);
    let too_long = |_| KeystoreError::InvalidInput {
        what: "GCM plaintext or associated data too long",
    };
    let tag = with_aes!(key, Cipher => {
        let aead = aes_gcm::AesGcm::<Cipher, aes_gcm::aead::consts::U12>::new_from_slice(key)
            .map_err(|_| bad_key_length())?;
        aead.encrypt_inout_detached(&nonce, aad, output.as_mut_slice().into())
            .map_err(too_long)
    })?;
    output.extend_from_slice(&tag);
    Ok(output)
}

/// AES-GCM decryption of ciphertext ‖ tag.
pub(super) fn gcm_decrypt(
    key: &[u8],
    nonce: &[u8; GCM_NONCE_BYTES],
    aad: &[u8],
    ciphertext_and_tag: &[u8],
) -> Result<Zeroizing<Vec<u8>>, KeystoreError> {
    let ciphertext_bytes =
        ciphertext_and_tag
            .len()
            .checked_sub(GCM_TAG_BYTES)
            .ok_or(KeystoreError::InvalidInput {
                what: "GCM ciphertext is shorter than its 16-byte tag",
            })?;
    let (ciphertext, tag) = ciphertext_and_tag.split_at(ciphertext_bytes);
    let nonce = Array::from(*nonce);
    let tag = Array::<u8, U16>::try_from(tag).map_err(|_| KeystoreError::InvalidInput {
        what: "GCM tag must be 16 bytes",
    })?;
    let mut plaintext = Zeroizing::new(ciphertext.to_vec());
    with_aes!(key, Cipher => {
        let aead = aes_gcm::AesGcm::<Cipher, aes_gcm::aead::consts::U12>::new_from_slice(key)
            .map_err(|_| bad_key_length())?;
        aead.decrypt_inout_detached(&nonce, aad, plaintext.as_mut_slice().into(), &tag)
            .map_err(|_| KeystoreError::AuthenticationFailed)
    })?;
    Ok(plaintext)
}

/// AES-CMAC of `data`.
pub(super) fn cmac(key: &[u8], data: &[u8]) -> Result<[u8; CMAC_BYTES], KeystoreError> {
    with_aes!(key, Cipher => {
        let mut mac = <Cmac<Cipher> as KeyInit>::new_from_slice(key)
            .map_err(|_| bad_key_length())?;
        mac.update(data);
        Ok(mac.finalize().into_bytes().into())
    })
}

/// The key check value of `key`: AES-CMAC over one zero block, first 3 bytes.
pub(super) fn kcv(key: &[u8]) -> Result<Kcv, KeystoreError> {
    Ok(Kcv::from_cmac(&cmac(key, &[0u8; AES_BLOCK_BYTES])?))
}

/// Checks an AES-CMAC of `data` in constant time.
pub(super) fn cmac_verify(key: &[u8], data: &[u8], tag: &[u8]) -> Result<(), KeystoreError> {
    // A MAC of another length does not verify (the PKCS#11 backend says the same).
    if tag.len() != CMAC_BYTES {
        return Err(KeystoreError::AuthenticationFailed);
    }
    with_aes!(key, Cipher => {
        let mut mac = <Cmac<Cipher> as KeyInit>::new_from_slice(key)
            .map_err(|_| bad_key_length())?;
        mac.update(data);
        mac.verify_slice(tag).map_err(|_| KeystoreError::AuthenticationFailed)
    })
}

/// RFC 3394 AES key wrap of `key` under `kek`.
pub(super) fn key_wrap(kek: &[u8], key: &[u8]) -> Result<Vec<u8>, KeystoreError> {
    let mut wrapped = vec![0u8; key.len().saturating_add(KEY_WRAP_OVERHEAD_BYTES)];
    with_aes!(kek, Cipher => {
        let wrapper = aes_kw::AesKw::<Cipher>::new_from_slice(kek).map_err(|_| bad_key_length())?;
        wrapper.wrap_key(key, &mut wrapped).map(|_| ()).map_err(|_| KeystoreError::InvalidInput {
            what: "a key to wrap must be a multiple of 8 bytes",
        })
    })?;
    Ok(wrapped)
}

/// RFC 3394 AES key unwrap; [`KeystoreError::AuthenticationFailed`] when the integrity check
/// fails (wrong KEK or tampered data).
pub(super) fn key_unwrap(kek: &[u8], wrapped: &[u8]) -> Result<Zeroizing<Vec<u8>>, KeystoreError> {
    let key_bytes = wrapped
        .len()
        .checked_sub(KEY_WRAP_OVERHEAD_BYTES)
        .filter(|bytes| *bytes > 0 && bytes.is_multiple_of(KEY_WRAP_OVERHEAD_BYTES))
        .ok_or(KeystoreError::InvalidInput {
            what: "a wrapped key must be 8 bytes longer than the key, in 8-byte steps",
        })?;
    let mut key = Zeroizing::new(vec![0u8; key_bytes]);
    with_aes!(kek, Cipher => {
        let wrapper = aes_kw::AesKw::<Cipher>::new_from_slice(kek).map_err(|_| bad_key_length())?;
        wrapper.unwrap_key(wrapped, key.as_mut_slice()).map(|_| ()).map_err(|error| match error {
            aes_kw::Error::IntegrityCheckFailed => KeystoreError::AuthenticationFailed,
            _ => KeystoreError::InvalidInput { what: "wrapped key has the wrong length" },
        })
    })?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(text: &str) -> Vec<u8> {
        hex::decode(text).unwrap()
    }

    #[test]
    fn ecb_matches_fips_197_appendix_c() {
        let plaintext = bytes("00112233445566778899aabbccddeeff");
        let key = bytes("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f");
        for (key_bytes, expected) in [
            (16, "69c4e0d86a7b0430d8cdb78070b4c55a"),
            (24, "dda97ca4864cdfe06eaf70a0ec0d7191"),
            (32, "8ea2b7ca516745bfeafc49904b496089"),
        ] {
            let output = ecb_encrypt(&key[..key_bytes], &plaintext).unwrap();
            assert_eq!(hex::encode(&*output), expected, "AES-{}", key_bytes * 8);
        }
        assert!(ecb_encrypt(&key[..16], &plaintext[..15]).is_err());
        assert!(ecb_encrypt(&key[..20], &plaintext).is_err());
    }

    #[test]
    fn cmac_matches_rfc_4493_examples() {
        let key = bytes("2b7e151628aed2a6abf7158809cf4f3c");
        assert_eq!(
            hex::encode(cmac(&key, b"").unwrap()),
            "bb1d6929e95937287fa37d129b756746"
        );
        let message = bytes("6bc1bee22e409f96e93d7e117393172a");
        let tag = cmac(&key, &message).unwrap();
        assert_eq!(hex::encode(tag), "070a16b46b4d4144f79bdd9dd04a287c");
        cmac_verify(&key, &message, &tag).unwrap();
        let mut bad = tag;
        bad[15] ^= 1;
        assert!(matches!(
            cmac_verify(&key, &message, &bad),
            Err(KeystoreError::AuthenticationFailed)
        ));
        assert!(matches!(
            cmac_verify(&key, &message, &tag[..8]),
            Err(KeystoreError::AuthenticationFailed)
        ));
    }

    #[test]
    fn key_wrap_matches_rfc_3394_section_4() {
        let kek = bytes("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f");
        let key = bytes("00112233445566778899aabbccddeeff000102030405060708090a0b0c0d0e0f");
        for (kek_bytes, key_bytes, expected) in [
            // §4.1: 128 bits of key data with a 128-bit KEK.
            (16, 16, "1fa68b0a8112b447aef34bd8fb5a7b829d3e862371d2cfe5"),
            // §4.6: 256 bits of key data with a 256-bit KEK.
            (
                32,
                32,
                "28c9f404c4b810f4cbccb35cfb87f8263f5786e2d80ed326cbc7f0e71a99f43bfb988b9b7a02dd21",
            ),
        ] {
            let wrapped = key_wrap(&kek[..kek_bytes], &key[..key_bytes]).unwrap();
            assert_eq!(hex::encode(&wrapped), expected);
            let unwrapped = key_unwrap(&kek[..kek_bytes], &wrapped).unwrap();
            assert_eq!(&*unwrapped, &key[..key_bytes]);
        }
    }

    #[test]
    fn key_unwrap_refuses_tampered_and_misshapen_input() {
        let kek = bytes("000102030405060708090a0b0c0d0e0f");
        let mut wrapped = bytes("1fa68b0a8112b447aef34bd8fb5a7b829d3e862371d2cfe5");
        wrapped[3] ^= 0x80;
        assert!(matches!(
            key_unwrap(&kek, &wrapped),
            Err(KeystoreError::AuthenticationFailed)
        ));
        for length in [0, 7, 8, 23] {
            assert!(matches!(
                key_unwrap(&kek, &wrapped[..length]),
                Err(KeystoreError::InvalidInput { .. })
            ));
        }
    }

    /// Test cases 2, 8, 14 and 16 of McGrew and Viega, "The Galois/Counter Mode of Operation",
    /// as used in NIST's GCM validation.
    #[test]
    fn gcm_matches_the_gcm_specification_test_cases() {
        let zero_nonce = [0u8; GCM_NONCE_BYTES];
        for (key_bytes, expected) in [
            (
                16,
                "0388dace60b6a392f328c2b971b2fe78ab6e47d42cec13bdf53a67b21257bddf",
            ),
            (
                24,
                "98e7247c07f0fe411c267e4384b0f6002ff58d80033927ab8ef4d4587514f0fb",
            ),
            (
                32,
                "cea7403d4d606b6e074ec5d3baf39d18d0d1c8a799996bf0265b98b5d48ab919",
            ),
        ] {
            let key = vec![0u8; key_bytes];
            let sealed = gcm_encrypt(&key, &zero_nonce, b"", &[0u8; 16]).unwrap();
            assert_eq!(hex::encode(&sealed), expected, "AES-{}", key_bytes * 8);
            let opened = gcm_decrypt(&key, &zero_nonce, b"", &sealed).unwrap();
            assert_eq!(&*opened, &[0u8; 16]);
        }

        let key = bytes("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308");
        let nonce: [u8; GCM_NONCE_BYTES] = bytes("cafebabefacedbaddecaf888").try_into().unwrap();
        let plaintext = bytes(
            "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72\
             1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39",
        );
        let aad = bytes("feedfacedeadbeeffeedfacedeadbeefabaddad2");
        let sealed = gcm_encrypt(&key, &nonce, &aad, &plaintext).unwrap();
        assert_eq!(
            hex::encode(&sealed),
            "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa\
             8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662\
             76fc6ece0f4e1768cddf8853bb2d551b"
        );
        assert_eq!(
            &*gcm_decrypt(&key, &nonce, &aad, &sealed).unwrap(),
            &plaintext
        );
    }

    #[test]
    fn gcm_refuses_bad_tags_and_short_input() {
        let key = [7u8; 32];
        let nonce = [1u8; GCM_NONCE_BYTES];
        let mut sealed = gcm_encrypt(&key, &nonce, b"aad", b"payload").unwrap();
        assert!(matches!(
            gcm_decrypt(&key, &nonce, b"other aad", &sealed),
            Err(KeystoreError::AuthenticationFailed)
        ));
        let last = sealed.len() - 1;
        sealed[last] ^= 1;
        assert!(matches!(
            gcm_decrypt(&key, &nonce, b"aad", &sealed),
            Err(KeystoreError::AuthenticationFailed)
        ));
        assert!(matches!(
            gcm_decrypt(&key, &nonce, b"aad", &sealed[..15]),
            Err(KeystoreError::InvalidInput { .. })
        ));
        let empty = gcm_encrypt(&key, &nonce, b"", b"").unwrap();
        assert_eq!(empty.len(), GCM_TAG_BYTES);
        assert!(gcm_decrypt(&key, &nonce, b"", &empty).unwrap().is_empty());
    }
}
