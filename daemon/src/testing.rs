//! Test support (feature `testing`): the one rule for whether the PostgreSQL cases of a test
//! may be skipped, shared by this crate's tests and the workspace's end-to-end suite.
//!
//! Skipping is for a developer's machine only. Under `cargo xtask test`
//! ([`REQUIRE_POSTGRES_VARIABLE`]) or in CI (`CI`, set by every CI service) a test whose
//! PostgreSQL is missing fails: a test that passes when its database is missing proves nothing.

/// The environment variable naming the test PostgreSQL server (`cargo xtask test` sets it).
pub const DATABASE_URL_VARIABLE: &str = "NFCPAY_TEST_DATABASE_URL";

/// Set (to anything but empty, `0` or `false`) by `cargo xtask test`: a PostgreSQL test whose
/// database is missing fails instead of skipping.
pub const REQUIRE_POSTGRES_VARIABLE: &str = "NFCPAY_REQUIRE_POSTGRES";

/// Whether PostgreSQL tests must run: [`REQUIRE_POSTGRES_VARIABLE`] or `CI` is set to
/// something other than empty, `0` or `false`.
#[must_use]
pub fn postgres_required() -> bool {
    let set = |name: &str| {
        std::env::var(name)
            .is_ok_and(|value| !matches!(value.trim(), "" | "0" | "false" | "FALSE" | "False"))
    };
    set(REQUIRE_POSTGRES_VARIABLE) || set("CI")
}

/// The test PostgreSQL server's URL, or `None` (after a note naming `what` is skipped) where
/// PostgreSQL is optional.
///
/// # Panics
/// When the URL is not set but [`postgres_required`]: the test fails instead of passing.
#[must_use]
#[allow(clippy::panic)] // how a test fails
pub fn postgres_url(what: &str) -> Option<String> {
    if let Ok(url) = std::env::var(DATABASE_URL_VARIABLE) {
        return Some(url);
    }
    assert!(
        !postgres_required(),
        "{DATABASE_URL_VARIABLE} is not set, but PostgreSQL is required here \
         ({REQUIRE_POSTGRES_VARIABLE} or CI is set): refusing to skip {what}"
    );
    eprintln!("{DATABASE_URL_VARIABLE} not set: {what} skipped");
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_url_is_whatever_the_variable_names() {
        // Read-only: whichever way this process was started, the answer follows the
        // environment (and under `cargo xtask test` the URL is set).
        match std::env::var(DATABASE_URL_VARIABLE) {
            Ok(url) => assert_eq!(postgres_url("this check").as_deref(), Some(url.as_str())),
            Err(_) if postgres_required() => {
                assert!(std::panic::catch_unwind(|| postgres_url("this check")).is_err());
            }
            Err(_) => assert_eq!(postgres_url("this check"), None),
        }
    }
}
