//! The `[keystore]` section of a configuration file, and opening the store it names.
//!
//! ```toml
//! [keystore]
//! backend = "pkcs11"
//! uri = "pkcs11:token=nfcpay?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/nfcpay/pin"
//! ```
//! or, for development and terminals without a token:
//! ```toml
//! [keystore]
//! backend = "software"
//! path = "/var/lib/nfcpay/keystore.json"
//! ```
//! Neither form holds a secret: the PIN is read from the `pin-source` file when the store opens.

use std::path::PathBuf;

use serde::Deserialize;

use crate::{Keystore, KeystoreError};

/// Which backend holds the keys, and where.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "backend", rename_all = "lowercase", deny_unknown_fields)]
pub enum KeystoreConfig {
    /// A PKCS#11 token named by an RFC 7512 URI with `module-path` and `pin-source`.
    Pkcs11 {
        /// `pkcs11:token=…?module-path=…&pin-source=file:…`
        uri: String,
    },
    /// The software backend's state file (created 0600 if missing).
    Software {
        /// The file.
        path: PathBuf,
    },
}

/// Opens the store `config` names.
pub fn open(config: &KeystoreConfig) -> Result<Box<dyn Keystore>, KeystoreError> {
    match config {
        KeystoreConfig::Pkcs11 { uri } => {
            let uri: crate::uri::Pkcs11Uri = uri.parse()?;
            Ok(Box::new(crate::pkcs11::Pkcs11Keystore::open(&uri)?))
        }
        KeystoreConfig::Software { path } => {
            Ok(Box::new(crate::software::SoftwareKeystore::open(path)?))
        }
    }
}
