//! Known-answer tests of the DUKPT arithmetic against the published ANSI X9.24-3-2017 vectors.
//!
//! The block cipher here is a plain software AES (test only): what is under test is the
//! derivation data, the host path and the terminal's register machine.

// A panic is how a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use aes::cipher::{BlockCipherEncrypt, KeyInit};
use nfcpay_protocol::dukpt::{
    DerivationData, DeriveKey, FUTURE_KEY_REGISTERS, TerminalState, transaction_key_path,
};
use nfcpay_protocol::{InitialKeyId, Ksn, ProtocolError, TransactionCounter};

use nfcpay_protocol::test_vectors as x9_24_3_vectors;
use x9_24_3_vectors::{
    AES128_BDK, AES128_INTERMEDIATE_DERIVATION_KEY_REGISTERS_AFTER_LOAD,
    AES128_TERMINAL_KSN_SEQUENCE, AES128_TERMINAL_KSN_SEQUENCE_END,
    AES128_TERMINAL_KSN_SEQUENCE_ROLLOVER, BdkVectors, VECTORS,
};

/// AES-ECB encryption of `data` under `key`, truncated to `length` bytes.
fn ecb_derive(key: &[u8], data: &DerivationData) -> Vec<u8> {
    let mut out = data.as_bytes().to_vec();
    for block in out.chunks_exact_mut(16) {
        let block: &mut [u8; 16] = block.try_into().unwrap();
        let mut array = (*block).into();
        match key.len() {
            16 => aes::Aes128::new_from_slice(key)
                .unwrap()
                .encrypt_block(&mut array),
            24 => aes::Aes192::new_from_slice(key)
                .unwrap()
                .encrypt_block(&mut array),
            32 => aes::Aes256::new_from_slice(key)
                .unwrap()
                .encrypt_block(&mut array),
            n => panic!("bad key length {n}"),
        }
        *block = array.into();
    }
    out.truncate(data.derived_algorithm().key_bytes());
    out
}

/// The reference "keystore" of these tests: keys are plain byte vectors.
struct ClearKeys;

impl DeriveKey for ClearKeys {
    type Key = Vec<u8>;
    type Error = ProtocolError;
    fn derive(&mut self, base: &Vec<u8>, data: &DerivationData) -> Result<Vec<u8>, ProtocolError> {
        Ok(ecb_derive(base, data))
    }
    fn discard(&mut self, _key: Vec<u8>) -> Result<(), ProtocolError> {
        Ok(())
    }
}

fn bytes(hex_digits: &str) -> Vec<u8> {
    hex::decode(hex_digits).unwrap()
}

fn initial_key(set: &BdkVectors) -> Vec<u8> {
    let initial_key_id: InitialKeyId = set.initial_key_id.parse().unwrap();
    ecb_derive(
        &bytes(set.bdk),
        &DerivationData::initial_key(set.algorithm(), initial_key_id),
    )
}

/// The valid KSNs of a set (the sources also list 0x1FFFF and 0xFFFFFFFF, which no terminal
/// may use and which [`Ksn`] refuses; that refusal is checked separately).
fn valid_transactions(
    set: &'static BdkVectors,
) -> impl Iterator<Item = (Ksn, &'static x9_24_3_vectors::TransactionVectors)> {
    set.transactions
        .iter()
        .filter_map(|txn| txn.ksn.parse::<Ksn>().ok().map(|ksn| (ksn, txn)))
}

#[test]
fn initial_keys_match() {
    for set in VECTORS {
        assert_eq!(
            hex::encode_upper(initial_key(set)),
            set.initial_key,
            "{}",
            set.name
        );
        let initial_key_id: InitialKeyId = set.initial_key_id.parse().unwrap();
        let data = DerivationData::initial_key(set.algorithm(), initial_key_id);
        for (block, published) in data
            .as_bytes()
            .chunks(16)
            .zip(set.initial_key_derivation_data)
        {
            assert_eq!(hex::encode_upper(block), *published, "{}", set.name);
        }
    }
}

#[test]
fn host_transaction_and_working_keys_match() {
    let mut checked = 0;
    for set in VECTORS {
        let bdk_algorithm = set.algorithm();
        for (ksn, txn) in valid_transactions(set) {
            let mut key = initial_key(set);
            for data in transaction_key_path(bdk_algorithm, ksn) {
                key = ecb_derive(&key, &data);
            }
            if !txn.transaction_key.is_empty() {
                assert_eq!(
                    hex::encode_upper(&key),
                    txn.transaction_key,
                    "{} {ksn}",
                    set.name
                );
                checked += 1;
            }
            for working in txn.working_keys {
                let data =
                    DerivationData::working_key(working.key_usage(), working.key_algorithm(), ksn);
                // Published derivation data is the last block (see the vectors' notes).
                if let Some(published) = working.derivation_data.first() {
                    let last_block = data.as_bytes().chunks(16).last().unwrap();
                    assert_eq!(
                        hex::encode_upper(last_block),
                        *published,
                        "{} {ksn}",
                        set.name
                    );
                }
                assert_eq!(
                    hex::encode_upper(ecb_derive(&key, &data)),
                    working.key,
                    "{} {ksn} {} {}",
                    set.name,
                    working.usage,
                    working.algorithm
                );
                checked += 1;
            }
        }
    }
    assert!(checked > 100, "only {checked} vectors checked");
}

#[test]
fn published_invalid_counters_are_refused() {
    for counter in ["0001FFFF", "FFFFFFFF"] {
        let ksn = format!("{}{counter}", AES128_BDK.initial_key_id);
        assert!(ksn.parse::<Ksn>().is_err(), "{ksn} accepted");
    }
}

fn loaded_terminal(set: &BdkVectors) -> TerminalState<Vec<u8>> {
    TerminalState::load_initial_key(
        &mut ClearKeys,
        initial_key(set),
        set.algorithm(),
        set.initial_key_id.parse().unwrap(),
    )
    .unwrap()
}

#[test]
fn terminal_registers_after_load_match() {
    let state = loaded_terminal(&AES128_BDK);
    let registers: Vec<String> = state
        .registers()
        .iter()
        .map(|key| hex::encode_upper(key.as_ref().unwrap()))
        .collect();
    assert_eq!(
        registers,
        AES128_INTERMEDIATE_DERIVATION_KEY_REGISTERS_AFTER_LOAD
    );
}

#[test]
fn terminal_emits_the_first_ksns_and_their_keys() {
    for set in VECTORS {
        let mut state = loaded_terminal(set);
        for expected in AES128_TERMINAL_KSN_SEQUENCE {
            let (ksn, key) = state.next_transaction_key(&mut ClearKeys).unwrap();
            assert_eq!(ksn.to_string(), *expected, "{}", set.name);
            let published = set
                .transactions
                .iter()
                .find(|txn| txn.ksn == *expected)
                .unwrap();
            assert_eq!(
                hex::encode_upper(key),
                published.transaction_key,
                "{} {ksn}",
                set.name
            );
            // After use, no register holds the key just used.
            assert!(
                state
                    .registers()
                    .iter()
                    .flatten()
                    .all(|k| hex::encode_upper(k) != published.transaction_key)
            );
        }
    }
}

/// Rebuilds the state a terminal has right before using `counter`, by replaying its register
/// fills along the way with the clear reference (the counter's future keys are exactly the
/// host keys of `counter` with one more low bit, and of the higher prefixes).
fn terminal_at(set: &BdkVectors, counter: u32) -> TerminalState<Vec<u8>> {
    let bdk_algorithm = set.algorithm();
    let initial_key_id: InitialKeyId = set.initial_key_id.parse().unwrap();
    let host_key = |bits: u32| {
        let mut key = initial_key(set);
        let ksn = Ksn::new(initial_key_id, TransactionCounter::try_from(bits).unwrap());
        for data in transaction_key_path(bdk_algorithm, ksn) {
            key = ecb_derive(&key, &data);
        }
        key
    };
    // Register i holds the key of: counter with its bits below i cleared, plus bit i — for
    // every i at or below the lowest one-bit of `counter`, and for every zero bit above it.
    let lowest = counter.trailing_zeros() as usize;
    let registers: [Option<Vec<u8>>; FUTURE_KEY_REGISTERS] = std::array::from_fn(|index| {
        let bit = 1u32 << index;
        if index == lowest {
            Some(host_key(counter))
        } else if index > lowest && counter & bit == 0 {
            let prefix = counter & !(bit | (bit - 1));
            TransactionCounter::is_valid(prefix | bit).then(|| host_key(prefix | bit))
        } else {
            None
        }
    });
    TerminalState::from_parts(initial_key_id, bdk_algorithm, Some(counter), registers).unwrap()
}

fn assert_sequence(set: &BdkVectors, sequence: &[&str]) {
    let first: Ksn = sequence[0].parse().unwrap();
    let mut state = terminal_at(set, first.counter().get());
    for expected in sequence {
        let (ksn, key) = state.next_transaction_key(&mut ClearKeys).unwrap();
        assert_eq!(ksn.to_string(), *expected, "{}", set.name);
        if let Some(published) = set.transactions.iter().find(|txn| txn.ksn == *expected)
            && !published.transaction_key.is_empty()
        {
            assert_eq!(
                hex::encode_upper(key),
                published.transaction_key,
                "{} {ksn}",
                set.name
            );
        }
    }
}

#[test]
fn terminal_skips_the_counter_with_17_one_bits() {
    for set in VECTORS {
        assert_sequence(set, AES128_TERMINAL_KSN_SEQUENCE_ROLLOVER);
    }
}

#[test]
fn terminal_ends_after_the_last_counter() {
    for set in VECTORS {
        assert_sequence(set, AES128_TERMINAL_KSN_SEQUENCE_END);
    }
    let mut state = terminal_at(&AES128_BDK, 0xFFFF_0000);
    state.next_transaction_key(&mut ClearKeys).unwrap();
    assert_eq!(state.transactions_left(), 0);
    assert!(matches!(
        state.next_transaction_key(&mut ClearKeys),
        Err(ProtocolError::EndOfLife)
    ));
}
