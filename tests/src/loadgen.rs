//! What `nfcpay-loadgen` measures and checks, apart from paying: CPU time of processes from
//! `/proc`, the daemon's HSM operation counter from its `/metrics`, idle terminals registered
//! in bulk, and the end-of-run ledger check (every settled receipt booked exactly once,
//! postings summing to zero).
//!
//! # Layout
//! - [`cpu_time_ms`]: user + system CPU of a process so far.
//! - [`hsm_operations`]: the sum of `nfcpay_hsm_operations_total` on one daemon.
//! - [`DaemonFigures`]: the ledger writer's batches and the terminal listener's request times,
//!   from the daemon's histograms.
//! - [`register_idle_terminals`]: N pending terminals inserted through [`Storage`].
//! - [`check_ledger`]: the exactly-once verdict over the receipts the run collected.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nfcpay_daemon::storage::ledger::{POSTINGS_LIST_MAX, funding_account_id};
use nfcpay_daemon::storage::{NewTerminal, Storage, TransactionStatus};
use nfcpay_protocol::messages::Receipt;
use nfcpay_protocol::{AccountId, Currency, InitialKeyId, TerminalId, TxnId};

use crate::http_get;

/// The daemon's counter of HSM operations (derivations, signatures, …), summed over labels,
/// under either name: nfcpayd's registry prefixes its metrics with `nfcpayd_`.
pub const HSM_OPERATIONS_METRICS: [&str; 2] = [
    "nfcpay_hsm_operations_total",
    "nfcpayd_hsm_operations_total",
];
/// The BDK ID in the initial key IDs of idle terminals: not the fixture's, so that their IDs
/// never collide with those `nfcpay-admin terminals add` draws for the active ones.
pub const IDLE_BDK_ID: &str = "FFFFFFFF";
/// Threads submitting idle terminals at once, so that the ledger's writer commits them in
/// groups instead of one durable commit each.
pub const REGISTER_THREADS: usize = 64;
/// Most idle terminals one run registers (the initial key IDs have 8 hex digits to spare;
/// this keeps a typo from filling a disk).
pub const REGISTERED_MAX: usize = 10_000_000;

/// User + system CPU time of process `pid` so far, in milliseconds (`/proc/<pid>/stat`,
/// fields 14 and 15, in clock ticks). For a process, it covers all its threads.
pub fn cpu_time_ms(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_cpu_ticks(&stat)
        .map(|ticks| ticks as f64 * 1000.0 / rustix::param::clock_ticks_per_second() as f64)
        .with_context(|| format!("{path}: no utime and stime"))
}

/// The loadgen's own CPU time so far, in milliseconds.
pub fn own_cpu_time_ms() -> Result<f64> {
    cpu_time_ms(std::process::id())
}

/// utime + stime, in clock ticks, from the text of a `/proc/<pid>/stat`. The command name
/// (field 2, in parentheses) may hold spaces and parentheses: fields are counted after its
/// last `)`.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let (_, after_name) = stat.rsplit_once(')')?;
    // After the name: field 3 (state) is at index 0, so utime (14) at 11, stime (15) at 12.
    let mut fields = after_name.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The resident set size of process `pid`, in KiB (`VmRSS` of `/proc/PID/status`).
pub fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .with_context(|| format!("no VmRSS in /proc/{pid}/status"))
}

/// The value of gauge or counter `name` (summed over its labels) on the daemon whose
/// operations listener is `ops_address`; `None` when it does not export it.
pub fn daemon_metric(ops_address: &str, name: &str) -> Result<Option<f64>> {
    Ok(sum_metric(&metrics_text(ops_address)?, name))
}

/// The `/metrics` text of the daemon whose operations listener is `ops_address`.
fn metrics_text(ops_address: &str) -> Result<String> {
    let (status, body) = http_get(ops_address, "/metrics")?;
    if status != 200 {
        bail!("GET http://{ops_address}/metrics answered {status}");
    }
    Ok(body)
}

/// The sum of [`HSM_OPERATIONS_METRICS`] over their labels on the daemon whose operations
/// listener is `ops_address`; `None` when the daemon exports neither.
pub fn hsm_operations(ops_address: &str) -> Result<Option<f64>> {
    let body = metrics_text(ops_address)?;
    Ok(HSM_OPERATIONS_METRICS
        .iter()
        .filter_map(|name| sum_metric(&body, name))
        .reduce(|total, sum| total + sum))
}

/// Running totals of a daemon's ledger writer and terminal listener, read from the `_sum` and
/// `_count` of its histograms: the difference of two readings describes the window between.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DaemonFigures {
    /// Batches of halves committed.
    pub batches: f64,
    /// Halves in those batches.
    pub halves: f64,
    /// SQL statements of those batches, `BEGIN` and `COMMIT` included.
    pub statements: f64,
    /// Seconds from `BEGIN` to durable `COMMIT`, summed over the batches.
    pub commit_seconds: f64,
    /// Requests answered on the terminal listener.
    pub requests: f64,
    /// Seconds from the end of each request's head to its answer, summed.
    pub request_seconds: f64,
}

impl DaemonFigures {
    /// The figures of the daemon whose operations listener is `ops_address`; zeros for what it
    /// does not export.
    pub fn read(ops_address: &str) -> Result<Self> {
        Ok(Self::parse(&metrics_text(ops_address)?))
    }

    fn parse(text: &str) -> Self {
        let value = |name: &str| sum_metric(text, &format!("nfcpayd_{name}")).unwrap_or(0.0);
        Self {
            batches: value("ledger_halves_per_batch_count"),
            halves: value("ledger_halves_per_batch_sum"),
            statements: value("ledger_statements_per_batch_sum"),
            commit_seconds: value("ledger_batch_commit_seconds_sum"),
            requests: value("http_request_duration_seconds_count"),
            request_seconds: value("http_request_duration_seconds_sum"),
        }
    }

    /// What happened between `before` and this reading.
    pub fn since(self, before: Self) -> Self {
        Self {
            batches: self.batches - before.batches,
            halves: self.halves - before.halves,
            statements: self.statements - before.statements,
            commit_seconds: self.commit_seconds - before.commit_seconds,
            requests: self.requests - before.requests,
            request_seconds: self.request_seconds - before.request_seconds,
        }
    }

    /// The figures of several daemons together.
    pub fn plus(self, other: Self) -> Self {
        Self {
            batches: self.batches + other.batches,
            halves: self.halves + other.halves,
            statements: self.statements + other.statements,
            commit_seconds: self.commit_seconds + other.commit_seconds,
            requests: self.requests + other.requests,
            request_seconds: self.request_seconds + other.request_seconds,
        }
    }

    /// Mean halves per batch; `None` without a batch.
    pub fn halves_per_batch(&self) -> Option<f64> {
        (self.batches > 0.0).then(|| self.halves / self.batches)
    }

    /// Mean statements per batch; `None` without a batch.
    pub fn statements_per_batch(&self) -> Option<f64> {
        (self.batches > 0.0).then(|| self.statements / self.batches)
    }

    /// Mean milliseconds from `BEGIN` to durable `COMMIT`; `None` without a batch.
    pub fn batch_ms(&self) -> Option<f64> {
        (self.batches > 0.0).then(|| 1000.0 * self.commit_seconds / self.batches)
    }

    /// Mean milliseconds a request spent in the daemon; `None` without a request.
    pub fn request_ms(&self) -> Option<f64> {
        (self.requests > 0.0).then(|| 1000.0 * self.request_seconds / self.requests)
    }
}

/// The sum of every sample of counter `name` in Prometheus/OpenMetrics text, or `None` when
/// there is none.
fn sum_metric(text: &str, name: &str) -> Option<f64> {
    let mut sum = None;
    for line in text.lines().filter(|line| !line.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        // `name{labels} value [timestamp] [# exemplar]` or `name value …`; not `name_created`.
        let value_part = match rest.chars().next() {
            Some('{') => rest.split_once('}').map(|(_, after)| after),
            Some(' ') => Some(rest),
            _ => None,
        };
        let value = value_part
            .and_then(|after| after.split_whitespace().next())
            .and_then(|value| value.parse::<f64>().ok());
        if let Some(value) = value {
            *sum.get_or_insert(0.0) += value;
        }
    }
    sum
}

/// Registers `count` idle terminals (`idle-00000000`, …, pending enrollment, for
/// `account`) directly through `storage`, from [`REGISTER_THREADS`] threads so that the
/// writer commits them in groups; returns how long it took.
pub fn register_idle_terminals(
    storage: &Storage,
    account: &AccountId,
    count: usize,
) -> Result<Duration> {
    if count > REGISTERED_MAX {
        bail!("at most {REGISTERED_MAX} idle terminals");
    }
    let started = Instant::now();
    let expires_at_ms = i64::try_from(nfcpay_daemon::service::now_ms())? + 3_600_000;
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..REGISTER_THREADS)
            .map(|worker| {
                scope.spawn(move || -> Result<()> {
                    for index in (worker..count).step_by(REGISTER_THREADS) {
                        let id: TerminalId = format!("idle-{index:08}").parse()?;
                        let initial_key_id: InitialKeyId =
                            format!("{IDLE_BDK_ID}{index:08X}").parse()?;
                        let mut code_sha256 = [0u8; 32];
                        getrandom::fill(&mut code_sha256)?;
                        storage
                            .add_terminal(NewTerminal {
                                id,
                                account_id: account.clone(),
                                initial_key_id,
                                code_sha256,
                                code_expires_at_ms: expires_at_ms,
                            })
                            .with_context(|| format!("registering idle terminal {index}"))?;
                    }
                    Ok(())
                })
            })
            .collect();
        workers.into_iter().try_for_each(|worker| {
            worker
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("a registering thread panicked")))
        })
    })?;
    Ok(started.elapsed())
}

/// Registers `count` idle terminals like [`register_idle_terminals`] but in one
/// `INSERT … SELECT … generate_series` through `psql`, on the PostgreSQL at `database_url`
/// (the URL the daemons use, its schema included); returns how long it took.
///
/// For PostgreSQL, where [`Storage::add_terminal`] commits one terminal at a time behind the
/// ledger's single writer (on the 2-core machine: 20,000 in 16 s, 100,000 in 168 s). This
/// writes the `terminals` table as the ledger's migration defines it, without one audit
/// record per terminal: the rows are there to make lookups run at a realistic table size.
pub fn register_idle_terminals_postgres(
    database_url: &str,
    account: &AccountId,
    count: usize,
) -> Result<Duration> {
    if count > REGISTERED_MAX {
        bail!("at most {REGISTERED_MAX} idle terminals");
    }
    let started = Instant::now();
    let now_ms = i64::try_from(nfcpay_daemon::service::now_ms())?;
    let sql = "INSERT INTO terminals (id, account_id, initial_key_id, state, \
               enrollment_code_sha256, code_expires_at_ms, highest_counter, created_at_ms) \
               SELECT 'idle-' || lpad(n::text, 8, '0'), :'account', \
               :'bdk' || lpad(upper(to_hex(n)), 8, '0'), 'pending', \
               sha256(convert_to(gen_random_uuid()::text, 'UTF8')), :expires, 0, :now \
               FROM generate_series(0, :last) AS n";
    let output = std::process::Command::new("psql")
        .arg(database_url)
        .args(["--no-psqlrc", "--quiet", "--set=ON_ERROR_STOP=1"])
        .arg(format!("--set=account={account}"))
        .arg(format!("--set=bdk={IDLE_BDK_ID}"))
        .arg(format!("--set=expires={}", now_ms + 3_600_000))
        .arg(format!("--set=now={now_ms}"))
        .arg(format!("--set=last={}", count.saturating_sub(1)))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write as _;
            // Variables are interpolated only in statements read from a file or stdin.
            if let Some(mut stdin) = child.stdin.take() {
                stdin.write_all(sql.as_bytes())?;
                stdin.write_all(b";\n")?;
            }
            child.wait_with_output()
        })
        .context("psql")?;
    if !output.status.success() {
        bail!(
            "registering idle terminals: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(started.elapsed())
}

/// A payment the run saw settle: from the payer's opened receipt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettledPayment {
    /// The payment.
    pub txn_id: TxnId,
    /// The settlement's sequence number in the ledger.
    pub settlement_id: u64,
    /// The account debited.
    pub payer_account: AccountId,
    /// The account credited.
    pub payee_account: AccountId,
    /// The amount in minor units.
    pub amount_minor: i64,
}

impl SettledPayment {
    /// The settled payment a receipt tells of; fails when the receipt is not a settled one.
    pub fn from_receipt(receipt: &Receipt) -> Result<Self> {
        let fields = receipt.fields();
        if fields.settlement_id == 0 {
            bail!("the receipt is not settled");
        }
        Ok(Self {
            txn_id: fields.txn_id,
            settlement_id: fields.settlement_id,
            payer_account: fields
                .payer_account_id
                .clone()
                .context("a settled receipt without a payer account")?,
            payee_account: fields
                .payee_account_id
                .clone()
                .context("a settled receipt without a payee account")?,
            amount_minor: i64::try_from(fields.amount.minor_units())?,
        })
    }
}

/// What [`check_ledger`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerVerdict {
    /// Receipts checked.
    pub receipts: usize,
    /// Settlement transfers in the ledger (postings not touching the funding account).
    pub ledger_settlements: usize,
    /// Every receipt's payment is settled in the ledger with its settlement ID, booked by
    /// exactly one transfer of two postings (−amount payer, +amount payee); no two receipts
    /// share a settlement; and the ledger holds no settlement without a receipt beyond the
    /// run's failed payments (whose half B may have settled after the loadgen gave up).
    pub exactly_once: bool,
    /// The postings of each currency sum to zero, and every account's balance is the sum of
    /// its postings.
    pub postings_balanced: bool,
    /// What is wrong, at most [`PROBLEMS_LISTED_MAX`] lines.
    pub problems: Vec<String>,
}

/// How many problems a [`LedgerVerdict`] lists.
pub const PROBLEMS_LISTED_MAX: usize = 20;

impl LedgerVerdict {
    /// Both checks passed.
    pub fn is_ok(&self) -> bool {
        self.exactly_once && self.postings_balanced
    }
}

/// Checks the ledger behind `storage` against the `payments` the run saw settle. `accounts`
/// must be every account of the ledger except the funding accounts of `currency` (which the
/// check adds); `failed` is how many payments the run counted as failed.
pub fn check_ledger(
    storage: &Storage,
    payments: &[SettledPayment],
    accounts: &[AccountId],
    currency: Currency,
    failed: usize,
) -> Result<LedgerVerdict> {
    let mut problems = Vec::new();
    let mut exactly_once = true;
    let mut postings_balanced = true;
    let mut problem = |flag: &mut bool, text: String| {
        *flag = false;
        if problems.len() < PROBLEMS_LISTED_MAX {
            problems.push(text);
        }
    };

    // Every posting of the ledger, by transfer, and the sum per account.
    let funding = funding_account_id(currency);
    let mut transfers: HashMap<i64, Vec<(AccountId, i64)>> = HashMap::new();
    let mut funding_transfers = HashSet::new();
    let mut total_minor = 0i64;
    for account in accounts.iter().chain(std::iter::once(&funding)) {
        let view = storage.account(account)?;
        let postings = storage.postings(account)?;
        if postings.len() as i64 >= POSTINGS_LIST_MAX {
            problem(
                &mut postings_balanced,
                format!("{account}: {POSTINGS_LIST_MAX}+ postings, cannot list them all"),
            );
        }
        let sum: i64 = postings.iter().map(|posting| posting.amount_minor).sum();
        if sum != view.balance_minor {
            problem(
                &mut postings_balanced,
                format!(
                    "{account}: balance {} but its postings sum to {sum}",
                    view.balance_minor
                ),
            );
        }
        total_minor += sum;
        for posting in postings {
            if *account == funding {
                funding_transfers.insert(posting.transfer_id);
            }
            transfers
                .entry(posting.transfer_id)
                .or_default()
                .push((posting.account_id, posting.amount_minor));
        }
    }
    if total_minor != 0 {
        problem(
            &mut postings_balanced,
            format!("the postings in {} sum to {total_minor}", currency.code()),
        );
    }
    transfers.retain(|transfer, _| !funding_transfers.contains(transfer));

    // Every receipt booked once, by its own transfer.
    let mut settlements_seen = HashSet::new();
    for payment in payments {
        let txn = payment.txn_id.to_string();
        if !settlements_seen.insert(payment.settlement_id) {
            problem(
                &mut exactly_once,
                format!(
                    "{txn}: settlement {} is in another receipt too",
                    payment.settlement_id
                ),
            );
        }
        match storage.transaction(&payment.txn_id)? {
            None => problem(&mut exactly_once, format!("{txn}: not in the ledger")),
            Some(view) if view.status != TransactionStatus::Settled => problem(
                &mut exactly_once,
                format!("{txn}: {} in the ledger", view.status),
            ),
            Some(view) if view.settlement_id != Some(payment.settlement_id) => problem(
                &mut exactly_once,
                format!(
                    "{txn}: settlement {:?} in the ledger, {} in the receipt",
                    view.settlement_id, payment.settlement_id
                ),
            ),
            Some(_) => {}
        }
        let expected = BTreeMap::from([
            (payment.payer_account.clone(), -payment.amount_minor),
            (payment.payee_account.clone(), payment.amount_minor),
        ]);
        let booked: Option<BTreeMap<AccountId, i64>> = i64::try_from(payment.settlement_id)
            .ok()
            .and_then(|id| transfers.get(&id))
            .filter(|postings| postings.len() == 2)
            .map(|postings| postings.iter().cloned().collect());
        if booked.as_ref() != Some(&expected) {
            problem(
                &mut exactly_once,
                format!(
                    "{txn}: transfer {} is not one debit of the payer and one credit of the payee",
                    payment.settlement_id
                ),
            );
        }
    }
    let ledger_settlements = transfers.len();
    let unacknowledged = ledger_settlements.saturating_sub(payments.len());
    if ledger_settlements < payments.len() || unacknowledged > failed {
        problem(
            &mut exactly_once,
            format!(
                "{ledger_settlements} settlements in the ledger for {} receipts and {failed} failed payments",
                payments.len()
            ),
        );
    }
    Ok(LedgerVerdict {
        receipts: payments.len(),
        ledger_settlements,
        exactly_once,
        postings_balanced,
        problems,
    })
}

/// The value at quantile `q` (0..=1) of `sorted` (nearest rank), or `None` when empty.
pub fn quantile(sorted: &[u64], q: f64) -> Option<u64> {
    assert!((0.0..=1.0).contains(&q), "a quantile is between 0 and 1");
    let last = sorted.len().checked_sub(1)?;
    let index = (last as f64 * q).round() as usize;
    sorted.get(index.min(last)).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_fields_14_and_15_even_with_a_strange_name() {
        let stat = "4242 (nfc pay) d) S 1 4242 4242 0 -1 4194560 1000 0 0 0 \
                    170 30 0 0 20 0 73 0 100 1000000 500 18446744073709551615";
        assert_eq!(parse_cpu_ticks(stat), Some(200));
        assert_eq!(parse_cpu_ticks("4242 (x) S 1"), None);
    }

    #[test]
    fn own_cpu_time_is_readable() {
        assert!(own_cpu_time_ms().is_ok_and(|ms| ms >= 0.0));
    }

    #[test]
    fn metric_sum_over_labels_ignores_other_metrics() {
        let text = "# TYPE nfcpay_hsm_operations counter\n\
                    nfcpay_hsm_operations_total{operation=\"derive\"} 600\n\
                    nfcpay_hsm_operations_total{operation=\"sign\"} 200 # {trace_id=\"x\"} 1\n\
                    nfcpay_hsm_operations_created{operation=\"sign\"} 1.7e9\n\
                    nfcpay_hsm_operations_total_other 5\n\
                    # EOF\n";
        let name = "nfcpay_hsm_operations_total";
        assert_eq!(sum_metric(text, name), Some(800.0));
        assert_eq!(
            sum_metric("nfcpay_hsm_operations_total 3\n", name),
            Some(3.0)
        );
        assert_eq!(sum_metric("other_total 3\n", name), None);
    }

    #[test]
    fn daemon_figures_come_from_histogram_sums_and_counts() {
        let reading = |batches: u32, halves: u32| {
            format!(
                "# TYPE nfcpayd_ledger_halves_per_batch histogram\n\
                 nfcpayd_ledger_halves_per_batch_sum {halves}.0\n\
                 nfcpayd_ledger_halves_per_batch_count {batches}\n\
                 nfcpayd_ledger_halves_per_batch_bucket{{le=\"64.0\"}} {batches}\n\
                 nfcpayd_ledger_statements_per_batch_sum {}\n\
                 nfcpayd_ledger_batch_commit_seconds_sum {}\n\
                 nfcpayd_http_request_duration_seconds_sum{{route=\"/v1/halves/a\"}} 0.5\n\
                 nfcpayd_http_request_duration_seconds_sum{{route=\"/v1/halves/b\"}} 0.25\n\
                 nfcpayd_http_request_duration_seconds_count{{route=\"/v1/halves/a\"}} {halves}\n\
                 # EOF\n",
                9 * batches,
                f64::from(batches) * 0.004,
            )
        };
        let before = DaemonFigures::parse(&reading(2, 100));
        let after = DaemonFigures::parse(&reading(12, 700));
        let window = after.since(before);
        assert_eq!(window.batches, 10.0);
        assert_eq!(window.halves_per_batch(), Some(60.0));
        assert_eq!(window.statements_per_batch(), Some(9.0));
        assert!((window.batch_ms().unwrap() - 4.0).abs() < 1e-9);
        assert_eq!(after.requests, 700.0);
        assert!((after.request_ms().unwrap() - 750.0 / 700.0).abs() < 1e-9);
        assert_eq!(window.plus(window).batches, 20.0);
        let nothing = DaemonFigures::parse("# EOF\n");
        assert_eq!(nothing, DaemonFigures::default());
        assert_eq!(nothing.halves_per_batch(), None);
        assert_eq!(nothing.request_ms(), None);
    }

    #[test]
    fn quantiles_by_nearest_rank() {
        let sorted: Vec<u64> = (1..=100).collect();
        assert_eq!(quantile(&sorted, 0.5), Some(51));
        assert_eq!(quantile(&sorted, 0.99), Some(99));
        assert_eq!(quantile(&sorted, 1.0), Some(100));
        assert_eq!(quantile(&[], 0.5), None);
    }
}
