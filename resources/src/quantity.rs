//! Kubernetes resource quantities ("250m", "1.5", "512Mi", "1e3") parsed into integers the
//! admission arithmetic can add up: CPU in millicores, everything else in whole units (bytes).

use thiserror::Error;

/// A quantity string that is not a Kubernetes quantity.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("invalid resource quantity {0:?}")]
pub struct QuantityError(pub String);

/// Parses a quantity into thousandths of its unit (so "250m" → 250, "2" → 2000, "1Ki" → 1_024_000).
/// Fractions below a thousandth round up, as Kubernetes rounds requests up.
pub fn parse_milli(q: &str) -> Result<i128, QuantityError> {
    let err = || QuantityError(q.to_string());
    let s = q.trim();
    if s.is_empty() {
        return Err(err());
    }
    let (sign, s) = match s.strip_prefix('-') {
        Some(rest) => (-1i128, rest),
        None => (1i128, s.strip_prefix('+').unwrap_or(s)),
    };
    let num_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(num_end);
    if num.is_empty() || num == "." {
        return Err(err());
    }
    let (int_part, frac_part) = num.split_once('.').unwrap_or((num, ""));
    if frac_part.contains('.') {
        return Err(err());
    }
    // Value as a fraction: digits / 10^frac_len.
    let digits: i128 = format!("{int_part}{frac_part}")
        .parse()
        .map_err(|_| err())?;
    let frac_len = u32::try_from(frac_part.len()).map_err(|_| err())?;
    // multiplier as numerator / denominator
    let (mul_num, mul_den): (i128, i128) = match suffix {
        "" => (1, 1),
        "n" => (1, 1_000_000_000),
        "u" => (1, 1_000_000),
        "m" => (1, 1_000),
        "k" => (1_000, 1),
        "M" => (1_000_000, 1),
        "G" => (1_000_000_000, 1),
        "T" => (1_000_000_000_000, 1),
        "P" => (1_000_000_000_000_000, 1),
        "E" => (1_000_000_000_000_000_000, 1),
        "Ki" => (1 << 10, 1),
        "Mi" => (1 << 20, 1),
        "Gi" => (1 << 30, 1),
        "Ti" => (1 << 40, 1),
        "Pi" => (1 << 50, 1),
        "Ei" => (1 << 60, 1),
        exp if exp.starts_with(['e', 'E']) => {
            let e: u32 = exp[1..].parse().map_err(|_| err())?;
            if e > 30 {
                return Err(err());
            }
            (10i128.pow(e), 1)
        }
        _ => return Err(err()),
    };
    let den = 10i128
        .checked_pow(frac_len)
        .and_then(|d| d.checked_mul(mul_den))
        .ok_or_else(err)?;
    let numer = digits
        .checked_mul(mul_num)
        .and_then(|n| n.checked_mul(1000))
        .ok_or_else(err)?;
    // Ceiling division for positive values.
    let value = (numer + den - 1) / den;
    Ok(sign * value)
}

/// Parses a CPU quantity into millicores.
pub fn cpu_millis(q: &str) -> Result<i128, QuantityError> {
    parse_milli(q)
}

/// Parses a memory/storage/count quantity into whole units, rounding up.
pub fn units(q: &str) -> Result<i128, QuantityError> {
    let m = parse_milli(q)?;
    Ok((m + 999).div_euclid(1000))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_quantities() {
        assert_eq!(cpu_millis("250m"), Ok(250));
        assert_eq!(cpu_millis("2"), Ok(2000));
        assert_eq!(cpu_millis("1.5"), Ok(1500));
        assert_eq!(cpu_millis("0.0001"), Ok(1), "rounds up like Kubernetes");
        assert_eq!(cpu_millis("100u"), Ok(1));
    }

    #[test]
    fn memory_quantities() {
        assert_eq!(units("512Mi"), Ok(512 * 1024 * 1024));
        assert_eq!(units("1G"), Ok(1_000_000_000));
        assert_eq!(units("8047412Ki"), Ok(8_047_412 * 1024));
        assert_eq!(units("1e3"), Ok(1000));
        assert_eq!(units("1.5Gi"), Ok(1_610_612_736));
        assert_eq!(units("110"), Ok(110));
    }

    #[test]
    fn garbage_is_rejected() {
        for bad in ["", "abc", "1.2.3", "12Q", "m", ".", "1e99", "--1"] {
            assert!(parse_milli(bad).is_err(), "{bad:?} must not parse");
        }
    }
}
