//! `cap-kernels`: the numeric kernels cap's runtime is built from.
//!
//! Every kernel has a plain scalar reference (`scalar`) that defines its result; the
//! fast paths are tested against it. Matrices are row-major `f32` unless a name says
//! otherwise, and every reduction accumulates in `f32` (or wider).
#![cfg_attr(not(feature = "std"), no_std)]

extern crate alloc;

pub mod gemm;
pub mod ops;
pub mod par;

pub use gemm::{MatMut, MatRef};
