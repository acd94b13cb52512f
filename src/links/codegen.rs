//! Code generation: random base62 codes drawn from a CSPRNG (SPEC section 4). Uniqueness is not
//! decided here but by the store's atomic check-and-insert; callers draw again on a collision.

use rand::Rng;

pub const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
pub const CODE_LEN_DEFAULT: usize = 7;

/// A random base62 code of `len` characters from the thread's CSPRNG (ChaCha, OS-seeded).
pub fn random_code(len: usize) -> String {
    let mut rng = rand::rng();
    (0..len)
        .map(|_| char::from(BASE62[rng.random_range(0..BASE62.len())]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn codes_have_the_length_and_charset_asked_for() {
        for len in [1, 7, 12] {
            let code = random_code(len);
            assert_eq!(code.len(), len);
            assert!(crate::links::validate::is_code(&code));
        }
    }

    #[test]
    fn codes_do_not_repeat_in_practice() {
        let codes: HashSet<String> = (0..10_000).map(|_| random_code(7)).collect();
        assert_eq!(codes.len(), 10_000);
    }
}
