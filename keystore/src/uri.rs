//! RFC 7512 `pkcs11:` URIs: which module to load, which token to use, where the PIN is.
//!
//! ```text
//! pkcs11:token=nfcpay?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/nfcpay/pin
//! ```
//!
//! Path attributes (separated by `;`): `token`, `manufacturer`, `serial`, `model`, `slot-id`,
//! `object`, `id`, `type`. Query attributes (separated by `&`): `module-path`, `module-name`,
//! `pin-source` (a `file:` URI only). Values are percent-decoded. `pin-value` is refused: a PIN
//! never belongs in configuration. Unknown or repeated attributes are errors, so a typo cannot
//! silently select another token.
//!
//! A [`Pkcs11Uri`] holds only the *path* of the PIN file; [`Pkcs11Uri::read_pin`] reads the PIN
//! into a [`SecretString`] when the store logs in, and the caller drops it right after.

use std::fmt;
use std::io::Read;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use secrecy::SecretString;
use zeroize::Zeroizing;

use crate::KeystoreError;

/// Longest `pkcs11:` URI accepted, in bytes.
pub const URI_BYTES_MAX: usize = 4096;
/// Longest PIN file read, in bytes (a PIN plus a newline; PKCS#11 PINs are short).
pub const PIN_FILE_BYTES_MAX: u64 = 256;
/// Longest token label (the size of `CK_TOKEN_INFO.label`), in bytes.
pub const TOKEN_LABEL_BYTES_MAX: usize = 32;

/// Directories searched for a module named by `module-name` (RFC 7512 §2.3) when no
/// `module-path` is given: `lib<name>.so` or `<name>.so` in each, in order.
const MODULE_DIRECTORIES: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/pkcs11",
    "/usr/lib/aarch64-linux-gnu/pkcs11",
    "/usr/lib/pkcs11",
    "/usr/lib/softhsm",
    "/usr/lib64/pkcs11",
    "/usr/local/lib/softhsm",
];

/// The object class named by the `type` attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectType {
    /// `type=cert`
    Certificate,
    /// `type=data`
    Data,
    /// `type=private`
    PrivateKey,
    /// `type=public`
    PublicKey,
    /// `type=secret-key`
    SecretKey,
}

/// A parsed `pkcs11:` URI. Holds no PIN, only where to read it.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Pkcs11Uri {
    token: Option<String>,
    manufacturer: Option<String>,
    serial: Option<String>,
    model: Option<String>,
    slot_id: Option<u64>,
    object: Option<String>,
    id: Option<Vec<u8>>,
    object_type: Option<ObjectType>,
    module_path: Option<PathBuf>,
    module_name: Option<String>,
    pin_source: Option<PathBuf>,
}

impl Pkcs11Uri {
    /// The token label (`token=`), if given.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// The token label, required to open a store (slot IDs change, labels do not).
    pub fn require_token(&self) -> Result<&str, KeystoreError> {
        self.token().ok_or_else(|| {
            configuration("the pkcs11: URI must name the token (token=LABEL)".to_owned())
        })
    }

    /// The token manufacturer (`manufacturer=`), if given.
    pub fn manufacturer(&self) -> Option<&str> {
        self.manufacturer.as_deref()
    }

    /// The token serial number (`serial=`), if given.
    pub fn serial(&self) -> Option<&str> {
        self.serial.as_deref()
    }

    /// The token model (`model=`), if given.
    pub fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    /// The slot ID (`slot-id=`), if given. Slot IDs may change when tokens are initialised;
    /// the store selects by token label.
    pub fn slot_id(&self) -> Option<u64> {
        self.slot_id
    }

    /// The object label (`object=`), if given.
    pub fn object(&self) -> Option<&str> {
        self.object.as_deref()
    }

    /// The object ID (`id=`, raw bytes), if given.
    pub fn id(&self) -> Option<&[u8]> {
        self.id.as_deref()
    }

    /// The object class (`type=`), if given.
    pub fn object_type(&self) -> Option<ObjectType> {
        self.object_type
    }

    /// The PKCS#11 module to load: `module-path`, else `module-name` looked up in the usual
    /// module directories; an error when neither is given or the named module is not found.
    pub fn require_module_path(&self) -> Result<PathBuf, KeystoreError> {
        if let Some(path) = &self.module_path {
            return Ok(path.clone());
        }
        let Some(name) = &self.module_name else {
            return Err(configuration(
                "the pkcs11: URI must give module-path=/path/to/module.so (or module-name)"
                    .to_owned(),
            ));
        };
        MODULE_DIRECTORIES
            .iter()
            .flat_map(|directory| {
                [
                    Path::new(directory).join(format!("lib{name}.so")),
                    Path::new(directory).join(format!("{name}.so")),
                ]
            })
            .find(|candidate| candidate.is_file())
            .ok_or_else(|| {
                configuration(format!(
                    "PKCS#11 module {name:?} not found in {}; give module-path",
                    MODULE_DIRECTORIES.join(", ")
                ))
            })
    }

    /// The file the PIN is read from (`pin-source=file:…`), if given.
    pub fn pin_source(&self) -> Option<&Path> {
        self.pin_source.as_deref()
    }

    /// Reads the PIN from `pin-source`: the file's content without one trailing newline.
    /// The caller drops the returned secret as soon as it has logged in.
    pub fn read_pin(&self) -> Result<SecretString, KeystoreError> {
        let path = self.pin_source.as_deref().ok_or_else(|| {
            configuration("the pkcs11: URI must give pin-source=file:/path/to/pin".to_owned())
        })?;
        let io_error = |error: std::io::Error| KeystoreError::Io {
            path: path.display().to_string(),
            message: "reading the PIN file".to_owned(),
            source: Some(error),
        };
        let file = std::fs::File::open(path).map_err(io_error)?;
        // The file opened (symbolic links followed): its own mode, not the link's.
        let mode = file.metadata().map_err(io_error)?.permissions().mode();
        let credentials_directory = std::env::var_os(CREDENTIALS_DIRECTORY_VARIABLE);
        if let Some(refusal) =
            pin_file_refusal(path, mode, credentials_directory.as_deref().map(Path::new))
        {
            return Err(KeystoreError::Io {
                path: path.display().to_string(),
                message: refusal,
                source: None,
            });
        }
        let mut contents = Zeroizing::new(String::new());
        // One byte more than allowed, to tell a long file from one of exactly the limit.
        file.take(PIN_FILE_BYTES_MAX + 1)
            .read_to_string(&mut contents)
            .map_err(io_error)?;
        if contents.len() as u64 > PIN_FILE_BYTES_MAX {
            return Err(KeystoreError::Io {
                path: path.display().to_string(),
                message: format!("the PIN file is longer than {PIN_FILE_BYTES_MAX} bytes"),
                source: None,
            });
        }
        let mut pin: &str = &contents;
        if let Some(stripped) = pin.strip_suffix('\n') {
            pin = stripped.strip_suffix('\r').unwrap_or(stripped);
        }
        if pin.is_empty() {
            return Err(KeystoreError::Io {
                path: path.display().to_string(),
                message: "the PIN file is empty".to_owned(),
                source: None,
            });
        }
        Ok(SecretString::from(pin.to_owned()))
    }
}

/// The environment variable in which systemd names a service's credentials directory
/// (`LoadCredential=`), whose files only the service can read.
pub const CREDENTIALS_DIRECTORY_VARIABLE: &str = "CREDENTIALS_DIRECTORY";

/// Permission bits a PIN file may not have: any access by its group or by other users.
pub const PIN_FILE_MODE_FORBIDDEN: u32 = 0o077;

/// Why the PIN file at `path`, of permission bits `mode`, is refused, if it is: its group or
/// other users can read or write it — unless it is a systemd credential, a file in
/// `credentials_directory` (`$CREDENTIALS_DIRECTORY`), which systemd makes readable by the
/// service only whatever its mode says. The reason names the path and the mode, never the PIN.
pub fn pin_file_refusal(
    path: &Path,
    mode: u32,
    credentials_directory: Option<&Path>,
) -> Option<String> {
    if mode & PIN_FILE_MODE_FORBIDDEN == 0 {
        return None;
    }
    let is_credential = credentials_directory.is_some_and(|directory| {
        directory.is_absolute()
            && path.strip_prefix(directory).is_ok_and(|inside| {
                // No `..` or `.` leading back out of the directory.
                inside.components().count() > 0
                    && inside
                        .components()
                        .all(|part| matches!(part, std::path::Component::Normal(_)))
            })
    });
    (!is_credential).then(|| {
        format!(
            "the PIN file can be read or written by its group or other users (mode {:04o}); \
             refused: make it readable by its owner only (chmod 0600, owned by the user that \
             reads it), or give it as a systemd credential (docs/operations.md §4)",
            mode & 0o7777
        )
    })
}

impl fmt::Debug for Pkcs11Uri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Only names; `id` is shown as hex. There is no PIN in here, but say so explicitly.
        f.debug_struct("Pkcs11Uri")
            .field("token", &self.token)
            .field("manufacturer", &self.manufacturer)
            .field("serial", &self.serial)
            .field("model", &self.model)
            .field("slot_id", &self.slot_id)
            .field("object", &self.object)
            .field("id", &self.id.as_deref().map(hex::encode_upper))
            .field("object_type", &self.object_type)
            .field("module_path", &self.module_path)
            .field("module_name", &self.module_name)
            .field("pin_source", &self.pin_source)
            .finish()
    }
}

impl FromStr for Pkcs11Uri {
    type Err = KeystoreError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.len() > URI_BYTES_MAX {
            return Err(configuration(format!(
                "pkcs11: URI longer than {URI_BYTES_MAX} bytes"
            )));
        }
        let Some(rest) = strip_prefix_ignore_case(text, "pkcs11:") else {
            return Err(configuration(
                "a PKCS#11 URI must start with \"pkcs11:\"".to_owned(),
            ));
        };
        let (path, query) = match rest.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (rest, None),
        };
        let mut uri = Self::default();
        for attribute in path.split(';').filter(|attribute| !attribute.is_empty()) {
            let (name, value) = split_attribute(attribute)?;
            uri.set_path_attribute(name, value)?;
        }
        for attribute in query
            .into_iter()
            .flat_map(|query| query.split('&'))
            .filter(|attribute| !attribute.is_empty())
        {
            let (name, value) = split_attribute(attribute)?;
            uri.set_query_attribute(name, value)?;
        }
        Ok(uri)
    }
}

impl Pkcs11Uri {
    fn set_path_attribute(&mut self, name: &str, value: &str) -> Result<(), KeystoreError> {
        match name {
            "token" => {
                let label = decode_text(name, value)?;
                if label.is_empty() {
                    return Err(configuration("token must not be empty".to_owned()));
                }
                if label.len() > TOKEN_LABEL_BYTES_MAX {
                    return Err(configuration(format!(
                        "token label longer than {TOKEN_LABEL_BYTES_MAX} bytes"
                    )));
                }
                set_once(name, &mut self.token, label)
            }
            "manufacturer" => set_once(name, &mut self.manufacturer, decode_text(name, value)?),
            "serial" => set_once(name, &mut self.serial, decode_text(name, value)?),
            "model" => set_once(name, &mut self.model, decode_text(name, value)?),
            "object" => set_once(name, &mut self.object, decode_text(name, value)?),
            "id" => set_once(name, &mut self.id, percent_decode(name, value)?),
            "slot-id" => {
                let slot_id = decode_text(name, value)?
                    .parse::<u64>()
                    .map_err(|_| configuration("slot-id must be a decimal number".to_owned()))?;
                set_once(name, &mut self.slot_id, slot_id)
            }
            "type" => {
                let object_type = match decode_text(name, value)?.as_str() {
                    "cert" => ObjectType::Certificate,
                    "data" => ObjectType::Data,
                    "private" => ObjectType::PrivateKey,
                    "public" => ObjectType::PublicKey,
                    "secret-key" => ObjectType::SecretKey,
                    _ => {
                        return Err(configuration(
                            "type must be cert, data, private, public or secret-key".to_owned(),
                        ));
                    }
                };
                set_once(name, &mut self.object_type, object_type)
            }
            "pin-value" | "pin-source" | "module-path" | "module-name" => Err(configuration(
                format!("{name} is a query attribute: put it after '?'"),
            )),
            _ => Err(unknown_attribute(name)),
        }
    }

    fn set_query_attribute(&mut self, name: &str, value: &str) -> Result<(), KeystoreError> {
        match name {
            "module-path" => {
                let path = PathBuf::from(decode_text(name, value)?);
                if !path.is_absolute() {
                    return Err(configuration("module-path must be an absolute path".to_owned()));
                }
                set_once(name, &mut self.module_path, path)
            }
            "module-name" => {
                let module_name = decode_text(name, value)?;
                if module_name.is_empty() || module_name.contains('/') {
                    return Err(configuration(
                        "module-name must be a file name without directories".to_owned(),
                    ));
                }
                set_once(name, &mut self.module_name, module_name)
            }
            "pin-source" => {
                let source = decode_text(name, value)?;
                let path = pin_source_path(&source)?;
                set_once(name, &mut self.pin_source, path)
            }
            // Refused before its value is even decoded: it is not kept or echoed anywhere.
            "pin-value" => Err(configuration(
                "pin-value is refused: a PIN must not be in configuration; use pin-source=file:/path"
                    .to_owned(),
            )),
            _ => Err(unknown_attribute(name)),
        }
    }
}

/// `file:/path` or `file:///path` → `/path`.
fn pin_source_path(source: &str) -> Result<PathBuf, KeystoreError> {
    let Some(rest) = source.strip_prefix("file:") else {
        return Err(configuration(
            "pin-source must be a file: URI (pin-source=file:/path/to/pin)".to_owned(),
        ));
    };
    let path = rest.strip_prefix("//").unwrap_or(rest);
    if !path.starts_with('/') {
        return Err(configuration(
            "pin-source must name an absolute path (file:/path/to/pin)".to_owned(),
        ));
    }
    Ok(PathBuf::from(path))
}

fn split_attribute(attribute: &str) -> Result<(&str, &str), KeystoreError> {
    attribute.split_once('=').ok_or_else(|| {
        configuration(format!(
            "pkcs11: URI attribute {:?} has no '='",
            // The name part only, in case a value was pasted without its name.
            attribute.chars().take(32).collect::<String>()
        ))
    })
}

fn set_once<T>(name: &str, slot: &mut Option<T>, value: T) -> Result<(), KeystoreError> {
    if slot.is_some() {
        return Err(configuration(format!(
            "pkcs11: URI attribute {name} is repeated"
        )));
    }
    *slot = Some(value);
    Ok(())
}

fn decode_text(name: &str, value: &str) -> Result<String, KeystoreError> {
    String::from_utf8(percent_decode(name, value)?)
        .map_err(|_| configuration(format!("pkcs11: URI attribute {name} is not UTF-8")))
}

/// Strict percent-decoding: every `%` must be followed by two hex digits.
fn percent_decode(name: &str, value: &str) -> Result<Vec<u8>, KeystoreError> {
    let bad = || {
        configuration(format!(
            "pkcs11: URI attribute {name} has bad percent-encoding"
        ))
    };
    let bytes = value.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%' {
            let digits = bytes.get(index + 1..index + 3).ok_or_else(bad)?;
            let mut byte = [0u8; 1];
            hex::decode_to_slice(digits, &mut byte).map_err(|_| bad())?;
            decoded.push(byte[0]);
            index += 3;
        } else {
            decoded.push(bytes[index]);
            index += 1;
        }
    }
    Ok(decoded)
}

fn strip_prefix_ignore_case<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &text[prefix.len()..])
}

fn unknown_attribute(name: &str) -> KeystoreError {
    configuration(format!(
        "unknown pkcs11: URI attribute {:?}",
        name.chars().take(32).collect::<String>()
    ))
}

fn configuration(message: String) -> KeystoreError {
    KeystoreError::Configuration(message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    const EXAMPLE: &str = "pkcs11:token=nfcpay?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/nfcpay/pin";

    #[test]
    fn pin_files_open_to_group_or_others_are_refused() {
        let path = Path::new("/etc/nfcpay/hsm-pin");
        assert_eq!(pin_file_refusal(path, 0o100600, None), None);
        assert_eq!(pin_file_refusal(path, 0o100400, None), None);
        for mode in [0o100640, 0o100620, 0o100644, 0o100602, 0o100601, 0o100660] {
            let refusal = pin_file_refusal(path, mode, None).expect("refused");
            assert!(
                refusal.contains(&format!("mode {:04o}", mode & 0o7777)),
                "{refusal}"
            );
        }
    }

    #[test]
    fn systemd_credentials_are_not_refused_for_their_mode() {
        let credentials = Some(Path::new("/run/credentials/nfcpayd.service"));
        let credential = Path::new("/run/credentials/nfcpayd.service/hsm-pin");
        assert_eq!(pin_file_refusal(credential, 0o100440, credentials), None);
        // Only inside that directory, not out of it, and only when it is set and absolute.
        for (path, directory) in [
            (credential, None),
            (
                credential,
                Some(Path::new("run/credentials/nfcpayd.service")),
            ),
            (
                Path::new("/run/credentials/nfcpayd.service/../../../etc/nfcpay/hsm-pin"),
                credentials,
            ),
            (Path::new("/run/credentials/nfcpayd.service"), credentials),
            (Path::new("/etc/nfcpay/hsm-pin"), credentials),
        ] {
            assert!(
                pin_file_refusal(path, 0o100644, directory).is_some(),
                "{path:?} in {directory:?}"
            );
        }
    }

    fn error_of(text: &str) -> String {
        match text.parse::<Pkcs11Uri>() {
            Ok(uri) => panic!("{text:?} accepted as {uri:?}"),
            Err(error) => error.to_string(),
        }
    }

    #[test]
    fn parses_the_issue_example() {
        let uri: Pkcs11Uri = EXAMPLE.parse().unwrap();
        assert_eq!(uri.token(), Some("nfcpay"));
        assert_eq!(
            uri.require_module_path().unwrap(),
            Path::new("/usr/lib/softhsm/libsofthsm2.so")
        );
        assert_eq!(uri.pin_source(), Some(Path::new("/etc/nfcpay/pin")));
    }

    #[test]
    fn decodes_every_path_attribute() {
        let uri: Pkcs11Uri = "pkcs11:token=my%20token;manufacturer=SoftHSM%20project;\
             serial=abc;model=SoftHSM%20v2;slot-id=7;object=nfcpay-ca;id=%01%02%ff;type=private\
             ?module-name=softhsm2&pin-source=file:///run/pin"
            .parse()
            .unwrap();
        assert_eq!(uri.token(), Some("my token"));
        assert_eq!(uri.manufacturer(), Some("SoftHSM project"));
        assert_eq!(uri.serial(), Some("abc"));
        assert_eq!(uri.model(), Some("SoftHSM v2"));
        assert_eq!(uri.slot_id(), Some(7));
        assert_eq!(uri.object(), Some("nfcpay-ca"));
        assert_eq!(uri.id(), Some(&[1u8, 2, 0xff][..]));
        assert_eq!(uri.object_type(), Some(ObjectType::PrivateKey));
        assert_eq!(uri.pin_source(), Some(Path::new("/run/pin")));
    }

    #[test]
    fn refuses_a_missing_scheme() {
        assert!(error_of("token=nfcpay").contains("pkcs11:"));
        assert!(error_of("pkcs12:token=nfcpay").contains("pkcs11:"));
    }

    #[test]
    fn refuses_bad_percent_encoding() {
        for bad in ["pkcs11:token=a%2", "pkcs11:token=a%zz", "pkcs11:id=%"] {
            assert!(error_of(bad).contains("percent-encoding"), "{bad}");
        }
        assert!(error_of("pkcs11:token=%ff%fe").contains("UTF-8"));
    }

    #[test]
    fn refuses_unknown_and_repeated_attributes() {
        assert!(error_of("pkcs11:tokn=nfcpay").contains("unknown"));
        assert!(error_of("pkcs11:token=nfcpay?modul-path=/x.so").contains("unknown"));
        assert!(error_of("pkcs11:token=a;token=b").contains("repeated"));
        assert!(error_of("pkcs11:token").contains("no '='"));
        assert!(error_of("pkcs11:token=a;type=key").contains("type"));
        assert!(error_of("pkcs11:slot-id=x").contains("slot-id"));
    }

    #[test]
    fn refuses_pin_value_without_echoing_it() {
        let message = error_of("pkcs11:token=nfcpay?pin-value=123456");
        assert!(message.contains("pin-value is refused"), "{message}");
        assert!(!message.contains("123456"));
        assert!(error_of("pkcs11:token=nfcpay;pin-value=123456").contains("query attribute"));
    }

    #[test]
    fn refuses_pin_sources_other_than_absolute_files() {
        assert!(error_of("pkcs11:token=a?pin-source=env:PIN").contains("file:"));
        assert!(error_of("pkcs11:token=a?pin-source=file:pin").contains("absolute"));
    }

    #[test]
    fn requires_a_module_when_opening() {
        let uri: Pkcs11Uri = "pkcs11:token=nfcpay".parse().unwrap();
        let message = uri.require_module_path().unwrap_err().to_string();
        assert!(message.contains("module-path"), "{message}");
        let uri: Pkcs11Uri = "pkcs11:token=a?module-name=no-such-module-here"
            .parse()
            .unwrap();
        assert!(uri.require_module_path().is_err());
        assert!(error_of("pkcs11:token=a?module-path=relative.so").contains("absolute"));
    }

    #[test]
    fn refuses_an_empty_or_long_token() {
        assert!(error_of("pkcs11:token=").contains("empty"));
        assert!(error_of(&format!("pkcs11:token={}", "x".repeat(33))).contains("longer"));
        let uri: Pkcs11Uri = "pkcs11:object=x".parse().unwrap();
        assert!(uri.require_token().is_err());
    }

    #[test]
    fn reads_the_pin_without_one_trailing_newline() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("pin");
        let uri: Pkcs11Uri = format!("pkcs11:token=a?pin-source=file:{}", path.display())
            .parse()
            .unwrap();
        std::fs::write(&path, "1234\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(uri.read_pin().unwrap().expose_secret(), "1234");
        std::fs::write(&path, "1234 \n\n").unwrap();
        assert_eq!(uri.read_pin().unwrap().expose_secret(), "1234 \n");
        std::fs::write(&path, "\n").unwrap();
        assert!(uri.read_pin().is_err());
        std::fs::write(&path, "9".repeat(300)).unwrap();
        assert!(uri.read_pin().is_err());
        let no_source: Pkcs11Uri = "pkcs11:token=a".parse().unwrap();
        assert!(no_source.read_pin().is_err());
    }

    /// A PIN file its group or others can read is refused, naming the file and the mode, and
    /// never the PIN; the same file is read once only its owner can.
    #[test]
    fn a_pin_file_others_can_read_is_refused() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("pin");
        let uri: Pkcs11Uri = format!("pkcs11:token=a?pin-source=file:{}", path.display())
            .parse()
            .unwrap();
        std::fs::write(&path, "secret-4711\n").unwrap();
        for mode in [0o640, 0o604, 0o660, 0o606] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let error = uri.read_pin().expect_err("refused").to_string();
            assert!(error.contains(&path.display().to_string()), "{error}");
            assert!(error.contains(&format!("mode {mode:04o}")), "{error}");
            assert!(!error.contains("secret-4711"), "{error}");
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert_eq!(uri.read_pin().unwrap().expose_secret(), "secret-4711");
    }

    #[test]
    fn a_pin_file_that_cannot_be_read_keeps_the_os_error_as_its_cause() {
        use std::error::Error as _;
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("absent");
        let uri: Pkcs11Uri = format!("pkcs11:token=a?pin-source=file:{}", path.display())
            .parse()
            .unwrap();
        let error = uri.read_pin().unwrap_err();
        assert!(matches!(error, KeystoreError::Io { .. }), "{error}");
        assert_eq!(
            error.to_string(),
            format!("keystore file {}: reading the PIN file", path.display())
        );
        let cause = error
            .source()
            .and_then(|cause| cause.downcast_ref::<std::io::Error>());
        assert_eq!(
            cause.map(std::io::Error::kind),
            Some(std::io::ErrorKind::NotFound)
        );
        std::fs::write(&path, "").unwrap();
        let error = uri.read_pin().unwrap_err();
        assert!(error.source().is_none(), "{error}");
    }

    #[test]
    fn debug_shows_no_pin() {
        let uri: Pkcs11Uri = EXAMPLE.parse().unwrap();
        let shown = format!("{uri:?}");
        assert!(shown.contains("/etc/nfcpay/pin"));
        assert!(!shown.to_lowercase().contains("pin_value"));
    }
}
