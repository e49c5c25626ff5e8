//! The errors of `compress` (typed: the library names what failed; the binary adds
//! nothing but the printing).

use std::error::Error as StdError;

/// A boxed error of a stage `compress` calls into (the importer, the evaluator, the
/// file writer, stage 1's cache): kept as the source so the chain prints in full.
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// Why `compress` (or one of its stages) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CompressError {
    /// An option or input is out of range (the message names the flag).
    #[error("{0}")]
    Invalid(String),
    /// A numerical step failed (a factorization that must succeed did not).
    #[error("{0}")]
    Numerical(String),
    /// A step outside `compress` failed; `what` says which.
    #[error("{what}")]
    Step {
        /// What was being done.
        what: String,
        /// The underlying error.
        #[source]
        source: BoxError,
    },
    /// A step outside `compress` failed, and its own message says which.
    #[error(transparent)]
    Other(BoxError),
    /// Quantizing a layer's values failed (bad setting, shape or Hessian).
    #[error(transparent)]
    Quant(#[from] super::quantize::QuantError),
    /// The `.cap` format rejected a tensor or manifest.
    #[error(transparent)]
    Format(#[from] cap_format::FormatError),
    /// A consistency check of `compress` itself failed (a bug, not an input problem).
    #[error("internal error: {0}")]
    Internal(String),
}

/// `Result` with a [`CompressError`].
pub type Result<T, E = CompressError> = std::result::Result<T, E>;

/// Wraps an error of a called step with what was being done.
pub trait StepContext<T> {
    /// The error, if any, as [`CompressError::Step`] with `what` as its message.
    fn step(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: Into<BoxError>> StepContext<T> for std::result::Result<T, E> {
    fn step(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| CompressError::Step {
            what: what(),
            source: e.into(),
        })
    }
}

/// An error of a called step whose own message says enough (no extra context).
pub fn step_error(e: impl Into<BoxError>) -> CompressError {
    CompressError::Other(e.into())
}
