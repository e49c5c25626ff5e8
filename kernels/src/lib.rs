//! `cap-kernels`: the numeric kernels cap's runtime is built from.
//!
//! Every kernel has a plain scalar reference (`scalar`) that defines its result; the
//! fast paths are tested against it. Matrices are row-major `f32` unless a name says
//! otherwise, and every reduction accumulates in `f32` (or wider).
#![cfg_attr(not(feature = "std"), no_std)]

extern crate alloc;

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod gemm;
pub mod ops;
pub mod par;
pub mod vexp;

/// Whether `CAP_FORCE_SCALAR=1` asks for the scalar reference kernels (checked once).
#[cfg(feature = "std")]
pub fn force_scalar() -> bool {
    static FORCE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FORCE.get_or_init(|| std::env::var_os("CAP_FORCE_SCALAR").is_some_and(|v| v == "1"))
}

/// The kernel table `CAP_FORCE_ISA` names (`scalar`, `avx2`, `avx512`, `neon`; see
/// [`cpu::kernels`]), if set (checked once).
#[cfg(feature = "std")]
pub fn force_isa() -> Option<&'static str> {
    static ISA: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    ISA.get_or_init(|| std::env::var("CAP_FORCE_ISA").ok())
        .as_deref()
}

pub use gemm::{MatMut, MatRef};
