//! Fuzzes the NFC-DEP framing: arbitrary bytes as one frame to either side, as a sequence of
//! frames to one receiver, and as a message to chunk and reassemble.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nfcpay_protocol::nfc_frame::{
    Chunker, MESSAGE_BYTES_MAX, MessageId, NFC_EXCHANGE_BYTES_MAX, Progress, Reassembler,
    SendProgress, parse_frame,
};

fuzz_target!(|data: &[u8]| {
    // The whole input as one received frame, at both ends.
    let _ = parse_frame(data);
    let _ = Reassembler::new().accept(data);
    if let Ok(mut chunker) = Chunker::new(MessageId::try_from(1).unwrap(), b"fuzz") {
        if let Ok(SendProgress::Send(frame) | SendProgress::Delivered { closing: frame }) =
            chunker.accept_ack(data)
        {
            assert!(frame.len() <= NFC_EXCHANGE_BYTES_MAX);
        }
    }

    // The input as a sequence of frames, each preceded by a one-byte length, to one receiver.
    let mut reassembler = Reassembler::new();
    let mut rest = data;
    while let Some((&length, tail)) = rest.split_first() {
        let length = usize::from(length).min(tail.len());
        let (frame, tail) = tail.split_at(length);
        rest = tail;
        match reassembler.accept(frame) {
            Ok(Progress::NeedMore { ack } | Progress::AlreadyComplete { ack }) => {
                assert!(ack.len() <= NFC_EXCHANGE_BYTES_MAX);
            }
            Ok(Progress::Complete { message, ack }) => {
                assert!(message.len() <= MESSAGE_BYTES_MAX);
                assert!(ack.len() <= NFC_EXCHANGE_BYTES_MAX);
            }
            Err(_) => {
                assert!(reassembler.current_ack().len() <= NFC_EXCHANGE_BYTES_MAX);
            }
        }
    }

    // The input as a message: every frame fits one exchange and the message comes back whole.
    if data.len() <= MESSAGE_BYTES_MAX {
        let chunker = Chunker::new(MessageId::try_from(2).unwrap(), data).unwrap();
        let mut reassembler = Reassembler::new();
        let mut received = None;
        for frame in chunker.frames() {
            assert!(frame.len() <= NFC_EXCHANGE_BYTES_MAX);
            if let Progress::Complete { message, .. } =
                reassembler.accept(frame.as_bytes()).unwrap()
            {
                received = Some(message);
            }
        }
        assert_eq!(received.as_deref(), Some(data));
    }
});
