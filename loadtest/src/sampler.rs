//! Random numbers for the hot path: a small fast generator and the code samplers (uniform, or
//! Zipf-skewed by rank). Each generator thread owns its own; nothing here allocates or locks after
//! construction, and nothing here is meant for secrets.

/// wyrand: one multiply per draw, good enough statistically for picking codes, and seedable so a
/// run can be repeated.
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0xa076_1d64_78bd_642f);
        let product = u128::from(self.state) * u128::from(self.state ^ 0xe703_7ed1_a0b4_28db);
        ((product >> 64) as u64) ^ (product as u64)
    }

    /// A value in `0..bound` (Lemire's multiply-shift; the bias is below 2^-32 for any bound a
    /// code list can have). `bound` must be above zero.
    pub fn below(&mut self, bound: u64) -> u64 {
        debug_assert!(bound > 0);
        ((u128::from(self.next_u64()) * u128::from(bound)) >> 64) as u64
    }

    /// A value in `[0, 1)` with 53 random bits.
    pub fn unit_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Draws an index in `0..count`: every index equally likely, or index `k` with weight
/// `1 / (k + 1)^s` (Zipf: index 0 is the hottest).
#[derive(Debug, Clone)]
pub enum CodeSampler {
    Uniform { count: u64 },
    Zipf(Zipf),
}

impl CodeSampler {
    pub fn sample(&self, rng: &mut Rng) -> u64 {
        match self {
            CodeSampler::Uniform { count } => rng.below(*count),
            CodeSampler::Zipf(zipf) => zipf.sample_rank(rng) - 1,
        }
    }
}

/// Zipf over ranks `1..=count` with exponent `s`, by rejection-inversion (Hörmann and Derflinger,
/// "Rejection-inversion to generate variates from monotone discrete distributions", 1996): O(1)
/// per draw and no table, so a 10-million-code list costs nothing to set up.
#[derive(Debug, Clone)]
pub struct Zipf {
    count: f64,
    exponent: f64,
    h_integral_x1: f64,
    h_integral_count: f64,
    squeeze: f64,
}

impl Zipf {
    /// `count` must be at least 1 and `exponent` finite and above zero (checked by the caller,
    /// which knows which flag to blame).
    pub fn new(count: u64, exponent: f64) -> Self {
        debug_assert!(count >= 1);
        debug_assert!(exponent > 0.0 && exponent.is_finite());
        let mut zipf = Self {
            count: count as f64,
            exponent,
            h_integral_x1: 0.0,
            h_integral_count: 0.0,
            squeeze: 0.0,
        };
        zipf.h_integral_x1 = zipf.h_integral(1.5) - 1.0;
        zipf.h_integral_count = zipf.h_integral(zipf.count + 0.5);
        zipf.squeeze = 2.0 - zipf.h_integral_inverse(zipf.h_integral(2.5) - zipf.h(2.0));
        zipf
    }

    /// A rank in `1..=count`.
    pub fn sample_rank(&self, rng: &mut Rng) -> u64 {
        loop {
            let u = self.h_integral_count
                + rng.unit_f64() * (self.h_integral_x1 - self.h_integral_count);
            let x = self.h_integral_inverse(u);
            let k = (x + 0.5).floor().clamp(1.0, self.count);
            if k - x <= self.squeeze || u >= self.h_integral(k + 0.5) - self.h(k) {
                return k as u64;
            }
        }
    }

    fn h(&self, x: f64) -> f64 {
        (-self.exponent * x.ln()).exp()
    }

    fn h_integral(&self, x: f64) -> f64 {
        let log_x = x.ln();
        helper_expm1_over_x((1.0 - self.exponent) * log_x) * log_x
    }

    fn h_integral_inverse(&self, x: f64) -> f64 {
        let t = (x * (1.0 - self.exponent)).max(-1.0);
        (helper_ln1p_over_x(t) * x).exp()
    }
}

/// `ln(1 + x) / x`, continuous at 0.
fn helper_ln1p_over_x(x: f64) -> f64 {
    if x.abs() > 1e-8 {
        x.ln_1p() / x
    } else {
        1.0 - x * (0.5 - x * (1.0 / 3.0 - 0.25 * x))
    }
}

/// `(e^x - 1) / x`, continuous at 0.
fn helper_expm1_over_x(x: f64) -> f64 {
    if x.abs() > 1e-8 {
        x.exp_m1() / x
    } else {
        1.0 + x * 0.5 * (1.0 + x / 3.0 * (1.0 + 0.25 * x))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn histogram(sampler: &CodeSampler, count: usize, draws: usize) -> Vec<u64> {
        let mut rng = Rng::new(7);
        let mut seen = vec![0u64; count];
        for _ in 0..draws {
            seen[sampler.sample(&mut rng) as usize] += 1;
        }
        seen
    }

    #[test]
    fn zipf_rank_one_is_drawn_far_more_than_rank_one_hundred() {
        let seen = histogram(&CodeSampler::Zipf(Zipf::new(1000, 1.0)), 1000, 200_000);
        // With s = 1 the expected ratio is 100; accept anything above 30.
        assert!(
            seen[0] > 30 * seen[99].max(1),
            "{} vs {}",
            seen[0],
            seen[99]
        );
        // Rank 1's share is 1/H(1000) ≈ 13.4%.
        let share = seen[0] as f64 / 200_000.0;
        assert!((0.11..0.16).contains(&share), "rank 1 share {share}");
    }

    #[test]
    fn zipf_stays_in_range_for_any_exponent() {
        let mut rng = Rng::new(1);
        for exponent in [0.01, 0.5, 0.99, 1.0, 1.01, 2.0, 8.0] {
            for count in [1, 2, 3, 1000] {
                let zipf = Zipf::new(count, exponent);
                for _ in 0..2000 {
                    let rank = zipf.sample_rank(&mut rng);
                    assert!(
                        (1..=count).contains(&rank),
                        "rank {rank} of {count} at s={exponent}"
                    );
                }
            }
        }
    }

    #[test]
    fn uniform_covers_every_index_evenly() {
        let seen = histogram(&CodeSampler::Uniform { count: 100 }, 100, 200_000);
        let (min, max) = (seen.iter().min().unwrap(), seen.iter().max().unwrap());
        assert!(*min > 1500 && *max < 2500, "min {min} max {max}");
    }

    #[test]
    fn unit_f64_is_in_the_half_open_interval() {
        let mut rng = Rng::new(3);
        for _ in 0..10_000 {
            let x = rng.unit_f64();
            assert!((0.0..1.0).contains(&x));
        }
    }
}
