//! The randomized SVD's generator: cap-device's xorshift64* ([`cap_device::rng`], the
//! one home of cap's generators), under the name the RPCA code has always used.

/// xorshift64*; see [`cap_device::rng::XorShift64Star`].
pub use cap_device::rng::XorShift64Star as XorShift;
