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
    "invalid size {input:?}: expected a number with an optional unit (K, M, G, T, KiB, MB, ...)"
)]
pub struct ParseSizeError {
    input: String,
}

impl FromStr for Bytes {
    type Err = ParseSizeError;

    /// Parses `4096`, `4K`, `4KiB` (×1024), `4KB`/`4kB` (×1000), up to T;
    /// a trailing `/s` is accepted so rates read naturally (`100M/s`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseSizeError {
            input: s.to_owned(),
        };
        let t = s.trim();
        let t = t.strip_suffix("/s").unwrap_or(t);
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num.parse().map_err(|_| err())?;
        let mult: u64 = match unit.trim() {
            "" | "B" | "b" => 1,
            "K" | "k" | "KiB" | "Ki" => 1 << 10,
            "M" | "MiB" | "Mi" => 1 << 20,
            "G" | "GiB" | "Gi" => 1 << 30,
            "T" | "TiB" | "Ti" => 1 << 40,
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            "TB" => 1_000_000_000_000,
            _ => return Err(err()),
        };
        n.checked_mul(mult).map(Bytes).ok_or_else(err)
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
