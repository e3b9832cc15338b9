//! `nfcpay-loadgen`: N simulated terminals paying each other through a real platform.
//!
//! It starts a platform like the end-to-end tests do (`nfcpayd` with its own SoftHSM2 token,
//! SQLite or PostgreSQL), enrolls N terminals through the real enrollment route, and runs N/2
//! payer–payee pairs over mutual TLS with keep-alive for a while: each payment is half A
//! (pending), then half B (settled). It prints settled payments per second, the p50/p99
//! latency of a payment (half A sent → settled receipt back), the CPU time the daemons and
//! the load generator spent per settled payment (from `/proc`), the HSM operations per
//! payment the daemons counted (`/metrics`), and, measured in the same run on the same
//! token, SoftHSM2's AES derivation and ECDSA signing rates with the bound they put on
//! payments per second. At the end it checks the ledger: every settled receipt booked
//! exactly once, postings summing to zero, `nfcpay-admin audit verify`; it exits non-zero
//! when a check fails. No time is asserted.
//!
//! With `--postgres-url URL --daemons N` it runs N daemons on one PostgreSQL database (a
//! fresh schema) and one token; the two terminals of a pair enroll at, and pay through,
//! different daemons, so half A and half B of each payment meet only in the database.
//!
//! ```console
//! cargo build --release -p nfcpay-daemon -p nfcpay-tests --bins
//! target/release/nfcpay-loadgen --terminals 64 --seconds 10 --terminal-state memory --json
//! target/release/nfcpay-loadgen --postgres-url postgresql://… --daemons 2 --terminals 64
//! ```

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use nfcpay_keystore::pkcs11::Pkcs11Keystore;
use nfcpay_keystore::{DeriveBase, KeyLabel, KeyPurpose, Keystore};
use nfcpay_protocol::dukpt::{DerivationData, KeyAlgorithm};
use nfcpay_protocol::messages::HalfKind;
use nfcpay_protocol::{AccountId, Currency, InitialKeyId, TxnId};
use nfcpay_terminal_agent::platform::PlatformError;
use nfcpay_tests::loadgen::{
    DaemonFigures, LedgerVerdict, SettledPayment, check_ledger, cpu_time_ms, daemon_metric,
    hsm_operations, own_cpu_time_ms, quantile, register_idle_terminals,
    register_idle_terminals_postgres, rss_kib,
};
use nfcpay_tests::{
    DaemonEndpoints, FIXTURE_BDK_ID, Ledger, PlatformFixture, SOFTHSM_MODULE, TestTerminal,
};

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
    /// nfcpayd processes on the one ledger and token (more than one needs PostgreSQL); the
    /// terminals of a pair pay through different daemons.
    #[arg(long, default_value_t = 1)]
    daemons: usize,
    /// Idle terminals registered in the ledger besides the active ones (lookups at
    /// realistic sizes).
    #[arg(long, default_value_t = 0)]
    registered: usize,
    /// Where the simulated terminals keep their DUKPT state: `durable` saves it (fsync)
    /// before each key, as a real terminal does; `memory` does not, so that the figure
    /// measures the platform.
    #[arg(long, value_enum, default_value_t = TerminalStateKeeping::Durable)]
    terminal_state: TerminalStateKeeping,
    /// Before paying, hold this many more mTLS connections to the first daemon as one
    /// terminal (each makes one request, then idles) and report the daemon's RSS growth
    /// per connection; they are closed before the paying window.
    #[arg(long, default_value_t = 0)]
    idle_connections: usize,
    /// The daemons' `[database] commit_delay_us` (their default when absent): how long the
    /// ledger writer waits for halves still being verified before it commits a batch.
    #[arg(long)]
    commit_delay_us: Option<u64>,
    /// The daemons' `[database] writers` (PostgreSQL; their default when absent).
    #[arg(long)]
    writers: Option<u32>,
    /// Print one JSON object on stdout (progress goes to stderr).
    #[arg(long)]
    json: bool,
    /// Skip measuring the HSM rates (4 s): no HSM bound then.
    #[arg(long)]
    no_hsm_probe: bool,
    /// Internal: measure the HSM rates on the token of this fixture directory and print them.
    #[arg(long, hide = true)]
    hsm_probe: Option<PathBuf>,
}

/// Where the simulated terminals keep their DUKPT state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum TerminalStateKeeping {
    /// Saved durably before each key is used, like a real terminal.
    Durable,
    /// In memory only (no fsync per KSN).
    Memory,
}

impl TerminalStateKeeping {
    fn name(self) -> &'static str {
        match self {
            Self::Durable => "durable",
            Self::Memory => "memory",
        }
    }
}

/// How long each HSM rate is measured.
const PROBE_DURATION: Duration = Duration::from_secs(2);
/// Most daemons one run starts.
const DAEMONS_MAX: usize = 16;
/// Failed payments whose error each pair prints (the count covers them all).
const FAILURES_PRINTED_PER_PAIR_MAX: usize = 3;
/// What each payment moves.
const PAYMENT_AMOUNT: &str = "1.25";
/// The currency of every account.
const CURRENCY: &str = "EUR";
/// What each active account is funded with.
const ACCOUNT_FUNDS: &str = "1000000.00";
/// The account the idle terminals of `--registered` belong to.
const IDLE_ACCOUNT: &str = "acct-idle";

/// Progress lines: on stdout, or on stderr when stdout carries the JSON report.
macro_rules! progress {
    ($json:expr, $($arg:tt)*) => {
        if $json { eprintln!($($arg)*) } else { println!($($arg)*) }
    };
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(dir) = &args.hsm_probe {
        return hsm_probe(dir);
    }
    if args.terminals < 2 || args.terminals % 2 != 0 {
        bail!("--terminals must be even and at least 2");
    }
    if !(1..=DAEMONS_MAX).contains(&args.daemons) {
        bail!("--daemons must be between 1 and {DAEMONS_MAX}");
    }
    if args.daemons > 1 && args.postgres_url.is_none() {
        bail!("--daemons above 1 needs --postgres-url (daemons share one ledger)");
    }
    let json = args.json;
    let ledger = args
        .postgres_url
        .clone()
        .map_or(Ledger::Sqlite, Ledger::Postgres);
    let ledger_name = match ledger {
        Ledger::Sqlite => "sqlite",
        Ledger::Postgres(_) => "postgresql",
    };
    progress!(
        json,
        "starting a platform ({ledger_name}, daemons: {})…",
        args.daemons
    );
    let mut settings = String::new();
    if let Some(us) = args.commit_delay_us {
        settings.push_str(&format!("commit_delay_us = {us}\n"));
    }
    if let Some(writers) = args.writers {
        settings.push_str(&format!("writers = {writers}\n"));
    }
    let mut platform = PlatformFixture::start_with_database_settings(&ledger, &settings)?;
    for _ in 1..args.daemons {
        platform.start_extra_daemon()?;
    }
    let storage = platform.storage()?;
    let registration_s = if args.registered > 0 {
        progress!(json, "registering {} idle terminals…", args.registered);
        platform.account(IDLE_ACCOUNT, CURRENCY, None)?;
        let account: AccountId = IDLE_ACCOUNT.parse()?;
        let took = match ledger {
            Ledger::Sqlite => register_idle_terminals(&storage, &account, args.registered)?,
            Ledger::Postgres(_) => {
                register_idle_terminals_postgres(&platform.database_url, &account, args.registered)?
            }
        };
        progress!(json, "registered them in {:.1} s", took.as_secs_f64());
        Some(took.as_secs_f64())
    } else {
        None
    };
    let probe = if args.no_hsm_probe {
        None
    } else {
        Some(run_hsm_probe(&platform)?)
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let run = runtime.block_on(load(&args, &platform))?;

    progress!(json, "checking the ledger…");
    let mut accounts: Vec<AccountId> = (0..args.terminals)
        .map(|index| account_name(index).parse())
        .collect::<Result<_, _>>()?;
    if args.registered > 0 {
        accounts.push(IDLE_ACCOUNT.parse()?);
    }
    let currency: Currency = CURRENCY.parse()?;
    let verdict = check_ledger(&storage, &run.payments, &accounts, currency, run.failed)?;
    let audit = platform.admin(&["audit", "verify"], "")?;
    let audit_ok = audit.status.success();
    let audit_text = format!(
        "{}{}",
        String::from_utf8_lossy(&audit.stdout),
        String::from_utf8_lossy(&audit.stderr)
    );

    let report = Report {
        args: &args,
        ledger: ledger_name,
        registration_s,
        probe,
        run: &run,
        verdict: &verdict,
        audit_ok,
    };
    if json {
        eprint!("{audit_text}");
        println!("{}", report.json());
    } else {
        report.print_human();
        print!("{audit_text}");
    }
    for problem in &verdict.problems {
        eprintln!("ledger check: {problem}");
    }
    if !verdict.is_ok() || !audit_ok {
        bail!(
            "the ledger check failed (exactly once: {}, postings balanced: {}, audit verify: {})",
            verdict.exactly_once,
            verdict.postings_balanced,
            audit_ok
        );
    }
    Ok(())
}

fn account_name(index: usize) -> String {
    format!("acct-{index}")
}

/// What the paying window produced and cost.
struct Run {
    elapsed_s: f64,
    /// Latency of each settled payment, sorted, in µs.
    latencies_us: Vec<u64>,
    payments: Vec<SettledPayment>,
    failed: usize,
    daemon_cpu_ms: f64,
    loadgen_cpu_ms: f64,
    /// HSM operations the daemons counted in the window; `None` when they do not export the
    /// counter.
    hsm_operations: Option<f64>,
    /// The daemons' ledger batches and request times in the window.
    figures: DaemonFigures,
    /// What `--idle-connections` measured.
    idle: Option<IdleConnections>,
}

/// The first daemon's memory before and after `--idle-connections` more connections.
#[derive(Debug, Clone, Copy)]
struct IdleConnections {
    held: usize,
    /// The daemon's `nfcpayd_open_connections` while they were held.
    open_in_daemon: Option<f64>,
    rss_before_kib: u64,
    rss_after_kib: u64,
}

impl IdleConnections {
    fn kib_per_connection(self) -> f64 {
        (self.rss_after_kib as f64 - self.rss_before_kib as f64) / self.held as f64
    }
}

/// Enrolls the terminals (pair `p`: one at daemon `p mod N`, the other at `p+1 mod N`),
/// then pays until the deadline; samples CPU and HSM counters at the window's edges.
async fn load(args: &Args, platform: &PlatformFixture) -> Result<Run> {
    let json = args.json;
    let endpoints = platform.all_endpoints();
    progress!(json, "enrolling {} terminals…", args.terminals);
    let mut pairs = Vec::new();
    for pair in 0..args.terminals / 2 {
        let first = enroll(args, platform, 2 * pair, &endpoints[pair % endpoints.len()]).await?;
        let second_at = &endpoints[(pair + 1) % endpoints.len()];
        let second = enroll(args, platform, 2 * pair + 1, second_at).await?;
        pairs.push((first, second));
    }
    let idle = match pairs.first() {
        Some((first, _)) if args.idle_connections > 0 => {
            Some(hold_idle_connections(args, platform, first).await?)
        }
        _ => None,
    };
    progress!(
        json,
        "paying for {} s ({} pairs, terminal state {})…",
        args.seconds,
        pairs.len(),
        args.terminal_state.name()
    );
    let pids = platform.daemon_pids();
    let daemon_cpu = || -> Result<f64> { pids.iter().map(|&pid| cpu_time_ms(pid)).sum() };
    let hsm_counted = || -> Result<Option<f64>> {
        endpoints
            .iter()
            .map(|daemon| hsm_operations(&daemon.ops_address))
            .sum()
    };
    let figures = || -> Result<DaemonFigures> {
        endpoints
            .iter()
            .try_fold(DaemonFigures::default(), |total, daemon| {
                Ok(total.plus(DaemonFigures::read(&daemon.ops_address)?))
            })
    };
    let figures_before = figures()?;
    let hsm_before = hsm_counted()?;
    let daemon_before = daemon_cpu()?;
    let loadgen_before = own_cpu_time_ms()?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.seconds);
    let tasks: Vec<_> = pairs
        .into_iter()
        .map(|(first, second)| tokio::spawn(pay_until(first, second, deadline)))
        .collect();
    let mut latencies_us = Vec::new();
    let mut payments = Vec::new();
    let mut failed = 0usize;
    for task in tasks {
        let outcome = task.await?;
        latencies_us.extend(outcome.latencies_us);
        payments.extend(outcome.payments);
        failed += outcome.failed;
    }
    let elapsed_s = started.elapsed().as_secs_f64();
    let loadgen_cpu_ms = own_cpu_time_ms()? - loadgen_before;
    let daemon_cpu_ms = daemon_cpu()? - daemon_before;
    let hsm_after = hsm_counted()?;
    let figures = figures()?.since(figures_before);
    latencies_us.sort_unstable();
    Ok(Run {
        elapsed_s,
        latencies_us,
        payments,
        failed,
        daemon_cpu_ms,
        loadgen_cpu_ms,
        hsm_operations: hsm_before
            .zip(hsm_after)
            .map(|(before, after)| after - before),
        figures,
        idle,
    })
}

/// Opens `--idle-connections` connections to the first daemon as `terminal` (enrolled
/// there), each answered once (a lookup of an unknown payment: 404, kept alive), holds
/// them a second and measures the daemon's RSS; closes them.
async fn hold_idle_connections(
    args: &Args,
    platform: &PlatformFixture,
    terminal: &TestTerminal,
) -> Result<IdleConnections> {
    let held = args.idle_connections;
    progress!(args.json, "holding {held} idle connections…");
    let pid = platform.daemon_pids()[0];
    let ops_address = platform.endpoints().ops_address;
    let rss_before_kib = rss_kib(pid)?;
    let mut clients = Vec::with_capacity(held);
    for _ in 0..held {
        let client = terminal.another_client()?;
        let mut txn_id = [0u8; 16];
        getrandom::fill(&mut txn_id)?;
        match client.transaction(TxnId::try_from(txn_id)?).await {
            Err(PlatformError::Refused(problem)) if problem.status == 404 => {}
            Err(other) => return Err(other.into()),
            Ok(_) => bail!("a random transaction ID was found"),
        }
        clients.push(client);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_after_kib = rss_kib(pid)?;
    let open_in_daemon = daemon_metric(&ops_address, "nfcpayd_open_connections")?;
    drop(clients);
    Ok(IdleConnections {
        held,
        open_in_daemon,
        rss_before_kib,
        rss_after_kib,
    })
}

/// Creates and funds terminal `index`'s account and enrolls it at `daemon`.
async fn enroll(
    args: &Args,
    platform: &PlatformFixture,
    index: usize,
    daemon: &DaemonEndpoints,
) -> Result<TestTerminal> {
    let account = account_name(index);
    platform.account(&account, CURRENCY, Some(ACCOUNT_FUNDS))?;
    let mut terminal = platform
        .enroll_at(&format!("term-{index}"), &account, daemon)
        .await?;
    if args.terminal_state == TerminalStateKeeping::Memory {
        terminal.danger_keep_keys_in_memory()?;
    }
    Ok(terminal)
}

/// What one pair did.
struct PairOutcome {
    latencies_us: Vec<u64>,
    payments: Vec<SettledPayment>,
    failed: usize,
}

/// One pair paying each other (alternating roles) until the deadline.
async fn pay_until(
    mut first: TestTerminal,
    mut second: TestTerminal,
    deadline: Instant,
) -> PairOutcome {
    let mut outcome = PairOutcome {
        latencies_us: Vec::new(),
        payments: Vec::new(),
        failed: 0,
    };
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
            Ok(payment) => {
                outcome
                    .latencies_us
                    .push(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX));
                outcome.payments.push(payment);
            }
            Err(error) => {
                outcome.failed += 1;
                if outcome.failed <= FAILURES_PRINTED_PER_PAIR_MAX {
                    eprintln!("payment failed: {error:#}");
                }
            }
        }
    }
    outcome
}

/// One payment: half A from the payee (answered pending), then half B from the payer, both
/// with no wait. Half A was acknowledged, so committed, before half B is sent: half B must
/// come back settled, even from another daemon. Sealing takes the terminal's next KSN, which
/// in the durable state saves it (fsync) first: that blocking work runs off the async threads.
async fn pay(payee: &mut TestTerminal, payer: &mut TestTerminal) -> Result<SettledPayment> {
    use tokio::task::block_in_place;
    let request = payee.request(PAYMENT_AMOUNT, CURRENCY, "load")?;
    let (_payee_keys, half_a) = block_in_place(|| payee.seal(HalfKind::A, &request))?;
    let pending = payee.submit(HalfKind::A, half_a, Duration::ZERO).await?;
    if pending.settled {
        bail!("half A alone settled");
    }
    let instruction = payer.instruction(&request)?;
    let (payer_keys, half_b) = block_in_place(|| payer.seal(HalfKind::B, &instruction))?;
    let answer = payer.submit(HalfKind::B, half_b, Duration::ZERO).await?;
    if !answer.settled {
        bail!("half B did not settle although half A was acknowledged");
    }
    let receipt = payer.open_receipt(&payer_keys, &answer.receipt)?;
    SettledPayment::from_receipt(&receipt)
}

/// The HSM rates, measured on the platform's token.
#[derive(Debug, Clone, Copy)]
struct HsmProbe {
    derivations_per_s: f64,
    signs_per_s: f64,
}

impl HsmProbe {
    /// Each payment costs the HSM, per half: about 3 derivations (the cached path's last
    /// step, the GCM key, the receipt MAC key) and one ECDSA signature; so about 6
    /// derivations and 2 signatures per payment. The bound is the smaller of the two rates
    /// so divided.
    fn bound_payments_per_s(self) -> f64 {
        (self.derivations_per_s / 6.0).min(self.signs_per_s / 2.0)
    }
}

/// Runs the probe in a child process (its own PKCS#11 session, not this one's CPU figure).
fn run_hsm_probe(platform: &PlatformFixture) -> Result<HsmProbe> {
    let probe = Command::new(std::env::current_exe()?)
        .arg("--hsm-probe")
        .arg(platform.dir())
        .env("SOFTHSM2_CONF", platform.softhsm_conf())
        .output()?;
    if !probe.status.success() {
        bail!("HSM probe: {}", String::from_utf8_lossy(&probe.stderr));
    }
    let text = String::from_utf8(probe.stdout)?;
    let value = |prefix: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|number| number.parse::<f64>().ok())
            .with_context(|| format!("no {prefix:?} in the probe's output"))
    };
    Ok(HsmProbe {
        derivations_per_s: value("HSM derivations/s:")?,
        signs_per_s: value("HSM ECDSA signs/s:")?,
    })
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

/// Everything the run prints.
struct Report<'a> {
    args: &'a Args,
    ledger: &'static str,
    registration_s: Option<f64>,
    probe: Option<HsmProbe>,
    run: &'a Run,
    verdict: &'a LedgerVerdict,
    audit_ok: bool,
}

impl Report<'_> {
    fn settled(&self) -> usize {
        self.run.payments.len()
    }

    fn payments_per_s(&self) -> f64 {
        self.settled() as f64 / self.run.elapsed_s
    }

    /// `total / settled`, or `None` when nothing settled.
    fn per_payment(&self, total: f64) -> Option<f64> {
        (self.settled() > 0).then(|| total / self.settled() as f64)
    }

    fn latency_ms(&self, q: f64) -> Option<f64> {
        quantile(&self.run.latencies_us, q).map(|us| us as f64 / 1000.0)
    }

    fn bound(&self) -> Option<f64> {
        self.probe.map(HsmProbe::bound_payments_per_s)
    }

    fn json(&self) -> serde_json::Value {
        let round = |value: Option<f64>, places: i32| {
            let scale = 10f64.powi(places);
            value.map(|value| (value * scale).round() / scale)
        };
        serde_json::json!({
            "payments_per_s": round(Some(self.payments_per_s()), 1),
            "settled": self.settled(),
            "failed": self.run.failed,
            "p50_ms": round(self.latency_ms(0.50), 2),
            "p99_ms": round(self.latency_ms(0.99), 2),
            "daemon_cpu_ms_per_payment": round(self.per_payment(self.run.daemon_cpu_ms), 3),
            "loadgen_cpu_ms_per_payment": round(self.per_payment(self.run.loadgen_cpu_ms), 3),
            "hsm_ops_per_payment":
                round(self.run.hsm_operations.and_then(|ops| self.per_payment(ops)), 2),
            "hsm_bound_payments_per_s": round(self.bound(), 0),
            "hsm_ratio": round(self.bound().map(|bound| self.payments_per_s() / bound), 4),
            "hsm_derivations_per_s": round(self.probe.map(|probe| probe.derivations_per_s), 0),
            "hsm_signs_per_s": round(self.probe.map(|probe| probe.signs_per_s), 0),
            "halves_per_batch": round(self.run.figures.halves_per_batch(), 1),
            "statements_per_batch": round(self.run.figures.statements_per_batch(), 1),
            "batch_ms": round(self.run.figures.batch_ms(), 2),
            "daemon_half_ms": round(self.run.figures.request_ms(), 2),
            "terminals": self.args.terminals,
            "daemons": self.args.daemons,
            "registered": self.args.registered,
            "registration_s": round(self.registration_s, 2),
            "seconds": self.args.seconds,
            "elapsed_s": round(Some(self.run.elapsed_s), 2),
            "ledger": self.ledger,
            "terminal_state": self.args.terminal_state.name(),
            "exactly_once": self.verdict.exactly_once,
            "postings_balanced": self.verdict.postings_balanced,
            "ledger_settlements": self.verdict.ledger_settlements,
            "audit_ok": self.audit_ok,
            "idle_connections": self.run.idle.map(|idle| idle.held),
            "idle_connections_open_in_daemon": self.run.idle.and_then(|idle| idle.open_in_daemon),
            "rss_kib_per_idle_connection":
                round(self.run.idle.map(IdleConnections::kib_per_connection), 1),
        })
    }

    fn print_human(&self) {
        let ms =
            |value: Option<f64>| value.map_or_else(|| "-".to_owned(), |v| format!("{v:.1} ms"));
        let cpu =
            |value: Option<f64>| value.map_or_else(|| "-".to_owned(), |v| format!("{v:.2} ms"));
        let args = self.args;
        println!();
        println!(
            "terminals:            {} ({} pairs, state {}), {} registered idle",
            args.terminals,
            args.terminals / 2,
            args.terminal_state.name(),
            args.registered
        );
        println!("ledger, daemons:      {}, {}", self.ledger, args.daemons);
        println!(
            "settled payments:     {} in {:.1} s ({} failed)",
            self.settled(),
            self.run.elapsed_s,
            self.run.failed
        );
        println!("payments/s:           {:.0}", self.payments_per_s());
        println!(
            "latency p50 / p99:    {} / {}",
            ms(self.latency_ms(0.50)),
            ms(self.latency_ms(0.99))
        );
        println!(
            "CPU per payment:      nfcpayd {} (all daemons), loadgen {}",
            cpu(self.per_payment(self.run.daemon_cpu_ms)),
            cpu(self.per_payment(self.run.loadgen_cpu_ms))
        );
        match self
            .run
            .hsm_operations
            .and_then(|ops| self.per_payment(ops))
        {
            Some(ops) => println!("HSM ops per payment:  {ops:.1} (counted by nfcpayd)"),
            None => println!(
                "HSM ops per payment:  - (nfcpayd does not export nfcpay_hsm_operations_total)"
            ),
        }
        let figures = &self.run.figures;
        let mean = |value: Option<f64>| value.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"));
        println!(
            "ledger batches:       {} halves, {} statements, {} from BEGIN to COMMIT (means)",
            mean(figures.halves_per_batch()),
            mean(figures.statements_per_batch()),
            ms(figures.batch_ms())
        );
        println!(
            "time in nfcpayd:      {} per half (head read to answer, mean)",
            ms(figures.request_ms())
        );
        if let Some(probe) = self.probe {
            println!(
                "HSM derivations/s:    {:.0} (SoftHSM2, one thread, AES-256 from the BDK)",
                probe.derivations_per_s
            );
            println!(
                "HSM ECDSA signs/s:    {:.0} (SoftHSM2, one thread, P-256)",
                probe.signs_per_s
            );
            let bound = probe.bound_payments_per_s();
            println!(
                "HSM-bound payments/s: {bound:.0} (load reached {:.1}% of it)",
                100.0 * self.payments_per_s() / bound
            );
        }
        if let Some(idle) = self.run.idle {
            println!(
                "idle connections:     {} held ({} open in nfcpayd): RSS {} -> {} KiB, {:.1} KiB each",
                idle.held,
                idle.open_in_daemon
                    .map_or_else(|| "-".to_owned(), |open| format!("{open:.0}")),
                idle.rss_before_kib,
                idle.rss_after_kib,
                idle.kib_per_connection()
            );
        }
        println!(
            "ledger check:         {} receipts, {} settlements in the ledger; exactly once: {}, postings balanced: {}",
            self.verdict.receipts,
            self.verdict.ledger_settlements,
            verdict_word(self.verdict.exactly_once),
            verdict_word(self.verdict.postings_balanced)
        );
    }
}

fn verdict_word(ok: bool) -> &'static str {
    if ok { "yes" } else { "NO" }
}
