//! Published known-answer vectors of ANSI X9.24-3-2017 (AES DUKPT).
//!
//! Data only: every hex value in this module is transcribed from a published
//! source; nothing here was computed for this project. Where a value appears in
//! more than one public source, the sources were compared byte for byte (all
//! overlapping values agree).
//!
//! # Sources
//!
//! * **[X9-TV]** ASC X9, "Supplement to ANSI X9.24-3-2017 — Test Vectors"
//!   (`X9.24-3-2017-Test-Vectors-20180129-1.pdf`, linked from
//!   <https://x9.org/standards/x9-24-part-3-test-vectors/>). The PDF itself was
//!   not reachable from here; its values were taken from the transcriptions below.
//! * **[LL]** Leon Lynch, `openemv/dukpt` (formerly `leonlynch/dukpt`),
//!   `test/dukpt_aes128_test.c`, `test/dukpt_aes256_test.c`,
//!   `test/dukpt_aes128_update_key_test.c`, `test/dukpt_aes256_update_key_test.c`
//!   (snapshot at commit 1d01dda). These files quote [X9-TV] with page numbers,
//!   e.g. "first eight transaction/derivation keys; middle of page 2",
//!   "transaction keys for 0x1fffe, 0x1ffff, 0x20000, 0x20001; page 5",
//!   "last four transaction; middle of page 6", "update key for AES-128; bottom of
//!   page 7" (AES-128 BDK), and "bottom of page 7", "middle of page 10", "page 12",
//!   "middle of page 13", "bottom of page 18" (AES-256 BDK). **Main source.**
//! * **[CEX]** `QRCS-CORP/CEX`, `Test/DUKPTTest.cpp`, which states that it
//!   "uses vectors from the official ANSI X9.24-3 2017 specification"
//!   (X9.24-3-2017-Test-Vectors-20180129-1.pdf): derivation data, derivation key
//!   and PIN working key for counters 1, 2, 3, 0xFFFE4000, 0xFFFE8000, 0xFFFF0000
//!   of both BDKs.
//! * **[MOOV]** `moov-io/dukpt`, `pkg/aes/aes_test.go` ("B.1 Sample Test Vectors
//!   for Generating AES-128 keys from AES-128 BDK"): the first eight KSNs and
//!   transaction (derivation) keys of the AES-128 BDK.
//! * **[PAYSEC]** tests of the Rust crate `paysec_dukpt` (repository not identified by the
//!   search index) (`test_derive_working_keys_aes_128_annex_b`,
//!   `test_all_working_key_usages_aes_128_counter_1`,
//!   `test_derive_aes_{128,256}_working_keys_from_aes_256_bdk`,
//!   `test_derive_update_key_*`), labelled "ANSI X9.24-3-2017 Annex B" (AES-128
//!   BDK) and "ASC X9 supplemental X9.24-3 test vectors" (AES-256 BDK).
//! * **[CSCRIPT]** CryptoScript `DukptAesWorkingKeyTests.cs`
//!   (`AnnexBAllUsageVectorsForAes128CounterOneMatch`): all seven AES-128 working
//!   key usages for counter 1 of the AES-128 BDK; identical to [PAYSEC].
//! * **[JAVA]** `com.security.aesdukpt.DukptTests` (Java port of the X9 Python reference;
//!   repository not identified by the search index):
//!   `testHostDeriveWorkingKeyPinEncryption` (PIN / MAC / data keys for counters
//!   1, 2, 3, 7, 0x20001, 8675309, 0xFFFF0000), `testGenerateKeyEncryption`
//!   (data-encryption keys, counters 1–8) and
//!   `testGenerate32IntermediateGenerationKeys` (register contents after "Load
//!   Initial Key").
//! * **[FORAGE]** Forage Android SDK, `com.joinforage.forage.android.pos.encryption.DukptFixtures`
//!   (`IntermediateKeys.AfterLoadKey`, `WorkingKeys`): register contents after
//!   load (identical to [JAVA]) and PIN keys for counters 1–8 (identical to [LL]).
//! * **[CYBERCHEF]** a CyberChef payments fork test file ("ANSI X9.24-3-2017
//!   official test vectors", source x9.org): PIN keys for counters 1, 8, 0x20000,
//!   8675309.
//! * **[DOC]** CryptoScript `DUKPT-AES-INITIAL-KEY` documentation ("ANSI
//!   X9.24-3-2017 Annex B provides this AES-128 example") and a Python test citing
//!   "Supplement to ANSI X9.24-3-2017 Test Vectors, sec. 2.2–2.3.1": initial-key
//!   derivation data `01018001000200801234567890123456` and PIN derivation data
//!   `01011000000200809012345600000001`.
//!
//! Each vector below carries a comment naming its source(s). A value marked
//! "single source" appears in only one of the sources above and could not be
//! cross-checked.
//!
//! # Notes for test writers
//!
//! * `transaction_key` is the *intermediate derivation key* for that counter
//!   (called "transaction key" in [LL], "CurrentKey" in [MOOV], "DerivationKey" in
//!   [CEX]); working keys are derived from it. `""` = not published in any source
//!   found.
//! * `derivation_data` is the 16-byte derivation data printed for that working
//!   key, or `&[]` if no source publishes it. For 256-bit outputs [CEX] gives the
//!   block with key-block counter `02` (`0102…`): the X9 reference code overwrites
//!   byte 1 of the derivation data for each 128-bit output block (`derivation_data[1] = i`),
//!   so the value left in the buffer (and printed) is the one of the *last* block;
//!   per that code the first block differs only in byte 1 (`01`).
//! * Counter `0x0001FFFF` (17 one-bits) and `0xFFFFFFFF` (32 one-bits) are **not**
//!   valid terminal transaction counters. They are listed because the sources
//!   publish keys for them: [X9-TV] lists 0x1FFFF (kept, but commented out, in
//!   [LL] "because it has more than the allowed 16 set bits"), and 0xFFFFFFFF is
//!   the counter used to derive the DUKPT *update key* (a `KEK`-usage working
//!   key). A host-side derivation accepts them; a terminal never emits them.
//! * Only AES working keys are included; [X9-TV] also has 2TDEA/3TDEA sections
//!   (pages ~19–30) and an AES PIN block format 4 example (page 31), omitted here.
#![allow(dead_code)]

use crate::dukpt::{KeyAlgorithm, WorkingKeyUsage};

/// The algorithm a vector names ("AES128" | "AES192" | "AES256").
///
/// # Panics
/// On any other name: a transcription error in this module.
#[allow(clippy::panic)] // published data; an unknown name is a defect of this file
fn algorithm_named(name: &str) -> KeyAlgorithm {
    name.parse()
        .unwrap_or_else(|_| panic!("test vectors: unexpected algorithm {name}"))
}

/// One BDK of the supplement with its initial key and the published per-counter values.
pub struct BdkVectors {
    /// e.g. "AES-128 BDK"
    pub name: &'static str,
    /// Base derivation key.
    pub bdk: &'static str,
    /// "AES128" | "AES192" | "AES256"
    pub bdk_algorithm: &'static str,
    /// 16 hex digits: BDK ID (4 bytes) | derivation ID (4 bytes).
    pub initial_key_id: &'static str,
    /// Initial key (IK) derived from `bdk` and `initial_key_id`.
    pub initial_key: &'static str,
    /// Derivation data used to derive the initial key from the BDK, as published
    /// (`&[]` if not published).
    pub initial_key_derivation_data: &'static [&'static str],
    /// Published per-KSN values, in ascending counter order.
    pub transactions: &'static [TransactionVectors],
}

impl BdkVectors {
    /// The BDK's algorithm ([`Self::bdk_algorithm`], typed).
    pub fn algorithm(&self) -> KeyAlgorithm {
        algorithm_named(self.bdk_algorithm)
    }

    /// The published working key of `usage` (as in [`WorkingKeyVector::usage`]) for `ksn` (24
    /// hex digits, as published), if the supplement has one.
    pub fn working_key(&self, ksn: &str, usage: &str) -> Option<&'static WorkingKeyVector> {
        let transactions: &'static [TransactionVectors] = self.transactions;
        transactions
            .iter()
            .find(|transaction| transaction.ksn == ksn)?
            .working_keys
            .iter()
            .find(|working| working.usage == usage)
    }
}

/// Published values for one KSN.
pub struct TransactionVectors {
    /// 24 hex digits: initial key ID (8 bytes) | transaction counter (4 bytes, big endian).
    pub ksn: &'static str,
    /// The intermediate derivation key for this counter ("" if not published).
    pub transaction_key: &'static str,
    /// Working keys published for this KSN (may be empty).
    pub working_keys: &'static [WorkingKeyVector],
}

/// One published working key.
pub struct WorkingKeyVector {
    /// One of: "PIN", "MAC_GEN", "MAC_VERIFY", "MAC_BOTH", "DATA_ENCRYPT",
    /// "DATA_DECRYPT", "DATA_BOTH", "KEK".
    pub usage: &'static str,
    /// Working key algorithm: "AES128" | "AES192" | "AES256".
    pub algorithm: &'static str,
    /// The working key.
    pub key: &'static str,
    /// Derivation data block(s) for this working key as published (`&[]` if not published).
    pub derivation_data: &'static [&'static str],
}

impl WorkingKeyVector {
    /// The key's usage ([`Self::usage`], typed).
    ///
    /// # Panics
    /// On a usage name this module does not use: a transcription error.
    #[allow(clippy::panic)] // published data; an unknown name is a defect of this file
    pub fn key_usage(&self) -> WorkingKeyUsage {
        match self.usage {
            "PIN" => WorkingKeyUsage::PinEncryption,
            "MAC_GEN" => WorkingKeyUsage::MacGeneration,
            "MAC_VERIFY" => WorkingKeyUsage::MacVerification,
            "MAC_BOTH" => WorkingKeyUsage::MacBoth,
            "DATA_ENCRYPT" => WorkingKeyUsage::DataEncrypt,
            "DATA_DECRYPT" => WorkingKeyUsage::DataDecrypt,
            "DATA_BOTH" => WorkingKeyUsage::DataBoth,
            "KEK" => WorkingKeyUsage::KeyEncryption,
            other => panic!("test vectors: unexpected usage {other}"),
        }
    }

    /// The key's algorithm ([`Self::algorithm`], typed).
    pub fn key_algorithm(&self) -> KeyAlgorithm {
        algorithm_named(self.algorithm)
    }
}

/// "AES-128 BDK" set of [X9-TV] (AES-128 working keys from an AES-128 BDK).
pub const AES128_BDK: BdkVectors = BdkVectors {
    name: "AES-128 BDK",
    // [LL] dukpt_aes128_test.c (bdk, ikid, ik_verify); also [MOOV], [CEX], [PAYSEC], [DOC].
    bdk: "FEDCBA9876543210F1F1F1F1F1F1F1F1",
    bdk_algorithm: "AES128",
    initial_key_id: "1234567890123456",
    initial_key: "1273671EA26AC29AFA4D1084127652A1",
    // [DOC] (Annex B example): 01 | 01 | 8001 | 0002 | 0080 | IKID.
    initial_key_derivation_data: &["01018001000200801234567890123456"],
    transactions: &[
        // Counter 1. KSN + transaction key: [LL] ("first eight"); also [MOOV], [CEX]; equals register 0 of AES128_INTERMEDIATE_DERIVATION_KEY_REGISTERS_AFTER_LOAD.
        TransactionVectors {
            ksn: "123456789012345600000001",
            transaction_key: "4F21B565BAD9835E112B6465635EAE44",
            working_keys: &[
                // PIN / MAC_GEN / DATA_ENCRYPT: [LL]; also [PAYSEC], [JAVA], [FORAGE], [CEX] (PIN), [CYBERCHEF] (PIN).
                // PIN derivation data: [CEX] and [DOC].
                WorkingKeyVector {
                    usage: "PIN",
                    algorithm: "AES128",
                    key: "AF8CB133A78F8DC2D1359F18527593FB",
                    derivation_data: &["01011000000200809012345600000001"],
                },
                WorkingKeyVector {
                    usage: "MAC_GEN",
                    algorithm: "AES128",
                    key: "A2DC23DE6FDE0824A2BC321E08E4B8B7",
                    derivation_data: &[],
                },
                WorkingKeyVector {
                    usage: "DATA_ENCRYPT",
                    algorithm: "AES128",
                    key: "A35C412EFD41FDB98B69797C02DCD08F",
                    derivation_data: &[],
                },
                // Remaining usages for counter 1: [PAYSEC] and [CSCRIPT] (both say "Annex B"),
                // identical in both; KEK: [PAYSEC] only (plus an unattributed knowledge-base file).
                // Not in [LL] ([LL] notes the supplement has no MAC-verify / data-decrypt keys).
                WorkingKeyVector {
                    usage: "MAC_VERIFY",
                    algorithm: "AES128",
                    key: "DBB463945B286C07CD3AD82EE96FD9C9",
                    derivation_data: &[],
                },
                WorkingKeyVector {
                    usage: "MAC_BOTH",
                    algorithm: "AES128",
                    key: "85675439D18D7F1158BD8E3EAA3D502B",
                    derivation_data: &[],
                },
                WorkingKeyVector {
                    usage: "DATA_DECRYPT",
                    algorithm: "AES128",
                    key: "16292C6EA8F64C5420A0584BFBC577BE",
                    derivation_data: &[],
                },
                WorkingKeyVector {
                    usage: "DATA_BOTH",
                    algorithm: "AES128",
                    key: "A308E080DD15A1B741F1721BF67DE11C",
                    derivation_data: &[],
                },
                WorkingKeyVector {
                    usage: "KEK",
                    algorithm: "AES128",
                    key: "36A724B7BEFA5A25F5E7B5782A4554A2",
                    derivation_data: &[],
                },
            ],
        },
        // Counter 2. KSN + transaction key: [LL] ("first eight"); also [MOOV], [CEX]; equals register 1 of AES128_INTERMEDIATE_DERIVATION_KEY_REGISTERS_AFTER_LOAD.
        TransactionVectors {
            ksn: "123456789012345600000002",
            transaction_key: "2F34D68DE10F68D38091A73B9E7C437C",
            working_keys: &[
                // [LL]; also [PAYSEC], [JAVA], [FORAGE] (PIN), [CEX] (PIN + derivation data).
                WorkingKeyVector {
                    usage: "PIN",
                    algorithm: "AES128",
                    key: "D30BDC73EC9714B000BEC66BDB7B6D09",
                    derivation_data: &["01011000000200809012345600000002"],
                },
                WorkingKeyVector {
                    usage: "MAC_GEN",
                    algorithm: "AES128",
                    key: "484C3B06E8562704528CD5B46FB12FB6",
                    derivation_data: &[],
                },
                WorkingKeyVector {
                    usage: "DATA_ENCRYPT",
                    algorithm: "AES128",
                    key: "D639514AA33AC43AD9229E433D6D4E5B",
                    derivation_data: &[],
                },
            ],
        },
        // Counter 3. KSN + transaction key: [LL] ("first eight"); also [MOOV], [CEX].
        TransactionVectors {
            ksn: "123456789012345600000003",
            transaction_key: "031504E530365CF81264238540518318",
            working_keys: &[
                // [LL]; also [PAYSEC], [JAVA], [FORAGE] (PIN), [CEX] (PIN + derivation data).
                WorkingKeyVector {
                    usage: "PIN",
                    algorithm: "AES128",
                    key: "7D69F01F3B45449F62C7816ECE723268",
                    derivation_data: &["01011000000200809012345600000003"],
                },
                WorkingKeyVector {
                    usage: "MAC_GEN",
                    algorithm: "AES128",
                    key: "A5DF7D9D800CA769766F0C77CA4E6E6C",
                    derivation_data: &[],
                },
                WorkingKeyVector {
                    usage: "DATA_ENCRYPT",
                    algorithm: "AES128",
                    key: "EF17F6AB45B4820C93A3DCB21BC491AD",
                    derivation_data: &[],
                },
            ],
        },
        // Counter 4. KSN + transaction key: [LL] ("first eight"); also [MOOV]; equals register 2 of AES128_INTERMEDIATE_DERIVATION_KEY_REGISTERS_AFTER_LOAD.
        TransactionVectors {
            ksn: "123456789012345600000004",
            transaction_key: "0EEFC7ADA628BA68878DA9165A8A1887",
            working_keys: &[
                // [LL]; also [PAYSEC], [JAVA] (DATA_ENCRYPT), [FORAGE] (PIN).
                WorkingKeyVector {
                    usage: "PIN",
                    algorithm: "AES128",
                    key: "91A0588318EC2673214271F70137896E",
                    derivation_data: &[],
                },
                WorkingKeyVector {
                    usage: "MAC_GEN",
                    algorithm: "AES128",
                    key: "E6E4679647D8A9057C1FC15537CB4C4E",
                    derivation_data: &[],
                },
                WorkingKeyVector {
                    usage: "DATA_ENCRYPT",
                    algorithm: "AES128",
                    key: "B3BD44C08BB6BA27C3BB4711D7D70387",
                    derivation_data: &[],
                },
            ],
        },
        // Counter 5. KSN + transaction key: [LL] ("first eight"); also [MOOV].
        TransactionVectors {
            ksn: "123456789012345600000005",
            transaction_key: "C2A7AC328A5DA2D6002D62465BFC028B",
            working_keys: &[
                // [LL]; also [PAYSEC], [JAVA] (DATA_ENCRYPT), [FORAGE] (PIN).
                WorkingKeyVector {
                    usage: "PIN",
                    algorithm: "AES128",
                    key: "35A43BC9EFEB09C756204B57E3FB7D4D",
                    derivation_data: &[],
                },
                WorkingKeyVector {
                    usage: "MAC_GEN",
                    algorithm: "AES128",
                    key: "0588185FE1FF8C7E22FAD78C1C61F065",
                    derivation_data: &[],
                },
                WorkingKeyVector {
                    usage: "DATA_ENCRYPT",
                    algorithm: "AES128",
                    key: "CA02DF6F30B39E14BD0B4A30E460920F",
                    derivation_data: &[],
                },
            ],
        },
        // Counter 6. KSN + transaction key: [LL] ("first eight"); also [MOOV].
        TransactionVectors {
            ksn: "123456789012345600000006",
            transaction_key: "D30F7D9351DA58448A2F5E92B4EE3B7D",
            working_keys: &[
                // [LL]; also [JAVA] (DATA_ENCRYPT), [FORAGE] (PIN).
                WorkingKeyVector {
                    usage: "PIN",
                    algorithm: "AES128",
                    key: "02DCC6CD1201A3A2CA7099559C862123",
                    derivation_data: &[],
                },
                WorkingKeyVector {
                    usage: "MAC_GEN",
                    algorithm: "AES128",
                    key: "7B60F72A5639C0EE7EB2100FA80BB793",
                    derivation_data: &[],
                },
                WorkingKeyVector {
                    usage: "DATA_ENCRYPT",
                    algorithm: "AES128",
                    key: "C9B8A7C4E486180B2229115164F0B293",
                    derivation_data: &[],
                },
            ],
        },
        // Counter 7. KSN + transaction key: [LL] ("first eight"); also [MOOV].
        TransactionVectors {
            ksn: "123456789012345600000007",
            transaction_key: "A8253CEED9AC042C54F75D35C8352278",
            working_keys: &[
                // [LL]; also [JAVA] (all three), [FORAGE] (PIN).
                WorkingKeyVector {
                    usage: "PIN",
                    algorithm: "AES128",
                    key: "6ECF912F3B18CA11A7A27BB60705FD09",
                    derivation_data: &[],
                },
                WorkingKeyVector {
                    usage: "MAC_GEN",
                    algorithm: "AES128",
                    key: "BAA08CA263C69525BC6B1BA8F4275D69",
                    derivation_data: &[],
                },
                WorkingKeyVector {
                    usage: "DATA_ENCRYPT",
                    algorithm: "AES128",
                    key: "0FA8F1F0A2DD7B1005A862D77CDED698",
                    derivation_data: &[],
                },
            ],
        },
        // Counter 8. KSN + transaction key: [LL] ("first eight"); also [MOOV]; equals register 3 of AES128_INTERMEDIATE_DERIVATION_KEY_REGISTERS_AFTER_LOAD.
        TransactionVectors {
            ksn: "123456789012345600000008",
            transaction_key: "718EE6CF0B27E53D5F7AF99C4D8146A2",
            working_keys: &[
                // [LL]; also [JAVA] (DATA_ENCRYPT), [FORAGE] (PIN), [CYBERCHEF] (PIN).
                WorkingKeyVector {
                    usage: "PIN",
                    algorithm: "AES128",
                    key: "4D9DF3FBEE3448FC3E676D04320A90F5",
                    derivation_data: &[],
                },
                WorkingKeyVector {
                    usage: "MAC_GEN",
                    algorithm: "AES128",
                    key: "6FD572E5D59E618875F193484F9178FB",
                    derivation_data: &[],
                },
                WorkingKeyVector {
                    usage: "DATA_ENCRYPT",
                    algorithm: "AES128",
                    key: "650F34204ABD4E57764D61AC3D266FB1",
                    derivation_data: &[],
                },
            ],
        },
        // Rollover. Counter 0x0001FFFE (16 one-bits). Transaction key: [LL] (page 5), single source.
        TransactionVectors {
            ksn: "12345678901234560001FFFE",
            transaction_key: "E21E8C8D347F8561A2BE752DAA85A111",
            working_keys: &[
                // Single source ([PAYSEC], "Annex B").
                WorkingKeyVector {
                    usage: "PIN",
                    algorithm: "AES128",
                    key: "DDF7E08A84B5478C498D007C743BF762",
                    derivation_data: &[],
                },
                WorkingKeyVector {
                    usage: "MAC_GEN",
                    algorithm: "AES128",
                    key: "6D7623AD652734B8FAE1B6E093EACE3D",
                    derivation_data: &[],
                },
                WorkingKeyVector {
                    usage: "DATA_ENCRYPT",
                    algorithm: "AES128",
                    key: "8E4E5D5E0F01C54F01F4ACA1C8F8EDCE",
                    derivation_data: &[],
                },
            ],
        },
        // Counter 0x0001FFFF: 17 one-bits, NOT a valid terminal counter (a terminal goes 0x1FFFE -> 0x20000).
        // Published nevertheless: transaction key from [LL] (commented-out entry of txn_key_verify2, page 5), single source.
        TransactionVectors {
            ksn: "12345678901234560001FFFF",
            transaction_key: "1FE368988089CDD76DA18A3458E113BA",
            working_keys: &[
                // Single source ([PAYSEC], "Annex B").
                WorkingKeyVector {
                    usage: "PIN",
                    algorithm: "AES128",
                    key: "73BA667D6368A2086E72576DF41A4037",
                    derivation_data: &[],
                },
                WorkingKeyVector {
                    usage: "MAC_GEN",
                    algorithm: "AES128",
                    key: "8B543DCF4A31EA3AB47DAD16B8ABD404",
                    derivation_data: &[],
                },
                WorkingKeyVector {
                    usage: "DATA_ENCRYPT",
                    algorithm: "AES128",
                    key: "D18ACA30B4D63DB61CE474D3F57733D3",
                    derivation_data: &[],
                },
            ],
        },
        // Counter 0x00020000. Transaction key: [LL] (page 5); equals register 17 of
        // AES128_INTERMEDIATE_DERIVATION_KEY_REGISTERS_AFTER_LOAD ([JAVA], [FORAGE]).
        TransactionVectors {
            ksn: "123456789012345600020000",
            transaction_key: "F7AE9025468A25D37B7249CFFED224C8",
            working_keys: &[
                // PIN: [PAYSEC] and [CYBERCHEF]; MAC_GEN / DATA_ENCRYPT: [PAYSEC] only.
                WorkingKeyVector {
                    usage: "PIN",
                    algorithm: "AES128",
                    key: "AB828BE7B58C7EC5D5ED0D5D320A0C9D",
                    derivation_data: &[],
                },
                WorkingKeyVector {
                    usage: "MAC_GEN",
                    algorithm: "AES128",
                    key: "0B59D3D7D93028D97135FB895CACE24E",
                    derivation_data: &[],
                },
                WorkingKeyVector {
                    usage: "DATA_ENCRYPT",
                    algorithm: "AES128",
                    key: "13361208975755318FE7AE28C9616014",
                    derivation_data: &[],
                },
            ],
        },
        // Counter 0x00020001. Transaction key: [LL] (page 5), single source.
        TransactionVectors {
            ksn: "123456789012345600020001",
            transaction_key: "692C8EA4013645135B36497131DF9D2C",
            working_keys: &[
                // Single source ([JAVA], testHostDeriveWorkingKeyPinEncryption, counter 131073).
                WorkingKeyVector {
                    usage: "PIN",
                    algorithm: "AES128",
                    key: "8AC85C93EED246054ADC3104479115A6",
                    derivation_data: &[],
                },
                WorkingKeyVector {
                    usage: "MAC_GEN",
                    algorithm: "AES128",
                    key: "EF7C9461E2AFED2A8012CC6301CFEEBE",
                    derivation_data: &[],
                },
                WorkingKeyVector {
                    usage: "DATA_ENCRYPT",
                    algorithm: "AES128",
                    key: "B93B4BF0D52163B3CF9312F8E55629A3",
                    derivation_data: &[],
                },
            ],
        },
        // Counter 8675309 = 0x00845FED (mid-range sample). Transaction key not found in any source.
        TransactionVectors {
            ksn: "123456789012345600845FED",
            transaction_key: "",
            working_keys: &[
                // PIN: [JAVA] and [CYBERCHEF]; MAC_GEN / DATA_ENCRYPT: [JAVA] only.
                WorkingKeyVector {
                    usage: "PIN",
                    algorithm: "AES128",
                    key: "D1DDA386AA4A556AF0119FDCB5D132C6",
                    derivation_data: &[],
                },
                WorkingKeyVector {
                    usage: "MAC_GEN",
                    algorithm: "AES128",
                    key: "89365C7970950CAC0A6261FFC7DB26C6",
                    derivation_data: &[],
                },
                WorkingKeyVector {
                    usage: "DATA_ENCRYPT",
                    algorithm: "AES128",
                    key: "B1E4D9006A87DD08D87F11A124D35517",
                    derivation_data: &[],
                },
            ],
        },
        // Last counters ([LL] "last four", middle of page 6). Counter 0xFFFE2000. Transaction key: [LL], single source.
        TransactionVectors {
            ksn: "1234567890123456FFFE2000",
            transaction_key: "48E585B694EB0B18D5C35443E163C0BA",
            working_keys: &[],
        },
        // Last counters ([LL] "last four", middle of page 6). Counter 0xFFFE4000. Transaction key: [LL], [CEX].
        TransactionVectors {
            ksn: "1234567890123456FFFE4000",
            transaction_key: "396C2C7CA1EA701C03B86B7D41F0C562",
            working_keys: &[
                // PIN + derivation data: single source ([CEX]).
                WorkingKeyVector {
                    usage: "PIN",
                    algorithm: "AES128",
                    key: "6239A27F572DEDB17BCA1AC413EF9FE9",
                    derivation_data: &["010110000002008090123456FFFE4000"],
                },
            ],
        },
        // Last counters ([LL] "last four", middle of page 6). Counter 0xFFFE8000. Transaction key: [LL], [CEX].
        TransactionVectors {
            ksn: "1234567890123456FFFE8000",
            transaction_key: "0387625F189B58AE03EF0E8CCA41105E",
            working_keys: &[
                // PIN + derivation data: single source ([CEX]).
                WorkingKeyVector {
                    usage: "PIN",
                    algorithm: "AES128",
                    key: "F10C1404137A80718FCCE8BD90FF9F67",
                    derivation_data: &["010110000002008090123456FFFE8000"],
                },
            ],
        },
        // Last counters ([LL] "last four", middle of page 6). Counter 0xFFFF0000. Transaction key: [LL], [CEX].
        // 0xFFFF0000 is the last valid counter (16 one-bits); the KSN is exhausted after it.
        TransactionVectors {
            ksn: "1234567890123456FFFF0000",
            transaction_key: "F6BA59389BD14A9855BE9727E7C52E3C",
            working_keys: &[
                // PIN: [CEX] (with derivation data) and [JAVA]; MAC_GEN / DATA_ENCRYPT: [JAVA] only.
                WorkingKeyVector {
                    usage: "PIN",
                    algorithm: "AES128",
                    key: "27EFAC1D158632588F4AC69E45C247C4",
                    derivation_data: &["010110000002008090123456FFFF0000"],
                },
                WorkingKeyVector {
                    usage: "MAC_GEN",
                    algorithm: "AES128",
                    key: "AE558BABC206D303FDF68B1181F228C6",
                    derivation_data: &[],
                },
                WorkingKeyVector {
                    usage: "DATA_ENCRYPT",
                    algorithm: "AES128",
                    key: "08878BFCC45CA5AEF6A1AB40BAC882B5",
                    derivation_data: &[],
                },
            ],
        },
        // Counter 0xFFFFFFFF: not a transaction counter. Derivation of the DUKPT update key = KEK-usage
        // working key at counter 0xFFFFFFFF ([LL] dukpt_aes_derive_update_key, "ANSI X9.24-3:2017 6.5.3
        // Calculate DUKPT Update Key"). Its intermediate derivation key was not found in a reliable source.
        TransactionVectors {
            ksn: "1234567890123456FFFFFFFF",
            transaction_key: "",
            working_keys: &[
                // DUKPT update key (AES-128): [LL] ("update key for AES-128; bottom of page 7") and [PAYSEC].
                WorkingKeyVector {
                    usage: "KEK",
                    algorithm: "AES128",
                    key: "9A9770AEE1ACD1B13473D0463A1883B9",
                    derivation_data: &[],
                },
            ],
        },
    ],
};

/// "AES-256 BDK" set of [X9-TV]: AES-128 working keys from an AES-256 BDK (supplement
/// pages ~7–12) and AES-256 working keys from the same BDK (pages ~13–18). Both sections
/// share the initial key and the (256-bit) intermediate derivation keys.
pub const AES256_BDK: BdkVectors = BdkVectors {
    name: "AES-256 BDK",
    // [LL] dukpt_aes256_test.c (bdk, ikid, ik_verify); also [CEX], [PAYSEC].
    bdk: "FEDCBA9876543210F1F1F1F1F1F1F1F1FEDCBA9876543210F1F1F1F1F1F1F1F1",
    bdk_algorithm: "AES256",
    initial_key_id: "1234567890123456",
    initial_key: "CE9CE0C101D1138F97FB6CAD4DF045A7083D4EAE2D35A31789D01CCF0949550F",
    // Not published in any source found.
    initial_key_derivation_data: &[],
    transactions: &[
        // Counter 1. Transaction key: [LL] ("first eight ... bottom of page 7"), [CEX].
        TransactionVectors {
            ksn: "123456789012345600000001",
            transaction_key: "54AC2B32B145EA4A554CB8BC44B17467063A799856B1CCC2A138D36E8DBF78B3",
            working_keys: &[
                // AES128 keys: [LL] ("bottom of page 7"); AES256 keys: [LL] ("middle of page 13"); also [PAYSEC] (all six), [CEX] (PIN AES256 + derivation data).
                WorkingKeyVector {
                    usage: "PIN",
                    algorithm: "AES128",
                    key: "09C9C432966811D6B2C3336BAC1B1202",
                    derivation_data: &[],
                },
                WorkingKeyVector {
                    usage: "MAC_GEN",
                    algorithm: "AES128",
                    key: "F04A1FABD4176E15490CEC82E217A96D",
                    derivation_data: &[],
                },
                WorkingKeyVector {
                    usage: "DATA_ENCRYPT",
                    algorithm: "AES128",
                    key: "616D59AE91F8CC7016F89FDA29605FA4",
                    derivation_data: &[],
                },
                WorkingKeyVector {
                    usage: "PIN",
                    algorithm: "AES256",
                    key: "8C1AB7BEE973829E30242E0BBBDD4946D540C98FC1B5BDCF94790001A23FD502",
                    derivation_data: &["01021000000401009012345600000001"],
                },
                WorkingKeyVector {
                    usage: "MAC_GEN",
                    algorithm: "AES256",
                    key: "61DABDF4B340CF461EE860B1D1AB55357142BD2D6977306859CF49AEFE8F1549",
                    derivation_data: &[],
                },
                WorkingKeyVector {
                    usage: "DATA_ENCRYPT",
                    algorithm: "AES256",
                    key: "71EB36C9A6B7F801D1D1700C29741FC5A5C4E9B45D742DA7AF6992B8AA29AF58",
                    derivation_data: &[],
                },
            ],
        },
        // Counter 2. Transaction key: [LL] ("first eight ... bottom of page 7"), [CEX].
        TransactionVectors {
            ksn: "123456789012345600000002",
            transaction_key: "5DD5A0253842BBBE1D7C0DA27021412C6F1FAB53FB928DEAE56DA06090A9DE97",
            working_keys: &[
                // AES128 keys: [LL] ("bottom of page 7"); AES256 keys: [LL] ("middle of page 13"); also [CEX] (PIN AES256 + derivation data).
                WorkingKeyVector {
                    usage: "PIN",
                    algorithm: "AES128",
                    key: "D632226A80795D13A80AFE66A3E97B01",
                    derivation_data: &[],
                },
                WorkingKeyVector {
                    usage: "MAC_GEN",
                    algorithm: "AES128",
                    key: "DD99D77B4E2AB538B26BB6A8B3FB0BE3",
                    derivation_data: &[],
                },
                WorkingKeyVector {
                    usage: "DATA_ENCRYPT",
                    algorithm: "AES128",
                    key: "07B79D9BFF3633C07A9FDDF132070B30",
                    derivation_data: &[],
                },
                WorkingKeyVector {
                    usage: "PIN",
                    algorithm: "AES256",
                    key: "3583D6CD02FC38822CC71A8D7678E04F4A8556335E6CC66863D3DADC5AEE2C62",
                    derivation_data: &["01021000000401009012345600000002"],
                },
                WorkingKeyVector {
                    usage: "MAC_GEN",
                    algorithm: "AES256",
                    key: "4417356219B2F93CE3F2671623DDCAB58A8B85AD80662A8D628024000956D426",
                    derivation_data: &[],
                },
                WorkingKeyVector {
                    usage: "DATA_ENCRYPT",
                    algorithm: "AES256",
                    key: "D0AC9F71F875FFFF3A83778F72F39EBB0924A5A526617AF669665E0A19725465",
                    derivation_data: &[],
                },
            ],
        },
        // Counter 3. Transaction key: [LL] ("first eight ... bottom of page 7"), [CEX].
        TransactionVectors {
            ksn: "123456789012345600000003",
            transaction_key: "8EEEF7C464AE415BB1D73FAED21993CD669F7999092A579EC6DD3CC680C65171",
            working_keys: &[
                // AES128 keys: [LL] ("bottom of page 7"); AES256 keys: [LL] ("middle of page 13"); also [CEX] (PIN AES256 + derivation data).
                WorkingKeyVector {
                    usage: "PIN",
                    algorithm: "AES128",
                    key: "C2CBD3D766B16F9F82F4EE3F74478918",
                    derivation_data: &[],
                },
                WorkingKeyVector {
                    usage: "MAC_GEN",
                    algorithm: "AES128",
                    key: "5A742A4A0403B3D7BB30842DAFBB5972",
                    derivation_data: &[],
                },
                WorkingKeyVector {
                    usage: "DATA_ENCRYPT",
                    algorithm: "AES128",
                    key: "706E4E629E466BED956548E7B0D90C3D",
                    derivation_data: &[],
                },
                WorkingKeyVector {
                    usage: "PIN",
                    algorithm: "AES256",
                    key: "96A1AB5D37CB7CF81DDE64F66C46E0389B833E7AD5F4E44C791F04FAFDA6DA0E",
                    derivation_data: &["01021000000401009012345600000003"],
                },
                WorkingKeyVector {
                    usage: "MAC_GEN",
                    algorithm: "AES256",
                    key: "35BD00A46F2A2BD127F565FBF2974B735AE3BB70242C0A415857CF69B2C2691A",
                    derivation_data: &[],
                },
                WorkingKeyVector {
                    usage: "DATA_ENCRYPT",
                    algorithm: "AES256",
                    key: "8E70D5DF53F48ED2F2A0B54FC4F45C844579BE96F6F161222CDD50193E2F737F",
                    derivation_data: &[],
                },
            ],
        },
        // Counter 4. Transaction key: [LL] ("first eight ... bottom of page 7"), single source.
        TransactionVectors {
            ksn: "123456789012345600000004",
            transaction_key: "C18CBED570B3B89ECADA7CEC9C224CD5A86ECF3DE377D3EFAB720F8C4D76B9D0",
            working_keys: &[
                // AES128 keys: [LL] ("bottom of page 7"); AES256 keys: [LL] ("middle of page 13").
                WorkingKeyVector {
                    usage: "PIN",
                    algorithm: "AES128",
                    key: "58A3779C1E24B3EDAF068609E7E56D59",
                    derivation_data: &[],
                },
                WorkingKeyVector {
                    usage: "MAC_GEN",
                    algorithm: "AES128",
                    key: "C531F7E08514858C445D5F54BFE7DA8E",
                    derivation_data: &[],
                },
                WorkingKeyVector {
                    usage: "DATA_ENCRYPT",
                    algorithm: "AES128",
                    key: "CF3A4D9CA7E962E4023A84A2FE47DC80",
                    derivation_data: &[],
                },
                WorkingKeyVector {
                    usage: "PIN",
                    algorithm: "AES256",
                    key: "420AA584BF215C4777E93009B56D08DE80687021D07ED96349FF71379CE5636D",
                    derivation_data: &[],
                },
                WorkingKeyVector {
                    usage: "MAC_GEN",
                    algorithm: "AES256",
                    key: "D80617C3C5869A8DCF0DA5383D032A0D6E6C51C0BF649BE992BE84AA191AE326",
                    derivation_data: &[],
                },
                WorkingKeyVector {
                    usage: "DATA_ENCRYPT",
                    algorithm: "AES256",
                    key: "41D23F7D78E22A978D726BC71D266374263120EE49146CE5C1291FD0EE7DDD31",
                    derivation_data: &[],
                },
            ],
        },
        // Counter 5. Transaction key: [LL] ("first eight ... bottom of page 7"), single source.
        TransactionVectors {
            ksn: "123456789012345600000005",
            transaction_key: "6B3C3C93307151C25DC2309456F01C5C3108DAD571C321899A9B7E0C009FD2EB",
            working_keys: &[
                // AES128 keys: [LL] ("bottom of page 7"); AES256 keys: [LL] ("middle of page 13").
                WorkingKeyVector {
                    usage: "PIN",
                    algorithm: "AES128",
                    key: "97504C8BB0FD4D4A88D605143BF00025",
                    derivation_data: &[],
                },
                WorkingKeyVector {
                    usage: "MAC_GEN",
                    algorithm: "AES128",
                    key: "E2E25AA7FE6E5DD6042C632A5DFED945",
                    derivation_data: &[],
                },
                WorkingKeyVector {
                    usage: "DATA_ENCRYPT",
                    algorithm: "AES128",
                    key: "94C28455AEAD970555F326298557FA81",
                    derivation_data: &[],
                },
                WorkingKeyVector {
                    usage: "PIN",
                    algorithm: "AES256",
                    key: "B1E9E3D918952E6E5F67917F0FE77060F865AE27DCAD5742DDF90F61453B98BA",
                    derivation_data: &[],
                },
                WorkingKeyVector {
                    usage: "MAC_GEN",
                    algorithm: "AES256",
                    key: "8B047E32C476C0A0AF90A9B8D1C247C433E3D4C1DF1C7FC52E8CB1DC4C8FB275",
                    derivation_data: &[],
                },
                WorkingKeyVector {
                    usage: "DATA_ENCRYPT",
                    algorithm: "AES256",
                    key: "813D156C142E5BB8F136427EBD0A1AC4DC9B2B5963C481F5E0A58F4BF33BD185",
                    derivation_data: &[],
                },
            ],
        },
        // Counter 6. Transaction key: [LL] ("first eight ... bottom of page 7"), single source.
        TransactionVectors {
            ksn: "123456789012345600000006",
            transaction_key: "B8BB61AE3E2D5CD8C699E0C578FB2C7B89B0C0CF02DBAB60864D8049C986C844",
            working_keys: &[
                // AES128 keys: [LL] ("bottom of page 7"); AES256 keys: [LL] ("middle of page 13").
                WorkingKeyVector {
                    usage: "PIN",
                    algorithm: "AES128",
                    key: "BF281141609E6CAE7DF10DFA47A8D03D",
                    derivation_data: &[],
                },
                WorkingKeyVector {
                    usage: "MAC_GEN",
                    algorithm: "AES128",
                    key: "07B215929C5DB4262DECEE4A0336DD4F",
                    derivation_data: &[],
                },
                WorkingKeyVector {
                    usage: "DATA_ENCRYPT",
                    algorithm: "AES128",
                    key: "408D3B9A7D1AF109E2F689514BF79AC7",
                    derivation_data: &[],
                },
                WorkingKeyVector {
                    usage: "PIN",
                    algorithm: "AES256",
                    key: "8714EB94E3BFD3018EC99D0434D9C94F071AF2EEBF4332FB14F5179793AA582C",
                    derivation_data: &[],
                },
                WorkingKeyVector {
                    usage: "MAC_GEN",
                    algorithm: "AES256",
                    key: "A2FF6FFB37CB8042B8C9B2F94C90C83D94DD5BECCD9951CFAB0BE7BD865CA403",
                    derivation_data: &[],
                },
                WorkingKeyVector {
                    usage: "DATA_ENCRYPT",
                    algorithm: "AES256",
                    key: "F1FB0591AA2E45E1CE4C5D970C7396C4A87E53E5900C4A6D95C174140CC0AC9C",
                    derivation_data: &[],
                },
            ],
        },
        // Counter 7. Transaction key: [LL] ("first eight ... bottom of page 7"), single source.
        TransactionVectors {
            ksn: "123456789012345600000007",
            transaction_key: "88D0ACA287B3066F5DE0C93396337D4C2DA8D92C1F720A576D62CEB4C979E01E",
            working_keys: &[
                // AES128 keys: [LL] ("bottom of page 7"); AES256 keys: [LL] ("middle of page 13").
                WorkingKeyVector {
                    usage: "PIN",
                    algorithm: "AES128",
                    key: "B7C6BB187134E9D429C3E8B7CCBD8477",
                    derivation_data: &[],
                },
                WorkingKeyVector {
                    usage: "MAC_GEN",
                    algorithm: "AES128",
                    key: "3AC9CC5159F96E10FCC5EB64015AC76A",
                    derivation_data: &[],
                },
                WorkingKeyVector {
                    usage: "DATA_ENCRYPT",
                    algorithm: "AES128",
                    key: "DC2915BF421D617E7725E63A7DACB18D",
                    derivation_data: &[],
                },
                WorkingKeyVector {
                    usage: "PIN",
                    algorithm: "AES256",
                    key: "693C893A1E81D280302E0A47E7E634337B9A9B26E7CC6064D807E08FF911AFAC",
                    derivation_data: &[],
                },
                WorkingKeyVector {
                    usage: "MAC_GEN",
                    algorithm: "AES256",
                    key: "E8A57085DBE804B8C2767F9F77D54854861E99633A062C700B4E50A865153150",
                    derivation_data: &[],
                },
                WorkingKeyVector {
                    usage: "DATA_ENCRYPT",
                    algorithm: "AES256",
                    key: "69BC5C9AFB2C93CC30C3F7529360B34D7B64B7206E0F0940D8654378C54824F2",
                    derivation_data: &[],
                },
            ],
        },
        // Counter 8. Transaction key: [LL] ("first eight ... bottom of page 7"), single source.
        TransactionVectors {
            ksn: "123456789012345600000008",
            transaction_key: "20A796D5077D51B8E7613893A4F095B134E02917DC84BD391F3661D0873FF308",
            working_keys: &[
                // AES128 keys: [LL] ("bottom of page 7"); AES256 keys: [LL] ("middle of page 13").
                WorkingKeyVector {
                    usage: "PIN",
                    algorithm: "AES128",
                    key: "53C1C60A65532313141A102AD720E967",
                    derivation_data: &[],
                },
                WorkingKeyVector {
                    usage: "MAC_GEN",
                    algorithm: "AES128",
                    key: "6E94A9283EA9AEB7EAA77C3FF55FF2D1",
                    derivation_data: &[],
                },
                WorkingKeyVector {
                    usage: "DATA_ENCRYPT",
                    algorithm: "AES128",
                    key: "8950DD50C254C60E26737CA9229F0F18",
                    derivation_data: &[],
                },
                WorkingKeyVector {
                    usage: "PIN",
                    algorithm: "AES256",
                    key: "173A45284262A3E292D86D08FD6DE9167963214450D1D48F6103BD2EB08E61B5",
                    derivation_data: &[],
                },
                WorkingKeyVector {
                    usage: "MAC_GEN",
                    algorithm: "AES256",
                    key: "949A3FEF12DBD273DD25BB60E29BBE313C872A9DE3BE03A7E29626ACA0A42880",
                    derivation_data: &[],
                },
                WorkingKeyVector {
                    usage: "DATA_ENCRYPT",
                    algorithm: "AES256",
                    key: "0BF8789A21D068410A16C9F7FCBF65A7B4FF73203ADC0F1B4B5E5BF8050E4284",
                    derivation_data: &[],
                },
            ],
        },
        // Rollover ([LL] "middle of page 10"). Counter 0x0001FFFE. Transaction key: [LL], single source.
        TransactionVectors {
            ksn: "12345678901234560001FFFE",
            transaction_key: "A289508CBF1228452CD86AB77B15CB35577AC828C18BB66681E5A16D6C9CCED3",
            working_keys: &[],
        },
        // Counter 0x0001FFFF: 17 one-bits, NOT a valid terminal counter. Transaction key: [LL]
        // (commented-out entry of txn_key_verify2), single source.
        TransactionVectors {
            ksn: "12345678901234560001FFFF",
            transaction_key: "7C1F24BC33C5B146E1D3015126F4AC2E0C48AC080DC9234137B82890E8E91FB8",
            working_keys: &[],
        },
        // Counter 0x00020000. Transaction key: [LL], single source.
        TransactionVectors {
            ksn: "123456789012345600020000",
            transaction_key: "D62DDA94A47D7DA5D763443B4ECB15EA8DD62E0E4F915958BA459591F8312E37",
            working_keys: &[],
        },
        // Counter 0x00020001. Transaction key: [LL], single source.
        TransactionVectors {
            ksn: "123456789012345600020001",
            transaction_key: "44110A1102748D4A3AC326F53D8CAC650212590CA7126D54546DDE0F20E89CEE",
            working_keys: &[],
        },
        // Last counters ([LL] "page 12"). Counter 0xFFFE2000. Transaction key: [LL], single source.
        TransactionVectors {
            ksn: "1234567890123456FFFE2000",
            transaction_key: "4625EB06E4886D4AFCC9AE37ED4F4E4E1653C9E60E3F24742A87A26AA96AB7A6",
            working_keys: &[],
        },
        // Last counters ([LL] "page 12"). Counter 0xFFFE4000. Transaction key: [LL], [CEX].
        TransactionVectors {
            ksn: "1234567890123456FFFE4000",
            transaction_key: "FF20E1BB575539ACCB44E3111BE8757F83AE8549A2DD71B441A4A424F7FFD4B1",
            working_keys: &[
                // PIN AES256 + derivation data: single source ([CEX]).
                WorkingKeyVector {
                    usage: "PIN",
                    algorithm: "AES256",
                    key: "F388FF9FB1D66E8812BC67CA5B85CE5554063E09A2440EC1AF4EB433CCFBAF35",
                    derivation_data: &["010210000004010090123456FFFE4000"],
                },
            ],
        },
        // Last counters ([LL] "page 12"). Counter 0xFFFE8000. Transaction key: [LL], [CEX].
        TransactionVectors {
            ksn: "1234567890123456FFFE8000",
            transaction_key: "630535C9C53E1EC6524016930B56F6728909C45403536B419AEBCB25B7351C07",
            working_keys: &[
                // PIN AES256 + derivation data: single source ([CEX]).
                WorkingKeyVector {
                    usage: "PIN",
                    algorithm: "AES256",
                    key: "FAC4E05A67AB1522505CF0E94E5977B99D0E5B116D76ABB6B8A64F0D785FF6DF",
                    derivation_data: &["010210000004010090123456FFFE8000"],
                },
            ],
        },
        // Last counters ([LL] "page 12"). Counter 0xFFFF0000. Transaction key: [LL], [CEX].
        TransactionVectors {
            ksn: "1234567890123456FFFF0000",
            transaction_key: "6D6DB7AAAE8B3EA90E57A39E4BBA71E173B21B446B30A78D64BFC6A8806C55EE",
            working_keys: &[
                // PIN AES256 + derivation data: single source ([CEX]).
                WorkingKeyVector {
                    usage: "PIN",
                    algorithm: "AES256",
                    key: "88B82556AEF4A681E0687F443A4C4F305AF9203B114470DFC77C7F08BC43F9DA",
                    derivation_data: &["010210000004010090123456FFFF0000"],
                },
            ],
        },
        // Counter 0xFFFFFFFF: DUKPT update key derivation (see the AES-128 BDK entry).
        TransactionVectors {
            ksn: "1234567890123456FFFFFFFF",
            transaction_key: "",
            working_keys: &[
                // Update key for AES-128 working keys: [LL] ("middle of page 12"), single source.
                WorkingKeyVector {
                    usage: "KEK",
                    algorithm: "AES128",
                    key: "90E54E4A70160C7E085C09D2B241D343",
                    derivation_data: &[],
                },
                // Update key for AES-256 working keys: [LL] ("bottom of page 18") and [PAYSEC].
                WorkingKeyVector {
                    usage: "KEK",
                    algorithm: "AES256",
                    key: "AEFB210C136278A1279F7C8815F446DB8EBE2AA910B157AA4E6484D8DE9C4807",
                    derivation_data: &[],
                },
            ],
        },
    ],
};

/// All published BDK sets.
pub const VECTORS: &[BdkVectors] = &[AES128_BDK, AES256_BDK];

/// KSNs of the first eight transactions of a terminal loaded with the AES-128 (or AES-256)
/// BDK's initial key, in the order emitted: [X9-TV] "first eight KSNs" via [LL]
/// (`ksn_verify`, checked after each `dukpt_aes_ksn_advance`) and [MOOV] (`InitialSequence`).
/// The same KSN list is used for both BDKs in [LL].
pub const AES128_TERMINAL_KSN_SEQUENCE: &[&str] = &[
    "123456789012345600000001",
    "123456789012345600000002",
    "123456789012345600000003",
    "123456789012345600000004",
    "123456789012345600000005",
    "123456789012345600000006",
    "123456789012345600000007",
    "123456789012345600000008",
];

/// Consecutive KSNs a terminal emits around the first counter that would have 17 one-bits:
/// 0x0001FFFE -> (0x0001FFFF skipped) -> 0x00020000 -> 0x00020001.
/// NOT printed as a sequence in [X9-TV] (which lists 0x1FFFF too); transcribed from [LL]
/// `ksn_verify2`, where the 0x1FFFF entry is commented out and each entry is checked after
/// advancing from the previous one.
pub const AES128_TERMINAL_KSN_SEQUENCE_ROLLOVER: &[&str] = &[
    "12345678901234560001FFFE",
    // "12345678901234560001FFFF" is skipped (17 one-bits).
    "123456789012345600020000",
    "123456789012345600020001",
];

/// The last four KSNs a terminal emits, in order ([LL] `ksn_verify3`, [X9-TV] "last four
/// transaction counters"); [LL] checks each is reached by advancing from the previous one and
/// that advancing past counter 0xFFFF0000 reports the counter as exhausted.
pub const AES128_TERMINAL_KSN_SEQUENCE_END: &[&str] = &[
    "1234567890123456FFFE2000",
    "1234567890123456FFFE4000",
    "1234567890123456FFFE8000",
    "1234567890123456FFFF0000",
];

/// The 32 intermediate derivation key registers of a terminal right after "Load Initial Key"
/// with the AES-128 BDK's initial key (index 0 = register for counter bit 0, i.e. the key for
/// counter 1; register i holds the intermediate derivation key for counter `1 << i`).
/// Sources: [JAVA] `testGenerate32IntermediateGenerationKeys` and [FORAGE]
/// `IntermediateKeys.AfterLoadKey` (identical lists). Not confirmed to be printed in [X9-TV];
/// registers 0, 1, 2, 3 and 17 equal the [X9-TV] transaction keys of counters 1, 2, 4, 8 and 0x20000.
pub const AES128_INTERMEDIATE_DERIVATION_KEY_REGISTERS_AFTER_LOAD: [&str; 32] = [
    "4F21B565BAD9835E112B6465635EAE44", // 0
    "2F34D68DE10F68D38091A73B9E7C437C", // 1
    "0EEFC7ADA628BA68878DA9165A8A1887", // 2
    "718EE6CF0B27E53D5F7AF99C4D8146A2", // 3
    "7459762EED7F51D08567ED6598DFBEA2", // 4
    "1ED39390B4448C69819EB55F4C616564", // 5
    "C13BDA0A56D6998E544E0A10A3D979DA", // 6
    "089F6B989CA13D49A6A0317F85460CE5", // 7
    "065355A6A3DD4C2260BDDDFA0C16704E", // 8
    "CF16FEBC5CFD1A741A3280564A9681F2", // 9
    "4BF8EB1DAF9F4244332ED01663EB654E", // 10
    "492248FEE0FE87E8B5DB7BB2AC7BC955", // 11
    "18690547EB19D28EFAF5EF6D22C271AA", // 12
    "84F4CCA45C4F1D4E063F1CE5B95B6C7F", // 13
    "4EC5FC0C3CD62AFF174A37B6FDC2B0D9", // 14
    "9EF99A4D5FD548A23D299074047F7F6B", // 15
    "F4C6237DB49E28BF96E6A18CD8CDDA00", // 16
    "F7AE9025468A25D37B7249CFFED224C8", // 17
    "579594A986E87917382A181576FA7A9A", // 18
    "5AAF46AAD7593E0D224E05E13629ED1E", // 19
    "5787EB837B6FFB3AF24759F8625CEC19", // 20
    "988A3AB89B9332A15D0BE2C54C279923", // 21
    "E55171636976BDC5758A6FA4C25F0008", // 22
    "DF16D5BAC52FFA7564D7DBD2DE7C6CCF", // 23
    "145E8C933FC0D61900592035CF18A5AF", // 24
    "FBDF917E209B42F9DB8843D18BEE8033", // 25
    "61C70779F920BBD37815C21B5A1A7B75", // 26
    "97D7BB3FC342B9E961308BB8B801775B", // 27
    "69B453118411404DB54AE2B751F02F43", // 28
    "7CCE4E679F4FC3478E3CD4509D64A7F3", // 29
    "36AF4AA9FC1100B2AE7742101540340A", // 30
    "9DC56486499A2E857FDEFC4740641EA8", // 31
];
