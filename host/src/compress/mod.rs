//! Stage 2 of CAP and the one-shot baselines: choose what every linear keeps under a
//! budget, write the compressed `.cap` file and measure it.

pub mod admm;
pub mod allocate;
pub mod budget;
pub mod build;
pub mod calibration;
pub mod lowrank;
pub mod methods;
pub mod reinforce;
pub mod run;
pub mod select;
pub mod sparsegpt;
pub mod write;
