//! Delivering a sealed half: the same bytes sent again, with bounded backoff, until the
//! platform gives a final answer (docs/protocol.md §8, "`unavailable` and money").
//!
//! The platform answers a byte-identical re-send of a half it has recorded with the receipt of
//! the payment as it stands, and processes one it never recorded; so sending the *same bytes*
//! again is always safe, and never costs a new KSN. What counts as an answer:
//!
//! | outcome of one attempt | [`Transience`] | what the caller does |
//! | --- | --- | --- |
//! | `200`/`202` with a receipt | — | final: verify it, forget the stored half |
//! | connection lost, TLS failed, no answer in time | `Retry` | wait, send the same bytes again |
//! | `408`, `429`, `5xx` (`unavailable` is `503`) | `Retry` (after `Retry-After`, at most [`RETRY_AFTER_MAX`]) | as above |
//! | any other `4xx` (a definitive refusal) | `Final` | forget the stored half, report the refusal |
//! | an answer that is not the protocol's, a configuration error | `Stop` | keep the half, report |
//!
//! Waits between attempts: [`BACKOFF_FIRST`] doubling up to [`BACKOFF_MAX`], or the
//! platform's `Retry-After` when it gave one (capped at [`RETRY_AFTER_MAX`]); at most
//! [`Attempts::MAX`] attempts in all.

use std::time::Duration;

use nfcpay_protocol::messages::HalfKind;

pub use crate::platform::RETRY_AFTER_MAX;
use crate::platform::{HalfReply, PlatformClient, PlatformError};

/// Wait after the first failed attempt.
pub const BACKOFF_FIRST: Duration = Duration::from_millis(250);
/// Longest wait between two attempts of our own backoff.
pub const BACKOFF_MAX: Duration = Duration::from_secs(4);

/// How many times a half is sent at most in one run (the first send included): 1 to
/// [`Attempts::MAX`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempts(u32);

impl Attempts {
    /// The most a command sends one half in one run.
    pub const MAX: u32 = 10;
    /// The default: 5 attempts, 3.75 s of backoff in all without `Retry-After`.
    pub const DEFAULT: Self = Self(5);

    /// The number.
    pub fn get(self) -> u32 {
        self.0
    }
}

impl TryFrom<u32> for Attempts {
    type Error = String;

    fn try_from(count: u32) -> Result<Self, String> {
        if (1..=Self::MAX).contains(&count) {
            Ok(Self(count))
        } else {
            Err(format!("attempts must be 1 to {}, not {count}", Self::MAX))
        }
    }
}

/// Whether a failed attempt is worth repeating with the same bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transience {
    /// A fault on the way or at the platform: the same bytes may get an answer later.
    Retry,
    /// A definitive refusal: the platform has decided about these bytes.
    Final,
    /// Neither: something is wrong on this side (configuration, an answer the protocol does
    /// not have); keep the half, do not insist.
    Stop,
}

impl Transience {
    /// What it means for a half whose last attempt ended so.
    fn verdict(self) -> &'static str {
        match self {
            Self::Retry => "no answer",
            Self::Final => "refused",
            Self::Stop => "stopped",
        }
    }
}

/// Classifies a failed attempt (see the module table).
pub fn transience(error: &PlatformError) -> Transience {
    match error {
        PlatformError::Connection { .. } | PlatformError::Timeout => Transience::Retry,
        PlatformError::Refused(problem) => match problem.status {
            408 | 429 | 500..=599 => Transience::Retry,
            400..=499 => Transience::Final,
            // A refusal with a status that is no error (a redirect, say) is not the protocol's.
            _ => Transience::Stop,
        },
        PlatformError::Answer(_) | PlatformError::Configuration { .. } => Transience::Stop,
    }
}

/// The wait after failed attempt number `attempt` (1 for the first): the platform's
/// `Retry-After` when given (already capped at [`RETRY_AFTER_MAX`]), else [`BACKOFF_FIRST`]
/// doubled per attempt, at most [`BACKOFF_MAX`].
pub fn backoff(attempt: u32, retry_after: Option<Duration>) -> Duration {
    if let Some(asked) = retry_after {
        return asked.min(RETRY_AFTER_MAX);
    }
    let doublings = attempt.saturating_sub(1).min(16);
    BACKOFF_FIRST
        .saturating_mul(1u32 << doublings)
        .min(BACKOFF_MAX)
}

/// Why a half got no receipt after its attempts.
#[derive(Debug, thiserror::Error)]
#[error("{} after {attempts} attempt(s)", .transience.verdict())]
pub struct Undelivered {
    /// The last attempt's error.
    #[source]
    pub error: PlatformError,
    /// What it means: `Final` (a definitive refusal), or not (the half must be kept).
    pub transience: Transience,
    /// How many attempts were made.
    pub attempts: u32,
}

/// What the commands give [`deliver`] as `on_retry`: one `warn` line per re-send.
pub fn log_retry(attempt: u32, error: &PlatformError, pause: Duration) {
    tracing::warn!(
        attempt,
        error = %nfcpay_protocol::ErrorChain(error),
        pause_ms = pause.as_millis(),
        "half not answered; sending the same bytes again"
    );
}

/// Sends `envelope` as half `kind` until it gets a receipt or a final refusal, at most
/// `attempts` times; `on_retry(attempt, error, wait)` is told about each failed attempt
/// before the wait.
pub async fn deliver(
    platform: &PlatformClient,
    kind: HalfKind,
    envelope: &[u8],
    wait: Duration,
    attempts: Attempts,
    on_retry: &mut dyn FnMut(u32, &PlatformError, Duration),
) -> Result<HalfReply, Undelivered> {
    let mut attempt = 1;
    loop {
        let failure = match platform
            .submit_half_once(kind, envelope.to_vec(), wait)
            .await
        {
            Ok(reply) => return Ok(reply),
            Err(failure) => failure,
        };
        let transience = transience(&failure.error);
        if transience != Transience::Retry || attempt >= attempts.get() {
            return Err(Undelivered {
                error: failure.error,
                transience,
                attempts: attempt,
            });
        }
        let pause = backoff(attempt, failure.retry_after);
        on_retry(attempt, &failure.error, pause);
        tokio::time::sleep(pause).await;
        attempt += 1;
    }
}

#[cfg(test)]
mod tests {
    use nfcpay_protocol::api::ProblemCode;

    use super::*;
    use crate::platform::Problem;

    fn refused(code: ProblemCode) -> PlatformError {
        PlatformError::Refused(Problem::new(code, "detail"))
    }

    #[test]
    fn faults_are_retried_and_refusals_are_final() {
        assert_eq!(
            transience(&PlatformError::Connection {
                step: "HTTP",
                source: "reset".into(),
            }),
            Transience::Retry
        );
        assert_eq!(transience(&PlatformError::Timeout), Transience::Retry);
        for code in [
            ProblemCode::Unavailable,
            ProblemCode::RateLimited,
            ProblemCode::Timeout,
            ProblemCode::Internal,
        ] {
            assert_eq!(transience(&refused(code)), Transience::Retry, "{code:?}");
        }
        for code in [
            ProblemCode::AuthenticationFailed,
            ProblemCode::ReplayedKsn,
            ProblemCode::Expired,
            ProblemCode::TerminalSuspended,
            ProblemCode::Conflict,
            ProblemCode::InsufficientFunds,
        ] {
            assert_eq!(transience(&refused(code)), Transience::Final, "{code:?}");
        }
        let mut odd = Problem::new(ProblemCode::Internal, "");
        odd.status = 302;
        assert_eq!(transience(&PlatformError::Refused(odd)), Transience::Stop);
        assert_eq!(
            transience(&PlatformError::Answer("status 204".into())),
            Transience::Stop
        );
    }

    #[test]
    fn backoff_doubles_to_its_bound_and_honours_a_bounded_retry_after() {
        assert_eq!(backoff(1, None), Duration::from_millis(250));
        assert_eq!(backoff(2, None), Duration::from_millis(500));
        assert_eq!(backoff(4, None), Duration::from_secs(2));
        assert_eq!(backoff(5, None), BACKOFF_MAX);
        assert_eq!(backoff(u32::MAX, None), BACKOFF_MAX);
        assert_eq!(backoff(0, None), BACKOFF_FIRST);
        assert_eq!(
            backoff(1, Some(Duration::from_secs(1))),
            Duration::from_secs(1)
        );
        assert_eq!(backoff(9, Some(Duration::from_secs(3600))), RETRY_AFTER_MAX);
    }

    #[test]
    fn attempts_are_bounded() {
        assert_eq!(Attempts::try_from(1).map(Attempts::get), Ok(1));
        assert_eq!(
            Attempts::try_from(Attempts::MAX).map(Attempts::get),
            Ok(Attempts::MAX)
        );
        assert!(Attempts::try_from(0).is_err());
        assert!(Attempts::try_from(Attempts::MAX + 1).is_err());
    }
}
