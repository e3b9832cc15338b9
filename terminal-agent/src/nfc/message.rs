//! One message over an NFC-DEP link: the stop-and-wait exchanges of `docs/nfc-framing.md`,
//! driven with [`Chunker`] (sender) and [`Reassembler`] (receiver), in either layout.
//!
//! - **Sender is initiator**: data frame → ack, … until the final ack carries the digest.
//! - **Sender is target**: the initiator (receiver) opens with the ready ack and asks for each
//!   chunk with its ack; its final ack is answered by its echo.
//!
//! Failures, bounded everywhere:
//! - an exchange that times out or meets an RF error is repeated as it was, at most
//!   [`EXCHANGE_ATTEMPTS_MAX`] tries in all; a released link is never retried;
//! - a damaged frame (CRC, truncation) is answered by asking for the same chunk again, at most
//!   [`RESENDS_PER_FRAME_MAX`] times in a row;
//! - any other refusal ends the message with an abort frame to the peer (best effort).
//!
//! When the other terminal is taken away mid-message the caller gets [`NfcError::PeerGone`] or
//! [`NfcError::Timeout`] with the [`Transfer`] reached, and the partial message is discarded
//! ([`Reassembler::reset`]): a message is returned only once its digest has been checked.

use std::time::Duration;

use nfcpay_protocol::nfc_frame::{
    AbortReason, CHUNK_PAYLOAD_BYTES_MAX, Chunker, Frame, FrameError, MESSAGE_DIGEST_BYTES,
    MessageId, Progress, RESENDS_PER_FRAME_MAX, Reassembler, SendProgress, abort_frame,
    parse_frame,
};
use tracing::{debug, warn};

use super::{
    DepInitiator, DepTarget, EXCHANGE_ATTEMPTS_MAX, NfcError, NfcLink, Role, Timeouts, Transfer,
};

/// A fresh random message ID (never 0), so a receiver tells a new message from a resent chunk.
pub fn random_message_id() -> Result<MessageId, NfcError> {
    loop {
        let value = getrandom::u32().map_err(NfcError::Random)?;
        if let Ok(id) = MessageId::try_from(value) {
            return Ok(id);
        }
    }
}

/// Sends `message` (at most [`super::MESSAGE_BYTES_MAX`] bytes) over `link` and returns once
/// the receiver has confirmed its digest.
///
/// As initiator the target is not released afterwards (call [`DepInitiator::release`], or drop
/// the link): a target that lingers answers a resent last chunk.
pub fn send_message(
    link: NfcLink<'_>,
    message_id: MessageId,
    message: &[u8],
    timeouts: &Timeouts,
) -> Result<(), NfcError> {
    let role = link.role();
    let mut chunker = Chunker::new(message_id, message).map_err(|source| NfcError::Refused {
        role,
        transfer: Transfer::default(),
        source,
    })?;
    debug!(%role, message_id = message_id.get(), bytes = message.len(), chunks = chunker.chunk_count(), "sending NFC message");
    match link {
        NfcLink::Initiator(initiator) => send_as_initiator(initiator, &mut chunker, timeouts),
        NfcLink::Target(target) => send_as_target(target, &mut chunker, timeouts),
    }
}

/// Receives one message over `link`: returned only whole and with its digest checked.
///
/// As target, after the message is complete it keeps answering a resent last chunk for at most
/// [`Timeouts::linger`], until the initiator releases the link.
pub fn receive_message(link: NfcLink<'_>, timeouts: &Timeouts) -> Result<Vec<u8>, NfcError> {
    let mut reassembler = Reassembler::new();
    let result = match link {
        NfcLink::Initiator(initiator) => {
            receive_as_initiator(initiator, &mut reassembler, timeouts)
        }
        NfcLink::Target(target) => receive_as_target(target, &mut reassembler, timeouts),
    };
    if result.is_err() {
        // Nothing partial survives a failure.
        reassembler.reset();
    }
    result
}

/// Progress of a sender: the chunk it is sending is the number confirmed so far.
fn sender_transfer(chunker: &Chunker, frame: &Frame) -> Transfer {
    Transfer {
        chunks_done: parse_frame(frame.as_bytes()).map_or(0, |view| view.seq),
        chunk_count: Some(chunker.chunk_count()),
    }
}

/// Progress of a receiver, from the ack it would send next (it names the next chunk needed).
fn receiver_transfer(reassembler: &Reassembler) -> Transfer {
    let ack = reassembler.current_ack();
    match parse_frame(ack.as_bytes()) {
        Ok(view) if view.message_id != 0 => Transfer {
            chunks_done: view.seq,
            chunk_count: Some(chunk_count_of(view.total_len)),
        },
        _ => Transfer::default(),
    }
}

fn chunk_count_of(total_len: u32) -> u16 {
    let stream = (total_len as usize).saturating_add(MESSAGE_DIGEST_BYTES);
    u16::try_from(stream.div_ceil(CHUNK_PAYLOAD_BYTES_MAX)).unwrap_or(u16::MAX)
}

/// Turns a link error mid-message into the message-level error the caller reports.
fn interrupted(error: NfcError, role: Role, transfer: Transfer, waited: Duration) -> NfcError {
    match error {
        NfcError::ExchangeTimeout { .. } => NfcError::Timeout {
            role,
            transfer,
            waited,
        },
        NfcError::LinkLost(cause) => NfcError::PeerGone {
            role,
            transfer,
            cause,
        },
        other => NfcError::Interrupted {
            role,
            transfer,
            source: Box::new(other),
        },
    }
}

/// One exchange, repeated as it was while it fails transiently.
fn exchange_with_retries(
    initiator: &mut dyn DepInitiator,
    request: &[u8],
    timeouts: &Timeouts,
) -> Result<Vec<u8>, NfcError> {
    let mut attempt = 1;
    loop {
        match initiator.exchange(request, timeouts.exchange) {
            Ok(answer) => return Ok(answer),
            Err(error) if error.is_transient() && attempt < EXCHANGE_ATTEMPTS_MAX => {
                debug!(attempt, %error, "NFC exchange failed; repeating it");
                attempt += 1;
            }
            Err(error) => return Err(error),
        }
    }
}

/// Counts damaged frames in a row; more than [`RESENDS_PER_FRAME_MAX`] ends the message.
#[derive(Debug, Default)]
struct DamageCount(u32);

impl DamageCount {
    fn record(&mut self, error: FrameError) -> Result<(), FrameError> {
        self.0 = self.0.saturating_add(1);
        if self.0 > RESENDS_PER_FRAME_MAX {
            return Err(error);
        }
        Ok(())
    }

    fn clear(&mut self) {
        self.0 = 0;
    }
}

fn send_as_initiator(
    initiator: &mut dyn DepInitiator,
    chunker: &mut Chunker,
    timeouts: &Timeouts,
) -> Result<(), NfcError> {
    let role = Role::Initiator;
    let refused = |chunker: &Chunker, request: &Frame, source| NfcError::Refused {
        role,
        transfer: sender_transfer(chunker, request),
        source,
    };
    let mut request = chunker.start().map_err(|source| NfcError::Refused {
        role,
        transfer: Transfer {
            chunks_done: 0,
            chunk_count: Some(chunker.chunk_count()),
        },
        source,
    })?;
    let mut damage = DamageCount::default();
    loop {
        let answer =
            exchange_with_retries(initiator, request.as_bytes(), timeouts).map_err(|error| {
                interrupted(
                    error,
                    role,
                    sender_transfer(chunker, &request),
                    timeouts.peer_silence(),
                )
            })?;
        match chunker.accept_ack(&answer) {
            Ok(SendProgress::Send(frame)) => {
                damage.clear();
                request = frame;
            }
            Ok(SendProgress::Delivered { .. }) => {
                debug!(
                    message_id = chunker.message_id().get(),
                    "NFC message delivered"
                );
                return Ok(());
            }
            Err(error) if error.is_retryable() => {
                // A damaged answer: ask again with the same frame.
                damage
                    .record(error)
                    .map_err(|error| refused(chunker, &request, error))?;
            }
            Err(error) => {
                let transfer = sender_transfer(chunker, &request);
                if !matches!(error, FrameError::PeerAborted { .. }) {
                    let abort = abort_frame(Some(chunker.message_id()), AbortReason::FrameRefused);
                    let _ = initiator.exchange(abort.as_bytes(), timeouts.exchange);
                }
                return Err(NfcError::Refused {
                    role,
                    transfer,
                    source: error,
                });
            }
        }
    }
}

fn send_as_target(
    target: &mut dyn DepTarget,
    chunker: &mut Chunker,
    timeouts: &Timeouts,
) -> Result<(), NfcError> {
    let role = Role::Target;
    let mut last_sent: Option<Frame> = None;
    let mut damage = DamageCount::default();
    loop {
        let transfer = last_sent.as_ref().map_or(
            Transfer {
                chunks_done: 0,
                chunk_count: Some(chunker.chunk_count()),
            },
            |frame| sender_transfer(chunker, frame),
        );
        let wait = if last_sent.is_some() {
            timeouts.peer_silence()
        } else {
            timeouts.first_frame
        };
        let request = target
            .receive(wait)
            .map_err(|error| interrupted(error, role, transfer, wait))?;
        let answer = match chunker.accept_ack(&request) {
            Ok(SendProgress::Send(frame)) => {
                damage.clear();
                frame
            }
            Ok(SendProgress::Delivered { closing }) => {
                // The receiver has confirmed the digest; the echo only closes its exchange.
                if let Err(error) = target.send(closing.as_bytes(), timeouts.exchange) {
                    debug!(%error, "closing answer not sent; the message was delivered");
                }
                debug!(
                    message_id = chunker.message_id().get(),
                    "NFC message delivered"
                );
                return Ok(());
            }
            Err(error) if error.is_retryable() => {
                damage.record(error).map_err(|source| NfcError::Refused {
                    role,
                    transfer,
                    source,
                })?;
                // The target must answer something: the frame it sent last, which the
                // receiver acks again (or, before any, the first chunk).
                match &last_sent {
                    Some(frame) => frame.clone(),
                    None => chunker.start().map_err(|source| NfcError::Refused {
                        role,
                        transfer,
                        source,
                    })?,
                }
            }
            Err(error) => {
                if !matches!(error, FrameError::PeerAborted { .. }) {
                    let abort = abort_frame(Some(chunker.message_id()), AbortReason::FrameRefused);
                    let _ = target.send(abort.as_bytes(), timeouts.exchange);
                }
                return Err(NfcError::Refused {
                    role,
                    transfer,
                    source: error,
                });
            }
        };
        target
            .send(answer.as_bytes(), timeouts.exchange)
            .map_err(|error| interrupted(error, role, transfer, timeouts.exchange))?;
        last_sent = Some(answer);
    }
}

fn receive_as_initiator(
    initiator: &mut dyn DepInitiator,
    reassembler: &mut Reassembler,
    timeouts: &Timeouts,
) -> Result<Vec<u8>, NfcError> {
    let role = Role::Initiator;
    let mut request = Reassembler::ready_frame();
    let mut damage = DamageCount::default();
    loop {
        let answer =
            exchange_with_retries(initiator, request.as_bytes(), timeouts).map_err(|error| {
                interrupted(
                    error,
                    role,
                    receiver_transfer(reassembler),
                    timeouts.peer_silence(),
                )
            })?;
        match reassembler.accept(&answer) {
            Ok(Progress::NeedMore { ack }) => {
                damage.clear();
                request = ack;
            }
            Ok(Progress::Complete { message, ack }) => {
                // The digest is checked: the message is ours. The final ack tells the sender;
                // its echo (or its absence) changes nothing here.
                if let Err(error) = exchange_with_retries(initiator, ack.as_bytes(), timeouts) {
                    warn!(%error, "final ack not confirmed; the message was received whole");
                }
                return Ok(message);
            }
            Ok(Progress::AlreadyComplete { .. }) => {
                // A fresh receiver has completed nothing: the sender replays an old message.
                return Err(refuse_as_initiator(
                    initiator,
                    reassembler,
                    &answer,
                    FrameError::SequenceGap {
                        expected: 0,
                        received: parse_frame(&answer).map_or(0, |view| view.seq),
                    },
                    timeouts,
                ));
            }
            Err(error) if error.is_retryable() => {
                let transfer = receiver_transfer(reassembler);
                damage.record(error).map_err(|source| NfcError::Refused {
                    role,
                    transfer,
                    source,
                })?;
                request = reassembler.current_ack();
            }
            Err(error) => {
                return Err(refuse_as_initiator(
                    initiator,
                    reassembler,
                    &answer,
                    error,
                    timeouts,
                ));
            }
        }
    }
}

/// Ends a message the initiator (receiver) refuses: abort to the sender, partial data dropped.
fn refuse_as_initiator(
    initiator: &mut dyn DepInitiator,
    reassembler: &mut Reassembler,
    answer: &[u8],
    error: FrameError,
    timeouts: &Timeouts,
) -> NfcError {
    let transfer = receiver_transfer(reassembler);
    reassembler.reset();
    if !matches!(error, FrameError::PeerAborted { .. }) {
        let abort = abort_frame(message_id_of(answer), AbortReason::FrameRefused);
        let _ = initiator.exchange(abort.as_bytes(), timeouts.exchange);
    }
    NfcError::Refused {
        role: Role::Initiator,
        transfer,
        source: error,
    }
}

fn message_id_of(frame: &[u8]) -> Option<MessageId> {
    parse_frame(frame)
        .ok()
        .and_then(|view| MessageId::try_from(view.message_id).ok())
}

fn receive_as_target(
    target: &mut dyn DepTarget,
    reassembler: &mut Reassembler,
    timeouts: &Timeouts,
) -> Result<Vec<u8>, NfcError> {
    let role = Role::Target;
    let mut damage = DamageCount::default();
    loop {
        let wait = if reassembler.is_receiving() {
            timeouts.peer_silence()
        } else {
            timeouts.first_frame
        };
        let request = target
            .receive(wait)
            .map_err(|error| interrupted(error, role, receiver_transfer(reassembler), wait))?;
        let answer = match reassembler.accept(&request) {
            Ok(Progress::NeedMore { ack }) => {
                damage.clear();
                ack
            }
            Ok(Progress::Complete { message, ack }) => {
                if let Err(error) = target.send(ack.as_bytes(), timeouts.exchange) {
                    // The initiator resends the last chunk if it can; linger answers it.
                    debug!(%error, "final ack not sent");
                }
                linger(target, reassembler, timeouts);
                return Ok(message);
            }
            Ok(Progress::AlreadyComplete { ack }) => ack,
            Err(error) if error.is_retryable() => {
                let transfer = receiver_transfer(reassembler);
                damage.record(error).map_err(|source| NfcError::Refused {
                    role,
                    transfer,
                    source,
                })?;
                reassembler.current_ack()
            }
            Err(error) => {
                let transfer = receiver_transfer(reassembler);
                reassembler.reset();
                if !matches!(error, FrameError::PeerAborted { .. }) {
                    let abort = abort_frame(message_id_of(&request), AbortReason::FrameRefused);
                    let _ = target.send(abort.as_bytes(), timeouts.exchange);
                }
                return Err(NfcError::Refused {
                    role,
                    transfer,
                    source: error,
                });
            }
        };
        target
            .send(answer.as_bytes(), timeouts.exchange)
            .map_err(|error| {
                interrupted(
                    error,
                    role,
                    receiver_transfer(reassembler),
                    timeouts.exchange,
                )
            })?;
    }
}

/// After a complete message, answers resent chunks of it with the final ack again until the
/// initiator releases the link, sends something else, or [`Timeouts::linger`] passes.
fn linger(target: &mut dyn DepTarget, reassembler: &mut Reassembler, timeouts: &Timeouts) {
    let deadline = std::time::Instant::now() + timeouts.linger;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return;
        }
        let Ok(request) = target.receive(left) else {
            return;
        };
        match reassembler.accept(&request) {
            Ok(Progress::AlreadyComplete { ack }) => {
                if target.send(ack.as_bytes(), timeouts.exchange).is_err() {
                    return;
                }
            }
            _ => {
                // Not a resend of the message just received: it belongs to whoever receives
                // next. Answer with an abort so the initiator does not wait for nothing.
                let abort = abort_frame(message_id_of(&request), AbortReason::Cancelled);
                let _ = target.send(abort.as_bytes(), timeouts.exchange);
                reassembler.reset();
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::thread;

    use nfcpay_protocol::nfc_frame::MESSAGE_BYTES_MAX;

    use super::super::memory::{self, MemoryInitiator, MemoryTarget};
    use super::super::{LinkLoss, NfcLink};
    use super::*;

    /// Short enough to keep the tests fast, long enough for a loaded machine.
    const TIMEOUTS: Timeouts = Timeouts {
        exchange: Duration::from_millis(500),
        first_frame: Duration::from_secs(5),
        linger: Duration::from_millis(300),
    };

    fn message_of(length: usize) -> Vec<u8> {
        (0..length).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    fn chunks_for(length: usize) -> u16 {
        (length + MESSAGE_DIGEST_BYTES).div_ceil(CHUNK_PAYLOAD_BYTES_MAX) as u16
    }

    /// Sender is initiator: returns (sender's result, receiver's result).
    fn sender_initiates(
        mut initiator: impl DepInitiator + Send + 'static,
        mut target: impl DepTarget + Send + 'static,
        message: Vec<u8>,
    ) -> (Result<(), NfcError>, Result<Vec<u8>, NfcError>) {
        let receiver =
            thread::spawn(move || receive_message(NfcLink::Target(&mut target), &TIMEOUTS));
        let id = random_message_id().unwrap();
        let sent = send_message(NfcLink::Initiator(&mut initiator), id, &message, &TIMEOUTS);
        let _ = initiator.release();
        drop(initiator);
        (sent, receiver.join().unwrap())
    }

    /// Sender is target: returns (sender's result, receiver's result).
    fn sender_is_target(
        mut initiator: impl DepInitiator + Send + 'static,
        mut target: impl DepTarget + Send + 'static,
        message: Vec<u8>,
    ) -> (Result<(), NfcError>, Result<Vec<u8>, NfcError>) {
        let sender = thread::spawn(move || {
            let id = random_message_id().unwrap();
            send_message(NfcLink::Target(&mut target), id, &message, &TIMEOUTS)
        });
        let received = receive_message(NfcLink::Initiator(&mut initiator), &TIMEOUTS);
        drop(initiator);
        (sender.join().unwrap(), received)
    }

    #[test]
    fn round_trip_sender_is_initiator() {
        for length in [0, 1, 500, MESSAGE_BYTES_MAX] {
            let (initiator, target) = memory::pair();
            let message = message_of(length);
            let (sent, received) = sender_initiates(initiator, target, message.clone());
            sent.unwrap();
            assert_eq!(received.unwrap(), message, "length {length}");
        }
    }

    #[test]
    fn round_trip_sender_is_target() {
        for length in [0, 1, 500, MESSAGE_BYTES_MAX] {
            let (initiator, target) = memory::pair();
            let message = message_of(length);
            let (sent, received) = sender_is_target(initiator, target, message.clone());
            sent.unwrap();
            assert_eq!(received.unwrap(), message, "length {length}");
        }
    }

    #[test]
    fn a_message_over_the_limit_is_refused_before_any_exchange() {
        let (mut initiator, mut target) = memory::pair();
        let id = random_message_id().unwrap();
        let error = send_message(
            NfcLink::Initiator(&mut initiator),
            id,
            &message_of(MESSAGE_BYTES_MAX + 1),
            &TIMEOUTS,
        )
        .unwrap_err();
        assert!(
            matches!(
                error,
                NfcError::Refused {
                    source: FrameError::MessageTooLarge { .. },
                    ..
                }
            ),
            "{error:?}"
        );
        assert!(matches!(
            target.receive(Duration::from_millis(20)),
            Err(NfcError::ExchangeTimeout { .. })
        ));
    }

    /// A target that is taken away after answering `answers` frames.
    struct VanishingTarget {
        inner: Option<MemoryTarget>,
        answers: usize,
    }

    impl DepTarget for VanishingTarget {
        fn receive(&mut self, timeout: Duration) -> Result<Vec<u8>, NfcError> {
            if self.answers == 0 {
                self.inner = None;
            }
            match &mut self.inner {
                Some(inner) => inner.receive(timeout),
                None => Err(NfcError::LinkLost(LinkLoss::Closed)),
            }
        }

        fn send(&mut self, frame: &[u8], timeout: Duration) -> Result<(), NfcError> {
            self.answers = self.answers.saturating_sub(1);
            match &mut self.inner {
                Some(inner) => inner.send(frame, timeout),
                None => Err(NfcError::LinkLost(LinkLoss::Closed)),
            }
        }
    }

    /// An initiator whose reader is taken away after `exchanges` exchanges: its own reader
    /// reports RF errors from then on, as libnfc does.
    struct VanishingInitiator {
        inner: Option<MemoryInitiator>,
        exchanges: usize,
    }

    impl DepInitiator for VanishingInitiator {
        fn exchange(&mut self, frame: &[u8], timeout: Duration) -> Result<Vec<u8>, NfcError> {
            if self.exchanges == 0 {
                self.inner = None;
            }
            self.exchanges = self.exchanges.saturating_sub(1);
            match &mut self.inner {
                Some(inner) => inner.exchange(frame, timeout),
                None => Err(NfcError::LinkLost(LinkLoss::RfError)),
            }
        }

        fn release(&mut self) -> Result<(), NfcError> {
            self.inner = None;
            Ok(())
        }
    }

    fn assert_gone(result: Result<impl std::fmt::Debug, NfcError>, chunks_done: u16, count: u16) {
        match result {
            Err(NfcError::PeerGone { transfer, .. }) => assert_eq!(
                transfer,
                Transfer {
                    chunks_done,
                    chunk_count: Some(count)
                }
            ),
            other => panic!("expected PeerGone after {chunks_done} chunks, got {other:?}"),
        }
    }

    #[test]
    fn receiving_target_taken_away_mid_message_fails_both_sides() {
        let length = 2000;
        let count = chunks_for(length);
        for k in 1..usize::from(count) {
            let (initiator, target) = memory::pair();
            let target = VanishingTarget {
                inner: Some(target),
                answers: k,
            };
            let (sent, received) = sender_initiates(initiator, target, message_of(length));
            let k = k as u16;
            // The sender was sending chunk k; the receiver had stored k chunks and drops them.
            assert_gone(sent, k, count);
            assert_gone(received, k, count);
        }
    }

    #[test]
    fn receiving_initiator_taken_away_mid_message_fails_both_sides() {
        let length = 2000;
        let count = chunks_for(length);
        for k in 1..usize::from(count) {
            let (initiator, target) = memory::pair();
            let initiator = VanishingInitiator {
                inner: Some(initiator),
                exchanges: k,
            };
            let (sent, received) = sender_is_target(initiator, target, message_of(length));
            let k = k as u16;
            // The receiver had k chunks and acknowledged k - 1 of them to the sender.
            assert_gone(sent, k - 1, count);
            match received {
                Err(NfcError::PeerGone {
                    transfer,
                    cause: LinkLoss::RfError,
                    role: Role::Initiator,
                }) => assert_eq!(transfer.chunks_done, k),
                other => panic!("expected PeerGone, got {other:?}"),
            }
        }
    }

    #[test]
    fn sending_target_taken_away_mid_message_fails_both_sides() {
        let length = 1200;
        let count = chunks_for(length);
        let (initiator, target) = memory::pair();
        let target = VanishingTarget {
            inner: Some(target),
            answers: 2,
        };
        let (sent, received) = sender_is_target(initiator, target, message_of(length));
        // It answered the ready ack and ack 1 (chunks 0 and 1), then left before ack 2.
        assert_gone(sent, 1, count);
        assert_gone(received, 2, count);
    }

    #[test]
    fn a_silent_target_is_a_timeout_with_the_progress_reached() {
        let (mut initiator, mut target) = memory::pair();
        let answering = thread::spawn(move || {
            // Answers chunk 0, then stays in the field but never answers again.
            let mut reassembler = Reassembler::new();
            let request = target.receive(Duration::from_secs(5)).unwrap();
            let Progress::NeedMore { ack } = reassembler.accept(&request).unwrap() else {
                panic!("several chunks");
            };
            target.send(ack.as_bytes(), TIMEOUTS.exchange).unwrap();
            while target.receive(Duration::from_secs(5)).is_ok() {}
        });
        let id = random_message_id().unwrap();
        let started = std::time::Instant::now();
        let error = send_message(
            NfcLink::Initiator(&mut initiator),
            id,
            &message_of(1000),
            &TIMEOUTS,
        )
        .unwrap_err();
        let elapsed = started.elapsed();
        drop(initiator);
        answering.join().unwrap();
        match error {
            NfcError::Timeout {
                role: Role::Initiator,
                transfer,
                ..
            } => assert_eq!(
                transfer,
                Transfer {
                    chunks_done: 1,
                    chunk_count: Some(chunks_for(1000))
                }
            ),
            other => panic!("expected Timeout, got {other:?}"),
        }
        // Bounded: every attempt was made, none more.
        assert!(
            elapsed >= TIMEOUTS.exchange * EXCHANGE_ATTEMPTS_MAX,
            "{elapsed:?}"
        );
    }

    #[test]
    fn a_target_without_an_initiator_times_out_before_the_first_chunk() {
        let (_initiator, mut target) = memory::pair();
        let timeouts = Timeouts {
            first_frame: Duration::from_millis(50),
            ..TIMEOUTS
        };
        let error = receive_message(NfcLink::Target(&mut target), &timeouts).unwrap_err();
        assert!(
            matches!(
                error,
                NfcError::Timeout {
                    transfer: Transfer {
                        chunks_done: 0,
                        chunk_count: None
                    },
                    ..
                }
            ),
            "{error:?}"
        );
        assert!(
            error.to_string().contains("before the first chunk"),
            "{error}"
        );
    }

    /// Flips one byte of the frame sent (`in_request`) or received in exchange number `at`.
    struct Corrupting {
        inner: MemoryInitiator,
        at: usize,
        in_request: bool,
        exchanges: usize,
    }

    impl DepInitiator for Corrupting {
        fn exchange(&mut self, frame: &[u8], timeout: Duration) -> Result<Vec<u8>, NfcError> {
            let hit = self.exchanges == self.at;
            self.exchanges += 1;
            let mut frame = frame.to_vec();
            if hit && self.in_request {
                let middle = frame.len() / 2;
                frame[middle] ^= 0x01;
            }
            let mut answer = self.inner.exchange(&frame, timeout)?;
            if hit && !self.in_request {
                let last = answer.len() - 1;
                answer[last] ^= 0x80;
            }
            Ok(answer)
        }

        fn release(&mut self) -> Result<(), NfcError> {
            self.inner.release()
        }
    }

    #[test]
    fn damaged_frames_are_sent_again_in_both_layouts() {
        let message = message_of(1000);
        for in_request in [true, false] {
            for at in 0..3 {
                let (initiator, target) = memory::pair();
                let initiator = Corrupting {
                    inner: initiator,
                    at,
                    in_request,
                    exchanges: 0,
                };
                let (sent, received) = sender_initiates(initiator, target, message.clone());
                sent.unwrap();
                assert_eq!(received.unwrap(), message, "{at} {in_request}");

                let (initiator, target) = memory::pair();
                let initiator = Corrupting {
                    inner: initiator,
                    at,
                    in_request,
                    exchanges: 0,
                };
                let (sent, received) = sender_is_target(initiator, target, message.clone());
                sent.unwrap();
                assert_eq!(received.unwrap(), message, "{at} {in_request}");
            }
        }
    }

    #[test]
    fn garbage_from_the_initiator_is_answered_with_an_abort() {
        let (mut initiator, mut target) = memory::pair();
        let receiver =
            thread::spawn(move || receive_message(NfcLink::Target(&mut target), &TIMEOUTS));
        let answer = initiator
            .exchange(b"not an nfcpay frame at all", TIMEOUTS.exchange)
            .unwrap();
        let view = parse_frame(&answer).unwrap();
        assert_eq!(view.payload, [AbortReason::FrameRefused.code()]);
        let error = receiver.join().unwrap().unwrap_err();
        assert!(
            matches!(
                error,
                NfcError::Refused {
                    role: Role::Target,
                    source: FrameError::BadMagic { .. },
                    ..
                }
            ),
            "{error:?}"
        );
    }

    #[test]
    fn a_lost_final_ack_is_answered_again_while_the_target_lingers() {
        // The initiator sends a one-chunk message; the final ack is "lost" (the initiator
        // ignores it) and the chunk resent: the lingering target answers it again and
        // delivers the message once.
        let (mut initiator, mut target) = memory::pair();
        let receiver =
            thread::spawn(move || receive_message(NfcLink::Target(&mut target), &TIMEOUTS));
        let chunker = Chunker::new(random_message_id().unwrap(), b"pay 12.50 EUR").unwrap();
        let frame = chunker.frames()[0].clone();
        let first = initiator
            .exchange(frame.as_bytes(), TIMEOUTS.exchange)
            .unwrap();
        let again = initiator
            .exchange(frame.as_bytes(), TIMEOUTS.exchange)
            .unwrap();
        assert_eq!(first, again);
        let mut sender = chunker.clone();
        sender.start().unwrap();
        assert!(matches!(
            sender.accept_ack(&again).unwrap(),
            SendProgress::Delivered { .. }
        ));
        initiator.release().unwrap();
        assert_eq!(receiver.join().unwrap().unwrap(), b"pay 12.50 EUR");
    }

    #[test]
    fn message_ids_are_never_zero() {
        for _ in 0..1000 {
            assert_ne!(random_message_id().unwrap().get(), 0);
        }
    }
}
