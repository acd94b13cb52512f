//! Parsers for flag values that are more than a number: durations with units (`500us`, `2ms`,
//! `10s`, `1m`) and the read:create mix (`95:5`). They only turn text into values and say what was
//! wrong; the limits that depend on other flags are checked when the run is planned.

use std::time::Duration;

/// Parses a duration written with a unit: `us`, `ms`, `s` or `m`, e.g. `500us`, `2ms`, `1.5s`.
/// A bare number is refused, because `--timeout 2` could mean seconds or milliseconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("`{text}` has no unit: write e.g. 500us, 2ms, 10s or 1m"))?;
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` does not start with a number"))?;
    let seconds_per_unit = match unit {
        "us" | "µs" => 1e-6,
        "ms" => 1e-3,
        "s" => 1.0,
        "m" => 60.0,
        _ => {
            return Err(format!(
                "`{unit}` in `{text}` is not a unit: use us, ms, s or m"
            ))
        }
    };
    Duration::try_from_secs_f64(value * seconds_per_unit)
        .map_err(|_| format!("`{text}` is out of range"))
}

/// The share of reads (`GET /{code}`) and creates (`POST /api/v1/shorten`), as weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mix {
    pub read_weight: u32,
    pub create_weight: u32,
}

impl Mix {
    /// The fraction of requests that are creates, in 0..=1.
    pub fn create_share(&self) -> f64 {
        f64::from(self.create_weight)
            / (f64::from(self.read_weight) + f64::from(self.create_weight))
    }
}

/// Parses `READ:CREATE`, e.g. `95:5` or `100:0`; at least one weight must be above zero.
pub fn parse_mix(text: &str) -> Result<Mix, String> {
    let (read, create) = text
        .split_once(':')
        .ok_or_else(|| format!("`{text}` is not READ:CREATE, e.g. 95:5"))?;
    let weight = |part: &str| {
        part.trim()
            .parse::<u32>()
            .map_err(|_| format!("`{part}` in `{text}` is not a whole number"))
    };
    let mix = Mix {
        read_weight: weight(read)?,
        create_weight: weight(create)?,
    };
    if mix.read_weight == 0 && mix.create_weight == 0 {
        return Err(format!("`{text}` has no weight above zero"));
    }
    Ok(mix)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_each_unit() {
        assert_eq!(parse_duration("500us"), Ok(Duration::from_micros(500)));
        assert_eq!(parse_duration("2ms"), Ok(Duration::from_millis(2)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn durations_without_a_valid_unit_are_refused() {
        for bad in ["2", "", "ms", "2h", "2 ms", "1.2.3s", "-1s", "1e9999s"] {
            assert!(parse_duration(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn mix_parses_weights_and_share() {
        let mix = parse_mix("95:5").unwrap();
        assert_eq!(
            mix,
            Mix {
                read_weight: 95,
                create_weight: 5
            }
        );
        assert!((mix.create_share() - 0.05).abs() < 1e-12);
        assert_eq!(parse_mix("0:1").unwrap().create_share(), 1.0);
    }

    #[test]
    fn mix_rejects_bad_text() {
        for bad in ["95", "a:b", "0:0", "95:-5", ":5"] {
            assert!(parse_mix(bad).is_err(), "{bad} should be refused");
        }
    }
}
