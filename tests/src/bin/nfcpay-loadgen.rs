//! `nfcpay-loadgen`: N simulated terminals paying each other through a real platform.
//!
//! It starts a platform like the end-to-end tests do (`nfcpayd` with its own SoftHSM2 token,
//! SQLite or PostgreSQL), enrolls N terminals through the real enrollment route, and runs N/2
//! payer–payee pairs over mutual TLS with keep-alive for a while: each payment is half A
//! (pending), then half B (settled). It prints settled payments per second and the p50/p99
//! latency of a payment (half A sent → settled receipt back), and, measured in the same run on
//! the same token, SoftHSM2's AES derivation and ECDSA signing rates, with the bound they put
//! on payments per second. Figures only: nothing is asserted.
//!
//! ```console
//! cargo build --release --bins
//! target/release/nfcpay-loadgen --terminals 16 --seconds 10
//! ```

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use nfcpay_keystore::pkcs11::Pkcs11Keystore;
use nfcpay_keystore::{DeriveBase, KeyLabel, KeyPurpose, Keystore};
use nfcpay_protocol::InitialKeyId;
use nfcpay_protocol::dukpt::{DerivationData, KeyAlgorithm};
use nfcpay_protocol::messages::HalfKind;
use nfcpay_tests::{FIXTURE_BDK_ID, Ledger, PlatformFixture, SOFTHSM_MODULE, TestTerminal};

/// Load generator for nfcpay.
#[derive(Debug, Parser)]
#[command(name = "nfcpay-loadgen", version)]
struct Args {
    /// Simulated terminals (even; half pay, half are paid).
    #[arg(long, default_value_t = 16)]
    terminals: usize,
    /// How long to pay, in seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Use the PostgreSQL at this URL (a fresh schema) instead of SQLite.
    #[arg(long)]
    postgres_url: Option<String>,
    /// Internal: measure the HSM rates on the token of this softhsm2.conf and print them.
    #[arg(long, hide = true)]
    hsm_probe: Option<PathBuf>,
}

/// How long each HSM rate is measured.
const PROBE_DURATION: Duration = Duration::from_secs(2);

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(dir) = &args.hsm_probe {
        return hsm_probe(dir);
    }
    if args.terminals < 2 || args.terminals % 2 != 0 {
        bail!("--terminals must be even and at least 2");
    }
    let ledger = args
        .postgres_url
        .clone()
        .map_or(Ledger::Sqlite, Ledger::Postgres);
    println!("starting a platform ({ledger:?})…");
    let platform = PlatformFixture::start(&ledger)?;
    let probe = Command::new(std::env::current_exe()?)
        .arg("--hsm-probe")
        .arg(platform.dir())
        .env("SOFTHSM2_CONF", platform.softhsm_conf())
        .output()?;
    if !probe.status.success() {
        bail!("HSM probe: {}", String::from_utf8_lossy(&probe.stderr));
    }
    let probe = String::from_utf8(probe.stdout)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(load(&args, &platform, &probe))
}

async fn load(args: &Args, platform: &PlatformFixture, probe: &str) -> Result<()> {
    println!("enrolling {} terminals…", args.terminals);
    let mut terminals = Vec::new();
    for index in 0..args.terminals {
        let account = format!("acct-{index}");
        platform.account(&account, "EUR", Some("1000000.00"))?;
        terminals.push(platform.enroll(&format!("term-{index}"), &account).await?);
    }
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let started = Instant::now();
    let mut pairs = Vec::new();
    while let (Some(payer), Some(payee)) = (terminals.pop(), terminals.pop()) {
        pairs.push(tokio::spawn(pay_until(payee, payer, deadline)));
    }
    let mut latencies_us = Vec::new();
    let mut failures = 0usize;
    for pair in pairs {
        let (latencies, failed) = pair.await?;
        latencies_us.extend(latencies);
        failures += failed;
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies_us.sort_unstable();
    let percentile = |p: f64| {
        let index = ((latencies_us.len() as f64 - 1.0) * p).round() as usize;
        latencies_us
            .get(index)
            .map_or(0.0, |&us| us as f64 / 1000.0)
    };
    let settled = latencies_us.len();
    let rate = settled as f64 / elapsed;
    println!();
    println!(
        "terminals:            {} ({} pairs)",
        args.terminals,
        args.terminals / 2
    );
    println!("settled payments:     {settled} in {elapsed:.1} s ({failures} failed)");
    println!("payments/s:           {rate:.0}");
    println!(
        "latency p50 / p99:    {:.1} ms / {:.1} ms",
        percentile(0.50),
        percentile(0.99)
    );
    print!("{probe}");
    if let Some(bound) = probe_bound(probe) {
        println!(
            "HSM-bound payments/s: {bound:.0} (load reached {:.0}% of it)",
            100.0 * rate / bound
        );
    }
    let audit = platform.admin_ok(&["audit", "verify"])?;
    print!("{audit}");
    Ok(())
}

/// One pair paying each other (alternating roles) until the deadline: latencies in µs and
/// the number of failed payments.
async fn pay_until(
    mut first: TestTerminal,
    mut second: TestTerminal,
    deadline: Instant,
) -> (Vec<u64>, usize) {
    let mut latencies = Vec::new();
    let mut failures = 0;
    let mut turn = false;
    while Instant::now() < deadline {
        let (payee, payer) = if turn {
            (&mut first, &mut second)
        } else {
            (&mut second, &mut first)
        };
        turn = !turn;
        let started = Instant::now();
        match pay(payee, payer).await {
            Ok(()) => {
                latencies.push(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX))
            }
            Err(error) => {
                failures += 1;
                eprintln!("payment failed: {error:#}");
            }
        }
    }
    (latencies, failures)
}

/// One payment. Sealing takes the terminal's next KSN, which saves its DUKPT state durably
/// (fsync) first, as a real terminal does: that blocking work runs off the async threads.
async fn pay(payee: &mut TestTerminal, payer: &mut TestTerminal) -> Result<()> {
    use tokio::task::block_in_place;
    let request = payee.request("1.25", "EUR", "load")?;
    let (_payee_keys, half_a) = block_in_place(|| payee.seal(HalfKind::A, &request))?;
    let pending = payee.submit(HalfKind::A, half_a, Duration::ZERO).await?;
    if pending.settled {
        bail!("half A alone settled");
    }
    let instruction = payer.instruction(&request)?;
    let (payer_keys, half_b) = block_in_place(|| payer.seal(HalfKind::B, &instruction))?;
    let answer = payer.submit(HalfKind::B, half_b, Duration::ZERO).await?;
    if !answer.settled {
        bail!("half B did not settle");
    }
    payer.open_receipt(&payer_keys, &answer.receipt)?;
    Ok(())
}

/// Measures, on the fixture's token, AES derivations (from the BDK's session copy, as the
/// daemon derives) and ECDSA signatures per second on one thread, and prints them.
fn hsm_probe(dir: &std::path::Path) -> Result<()> {
    let uri = format!(
        "pkcs11:token=nfcpay-e2e?module-path={SOFTHSM_MODULE}&pin-source=file:{}",
        dir.join("pin").display()
    );
    let store = Pkcs11Keystore::open(&uri.parse()?)?;
    let initial_key_id: InitialKeyId = format!("{FIXTURE_BDK_ID}00000001").parse()?;
    let data = DerivationData::initial_key(KeyAlgorithm::Aes256, initial_key_id);
    let bdk = DeriveBase::Bdk(initial_key_id.bdk_id());
    let derive = rate(|| {
        let key = store.derive(bdk, &data, KeyPurpose::Derive)?;
        store.destroy(key)?;
        Ok(())
    })?;
    let label: KeyLabel = "loadgen-probe".parse()?;
    let (key, _) = store.generate_ec_p256(&label, false)?;
    let sign = rate(|| {
        store.sign_p256_sha256(&key, b"receipt body")?;
        Ok(())
    })?;
    store.destroy_ec(key)?;
    println!("HSM derivations/s:    {derive:.0} (SoftHSM2, one thread, AES-256 from the BDK)");
    println!("HSM ECDSA signs/s:    {sign:.0} (SoftHSM2, one thread, P-256)");
    Ok(())
}

fn rate(mut operation: impl FnMut() -> Result<()>) -> Result<f64> {
    let started = Instant::now();
    let mut count = 0u64;
    while started.elapsed() < PROBE_DURATION {
        operation().context("HSM probe")?;
        count += 1;
    }
    Ok(count as f64 / started.elapsed().as_secs_f64())
}

/// Each payment costs the HSM, per half: about 3 derivations (the cached path's last step,
/// the GCM key, the receipt MAC key) and one ECDSA signature; so about 6 derivations and 2
/// signatures per payment. The bound is the smaller of the two rates so divided.
fn probe_bound(probe: &str) -> Option<f64> {
    let value = |prefix: &str| {
        probe
            .lines()
            .find_map(|line| line.strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|number| number.parse::<f64>().ok())
    };
    let derive = value("HSM derivations/s:")?;
    let sign = value("HSM ECDSA signs/s:")?;
    Some((derive / 6.0).min(sign / 2.0))
}
