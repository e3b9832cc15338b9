//! Payments driven through a fault, for the fault tests (`tests/tests/faults.rs`).
//!
//! Pairs of terminals pay each other as the load generator's do, but each half is re-sent
//! with its **identical bytes** after a `503`, a lost connection or no answer, as a terminal
//! must (a re-sent half is idempotent: the platform answers the payment as it stands). Every
//! answer is tallied by kind and time, so a test can say what clients saw during the fault, how
//! long a `503` took, and when payments settled again; the payments that came back settled
//! go to [`crate::loadgen::check_ledger`] for the exactly-once check. [`Load`] runs [`PAIRS`]
//! pairs in the background and [`check_run`] checks what every fault test must hold, for the
//! database faults (`tests/tests/faults.rs`) and the HSM's (`tests/tests/hsm_faults.rs`) alike.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use nfcpay_protocol::messages::HalfKind;
use nfcpay_terminal_agent::platform::{HalfReply, PlatformError};

use crate::loadgen::{SettledPayment, check_ledger};
use crate::{PlatformFixture, TestTerminal};

/// Terminal pairs paying during a fault.
pub const PAIRS: usize = 3;
/// The currency of the fault tests' accounts.
pub const CURRENCY: &str = "EUR";
/// What each account starts with.
const ACCOUNT_FUNDS: &str = "1000.00";
/// What each payment moves.
const PAYMENT_AMOUNT: &str = "0.10";
/// Pause before a half is re-sent.
const RESEND_PAUSE: Duration = Duration::from_millis(100);
/// How long after the load's end a payment already under way may still be finished.
const FINISH_GRACE: Duration = Duration::from_secs(30);

/// One answer to a half, as the terminal saw it.
#[derive(Debug, Clone)]
pub struct Answer {
    /// `200`, `202`, `503 unavailable`, … or `connection` / `timeout` / `answer`.
    pub kind: String,
    /// When the request was sent.
    pub sent: Instant,
    /// How long the answer took.
    pub took: Duration,
}

/// Everything the pairs saw; shared by them.
#[derive(Debug, Default)]
pub struct Tally {
    /// Every answer to every half, in the order they came.
    pub answers: Vec<Answer>,
    /// Payments that came back settled, with when.
    pub settled: Vec<(Instant, SettledPayment)>,
    /// Payments given up (not settled within the grace after the load's end).
    pub failed: usize,
}

impl Tally {
    /// How many answers of each kind.
    pub fn counts(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for answer in &self.answers {
            *counts.entry(answer.kind.clone()).or_insert(0) += 1;
        }
        counts
    }

    /// The answers that were neither a success nor `503 unavailable` nor a lost connection:
    /// what a fault must never cause (`500 internal` above all).
    pub fn wrong_answers(&self) -> Vec<&Answer> {
        self.answers
            .iter()
            .filter(|answer| {
                !matches!(
                    answer.kind.as_str(),
                    "200" | "202" | "503 unavailable" | "connection" | "timeout"
                )
            })
            .collect()
    }

    /// The settled payments, for the ledger check.
    pub fn payments(&self) -> Vec<SettledPayment> {
        self.settled
            .iter()
            .map(|(_, payment)| payment.clone())
            .collect()
    }

    /// How long after `instant` the first settled answer came (the recovery time when
    /// `instant` is the end of a fault).
    pub fn first_settled_after(&self, instant: Instant) -> Option<Duration> {
        self.settled
            .iter()
            .map(|(at, _)| *at)
            .filter(|at| *at >= instant)
            .min()
            .map(|at| at - instant)
    }
}

/// Terminal pairs paying in the background until a deadline, and what they were answered.
pub struct Load {
    payers: Vec<tokio::task::JoinHandle<()>>,
    accounts: Vec<nfcpay_protocol::AccountId>,
    tally: Arc<Mutex<Tally>>,
}

impl Load {
    /// Enrolls [`PAIRS`] terminal pairs on `platform` and has them pay for `duration`.
    pub async fn start(platform: &PlatformFixture, duration: Duration) -> Result<Self> {
        let (pairs, accounts) = enroll_pairs(platform, PAIRS).await?;
        let tally = Arc::new(Mutex::new(Tally::default()));
        let payers = start_paying(pairs, Instant::now() + duration, &tally);
        Ok(Self {
            payers,
            accounts,
            tally,
        })
    }

    /// Waits for every payer to stop; returns what they were answered, and their accounts.
    pub async fn finish(self) -> Result<(Tally, Vec<nfcpay_protocol::AccountId>)> {
        for payer in self.payers {
            payer.await?;
        }
        let tally = std::mem::take(
            &mut *self
                .tally
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        );
        Ok((tally, self.accounts))
    }
}

/// Checks what every fault test must hold, and prints the figures: every payment that came
/// back settled is in the ledger exactly once and the postings balance
/// ([`check_ledger`]); no answer a fault must not cause ([`Tally::wrong_answers`]); no
/// payment given up. A failed check panics (the test fails); an error means the check could
/// not run. `accounts` are the load's ([`Load::finish`]).
pub fn check_run(
    name: &str,
    platform: &PlatformFixture,
    tally: &Tally,
    accounts: &[nfcpay_protocol::AccountId],
) -> Result<()> {
    let storage = platform.storage()?;
    let verdict = check_ledger(
        &storage,
        &tally.payments(),
        accounts,
        CURRENCY.parse()?,
        tally.failed,
    )?;
    println!(
        "{name}: {} payments settled, {} given up, answers {:?}; ledger: {} settlements, \
         exactly once {}, balanced {}",
        tally.settled.len(),
        tally.failed,
        tally.counts(),
        verdict.ledger_settlements,
        verdict.exactly_once,
        verdict.postings_balanced
    );
    assert!(verdict.is_ok(), "{name}: {:?}", verdict.problems);
    let wrong = tally.wrong_answers();
    assert!(
        wrong.is_empty(),
        "{name}: answers a fault must not cause: {wrong:?}"
    );
    assert_eq!(tally.failed, 0, "{name}: payments given up");
    Ok(())
}

/// Creates and funds `pairs` × 2 accounts and enrolls a terminal for each (`term-<n>`,
/// `acct-<n>`), terminal `n` at the fixture's daemon `n mod daemons` (so with two daemons
/// the halves of a payment go to different ones); returns the pairs and every account ID.
pub async fn enroll_pairs(
    platform: &PlatformFixture,
    pairs: usize,
) -> Result<(
    Vec<(TestTerminal, TestTerminal)>,
    Vec<nfcpay_protocol::AccountId>,
)> {
    let mut terminals = Vec::new();
    let mut accounts = Vec::new();
    let daemons = platform.all_endpoints();
    for index in 0..pairs * 2 {
        let account = format!("acct-{index}");
        platform.account(&account, CURRENCY, Some(ACCOUNT_FUNDS))?;
        let daemon = &daemons[index % daemons.len()];
        let mut terminal = platform
            .enroll_at(&format!("term-{index}"), &account, daemon)
            .await?;
        // The KSN state in memory: sealing does not fsync (the platform is under test).
        terminal.danger_keep_keys_in_memory()?;
        accounts.push(account.parse()?);
        terminals.push(terminal);
    }
    let mut pairs_out = Vec::new();
    let mut terminals = terminals.into_iter();
    while let (Some(first), Some(second)) = (terminals.next(), terminals.next()) {
        pairs_out.push((first, second));
    }
    Ok((pairs_out, accounts))
}

/// Starts every pair paying (alternating roles) until `until`; payments under way then are
/// finished (re-sent through the fault) for up to a grace period. Join the handles to wait.
pub fn start_paying(
    pairs: Vec<(TestTerminal, TestTerminal)>,
    until: Instant,
    tally: &Arc<Mutex<Tally>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    pairs
        .into_iter()
        .map(|(first, second)| tokio::spawn(pay_until(first, second, until, Arc::clone(tally))))
        .collect()
}

async fn pay_until(
    mut first: TestTerminal,
    mut second: TestTerminal,
    until: Instant,
    tally: Arc<Mutex<Tally>>,
) {
    let mut turn = false;
    while Instant::now() < until {
        let (payee, payer) = if turn {
            (&mut first, &mut second)
        } else {
            (&mut second, &mut first)
        };
        turn = !turn;
        let outcome = pay(payee, payer, until + FINISH_GRACE, &tally).await;
        let mut tally = tally
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match outcome {
            Ok(payment) => tally.settled.push((Instant::now(), payment)),
            Err(error) => {
                eprintln!("payment given up: {error:#}");
                tally.failed += 1;
            }
        }
    }
}

/// One payment: half A (re-sent until answered), then half B (likewise), which must settle.
async fn pay(
    payee: &mut TestTerminal,
    payer: &mut TestTerminal,
    give_up: Instant,
    tally: &Mutex<Tally>,
) -> Result<SettledPayment> {
    let request = payee.request(PAYMENT_AMOUNT, CURRENCY, "fault")?;
    let (_, half_a) = payee.seal(HalfKind::A, &request)?;
    let pending = submit_resending(payee, HalfKind::A, half_a, give_up, tally).await?;
    if pending.settled {
        bail!("half A alone settled");
    }
    let instruction = payer.instruction(&request)?;
    let (keys, half_b) = payer.seal(HalfKind::B, &instruction)?;
    let answer = submit_resending(payer, HalfKind::B, half_b, give_up, tally).await?;
    if !answer.settled {
        bail!("half B did not settle although half A was acknowledged");
    }
    SettledPayment::from_receipt(&payer.open_receipt(&keys, &answer.receipt)?)
}

/// Has `payee` and `payer` make `payments` payments one after the other (half A then half B,
/// each re-sent through a fault until `give_up`); returns how long each took, from its half A
/// sent to its half B settled. The first payment that is given up ends it with its error.
pub async fn pay_in_turn(
    payee: &mut TestTerminal,
    payer: &mut TestTerminal,
    payments: usize,
    give_up: Instant,
    tally: &Mutex<Tally>,
) -> Result<Vec<Duration>> {
    let mut took = Vec::with_capacity(payments);
    for _ in 0..payments {
        let started = Instant::now();
        let payment = pay(payee, payer, give_up, tally).await?;
        took.push(started.elapsed());
        tally
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .settled
            .push((Instant::now(), payment));
    }
    Ok(took)
}

/// Sends `envelope` until it is answered with a success, re-sending the identical bytes after
/// a `503`, a lost connection or no answer; any other refusal ends the payment.
async fn submit_resending(
    terminal: &TestTerminal,
    kind: HalfKind,
    envelope: Vec<u8>,
    give_up: Instant,
    tally: &Mutex<Tally>,
) -> Result<HalfReply> {
    loop {
        let sent = Instant::now();
        let result = terminal
            .submit(kind, envelope.clone(), Duration::ZERO)
            .await;
        let took = sent.elapsed();
        let (answer_kind, resend) = match &result {
            Ok(reply) if reply.settled => ("200".to_owned(), false),
            Ok(_) => ("202".to_owned(), false),
            Err(PlatformError::Refused(problem)) => (
                format!("{} {}", problem.status, problem.code),
                problem.status == 503,
            ),
            Err(PlatformError::Connection { .. }) => ("connection".to_owned(), true),
            Err(PlatformError::Timeout) => ("timeout".to_owned(), true),
            Err(_) => ("answer".to_owned(), false),
        };
        tally
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .answers
            .push(Answer {
                kind: answer_kind,
                sent,
                took,
            });
        match result {
            Ok(reply) => return Ok(reply),
            Err(error) if !resend || Instant::now() >= give_up => return Err(error.into()),
            Err(_) => tokio::time::sleep(RESEND_PAUSE).await,
        }
    }
}
