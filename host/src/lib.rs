//! `cap-host`: cap's host-side toolchain (import, evaluation, and later decomposition,
//! budget search and packing). The binary `cap-host` is a thin CLI over this library.
pub mod calib;
pub mod capinfo;
pub mod capmodel;
pub mod compress;
pub mod digest;
pub mod eval;
pub mod flash;
pub mod import;
pub mod inspect;
pub mod outputs;
pub mod pack;
pub mod randmodel;
pub mod rpca;
pub mod selfcalib;
pub mod targets;
pub mod tempfiles;
pub mod texts;
