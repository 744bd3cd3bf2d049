//! Durations as users write them in YAML (`250ms`, `2s`, `1m30s`), validated by the CRD schema
//! pattern and parsed here, so the operator and sidecar interpret them identically.

use std::{borrow::Cow, fmt, time::Duration};

use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Serialize};

/// Regex the CRD schema enforces; [`DurationString::parse`] accepts exactly this language.
pub const PATTERN: &str = "^([0-9]{1,9}(ms|s|m|h))+$";

/// A duration such as `250ms`, `2s`, `1m30s` or `1h` (units: ms, s, m, h).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DurationString(pub String);

/// Why a duration string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a duration: use a number followed by ms, s, m or h, e.g. \"250ms\", \"2s\", \"1m30s\"")]
pub struct ParseDurationError(pub String);

impl DurationString {
    /// Parses the string; the error names the bad value and shows valid examples.
    pub fn parse(&self) -> Result<Duration, ParseDurationError> {
        parse_duration(&self.0)
    }

    /// Builds the canonical string for `d` (whole milliseconds).
    pub fn from_duration(d: Duration) -> Self {
        let ms = d.as_millis();
        let s = if ms % 3_600_000 == 0 && ms > 0 {
            format!("{}h", ms / 3_600_000)
        } else if ms % 60_000 == 0 && ms > 0 {
            format!("{}m", ms / 60_000)
        } else if ms % 1000 == 0 && ms > 0 {
            format!("{}s", ms / 1000)
        } else {
            format!("{ms}ms")
        };
        // One count of at most 9 digits, as the parser and the CRD pattern accept; a longer
        // duration is written as a sum of units instead.
        if s.trim_end_matches(|c: char| c.is_ascii_alphabetic()).len() <= 9 {
            return DurationString(s);
        }
        let mut out = String::new();
        let mut hours = ms / 3_600_000;
        while hours > 999_999_999 {
            out.push_str("999999999h");
            hours -= 999_999_999;
        }
        let rest = ms % 3_600_000;
        for (n, unit) in [
            (hours, "h"),
            (rest / 60_000, "m"),
            (rest % 60_000 / 1000, "s"),
            (rest % 1000, "ms"),
        ] {
            if n > 0 {
                out.push_str(&format!("{n}{unit}"));
            }
        }
        DurationString(out)
    }
}

impl From<&str> for DurationString {
    fn from(s: &str) -> Self {
        DurationString(s.to_string())
    }
}

impl fmt::Display for DurationString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Parses `[0-9]+(ms|s|m|h)` repeated, e.g. `1m30s`.
pub fn parse_duration(s: &str) -> Result<Duration, ParseDurationError> {
    let err = || ParseDurationError(s.to_string());
    if s.is_empty() {
        return Err(err());
    }
    let bytes = s.as_bytes();
    let mut i = 0;
    let mut total = Duration::ZERO;
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        if i == start || i - start > 9 {
            return Err(err());
        }
        let n: u64 = s[start..i].parse().map_err(|_| err())?;
        let unit = if s[i..].starts_with("ms") {
            i += 2;
            Duration::from_millis(n)
        } else if s[i..].starts_with('s') {
            i += 1;
            Duration::from_secs(n)
        } else if s[i..].starts_with('m') {
            i += 1;
            Duration::from_secs(n * 60)
        } else if s[i..].starts_with('h') {
            i += 1;
            Duration::from_secs(n * 3600)
        } else {
            return Err(err());
        };
        total = total.checked_add(unit).ok_or_else(err)?;
    }
    Ok(total)
}

impl JsonSchema for DurationString {
    fn schema_name() -> Cow<'static, str> {
        "DurationString".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": PATTERN,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_compounds() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "5 parsecs",
            "5",
            "s",
            "1.5s",
            "-1s",
            "1d",
            "10000000000s",
            "1s ",
        ] {
            let e = parse_duration(bad).unwrap_err();
            assert!(e.to_string().contains("is not a duration"), "{bad}: {e}");
        }
    }

    #[test]
    fn canonical_round_trip() {
        for ms in [1u64, 250, 1000, 90_000, 3_600_000] {
            let d = Duration::from_millis(ms);
            assert_eq!(DurationString::from_duration(d).parse(), Ok(d));
        }
    }
}
