//! Human-written sizes (`64MiB`, `512KiB`, `1048576`) and durations (`2s`,
//! `500ms`, `5m`) as they appear in the configuration file.
//!
//! Units are case-sensitive: `B`, `KiB`, `MiB`, `GiB`, `TiB` are 1024-based and
//! `KB`, `MB`, `GB`, `TB` are 1000-based. Durations take `ms`, `s`, `m`, `h`,
//! `d`; a bare number is seconds. Overflow is an error, never a wrap.
//! [`serde_size`] and [`serde_duration`] accept a string or an integer.

use std::time::Duration;

const KIB: u64 = 1024;

/// Parses a size in bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let err =
        || format!("`{s}` is not a size; write bytes or a number with KiB, MiB, GiB (e.g. 64MiB)");
    let (number, unit) = split_number(s.trim()).ok_or_else(err)?;
    let factor = match unit {
        "" | "B" => 1,
        "KiB" => KIB,
        "MiB" => KIB.pow(2),
        "GiB" => KIB.pow(3),
        "TiB" => KIB.pow(4),
        "KB" => 1000,
        "MB" => 1000u64.pow(2),
        "GB" => 1000u64.pow(3),
        "TB" => 1000u64.pow(4),
        _ => return Err(err()),
    };
    number.checked_mul(factor).ok_or_else(err)
}

/// The longest duration taken: ten years. Longer ones would overflow the
/// clock arithmetic that adds them to now (a panic at start-up), and none
/// means anything to a daemon.
const MAX_DURATION: Duration = Duration::from_secs(3650 * 86_400);

/// Parses a duration; a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let err = || format!("`{s}` is not a duration; write a number with ms, s, m, h or d (e.g. 2s)");
    let (number, unit) = split_number(s.trim()).ok_or_else(err)?;
    let millis_per = match unit {
        "ms" => 1,
        "" | "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(err()),
    };
    match number.checked_mul(millis_per) {
        Some(ms) => at_most_ten_years(s, Duration::from_millis(ms)),
        None => Err(too_long(s)),
    }
}

fn too_long(written: &str) -> String {
    format!("`{written}` is longer than ten years; write a shorter duration (e.g. 30d)")
}

fn at_most_ten_years(written: &str, d: Duration) -> Result<Duration, String> {
    if d > MAX_DURATION {
        return Err(too_long(written));
    }
    Ok(d)
}

/// Splits `"64 MiB"` into `(64, "MiB")`; `None` when there is no leading integer.
fn split_number(s: &str) -> Option<(u64, &str)> {
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let number = s[..digits].parse().ok()?;
    Some((number, s[digits..].trim_start()))
}

/// Integer-or-string visitor shared by the serde helpers.
struct Visitor<T> {
    parse: fn(&str) -> Result<T, String>,
    from_int: fn(u64) -> Result<T, String>,
    expecting: &'static str,
}

impl<T> serde::de::Visitor<'_> for Visitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(self.expecting)
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<T, E> {
        (self.from_int)(v).map_err(E::custom)
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<T, E> {
        let v = u64::try_from(v)
            .map_err(|_| E::custom(format!("`{v}` is negative; {} cannot be", self.expecting)))?;
        self.visit_u64(v)
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<T, E> {
        (self.parse)(v).map_err(E::custom)
    }
}

/// `#[serde(with = "crate::config::units::serde_size")]` for `u64` byte counts.
pub mod serde_size {
    use serde::{Deserializer, Serializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        d.deserialize_any(super::Visitor {
            parse: super::parse_size,
            from_int: Ok,
            expecting: "a size such as 64MiB or a number of bytes",
        })
    }

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(*v)
    }
}

/// `#[serde(with = "crate::config::units::serde_duration")]` for [`Duration`]s.
pub mod serde_duration {
    use serde::{Deserializer, Serializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        d.deserialize_any(super::Visitor {
            parse: super::parse_duration,
            from_int: |secs| super::at_most_ten_years(&secs.to_string(), Duration::from_secs(secs)),
            expecting: "a duration such as 2s, 500ms or 5m",
        })
    }

    pub fn serialize<S: Serializer>(v: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}ms", v.as_millis()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1048576"), Ok(1_048_576));
        assert_eq!(parse_size("512KiB"), Ok(512 * 1024));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("64 MiB"), Ok(64 << 20));
        assert_eq!(parse_size("5GiB"), Ok(5 << 30));
        assert_eq!(parse_size("5TiB"), Ok(5 << 40));
        assert_eq!(parse_size("10B"), Ok(10));
        assert_eq!(parse_size("2KB"), Ok(2000));
        assert_eq!(parse_size("3MB"), Ok(3_000_000));
        assert_eq!(parse_size("1GB"), Ok(1_000_000_000));
        assert_eq!(parse_size("1TB"), Ok(1_000_000_000_000));
    }

    #[test]
    fn bad_sizes() {
        for s in [
            "",
            "MiB",
            "64MB2",
            "64mib",
            "1.5MiB",
            "-1",
            "99999999999TiB",
        ] {
            assert!(parse_size(s).is_err(), "{s}");
        }
        assert_eq!(
            parse_size("64MB2").unwrap_err(),
            "`64MB2` is not a size; write bytes or a number with KiB, MiB, GiB (e.g. 64MiB)"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86400)));
        for s in ["", "s", "2x", "1.5s", "2S"] {
            assert!(parse_duration(s).is_err(), "{s}");
        }
        // Added to now, a longer one panicked at start-up.
        assert_eq!(
            parse_duration("3650d"),
            Ok(Duration::from_secs(3650 * 86_400))
        );
        for s in ["3651d", "10000000000000000000", "18446744073709551s"] {
            let err = parse_duration(s).unwrap_err();
            assert!(err.contains("longer than ten years"), "{s}: {err}");
        }
    }

    #[test]
    fn serde_helpers_take_strings_and_integers() {
        #[derive(serde::Deserialize)]
        struct T {
            #[serde(with = "serde_size")]
            size: u64,
            #[serde(with = "serde_duration")]
            wait: Duration,
        }
        let t: T = serde_yaml::from_str("size: 8388608\nwait: 2s").unwrap();
        assert_eq!((t.size, t.wait), (8 << 20, Duration::from_secs(2)));
        let err = serde_yaml::from_str::<T>("size: 1\nwait: 10000000000000000000")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("longer than ten years"), "{err}");
        let t: T = serde_yaml::from_str("size: 8MiB\nwait: 3").unwrap();
        assert_eq!((t.size, t.wait), (8 << 20, Duration::from_secs(3)));
        assert!(serde_yaml::from_str::<T>("size: 8XB\nwait: 3").is_err());
        assert!(serde_yaml::from_str::<T>("size: -1\nwait: 3").is_err());
    }
}
