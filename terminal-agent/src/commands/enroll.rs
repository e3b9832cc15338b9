//! `nfcpay-agent enroll`: enrolls the terminal with a one-time code (the protocol is
//! [`crate::enroll`]'s), records its account, and prints its ID and the loaded key's KCV.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use nfcpay_keystore::atomic_file::{self, AtomicWriteError};
use nfcpay_protocol::{AccountId, TerminalId};
use zeroize::Zeroizing;

use super::shared::{AgentError, CODE_BYTES_MAX, TerminalPlace, line, read_file};
use crate::enroll::{self, EnrollmentTarget, TERMINAL_FILE, Terminal};

/// Enrollment inputs.
pub struct EnrollOptions {
    /// `host:port` of the platform's terminal listener (where halves go).
    pub platform: String,
    /// `host:port` of its enrollment listener, when it has one of its own.
    pub enroll_address: Option<String>,
    /// The name on the platform's certificate.
    pub server_name: String,
    /// The platform CA certificate file (PEM).
    pub ca_file: PathBuf,
    /// The terminal ID the operator registered.
    pub terminal_id: TerminalId,
    /// The one-time enrollment code.
    pub code: Zeroizing<String>,
    /// The account this terminal's halves name.
    pub account: Option<AccountId>,
}

/// Enrolls the terminal and records its account; prints its ID and the loaded key's KCV.
pub async fn run(
    place: &TerminalPlace,
    options: EnrollOptions,
    out: &mut dyn Write,
) -> Result<(), AgentError> {
    let ca_pem = read_file(
        &options.ca_file,
        64 * 1024,
        "read the platform CA certificate",
    )?;
    let choice = place.keystore()?;
    let store = place.open_store()?;
    let target = EnrollmentTarget {
        address: &options.platform,
        enroll_address: options
            .enroll_address
            .as_deref()
            .unwrap_or(&options.platform),
        server_name: &options.server_name,
        ca_pem: &ca_pem,
    };
    let mut terminal = enroll::enroll(
        store,
        &place.dir,
        &target,
        &options.terminal_id,
        &options.code,
    )
    .await?;
    terminal.file.account_id = account(terminal.file.account_id.take(), options.account.as_ref());
    write_terminal_file(&place.dir, &terminal)?;
    place.remember_keystore(&choice)?;
    let status = terminal.keys.status();
    line(
        out,
        format_args!("enrolled terminal {}", terminal.terminal_id),
    )?;
    line(
        out,
        format_args!("  terminal ID:       {}", terminal.terminal_id),
    )?;
    if let Some(account) = &terminal.file.account_id {
        line(out, format_args!("  account:           {account}"))?;
    }
    line(
        out,
        format_args!("  platform:          {}", terminal.file.platform_address),
    )?;
    line(
        out,
        format_args!("  initial key ID:    {}", status.initial_key_id),
    )?;
    line(
        out,
        format_args!("  initial key KCV:   {}", terminal.file.initial_key_kcv),
    )?;
    line(
        out,
        format_args!("  directory:         {}", place.dir.display()),
    )?;
    Ok(())
}

fn write_terminal_file(dir: &Path, terminal: &Terminal) -> Result<(), AgentError> {
    let path = dir.join(TERMINAL_FILE);
    let json = serde_json::to_vec_pretty(&terminal.file)
        .map_err(|error| AgentError::internal_caused("terminal file", error))?;
    atomic_file::write_atomically(&path, &json, atomic_file::PUBLIC_FILE_MODE).map_err(|error| {
        let source = match error {
            AtomicWriteError::Save(source) | AtomicWriteError::SyncDirectory(source) => source,
            other => std::io::Error::other(other),
        };
        AgentError::File {
            path,
            action: "write",
            source,
        }
    })
}

/// Reads an enrollment code (one line, trimmed) from a file or stdin, in a zeroized buffer.
pub fn read_code(from: Option<&Path>) -> Result<Zeroizing<String>, AgentError> {
    let mut raw = Zeroizing::new(Vec::with_capacity(CODE_BYTES_MAX + 1));
    let limit = (CODE_BYTES_MAX + 1) as u64;
    let (path, result) = match from {
        Some(path) => (
            path.to_owned(),
            std::fs::File::open(path).and_then(|file| file.take(limit).read_to_end(&mut raw)),
        ),
        None => (
            PathBuf::from("(stdin)"),
            std::io::stdin().lock().take(limit).read_to_end(&mut raw),
        ),
    };
    result.map_err(|source| AgentError::File {
        path: path.clone(),
        action: "read the enrollment code",
        source,
    })?;
    if raw.len() > CODE_BYTES_MAX {
        return Err(AgentError::Usage(format!(
            "{}: an enrollment code is at most {CODE_BYTES_MAX} bytes",
            path.display()
        )));
    }
    let text = std::str::from_utf8(&raw).map_err(|_| {
        AgentError::Usage(format!(
            "{}: the enrollment code is not text",
            path.display()
        ))
    })?;
    let code = Zeroizing::new(text.trim().to_owned());
    if code.is_empty() {
        return Err(AgentError::Usage(format!(
            "{}: no enrollment code in it",
            path.display()
        )));
    }
    Ok(code)
}

/// The terminal's account: the platform's (from the enrollment answer) wins over `--account`,
/// which is checked against it; an older platform says none, and then `--account` is used.
fn account(platform: Option<String>, given: Option<&AccountId>) -> Option<String> {
    match (platform, given) {
        (Some(platform), Some(given)) if given.as_str() != platform => {
            tracing::warn!(
                "--account {given} is not the account the platform registered this terminal \
                 for; using the platform's: {platform}"
            );
            Some(platform)
        }
        (Some(platform), _) => Some(platform),
        (None, Some(given)) => Some(given.to_string()),
        (None, None) => {
            tracing::warn!(
                "the platform did not say this terminal's account (an older platform) and no \
                 --account was given: its payments will be refused until terminal.json names one"
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_platforms_account_wins_and_an_older_platforms_silence_takes_the_flag() {
        let shop: AccountId = "shop".parse().unwrap();
        let other: AccountId = "other".parse().unwrap();
        assert_eq!(account(Some("shop".into()), None).as_deref(), Some("shop"));
        assert_eq!(
            account(Some("shop".into()), Some(&shop)).as_deref(),
            Some("shop")
        );
        assert_eq!(
            account(Some("shop".into()), Some(&other)).as_deref(),
            Some("shop")
        );
        assert_eq!(account(None, Some(&other)).as_deref(), Some("other"));
        assert_eq!(account(None, None), None);
    }

    #[test]
    fn codes_are_read_trimmed_and_bounded() {
        let dir = tempfile::tempdir().unwrap_or_else(|error| panic!("{error}"));
        let path = dir.path().join("code");
        std::fs::write(&path, "ABCD-1234\n").unwrap_or_else(|error| panic!("{error}"));
        assert_eq!(
            read_code(Some(&path)).map(|code| code.to_string()).ok(),
            Some("ABCD-1234".into())
        );
        std::fs::write(&path, "\n").unwrap_or_else(|error| panic!("{error}"));
        assert!(matches!(read_code(Some(&path)), Err(AgentError::Usage(_))));
        std::fs::write(&path, "A".repeat(CODE_BYTES_MAX + 1))
            .unwrap_or_else(|error| panic!("{error}"));
        assert!(matches!(read_code(Some(&path)), Err(AgentError::Usage(_))));
    }
}
