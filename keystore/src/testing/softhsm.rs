//! A throwaway SoftHSM2 directory for tests: `softhsm2.conf`, its tokens (made by
//! `softhsm-setup/init-token`, as an operator makes them) and a PIN file that opens each of
//! them, all in a temporary directory removed on drop.
//!
//! SoftHSM2 reads `SOFTHSM2_CONF` when the PKCS#11 module initialises and sees only the
//! tokens that exist then: a test binary that opens stores itself sets the variable
//! ([`SoftHsmDir::set_conf_variable`]) before any other thread exists, and makes all its
//! tokens before it opens the first store; one that runs a binary gives it
//! [`SoftHsmDir::conf`] instead.
//!
//! A broken fixture is a failed test, so these functions panic with the reason instead of
//! returning an error every caller would unwrap.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::uri::Pkcs11Uri;

/// SoftHSM2's PKCS#11 module where Debian installs it.
pub const SOFTHSM2_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// The security officer's PIN of every token made here (never used after the token exists).
const SO_PIN: &str = "testing-so-pin";

/// The PIN file's name in the directory.
const PIN_FILE_NAME: &str = "pin";

/// A temporary SoftHSM2 directory whose tokens all take one user PIN; removed on drop.
pub struct SoftHsmDir {
    dir: tempfile::TempDir,
    pin: String,
}

impl SoftHsmDir {
    /// A fresh directory, no token yet, with `pin` in a PIN file (mode 0600: the keystore
    /// refuses a PIN file its group or others can read).
    #[allow(clippy::expect_used)] // A broken fixture fails the test (module doc).
    pub fn new(pin: &str) -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let pin_file = dir.path().join(PIN_FILE_NAME);
        std::fs::write(&pin_file, pin).expect("the PIN file is written");
        std::fs::set_permissions(
            &pin_file,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .expect("the PIN file's mode is set");
        Self {
            dir,
            pin: pin.to_owned(),
        }
    }

    /// A fresh directory with a token for each of `labels`, all made before this process's
    /// `SOFTHSM2_CONF` points at it ([`Self::set_conf_variable`]).
    ///
    /// # Safety
    ///
    /// As [`Self::set_conf_variable`].
    #[allow(unsafe_code)]
    pub unsafe fn for_this_process(pin: &str, labels: &[&str]) -> Self {
        let hsm = Self::new(pin);
        for label in labels {
            hsm.make_token(label);
        }
        // SAFETY: forwarded to the caller.
        unsafe { hsm.set_conf_variable() };
        hsm
    }

    /// Points `SOFTHSM2_CONF` of this process at this directory, for the PKCS#11 module to
    /// read when it initialises.
    ///
    /// # Safety
    ///
    /// As [`std::env::set_var`]: no other thread may read or write the environment meanwhile
    /// (call it from `main` before any other thread exists).
    #[allow(unsafe_code)]
    pub unsafe fn set_conf_variable(&self) {
        // SAFETY: the caller guarantees that no other thread touches the environment.
        unsafe { std::env::set_var("SOFTHSM2_CONF", self.conf()) };
    }

    /// The directory; a test may keep files of its own in it.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The `SOFTHSM2_CONF` that finds this directory's tokens.
    pub fn conf(&self) -> PathBuf {
        self.path().join("softhsm2.conf")
    }

    /// The file that holds the PIN (for a `pin-source=file:` URI a test writes itself).
    pub fn pin_file(&self) -> PathBuf {
        self.path().join(PIN_FILE_NAME)
    }

    /// Makes the token `label` with `softhsm-setup/init-token` (idempotent).
    #[allow(clippy::expect_used, clippy::panic)] // A broken fixture fails the test (module doc).
    pub fn make_token(&self, label: &str) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../softhsm-setup/init-token");
        let output = Command::new(script)
            .arg("--dir")
            .arg(self.path())
            .args(["--label", label, "--pin", &self.pin, "--so-pin", SO_PIN])
            .output()
            .expect(
                "softhsm-setup/init-token runs (is softhsm2 installed? `cargo xtask test` installs it)",
            );
        assert!(
            output.status.success(),
            "init-token failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// What OpenSC's `pkcs11-tool --list-objects` shows of the token `label`, logged in: the
    /// view of a tool that is not ours, for checking key attributes.
    #[allow(clippy::expect_used)] // A broken fixture fails the test (module doc).
    pub fn list_objects(&self, label: &str) -> String {
        let output = Command::new("pkcs11-tool")
            .args(["--module", SOFTHSM2_MODULE, "--token-label", label])
            .args(["--login", "--pin", &self.pin, "--list-objects"])
            .env("SOFTHSM2_CONF", self.conf())
            .output()
            .expect("pkcs11-tool runs (`cargo xtask test` installs opensc)");
        assert!(
            output.status.success(),
            "pkcs11-tool --list-objects failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// The URI of the token `label` through SoftHSM2's module, its PIN from the PIN file.
    pub fn uri(&self, label: &str) -> Pkcs11Uri {
        token_uri(self.path(), label, SOFTHSM2_MODULE)
    }
}

/// The URI of the token `label` of the SoftHSM2 directory `dir` (a [`SoftHsmDir::path`])
/// through `module`, its PIN from the directory's PIN file; for a test that keeps only the
/// path (in a `static`, say) or reaches SoftHSM2 through another module (p11-kit's proxy).
#[allow(clippy::expect_used)] // A broken fixture fails the test (module doc).
pub fn token_uri(dir: &Path, label: &str, module: &str) -> Pkcs11Uri {
    format!(
        "pkcs11:token={label}?module-path={module}&pin-source=file:{}",
        dir.join(PIN_FILE_NAME).display()
    )
    .parse()
    .expect("a valid test URI: printable label, absolute paths")
}
