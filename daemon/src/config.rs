//! Configuration of `nfcpayd` and `nfcpay-admin`: a TOML file plus `NFCPAY_*` environment
//! overrides (`NFCPAY_KEYSTORE__URI=…` overrides `[keystore] uri`), validated as a whole
//! before anything else happens. See `daemon/nfcpay.sample.toml` for every setting.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use nfcpay_keystore::KeystoreConfig;
use nfcpay_protocol::BdkId;
use serde::Deserialize;

use crate::server::ServerConfig;
use crate::storage::DatabaseConfig;

/// Prefix of environment variables that override the file.
pub const ENVIRONMENT_PREFIX: &str = "NFCPAY";

/// The whole configuration. Deliberately not `Debug`: the database URL may hold a password.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the keys are (`[keystore]`).
    pub keystore: KeystoreConfig,
    /// The ledger (`[database]`).
    #[serde(default)]
    pub database: DatabaseConfig,
    /// The network front end (`[server]`).
    #[serde(default)]
    pub server: ServerConfig,
    /// The platform service (`[platform]`).
    #[serde(default)]
    pub platform: PlatformConfig,
    /// The file this was loaded from (none when built in code): SIGHUP reads it again to say
    /// which changed settings take a restart.
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

/// Number of DUKPT intermediate keys cached in the HSM by default.
pub const KEY_CACHE_ENTRIES_DEFAULT: usize = 4096;
/// How often unmatched payments past their expiry are marked expired, by default.
pub const EXPIRY_SWEEP_INTERVAL_MS_DEFAULT: u64 = 1000;
/// How long a new terminal's enrollment code works, by default.
pub const ENROLLMENT_CODE_VALIDITY_HOURS_DEFAULT: u32 = 24;

/// `[platform]`: the service between the front end and the ledger.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PlatformConfig {
    /// Directory of the platform's certificates (`ca.pem`, `server.pem`); never keys.
    pub pki_dir: PathBuf,
    /// DUKPT intermediate keys cached in the HSM (session objects).
    pub key_cache_entries: usize,
    /// How often expired unmatched payments are swept (ms).
    pub expiry_sweep_interval_ms: u64,
    /// The BDK new terminals are enrolled under (8 hex digits); `None`: the only BDK.
    pub enrollment_bdk_id: Option<String>,
    /// How long a new terminal's enrollment code works (hours).
    pub enrollment_code_validity_hours: u32,
    /// Run even as root (not recommended: the unit file runs `nfcpayd` as `nfcpay`).
    pub allow_root: bool,
}

impl Default for PlatformConfig {
    fn default() -> Self {
        Self {
            pki_dir: PathBuf::from("/var/lib/nfcpay/pki"),
            key_cache_entries: KEY_CACHE_ENTRIES_DEFAULT,
            expiry_sweep_interval_ms: EXPIRY_SWEEP_INTERVAL_MS_DEFAULT,
            enrollment_bdk_id: None,
            enrollment_code_validity_hours: ENROLLMENT_CODE_VALIDITY_HOURS_DEFAULT,
            allow_root: false,
        }
    }
}

impl PlatformConfig {
    /// The configured enrollment BDK, parsed.
    pub fn enrollment_bdk_id(&self) -> Result<Option<BdkId>, ConfigError> {
        self.enrollment_bdk_id
            .as_deref()
            .map(str::parse)
            .transpose()
            .map_err(
                |error: nfcpay_protocol::ProtocolError| ConfigError::Invalid {
                    path: "[platform] enrollment_bdk_id".into(),
                    message: error.to_string(),
                },
            )
    }
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
    /// Run as root where the service's files belong to the service user: what root would
    /// make there (token objects, the ledger, certificates) `nfcpayd` could not read.
    #[error(
        "running as root, but {directory} belongs to {owner}: files made as root would be \
         unusable by nfcpayd; run as that user: runuser -u {owner} -- {program} …"
    )]
    WrongUser {
        /// The service's state directory (the nearest existing one above `pki_dir`).
        directory: String,
        /// Its owner's name (or numeric ID).
        owner: String,
        /// The program to run as the owner.
        program: &'static str,
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
            // Only `NFCPAY_SECTION__KEY` names settings: `NFCPAY_LOG`, `NFCPAY_CONFIG` are not.
            .filter(|(name, _)| {
                name.starts_with(&format!("{ENVIRONMENT_PREFIX}_")) && name.contains("__")
            })
            .collect();
        // Read here, not by `config`, which says "not found" for a file it may not read.
        let text = std::fs::read_to_string(path)
            .map_err(|error| invalid(format!("cannot read the file: {error}")))?;
        let mut config: Self = config::Config::builder()
            .add_source(config::File::from_str(&text, config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix(ENVIRONMENT_PREFIX)
                    .prefix_separator("_")
                    .separator("__")
                    .try_parsing(true)
                    .source(Some(overrides)),
            )
            .build()
            .and_then(config::Config::try_deserialize)
            .map_err(|error| invalid(error.to_string()))?;
        config.validate().map_err(invalid)?;
        config.source = Some(path.to_path_buf());
        Ok(config)
    }

    /// The settings whose values differ between `self` and `other`, as `[section] name`: what
    /// a SIGHUP finds changed in the file (none of which it applies but the certificates'
    /// content). A password changed inside the database URL is not seen (it is redacted).
    pub fn changed_settings(&self, other: &Self) -> Vec<String> {
        let mut changed = Vec::new();
        let mut compare = |section: &str, old: String, new: String| {
            let (old, new) = (top_level_fields(&old), top_level_fields(&new));
            for (name, value) in &new {
                if old
                    .iter()
                    .all(|(old_name, old_value)| old_name != name || old_value != value)
                {
                    changed.push(format!("[{section}] {name}"));
                }
            }
        };
        compare(
            "keystore",
            format!("{:#?}", self.keystore),
            format!("{:#?}", other.keystore),
        );
        compare(
            "database",
            format!("{:#?}", self.database),
            format!("{:#?}", other.database),
        );
        compare(
            "server",
            format!("{:#?}", self.server),
            format!("{:#?}", other.server),
        );
        compare(
            "platform",
            format!("{:#?}", self.platform),
            format!("{:#?}", other.platform),
        );
        changed
    }

    /// Refuses root when the service's state directory (the nearest existing directory at or
    /// above `[platform] pki_dir`, `/var/lib/nfcpay` in the documented layout) belongs to
    /// another user: `program` must then run as that user (docs/operations.md §2).
    pub fn check_not_root_in_service_directory(
        &self,
        program: &'static str,
    ) -> Result<(), ConfigError> {
        if !rustix::process::geteuid().is_root() {
            return Ok(());
        }
        let Some((directory, uid)) = self
            .platform
            .pki_dir
            .ancestors()
            .find_map(|directory| Some((directory, std::fs::metadata(directory).ok()?.uid())))
        else {
            return Ok(());
        };
        if uid == 0 {
            return Ok(());
        }
        Err(ConfigError::WrongUser {
            directory: directory.display().to_string(),
            owner: user_name(uid).unwrap_or_else(|| uid.to_string()),
            program,
        })
    }

    /// Checks what deserialization cannot: every section's own rules.
    fn validate(&self) -> Result<(), String> {
        self.server.validate().map_err(|error| error.to_string())?;
        self.database
            .validate()
            .map_err(|error| format!("[database] {error}"))?;
        self.platform
            .enrollment_bdk_id()
            .map_err(|error| error.to_string())?;
        if self.platform.key_cache_entries == 0 || self.platform.expiry_sweep_interval_ms == 0 {
            return Err(
                "[platform] key_cache_entries and expiry_sweep_interval_ms must be positive".into(),
            );
        }
        Ok(())
    }
}

/// A pretty `Debug` rendering split into its top-level fields: (name, the field's text).
fn top_level_fields(debug: &str) -> Vec<(String, String)> {
    let mut fields: Vec<(String, String)> = Vec::new();
    for line in debug.lines().skip(1) {
        let top_level = line
            .strip_prefix("    ")
            .filter(|rest| !rest.starts_with(' '));
        match top_level.and_then(|rest| rest.split_once(": ")) {
            Some((name, value)) => fields.push((name.to_owned(), value.to_owned())),
            None => {
                if let Some((_, text)) = fields.last_mut() {
                    text.push_str(line);
                }
            }
        }
    }
    fields
}

/// The name of user `uid` in `/etc/passwd` (system users of a service are local).
fn user_name(uid: u32) -> Option<String> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        (fields.nth(1)?.parse::<u32>().ok()? == uid).then(|| name.to_owned())
    })
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
    fn refuses_an_unknown_database_and_a_zero_database_wait() {
        let keystore = "[keystore]\nbackend = \"software\"\npath = \"/tmp/ks.json\"\n";
        for database in [
            "url = \"mysql://h/db\"",
            "write_timeout_ms = 0",
            "read_timeout_ms = 0",
            "commit_delay_us = 1000001",
            "writers = 0",
            "writers = 9",
            "url = \"postgres://h/db\"\nwriters = 4\npool_size = 4",
        ] {
            let file = write(&format!("{keystore}[database]\n{database}\n"));
            let refused = Config::load_with_environment(file.path(), []);
            assert!(
                matches!(&refused, Err(ConfigError::Invalid { message, .. }) if message.starts_with("[database]")),
                "{database}: {:?}",
                refused.err()
            );
        }
    }

    #[test]
    fn writers_beyond_the_pool_are_refused_on_postgresql_only() {
        let keystore = "[keystore]\nbackend = \"software\"\npath = \"/tmp/ks.json\"\n";
        // SQLite has one writer whatever `writers` says: a one-connection pool is fine.
        let sqlite = write(&format!("{keystore}[database]\npool_size = 1\n"));
        let config = Config::load_with_environment(sqlite.path(), []).unwrap();
        assert_eq!(config.database.writers, DatabaseConfig::DEFAULT_WRITERS);
        let postgres = write(&format!(
            "{keystore}[database]\nurl = \"postgres://h/db\"\nwriters = 3\npool_size = 4\n"
        ));
        assert!(Config::load_with_environment(postgres.path(), []).is_ok());
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
        assert_eq!(config.platform.key_cache_entries, KEY_CACHE_ENTRIES_DEFAULT);
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
    fn changed_settings_are_named() {
        let file = write(
            "[keystore]\nbackend = \"software\"\npath = \"/x\"\n[server]\n\
             terminal_requests_per_second = 50\n",
        );
        let old = Config::load_with_environment(file.path(), []).unwrap();
        assert_eq!(old.source.as_deref(), Some(file.path()));
        assert!(old.changed_settings(&old.clone()).is_empty());
        let file = write(
            "[keystore]\nbackend = \"software\"\npath = \"/y\"\n[server]\n\
             terminal_requests_per_second = 7\n[platform]\nkey_cache_entries = 9\n",
        );
        let new = Config::load_with_environment(file.path(), []).unwrap();
        assert_eq!(
            old.changed_settings(&new),
            [
                "[keystore] path",
                "[server] terminal_requests_per_second",
                "[platform] key_cache_entries"
            ]
        );
    }

    #[test]
    fn unreadable_files_and_unknown_database_schemes_are_named() {
        let error = Config::load_with_environment(Path::new("/nonexistent/nfcpay.toml"), [])
            .err()
            .expect("a missing file is refused");
        assert!(
            error
                .to_string()
                .contains("cannot read the file: No such file"),
            "{error}"
        );
        let directory = tempfile::tempdir().unwrap();
        let error = Config::load_with_environment(directory.path(), [])
            .err()
            .expect("a directory is refused");
        assert!(
            error.to_string().contains("cannot read the file"),
            "{error}"
        );
        let file = write(
            "[keystore]\nbackend = \"software\"\npath = \"/x\"\n\
             [database]\nurl = \"mysql://db/nfcpay\"\n",
        );
        let error = Config::load_with_environment(file.path(), [])
            .err()
            .expect("mysql:// is refused");
        assert!(error.to_string().contains("unknown scheme"), "{error}");
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
            ("NFCPAY_LOG".to_owned(), "debug".to_owned()),
            ("NFCPAY_CONFIG".to_owned(), "/elsewhere.toml".to_owned()),
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
            "[keystore]\nbackend = \"software\"\npath = \"/x\"\n[platform]\nenrollment_bdk_id = \"XYZ\"\n",
            "[keystore]\nbackend = \"software\"\npath = \"/x\"\n[platform]\nkey_cache_entries = 0\n",
            "",
            "[keystore\n",
        ] {
            let file = write(text);
            let Err(error) = Config::load_with_environment(file.path(), []) else {
                panic!("{text:?} was accepted");
            };
            assert!(
                error.to_string().contains("configuration"),
                "{text:?}: {error}"
            );
        }
        assert!(
            Config::load_with_environment(Path::new("/nonexistent.toml"), []).is_err(),
            "a missing file is an error"
        );
    }
}
