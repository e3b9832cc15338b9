//! Configuration of `nfcpayd` and `nfcpay-admin`: a TOML file plus `NFCPAY_*` environment
//! overrides (`NFCPAY_KEYSTORE__URI=…` overrides `[keystore] uri`), validated as a whole
//! before anything else happens. See `daemon/nfcpay.sample.toml` for every setting.

use std::path::Path;

use nfcpay_keystore::KeystoreConfig;
use serde::Deserialize;

/// Prefix of environment variables that override the file.
pub const ENVIRONMENT_PREFIX: &str = "NFCPAY";

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the keys are (`[keystore]`).
    pub keystore: KeystoreConfig,
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file is missing, unreadable, not TOML, or does not match the schema.
    #[error("configuration {path}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong (from the parser; never contains a secret, as the file holds none).
        message: String,
    },
}

impl Config {
    /// Reads `path`, applies `NFCPAY_*` overrides and checks the result.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::load_with_environment(path, std::env::vars())
    }

    /// As [`Config::load`], with the environment given (for tests).
    pub fn load_with_environment(
        path: &Path,
        environment: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: path.display().to_string(),
            message,
        };
        let overrides: config::Map<String, String> = environment
            .into_iter()
            .filter(|(name, _)| name.starts_with(&format!("{ENVIRONMENT_PREFIX}_")))
            .collect();
        config::Config::builder()
            .add_source(config::File::from(path).format(config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix(ENVIRONMENT_PREFIX)
                    .prefix_separator("_")
                    .separator("__")
                    .source(Some(overrides)),
            )
            .build()
            .and_then(config::Config::try_deserialize)
            .map_err(|error| invalid(error.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write(text: &str) -> tempfile::NamedTempFile {
        let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        file.write_all(text.as_bytes()).unwrap();
        file
    }

    #[test]
    fn reads_both_backends() {
        let file = write("[keystore]\nbackend = \"software\"\npath = \"/tmp/ks.json\"\n");
        let config = Config::load_with_environment(file.path(), []).unwrap();
        assert_eq!(
            config.keystore,
            KeystoreConfig::Software {
                path: "/tmp/ks.json".into()
            }
        );
        let file = write("[keystore]\nbackend = \"pkcs11\"\nuri = \"pkcs11:token=t\"\n");
        let config = Config::load_with_environment(file.path(), []).unwrap();
        assert_eq!(
            config.keystore,
            KeystoreConfig::Pkcs11 {
                uri: "pkcs11:token=t".into()
            }
        );
    }

    #[test]
    fn environment_overrides_the_file() {
        let file = write("[keystore]\nbackend = \"pkcs11\"\nuri = \"pkcs11:token=file\"\n");
        let environment = [
            (
                "NFCPAY_KEYSTORE__URI".to_owned(),
                "pkcs11:token=env".to_owned(),
            ),
            ("OTHER_KEYSTORE__URI".to_owned(), "ignored".to_owned()),
        ];
        let config = Config::load_with_environment(file.path(), environment).unwrap();
        assert_eq!(
            config.keystore,
            KeystoreConfig::Pkcs11 {
                uri: "pkcs11:token=env".into()
            }
        );
    }

    #[test]
    fn refuses_unknown_missing_and_malformed_settings() {
        for text in [
            "[keystore]\nbackend = \"software\"\npath = \"/x\"\npin = \"1234\"\n",
            "[keystore]\nbackend = \"tpm\"\n",
            "[keystore]\nbackend = \"pkcs11\"\n",
            "[keystore]\nbackend = \"software\"\npath = \"/x\"\n[extra]\n",
            "",
            "[keystore\n",
        ] {
            let file = write(text);
            let error = Config::load_with_environment(file.path(), []).unwrap_err();
            assert!(
                error.to_string().contains("configuration"),
                "{text:?}: {error}"
            );
        }
        assert!(Config::load_with_environment(Path::new("/nonexistent.toml"), []).is_err());
    }
}
