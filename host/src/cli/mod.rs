//! Subcommands that have grown beyond a few lines, one module per family.

pub mod compress;
pub mod flash;
pub mod randmodel;
pub mod rpca;
