//! `nfcpay-admin accounts …`: create, fund and inspect ledger accounts.

use std::io::Write;

use clap::Subcommand;
use nfcpay_protocol::{AccountId, Amount, Currency};

use super::AdminError;
use crate::storage::Storage;

/// `accounts` subcommands.
#[derive(Debug, Subcommand)]
pub enum AccountsCommand {
    /// Create an account with a zero balance.
    Create {
        /// Account ID (1–32 of A–Z a–z 0–9 . _ -).
        #[arg(long)]
        id: AccountId,
        /// ISO 4217 currency, e.g. EUR.
        #[arg(long)]
        currency: Currency,
        /// Lowest balance allowed, in the currency's units (e.g. -100.00 for a credit line).
        #[arg(long, default_value = "0", allow_hyphen_values = true)]
        limit: String,
    },
    /// Credit an account from its currency's funding account (a balanced transfer).
    Fund {
        /// Account ID.
        #[arg(long)]
        id: AccountId,
        /// Amount in the account's currency, e.g. 100.00.
        #[arg(long)]
        amount: String,
    },
    /// Show an account's balance and postings.
    Show {
        /// Account ID.
        #[arg(long)]
        id: AccountId,
    },
}

/// Runs an `accounts` subcommand.
pub fn run(
    command: AccountsCommand,
    storage: &Storage,
    out: &mut dyn Write,
) -> Result<(), AdminError> {
    match command {
        AccountsCommand::Create {
            id,
            currency,
            limit,
        } => {
            let limit_minor = signed_minor_units(&limit, currency)?;
            storage.create_account(&id, currency, limit_minor)?;
            writeln!(out, "created account {id} ({currency}, limit {limit})")?;
        }
        AccountsCommand::Fund { id, amount } => {
            let currency = storage.account(&id)?.currency;
            let amount = Amount::parse_decimal(&amount, currency)
                .map_err(|error| AdminError::Input(format!("--amount: {error}")))?;
            let account = storage.fund(&id, amount)?;
            writeln!(
                out,
                "funded {id} with {amount}; balance {}",
                format_minor(account.balance_minor, currency)
            )?;
        }
        AccountsCommand::Show { id } => {
            let account = storage.account(&id)?;
            let currency = account.currency;
            writeln!(
                out,
                "account {id}: balance {} (limit {})",
                format_minor(account.balance_minor, currency),
                account
                    .limit_minor
                    .map_or("none".to_owned(), |limit| format_minor(limit, currency))
            )?;
            writeln!(
                out,
                "{:>10} {:>10} {:>16} {:>16}",
                "POSTING", "TRANSFER", "AMOUNT", "BALANCE"
            )?;
            for posting in storage.postings(&id)? {
                writeln!(
                    out,
                    "{:>10} {:>10} {:>16} {:>16}",
                    posting.id,
                    posting.transfer_id,
                    format_minor(posting.amount_minor, currency),
                    format_minor(posting.balance_after_minor, currency)
                )?;
            }
        }
    }
    Ok(())
}

/// Parses `-12.50` or `0` into signed minor units of `currency`.
fn signed_minor_units(text: &str, currency: Currency) -> Result<i64, AdminError> {
    let (negative, magnitude) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    // Zero is not an amount (amounts are positive) but is a fine limit.
    let is_zero = magnitude.bytes().any(|b| b == b'0')
        && magnitude.bytes().all(|b| b == b'0' || b == b'.')
        && magnitude.bytes().filter(|&b| b == b'.').count() <= 1;
    if is_zero {
        return Ok(0);
    }
    let amount = Amount::parse_decimal(magnitude, currency)
        .map_err(|error| AdminError::Input(format!("--limit: {error}")))?;
    let minor = i64::try_from(amount.minor_units())
        .map_err(|_| AdminError::Input("--limit: too large".into()))?;
    Ok(if negative { -minor } else { minor })
}

/// `-12.50 EUR` for −1250 minor units of EUR.
pub fn format_minor(minor: i64, currency: Currency) -> String {
    let exponent = u32::from(currency.exponent());
    let sign = if minor < 0 { "-" } else { "" };
    let magnitude = minor.unsigned_abs();
    if exponent == 0 {
        return format!("{sign}{magnitude} {currency}");
    }
    let scale = 10u64.pow(exponent);
    format!(
        "{sign}{}.{:0width$} {currency}",
        magnitude / scale,
        magnitude % scale,
        width = exponent as usize
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_and_formatting() {
        let eur: Currency = "EUR".parse().unwrap();
        assert_eq!(signed_minor_units("0", eur).unwrap(), 0);
        assert_eq!(signed_minor_units("0.00", eur).unwrap(), 0);
        assert_eq!(signed_minor_units("-100.50", eur).unwrap(), -10050);
        assert_eq!(signed_minor_units("25", eur).unwrap(), 2500);
        for bad in ["", "-", "abc", "1.234", "--1"] {
            assert!(signed_minor_units(bad, eur).is_err(), "{bad:?}");
        }
        assert_eq!(format_minor(-1250, eur), "-12.50 EUR");
        assert_eq!(format_minor(5, eur), "0.05 EUR");
        assert_eq!(format_minor(500, "JPY".parse().unwrap()), "500 JPY");
    }
}
