//! The software backend's state file: what persists (BDKs, named P-256 key pairs and
//! persistent symmetric keys), how it
//! is read (every field checked, a corrupt file is an error and never a panic) and how it is
//! written (atomically: a 0600 temporary file in the same directory, fsync, rename, fsync of
//! the directory). The format is described in the [parent module](super).

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nfcpay_protocol::BdkId;
use nfcpay_protocol::dukpt::KeyAlgorithm;
use serde::de::{self, Deserializer};
use serde::ser::{self, Serializer};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::crypto;
use crate::atomic_file::{self, AtomicWriteError};
use crate::{BdkInfo, Kcv, KeyLabel, KeyPurpose, KeystoreError};

/// The value of the file's `format` field.
pub(super) const FILE_FORMAT: &str = "nfcpay-software-keystore";
/// The version this code reads and writes.
pub(super) const FILE_FORMAT_VERSION: u32 = 1;
/// Largest state file read, in bytes (about 15,000 BDKs): checked before reading.
pub(super) const FILE_BYTES_MAX: u64 = 4 * 1024 * 1024;
/// Mode of the state file and of its temporary copies.
pub(super) const FILE_MODE: u32 = 0o600;
/// Permission bits that must be clear: none for group or others.
const FILE_MODE_GROUP_OTHER_MASK: u32 = 0o077;
/// Longest secret in the file (an AES-256 key or a P-256 scalar), in bytes.
const SECRET_BYTES_MAX: usize = 32;
/// Length of a P-256 private scalar, in bytes.
const EC_P256_PRIVATE_KEY_BYTES: usize = 32;

/// A BDK as stored.
pub(super) struct StoredBdk {
    /// What the operator sees.
    pub(super) info: BdkInfo,
    /// The key bytes.
    pub(super) key: Zeroizing<Vec<u8>>,
}

/// A named P-256 key pair as stored: its private scalar.
pub(super) struct StoredEcKey {
    /// Its label.
    pub(super) label: KeyLabel,
    /// The private key (zeroized on drop).
    pub(super) secret: p256::SecretKey,
}

/// A persistent symmetric key as stored ([`crate::Keystore::persist_key`]).
pub(super) struct StoredKey {
    /// Its label.
    pub(super) label: KeyLabel,
    /// What it may do.
    pub(super) purpose: KeyPurpose,
    /// The key bytes (their length gives the algorithm).
    pub(super) key: Zeroizing<Vec<u8>>,
}

/// Everything the file holds, checked.
#[derive(Default)]
pub(super) struct Contents {
    /// BDKs, ordered by ID.
    pub(super) bdks: Vec<StoredBdk>,
    /// Named key pairs, ordered by label.
    pub(super) ec_keys: Vec<StoredEcKey>,
    /// Persistent symmetric keys, ordered by label.
    pub(super) keys: Vec<StoredKey>,
}

/// The state file of one store, by its resolved path.
pub(super) struct StateFile {
    path: PathBuf,
}

impl fmt::Debug for StateFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StateFile({})", self.path.display())
    }
}

impl StateFile {
    /// Opens the state file at `path`, creating an empty one (mode 0600) when there is none.
    pub(super) fn open(path: &Path) -> Result<(Self, Contents), KeystoreError> {
        match fs::symlink_metadata(path) {
            Ok(_) => Self::load(path),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Self::create(path),
            Err(error) => Err(io_error(path, "cannot read its metadata", error)),
        }
    }

    /// The resolved path.
    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Replaces the file's contents atomically with `bdks`, `ec_keys` and `keys`.
    pub(super) fn save<'a>(
        &self,
        bdks: impl IntoIterator<Item = (&'a BdkInfo, &'a [u8])>,
        ec_keys: impl IntoIterator<Item = (&'a KeyLabel, &'a p256::SecretKey)>,
        keys: impl IntoIterator<Item = (&'a str, KeyPurpose, &'a [u8])>,
    ) -> Result<(), KeystoreError> {
        let bytes = encode(bdks, ec_keys, keys)?;
        write_atomically(&self.path, &bytes)
    }

    /// Checks that the file is still there, a regular file, and private.
    pub(super) fn check(&self) -> Result<(), KeystoreError> {
        let metadata =
            fs::metadata(&self.path).map_err(|error| io_error(&self.path, "is gone", error))?;
        check_metadata(&self.path, &metadata)
    }

    fn create(path: &Path) -> Result<(Self, Contents), KeystoreError> {
        let path = resolve_new(path)?;
        let bytes = encode([], [], [])?;
        let created = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(FILE_MODE)
            .open(&path);
        let mut file = match created {
            Ok(file) => file,
            // Someone else created it since we looked: read theirs.
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists => return Self::load(&path),
            Err(error) => return Err(io_error(&path, "cannot create it", error)),
        };
        file.write_all(&bytes)
            .and_then(|()| file.sync_all())
            .map_err(|error| io_error(&path, "cannot write it", error))?;
        sync_directory(&path)?;
        tracing::info!(path = %path.display(), "created an empty software keystore");
        Ok((Self { path }, Contents::default()))
    }

    fn load(path: &Path) -> Result<(Self, Contents), KeystoreError> {
        let path =
            fs::canonicalize(path).map_err(|error| io_error(path, "cannot resolve it", error))?;
        let mut file =
            File::open(&path).map_err(|error| io_error(&path, "cannot open it", error))?;
        let metadata = file
            .metadata()
            .map_err(|error| io_error(&path, "cannot read its metadata", error))?;
        check_metadata(&path, &metadata)?;
        if metadata.len() > FILE_BYTES_MAX {
            return Err(corrupt(
                &path,
                format_args!("larger than {FILE_BYTES_MAX} bytes"),
            ));
        }
        // Capacity for the whole file up front, so no reallocation leaves a copy behind.
        let capacity = usize::try_from(metadata.len())
            .unwrap_or(usize::MAX)
            .saturating_add(1);
        let mut bytes = Zeroizing::new(Vec::with_capacity(capacity));
        (&mut file)
            .take(FILE_BYTES_MAX + 1)
            .read_to_end(&mut bytes)
            .map_err(|error| io_error(&path, "cannot read it", error))?;
        if bytes.len() as u64 > FILE_BYTES_MAX {
            return Err(corrupt(
                &path,
                format_args!("larger than {FILE_BYTES_MAX} bytes"),
            ));
        }
        let contents = decode(&bytes).map_err(|error| match error {
            Corrupt::Json(source) => KeystoreError::SoftwareStoreDecode {
                path: path.clone(),
                source,
            },
            Corrupt::Invalid(message) => corrupt(&path, message),
        })?;
        Ok((Self { path }, contents))
    }
}

/// The absolute path of a file about to be created: its directory resolved, so that a later
/// rename lands in the same directory whatever the working directory becomes.
fn resolve_new(path: &Path) -> Result<PathBuf, KeystoreError> {
    let file_name = path.file_name().ok_or_else(|| {
        KeystoreError::Configuration(format!("keystore path {} has no file name", path.display()))
    })?;
    let directory = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let directory = fs::canonicalize(directory)
        .map_err(|error| io_error(path, "cannot resolve its directory", error))?;
    Ok(directory.join(file_name))
}

fn check_metadata(path: &Path, metadata: &fs::Metadata) -> Result<(), KeystoreError> {
    if !metadata.is_file() {
        return Err(KeystoreError::Io {
            path: path.display().to_string(),
            message: "is not a regular file".to_owned(),
            source: None,
        });
    }
    let mode = metadata.permissions().mode() & 0o7777;
    if mode & FILE_MODE_GROUP_OTHER_MASK != 0 {
        return Err(KeystoreError::Io {
            path: path.display().to_string(),
            message: format!(
                "holds secret keys but is accessible by group or others (mode {mode:04o}); \
                 refusing to use it: make it private with `chmod 600`"
            ),
            source: None,
        });
    }
    Ok(())
}

/// Writes `bytes` as a 0600 file over `path`, atomically and durably.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), KeystoreError> {
    atomic_file::write_atomically(path, bytes, FILE_MODE).map_err(|error| match error {
        AtomicWriteError::Save(source) => io_error(path, "cannot save it", source),
        AtomicWriteError::SyncDirectory(source) => {
            io_error(path, "cannot sync its directory", source)
        }
    })
}

fn sync_directory(path: &Path) -> Result<(), KeystoreError> {
    let directory = path.parent().unwrap_or(Path::new("."));
    File::open(directory)
        .and_then(|directory| directory.sync_all())
        .map_err(|error| io_error(path, "cannot sync its directory", error))
}

fn io_error(path: &Path, what: &str, error: io::Error) -> KeystoreError {
    KeystoreError::Io {
        path: path.display().to_string(),
        message: what.to_owned(),
        source: Some(error),
    }
}

fn corrupt(path: &Path, message: impl fmt::Display) -> KeystoreError {
    KeystoreError::Io {
        path: path.display().to_string(),
        message: format!("corrupt or not a keystore file: {message}"),
        source: None,
    }
}

// --- Encoding -------------------------------------------------------------------------------

#[derive(Serialize)]
struct FileOut<'a> {
    format: &'static str,
    version: u32,
    bdks: Vec<BdkOut<'a>>,
    ec_keys: Vec<EcKeyOut<'a>>,
    keys: Vec<KeyOut<'a>>,
}

#[derive(Serialize)]
struct KeyOut<'a> {
    label: &'a str,
    algorithm: &'static str,
    purpose: &'static str,
    key: SecretHexOut<'a>,
}

#[derive(Serialize)]
struct BdkOut<'a> {
    bdk_id: String,
    algorithm: &'static str,
    kcv: String,
    created_unix_seconds: i64,
    key: SecretHexOut<'a>,
}

#[derive(Serialize)]
struct EcKeyOut<'a> {
    label: &'a str,
    private_key: SecretHexOut<'a>,
}

/// Secret bytes serialized as lowercase hex through a zeroizing buffer.
struct SecretHexOut<'a>(&'a [u8]);

impl Serialize for SecretHexOut<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut text = Zeroizing::new(vec![0u8; self.0.len().saturating_mul(2)]);
        hex::encode_to_slice(self.0, &mut text).map_err(ser::Error::custom)?;
        let text = std::str::from_utf8(&text).map_err(ser::Error::custom)?;
        serializer.serialize_str(text)
    }
}

/// The file's bytes for these BDKs, key pairs and persistent symmetric keys.
pub(super) fn encode<'a>(
    bdks: impl IntoIterator<Item = (&'a BdkInfo, &'a [u8])>,
    ec_keys: impl IntoIterator<Item = (&'a KeyLabel, &'a p256::SecretKey)>,
    keys: impl IntoIterator<Item = (&'a str, KeyPurpose, &'a [u8])>,
) -> Result<Zeroizing<Vec<u8>>, KeystoreError> {
    let ec_scalars: Vec<(&KeyLabel, Zeroizing<[u8; EC_P256_PRIVATE_KEY_BYTES]>)> = ec_keys
        .into_iter()
        .map(|(label, secret)| {
            let mut scalar = Zeroizing::new([0u8; EC_P256_PRIVATE_KEY_BYTES]);
            scalar.copy_from_slice(&Zeroizing::new(secret.to_bytes()));
            (label, scalar)
        })
        .collect();
    let file = FileOut {
        format: FILE_FORMAT,
        version: FILE_FORMAT_VERSION,
        bdks: bdks
            .into_iter()
            .map(|(info, key)| BdkOut {
                bdk_id: info.bdk_id.to_string(),
                algorithm: info.algorithm.name(),
                kcv: info.kcv.to_string(),
                created_unix_seconds: info.created_unix_seconds,
                key: SecretHexOut(key),
            })
            .collect(),
        ec_keys: ec_scalars
            .iter()
            .map(|(label, scalar)| EcKeyOut {
                label: label.as_str(),
                private_key: SecretHexOut(&scalar[..]),
            })
            .collect(),
        keys: keys
            .into_iter()
            .map(|(label, purpose, key)| {
                Ok(KeyOut {
                    label,
                    algorithm: KeyAlgorithm::from_key_bytes(key.len())?.name(),
                    purpose: purpose_name(purpose),
                    key: SecretHexOut(key),
                })
            })
            .collect::<Result<_, KeystoreError>>()?,
    };
    // Room for everything up front, so no reallocation leaves a copy of a key behind.
    let capacity = 256 + 512 * (file.bdks.len() + file.ec_keys.len() + file.keys.len());
    let mut bytes = Zeroizing::new(Vec::with_capacity(capacity));
    serde_json::to_writer_pretty(&mut *bytes, &file).map_err(|error| KeystoreError::Io {
        path: String::new(),
        message: "cannot encode the keystore".to_owned(),
        source: Some(io::Error::other(error)),
    })?;
    bytes.push(b'\n');
    Ok(bytes)
}

// --- Decoding -------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileIn {
    format: String,
    version: u32,
    bdks: Vec<BdkIn>,
    ec_keys: Vec<EcKeyIn>,
    /// Absent in files written before persistent symmetric keys existed.
    #[serde(default)]
    keys: Vec<KeyIn>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyIn {
    label: String,
    algorithm: String,
    purpose: String,
    key: SecretHexIn,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BdkIn {
    bdk_id: String,
    algorithm: String,
    kcv: String,
    created_unix_seconds: i64,
    key: SecretHexIn,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EcKeyIn {
    label: String,
    private_key: SecretHexIn,
}

/// Secret bytes read from hex straight into a zeroizing buffer. Its errors never quote the
/// text.
struct SecretHexIn(Zeroizing<Vec<u8>>);

impl<'de> Deserialize<'de> for SecretHexIn {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct HexVisitor;
        impl de::Visitor<'_> for HexVisitor {
            type Value = SecretHexIn;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("key bytes as hex")
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<SecretHexIn, E> {
                if !text.len().is_multiple_of(2) || text.len() > 2 * SECRET_BYTES_MAX {
                    return Err(E::custom("key bytes are not hex of a valid length"));
                }
                let mut bytes = Zeroizing::new(vec![0u8; text.len() / 2]);
                hex::decode_to_slice(text, &mut bytes)
                    .map_err(|_| E::custom("key bytes are not hex"))?;
                Ok(SecretHexIn(bytes))
            }
        }
        deserializer.deserialize_str(HexVisitor)
    }
}

/// What is wrong with a state file's bytes; never quotes a secret.
pub(super) enum Corrupt {
    /// Not the JSON of a keystore file (serde_json says what and where).
    Json(serde_json::Error),
    /// Empty, or such JSON that breaks a rule: says which.
    Invalid(String),
}

/// Checks and converts the file's bytes.
pub(super) fn decode(bytes: &[u8]) -> Result<Contents, Corrupt> {
    if bytes.is_empty() {
        return Err(Corrupt::Invalid(
            "the file is empty (its creation was interrupted?); remove it to start an empty store"
                .to_owned(),
        ));
    }
    let file: FileIn = serde_json::from_slice(bytes).map_err(Corrupt::Json)?;
    check(file).map_err(Corrupt::Invalid)
}

/// Checks and converts the file's parsed JSON; the error says which rule is broken.
fn check(file: FileIn) -> Result<Contents, String> {
    if file.format != FILE_FORMAT {
        return Err(format!("`format` is not {FILE_FORMAT:?}"));
    }
    if file.version != FILE_FORMAT_VERSION {
        return Err(format!(
            "version {} is not supported (this build reads version {FILE_FORMAT_VERSION})",
            file.version
        ));
    }
    let mut contents = Contents::default();
    for bdk in file.bdks {
        let stored = decode_bdk(bdk)?;
        if contents
            .bdks
            .iter()
            .any(|other| other.info.bdk_id == stored.info.bdk_id)
        {
            return Err(format!("BDK {} appears twice", stored.info.bdk_id));
        }
        contents.bdks.push(stored);
    }
    for ec_key in file.ec_keys {
        let stored = decode_ec_key(ec_key)?;
        if contents
            .ec_keys
            .iter()
            .any(|other| other.label == stored.label)
        {
            return Err(format!("key pair {} appears twice", stored.label));
        }
        contents.ec_keys.push(stored);
    }
    for key in file.keys {
        let stored = decode_key(key)?;
        if contents
            .keys
            .iter()
            .any(|other| other.label == stored.label)
        {
            return Err(format!("key {} appears twice", stored.label));
        }
        contents.keys.push(stored);
    }
    contents.bdks.sort_by_key(|bdk| bdk.info.bdk_id);
    contents
        .keys
        .sort_by(|a, b| a.label.as_str().cmp(b.label.as_str()));
    contents
        .ec_keys
        .sort_by(|a, b| a.label.as_str().cmp(b.label.as_str()));
    Ok(contents)
}

fn decode_bdk(bdk: BdkIn) -> Result<StoredBdk, String> {
    let bdk_id: BdkId = bdk
        .bdk_id
        .parse()
        .map_err(|_| "a BDK ID is not 8 hex digits".to_owned())?;
    let algorithm: KeyAlgorithm = bdk
        .algorithm
        .parse()
        .map_err(|_| format!("BDK {bdk_id}: unknown algorithm"))?;
    if bdk.key.0.len() != algorithm.key_bytes() {
        return Err(format!(
            "BDK {bdk_id}: key length does not match {algorithm}"
        ));
    }
    let kcv: Kcv = bdk
        .kcv
        .parse()
        .map_err(|_| format!("BDK {bdk_id}: KCV is not 6 hex digits"))?;
    let actual_kcv = crypto::kcv(&bdk.key.0).map_err(|error| format!("BDK {bdk_id}: {error}"))?;
    if kcv != actual_kcv {
        return Err(format!(
            "BDK {bdk_id}: the key does not match its KCV {kcv}"
        ));
    }
    Ok(StoredBdk {
        info: BdkInfo {
            bdk_id,
            algorithm,
            kcv,
            created_unix_seconds: bdk.created_unix_seconds,
        },
        key: bdk.key.0,
    })
}

fn decode_ec_key(ec_key: EcKeyIn) -> Result<StoredEcKey, String> {
    let label: KeyLabel = ec_key
        .label
        .parse()
        .map_err(|_| "a key pair's label is not 1 to 64 printable characters".to_owned())?;
    if ec_key.private_key.0.len() != EC_P256_PRIVATE_KEY_BYTES {
        return Err(format!(
            "key pair {label}: private key is not {EC_P256_PRIVATE_KEY_BYTES} bytes"
        ));
    }
    let secret = p256::SecretKey::from_slice(&ec_key.private_key.0)
        .map_err(|_| format!("key pair {label}: private key is not a P-256 scalar"))?;
    Ok(StoredEcKey { label, secret })
}

fn decode_key(key: KeyIn) -> Result<StoredKey, String> {
    let label: KeyLabel = key
        .label
        .parse()
        .map_err(|_| "a key's label is not 1 to 64 printable characters".to_owned())?;
    let algorithm: KeyAlgorithm = key
        .algorithm
        .parse()
        .map_err(|_| format!("key {label}: unknown algorithm"))?;
    if key.key.0.len() != algorithm.key_bytes() {
        return Err(format!(
            "key {label}: key length does not match {algorithm}"
        ));
    }
    let purpose =
        purpose_from_name(&key.purpose).ok_or_else(|| format!("key {label}: unknown purpose"))?;
    Ok(StoredKey {
        label,
        purpose,
        key: key.key.0,
    })
}

/// Every purpose, for naming them in the file.
const PURPOSES: [KeyPurpose; 6] = [
    KeyPurpose::Derive,
    KeyPurpose::Export,
    KeyPurpose::Encrypt,
    KeyPurpose::Mac,
    KeyPurpose::Wrap,
    KeyPurpose::Check,
];

/// A purpose's name in the file.
fn purpose_name(purpose: KeyPurpose) -> &'static str {
    match purpose {
        KeyPurpose::Derive => "derive",
        KeyPurpose::Export => "export",
        KeyPurpose::Encrypt => "encrypt",
        KeyPurpose::Mac => "mac",
        KeyPurpose::Wrap => "wrap",
        KeyPurpose::Check => "check",
    }
}

fn purpose_from_name(name: &str) -> Option<KeyPurpose> {
    PURPOSES
        .into_iter()
        .find(|purpose| purpose_name(*purpose) == name)
}
