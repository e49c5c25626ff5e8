//! `cap-device`: cap's model runtime. Model configuration, the tokenizer, the forward
//! pass (generic over how a linear layer is stored) and perplexity scoring. `no_std` +
//! `alloc`, so the same code runs on the host, on a Linux board and bare metal.
#![cfg_attr(not(feature = "std"), no_std)]

extern crate alloc;

pub mod caplinear;
pub mod config;
pub mod factored;
pub mod forward;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod load;
pub mod model;
#[cfg(feature = "std")]
pub mod open;
pub mod ppl;
pub mod rng;
pub mod sample;
pub mod tensors;
pub mod tokenizer;

#[cfg(test)]
mod forward_tests;
