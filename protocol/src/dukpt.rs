//! AES DUKPT (Derived Unique Key Per Transaction) arithmetic of ANSI X9.24-3-2017.
//!
//! Every DUKPT key is derived the same way: AES-ECB encryption, under a derivation key, of one
//! or two 16-byte blocks of [`DerivationData`], truncated to the new key's length. This module
//! builds those blocks and decides which derivations to run; the encryption itself is done by
//! the caller's keystore (through [`DeriveKey`] on a terminal, or by walking
//! [`transaction_key_path`] on the host), so no key ever passes through this crate.
//!
//! ```text
//! BDK ──(initial key data: IK ID)──▶ IK ──(one step per one-bit of the counter)──▶
//!     transaction key ──(working key data: usage, algorithm, KSN)──▶ working keys
//! ```

use std::fmt;
use std::str::FromStr;

use crate::error::ProtocolError;
use crate::ids::{InitialKeyId, Ksn, TRANSACTION_COUNTER_ONE_BITS_MAX, TransactionCounter};

/// Number of future-key registers a terminal keeps: one per bit of the counter.
pub const FUTURE_KEY_REGISTERS: usize = 32;
/// Size of one block of derivation data, in bytes.
pub const DERIVATION_BLOCK_BYTES: usize = 16;

/// The AES key lengths DUKPT derives.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum KeyAlgorithm {
    /// AES with a 128-bit key.
    Aes128,
    /// AES with a 192-bit key.
    Aes192,
    /// AES with a 256-bit key.
    Aes256,
}

impl KeyAlgorithm {
    /// Key length in bytes.
    pub fn key_bytes(self) -> usize {
        match self {
            Self::Aes128 => 16,
            Self::Aes192 => 24,
            Self::Aes256 => 32,
        }
    }

    /// The algorithm indicator of the derivation data (X9.24-3-2017, table 2).
    fn indicator(self) -> u16 {
        match self {
            Self::Aes128 => 0x0002,
            Self::Aes192 => 0x0003,
            Self::Aes256 => 0x0004,
        }
    }

    /// The algorithm of a key of `key_bytes` bytes.
    pub fn from_key_bytes(key_bytes: usize) -> Result<Self, ProtocolError> {
        match key_bytes {
            16 => Ok(Self::Aes128),
            24 => Ok(Self::Aes192),
            32 => Ok(Self::Aes256),
            _ => Err(ProtocolError::Invalid {
                field: "AES key",
                reason: "must be 16, 24 or 32 bytes",
            }),
        }
    }

    /// Number of derivation blocks needed for a key of this length.
    fn blocks(self) -> usize {
        self.key_bytes().div_ceil(DERIVATION_BLOCK_BYTES)
    }

    /// Operator-facing name, as accepted by `FromStr`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Aes128 => "aes128",
            Self::Aes192 => "aes192",
            Self::Aes256 => "aes256",
        }
    }
}

impl fmt::Display for KeyAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for KeyAlgorithm {
    type Err = ProtocolError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "aes128" | "aes-128" => Ok(Self::Aes128),
            "aes192" | "aes-192" => Ok(Self::Aes192),
            "aes256" | "aes-256" => Ok(Self::Aes256),
            _ => Err(ProtocolError::Invalid {
                field: "key algorithm",
                reason: "expected aes128, aes192 or aes256",
            }),
        }
    }
}

/// What a working key may be used for (X9.24-3-2017 key usage indicators).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum WorkingKeyUsage {
    /// Key encryption key.
    KeyEncryption,
    /// PIN encryption.
    PinEncryption,
    /// MAC generation.
    MacGeneration,
    /// MAC verification.
    MacVerification,
    /// MAC generation and verification.
    MacBoth,
    /// Data encryption, encrypt only.
    DataEncrypt,
    /// Data encryption, decrypt only.
    DataDecrypt,
    /// Data encryption, both ways.
    DataBoth,
}

impl WorkingKeyUsage {
    /// Every working key usage, in the order of the standard's table.
    pub const ALL: [Self; 8] = [
        Self::KeyEncryption,
        Self::PinEncryption,
        Self::MacGeneration,
        Self::MacVerification,
        Self::MacBoth,
        Self::DataEncrypt,
        Self::DataDecrypt,
        Self::DataBoth,
    ];

    fn indicator(self) -> u16 {
        match self {
            Self::KeyEncryption => 0x0002,
            Self::PinEncryption => 0x1000,
            Self::MacGeneration => 0x2000,
            Self::MacVerification => 0x2001,
            Self::MacBoth => 0x2002,
            Self::DataEncrypt => 0x3000,
            Self::DataDecrypt => 0x3001,
            Self::DataBoth => 0x3002,
        }
    }

    /// Operator-facing name, as accepted by `FromStr`.
    pub fn name(self) -> &'static str {
        match self {
            Self::KeyEncryption => "kek",
            Self::PinEncryption => "pin",
            Self::MacGeneration => "mac-gen",
            Self::MacVerification => "mac-verify",
            Self::MacBoth => "mac-both",
            Self::DataEncrypt => "data-encrypt",
            Self::DataDecrypt => "data-decrypt",
            Self::DataBoth => "data-both",
        }
    }
}

impl fmt::Display for WorkingKeyUsage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for WorkingKeyUsage {
    type Err = ProtocolError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|usage| usage.name() == s)
            .ok_or(ProtocolError::Invalid {
                field: "key usage",
                reason: "expected data-both, data-encrypt, data-decrypt, mac-gen, mac-verify, \
                         mac-both, pin or kek",
            })
    }
}

/// Key usage indicator of an intermediate derivation key.
const USAGE_KEY_DERIVATION: u16 = 0x8000;
/// Key usage indicator of an initial key.
const USAGE_KEY_DERIVATION_INITIAL_KEY: u16 = 0x8001;

/// The input of one DUKPT derivation: one block per 128 bits of the derived key.
///
/// Block layout (X9.24-3-2017 §6.3.2): version `01` | key block counter (1, 2) | key usage
/// indicator (2) | algorithm indicator (2) | key length in bits (2) | 8 bytes of context — the
/// Initial Key ID for an initial key, else derivation ID (4) followed by a counter (4).
#[derive(Clone, PartialEq, Eq)]
pub struct DerivationData {
    blocks: [u8; 2 * DERIVATION_BLOCK_BYTES],
    derived_algorithm: KeyAlgorithm,
}

impl DerivationData {
    fn new(usage: u16, derived_algorithm: KeyAlgorithm, context: [u8; 8]) -> Self {
        let mut blocks = [0u8; 2 * DERIVATION_BLOCK_BYTES];
        let bits = u16::try_from(derived_algorithm.key_bytes() * 8).unwrap_or(u16::MAX);
        for (index, block) in blocks.chunks_exact_mut(DERIVATION_BLOCK_BYTES).enumerate() {
            block[0] = 0x01;
            block[1] = u8::try_from(index + 1).unwrap_or(u8::MAX);
            block[2..4].copy_from_slice(&usage.to_be_bytes());
            block[4..6].copy_from_slice(&derived_algorithm.indicator().to_be_bytes());
            block[6..8].copy_from_slice(&bits.to_be_bytes());
            block[8..16].copy_from_slice(&context);
        }
        Self {
            blocks,
            derived_algorithm,
        }
    }

    /// Data deriving a terminal's initial key from the BDK.
    pub fn initial_key(algorithm: KeyAlgorithm, initial_key_id: InitialKeyId) -> Self {
        Self::new(
            USAGE_KEY_DERIVATION_INITIAL_KEY,
            algorithm,
            initial_key_id.to_bytes(),
        )
    }

    /// Data deriving the intermediate derivation key for `counter_bits` (any prefix of a
    /// transaction counter, so not necessarily a valid counter itself).
    pub fn intermediate(
        algorithm: KeyAlgorithm,
        initial_key_id: InitialKeyId,
        counter_bits: u32,
    ) -> Self {
        Self::new(
            USAGE_KEY_DERIVATION,
            algorithm,
            counter_context(initial_key_id, counter_bits),
        )
    }

    /// Data deriving a working key of `algorithm` for `usage` from the transaction key of `ksn`.
    pub fn working_key(usage: WorkingKeyUsage, algorithm: KeyAlgorithm, ksn: Ksn) -> Self {
        Self::new(
            usage.indicator(),
            algorithm,
            counter_context(ksn.initial_key_id(), ksn.counter().get()),
        )
    }

    /// The bytes to encrypt with AES-ECB under the derivation key: 16 or 32 bytes. The first
    /// [`KeyAlgorithm::key_bytes`] bytes of the ciphertext are the derived key.
    pub fn as_bytes(&self) -> &[u8] {
        &self.blocks[..self.derived_algorithm.blocks() * DERIVATION_BLOCK_BYTES]
    }

    /// The algorithm (length) of the key this data derives.
    pub fn derived_algorithm(&self) -> KeyAlgorithm {
        self.derived_algorithm
    }
}

impl fmt::Debug for DerivationData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DerivationData({})", hex::encode_upper(self.as_bytes()))
    }
}

fn counter_context(initial_key_id: InitialKeyId, counter_bits: u32) -> [u8; 8] {
    let mut context = [0u8; 8];
    context[..4].copy_from_slice(&initial_key_id.derivation_id().to_bytes());
    context[4..].copy_from_slice(&counter_bits.to_be_bytes());
    context
}

/// The partial counters the host walks from the initial key to the transaction key of
/// `counter`: one per one-bit, most significant first, each the counter's bits so far.
///
/// Two KSNs of one terminal share the prefix of this path up to their first differing bit,
/// which is what makes a cache of intermediate keys effective.
pub fn intermediate_counters(counter: TransactionCounter) -> impl Iterator<Item = u32> {
    let value = counter.get();
    (0..32u32).rev().filter_map(move |bit| {
        let mask = 1u32 << bit;
        (value & mask != 0).then(|| value & !(mask - 1))
    })
}

/// The derivation data the host applies, in order, to the initial key of `ksn` to reach its
/// transaction key (X9.24-3-2017 host algorithm).
pub fn transaction_key_path(
    algorithm: KeyAlgorithm,
    ksn: Ksn,
) -> impl Iterator<Item = DerivationData> {
    let initial_key_id = ksn.initial_key_id();
    intermediate_counters(ksn.counter())
        .map(move |bits| DerivationData::intermediate(algorithm, initial_key_id, bits))
}

/// A keystore operation the terminal state machine needs: derive a key from a key.
pub trait DeriveKey {
    /// A key held by the keystore (a handle, or zeroizing bytes).
    type Key;
    /// The keystore's error; protocol errors (end of life) convert into it.
    type Error: From<ProtocolError>;

    /// AES-ECB-encrypts `data.as_bytes()` under `base` and keeps the first
    /// `data.derived_algorithm().key_bytes()` bytes as a new key.
    fn derive(&mut self, base: &Self::Key, data: &DerivationData)
    -> Result<Self::Key, Self::Error>;

    /// Destroys a key that is no longer needed.
    fn discard(&mut self, key: Self::Key) -> Result<(), Self::Error>;
}

/// A terminal's DUKPT state: the X9.24-3-2017 terminal algorithm.
///
/// It holds only *future* keys: register `i` holds the intermediate derivation key of the next
/// counter whose lowest one-bit is bit `i`. Taking a transaction key removes it from its
/// register and refills the lower registers from it, so after a key is used nothing that could
/// re-derive it remains, and a stolen terminal cannot recover past transaction keys.
pub struct TerminalState<K> {
    initial_key_id: InitialKeyId,
    algorithm: KeyAlgorithm,
    /// The counter the next transaction will use; `None` at end of life.
    next_counter: Option<u32>,
    registers: [Option<K>; FUTURE_KEY_REGISTERS],
}

impl<K> TerminalState<K> {
    /// Loads an initial key: fills all 32 registers from it, then discards it.
    pub fn load_initial_key<D: DeriveKey<Key = K>>(
        keystore: &mut D,
        initial_key: K,
        algorithm: KeyAlgorithm,
        initial_key_id: InitialKeyId,
    ) -> Result<Self, D::Error> {
        let mut state = Self {
            initial_key_id,
            algorithm,
            next_counter: Some(1),
            registers: std::array::from_fn(|_| None),
        };
        let filled = state.fill_registers(keystore, &initial_key, 0, FUTURE_KEY_REGISTERS);
        let discarded = keystore.discard(initial_key);
        if let Err(error) = filled {
            state.discard_all(keystore);
            return Err(error);
        }
        discarded?;
        Ok(state)
    }

    /// Rebuilds a state saved with [`TerminalState::next_counter`] and
    /// [`TerminalState::registers`]. `next_counter` is `None` at end of life.
    pub fn from_parts(
        initial_key_id: InitialKeyId,
        algorithm: KeyAlgorithm,
        next_counter: Option<u32>,
        registers: [Option<K>; FUTURE_KEY_REGISTERS],
    ) -> Result<Self, ProtocolError> {
        if let Some(counter) = next_counter {
            TransactionCounter::try_from(counter)?;
        }
        Ok(Self {
            initial_key_id,
            algorithm,
            next_counter,
            registers,
        })
    }

    /// The terminal's Initial Key ID.
    pub fn initial_key_id(&self) -> InitialKeyId {
        self.initial_key_id
    }

    /// The algorithm of the terminal's keys.
    pub fn algorithm(&self) -> KeyAlgorithm {
        self.algorithm
    }

    /// The counter the next transaction will use, or `None` at end of life.
    pub fn next_counter(&self) -> Option<u32> {
        self.next_counter
    }

    /// The future-key registers (for saving the state).
    pub fn registers(&self) -> &[Option<K>; FUTURE_KEY_REGISTERS] {
        &self.registers
    }

    /// How many transactions the terminal can still make, counting only valid counters.
    pub fn transactions_left(&self) -> u64 {
        let Some(next) = self.next_counter else {
            return 0;
        };
        valid_counters_up_to(crate::ids::TRANSACTION_COUNTER_MAX)
            - valid_counters_up_to(next.saturating_sub(1))
    }

    /// Takes the transaction key of the next counter and advances the state.
    ///
    /// The caller must save the new state durably *before* using the returned key, so that a
    /// crash can never lead to the same counter being used twice; and discard the key after use.
    pub fn next_transaction_key<D: DeriveKey<Key = K>>(
        &mut self,
        keystore: &mut D,
    ) -> Result<(Ksn, K), D::Error> {
        loop {
            let counter = self.next_counter.ok_or(ProtocolError::EndOfLife)?;
            let current = counter.trailing_zeros() as usize;
            let Some(key) = self.registers[current].take() else {
                // No future key for this counter (never the case in a state this type built):
                // skip every counter that would need it.
                self.next_counter = advance(counter, 1 << current);
                continue;
            };
            let ksn = Ksn::new(self.initial_key_id, TransactionCounter::try_from(counter)?);
            if counter.count_ones() < TRANSACTION_COUNTER_ONE_BITS_MAX {
                if let Err(error) = self.fill_registers(keystore, &key, counter, current) {
                    self.registers[current] = Some(key);
                    return Err(error);
                }
                self.next_counter = advance(counter, 1);
            } else {
                // Every counter above this one with more bits would have too many one-bits.
                self.next_counter = advance(counter, 1 << current);
            }
            return Ok((ksn, key));
        }
    }

    /// Derives registers `below - 1` down to 0 from `base`, the key of `counter`.
    fn fill_registers<D: DeriveKey<Key = K>>(
        &mut self,
        keystore: &mut D,
        base: &K,
        counter: u32,
        below: usize,
    ) -> Result<(), D::Error> {
        for index in (0..below).rev() {
            let bits = counter | (1 << index);
            let data = DerivationData::intermediate(self.algorithm, self.initial_key_id, bits);
            let key = keystore.derive(base, &data)?;
            if let Some(old) = self.registers[index].replace(key) {
                keystore.discard(old)?;
            }
        }
        Ok(())
    }

    /// Discards every register (used when a state is abandoned half-built).
    pub fn discard_all<D: DeriveKey<Key = K>>(&mut self, keystore: &mut D) {
        for register in &mut self.registers {
            if let Some(key) = register.take() {
                // Best effort: the state is being abandoned anyway.
                let _ = keystore.discard(key);
            }
        }
        self.next_counter = None;
    }
}

/// The next counter after adding `step`, or `None` past the last valid counter.
fn advance(counter: u32, step: u32) -> Option<u32> {
    counter
        .checked_add(step)
        .filter(|&next| TransactionCounter::is_valid(next))
}

/// How many valid counters (1 ..= `limit`, at most 16 one-bits) there are.
fn valid_counters_up_to(limit: u32) -> u64 {
    // Count numbers in 0..=limit with at most 16 one-bits, walking limit's bits from the top.
    let mut binomial = [[0u64; 33]; 33];
    for n in 0..33 {
        binomial[n][0] = 1;
        for k in 1..=n {
            binomial[n][k] = binomial[n - 1][k - 1] + binomial[n - 1][k];
        }
    }
    let max_ones = TRANSACTION_COUNTER_ONE_BITS_MAX as usize;
    let mut count = 0u64;
    let mut ones_so_far = 0usize;
    for bit in (0..32usize).rev() {
        if limit & (1 << bit) != 0 {
            // Numbers with this bit 0 and any lower bits.
            count += binomial[bit][..=max_ones - ones_so_far].iter().sum::<u64>();
            ones_so_far += 1;
            if ones_so_far > max_ones {
                return count - 1;
            }
        }
    }
    // Plus `limit` itself, minus zero (counted in the first branch, but not a counter).
    count
}

#[cfg(test)]
mod tests {
    use super::*;

    fn initial_key_id() -> InitialKeyId {
        "1234567890123456".parse().unwrap()
    }

    #[test]
    fn derivation_data_has_the_standard_layout() {
        let initial = DerivationData::initial_key(KeyAlgorithm::Aes128, initial_key_id());
        assert_eq!(
            hex::encode_upper(initial.as_bytes()),
            "01018001000200801234567890123456"
        );
        let intermediate =
            DerivationData::intermediate(KeyAlgorithm::Aes256, initial_key_id(), 0x0001_0000);
        assert_eq!(
            hex::encode_upper(intermediate.as_bytes()),
            "0101800000040100901234560001000001028000000401009012345600010000"
        );
        let ksn: Ksn = "123456789012345600000005".parse().unwrap();
        let working =
            DerivationData::working_key(WorkingKeyUsage::MacBoth, KeyAlgorithm::Aes192, ksn);
        assert_eq!(
            hex::encode_upper(working.as_bytes()),
            "01012002000300C09012345600000005\
             01022002000300C09012345600000005"
        );
    }

    #[test]
    fn host_path_walks_one_bits_from_the_top() {
        let counter = TransactionCounter::try_from(0b1011_0000).unwrap();
        let path: Vec<u32> = intermediate_counters(counter).collect();
        assert_eq!(path, [0b1000_0000, 0b1010_0000, 0b1011_0000]);
    }

    #[test]
    fn usage_and_algorithm_names_round_trip() {
        for usage in WorkingKeyUsage::ALL {
            assert_eq!(usage.name().parse::<WorkingKeyUsage>().unwrap(), usage);
        }
        assert!("data".parse::<WorkingKeyUsage>().is_err());
        for algorithm in [
            KeyAlgorithm::Aes128,
            KeyAlgorithm::Aes192,
            KeyAlgorithm::Aes256,
        ] {
            assert_eq!(algorithm.name().parse::<KeyAlgorithm>().unwrap(), algorithm);
        }
        assert!("des".parse::<KeyAlgorithm>().is_err());
    }

    /// A toy keystore: a "key" is the list of derivation data applied since the initial key,
    /// which lets the tests check what each register was derived from.
    #[derive(Default)]
    struct PathKeystore {
        live: usize,
    }

    impl DeriveKey for PathKeystore {
        type Key = Vec<u32>;
        type Error = ProtocolError;
        fn derive(
            &mut self,
            base: &Vec<u32>,
            data: &DerivationData,
        ) -> Result<Vec<u32>, ProtocolError> {
            let bytes = data.as_bytes();
            let bits = u32::from_be_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]);
            self.live += 1;
            Ok(base.iter().copied().chain([bits]).collect())
        }
        fn discard(&mut self, _key: Vec<u32>) -> Result<(), ProtocolError> {
            self.live -= 1;
            Ok(())
        }
    }

    #[test]
    fn terminal_keys_follow_the_host_path() {
        let mut keystore = PathKeystore { live: 1 };
        let mut state = TerminalState::load_initial_key(
            &mut keystore,
            vec![],
            KeyAlgorithm::Aes128,
            initial_key_id(),
        )
        .unwrap();
        assert_eq!(
            keystore.live, 32,
            "the initial key is discarded after loading"
        );
        for _ in 0..300 {
            let (ksn, key) = state.next_transaction_key(&mut keystore).unwrap();
            let host: Vec<u32> = intermediate_counters(ksn.counter()).collect();
            assert_eq!(key, host, "terminal and host disagree at {ksn}");
            keystore.discard(key).unwrap();
            assert!(keystore.live <= FUTURE_KEY_REGISTERS);
        }
    }

    #[test]
    fn terminal_skips_counters_with_more_than_16_one_bits() {
        let mut keystore = PathKeystore::default();
        // Rebuild a state just before the rollover: registers as the terminal would hold them.
        let registers = std::array::from_fn(|index| {
            let counter = 0x0001_FFFEu32;
            (index == 1)
                .then(|| {
                    intermediate_counters(TransactionCounter::try_from(counter).unwrap()).collect()
                })
                .or_else(|| (index >= 17).then(|| vec![1 << index]))
        });
        let mut state = TerminalState::from_parts(
            initial_key_id(),
            KeyAlgorithm::Aes128,
            Some(0x0001_FFFE),
            registers,
        )
        .unwrap();
        let (ksn, _) = state.next_transaction_key(&mut keystore).unwrap();
        assert_eq!(ksn.counter().get(), 0x0001_FFFE);
        assert_eq!(state.next_counter(), Some(0x0002_0000));
        let (ksn, key) = state.next_transaction_key(&mut keystore).unwrap();
        assert_eq!(ksn.counter().get(), 0x0002_0000);
        assert_eq!(key, vec![0x0002_0000]);
    }

    #[test]
    fn terminal_reaches_end_of_life_after_the_last_counter() {
        let mut keystore = PathKeystore::default();
        let registers = std::array::from_fn(|index| (index == 16).then(|| vec![0xFFFF_0000]));
        let mut state = TerminalState::from_parts(
            initial_key_id(),
            KeyAlgorithm::Aes128,
            Some(0xFFFF_0000),
            registers,
        )
        .unwrap();
        assert_eq!(state.transactions_left(), 1);
        let (ksn, _) = state.next_transaction_key(&mut keystore).unwrap();
        assert_eq!(ksn.counter().get(), 0xFFFF_0000);
        assert_eq!(state.next_counter(), None);
        assert_eq!(state.transactions_left(), 0);
        assert!(matches!(
            state.next_transaction_key(&mut keystore),
            Err(ProtocolError::EndOfLife)
        ));
    }

    #[test]
    fn counting_valid_counters() {
        assert_eq!(valid_counters_up_to(0), 0);
        assert_eq!(valid_counters_up_to(1), 1);
        assert_eq!(valid_counters_up_to(0xFFFF), 0xFFFF);
        // 0x1FFFF has 17 one-bits and is the only invalid counter up to it.
        assert_eq!(valid_counters_up_to(0x1FFFF), 0x1FFFF - 1);
        let brute = (1..=0x3FFFFu32)
            .filter(|&c| TransactionCounter::is_valid(c))
            .count() as u64;
        assert_eq!(valid_counters_up_to(0x3FFFF), brute);
    }
}
