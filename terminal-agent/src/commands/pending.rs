//! `nfcpay-agent pending`: the halves kept in `DIR/pending/` that have no final answer yet
//! (a fault, or the agent killed, before one came): listed, and with `--resend` sent again —
//! the identical bytes, with bounded backoff ([`crate::delivery`]) — each outcome printed.
//!
//! A half that gets a receipt or a definitive refusal is forgotten; one that still gets no
//! answer stays for the next run. A file that is not a half of this terminal is reported and
//! never sent. The halves' MAC keys are gone from the terminal (DUKPT keeps only future keys),
//! so a receipt is checked by the platform's signature and its recipient (this terminal, the
//! half's KSN).

use std::io::Write;
use std::path::Path;

use super::shared::{
    AgentError, PlatformWait, TerminalPlace, agent_command, half_name, line, now_ms, print_receipt,
    status_name,
};
use crate::delivery::{self, Transience};
use crate::enroll::Terminal;
use crate::halves::verify_receipt_addressed;
use crate::pending::{PendingDir, PendingHalf};

/// What one re-sent half came to.
enum Outcome {
    /// A verified receipt: forgotten.
    Answered,
    /// A definitive refusal: forgotten.
    Refused,
    /// No final answer: kept.
    Kept,
}

/// Lists the kept halves; with `resend`, sends each again and prints what came of it. Fails
/// when a file cannot be sent, or (with `resend`) a half was refused or is still kept.
pub async fn run(
    place: &TerminalPlace,
    resend: bool,
    wait: PlatformWait,
    out: &mut dyn Write,
) -> Result<(), AgentError> {
    // Opening the terminal takes its lock: no payment of this terminal runs meanwhile.
    let terminal = place.open_terminal()?;
    let pending = PendingDir::of(&place.dir);
    let entries = pending.list(&terminal.terminal_id)?;
    if entries.is_empty() {
        line(
            out,
            format_args!("no pending halves in {}", pending.path().display()),
        )?;
        return Ok(());
    }
    let now = now_ms();
    let mut unusable = 0;
    let mut halves = Vec::new();
    for entry in entries {
        match entry {
            Ok(half) => {
                line(
                    out,
                    format_args!(
                        "pending: transaction {}  half {}  KSN {} (counter {})  sealed {} s \
                         ago  {} bytes  {}",
                        half.txn_id,
                        half_name(half.kind),
                        half.ksn,
                        half.ksn.counter().get(),
                        now.saturating_sub(half.sealed_at_ms) / 1000,
                        half.bytes().len(),
                        half.path.display()
                    ),
                )?;
                halves.push(half);
            }
            Err(error) => {
                unusable += 1;
                line(out, format_args!("unusable: {error}"))?;
            }
        }
    }
    let mut left = 0;
    let mut refused = 0;
    if resend {
        for half in &halves {
            match resend_one(&terminal, &place.dir, &pending, half, wait, out).await? {
                Outcome::Answered => {}
                Outcome::Refused => refused += 1,
                Outcome::Kept => left += 1,
            }
        }
    } else if !halves.is_empty() {
        line(
            out,
            format_args!(
                "send them again (the same bytes) with `{}`",
                agent_command(&place.dir, &["pending", "--resend"])
            ),
        )?;
    }
    if unusable == 0 && refused == 0 && left == 0 {
        return Ok(());
    }
    let mut problems = Vec::new();
    if unusable > 0 {
        problems.push(format!(
            "{unusable} file(s) in {} are not halves of this terminal and were not sent; \
             move them away",
            pending.path().display()
        ));
    }
    if refused > 0 {
        problems.push(format!("{refused} half (halves) refused by the platform"));
    }
    if left > 0 {
        problems.push(format!(
            "{left} half (halves) still without an answer, kept for the next `pending --resend`"
        ));
    }
    Err(AgentError::PendingLeft(problems.join("; ")))
}

async fn resend_one(
    terminal: &Terminal,
    dir: &Path,
    pending: &PendingDir,
    half: &PendingHalf,
    wait: PlatformWait,
    out: &mut dyn Write,
) -> Result<Outcome, AgentError> {
    line(
        out,
        format_args!(
            "re-sending half {} of transaction {} under KSN {} ({} bytes, byte-identical)",
            half_name(half.kind),
            half.txn_id,
            half.ksn,
            half.bytes().len()
        ),
    )?;
    let delivered = delivery::deliver(
        &terminal.platform,
        half.kind,
        half.bytes(),
        wait.half,
        wait.attempts,
        &mut delivery::log_retry,
    )
    .await;
    let reply = match delivered {
        Ok(reply) => reply,
        Err(undelivered) if undelivered.transience == Transience::Final => {
            line(
                out,
                format_args!(
                    "  refused, final: {}",
                    nfcpay_protocol::ErrorChain(&undelivered)
                ),
            )?;
            pending.forget(&half.path)?;
            line(
                out,
                format_args!(
                    "  forgotten; the payment as it stands: `{}`",
                    agent_command(dir, &["status", "--txn", &half.txn_id.to_string()])
                ),
            )?;
            return Ok(Outcome::Refused);
        }
        Err(undelivered) => {
            line(
                out,
                format_args!(
                    "  not delivered: {}; kept in {}",
                    nfcpay_protocol::ErrorChain(&undelivered),
                    half.path.display()
                ),
            )?;
            return Ok(Outcome::Kept);
        }
    };
    let receipt = match verify_receipt_addressed(
        &reply.receipt,
        &terminal.terminal_id,
        Some(half.ksn),
        &terminal.receipt_public_key,
    ) {
        Ok(receipt) => receipt,
        Err(error) => {
            line(
                out,
                format_args!(
                    "  the answer does not verify ({error}); kept in {}",
                    half.path.display()
                ),
            )?;
            return Ok(Outcome::Kept);
        }
    };
    print_receipt(
        &receipt,
        "verified: the platform's signature, addressed to this half",
        out,
    )?;
    pending.forget(&half.path)?;
    line(
        out,
        format_args!(
            "  answered ({}); forgotten",
            status_name(receipt.fields().status)
        ),
    )?;
    Ok(Outcome::Answered)
}
