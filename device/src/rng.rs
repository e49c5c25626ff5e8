//! cap's seeded random number generators: small, deterministic, dependency-free, and the
//! same on the host and the board. Not for cryptography.
//!
//! Two algorithms live here, and both must stay: every stream cap draws is part of what it
//! writes or prints, so changing a user's algorithm would change its files and outputs.
//!
//! * [`XorShift64Star`] draws the calibration windows of `compress` and the Gaussian test
//!   matrix of the randomized SVD (whose results the RPCA caches and the `.cap` files
//!   hold), and the synthetic data of the RPCA tests.
//! * [`SplitMix64`] draws the sampler's tokens (`cap-device generate --seed`) and
//!   REINFORCE's masks. Unlike xorshift it takes any seed, zero included, and seeds
//!   derived from one another (one stream per step and layer) give independent streams.

/// xorshift64* (Vigna 2016): 64 bits of state; a zero seed is replaced, since zero is
/// xorshift's fixed point.
#[derive(Clone, Debug)]
pub struct XorShift64Star(u64);

impl XorShift64Star {
    /// A generator from a seed (a zero seed is replaced by a fixed non-zero one).
    pub fn new(seed: u64) -> Self {
        XorShift64Star(if seed == 0 {
            0x9E37_79B9_7F4A_7C15
        } else {
            seed
        })
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `[0, 1)` with 53 bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Standard normal (Box–Muller; one of the pair is dropped for simplicity).
    ///
    /// Only with `std`: it uses the platform's `ln`, `sqrt` and `cos`, which produced
    /// the randomized SVD's test matrices of existing caches and files; `libm`'s could
    /// differ in the last bit.
    #[cfg(feature = "std")]
    pub fn normal(&mut self) -> f64 {
        // 1 - u keeps the logarithm's argument in (0, 1].
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * core::f64::consts::PI * u2).cos()
    }
}

/// SplitMix64 (Steele, Lea and Flood 2014): a counter passed through a strong mixer.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator from a seed (any value, zero included).
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.0)
    }

    /// Uniform in `[0, 1)` with 24 bits (exact in `f32`).
    pub fn uniform_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// SplitMix64's finalizer: a bijective mix of 64 bits in which every input bit affects
/// every output bit. Turns related numbers (a seed, a sequence and a token index
/// combined) into an unrelated seed.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_matches_the_published_sequence() {
        // The reference implementation's first outputs for seed 1234567
        // (https://prng.di.unimi.it/splitmix64.c).
        let mut r = SplitMix64::new(1_234_567);
        assert_eq!(r.next_u64(), 6_457_827_717_110_365_317);
        assert_eq!(r.next_u64(), 3_203_168_211_198_807_973);
    }

    #[test]
    fn xorshift_replaces_the_zero_seed_and_stays_in_range() {
        let mut a = XorShift64Star::new(0);
        let mut b = XorShift64Star::new(0x9E37_79B9_7F4A_7C15);
        for _ in 0..100 {
            assert_eq!(a.next_u64(), b.next_u64());
            let u = a.uniform();
            assert!((0.0..1.0).contains(&u));
            b.uniform();
        }
        let mut s = SplitMix64::new(0);
        assert!((0..100).all(|_| (0.0..1.0).contains(&s.uniform_f32())));
    }
}
