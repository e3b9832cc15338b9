//! Fuzzes the `pkcs11:` URI parser (RFC 7512, the subset nfcpay reads from its configuration
//! and the CLI): no input may panic it, an accepted URI answers every accessor, its `Debug`
//! shows no more than it holds, and parsing is deterministic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nfcpay_keystore::uri::Pkcs11Uri;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match text.parse::<Pkcs11Uri>() {
        Ok(uri) => {
            assert!(
                text.get(..7)
                    .is_some_and(|scheme| scheme.eq_ignore_ascii_case("pkcs11:")),
                "accepted without the scheme: {text:?}"
            );
            let _ = (uri.token(), uri.manufacturer(), uri.serial(), uri.model());
            let _ = (uri.slot_id(), uri.object(), uri.id(), uri.object_type());
            let _ = uri.pin_source();
            let _ = format!("{uri:?}");
            assert!(text.parse::<Pkcs11Uri>().ok() == Some(uri));
        }
        Err(error) => {
            let _ = error.to_string();
        }
    }
});
