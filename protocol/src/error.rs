//! The error type of the protocol crate.

/// Why a value could not be parsed or a DUKPT step could not be taken.
///
/// Messages describe the input's shape, never its content beyond lengths and field names, so
/// they are safe to return to a peer and to log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// A field has the wrong number of bytes (or hex digits).
    #[error("{field}: expected {expected} bytes, got {actual}")]
    Length {
        /// Which field.
        field: &'static str,
        /// The length it must have.
        expected: usize,
        /// The length it had.
        actual: usize,
    },
    /// A field is not hexadecimal.
    #[error("{field}: not hexadecimal")]
    Hex {
        /// Which field.
        field: &'static str,
    },
    /// A field has the right shape but a value the protocol forbids.
    #[error("{field}: {reason}")]
    Invalid {
        /// Which field.
        field: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The DUKPT transaction counter has no valid value left: the terminal must be re-keyed.
    #[error(
        "DUKPT transaction counter exhausted: the terminal must be loaded with a new initial key"
    )]
    EndOfLife,
}
