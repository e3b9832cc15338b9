//! Running programs: always directly (never `sh -c`), always saying what runs.
//!
//! Secrets are passed to children through their environment or stdin, never as
//! arguments, so the printed command line never holds one.

use std::ffi::OsStr;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use anyhow::{Context, Result, bail};

/// Runs `command` with inherited stdio; fails unless it exits with status 0.
pub fn run(command: &mut Command) -> Result<()> {
    let line = describe(command);
    println!("$ {line}");
    let status = command
        .status()
        .with_context(|| format!("could not start `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

/// Runs `command` with `input` on its stdin and inherited stdout and stderr.
pub fn run_with_input(command: &mut Command, input: &[u8]) -> Result<()> {
    let line = describe(command);
    println!("$ {line}    (input on stdin)");
    let mut child = command
        .stdin(Stdio::piped())
        .spawn()
        .with_context(|| format!("could not start `{line}`"))?;
    let write_result = child
        .stdin
        .take()
        .context("child stdin was requested as piped")?
        .write_all(input);
    let status = child
        .wait()
        .with_context(|| format!("could not wait for `{line}`"))?;
    write_result.with_context(|| format!("could not write the input of `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

/// Runs `command` and returns its stdout; its stderr is passed through. Fails unless it
/// exits with status 0.
pub fn stdout_of(command: &mut Command) -> Result<String> {
    let line = describe(command);
    println!("$ {line}");
    let output = capture(command.stderr(Stdio::inherit()))?;
    if !output.status.success() {
        bail!("`{line}` failed ({})", output.status);
    }
    String::from_utf8(output.stdout).with_context(|| format!("`{line}` printed non-UTF-8"))
}

/// Runs `command` quietly and returns everything it produced, whatever its status.
pub fn capture(command: &mut Command) -> Result<Output> {
    command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start `{}`", describe(command)))
}

/// Whether `command` starts and exits with status 0, all output discarded.
pub fn succeeds(command: &mut Command) -> bool {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// The `cargo` that runs us (so `+toolchain` choices carry over), or `cargo`.
pub fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// Finds `program` in `PATH`.
pub fn find_in_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|directory| directory.join(program))
        .find(|candidate| candidate.is_file())
}

/// The command line as a shell user would type it (for display only). The toolchain's
/// cargo is shown as `cargo`.
pub fn describe(command: &Command) -> String {
    let program = command.get_program();
    let is_our_cargo = std::env::var_os("CARGO").is_some_and(|cargo| cargo == program);
    let program = if is_our_cargo {
        OsStr::new("cargo")
    } else {
        program
    };
    std::iter::once(program)
        .chain(command.get_args())
        .map(quote)
        .collect::<Vec<_>>()
        .join(" ")
}

fn quote(word: &OsStr) -> String {
    let word = word.to_string_lossy();
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if plain {
        word.into_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_quotes_only_what_needs_it() {
        let mut command = Command::new("pkcs11-tool");
        command.args(["--token-label", "nfcpay demo", "--pin", "env:PIN", "it's"]);
        assert_eq!(
            describe(&command),
            r"pkcs11-tool --token-label 'nfcpay demo' --pin env:PIN 'it'\''s'"
        );
    }

    #[test]
    fn describe_shows_the_toolchain_cargo_as_cargo() {
        let mut command = cargo();
        command.arg("build");
        assert_eq!(describe(&command), "cargo build");
    }

    #[test]
    fn describe_leaves_out_the_environment() {
        let mut command = Command::new("true");
        command.env("SECRET_PIN", "123456");
        assert_eq!(describe(&command), "true");
    }

    #[test]
    fn run_reports_a_failing_command() {
        let error = run(&mut Command::new("false")).expect_err("false exits 1");
        assert!(error.to_string().contains("`false` failed"), "{error}");
    }

    #[test]
    fn run_with_input_feeds_stdin() {
        let mut command = Command::new("grep");
        command.args(["-qx", "second"]);
        run_with_input(&mut command, b"first\nsecond\n").expect("grep finds the line");
        let mut command = Command::new("grep");
        command.args(["-qx", "third"]);
        assert!(run_with_input(&mut command, b"first\nsecond\n").is_err());
    }
}
