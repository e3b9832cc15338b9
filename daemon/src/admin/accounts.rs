//! `nfcpay-admin accounts …`: create, fund, list and inspect ledger accounts.
//!
//! Amounts on the command line are in the currency's major units (`12.50` EUR); the wire and
//! the JSON output's `*_minor` fields use minor units (`1250`).

use std::io::Write;

use clap::Subcommand;
use nfcpay_protocol::{AccountId, Amount, Currency};
use serde_json::{Value, json};

use super::{AdminError, decimal_minor};
use crate::storage::{AccountView, PostingView, Storage};

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
        /// Lowest balance allowed, in MAJOR units of the currency (e.g. -100.00 EUR for a
        /// credit line of 10000 minor units); 0 or negative.
        #[arg(long, default_value = "0", allow_hyphen_values = true)]
        limit: String,
    },
    /// Credit an account from its currency's funding account (a balanced transfer).
    Fund {
        /// Account ID.
        #[arg(long)]
        id: AccountId,
        /// Amount in MAJOR units of the account's currency, e.g. 100.00 (EUR: 10000 minor
        /// units, as the wire carries it).
        #[arg(long)]
        amount: String,
    },
    /// List every account (the ledger's `__funding-*` accounts too) with its balance.
    List,
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
) -> Result<Value, AdminError> {
    match command {
        AccountsCommand::Create {
            id,
            currency,
            limit,
        } => {
            let limit_minor = signed_minor_units(&limit, currency)?;
            storage.create_account(&id, currency, limit_minor)?;
            writeln!(out, "created account {id} ({currency}, limit {limit})")?;
            Ok(json!({ "account": account_json(&storage.account(&id)?) }))
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
            Ok(json!({
                "funded_minor": amount.minor_units(),
                "account": account_json(&account),
            }))
        }
        AccountsCommand::List => {
            let accounts = storage.accounts_list()?;
            writeln!(
                out,
                "{:<34} {:<8} {:>20} {:>20}",
                "ACCOUNT", "CURRENCY", "BALANCE", "LIMIT"
            )?;
            for account in &accounts {
                writeln!(
                    out,
                    "{:<34} {:<8} {:>20} {:>20}",
                    account.id.as_str(),
                    account.currency.code(),
                    decimal_minor(account.balance_minor, account.currency),
                    account.limit_minor.map_or("none".to_owned(), |limit| {
                        decimal_minor(limit, account.currency)
                    })
                )?;
            }
            Ok(json!({ "accounts": accounts.iter().map(account_json).collect::<Vec<_>>() }))
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
            let postings = storage.postings(&id)?;
            for posting in &postings {
                writeln!(
                    out,
                    "{:>10} {:>10} {:>16} {:>16}",
                    posting.id,
                    posting.transfer_id,
                    format_minor(posting.amount_minor, currency),
                    format_minor(posting.balance_after_minor, currency)
                )?;
            }
            Ok(json!({
                "account": account_json(&account),
                "postings": postings
                    .iter()
                    .map(|posting| posting_json(posting, currency))
                    .collect::<Vec<_>>(),
            }))
        }
    }
}

/// An account in JSON (docs/admin-cli.md).
pub fn account_json(account: &AccountView) -> Value {
    json!({
        "id": account.id.as_str(),
        "currency": account.currency.code(),
        "balance_minor": account.balance_minor,
        "balance": decimal_minor(account.balance_minor, account.currency),
        "limit_minor": account.limit_minor,
        "created_at_ms": account.created_at_ms,
    })
}

/// A posting in JSON (docs/admin-cli.md).
pub fn posting_json(posting: &PostingView, currency: Currency) -> Value {
    json!({
        "id": posting.id,
        "transfer_id": posting.transfer_id,
        "account": posting.account_id.as_str(),
        "amount_minor": posting.amount_minor,
        "amount": decimal_minor(posting.amount_minor, currency),
        "balance_after_minor": posting.balance_after_minor,
        "created_at_ms": posting.created_at_ms,
    })
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
    format!("{} {currency}", decimal_minor(minor, currency))
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
