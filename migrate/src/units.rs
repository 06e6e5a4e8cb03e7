//! Units as newtypes, so a byte count is never mistaken for a sector count.

use std::fmt;
use std::str::FromStr;

/// A number of bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bytes(pub u64);

/// A number of 512-byte sectors (the unit of block-layer addresses).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Sectors(pub u64);

impl Sectors {
    /// The byte count.
    pub const fn bytes(self) -> Bytes {
        Bytes(self.0 << 9)
    }
}

impl Bytes {
    /// Whole sectors in this many bytes (rounded down).
    pub const fn sectors(self) -> Sectors {
        Sectors(self.0 >> 9)
    }
}

/// A byte count could not be parsed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "invalid size {input:?}: expected a number with an optional unit (k, m, g, t in either case, KiB, MB, ...), such as 4k, 1.5G or 200M"
)]
pub struct ParseSizeError {
    input: String,
}

impl FromStr for Bytes {
    type Err = ParseSizeError;

    /// Parses `4096`, `4k`/`4K`/`4KiB` (×1024), `4KB`/`4kB` (×1000), up to
    /// T, with decimals (`1.5G`) as long as the result is a whole number of
    /// bytes; a trailing `/s` is accepted so rates read naturally (`100M/s`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseSizeError {
            input: s.to_owned(),
        };
        let t = s.trim();
        let t = t.strip_suffix("/s").unwrap_or(t);
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let (whole, frac) = num.split_once('.').unwrap_or((num, ""));
        if whole.is_empty() && frac.is_empty() {
            return Err(err());
        }
        let unit = unit.trim();
        let mult: u64 = match unit.to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kib" | "ki" => 1 << 10,
            "m" | "mib" | "mi" => 1 << 20,
            "g" | "gib" | "gi" => 1 << 30,
            "t" | "tib" | "ti" => 1 << 40,
            "kb" => 1_000,
            "mb" => 1_000_000,
            "gb" => 1_000_000_000,
            "tb" => 1_000_000_000_000,
            _ => return Err(err()),
        };
        let digits = |d: &str| -> Result<u128, ParseSizeError> {
            if d.is_empty() {
                Ok(0)
            } else if d.len() > 30 || !d.bytes().all(|b| b.is_ascii_digit()) {
                Err(err())
            } else {
                d.parse().map_err(|_| err())
            }
        };
        // Exact arithmetic: whole * mult + frac * mult / 10^len(frac).
        let scale = 10u128.checked_pow(frac.len() as u32).ok_or_else(err)?;
        let frac_bytes = digits(frac)?
            .checked_mul(u128::from(mult))
            .ok_or_else(err)?;
        if frac_bytes % scale != 0 {
            return Err(err());
        }
        let total = digits(whole)?
            .checked_mul(u128::from(mult))
            .and_then(|w| w.checked_add(frac_bytes / scale))
            .ok_or_else(err)?;
        u64::try_from(total).map(Bytes).map_err(|_| err())
    }
}

impl fmt::Display for Bytes {
    /// Binary units with one decimal (`1.5 GiB`), exact bytes below 1 KiB.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
        if self.0 < 1024 {
            return write!(f, "{} B", self.0);
        }
        let mut v = self.0 as f64 / 1024.0;
        let mut i = 0;
        while v >= 1024.0 && i < UNITS.len() - 1 {
            v /= 1024.0;
            i += 1;
        }
        write!(f, "{v:.1} {}", UNITS[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!("4096".parse(), Ok(Bytes(4096)));
        assert_eq!("1M".parse(), Ok(Bytes(1 << 20)));
        assert_eq!("64KiB".parse(), Ok(Bytes(64 << 10)));
        assert_eq!("2GB".parse(), Ok(Bytes(2_000_000_000)));
        assert_eq!("100M/s".parse(), Ok(Bytes(100 << 20)));
        assert!("".parse::<Bytes>().is_err());
        assert!("1X".parse::<Bytes>().is_err());
        assert!("M".parse::<Bytes>().is_err());
        assert!("99999999999T".parse::<Bytes>().is_err());
    }

    #[test]
    fn units_in_either_case_and_decimals() {
        assert_eq!("1m".parse(), Ok(Bytes(1 << 20)));
        assert_eq!("1g".parse(), Ok(Bytes(1 << 30)));
        assert_eq!("4k".parse(), Ok(Bytes(4096)));
        assert_eq!("2t".parse(), Ok(Bytes(2 << 40)));
        assert_eq!("1.5G".parse(), Ok(Bytes(3 << 29)));
        assert_eq!("0.5m".parse(), Ok(Bytes(1 << 19)));
        assert_eq!("1.5kb".parse(), Ok(Bytes(1500)));
        assert_eq!("2mib".parse(), Ok(Bytes(2 << 20)));
        // Not a whole number of bytes, or not a number.
        assert!("1.3".parse::<Bytes>().is_err());
        assert!("1.0001K".parse::<Bytes>().is_err());
        assert!(".".parse::<Bytes>().is_err());
        assert!("1.2.3M".parse::<Bytes>().is_err());
        assert!("1x".parse::<Bytes>().is_err());
    }

    #[test]
    fn displays_binary_units() {
        assert_eq!(Bytes(512).to_string(), "512 B");
        assert_eq!(Bytes(1536).to_string(), "1.5 KiB");
        assert_eq!(Bytes(3 << 30).to_string(), "3.0 GiB");
    }

    #[test]
    fn sectors_and_bytes_convert() {
        assert_eq!(Sectors(8).bytes(), Bytes(4096));
        assert_eq!(Bytes(4097).sectors(), Sectors(8));
    }
}

/// Parses a duration: `100ms`, `2s`, `1.5s`, `500us`, `1m`.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: expected a number and a unit (ms, s, m)"))?;
    let secs = match unit {
        "us" => v / 1e6,
        "ms" => v / 1e3,
        "s" | "" => v,
        "m" => v * 60.0,
        _ => {
            return Err(format!(
                "invalid duration {s:?}: unknown unit {unit:?} (use us, ms, s or m)"
            ))
        }
    };
    std::time::Duration::try_from_secs_f64(secs).map_err(|_| format!("invalid duration {s:?}"))
}

#[cfg(test)]
mod duration_tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn parses_durations() {
        assert_eq!(parse_duration("100ms"), Ok(Duration::from_millis(100)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("5h").is_err());
        assert!(parse_duration("-1s").is_err());
    }
}

/// Parses a copy rate limit: a size per second of at least 1 KiB (the
/// limiter counts KiB; `0` would not mean "no limit").
pub fn parse_rate(s: &str) -> Result<Bytes, String> {
    let b: Bytes = s.parse().map_err(|e: ParseSizeError| e.to_string())?;
    if b.0 < 1024 {
        return Err(format!(
            "invalid rate {s:?}: a rate limit must be at least 1K per second (leave the option out for no limit)"
        ));
    }
    Ok(b)
}

/// Parses a positive duration (`--max-pause`): a zero budget can never be met.
pub fn parse_positive_duration(s: &str) -> Result<std::time::Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err(format!(
            "invalid duration {s:?}: it must be more than zero (the switch copies the last region with writes held)"
        ));
    }
    Ok(d)
}

/// Parses the hold timeout: a duration from 1 ms to
/// [`blkmig_core::abi::HOLD_TIMEOUT_MS_MAX`], in whole milliseconds.
pub fn parse_hold_timeout(s: &str) -> Result<std::time::Duration, String> {
    let d = parse_duration(s)?;
    let max = u128::from(blkmig_core::abi::HOLD_TIMEOUT_MS_MAX);
    if d.as_millis() < 1 || d.as_millis() > max || d.subsec_nanos() % 1_000_000 != 0 {
        return Err(format!(
            "invalid hold timeout {s:?}: it must be whole milliseconds from 1ms to {}s",
            max / 1000
        ));
    }
    Ok(d)
}

#[cfg(test)]
mod option_tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_zero_rate_is_refused() {
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("0M").is_err());
        assert!(parse_rate("100").is_err());
        assert_eq!(parse_rate("1k"), Ok(Bytes(1024)));
        assert_eq!(parse_rate("200M/s"), Ok(Bytes(200 << 20)));
    }

    #[test]
    fn a_zero_pause_is_refused() {
        assert!(parse_positive_duration("0").is_err());
        assert!(parse_positive_duration("0ms").is_err());
        assert_eq!(
            parse_positive_duration("100ms"),
            Ok(Duration::from_millis(100))
        );
    }

    #[test]
    fn hold_timeouts_are_bounded_durations() {
        assert_eq!(parse_hold_timeout("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_hold_timeout("800ms"), Ok(Duration::from_millis(800)));
        assert_eq!(parse_hold_timeout("60s"), Ok(Duration::from_secs(60)));
        assert!(parse_hold_timeout("61s").is_err());
        assert!(parse_hold_timeout("0s").is_err());
        assert!(parse_hold_timeout("500us").is_err());
        assert!(parse_hold_timeout("1.0005s").is_err());
    }
}
