//! Seeded Gaussian noise whose values are fixed by named algorithms, not by a crate's current choice.
//!
//! A seed must give the same image after any dependency bump, so nothing here relies on `StdRng` (whose algorithm
//! rand may change) or on a distribution crate's sampler. The stream is ChaCha20 keyed by the seed (the key is the
//! seed's eight little-endian bytes followed by zeros, the stream position starts at 0), and each pair of normal
//! values comes from two 64-bit words by the Box–Muller transform. Both are published algorithms; the pinned-value
//! test below fails if either ever changes.

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

/// Standard-normal values from one seed: ChaCha20 words through the Box–Muller transform.
pub struct Gaussian {
    rng: ChaCha20Rng,
    spare: Option<f64>,
}

impl Gaussian {
    /// The generator for `seed`.
    pub fn new(seed: u64) -> Self {
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&seed.to_le_bytes());
        Self {
            rng: ChaCha20Rng::from_seed(key),
            spare: None,
        }
    }

    /// The next standard-normal value.
    pub fn next_f64(&mut self) -> f64 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        // Uniforms in (0, 1]: the top 53 bits plus one, so ln never sees zero.
        let u1 = ((self.rng.next_u64() >> 11) + 1) as f64 * (1.0 / (1u64 << 53) as f64);
        let u2 = ((self.rng.next_u64() >> 11) + 1) as f64 * (1.0 / (1u64 << 53) as f64);
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = std::f64::consts::TAU * u2;
        self.spare = Some(r * theta.sin());
        r * theta.cos()
    }

    /// `n` values with the given mean and standard deviation, as f32.
    pub fn sample(&mut self, n: usize, mean: f64, std: f64) -> Vec<f32> {
        (0..n).map(|_| (mean + std * self.next_f64()) as f32).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first values for seed 42. These define every image's starting latents: if this test fails, a seed now
    /// gives a different image, which must be a deliberate, announced change. The values were computed a second way,
    /// by a separate script implementing the ChaCha20 block function from RFC 8439 (key = seed bytes, counter and
    /// nonce 0) and Box–Muller in double precision.
    #[test]
    fn first_values_for_a_seed_are_pinned() {
        let got = Gaussian::new(42).sample(6, 0.0, 1.0);
        let want: [f32; 6] = [
            -0.355_009_53,
            -1.273_099,
            0.495_113_94,
            0.681_501_45,
            -0.407_976_72,
            0.407_192_63,
        ];
        assert_eq!(got, want, "noise for seed 42 changed");
    }

    #[test]
    fn values_look_standard_normal() {
        let v = Gaussian::new(7).sample(200_000, 0.0, 1.0);
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.01, "variance {var}");
        let tail = v.iter().filter(|x| x.abs() > 3.0).count() as f64 / n;
        assert!((tail - 0.0027).abs() < 0.0005, "P(|z|>3) = {tail}");
    }

    #[test]
    fn seeds_differ_and_repeat() {
        assert_eq!(
            Gaussian::new(1).sample(8, 0.0, 1.0),
            Gaussian::new(1).sample(8, 0.0, 1.0)
        );
        assert_ne!(
            Gaussian::new(1).sample(8, 0.0, 1.0),
            Gaussian::new(2).sample(8, 0.0, 1.0)
        );
    }
}
