//! Prints how many AES derivations per second the PKCS#11 backend does on one thread.
//!
//! ```console
//! cargo run -p nfcpay-keystore --example derive_rate
//! ```
//!
//! With no arguments it makes a throwaway SoftHSM2 token (`SoftHsmDir`, through
//! `softhsm-setup/init-token`) and runs itself again with `SOFTHSM2_CONF` set (the variable
//! must be set before `C_Initialize`, and setting it from inside the process is not
//! thread-safe). Figures only: nothing here asserts a rate.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::{Duration, Instant};

use nfcpay_keystore::dukpt;
use nfcpay_keystore::pkcs11::Pkcs11Keystore;
use nfcpay_keystore::testing::{SOFTHSM2_MODULE, SoftHsmDir};
use nfcpay_keystore::{DeriveBase, KeyPurpose, Keystore};
use nfcpay_protocol::dukpt::{DerivationData, KeyAlgorithm, WorkingKeyUsage};
use nfcpay_protocol::{BdkId, Ksn, TransactionCounter};
use zeroize::Zeroizing;

const URI_VARIABLE: &str = "NFCPAY_DERIVE_RATE_URI";
/// How long each measurement runs.
const MEASURE_FOR: Duration = Duration::from_secs(3);

fn main() {
    match std::env::var(URI_VARIABLE) {
        Ok(uri) => measure(&uri),
        Err(_) => run_with_a_fresh_token(),
    }
}

fn run_with_a_fresh_token() {
    let hsm = SoftHsmDir::new("123456");
    hsm.make_token("derive-rate");
    let uri = format!(
        "pkcs11:token=derive-rate?module-path={SOFTHSM2_MODULE}&pin-source=file:{}",
        hsm.pin_file().display()
    );
    let status = Command::new(std::env::current_exe().unwrap())
        .env("SOFTHSM2_CONF", hsm.conf())
        .env(URI_VARIABLE, uri)
        .status()
        .unwrap();
    drop(hsm);
    std::process::exit(status.code().unwrap_or(1));
}

fn measure(uri: &str) {
    let store = Pkcs11Keystore::open(&uri.parse().unwrap()).unwrap();
    let bdk_id = BdkId::from([0xDE, 0x71, 0x7E, 0x00]);
    if store.bdk_info(bdk_id).is_err() {
        let key = Zeroizing::new(vec![0x5A; 32]);
        store.import_bdk(bdk_id, &key).unwrap();
    }
    let initial_key_id = "DE717E0000000001".parse().unwrap();

    for algorithm in [KeyAlgorithm::Aes128, KeyAlgorithm::Aes256] {
        let data = DerivationData::initial_key(algorithm, initial_key_id);
        let (count, elapsed) = repeat(|| {
            let key = store
                .derive(DeriveBase::Bdk(bdk_id), &data, KeyPurpose::Derive)
                .unwrap();
            store.destroy(key).unwrap();
            1
        });
        println!(
            "one derivation from the AES-256 BDK (session copy) to {algorithm}, destroyed: {:.0}/s",
            count as f64 / elapsed.as_secs_f64()
        );
    }

    // Realistic counters: a terminal's counters walk upward; take a spread of valid ones.
    let counters: Vec<u32> = (1..u32::MAX)
        .step_by(40_503)
        .filter(|counter| TransactionCounter::is_valid(*counter))
        .take(512)
        .collect();
    let mut next = 0;
    let mut derivations = 0u64;
    let (count, elapsed) = repeat(|| {
        let counter = counters[next % counters.len()];
        next += 1;
        let mut ksn = [0u8; 12];
        ksn[..8].copy_from_slice(&[0xDE, 0x71, 0x7E, 0x00, 0, 0, 0, 1]);
        ksn[8..].copy_from_slice(&counter.to_be_bytes());
        let ksn = Ksn::try_from(ksn).unwrap();
        // IK, one per one-bit of the counter, the working key.
        derivations += 2 + u64::from(counter.count_ones());
        let key = dukpt::working_key(
            &store,
            ksn,
            WorkingKeyUsage::DataBoth,
            None,
            KeyPurpose::Encrypt,
        )
        .unwrap();
        store.destroy(key).unwrap();
        1
    });
    let seconds = elapsed.as_secs_f64();
    println!(
        "DUKPT working key from the BDK (AES-256, {} distinct counters): {:.0} working keys/s, {:.0} derivations/s",
        counters.len(),
        count as f64 / seconds,
        derivations as f64 / seconds
    );
}

/// Runs `work` for [`MEASURE_FOR`]; returns how many units it did and how long it took.
fn repeat(mut work: impl FnMut() -> u64) -> (u64, Duration) {
    let start = Instant::now();
    let mut count = 0;
    while start.elapsed() < MEASURE_FOR {
        count += work();
    }
    (count, start.elapsed())
}
