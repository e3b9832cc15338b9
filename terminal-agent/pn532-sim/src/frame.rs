//! The PN532 host-link frame codec: normal and extended information frames, ACK, NACK and the
//! application-level error frame, as they travel on the PN532's HSU (UART) link.
//!
//! ```text
//! normal:    00 00 FF LEN LCS TFI PD0 … PDn DCS 00          LEN + LCS ≡ 0 (mod 256)
//! extended:  00 00 FF FF FF LENM LENL LCS TFI PD0 … PDn DCS 00
//! ACK:       00 00 FF 00 FF 00
//! NACK:      00 00 FF FF 00 00
//! error:     00 00 FF 01 FF 7F 81 00
//! ```
//!
//! `LEN` counts `TFI` and the data bytes; `TFI + PD0 + … + PDn + DCS ≡ 0 (mod 256)`. The host
//! sends `TFI = D4`, the PN532 answers with `TFI = D5` and the command code plus one.
//!
//! [`FrameDecoder`] is a byte-at-a-time state machine: it skips anything before a start code
//! (the 0x55 wake-up preamble, zeros, line noise), checks both checksums, and refuses a length
//! above [`INFORMATION_BYTES_MAX`] before it allocates anything.

use thiserror::Error;

/// Frame identifier of a frame from the host controller to the PN532.
pub const TFI_HOST_TO_PN532: u8 = 0xD4;
/// Frame identifier of a frame from the PN532 to the host controller.
pub const TFI_PN532_TO_HOST: u8 = 0xD5;
/// Frame identifier of the application-level error frame.
pub const TFI_ERROR: u8 = 0x7F;

/// Largest data payload (command code and parameters, `PD0 … PDn`) of one frame. This is
/// libnfc's `PN53x_EXTENDED_FRAME__DATA_MAX_LEN`, and the PN532's own buffer size.
pub const PAYLOAD_BYTES_MAX: usize = 264;
/// Largest `LEN` value accepted: `TFI` plus [`PAYLOAD_BYTES_MAX`].
pub const INFORMATION_BYTES_MAX: usize = PAYLOAD_BYTES_MAX + 1;
/// Largest `LEN` value a normal (not extended) frame can carry.
pub const NORMAL_FRAME_INFORMATION_BYTES_MAX: usize = 255;
/// Bytes a normal frame adds around its payload: preamble, start code, LEN, LCS, TFI, DCS,
/// postamble.
pub const NORMAL_FRAME_OVERHEAD_BYTES: usize = 8;
/// Bytes an extended frame adds around its payload.
pub const EXTENDED_FRAME_OVERHEAD_BYTES: usize = 11;

/// The ACK frame: the PN532 sends it when it accepted a command; the host sends it to abort
/// the running command.
pub const ACK_FRAME: [u8; 6] = [0x00, 0x00, 0xFF, 0x00, 0xFF, 0x00];
/// The NACK frame: the host asks the PN532 to send its last response again.
pub const NACK_FRAME: [u8; 6] = [0x00, 0x00, 0xFF, 0xFF, 0x00, 0x00];
/// The application-level error frame ("syntax error"): the PN532 accepted the frame but
/// cannot run the command it holds.
pub const ERROR_FRAME: [u8; 8] = [0x00, 0x00, 0xFF, 0x01, 0xFF, TFI_ERROR, 0x81, 0x00];

/// A frame that failed its checks. The decoder drops it and looks for the next start code.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum FrameError {
    /// `LEN + LCS` (or `LENM + LENL + LCS`) is not zero modulo 256.
    #[error("length checksum mismatch (LEN {len:#06x}, LCS {checksum:#04x})")]
    LengthChecksum {
        /// The length as received.
        len: usize,
        /// The length checksum as received.
        checksum: u8,
    },
    /// `LEN` is zero, or names more bytes than [`INFORMATION_BYTES_MAX`]; nothing was allocated.
    #[error("frame length {len} outside 1..={max}", max = INFORMATION_BYTES_MAX)]
    Length {
        /// The length as received.
        len: usize,
    },
    /// `TFI + data + DCS` is not zero modulo 256.
    #[error("data checksum mismatch")]
    DataChecksum,
    /// The byte after `DCS` is not the 0x00 postamble.
    #[error("postamble {0:#04x} instead of 0x00")]
    Postamble(u8),
    /// The payload to encode is empty or longer than [`PAYLOAD_BYTES_MAX`].
    #[error("payload of {len} bytes outside 1..={max}", max = PAYLOAD_BYTES_MAX)]
    PayloadLength {
        /// The payload length asked for.
        len: usize,
    },
}

/// One frame that passed its checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// `00 00 FF 00 FF 00`.
    Ack,
    /// `00 00 FF FF 00 00`.
    Nack,
    /// An information frame (normal or extended).
    Information(InformationFrame),
}

/// The checked content of an information frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InformationFrame {
    /// The frame identifier: [`TFI_HOST_TO_PN532`], [`TFI_PN532_TO_HOST`] or [`TFI_ERROR`].
    pub tfi: u8,
    /// `PD0 … PDn`: the command (or response) code and its parameters; at most
    /// [`PAYLOAD_BYTES_MAX`] bytes, empty only in the error frame.
    pub payload: Vec<u8>,
}

/// Where the decoder is inside a frame.
#[derive(Debug)]
enum State {
    /// Looking for the `00 FF` start code; `after_zero` says the last byte was 0x00.
    SeekStart { after_zero: bool },
    /// Start code seen; next is LEN (or the first byte of an extended-frame marker).
    Len,
    /// LEN seen; next is LCS.
    LenChecksum { len: u8 },
    /// Extended-frame marker seen; next is LENM.
    ExtendedLenHigh,
    /// LENM seen; next is LENL.
    ExtendedLenLow { high: u8 },
    /// LENM and LENL seen; next is LCS.
    ExtendedLenChecksum { high: u8, low: u8 },
    /// Collecting `len` bytes of TFI and data.
    Body { len: usize, body: Vec<u8> },
    /// Body complete; next is DCS.
    DataChecksum { body: Vec<u8> },
    /// Checksum good; next is the postamble.
    Postamble { body: Vec<u8> },
}

/// Byte-at-a-time decoder of frames on a PN532 host link (either direction).
#[derive(Debug)]
pub struct FrameDecoder {
    state: State,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameDecoder {
    /// A decoder waiting for a start code.
    pub fn new() -> Self {
        Self {
            state: State::SeekStart { after_zero: false },
        }
    }

    /// Forgets any partial frame, as after a line reset.
    pub fn reset(&mut self) {
        self.state = State::SeekStart { after_zero: false };
    }

    /// Feeds a chunk of bytes, returning every frame (or frame error) completed by it, in order.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<Result<Frame, FrameError>> {
        bytes
            .iter()
            .filter_map(|&byte| self.feed_byte(byte))
            .collect()
    }

    /// Feeds one byte; returns a frame or a frame error when this byte completes one.
    pub fn feed_byte(&mut self, byte: u8) -> Option<Result<Frame, FrameError>> {
        let state = std::mem::replace(&mut self.state, State::SeekStart { after_zero: false });
        let (next, outcome) = Self::step(state, byte);
        self.state = next;
        outcome
    }

    fn step(state: State, byte: u8) -> (State, Option<Result<Frame, FrameError>>) {
        let seek = State::SeekStart { after_zero: false };
        match state {
            State::SeekStart { after_zero } => {
                if after_zero && byte == 0xFF {
                    (State::Len, None)
                } else {
                    (
                        State::SeekStart {
                            after_zero: byte == 0x00,
                        },
                        None,
                    )
                }
            }
            State::Len => (State::LenChecksum { len: byte }, None),
            State::LenChecksum { len } => match (len, byte) {
                (0x00, 0xFF) => (seek, Some(Ok(Frame::Ack))),
                (0xFF, 0x00) => (seek, Some(Ok(Frame::Nack))),
                (0xFF, 0xFF) => (State::ExtendedLenHigh, None),
                _ if len.wrapping_add(byte) != 0 => (
                    seek,
                    Some(Err(FrameError::LengthChecksum {
                        len: usize::from(len),
                        checksum: byte,
                    })),
                ),
                _ => Self::start_body(usize::from(len)),
            },
            State::ExtendedLenHigh => (State::ExtendedLenLow { high: byte }, None),
            State::ExtendedLenLow { high } => {
                (State::ExtendedLenChecksum { high, low: byte }, None)
            }
            State::ExtendedLenChecksum { high, low } => {
                let len = usize::from(u16::from_be_bytes([high, low]));
                if high.wrapping_add(low).wrapping_add(byte) != 0 {
                    (
                        seek,
                        Some(Err(FrameError::LengthChecksum {
                            len,
                            checksum: byte,
                        })),
                    )
                } else {
                    Self::start_body(len)
                }
            }
            State::Body { len, mut body } => {
                body.push(byte);
                if body.len() == len {
                    (State::DataChecksum { body }, None)
                } else {
                    (State::Body { len, body }, None)
                }
            }
            State::DataChecksum { body } => {
                let sum = body.iter().fold(byte, |sum, &b| sum.wrapping_add(b));
                if sum == 0 {
                    (State::Postamble { body }, None)
                } else {
                    (seek, Some(Err(FrameError::DataChecksum)))
                }
            }
            State::Postamble { mut body } => {
                if byte != 0x00 {
                    return (seek, Some(Err(FrameError::Postamble(byte))));
                }
                // Body::len is at least 1 (checked in start_body), so the TFI is there.
                let tfi = body.remove(0);
                (
                    seek,
                    Some(Ok(Frame::Information(InformationFrame {
                        tfi,
                        payload: body,
                    }))),
                )
            }
        }
    }

    /// Checks a received `LEN` before anything is allocated for the body.
    fn start_body(len: usize) -> (State, Option<Result<Frame, FrameError>>) {
        if len == 0 || len > INFORMATION_BYTES_MAX {
            return (
                State::SeekStart { after_zero: false },
                Some(Err(FrameError::Length { len })),
            );
        }
        (
            State::Body {
                len,
                body: Vec::with_capacity(len),
            },
            None,
        )
    }
}

/// Encodes an information frame, normal when it fits and extended otherwise.
pub fn encode_information(tfi: u8, payload: &[u8]) -> Result<Vec<u8>, FrameError> {
    if payload.is_empty() || payload.len() > PAYLOAD_BYTES_MAX {
        return Err(FrameError::PayloadLength { len: payload.len() });
    }
    let len = payload.len() + 1;
    let mut frame = Vec::with_capacity(payload.len() + EXTENDED_FRAME_OVERHEAD_BYTES);
    frame.extend_from_slice(&[0x00, 0x00, 0xFF]);
    if len <= NORMAL_FRAME_INFORMATION_BYTES_MAX {
        // len <= 255 was just checked.
        let len = len as u8;
        frame.extend_from_slice(&[len, len.wrapping_neg()]);
    } else {
        // len <= INFORMATION_BYTES_MAX (265) was checked above, so it fits in two bytes.
        let [high, low] = (len as u16).to_be_bytes();
        frame.extend_from_slice(&[0xFF, 0xFF, high, low, high.wrapping_add(low).wrapping_neg()]);
    }
    frame.push(tfi);
    frame.extend_from_slice(payload);
    let sum = payload.iter().fold(tfi, |sum, &b| sum.wrapping_add(b));
    frame.push(sum.wrapping_neg());
    frame.push(0x00);
    Ok(frame)
}

/// Encodes a PN532 response: `code` is the command code plus one, `data` follows it.
pub fn encode_response(code: u8, data: &[u8]) -> Result<Vec<u8>, FrameError> {
    let mut payload = Vec::with_capacity(data.len() + 1);
    payload.push(code);
    payload.extend_from_slice(data);
    encode_information(TFI_PN532_TO_HOST, &payload)
}

/// Encodes a host command: `code` followed by its parameters.
pub fn encode_command(code: u8, params: &[u8]) -> Result<Vec<u8>, FrameError> {
    let mut payload = Vec::with_capacity(params.len() + 1);
    payload.push(code);
    payload.extend_from_slice(params);
    encode_information(TFI_HOST_TO_PN532, &payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(bytes: &[u8]) -> Vec<Result<Frame, FrameError>> {
        FrameDecoder::new().feed(bytes)
    }

    fn info(tfi: u8, payload: &[u8]) -> Result<Frame, FrameError> {
        Ok(Frame::Information(InformationFrame {
            tfi,
            payload: payload.to_vec(),
        }))
    }

    #[test]
    fn encodes_get_firmware_version_as_libnfc_does() {
        // libnfc's pn53x_build_frame for { GetFirmwareVersion }.
        let frame = encode_command(0x02, &[]).unwrap();
        assert_eq!(
            frame,
            [0x00, 0x00, 0xFF, 0x02, 0xFE, 0xD4, 0x02, 0x2A, 0x00]
        );
    }

    #[test]
    fn encodes_firmware_version_response() {
        let frame = encode_response(0x03, &[0x32, 0x01, 0x06, 0x07]).unwrap();
        assert_eq!(
            frame,
            [
                0x00, 0x00, 0xFF, 0x06, 0xFA, 0xD5, 0x03, 0x32, 0x01, 0x06, 0x07, 0xE8, 0x00
            ]
        );
    }

    #[test]
    fn decodes_normal_frame_after_wake_up_preamble() {
        let mut bytes = vec![0x55, 0x55, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00];
        bytes.extend(encode_command(0x14, &[0x01]).unwrap());
        assert_eq!(decode_all(&bytes), vec![info(0xD4, &[0x14, 0x01])]);
    }

    #[test]
    fn decodes_frames_split_across_chunks() {
        let frame = encode_command(0x00, b"\x00libnfc").unwrap();
        let mut decoder = FrameDecoder::new();
        let (first, second) = frame.split_at(5);
        assert!(decoder.feed(first).is_empty());
        assert_eq!(decoder.feed(second), vec![info(0xD4, b"\x00\x00libnfc")]);
    }

    #[test]
    fn round_trips_extended_frame() {
        let payload: Vec<u8> = (0..PAYLOAD_BYTES_MAX).map(|i| i as u8).collect();
        let frame = encode_information(TFI_PN532_TO_HOST, &payload).unwrap();
        assert_eq!(&frame[..5], &[0x00, 0x00, 0xFF, 0xFF, 0xFF]);
        assert_eq!(frame.len(), payload.len() + EXTENDED_FRAME_OVERHEAD_BYTES);
        assert_eq!(decode_all(&frame), vec![info(TFI_PN532_TO_HOST, &payload)]);
    }

    #[test]
    fn largest_normal_frame_stays_normal() {
        let payload = vec![0xAB; NORMAL_FRAME_INFORMATION_BYTES_MAX - 1];
        let frame = encode_information(TFI_HOST_TO_PN532, &payload).unwrap();
        assert_eq!(frame[3], 0xFF);
        assert_eq!(frame[4], 0x01);
        assert_eq!(frame.len(), payload.len() + NORMAL_FRAME_OVERHEAD_BYTES);
        assert_eq!(decode_all(&frame), vec![info(TFI_HOST_TO_PN532, &payload)]);
    }

    #[test]
    fn decodes_ack_nack_and_error_frames() {
        let mut bytes = ACK_FRAME.to_vec();
        bytes.extend(NACK_FRAME);
        bytes.extend(ERROR_FRAME);
        assert_eq!(
            decode_all(&bytes),
            vec![Ok(Frame::Ack), Ok(Frame::Nack), info(TFI_ERROR, &[])]
        );
    }

    #[test]
    fn refuses_bad_length_checksum_then_resynchronises() {
        let mut bytes = vec![0x00, 0x00, 0xFF, 0x02, 0xFD, 0xD4, 0x02, 0x2A, 0x00];
        bytes.extend(encode_command(0x02, &[]).unwrap());
        assert_eq!(
            decode_all(&bytes),
            vec![
                Err(FrameError::LengthChecksum {
                    len: 2,
                    checksum: 0xFD
                }),
                info(0xD4, &[0x02])
            ]
        );
    }

    #[test]
    fn refuses_bad_data_checksum() {
        let mut frame = encode_command(0x02, &[]).unwrap();
        frame[7] ^= 0x01;
        assert_eq!(decode_all(&frame), vec![Err(FrameError::DataChecksum)]);
    }

    #[test]
    fn refuses_bad_extended_length_checksum() {
        let bytes = [0x00, 0x00, 0xFF, 0xFF, 0xFF, 0x01, 0x00, 0x00];
        assert_eq!(
            decode_all(&bytes),
            vec![Err(FrameError::LengthChecksum {
                len: 0x100,
                checksum: 0x00
            })]
        );
    }

    #[test]
    fn refuses_oversized_length_before_allocating() {
        // LEN = 0xFFF0 with a valid length checksum: the decoder must refuse at LCS, before
        // any body byte arrives, and must not have reserved room for it.
        let mut decoder = FrameDecoder::new();
        let [high, low] = 0xFFF0_u16.to_be_bytes();
        let header = [
            0x00,
            0x00,
            0xFF,
            0xFF,
            0xFF,
            high,
            low,
            high.wrapping_add(low).wrapping_neg(),
        ];
        assert_eq!(
            decoder.feed(&header),
            vec![Err(FrameError::Length { len: 0xFFF0 })]
        );
        assert!(matches!(decoder.state, State::SeekStart { .. }));
        // One byte over the limit is refused too.
        let len = INFORMATION_BYTES_MAX as u16 + 1;
        let [high, low] = len.to_be_bytes();
        let header = [
            0x00,
            0x00,
            0xFF,
            0xFF,
            0xFF,
            high,
            low,
            high.wrapping_add(low).wrapping_neg(),
        ];
        assert_eq!(
            decoder.feed(&header),
            vec![Err(FrameError::Length {
                len: usize::from(len)
            })]
        );
    }

    #[test]
    fn refuses_bad_postamble() {
        let mut frame = encode_command(0x02, &[]).unwrap();
        let last = frame.len() - 1;
        frame[last] = 0x42;
        assert_eq!(decode_all(&frame), vec![Err(FrameError::Postamble(0x42))]);
    }

    #[test]
    fn refuses_to_encode_empty_or_oversized_payload() {
        assert_eq!(
            encode_information(TFI_HOST_TO_PN532, &[]),
            Err(FrameError::PayloadLength { len: 0 })
        );
        let payload = vec![0; PAYLOAD_BYTES_MAX + 1];
        assert_eq!(
            encode_information(TFI_HOST_TO_PN532, &payload),
            Err(FrameError::PayloadLength {
                len: PAYLOAD_BYTES_MAX + 1
            })
        );
    }

    mod properties {
        use proptest::prelude::*;

        use super::super::*;

        proptest! {
            #[test]
            fn any_bytes_decode_without_panic_and_within_limits(
                bytes in proptest::collection::vec(any::<u8>(), 0..2048)
            ) {
                for frame in FrameDecoder::new().feed(&bytes) {
                    if let Ok(Frame::Information(information)) = frame {
                        prop_assert!(information.payload.len() <= PAYLOAD_BYTES_MAX);
                    }
                }
            }

            #[test]
            fn encoded_frames_decode_to_themselves(
                tfi in any::<u8>(),
                payload in proptest::collection::vec(any::<u8>(), 1..=PAYLOAD_BYTES_MAX),
                wake_up_bytes in 0_usize..16,
            ) {
                let mut bytes = vec![0x55; wake_up_bytes];
                bytes.extend(encode_information(tfi, &payload).unwrap());
                let frames = FrameDecoder::new().feed(&bytes);
                prop_assert_eq!(
                    frames,
                    vec![Ok(Frame::Information(InformationFrame { tfi, payload }))]
                );
            }
        }
    }
}
