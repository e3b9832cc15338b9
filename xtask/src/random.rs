//! Random secrets for throwaway tokens and databases, from the kernel's CSPRNG.

use std::fmt::Write as _;
use std::io::Read;

use anyhow::{Context, Result};

/// `bytes` random bytes from `/dev/urandom`, as lower-case hex.
pub fn hex(bytes: usize) -> Result<String> {
    let mut buffer = vec![0_u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut urandom| urandom.read_exact(&mut buffer))
        .context("could not read /dev/urandom")?;
    Ok(buffer.iter().fold(String::new(), |mut text, byte| {
        // Writing to a String cannot fail.
        let _ = write!(text, "{byte:02x}");
        text
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_has_the_length_and_alphabet_and_varies() {
        let first = hex(16).expect("urandom is readable");
        assert_eq!(first.len(), 32);
        assert!(
            first
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_ne!(first, hex(16).expect("urandom is readable"));
    }
}
