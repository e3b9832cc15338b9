//! The HSM's readiness canary, bounded in time and made by one probe at a time.
//!
//! `/readyz` asks the keystore for its canary (`Keystore::check_health`: a session, a
//! derivation from each BDK in use, a signature by each key pair in use). On a stalled HSM
//! that call may not return for a long time, or ever. So it runs on a thread of its own, and
//! a readiness check waits for it at most [`HSM_HEALTH_TIMEOUT`] from the probe's start;
//! checks that arrive while a probe is out share it instead of starting another (at most one
//! thread is ever held by a stalled canary), and once the deadline has passed they are
//! answered at once: `hsm: check took over N ms`.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use nfcpay_keystore::Keystore;
use nfcpay_protocol::ErrorChain;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::server::NotReady;

/// How long a readiness check waits for the HSM's canary: like the database's
/// (`storage::HEALTH_TIMEOUT`), within the ops listener's `READY_TIMEOUT_MS`, and the two run
/// side by side, so that the answer names the component that is slow.
pub const HSM_HEALTH_TIMEOUT: Duration = Duration::from_millis(1_500);

/// A canary's answer, once there is one.
type ProbeAnswer = Option<Result<(), NotReady>>;

/// The canary probe now out, if any: when it started and where its answer will be.
type Running = Option<(Instant, watch::Receiver<ProbeAnswer>)>;

/// At most one canary at a time, waited for at most a deadline.
#[derive(Debug)]
pub(super) struct HsmProbe {
    running: Arc<Mutex<Running>>,
    timeout: Duration,
}

impl HsmProbe {
    pub(super) fn new(timeout: Duration) -> Self {
        Self {
            running: Arc::new(Mutex::new(None)),
            timeout,
        }
    }

    /// The canary's answer: from the probe now out, or from one started now; `Err` naming
    /// the deadline if it has not answered within [`Self::timeout`] of its start.
    pub(super) async fn check(&self, keystore: &Arc<dyn Keystore>) -> Result<(), NotReady> {
        let (started, mut answer) = {
            // Only whole values are stored: a poisoned lock still holds a valid one.
            let mut running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
            match running.as_ref() {
                Some((started, answer)) => (*started, answer.clone()),
                None => {
                    let started = Instant::now();
                    let answer = self.start(keystore)?;
                    *running = Some((started, answer.clone()));
                    (started, answer)
                }
            }
        };
        let waited =
            tokio::time::timeout_at(started + self.timeout, answer.wait_for(Option::is_some)).await;
        match waited {
            Ok(Ok(answered)) => answered.clone().unwrap_or_else(|| Err(unfinished())),
            // The probe's thread ended without an answer (it panicked).
            Ok(Err(_)) => Err(unfinished()),
            Err(_) => Err(NotReady {
                component: "hsm",
                reason: format!("check took over {} ms", self.timeout.as_millis()),
            }),
        }
    }

    /// Starts a probe on a thread of its own; the caller records it as running (under the
    /// lock, so the thread's clearing comes after).
    fn start(
        &self,
        keystore: &Arc<dyn Keystore>,
    ) -> Result<watch::Receiver<ProbeAnswer>, NotReady> {
        let (reply, answer) = watch::channel(None);
        let done = ProbeDone {
            running: Arc::clone(&self.running),
        };
        let keystore = Arc::clone(keystore);
        std::thread::Builder::new()
            .name("nfcpay-hsm-health".into())
            .spawn(move || {
                let checked = keystore.check_health().map_err(|error| NotReady {
                    component: "hsm",
                    reason: ErrorChain(&error).to_string(),
                });
                // The next check starts a new probe (also when this one panics: `done` is
                // dropped then too), not one that has answered already.
                drop(done);
                // Nobody may be waiting any more: then the answer is dropped.
                let _ = reply.send(Some(checked));
            })
            .map_err(|error| NotReady {
                component: "hsm",
                reason: format!("no thread for the check: {error}"),
            })?;
        Ok(answer)
    }
}

/// Clears the running probe when its thread ends.
struct ProbeDone {
    running: Arc<Mutex<Running>>,
}

impl Drop for ProbeDone {
    fn drop(&mut self) {
        *self.running.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }
}

fn unfinished() -> NotReady {
    NotReady {
        component: "hsm",
        reason: "the check did not finish".into(),
    }
}

#[cfg(test)]
mod tests {
    // A panic is how a test fails.
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use nfcpay_keystore::software::SoftwareKeystore;
    use nfcpay_keystore::testing::{FailingKeystore, Fault};

    use super::*;

    fn faulty() -> (Arc<FailingKeystore>, Arc<dyn Keystore>) {
        let failing = Arc::new(FailingKeystore::new(
            Arc::new(SoftwareKeystore::in_memory()),
            usize::MAX,
        ));
        let keystore: Arc<dyn Keystore> = failing.clone();
        (failing, keystore)
    }

    /// Waits (on the real clock: the probe is a thread) until no probe is out.
    async fn until_idle(probe: &HsmProbe) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while probe.running.lock().unwrap().is_some() {
            assert!(
                std::time::Instant::now() < deadline,
                "the probe never ended"
            );
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn a_working_hsm_is_ready_and_a_failing_one_says_why() {
        let (failing, keystore) = faulty();
        let probe = HsmProbe::new(HSM_HEALTH_TIMEOUT);
        probe.check(&keystore).await.unwrap();
        failing.fault_health_checks(Some(Fault::Fail));
        until_idle(&probe).await;
        let not_ready = probe.check(&keystore).await.unwrap_err();
        assert_eq!(not_ready.component, "hsm");
        assert!(not_ready.reason.contains("CKR_DEVICE_ERROR"), "{not_ready}");
    }

    /// A canary that panics is not ready, and the next check starts a new probe.
    #[tokio::test]
    async fn a_panicking_canary_is_not_ready_and_does_not_stay_running() {
        let (failing, keystore) = faulty();
        let probe = HsmProbe::new(HSM_HEALTH_TIMEOUT);
        failing.fault_health_checks(Some(Fault::Panic));
        let not_ready = probe.check(&keystore).await.unwrap_err();
        assert_eq!(not_ready.reason, "the check did not finish");
        failing.fault_health_checks(None);
        until_idle(&probe).await;
        probe.check(&keystore).await.unwrap();
        assert_eq!(failing.health_calls(), 2);
    }

    /// A stalled canary answers "check took over N ms" at the deadline (paused time: no wait),
    /// shared by concurrent checks; a check while it is still out gets that answer at once
    /// and starts no second probe; once the HSM answers, the next check is ready again.
    #[tokio::test(start_paused = true)]
    async fn a_stalled_canary_is_not_ready_at_its_deadline_and_is_made_once() {
        let (failing, keystore) = faulty();
        let probe = HsmProbe::new(HSM_HEALTH_TIMEOUT);
        failing.fault_health_checks(Some(Fault::Stall));
        let (first, second, third) = tokio::join!(
            probe.check(&keystore),
            probe.check(&keystore),
            probe.check(&keystore)
        );
        for answer in [first, second, third] {
            let not_ready = answer.unwrap_err();
            assert_eq!(not_ready.component, "hsm");
            assert_eq!(not_ready.reason, "check took over 1500 ms");
        }
        let later = probe.check(&keystore).await.unwrap_err();
        assert_eq!(later.reason, "check took over 1500 ms");
        assert!(
            failing.health_calls() <= 1,
            "a second canary while one was out"
        );

        // The probe's thread runs on the real clock: so does the rest.
        tokio::time::resume();
        failing.fault_health_checks(None);
        until_idle(&probe).await;
        probe.check(&keystore).await.unwrap();
        assert_eq!(failing.health_calls(), 2);
    }
}
