//! `cap-format`: the `.cap` file format (layout types, writer, validating zero-copy
//! reader and exact byte accounting). The format itself is specified by the issue
//! "The .cap file"; today this crate only holds the storage dtypes shared by the
//! kernels and the runtime.
#![no_std]
#![forbid(unsafe_code)]

/// Element type of a stored dense tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE 754 binary32.
    F32,
    /// IEEE 754 binary16.
    F16,
    /// bfloat16 (the upper half of an f32).
    BF16,
}

impl DType {
    /// Size of one element in bytes.
    pub const fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
}
