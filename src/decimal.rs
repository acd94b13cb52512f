//! Integers as ASCII decimal digits appended to a byte buffer, for paths that write numbers per
//! request or per event and cannot afford `core::fmt`. Writes only; parsing stays with `str::parse`.

/// Longest `u64` in decimal digits.
const U64_DIGITS_MAX: usize = 20;

/// Appends `value` in decimal, without leading zeros.
pub fn write_u64(out: &mut Vec<u8>, value: u64) {
    let mut digits = [0u8; U64_DIGITS_MAX];
    let mut at = digits.len();
    let mut rest = value;
    loop {
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// Appends `value` in decimal, with a `-` when negative (as `format!("{value}")` does).
pub fn write_i64(out: &mut Vec<u8>, value: i64) {
    if value < 0 {
        out.push(b'-');
    }
    write_u64(out, value.unsigned_abs());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits_match_the_standard_formatting() {
        let unsigned = [0, 1, 9, 10, 99, 100, 1_800_000_000, u64::MAX - 1, u64::MAX];
        for value in unsigned {
            let mut out = b"x".to_vec();
            write_u64(&mut out, value);
            assert_eq!(out, format!("x{value}").into_bytes());
        }
        let signed = [0, 1, -1, 10, -10, i64::MAX, i64::MIN, i64::MIN + 1];
        for value in signed {
            let mut out = Vec::new();
            write_i64(&mut out, value);
            assert_eq!(out, value.to_string().into_bytes());
        }
    }
}
