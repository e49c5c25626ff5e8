//! Stage 2 of CAP and the one-shot baselines: choose what every linear keeps under a
//! budget, write the compressed `.cap` file and measure it.
//!
//! [`run::compress`] drives the stages, each in its own module: [`load`] → [`plan`]
//! (the budget; [`tensors`] knows which tensors go into the file) → the method's
//! candidates and selection ([`strategy`]: [`oneshot`], [`pruned`], [`paper`], all
//! producing [`candidate::Candidate`]s) → [`write`] → [`measure`] → [`stamp`].
//! With quantized values (`--values q8|q4`), [`quantize`] chooses the codes
//! (round-to-nearest, or GPTQ right after pruning where the method has each layer's
//! input Hessian) and [`qvalues`] is the seam to cap-format's value types.

pub mod admm;
pub mod allocate;
pub mod blockcache;
pub mod budget;
pub mod calibration;
pub mod candidate;
pub mod distill;
pub mod error;
pub mod from_file;
pub mod joint;
pub mod load;
pub mod lowrank;
pub mod measure;
pub mod memory;
pub mod methods;
pub mod oneshot;
pub mod paper;
pub mod pattern;
pub mod plan;
pub mod pruned;
pub mod quantize;
pub mod qvalues;
pub mod reconstruct;
pub mod reinforce;
pub mod run;
pub mod select;
pub mod source;
pub mod sparsegpt;
pub mod speed;
pub mod stamp;
pub mod strategy;
pub mod swap;
pub mod tensors;
pub mod write;

pub use candidate::{Candidate, Factors};
pub use error::CompressError;
pub use strategy::Strategy;
