//! Framing of one message over NFC-DEP exchanges: chunking, acknowledgement and reassembly.
//!
//! An NFC-DEP exchange through libnfc 1.8 must never carry more than
//! [`NFC_EXCHANGE_BYTES_MAX`] (262) bytes in either direction: libnfc writes past its own buffer
//! beyond that and neither libnfc nor the `nfc1` crate checks. Every [`Frame`] this module
//! produces is at most that long (the type cannot hold a longer one), and every received frame
//! longer than that is refused before any of its bytes is looked at.
//!
//! # Frame format (version 1)
//!
//! All integers are big-endian. `docs/nfc-framing.md` is the byte-exact specification.
//!
//! | offset | size | field                                                          |
//! |-------:|-----:|----------------------------------------------------------------|
//! |      0 |    1 | magic `0x4E` (`'N'`)                                           |
//! |      1 |    1 | version `0x01`                                                 |
//! |      2 |    1 | frame type: `0x01` data, `0x02` ack, `0x03` abort              |
//! |      3 |    4 | message ID (`0` only in the "ready" ack, or an early abort)    |
//! |      7 |    2 | sequence number (data: this chunk; ack: next expected chunk)   |
//! |      9 |    4 | total message length in bytes (without the digest)             |
//! |     13 |    2 | payload length `n`                                             |
//! |     15 |  `n`| payload                                                        |
//! | 15+`n` |    4 | CRC-32 (IEEE 802.3 / zlib) of bytes `0 .. 15+n`                |
//!
//! # Message stream and digest
//!
//! The sender chunks the *stream* `message ‖ SHA-256(message)`: the 32-byte digest travels at
//! the end of the last chunk(s), so it needs no header field and is checked once, when the
//! message is complete. Chunk `i` carries stream bytes `i·243 .. min((i+1)·243, len+32)`, so a
//! chunk's payload length follows from the total length and the sequence number, and the
//! receiver checks it exactly. The final ack carries the same digest back ("received, digest X"),
//! so the sender knows the receiver has exactly its message.
//!
//! # Exchange (stop-and-wait)
//!
//! NFC-DEP is request/response: the initiator sends, the target answers in the same exchange.
//! Either side may be the sender of the message:
//!
//! - **Sender is initiator** (e.g. the payee initiates): the initiator sends
//!   [`Chunker::start`], then each answer goes to [`Chunker::accept_ack`], which gives the next
//!   frame to send, until [`SendProgress::Delivered`]. The target passes each received frame to
//!   [`Reassembler::accept`] and answers with the ack in the returned [`Progress`].
//! - **Sender is target**: the initiator (receiver) opens with [`Reassembler::ready_frame`], then
//!   sends each ack from [`Progress`] as its next request; the final ack of
//!   [`Progress::Complete`] is its last request. The target passes each request to
//!   [`Chunker::accept_ack`] and answers with the frame it returns, [`SendProgress::Delivered`]'s
//!   `closing` frame (the final ack echoed) included.
//!
//! A receiver answers a damaged frame ([`FrameError::is_retryable`]) with
//! [`Reassembler::current_ack`], which names the chunk it still needs, so the sender resends
//! it; a sender that is the initiator and gets a damaged answer repeats its last request (the
//! receiver treats a repeated chunk as a duplicate and acks it again). Any other error ends the
//! message: answer (or send) [`abort_frame`] and call
//! [`Reassembler::reset`]. Timeouts are the caller's: when the peer goes away mid-message (the
//! exchange times out or the target is released), the caller must discard the partial message
//! with [`Reassembler::reset`] (or drop the [`Chunker`]) and report the failure; nothing here
//! waits or retries on its own.

use std::num::NonZeroU32;

use sha2::{Digest, Sha256};

/// Most bytes one NFC-DEP exchange may carry in either direction (libnfc 1.8's buffer).
pub const NFC_EXCHANGE_BYTES_MAX: usize = 262;
/// Longest message, in bytes. A payment request is a few hundred bytes; 4096 leaves an order of
/// magnitude of room while bounding the receiver's allocation and the exchanges (17) per tap.
pub const MESSAGE_BYTES_MAX: usize = 4096;
/// The magic byte opening every frame (`'N'`).
pub const FRAME_MAGIC: u8 = 0x4E;
/// The format version this module speaks.
pub const FRAME_VERSION: u8 = 0x01;
/// Bytes before the payload: magic, version, type, message ID, sequence, total, payload length.
pub const FRAME_HEADER_BYTES: usize = 15;
/// Bytes of the CRC-32 after the payload.
pub const FRAME_CRC_BYTES: usize = 4;
/// Bytes of every frame that are not payload.
pub const FRAME_OVERHEAD_BYTES: usize = FRAME_HEADER_BYTES + FRAME_CRC_BYTES;
/// Shortest valid frame (empty payload).
pub const FRAME_BYTES_MIN: usize = FRAME_OVERHEAD_BYTES;
/// Most payload bytes in one frame: what is left of an exchange after the overhead.
pub const CHUNK_PAYLOAD_BYTES_MAX: usize = NFC_EXCHANGE_BYTES_MAX - FRAME_OVERHEAD_BYTES;
/// Bytes of the SHA-256 digest of the whole message, at the end of the chunked stream.
pub const MESSAGE_DIGEST_BYTES: usize = 32;
/// Longest chunked stream: the longest message and its digest.
pub const STREAM_BYTES_MAX: usize = MESSAGE_BYTES_MAX + MESSAGE_DIGEST_BYTES;
/// Most chunks in one message.
pub const CHUNKS_MAX: usize = STREAM_BYTES_MAX.div_ceil(CHUNK_PAYLOAD_BYTES_MAX);
/// Payload bytes of an abort frame (its reason code).
pub const ABORT_PAYLOAD_BYTES: usize = 1;
/// How many times a sender hands out the same frame again before giving up.
pub const RESENDS_PER_FRAME_MAX: u32 = 4;
/// How many duplicate chunks a receiver answers for one message before giving up.
pub const DUPLICATES_PER_MESSAGE_MAX: u32 = 2 * CHUNKS_MAX as u32;

const OFFSET_MAGIC: usize = 0;
const OFFSET_VERSION: usize = 1;
const OFFSET_TYPE: usize = 2;
const OFFSET_MESSAGE_ID: usize = 3;
const OFFSET_SEQUENCE: usize = 7;
const OFFSET_TOTAL: usize = 9;
const OFFSET_PAYLOAD_LENGTH: usize = 13;

const _: () = assert!(OFFSET_PAYLOAD_LENGTH + 2 == FRAME_HEADER_BYTES);
const _: () = assert!(FRAME_OVERHEAD_BYTES + CHUNK_PAYLOAD_BYTES_MAX == NFC_EXCHANGE_BYTES_MAX);
// The final ack carries the digest, so it must fit one frame.
const _: () = assert!(MESSAGE_DIGEST_BYTES <= CHUNK_PAYLOAD_BYTES_MAX);
// Sequence numbers (and the final ack's `chunk_count`) are u16 on the wire.
const _: () = assert!(CHUNKS_MAX < u16::MAX as usize);
// Total lengths are u32 on the wire.
const _: () = assert!(MESSAGE_BYTES_MAX <= u32::MAX as usize);

/// Why a frame was refused or a message could not be sent or received.
///
/// Messages name lengths and fields, never payload bytes, so they are safe to log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// More bytes than one NFC-DEP exchange may carry: refused before being looked at.
    #[error("exchange of {length} bytes exceeds the {max}-byte NFC-DEP limit")]
    ExchangeTooLong {
        /// Bytes offered.
        length: usize,
        /// [`NFC_EXCHANGE_BYTES_MAX`].
        max: usize,
    },
    /// Fewer bytes than the header (or the header's payload length) calls for.
    #[error("truncated frame: {length} bytes, at least {needed} needed")]
    Truncated {
        /// Bytes received.
        length: usize,
        /// Bytes the frame needs.
        needed: usize,
    },
    /// More bytes than the header's payload length and the CRC account for.
    #[error("{extra} trailing bytes after the frame")]
    TrailingBytes {
        /// Bytes past the CRC.
        extra: usize,
    },
    /// The first byte is not [`FRAME_MAGIC`].
    #[error("not an nfcpay frame (magic byte {found:#04x})")]
    BadMagic {
        /// The byte found.
        found: u8,
    },
    /// A format version this module does not speak.
    #[error("unsupported frame version {found}")]
    UnsupportedVersion {
        /// The version found.
        found: u8,
    },
    /// A frame type code that is not data, ack or abort.
    #[error("unknown frame type {found:#04x}")]
    UnknownFrameType {
        /// The code found.
        found: u8,
    },
    /// A payload length the frame type does not allow.
    #[error("{frame_type} frame with a payload of {length} bytes")]
    PayloadLengthInvalid {
        /// The frame type.
        frame_type: FrameType,
        /// The payload length declared.
        length: usize,
    },
    /// The frame's CRC-32 does not match its bytes: damaged on the link.
    #[error("frame CRC mismatch (computed {computed:#010x}, received {received:#010x})")]
    CrcMismatch {
        /// CRC of the bytes received.
        computed: u32,
        /// CRC the frame carries.
        received: u32,
    },
    /// A data or final-ack frame with message ID 0, which only the "ready" ack may carry.
    #[error("message ID 0 is reserved for the ready ack")]
    ReservedMessageId,
    /// A message (sent or declared) longer than [`MESSAGE_BYTES_MAX`].
    #[error("message of {declared} bytes exceeds the {max}-byte limit")]
    MessageTooLarge {
        /// Length sent or declared.
        declared: u64,
        /// [`MESSAGE_BYTES_MAX`].
        max: usize,
    },
    /// A sequence number past the message's last chunk.
    #[error("sequence number {seq} out of range for a message of {chunk_count} chunks")]
    SequenceOutOfRange {
        /// The sequence number.
        seq: u16,
        /// Chunks in the message.
        chunk_count: u16,
    },
    /// A chunk whose payload length is not the one its position calls for.
    #[error("chunk {seq} carries {actual} bytes, {expected} expected")]
    ChunkLengthMismatch {
        /// The sequence number.
        seq: u16,
        /// Length for this position.
        expected: usize,
        /// Length received.
        actual: usize,
    },
    /// A frame of another message arrived while one is in progress.
    #[error("message ID {received:#010x} while message {expected:#010x} is in progress")]
    MessageIdChanged {
        /// The message in progress.
        expected: u32,
        /// The message ID received.
        received: u32,
    },
    /// A frame declares another total length than the message's earlier frames.
    #[error("total length changed from {expected} to {received} bytes mid-message")]
    TotalLengthChanged {
        /// Total of the message in progress.
        expected: u32,
        /// Total received.
        received: u32,
    },
    /// A chunk ahead of the next expected one: out of order, or after a gap.
    #[error("chunk {received} received while chunk {expected} is expected")]
    SequenceGap {
        /// The next chunk the receiver needs.
        expected: u16,
        /// The chunk received.
        received: u16,
    },
    /// A resent chunk whose payload differs from the first copy.
    #[error("chunk {seq} resent with a different payload")]
    DuplicateMismatch {
        /// The sequence number.
        seq: u16,
    },
    /// The peer resent the same chunks more than [`DUPLICATES_PER_MESSAGE_MAX`] times.
    #[error("more than {max} duplicate chunks in one message")]
    TooManyDuplicates {
        /// [`DUPLICATES_PER_MESSAGE_MAX`].
        max: u32,
    },
    /// The SHA-256 at the end of the stream (or in the final ack) is not the message's.
    #[error("message digest mismatch")]
    MessageDigestMismatch,
    /// A frame of a type this side does not expect (a data frame at a sender, an ack at a
    /// receiver).
    #[error("{received} frame received where a {expected} frame is expected")]
    UnexpectedFrameType {
        /// The type expected.
        expected: FrameType,
        /// The type received.
        received: FrameType,
    },
    /// The peer sent an abort frame: the message is abandoned.
    #[error("peer aborted the message: {reason}")]
    PeerAborted {
        /// The reason the peer gave.
        reason: AbortReason,
    },
    /// An ack naming a chunk the sender cannot move to.
    #[error("ack names chunk {received}, but the sender is at chunk {next_seq}")]
    AckOutOfRange {
        /// The chunk the sender is waiting to have acknowledged.
        next_seq: u16,
        /// The chunk the ack names.
        received: u16,
    },
    /// The same frame was asked for more than [`RESENDS_PER_FRAME_MAX`] extra times.
    #[error("chunk {seq} resent {max} times without progress")]
    ResendLimit {
        /// The chunk (or the chunk count, for the closing frame).
        seq: u16,
        /// [`RESENDS_PER_FRAME_MAX`].
        max: u32,
    },
}

impl FrameError {
    /// Whether the frame was likely damaged on the link, so the receiver should answer with
    /// [`Reassembler::current_ack`] (asking for the chunk again) rather than abort.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::CrcMismatch { .. } | Self::Truncated { .. })
    }
}

/// The kind of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameType {
    /// A chunk of a message.
    Data,
    /// An acknowledgement naming the next chunk the receiver needs.
    Ack,
    /// The message is abandoned.
    Abort,
}

impl FrameType {
    /// The wire code.
    pub fn code(self) -> u8 {
        match self {
            Self::Data => 0x01,
            Self::Ack => 0x02,
            Self::Abort => 0x03,
        }
    }

    fn from_code(code: u8) -> Result<Self, FrameError> {
        match code {
            0x01 => Ok(Self::Data),
            0x02 => Ok(Self::Ack),
            0x03 => Ok(Self::Abort),
            found => Err(FrameError::UnknownFrameType { found }),
        }
    }
}

impl std::fmt::Display for FrameType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Data => "data",
            Self::Ack => "ack",
            Self::Abort => "abort",
        })
    }
}

/// Why a side abandons a message: the one-byte payload of an abort frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum AbortReason {
    /// The user or the application cancelled (code `0x01`).
    Cancelled,
    /// A frame from the peer was refused (code `0x02`).
    FrameRefused,
    /// The message was received but its content is refused (code `0x03`).
    MessageRefused,
    /// A code this version does not know.
    Unknown(u8),
}

impl AbortReason {
    /// The wire code.
    pub fn code(self) -> u8 {
        match self {
            Self::Cancelled => 0x01,
            Self::FrameRefused => 0x02,
            Self::MessageRefused => 0x03,
            Self::Unknown(code) => code,
        }
    }

    /// The reason for a wire code; unknown codes are kept, not refused.
    pub fn from_code(code: u8) -> Self {
        match code {
            0x01 => Self::Cancelled,
            0x02 => Self::FrameRefused,
            0x03 => Self::MessageRefused,
            other => Self::Unknown(other),
        }
    }
}

impl std::fmt::Display for AbortReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cancelled => f.write_str("cancelled"),
            Self::FrameRefused => f.write_str("frame refused"),
            Self::MessageRefused => f.write_str("message refused"),
            Self::Unknown(code) => write!(f, "unknown reason {code:#04x}"),
        }
    }
}

/// Identifies one message, so a receiver tells a new message from a resent chunk. Never 0.
///
/// The sender picks it (a counter or a random number); it must differ from the previous
/// message sent to the same peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MessageId(NonZeroU32);

impl MessageId {
    /// The wire value.
    pub fn get(self) -> u32 {
        self.0.get()
    }
}

impl TryFrom<u32> for MessageId {
    type Error = FrameError;

    fn try_from(value: u32) -> Result<Self, FrameError> {
        NonZeroU32::new(value)
            .map(Self)
            .ok_or(FrameError::ReservedMessageId)
    }
}

/// An encoded frame, at most [`NFC_EXCHANGE_BYTES_MAX`] bytes: safe to hand to libnfc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame(Vec<u8>);

impl Frame {
    /// Encodes a frame; refuses a payload that would make it longer than one exchange.
    fn encode(
        frame_type: FrameType,
        message_id: u32,
        seq: u16,
        total_len: u32,
        payload: &[u8],
    ) -> Result<Self, FrameError> {
        let length = FRAME_OVERHEAD_BYTES.saturating_add(payload.len());
        let too_long = FrameError::ExchangeTooLong {
            length,
            max: NFC_EXCHANGE_BYTES_MAX,
        };
        if length > NFC_EXCHANGE_BYTES_MAX {
            return Err(too_long);
        }
        let payload_len = u16::try_from(payload.len()).map_err(|_| too_long)?;
        Ok(Self::write(
            frame_type,
            message_id,
            seq,
            total_len,
            payload_len,
            payload,
        ))
    }

    /// Encodes a frame whose payload size is fixed and known at compile time to fit.
    fn encode_fixed<const N: usize>(
        frame_type: FrameType,
        message_id: u32,
        seq: u16,
        total_len: u32,
        payload: &[u8; N],
    ) -> Self {
        const { assert!(N <= CHUNK_PAYLOAD_BYTES_MAX) };
        // N <= CHUNK_PAYLOAD_BYTES_MAX (asserted at compile time above), so it fits a u16.
        let payload_len = N as u16;
        Self::write(frame_type, message_id, seq, total_len, payload_len, payload)
    }

    fn write(
        frame_type: FrameType,
        message_id: u32,
        seq: u16,
        total_len: u32,
        payload_len: u16,
        payload: &[u8],
    ) -> Self {
        let mut bytes = Vec::with_capacity(FRAME_OVERHEAD_BYTES + payload.len());
        bytes.extend_from_slice(&[FRAME_MAGIC, FRAME_VERSION, frame_type.code()]);
        bytes.extend_from_slice(&message_id.to_be_bytes());
        bytes.extend_from_slice(&seq.to_be_bytes());
        bytes.extend_from_slice(&total_len.to_be_bytes());
        bytes.extend_from_slice(&payload_len.to_be_bytes());
        bytes.extend_from_slice(payload);
        let crc = crc32fast::hash(&bytes);
        bytes.extend_from_slice(&crc.to_be_bytes());
        debug_assert!(bytes.len() <= NFC_EXCHANGE_BYTES_MAX);
        Self(bytes)
    }

    /// The bytes to send.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The frame's length in bytes (never more than [`NFC_EXCHANGE_BYTES_MAX`]).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Always false: a frame has at least a header and a CRC.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The frame's bytes, owned.
    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }
}

impl AsRef<[u8]> for Frame {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// The abort frame for `message_id` (`None` before any message is known).
pub fn abort_frame(message_id: Option<MessageId>, reason: AbortReason) -> Frame {
    let message_id = message_id.map_or(0, MessageId::get);
    let payload: [u8; ABORT_PAYLOAD_BYTES] = [reason.code()];
    Frame::encode_fixed(FrameType::Abort, message_id, 0, 0, &payload)
}

/// Refuses `bytes` if they are more than one exchange may carry. Call it on anything about to
/// be handed to libnfc that did not come from a [`Frame`].
pub fn check_exchange_length(bytes: &[u8]) -> Result<&[u8], FrameError> {
    if bytes.len() > NFC_EXCHANGE_BYTES_MAX {
        return Err(FrameError::ExchangeTooLong {
            length: bytes.len(),
            max: NFC_EXCHANGE_BYTES_MAX,
        });
    }
    Ok(bytes)
}

/// A received frame whose structure and CRC have been checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameView<'a> {
    /// The frame's type.
    pub frame_type: FrameType,
    /// The message ID (0 in the ready ack, or in an abort sent before any message).
    pub message_id: u32,
    /// Data: this chunk's number. Ack: the next chunk needed. Abort: 0.
    pub seq: u16,
    /// The message's total length in bytes, without the digest (0 in ready ack and abort).
    pub total_len: u32,
    /// The payload, its length checked against the frame type.
    pub payload: &'a [u8],
}

/// Parses one received frame. The length is checked against [`NFC_EXCHANGE_BYTES_MAX`] before
/// any byte is read; then the header, the payload length, and the CRC.
pub fn parse_frame(bytes: &[u8]) -> Result<FrameView<'_>, FrameError> {
    check_exchange_length(bytes)?;
    if bytes.len() < FRAME_BYTES_MIN {
        return Err(FrameError::Truncated {
            length: bytes.len(),
            needed: FRAME_BYTES_MIN,
        });
    }
    let (header, rest) = bytes.split_at(FRAME_HEADER_BYTES);
    if header[OFFSET_MAGIC] != FRAME_MAGIC {
        return Err(FrameError::BadMagic {
            found: header[OFFSET_MAGIC],
        });
    }
    if header[OFFSET_VERSION] != FRAME_VERSION {
        return Err(FrameError::UnsupportedVersion {
            found: header[OFFSET_VERSION],
        });
    }
    let frame_type = FrameType::from_code(header[OFFSET_TYPE])?;
    let message_id = u32::from_be_bytes(field(header, OFFSET_MESSAGE_ID));
    let seq = u16::from_be_bytes(field(header, OFFSET_SEQUENCE));
    let total_len = u32::from_be_bytes(field(header, OFFSET_TOTAL));
    let payload_len = usize::from(u16::from_be_bytes(field(header, OFFSET_PAYLOAD_LENGTH)));
    if payload_len > CHUNK_PAYLOAD_BYTES_MAX {
        return Err(FrameError::PayloadLengthInvalid {
            frame_type,
            length: payload_len,
        });
    }
    let needed = payload_len + FRAME_CRC_BYTES;
    if rest.len() < needed {
        return Err(FrameError::Truncated {
            length: bytes.len(),
            needed: FRAME_HEADER_BYTES + needed,
        });
    }
    if rest.len() > needed {
        return Err(FrameError::TrailingBytes {
            extra: rest.len() - needed,
        });
    }
    let (payload, crc_bytes) = rest.split_at(payload_len);
    let received = u32::from_be_bytes(field(crc_bytes, 0));
    let computed = crc32fast::hash(&bytes[..FRAME_HEADER_BYTES + payload_len]);
    if computed != received {
        return Err(FrameError::CrcMismatch { computed, received });
    }
    let length_allowed = match frame_type {
        FrameType::Data => payload_len > 0,
        FrameType::Ack => payload_len == 0 || payload_len == MESSAGE_DIGEST_BYTES,
        FrameType::Abort => payload_len == ABORT_PAYLOAD_BYTES,
    };
    if !length_allowed {
        return Err(FrameError::PayloadLengthInvalid {
            frame_type,
            length: payload_len,
        });
    }
    Ok(FrameView {
        frame_type,
        message_id,
        seq,
        total_len,
        payload,
    })
}

/// Copies the `N` bytes at `offset`; the callers' offsets lie within the checked header.
fn field<const N: usize>(bytes: &[u8], offset: usize) -> [u8; N] {
    let mut out = [0u8; N];
    if let Some(source) = bytes.get(offset..offset + N) {
        out.copy_from_slice(source);
    }
    out
}

/// Where each chunk of a message of a given length lies in its stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StreamLayout {
    total_len: u32,
    stream_len: usize,
    chunk_count: u16,
}

impl StreamLayout {
    /// The layout for a message of `total_len` bytes, refused past [`MESSAGE_BYTES_MAX`].
    fn new(total_len: u64) -> Result<Self, FrameError> {
        let too_large = FrameError::MessageTooLarge {
            declared: total_len,
            max: MESSAGE_BYTES_MAX,
        };
        let message_len = usize::try_from(total_len).map_err(|_| too_large.clone())?;
        if message_len > MESSAGE_BYTES_MAX {
            return Err(too_large);
        }
        let stream_len = message_len + MESSAGE_DIGEST_BYTES;
        let chunk_count = u16::try_from(stream_len.div_ceil(CHUNK_PAYLOAD_BYTES_MAX))
            .map_err(|_| too_large.clone())?;
        let total_len = u32::try_from(message_len).map_err(|_| too_large)?;
        Ok(Self {
            total_len,
            stream_len,
            chunk_count,
        })
    }

    /// The stream bytes chunk `seq` carries (empty past the end).
    fn chunk_range(&self, seq: u16) -> std::ops::Range<usize> {
        let start = usize::from(seq)
            .saturating_mul(CHUNK_PAYLOAD_BYTES_MAX)
            .min(self.stream_len);
        let end = start
            .saturating_add(CHUNK_PAYLOAD_BYTES_MAX)
            .min(self.stream_len);
        start..end
    }
}

fn sha256(message: &[u8]) -> [u8; MESSAGE_DIGEST_BYTES] {
    Sha256::digest(message).into()
}

/// What the sender does next, after an ack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendProgress {
    /// Send this frame (the next chunk, or the same one again).
    Send(Frame),
    /// The receiver has the whole message and confirmed its digest. A sender that is the NFC
    /// target answers the final ack with `closing` (the final ack echoed); an initiator has
    /// nothing more to send.
    Delivered {
        /// The answer a target gives to the final ack.
        closing: Frame,
    },
}

/// The sender's side of one message: its frames and how far the receiver has acknowledged them.
#[derive(Debug, Clone)]
pub struct Chunker {
    message_id: MessageId,
    layout: StreamLayout,
    digest: [u8; MESSAGE_DIGEST_BYTES],
    frames: Vec<Frame>,
    /// The lowest chunk not yet acknowledged (`chunk_count` once delivered).
    next_seq: u16,
    /// How many times the frame for `next_seq` has been handed out.
    sends_of_current: u32,
}

impl Chunker {
    /// Splits `message` into frames; refuses a message longer than [`MESSAGE_BYTES_MAX`].
    pub fn new(message_id: MessageId, message: &[u8]) -> Result<Self, FrameError> {
        let layout = StreamLayout::new(u64::try_from(message.len()).unwrap_or(u64::MAX))?;
        let digest = sha256(message);
        let mut stream = Vec::with_capacity(layout.stream_len);
        stream.extend_from_slice(message);
        stream.extend_from_slice(&digest);
        let frames = (0..layout.chunk_count)
            .map(|seq| {
                let payload = stream.get(layout.chunk_range(seq)).unwrap_or_default();
                Frame::encode(
                    FrameType::Data,
                    message_id.get(),
                    seq,
                    layout.total_len,
                    payload,
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            message_id,
            layout,
            digest,
            frames,
            next_seq: 0,
            sends_of_current: 0,
        })
    }

    /// All data frames of the message, in order.
    pub fn frames(&self) -> &[Frame] {
        &self.frames
    }

    /// Chunks in the message.
    pub fn chunk_count(&self) -> u16 {
        self.layout.chunk_count
    }

    /// The message's ID.
    pub fn message_id(&self) -> MessageId {
        self.message_id
    }

    /// The SHA-256 of the message, which the final ack must carry back.
    pub fn digest(&self) -> [u8; MESSAGE_DIGEST_BYTES] {
        self.digest
    }

    /// Whether the receiver has confirmed the whole message.
    pub fn is_delivered(&self) -> bool {
        self.next_seq == self.layout.chunk_count
    }

    /// The first frame, for a sender that is the NFC initiator (it speaks first).
    pub fn start(&mut self) -> Result<Frame, FrameError> {
        self.hand_out()
    }

    /// Takes the peer's answer (initiator) or request (target) and says what to send next.
    pub fn accept_ack(&mut self, frame: &[u8]) -> Result<SendProgress, FrameError> {
        let view = parse_frame(frame)?;
        match view.frame_type {
            FrameType::Ack => {}
            FrameType::Abort => {
                return Err(FrameError::PeerAborted {
                    reason: AbortReason::from_code(view.payload.first().copied().unwrap_or(0)),
                });
            }
            FrameType::Data => {
                return Err(FrameError::UnexpectedFrameType {
                    expected: FrameType::Ack,
                    received: FrameType::Data,
                });
            }
        }
        if view.message_id == 0 {
            return self.accept_ready(&view);
        }
        if view.message_id != self.message_id.get() {
            return Err(FrameError::MessageIdChanged {
                expected: self.message_id.get(),
                received: view.message_id,
            });
        }
        if view.total_len != self.layout.total_len {
            return Err(FrameError::TotalLengthChanged {
                expected: self.layout.total_len,
                received: view.total_len,
            });
        }
        let advances = view.seq == self.next_seq.saturating_add(1);
        if !(advances || view.seq == self.next_seq) || view.seq > self.layout.chunk_count {
            return Err(FrameError::AckOutOfRange {
                next_seq: self.next_seq,
                received: view.seq,
            });
        }
        let is_final = view.seq == self.layout.chunk_count;
        let payload_allowed = if is_final {
            view.payload.len() == MESSAGE_DIGEST_BYTES
        } else {
            view.payload.is_empty()
        };
        if !payload_allowed {
            return Err(FrameError::PayloadLengthInvalid {
                frame_type: FrameType::Ack,
                length: view.payload.len(),
            });
        }
        if is_final && view.payload != self.digest {
            return Err(FrameError::MessageDigestMismatch);
        }
        if advances {
            self.next_seq = view.seq;
            self.sends_of_current = 0;
        }
        if is_final {
            self.count_send()?;
            return Ok(SendProgress::Delivered {
                closing: self.final_ack(),
            });
        }
        self.hand_out().map(SendProgress::Send)
    }

    /// The receiver's ready ack (message ID 0, chunk 0): valid only before chunk 0 is acked.
    fn accept_ready(&mut self, view: &FrameView<'_>) -> Result<SendProgress, FrameError> {
        if view.seq != 0 || self.next_seq != 0 {
            return Err(FrameError::AckOutOfRange {
                next_seq: self.next_seq,
                received: view.seq,
            });
        }
        if !view.payload.is_empty() {
            return Err(FrameError::PayloadLengthInvalid {
                frame_type: FrameType::Ack,
                length: view.payload.len(),
            });
        }
        self.hand_out().map(SendProgress::Send)
    }

    /// The frame for `next_seq`, counting the send against [`RESENDS_PER_FRAME_MAX`].
    fn hand_out(&mut self) -> Result<Frame, FrameError> {
        self.count_send()?;
        self.frames
            .get(usize::from(self.next_seq))
            .cloned()
            .ok_or(FrameError::AckOutOfRange {
                next_seq: self.next_seq,
                received: self.next_seq,
            })
    }

    fn count_send(&mut self) -> Result<(), FrameError> {
        self.sends_of_current = self.sends_of_current.saturating_add(1);
        if self.sends_of_current > 1 + RESENDS_PER_FRAME_MAX {
            return Err(FrameError::ResendLimit {
                seq: self.next_seq,
                max: RESENDS_PER_FRAME_MAX,
            });
        }
        Ok(())
    }

    fn final_ack(&self) -> Frame {
        final_ack_frame(self.message_id, self.layout, &self.digest)
    }
}

/// What the receiver has after a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// The message is incomplete (or the frame was a duplicate): answer with `ack`, which names
    /// the next chunk needed.
    NeedMore {
        /// The answer (target) or next request (initiator).
        ack: Frame,
    },
    /// The message is complete and its digest checked: answer with `ack`, the final ack
    /// carrying the digest.
    Complete {
        /// The message.
        message: Vec<u8>,
        /// The final ack.
        ack: Frame,
    },
    /// A chunk of the message just completed was resent (the final ack was lost): answer with
    /// the final ack again. The message is not delivered twice.
    AlreadyComplete {
        /// The final ack.
        ack: Frame,
    },
}

/// A message whose chunks are arriving.
#[derive(Debug, Clone)]
struct Receiving {
    message_id: MessageId,
    layout: StreamLayout,
    next_seq: u16,
    duplicates: u32,
    /// The stream so far; its capacity is the declared stream length, checked before allocation.
    stream: Vec<u8>,
}

/// The last message completed, remembered to re-ack a resent final chunk.
#[derive(Debug, Clone)]
struct Completed {
    message_id: MessageId,
    total_len: u32,
    final_ack: Frame,
}

#[derive(Debug, Clone)]
enum ReceiveState {
    Idle { last: Option<Completed> },
    Receiving(Receiving),
}

/// The receiver's side: checks each frame and rebuilds the message, one message at a time.
///
/// A refused frame leaves the state as it was, except an abort (which resets) and a digest
/// mismatch (the message is lost, so it resets too).
#[derive(Debug, Clone)]
pub struct Reassembler {
    state: ReceiveState,
}

impl Default for Reassembler {
    fn default() -> Self {
        Self::new()
    }
}

impl Reassembler {
    /// A receiver waiting for a message.
    pub fn new() -> Self {
        Self {
            state: ReceiveState::Idle { last: None },
        }
    }

    /// Discards any partial message (and the memory of the last one): call it when the peer
    /// goes away, a timeout fires, or a message is aborted.
    pub fn reset(&mut self) {
        self.state = ReceiveState::Idle { last: None };
    }

    /// Whether part of a message has arrived and the rest has not.
    pub fn is_receiving(&self) -> bool {
        matches!(self.state, ReceiveState::Receiving(_))
    }

    /// The ack a receiver that is the NFC initiator opens with: message ID 0, next chunk 0.
    pub fn ready_frame() -> Frame {
        ack_frame(0, 0, 0)
    }

    /// The answer naming the chunk still needed: for a damaged frame, or to ask again.
    pub fn current_ack(&self) -> Frame {
        match &self.state {
            ReceiveState::Receiving(receiving) => receiving.ack(),
            ReceiveState::Idle { .. } => Self::ready_frame(),
        }
    }

    /// Takes one received frame.
    pub fn accept(&mut self, frame: &[u8]) -> Result<Progress, FrameError> {
        let view = parse_frame(frame)?;
        match view.frame_type {
            FrameType::Data => {}
            FrameType::Abort => {
                self.reset();
                return Err(FrameError::PeerAborted {
                    reason: AbortReason::from_code(view.payload.first().copied().unwrap_or(0)),
                });
            }
            FrameType::Ack => {
                return Err(FrameError::UnexpectedFrameType {
                    expected: FrameType::Data,
                    received: FrameType::Ack,
                });
            }
        }
        let message_id = MessageId::try_from(view.message_id)?;
        // Checked against MESSAGE_BYTES_MAX here, before anything is allocated.
        let layout = StreamLayout::new(u64::from(view.total_len))?;
        match &self.state {
            ReceiveState::Receiving(receiving) => {
                receiving.check_same_message(message_id, layout)?;
            }
            ReceiveState::Idle { last: Some(last) } if last.message_id == message_id => {
                if last.total_len != layout.total_len {
                    return Err(FrameError::TotalLengthChanged {
                        expected: last.total_len,
                        received: layout.total_len,
                    });
                }
                check_chunk(layout, view.seq, view.payload)?;
                return Ok(Progress::AlreadyComplete {
                    ack: last.final_ack.clone(),
                });
            }
            ReceiveState::Idle { .. } => {}
        }
        check_chunk(layout, view.seq, view.payload)?;
        if let ReceiveState::Idle { .. } = self.state {
            if view.seq != 0 {
                return Err(FrameError::SequenceGap {
                    expected: 0,
                    received: view.seq,
                });
            }
            self.state = ReceiveState::Receiving(Receiving::new(message_id, layout));
        }
        let ReceiveState::Receiving(receiving) = &mut self.state else {
            // Unreachable: an idle state was replaced by a receiving one just above.
            return Err(FrameError::SequenceGap {
                expected: 0,
                received: view.seq,
            });
        };
        if let Some(ack) = receiving.take_chunk(view.seq, view.payload)? {
            return Ok(Progress::NeedMore { ack });
        }
        match receiving.finish() {
            Ok((completed, message)) => {
                let ack = completed.final_ack.clone();
                self.state = ReceiveState::Idle {
                    last: Some(completed),
                };
                Ok(Progress::Complete { message, ack })
            }
            Err(error) => {
                self.reset();
                Err(error)
            }
        }
    }
}

impl Receiving {
    /// Allocates the declared stream length, which [`StreamLayout::new`] has bounded.
    fn new(message_id: MessageId, layout: StreamLayout) -> Self {
        Self {
            message_id,
            layout,
            next_seq: 0,
            duplicates: 0,
            stream: Vec::with_capacity(layout.stream_len),
        }
    }

    fn check_same_message(
        &self,
        message_id: MessageId,
        layout: StreamLayout,
    ) -> Result<(), FrameError> {
        if message_id != self.message_id {
            return Err(FrameError::MessageIdChanged {
                expected: self.message_id.get(),
                received: message_id.get(),
            });
        }
        if layout.total_len != self.layout.total_len {
            return Err(FrameError::TotalLengthChanged {
                expected: self.layout.total_len,
                received: layout.total_len,
            });
        }
        Ok(())
    }

    /// Stores chunk `seq` (already checked against the layout), or re-acks a duplicate: the
    /// ack to answer with, or `None` once the stream is whole.
    fn take_chunk(&mut self, seq: u16, payload: &[u8]) -> Result<Option<Frame>, FrameError> {
        if seq > self.next_seq {
            return Err(FrameError::SequenceGap {
                expected: self.next_seq,
                received: seq,
            });
        }
        if seq < self.next_seq {
            let first_copy = self.stream.get(self.layout.chunk_range(seq));
            if first_copy != Some(payload) {
                return Err(FrameError::DuplicateMismatch { seq });
            }
            self.duplicates = self.duplicates.saturating_add(1);
            if self.duplicates > DUPLICATES_PER_MESSAGE_MAX {
                return Err(FrameError::TooManyDuplicates {
                    max: DUPLICATES_PER_MESSAGE_MAX,
                });
            }
            return Ok(Some(self.ack()));
        }
        // Within capacity: the chunk's length was checked against the declared layout.
        self.stream.extend_from_slice(payload);
        self.next_seq = self.next_seq.saturating_add(1);
        if self.next_seq == self.layout.chunk_count {
            return Ok(None);
        }
        Ok(Some(self.ack()))
    }

    /// Splits the whole stream into message and digest, and checks the digest.
    fn finish(&mut self) -> Result<(Completed, Vec<u8>), FrameError> {
        let mut message = std::mem::take(&mut self.stream);
        let digest_start = message.len().saturating_sub(MESSAGE_DIGEST_BYTES);
        let received_digest = message.split_off(digest_start);
        let digest = sha256(&message);
        if received_digest != digest {
            return Err(FrameError::MessageDigestMismatch);
        }
        let completed = Completed {
            message_id: self.message_id,
            total_len: self.layout.total_len,
            final_ack: final_ack_frame(self.message_id, self.layout, &digest),
        };
        Ok((completed, message))
    }

    fn ack(&self) -> Frame {
        ack_frame(self.message_id.get(), self.next_seq, self.layout.total_len)
    }
}

/// Checks that chunk `seq` exists in `layout` and carries exactly its share of the stream.
fn check_chunk(layout: StreamLayout, seq: u16, payload: &[u8]) -> Result<(), FrameError> {
    if seq >= layout.chunk_count {
        return Err(FrameError::SequenceOutOfRange {
            seq,
            chunk_count: layout.chunk_count,
        });
    }
    let expected = layout.chunk_range(seq).len();
    if payload.len() != expected {
        return Err(FrameError::ChunkLengthMismatch {
            seq,
            expected,
            actual: payload.len(),
        });
    }
    Ok(())
}

/// An ack without payload, naming the next chunk needed.
fn ack_frame(message_id: u32, next_seq: u16, total_len: u32) -> Frame {
    Frame::encode_fixed(FrameType::Ack, message_id, next_seq, total_len, &[])
}

/// The final ack: the chunk count as the next chunk, and the message's digest.
fn final_ack_frame(
    message_id: MessageId,
    layout: StreamLayout,
    digest: &[u8; MESSAGE_DIGEST_BYTES],
) -> Frame {
    Frame::encode_fixed(
        FrameType::Ack,
        message_id.get(),
        layout.chunk_count,
        layout.total_len,
        digest,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id(value: u32) -> MessageId {
        MessageId::try_from(value).unwrap()
    }

    fn message_of(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    /// A frame with any header values and payload, CRC correct.
    fn craft(
        frame_type: FrameType,
        message_id: u32,
        seq: u16,
        total: u32,
        payload: &[u8],
    ) -> Vec<u8> {
        Frame::encode(frame_type, message_id, seq, total, payload)
            .unwrap()
            .into_bytes()
    }

    /// Recomputes the CRC after the header or payload was edited by hand.
    fn fix_crc(bytes: &mut [u8]) {
        let end = bytes.len() - FRAME_CRC_BYTES;
        let crc = crc32fast::hash(&bytes[..end]);
        bytes[end..].copy_from_slice(&crc.to_be_bytes());
    }

    /// Sender is the initiator, receiver the target: returns the message the target got.
    fn deliver_sender_initiates(message_id: MessageId, message: &[u8]) -> Vec<u8> {
        let mut chunker = Chunker::new(message_id, message).unwrap();
        let mut reassembler = Reassembler::new();
        let mut request = chunker.start().unwrap();
        let mut received = None;
        for _ in 0..=CHUNKS_MAX {
            assert!(request.len() <= NFC_EXCHANGE_BYTES_MAX);
            let answer = match reassembler.accept(request.as_bytes()).unwrap() {
                Progress::NeedMore { ack } | Progress::AlreadyComplete { ack } => ack,
                Progress::Complete { message, ack } => {
                    received = Some(message);
                    ack
                }
            };
            assert!(answer.len() <= NFC_EXCHANGE_BYTES_MAX);
            match chunker.accept_ack(answer.as_bytes()).unwrap() {
                SendProgress::Send(next) => request = next,
                SendProgress::Delivered { .. } => return received.unwrap(),
            }
        }
        panic!("not delivered within {CHUNKS_MAX} exchanges");
    }

    /// Sender is the target, receiver the initiator: returns the message the initiator got.
    fn deliver_sender_is_target(message_id: MessageId, message: &[u8]) -> Vec<u8> {
        let mut chunker = Chunker::new(message_id, message).unwrap();
        let mut reassembler = Reassembler::new();
        let mut request = Reassembler::ready_frame();
        for _ in 0..=CHUNKS_MAX {
            let answer = match chunker.accept_ack(request.as_bytes()).unwrap() {
                SendProgress::Send(frame) => frame,
                SendProgress::Delivered { .. } => panic!("delivered before the final ack"),
            };
            match reassembler.accept(answer.as_bytes()).unwrap() {
                Progress::NeedMore { ack } => request = ack,
                Progress::Complete { message, ack } => {
                    let closing = chunker.accept_ack(ack.as_bytes()).unwrap();
                    assert_eq!(closing, SendProgress::Delivered { closing: ack });
                    assert!(chunker.is_delivered());
                    return message;
                }
                Progress::AlreadyComplete { .. } => panic!("completed twice"),
            }
        }
        panic!("not delivered within {CHUNKS_MAX} exchanges");
    }

    #[test]
    fn limits_are_consistent() {
        assert_eq!(CHUNK_PAYLOAD_BYTES_MAX, 243);
        assert_eq!(CHUNKS_MAX, 17);
        assert_eq!(Reassembler::ready_frame().len(), FRAME_BYTES_MIN);
        assert_eq!(abort_frame(None, AbortReason::Cancelled).len(), 20);
    }

    #[test]
    fn crc_is_the_ieee_crc32() {
        // The standard check value of CRC-32/ISO-HDLC (zlib, PNG, IEEE 802.3).
        assert_eq!(crc32fast::hash(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn round_trip_boundary_sizes() {
        let one_full_chunk = CHUNK_PAYLOAD_BYTES_MAX - MESSAGE_DIGEST_BYTES;
        for (len, chunks) in [
            (0, 1),
            (1, 1),
            (one_full_chunk, 1),
            (one_full_chunk + 1, 2),
            (CHUNK_PAYLOAD_BYTES_MAX, 2),
            (CHUNK_PAYLOAD_BYTES_MAX + 1, 2),
            (MESSAGE_BYTES_MAX, CHUNKS_MAX),
        ] {
            let message = message_of(len);
            let chunker = Chunker::new(id(7), &message).unwrap();
            assert_eq!(usize::from(chunker.chunk_count()), chunks, "length {len}");
            assert_eq!(
                deliver_sender_initiates(id(7), &message),
                message,
                "length {len}"
            );
            assert_eq!(
                deliver_sender_is_target(id(7), &message),
                message,
                "length {len}"
            );
        }
    }

    #[test]
    fn one_full_chunk_fills_the_exchange() {
        let chunker = Chunker::new(id(1), &message_of(211)).unwrap();
        assert_eq!(chunker.frames().len(), 1);
        assert_eq!(chunker.frames()[0].len(), NFC_EXCHANGE_BYTES_MAX);
    }

    #[test]
    fn message_too_large_is_refused_by_the_sender() {
        assert_eq!(
            Chunker::new(id(1), &message_of(MESSAGE_BYTES_MAX + 1)).unwrap_err(),
            FrameError::MessageTooLarge {
                declared: (MESSAGE_BYTES_MAX + 1) as u64,
                max: MESSAGE_BYTES_MAX
            }
        );
    }

    #[test]
    fn reassembler_takes_consecutive_messages() {
        let mut chunker_a = Chunker::new(id(1), b"first").unwrap();
        let mut chunker_b = Chunker::new(id(2), b"second").unwrap();
        let mut reassembler = Reassembler::new();
        for (chunker, expected) in [(&mut chunker_a, &b"first"[..]), (&mut chunker_b, b"second")] {
            let frame = chunker.start().unwrap();
            let Progress::Complete { message, ack } = reassembler.accept(frame.as_bytes()).unwrap()
            else {
                panic!("one chunk completes the message");
            };
            assert_eq!(message, expected);
            assert!(matches!(
                chunker.accept_ack(ack.as_bytes()).unwrap(),
                SendProgress::Delivered { .. }
            ));
        }
    }

    #[test]
    fn oversized_frame_is_refused_before_being_read() {
        let mut reassembler = Reassembler::new();
        // Even a frame that would otherwise be valid: the length is checked first.
        let mut bytes = Chunker::new(id(1), &message_of(211)).unwrap().frames()[0]
            .clone()
            .into_bytes();
        bytes.push(0);
        let expected = FrameError::ExchangeTooLong {
            length: NFC_EXCHANGE_BYTES_MAX + 1,
            max: NFC_EXCHANGE_BYTES_MAX,
        };
        assert_eq!(reassembler.accept(&bytes).unwrap_err(), expected);
        assert_eq!(
            parse_frame(&[0xFF; 4096]).unwrap_err().to_string(),
            FrameError::ExchangeTooLong {
                length: 4096,
                max: NFC_EXCHANGE_BYTES_MAX,
            }
            .to_string()
        );
        let mut chunker = Chunker::new(id(1), b"x").unwrap();
        assert_eq!(chunker.accept_ack(&bytes).unwrap_err(), expected);
    }

    #[test]
    fn exchange_guard_refuses_more_than_262_bytes() {
        assert!(check_exchange_length(&[0; NFC_EXCHANGE_BYTES_MAX]).is_ok());
        assert_eq!(
            check_exchange_length(&[0; NFC_EXCHANGE_BYTES_MAX + 1]).unwrap_err(),
            FrameError::ExchangeTooLong {
                length: NFC_EXCHANGE_BYTES_MAX + 1,
                max: NFC_EXCHANGE_BYTES_MAX
            }
        );
    }

    #[test]
    fn frame_cannot_be_encoded_past_the_limit() {
        assert_eq!(
            Frame::encode(FrameType::Data, 1, 0, 0, &[0; CHUNK_PAYLOAD_BYTES_MAX + 1]).unwrap_err(),
            FrameError::ExchangeTooLong {
                length: NFC_EXCHANGE_BYTES_MAX + 1,
                max: NFC_EXCHANGE_BYTES_MAX
            }
        );
    }

    #[test]
    fn truncated_frames_are_refused() {
        let frame = craft(FrameType::Data, 1, 0, 0, &[1; 32]);
        for cut in [0, 1, FRAME_HEADER_BYTES, frame.len() - 1] {
            let error = Reassembler::new().accept(&frame[..cut]).unwrap_err();
            assert!(
                matches!(error, FrameError::Truncated { .. }),
                "cut at {cut}: {error}"
            );
            assert!(error.is_retryable());
        }
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut frame = craft(FrameType::Data, 1, 0, 0, &[1; 32]);
        frame.extend_from_slice(&[0, 0]);
        assert_eq!(
            Reassembler::new().accept(&frame).unwrap_err(),
            FrameError::TrailingBytes { extra: 2 }
        );
    }

    #[test]
    fn bad_magic_version_and_type_are_refused() {
        let frame = craft(FrameType::Data, 1, 0, 0, &[1; 32]);
        let mut magic = frame.clone();
        magic[0] = 0x00;
        assert_eq!(
            parse_frame(&magic).unwrap_err(),
            FrameError::BadMagic { found: 0 }
        );
        let mut version = frame.clone();
        version[1] = 2;
        assert_eq!(
            parse_frame(&version).unwrap_err(),
            FrameError::UnsupportedVersion { found: 2 }
        );
        let mut frame_type = frame;
        frame_type[2] = 0x7F;
        fix_crc(&mut frame_type);
        assert_eq!(
            parse_frame(&frame_type).unwrap_err(),
            FrameError::UnknownFrameType { found: 0x7F }
        );
    }

    #[test]
    fn crc_failure_is_refused_and_reacked() {
        let chunker = Chunker::new(id(3), &message_of(300)).unwrap();
        let mut reassembler = Reassembler::new();
        reassembler.accept(chunker.frames()[0].as_bytes()).unwrap();
        let mut damaged = chunker.frames()[1].clone().into_bytes();
        damaged[20] ^= 0x01;
        let error = reassembler.accept(&damaged).unwrap_err();
        assert!(matches!(error, FrameError::CrcMismatch { .. }));
        assert!(error.is_retryable());
        // The state is unchanged: the answer asks for chunk 1 again.
        let ack = reassembler.current_ack();
        let view = parse_frame(ack.as_bytes()).unwrap();
        assert_eq!(
            (view.frame_type, view.message_id, view.seq),
            (FrameType::Ack, 3, 1)
        );
        assert!(matches!(
            reassembler.accept(chunker.frames()[1].as_bytes()).unwrap(),
            Progress::Complete { .. }
        ));
    }

    #[test]
    fn payload_lengths_are_checked_per_frame_type() {
        assert_eq!(
            parse_frame(&craft(FrameType::Data, 1, 0, 0, &[])).unwrap_err(),
            FrameError::PayloadLengthInvalid {
                frame_type: FrameType::Data,
                length: 0
            }
        );
        assert_eq!(
            parse_frame(&craft(FrameType::Ack, 1, 0, 0, &[0; 5])).unwrap_err(),
            FrameError::PayloadLengthInvalid {
                frame_type: FrameType::Ack,
                length: 5
            }
        );
        assert_eq!(
            parse_frame(&craft(FrameType::Abort, 1, 0, 0, &[1, 2])).unwrap_err(),
            FrameError::PayloadLengthInvalid {
                frame_type: FrameType::Abort,
                length: 2
            }
        );
        // A payload length field larger than any frame can hold.
        let mut frame = craft(FrameType::Data, 1, 0, 0, &[1; 32]);
        frame[OFFSET_PAYLOAD_LENGTH..FRAME_HEADER_BYTES].copy_from_slice(&0xFFFFu16.to_be_bytes());
        assert_eq!(
            parse_frame(&frame).unwrap_err(),
            FrameError::PayloadLengthInvalid {
                frame_type: FrameType::Data,
                length: 0xFFFF
            }
        );
    }

    #[test]
    fn message_id_zero_is_refused_in_data() {
        assert_eq!(
            Reassembler::new()
                .accept(&craft(FrameType::Data, 0, 0, 0, &[1; 32]))
                .unwrap_err(),
            FrameError::ReservedMessageId
        );
        assert_eq!(
            MessageId::try_from(0).unwrap_err(),
            FrameError::ReservedMessageId
        );
    }

    #[test]
    fn declared_total_over_the_limit_is_refused_before_allocation() {
        for total in [MESSAGE_BYTES_MAX as u32 + 1, u32::MAX] {
            let mut reassembler = Reassembler::new();
            let error = reassembler
                .accept(&craft(
                    FrameType::Data,
                    1,
                    0,
                    total,
                    &[1; CHUNK_PAYLOAD_BYTES_MAX],
                ))
                .unwrap_err();
            assert_eq!(
                error,
                FrameError::MessageTooLarge {
                    declared: u64::from(total),
                    max: MESSAGE_BYTES_MAX
                }
            );
            assert!(!reassembler.is_receiving());
        }
    }

    #[test]
    fn sequence_out_of_range_is_refused() {
        // A 1-byte message has one chunk; chunk 1 does not exist.
        assert_eq!(
            Reassembler::new()
                .accept(&craft(FrameType::Data, 1, 1, 1, &[1; 33]))
                .unwrap_err(),
            FrameError::SequenceOutOfRange {
                seq: 1,
                chunk_count: 1
            }
        );
    }

    #[test]
    fn chunk_length_must_match_its_position() {
        assert_eq!(
            Reassembler::new()
                .accept(&craft(FrameType::Data, 1, 0, 300, &[1; 100]))
                .unwrap_err(),
            FrameError::ChunkLengthMismatch {
                seq: 0,
                expected: 243,
                actual: 100
            }
        );
    }

    #[test]
    fn different_message_id_mid_message_is_refused() {
        let first = Chunker::new(id(1), &message_of(600)).unwrap();
        let other = Chunker::new(id(2), &message_of(600)).unwrap();
        let mut reassembler = Reassembler::new();
        reassembler.accept(first.frames()[0].as_bytes()).unwrap();
        assert_eq!(
            reassembler
                .accept(other.frames()[1].as_bytes())
                .unwrap_err(),
            FrameError::MessageIdChanged {
                expected: 1,
                received: 2
            }
        );
        // State unchanged: the original message still completes.
        reassembler.accept(first.frames()[1].as_bytes()).unwrap();
        assert!(matches!(
            reassembler.accept(first.frames()[2].as_bytes()).unwrap(),
            Progress::Complete { .. }
        ));
    }

    #[test]
    fn total_length_changing_mid_message_is_refused() {
        let mut reassembler = Reassembler::new();
        reassembler
            .accept(Chunker::new(id(1), &message_of(600)).unwrap().frames()[0].as_bytes())
            .unwrap();
        let changed = Chunker::new(id(1), &message_of(700)).unwrap();
        assert_eq!(
            reassembler
                .accept(changed.frames()[1].as_bytes())
                .unwrap_err(),
            FrameError::TotalLengthChanged {
                expected: 600,
                received: 700
            }
        );
    }

    #[test]
    fn gaps_and_out_of_order_chunks_are_refused() {
        let chunker = Chunker::new(id(1), &message_of(600)).unwrap();
        let mut reassembler = Reassembler::new();
        // Out of order from the start: chunk 1 before chunk 0.
        assert_eq!(
            reassembler
                .accept(chunker.frames()[1].as_bytes())
                .unwrap_err(),
            FrameError::SequenceGap {
                expected: 0,
                received: 1
            }
        );
        reassembler.accept(chunker.frames()[0].as_bytes()).unwrap();
        // A gap: chunk 2 while chunk 1 is expected.
        assert_eq!(
            reassembler
                .accept(chunker.frames()[2].as_bytes())
                .unwrap_err(),
            FrameError::SequenceGap {
                expected: 1,
                received: 2
            }
        );
    }

    #[test]
    fn duplicate_chunk_is_idempotent_and_reacked() {
        let chunker = Chunker::new(id(1), &message_of(600)).unwrap();
        let mut reassembler = Reassembler::new();
        let first = reassembler.accept(chunker.frames()[0].as_bytes()).unwrap();
        let again = reassembler.accept(chunker.frames()[0].as_bytes()).unwrap();
        assert_eq!(first, again);
        reassembler.accept(chunker.frames()[1].as_bytes()).unwrap();
        let Progress::Complete { message, ack } =
            reassembler.accept(chunker.frames()[2].as_bytes()).unwrap()
        else {
            panic!("three chunks complete the message");
        };
        assert_eq!(message, message_of(600));
        // The last chunk resent after completion (final ack lost): re-acked, not redelivered.
        assert_eq!(
            reassembler.accept(chunker.frames()[2].as_bytes()).unwrap(),
            Progress::AlreadyComplete { ack }
        );
    }

    #[test]
    fn duplicate_with_other_payload_is_refused() {
        let chunker = Chunker::new(id(1), &message_of(600)).unwrap();
        let mut reassembler = Reassembler::new();
        reassembler.accept(chunker.frames()[0].as_bytes()).unwrap();
        reassembler.accept(chunker.frames()[1].as_bytes()).unwrap();
        let forged = craft(FrameType::Data, 1, 0, 600, &[0xAA; CHUNK_PAYLOAD_BYTES_MAX]);
        assert_eq!(
            reassembler.accept(&forged).unwrap_err(),
            FrameError::DuplicateMismatch { seq: 0 }
        );
    }

    #[test]
    fn endless_duplicates_are_refused() {
        let chunker = Chunker::new(id(1), &message_of(600)).unwrap();
        let mut reassembler = Reassembler::new();
        reassembler.accept(chunker.frames()[0].as_bytes()).unwrap();
        for _ in 0..DUPLICATES_PER_MESSAGE_MAX {
            reassembler.accept(chunker.frames()[0].as_bytes()).unwrap();
        }
        assert_eq!(
            reassembler
                .accept(chunker.frames()[0].as_bytes())
                .unwrap_err(),
            FrameError::TooManyDuplicates {
                max: DUPLICATES_PER_MESSAGE_MAX
            }
        );
    }

    #[test]
    fn wrong_message_digest_is_refused_and_resets() {
        let mut stream = b"hello".to_vec();
        stream.extend_from_slice(&[0u8; MESSAGE_DIGEST_BYTES]);
        let mut reassembler = Reassembler::new();
        assert_eq!(
            reassembler
                .accept(&craft(FrameType::Data, 1, 0, 5, &stream))
                .unwrap_err(),
            FrameError::MessageDigestMismatch
        );
        assert!(!reassembler.is_receiving());
    }

    #[test]
    fn abort_resets_the_receiver() {
        let chunker = Chunker::new(id(9), &message_of(600)).unwrap();
        let mut reassembler = Reassembler::new();
        reassembler.accept(chunker.frames()[0].as_bytes()).unwrap();
        assert!(reassembler.is_receiving());
        let abort = abort_frame(Some(id(9)), AbortReason::Cancelled);
        assert_eq!(
            reassembler.accept(abort.as_bytes()).unwrap_err(),
            FrameError::PeerAborted {
                reason: AbortReason::Cancelled
            }
        );
        assert!(!reassembler.is_receiving());
        assert_eq!(reassembler.current_ack(), Reassembler::ready_frame());
    }

    #[test]
    fn unknown_abort_reason_is_kept() {
        let abort = craft(FrameType::Abort, 0, 0, 0, &[0x42]);
        assert_eq!(
            Reassembler::new().accept(&abort).unwrap_err(),
            FrameError::PeerAborted {
                reason: AbortReason::Unknown(0x42)
            }
        );
    }

    #[test]
    fn explicit_reset_discards_a_partial_message() {
        let chunker = Chunker::new(id(1), &message_of(600)).unwrap();
        let mut reassembler = Reassembler::new();
        reassembler.accept(chunker.frames()[0].as_bytes()).unwrap();
        reassembler.reset();
        assert_eq!(
            reassembler
                .accept(chunker.frames()[1].as_bytes())
                .unwrap_err(),
            FrameError::SequenceGap {
                expected: 0,
                received: 1
            }
        );
    }

    #[test]
    fn ack_at_receiver_and_data_at_sender_are_refused() {
        assert_eq!(
            Reassembler::new()
                .accept(Reassembler::ready_frame().as_bytes())
                .unwrap_err(),
            FrameError::UnexpectedFrameType {
                expected: FrameType::Data,
                received: FrameType::Ack
            }
        );
        let mut chunker = Chunker::new(id(1), b"x").unwrap();
        let data = chunker.frames()[0].clone();
        assert_eq!(
            chunker.accept_ack(data.as_bytes()).unwrap_err(),
            FrameError::UnexpectedFrameType {
                expected: FrameType::Ack,
                received: FrameType::Data
            }
        );
    }

    #[test]
    fn abort_at_sender_is_reported() {
        let mut chunker = Chunker::new(id(1), b"x").unwrap();
        chunker.start().unwrap();
        let abort = abort_frame(Some(id(1)), AbortReason::MessageRefused);
        assert_eq!(
            chunker.accept_ack(abort.as_bytes()).unwrap_err(),
            FrameError::PeerAborted {
                reason: AbortReason::MessageRefused
            }
        );
    }

    #[test]
    fn sender_refuses_acks_that_do_not_fit() {
        let mut chunker = Chunker::new(id(5), &message_of(600)).unwrap();
        chunker.start().unwrap();
        assert_eq!(
            chunker
                .accept_ack(ack_frame(6, 1, 600).as_bytes())
                .unwrap_err(),
            FrameError::MessageIdChanged {
                expected: 5,
                received: 6
            }
        );
        assert_eq!(
            chunker
                .accept_ack(ack_frame(5, 1, 601).as_bytes())
                .unwrap_err(),
            FrameError::TotalLengthChanged {
                expected: 600,
                received: 601
            }
        );
        assert_eq!(
            chunker
                .accept_ack(ack_frame(5, 2, 600).as_bytes())
                .unwrap_err(),
            FrameError::AckOutOfRange {
                next_seq: 0,
                received: 2
            }
        );
        chunker.accept_ack(ack_frame(5, 1, 600).as_bytes()).unwrap();
        // Backwards, and a ready ack once the transfer has started.
        assert_eq!(
            chunker
                .accept_ack(ack_frame(5, 0, 600).as_bytes())
                .unwrap_err(),
            FrameError::AckOutOfRange {
                next_seq: 1,
                received: 0
            }
        );
        assert_eq!(
            chunker
                .accept_ack(Reassembler::ready_frame().as_bytes())
                .unwrap_err(),
            FrameError::AckOutOfRange {
                next_seq: 1,
                received: 0
            }
        );
        // A non-final ack carrying a digest.
        assert_eq!(
            chunker
                .accept_ack(&craft(
                    FrameType::Ack,
                    5,
                    2,
                    600,
                    &[0; MESSAGE_DIGEST_BYTES]
                ))
                .unwrap_err(),
            FrameError::PayloadLengthInvalid {
                frame_type: FrameType::Ack,
                length: 32
            }
        );
    }

    #[test]
    fn final_ack_must_carry_the_digest() {
        let mut chunker = Chunker::new(id(5), b"pay 12.50 EUR").unwrap();
        chunker.start().unwrap();
        assert_eq!(
            chunker
                .accept_ack(ack_frame(5, 1, 13).as_bytes())
                .unwrap_err(),
            FrameError::PayloadLengthInvalid {
                frame_type: FrameType::Ack,
                length: 0
            }
        );
        assert_eq!(
            chunker
                .accept_ack(&craft(FrameType::Ack, 5, 1, 13, &[0; MESSAGE_DIGEST_BYTES]))
                .unwrap_err(),
            FrameError::MessageDigestMismatch
        );
        assert!(!chunker.is_delivered());
        let good = craft(FrameType::Ack, 5, 1, 13, &chunker.digest());
        assert!(matches!(
            chunker.accept_ack(&good).unwrap(),
            SendProgress::Delivered { .. }
        ));
        // A repeated final ack (the closing answer was lost) is answered again.
        assert!(matches!(
            chunker.accept_ack(&good).unwrap(),
            SendProgress::Delivered { .. }
        ));
    }

    #[test]
    fn sender_gives_up_after_the_resend_limit() {
        let mut chunker = Chunker::new(id(5), &message_of(600)).unwrap();
        chunker.start().unwrap();
        let same = ack_frame(5, 0, 600);
        for _ in 0..RESENDS_PER_FRAME_MAX {
            assert!(matches!(
                chunker.accept_ack(same.as_bytes()).unwrap(),
                SendProgress::Send(_)
            ));
        }
        assert_eq!(
            chunker.accept_ack(same.as_bytes()).unwrap_err(),
            FrameError::ResendLimit {
                seq: 0,
                max: RESENDS_PER_FRAME_MAX
            }
        );
    }

    #[test]
    fn lost_exchanges_are_recovered_by_resending() {
        // Sender is initiator; the target's first answer to chunk 1 is lost, so the initiator
        // resends chunk 1 and the target re-acks it.
        let message = message_of(600);
        let mut chunker = Chunker::new(id(4), &message).unwrap();
        let mut reassembler = Reassembler::new();
        let frame0 = chunker.start().unwrap();
        let Progress::NeedMore { ack } = reassembler.accept(frame0.as_bytes()).unwrap() else {
            panic!("three chunks");
        };
        let SendProgress::Send(frame1) = chunker.accept_ack(ack.as_bytes()).unwrap() else {
            panic!("more to send");
        };
        let lost = reassembler.accept(frame1.as_bytes()).unwrap();
        let resent = reassembler.accept(frame1.as_bytes()).unwrap();
        assert_eq!(lost, resent);
        let Progress::NeedMore { ack } = resent else {
            panic!("one chunk left");
        };
        let SendProgress::Send(frame2) = chunker.accept_ack(ack.as_bytes()).unwrap() else {
            panic!("more to send");
        };
        let Progress::Complete { message: got, ack } =
            reassembler.accept(frame2.as_bytes()).unwrap()
        else {
            panic!("complete");
        };
        assert_eq!(got, message);
        assert!(matches!(
            chunker.accept_ack(ack.as_bytes()).unwrap(),
            SendProgress::Delivered { .. }
        ));
    }

    /// The example of docs/nfc-framing.md, computed there independently (Python's zlib and
    /// hashlib): a 240-byte message `00 01 .. EF`, message ID 0x5EED0001.
    #[test]
    fn matches_the_documented_example() {
        let message: Vec<u8> = (0..240u8).collect();
        let chunker = Chunker::new(id(0x5EED_0001), &message).unwrap();
        let frames = chunker.frames();
        assert_eq!(frames.len(), 2);
        assert_eq!(
            hex::encode_upper(&frames[0].as_bytes()[..FRAME_HEADER_BYTES]),
            DOC_FRAME0_HEADER
        );
        assert_eq!(
            hex::encode_upper(&frames[0].as_bytes()[258..]),
            DOC_FRAME0_CRC
        );
        assert_eq!(hex::encode_upper(frames[1].as_bytes()), DOC_FRAME1);
        let mut reassembler = Reassembler::new();
        let Progress::NeedMore { ack } = reassembler.accept(frames[0].as_bytes()).unwrap() else {
            panic!("two chunks");
        };
        assert_eq!(hex::encode_upper(ack.as_bytes()), DOC_ACK1);
        let Progress::Complete { ack, .. } = reassembler.accept(frames[1].as_bytes()).unwrap()
        else {
            panic!("complete");
        };
        assert_eq!(hex::encode_upper(ack.as_bytes()), DOC_FINAL_ACK);
        assert_eq!(
            hex::encode_upper(Reassembler::ready_frame().as_bytes()),
            DOC_READY
        );
        assert_eq!(
            hex::encode_upper(
                abort_frame(Some(id(0x5EED_0001)), AbortReason::Cancelled).as_bytes()
            ),
            DOC_ABORT
        );
    }

    const DOC_FRAME0_HEADER: &str = "4E01015EED00010000000000F000F3";
    const DOC_FRAME0_CRC: &str = "19EA861F";
    const DOC_FRAME1: &str = "4E01015EED00010001000000F0001DFCDDB38BBF3855E47B5E61B75DEDBCF42AA44FFD4BB85D0B08D97E268205292E65";
    const DOC_ACK1: &str = "4E01025EED00010001000000F00000302B3F47";
    const DOC_FINAL_ACK: &str = "4E01025EED00010002000000F00020ABF4BAFCDDB38BBF3855E47B5E61B75DEDBCF42AA44FFD4BB85D0B08D97E2682363AD6C8";
    const DOC_READY: &str = "4E01020000000000000000000000000D0834D2";
    const DOC_ABORT: &str = "4E01035EED00010000000000000001018355E619";

    proptest! {
        #[test]
        fn every_frame_fits_one_exchange(
            message in proptest::collection::vec(any::<u8>(), 0..=MESSAGE_BYTES_MAX),
            message_id in 1u32..,
        ) {
            let chunker = Chunker::new(id(message_id), &message).unwrap();
            prop_assert!(chunker.frames().len() <= CHUNKS_MAX);
            for frame in chunker.frames() {
                prop_assert!(frame.len() <= NFC_EXCHANGE_BYTES_MAX);
            }
            prop_assert_eq!(deliver_sender_initiates(id(message_id), &message), message.clone());
            prop_assert_eq!(deliver_sender_is_target(id(message_id), &message), message);
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut reassembler = Reassembler::new();
            let _ = reassembler.accept(&bytes);
            let _ = reassembler.current_ack();
            let mut chunker = Chunker::new(id(1), b"x").unwrap();
            let _ = chunker.accept_ack(&bytes);
        }

        #[test]
        fn edited_headers_with_valid_crc_never_panic(
            message in proptest::collection::vec(any::<u8>(), 0..1000),
            edits in proptest::collection::vec((0..FRAME_HEADER_BYTES, any::<u8>()), 1..4),
            which in any::<prop::sample::Index>(),
        ) {
            let chunker = Chunker::new(id(1), &message).unwrap();
            let mut reassembler = Reassembler::new();
            let index = which.index(chunker.frames().len());
            for frame in &chunker.frames()[..index] {
                reassembler.accept(frame.as_bytes()).unwrap();
            }
            let mut bytes = chunker.frames()[index].clone().into_bytes();
            for (offset, value) in edits {
                bytes[offset] = value;
            }
            fix_crc(&mut bytes);
            let _ = reassembler.accept(&bytes);
            let mut sender = Chunker::new(id(1), &message).unwrap();
            let _ = sender.accept_ack(&bytes);
        }

        #[test]
        fn duplicates_still_reassemble_the_exact_message(
            message in proptest::collection::vec(any::<u8>(), 0..=MESSAGE_BYTES_MAX),
            repeats in proptest::collection::vec(0usize..=1, CHUNKS_MAX),
        ) {
            let chunker = Chunker::new(id(77), &message).unwrap();
            let mut reassembler = Reassembler::new();
            let mut received = None;
            for (seq, frame) in chunker.frames().iter().enumerate() {
                // Each chunk arrives once, maybe again (its ack was lost), and then maybe the
                // chunk before it once more: at most DUPLICATES_PER_MESSAGE_MAX duplicates.
                for _ in 0..=repeats[seq] {
                    match reassembler.accept(frame.as_bytes()).unwrap() {
                        Progress::Complete { message, .. } => {
                            prop_assert!(received.is_none());
                            received = Some(message);
                        }
                        Progress::NeedMore { .. } | Progress::AlreadyComplete { .. } => {}
                    }
                }
                if seq > 0 && repeats[seq] == 1 {
                    let earlier = &chunker.frames()[seq - 1];
                    let progress = reassembler.accept(earlier.as_bytes()).unwrap();
                    let completed_again = matches!(progress, Progress::Complete { .. });
                    prop_assert!(!completed_again);
                }
            }
            prop_assert_eq!(received, Some(message));
        }
    }
}
