//! An in-memory NFC-DEP link: [`pair`] gives an initiator and a target joined by channels, for
//! tests of everything above the reader (framing, timeouts, a peer that goes away).
//!
//! It behaves like the libnfc links where the tests look: an exchange waits for the target's
//! answer, the 262-byte guard applies in both directions, dropping one end is the other
//! terminal being taken away ([`LinkLoss::Closed`]), and [`DepInitiator::release`] ends the
//! target's wait with [`LinkLoss::Released`].

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::time::Duration;

use super::{DepInitiator, DepTarget, LinkLoss, NfcError, check_exchange};

/// What the initiator puts on the air.
#[derive(Debug)]
enum ToTarget {
    Frame(Vec<u8>),
    Release,
}

/// The initiator's end of an in-memory link.
#[derive(Debug)]
pub struct MemoryInitiator {
    requests: SyncSender<ToTarget>,
    answers: Receiver<Vec<u8>>,
    released: bool,
}

/// The target's end of an in-memory link.
#[derive(Debug)]
pub struct MemoryTarget {
    requests: Receiver<ToTarget>,
    answers: SyncSender<Vec<u8>>,
    /// Whether a frame has been received and not answered yet.
    owes_answer: bool,
}

/// A connected initiator and target. Either may move to another thread.
pub fn pair() -> (MemoryInitiator, MemoryTarget) {
    // One frame in flight each way is all NFC-DEP allows; one more slot lets a target answer
    // an exchange its initiator gave up on without blocking.
    let (request_sender, request_receiver) = mpsc::sync_channel(2);
    let (answer_sender, answer_receiver) = mpsc::sync_channel(2);
    (
        MemoryInitiator {
            requests: request_sender,
            answers: answer_receiver,
            released: false,
        },
        MemoryTarget {
            requests: request_receiver,
            answers: answer_sender,
            owes_answer: false,
        },
    )
}

impl DepInitiator for MemoryInitiator {
    fn exchange(&mut self, frame: &[u8], timeout: Duration) -> Result<Vec<u8>, NfcError> {
        check_exchange(frame)?;
        if self.released {
            return Err(NfcError::LinkLost(LinkLoss::Released));
        }
        // An answer to an exchange given up on earlier is stale: a real reader drops it.
        while self.answers.try_recv().is_ok() {}
        self.requests
            .send(ToTarget::Frame(frame.to_vec()))
            .map_err(|_| NfcError::LinkLost(LinkLoss::Closed))?;
        match self.answers.recv_timeout(timeout) {
            Ok(answer) => check_exchange(&answer).map(<[u8]>::to_vec),
            Err(RecvTimeoutError::Timeout) => Err(NfcError::ExchangeTimeout { waited: timeout }),
            Err(RecvTimeoutError::Disconnected) => Err(NfcError::LinkLost(LinkLoss::Closed)),
        }
    }

    fn release(&mut self) -> Result<(), NfcError> {
        if !self.released {
            self.released = true;
            // A target already gone needs no release.
            let _ = self.requests.send(ToTarget::Release);
        }
        Ok(())
    }
}

impl DepTarget for MemoryTarget {
    fn receive(&mut self, timeout: Duration) -> Result<Vec<u8>, NfcError> {
        match self.requests.recv_timeout(timeout) {
            Ok(ToTarget::Frame(frame)) => {
                self.owes_answer = true;
                check_exchange(&frame).map(<[u8]>::to_vec)
            }
            Ok(ToTarget::Release) => Err(NfcError::LinkLost(LinkLoss::Released)),
            Err(RecvTimeoutError::Timeout) => Err(NfcError::ExchangeTimeout { waited: timeout }),
            Err(RecvTimeoutError::Disconnected) => Err(NfcError::LinkLost(LinkLoss::Closed)),
        }
    }

    fn send(&mut self, frame: &[u8], _timeout: Duration) -> Result<(), NfcError> {
        check_exchange(frame)?;
        if !self.owes_answer {
            // NFC-DEP: a target only answers; TgSetData without a request fails the same way.
            return Err(NfcError::LinkLost(LinkLoss::Released));
        }
        self.owes_answer = false;
        self.answers
            .send(frame.to_vec())
            .map_err(|_| NfcError::LinkLost(LinkLoss::Closed))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    const SHORT: Duration = Duration::from_millis(50);

    #[test]
    fn an_exchange_carries_a_frame_and_its_answer() {
        let (mut initiator, mut target) = pair();
        let thread = std::thread::spawn(move || {
            let request = target.receive(Duration::from_secs(5)).unwrap();
            target.send(&[request[0] + 1], SHORT).unwrap();
            target
        });
        assert_eq!(
            initiator.exchange(&[41], Duration::from_secs(5)).unwrap(),
            [42]
        );
        drop(thread.join().unwrap());
        assert!(matches!(
            initiator.exchange(&[1], SHORT),
            Err(NfcError::LinkLost(LinkLoss::Closed))
        ));
    }

    #[test]
    fn silence_is_a_timeout_and_release_ends_the_targets_wait() {
        let (mut initiator, mut target) = pair();
        assert!(matches!(
            target.receive(SHORT),
            Err(NfcError::ExchangeTimeout { .. })
        ));
        assert!(matches!(
            initiator.exchange(&[1], SHORT),
            Err(NfcError::ExchangeTimeout { .. })
        ));
        initiator.release().unwrap();
        // The frame of the timed-out exchange is still queued, then the release.
        assert_eq!(target.receive(SHORT).unwrap(), [1]);
        assert!(matches!(
            target.receive(SHORT),
            Err(NfcError::LinkLost(LinkLoss::Released))
        ));
    }

    #[test]
    fn both_directions_refuse_263_bytes() {
        let (mut initiator, mut target) = pair();
        assert!(matches!(
            initiator.exchange(&[0; 263], SHORT),
            Err(NfcError::ExchangeTooLong {
                length: 263,
                max: 262
            })
        ));
        // Nothing went on the air.
        assert!(matches!(
            target.receive(SHORT),
            Err(NfcError::ExchangeTimeout { .. })
        ));
        assert!(matches!(
            target.send(&[0; 263], SHORT),
            Err(NfcError::ExchangeTooLong { .. })
        ));
    }
}
