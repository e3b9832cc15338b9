//! [`ErrorChain`]: the one way `nfcpayd`, `nfcpay-admin` and `nfcpay-agent` print an error with
//! its causes.
//!
//! Every error type in the workspace shows only its own context in `Display` and leaves its
//! cause to [`std::error::Error::source`] (never both), so walking the chain shows each cause
//! exactly once, as it is: nothing is filtered out, and a cause printed twice is a bug in the
//! error type that prints it, to be fixed there. This is a pure formatter (no I/O), which is
//! why it lives in the crate both binaries share.

use std::error::Error;
use std::fmt::{self, Write as _};

/// Displays an error and its causes on one line, joined by `": "`: `outer: cause: root`.
///
/// Each level's text is put on one line (runs of whitespace, line breaks included, become one
/// space; leading and trailing whitespace goes), since some causes span several lines (libpq's
/// messages) and a log line or an exit message must not.
///
/// ```
/// use nfcpay_protocol::ErrorChain;
///
/// let error = std::io::Error::other("disk full");
/// assert_eq!(ErrorChain(&error).to_string(), "disk full");
/// ```
#[derive(Clone, Copy)]
pub struct ErrorChain<'a>(pub &'a dyn Error);

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = OneLine {
            out: f,
            started: false,
            space: false,
        };
        write!(out, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            out.out.write_str(": ")?;
            out.started = false;
            out.space = false;
            write!(out, "{cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

impl fmt::Debug for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Writes through to `out` with each run of whitespace made one space, and none at either end
/// of what one level writes (however many `write_str` calls its `Display` makes).
struct OneLine<'a, 'b> {
    out: &'a mut fmt::Formatter<'b>,
    /// Whether this level has written a word yet.
    started: bool,
    /// Whether whitespace came after the last word written.
    space: bool,
}

impl fmt::Write for OneLine<'_, '_> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        let mut pieces = text.split(char::is_whitespace).peekable();
        while let Some(piece) = pieces.next() {
            if !piece.is_empty() {
                if self.space && self.started {
                    self.out.write_char(' ')?;
                }
                self.out.write_str(piece)?;
                self.started = true;
                self.space = false;
            }
            if pieces.peek().is_some() {
                self.space = true;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A test error: its own text and an optional cause.
    #[derive(Debug)]
    struct Level {
        text: &'static str,
        cause: Option<Box<Level>>,
    }

    impl fmt::Display for Level {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.text)
        }
    }

    impl Error for Level {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            self.cause
                .as_deref()
                .map(|cause| cause as &(dyn Error + 'static))
        }
    }

    fn chain(texts: &[&'static str]) -> Level {
        let mut levels = texts.iter().rev().copied();
        let Some(root) = levels.next() else {
            panic!("a chain needs at least one level")
        };
        let mut error = Level {
            text: root,
            cause: None,
        };
        for text in levels {
            error = Level {
                text,
                cause: Some(Box::new(error)),
            };
        }
        error
    }

    #[test]
    fn each_level_is_printed_once_outer_first() {
        let error = chain(&[
            "keystore",
            "cannot load PKCS#11 module /m.so",
            "no such file",
        ]);
        assert_eq!(
            ErrorChain(&error).to_string(),
            "keystore: cannot load PKCS#11 module /m.so: no such file"
        );
        assert_eq!(ErrorChain(&chain(&["alone"])).to_string(), "alone");
    }

    #[test]
    fn a_cause_the_outer_message_repeats_is_printed_again() {
        // The fix for a message that repeats its cause belongs to that error type: the chain
        // hides nothing.
        let error = chain(&["database: disk full", "disk full"]);
        assert_eq!(
            ErrorChain(&error).to_string(),
            "database: disk full: disk full"
        );
    }

    #[test]
    fn each_level_is_put_on_one_line() {
        let error = chain(&[
            "  could not connect\n",
            "connection refused\n\tIs the server running on host \"127.0.0.1\"?\n",
        ]);
        assert_eq!(
            ErrorChain(&error).to_string(),
            "could not connect: connection refused Is the server running on host \"127.0.0.1\"?"
        );
        // Whitespace split across a level's writes is one space too.
        struct Pieces;
        impl fmt::Display for Pieces {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a \n")?;
                f.write_str("  b")?;
                f.write_str(" ")
            }
        }
        impl fmt::Debug for Pieces {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("Pieces")
            }
        }
        impl Error for Pieces {}
        assert_eq!(ErrorChain(&Pieces).to_string(), "a b");
    }
}
