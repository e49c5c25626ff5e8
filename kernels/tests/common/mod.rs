//! Helpers shared by the kernel test binaries.
#![allow(dead_code)]

/// A 64-bit LCG (Knuth's MMIX constants); the high bits are the output. Tests need
/// reproducible inputs, not statistical quality.
pub struct Lcg(pub u64);

impl Lcg {
    /// The next 32 random bits.
    pub fn next(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 32) as u32
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u32) -> u32 {
        ((u64::from(self.next()) * u64::from(n)) >> 32) as u32
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        f64::from(self.next()) / 4_294_967_296.0
    }

    /// Uniform in `[-2, 2)`.
    pub fn signed(&mut self) -> f32 {
        (self.unit() * 4.0 - 2.0) as f32
    }

    /// An activation in [-2, 2), exactly 0 one time in 16.
    pub fn x(&mut self) -> f32 {
        if self.below(16) == 0 {
            0.0
        } else {
            self.signed()
        }
    }
}

/// A `rows × cols` matrix, about `density` non-zero, with row 0 empty and the last
/// row full when there are at least 3 rows (2:4: at most 2 kept per group of 4).
pub fn matrix(rng: &mut Lcg, rows: usize, cols: usize, density: f64, two_four: bool) -> Vec<f32> {
    let mut w: Vec<f32> = (0..rows * cols)
        .map(|_| {
            if rng.unit() < density {
                rng.signed() + 1e-3
            } else {
                0.0
            }
        })
        .collect();
    if rows >= 3 {
        w[..cols].fill(0.0);
        for v in &mut w[(rows - 1) * cols..] {
            *v = rng.signed() + 1e-3;
        }
    }
    if two_four {
        for g in w.chunks_mut(4) {
            let mut kept = 0;
            for v in g.iter_mut().filter(|v| **v != 0.0) {
                kept += 1;
                if kept > 2 {
                    *v = 0.0;
                }
            }
        }
    }
    w
}
