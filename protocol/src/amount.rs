//! Money: an amount in integer minor units of an ISO 4217 currency.
//!
//! There is no floating point anywhere: `12.50 EUR` is 1250 minor units of `EUR`, parsed from
//! text digit by digit with the currency's own exponent.

use std::fmt;
use std::str::FromStr;

use crate::error::ProtocolError;

/// Largest amount in minor units the protocol carries: fits an `i64` ledger column with room
/// for sums.
pub const AMOUNT_MINOR_UNITS_MAX: u64 = 1 << 53;

/// An active ISO 4217 currency with a defined number of minor units (so not `XAU`, `XXX`…).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Currency {
    code: [u8; 3],
    exponent: u8,
}

impl Currency {
    /// The three-letter code, e.g. `EUR`.
    pub fn code(&self) -> &str {
        // Built only from an ISO 4217 code, which is three ASCII capitals.
        std::str::from_utf8(&self.code).unwrap_or("???")
    }

    /// The code's three bytes, as carried on the wire.
    pub fn code_bytes(&self) -> [u8; 3] {
        self.code
    }

    /// Number of decimal digits of the minor unit (2 for EUR, 0 for JPY, 3 for BHD).
    pub fn exponent(&self) -> u8 {
        self.exponent
    }
}

impl FromStr for Currency {
    type Err = ProtocolError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let unknown = ProtocolError::Invalid {
            field: "currency",
            reason: "not an ISO 4217 currency code with minor units",
        };
        let currency = iso_currency::Currency::from_code(s).ok_or(unknown.clone())?;
        let exponent = currency
            .exponent()
            .and_then(|e| u8::try_from(e).ok())
            .ok_or(unknown.clone())?;
        let code: [u8; 3] = s.as_bytes().try_into().map_err(|_| unknown)?;
        Ok(Self { code, exponent })
    }
}

impl TryFrom<[u8; 3]> for Currency {
    type Error = ProtocolError;
    fn try_from(code: [u8; 3]) -> Result<Self, Self::Error> {
        let text = std::str::from_utf8(&code).map_err(|_| ProtocolError::Invalid {
            field: "currency",
            reason: "not ASCII",
        })?;
        text.parse()
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

impl fmt::Debug for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Currency({})", self.code())
    }
}

/// A positive amount of money: minor units of a currency.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Amount {
    minor_units: u64,
    currency: Currency,
}

impl Amount {
    /// An amount of `minor_units` (1 to [`AMOUNT_MINOR_UNITS_MAX`]) of `currency`.
    pub fn new(minor_units: u64, currency: Currency) -> Result<Self, ProtocolError> {
        if minor_units == 0 || minor_units > AMOUNT_MINOR_UNITS_MAX {
            return Err(ProtocolError::Invalid {
                field: "amount",
                reason: "must be between 1 and 2^53 minor units",
            });
        }
        Ok(Self {
            minor_units,
            currency,
        })
    }

    /// Parses a decimal like `12.50` in `currency` (at most its exponent's digits after the
    /// point).
    pub fn parse_decimal(text: &str, currency: Currency) -> Result<Self, ProtocolError> {
        let invalid = |reason| ProtocolError::Invalid {
            field: "amount",
            reason,
        };
        let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
        let exponent = usize::from(currency.exponent());
        if whole.is_empty() || (text.contains('.') && fraction.is_empty()) {
            return Err(invalid("expected digits, e.g. 12.50"));
        }
        if fraction.len() > exponent {
            return Err(invalid("more decimal places than the currency has"));
        }
        if !whole
            .bytes()
            .chain(fraction.bytes())
            .all(|b| b.is_ascii_digit())
        {
            return Err(invalid("expected digits, e.g. 12.50"));
        }
        let digits = format!("{whole}{fraction:0<exponent$}");
        if digits.len() > 20 {
            return Err(invalid("must be between 1 and 2^53 minor units"));
        }
        let minor_units = digits
            .parse::<u64>()
            .map_err(|_| invalid("must be between 1 and 2^53 minor units"))?;
        Self::new(minor_units, currency)
    }

    /// The amount in minor units.
    pub fn minor_units(&self) -> u64 {
        self.minor_units
    }

    /// The currency.
    pub fn currency(&self) -> Currency {
        self.currency
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let exponent = u32::from(self.currency.exponent());
        if exponent == 0 {
            return write!(f, "{} {}", self.minor_units, self.currency);
        }
        let scale = 10u64.pow(exponent);
        write!(
            f,
            "{}.{:0width$} {}",
            self.minor_units / scale,
            self.minor_units % scale,
            self.currency,
            width = exponent as usize
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eur() -> Currency {
        "EUR".parse().unwrap()
    }

    #[test]
    fn parses_and_displays_decimal_amounts() {
        let amount = Amount::parse_decimal("12.50", eur()).unwrap();
        assert_eq!(amount.minor_units(), 1250);
        assert_eq!(amount.to_string(), "12.50 EUR");
        assert_eq!(
            Amount::parse_decimal("12.5", eur()).unwrap().minor_units(),
            1250
        );
        assert_eq!(
            Amount::parse_decimal("7", eur()).unwrap().to_string(),
            "7.00 EUR"
        );
        let yen: Currency = "JPY".parse().unwrap();
        assert_eq!(
            Amount::parse_decimal("500", yen).unwrap().to_string(),
            "500 JPY"
        );
        let dinar: Currency = "BHD".parse().unwrap();
        assert_eq!(
            Amount::parse_decimal("1.005", dinar).unwrap().minor_units(),
            1005
        );
    }

    #[test]
    fn refuses_malformed_amounts() {
        for bad in [
            "", ".", "1.", ".5", "1.234", "-1", "1,00", "1e3", "0", "0.00", "+1",
        ] {
            assert!(
                Amount::parse_decimal(bad, eur()).is_err(),
                "{bad:?} was accepted"
            );
        }
        assert!(Amount::parse_decimal("500.5", "JPY".parse().unwrap()).is_err());
        assert!(Amount::parse_decimal("99999999999999999999999", eur()).is_err());
        assert!(Amount::new(AMOUNT_MINOR_UNITS_MAX + 1, eur()).is_err());
    }

    #[test]
    fn refuses_unknown_currencies() {
        for bad in ["EU", "EURO", "eur", "ZZZ", "XAU", ""] {
            assert!(bad.parse::<Currency>().is_err(), "{bad:?} was accepted");
        }
        assert!(Currency::try_from([0xFF, b'U', b'R']).is_err());
        assert_eq!(Currency::try_from(*b"USD").unwrap().exponent(), 2);
    }
}
