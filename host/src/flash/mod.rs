//! From host to board: `cap-host bundle`, `cap-host flash` and `cap-host boards`.
//!
//! * [`bundle`] puts a board's `cap-device` binary, a `.cap` file, a manifest
//!   (`bundle.json`) and a `run.sh` into one folder, after checking that the file fits
//!   the board's usable memory.
//! * [`remote`] names a board (`[user@]host[:port][:/path]`) and runs commands on it
//!   through the system OpenSSH client, so the user's `~/.ssh/config`, agent and keys
//!   apply exactly as they do for `ssh` itself.
//! * [`install`] copies a bundle onto a board resumably, verifies it there, switches
//!   to it atomically, runs its self-test and rolls back when that fails.
//! * [`status`] reads back what a board has installed and its last verdict.
//!
//! Errors are one line each and name the board or the file they concern.

pub mod bundle;
pub mod install;
pub mod remote;
pub mod status;

use std::path::PathBuf;

/// Why a bundle could not be made or a board flashed. Every message is one complete
/// line that names the file or the board.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FlashError {
    /// A local file or folder could not be read or written.
    #[error("{}: {what}", .path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The input is not usable (a file, a flag or a profile); the message says why.
    #[error("{0}")]
    Invalid(String),
    /// A tool the step needs is missing (cargo, a rustup target, a cross linker, ssh).
    #[error("{0}")]
    Missing(String),
    /// Building `cap-device` failed.
    #[error("{0}")]
    Build(String),
    /// The `.cap` file does not fit the target's usable memory.
    #[error("{0}")]
    DoesNotFit(String),
    /// A board could not be reached or refused the login.
    #[error("board {board}: {reason}")]
    Connect {
        /// The board as given on the command line.
        board: String,
        /// What ssh reported, in one line.
        reason: String,
    },
    /// A board refused the bundle, or a step on it failed; the board is left as it was
    /// (or rolled back).
    #[error("board {board}: {reason}")]
    Board {
        /// The board as given on the command line.
        board: String,
        /// What went wrong.
        reason: String,
    },
    /// The self-test failed on the board after the switch; `current` was switched
    /// back (to the version before, or removed when there was none).
    #[error(
        "board {board}: self-test failed ({summary}); rolled back to {}",
        .rolled_back_to.as_deref().unwrap_or("nothing (no earlier version)")
    )]
    SelfTest {
        /// The board as given on the command line.
        board: String,
        /// The self-test's figures in one phrase.
        summary: String,
        /// What `current` points at now.
        rolled_back_to: Option<String>,
        /// The whole report (for `--json`).
        report: Box<install::FlashReport>,
    },
    /// A target profile could not be read or found.
    #[error(transparent)]
    Target(#[from] crate::targets::TargetError),
    /// A digest could not be computed.
    #[error(transparent)]
    Digest(#[from] crate::digest::DigestError),
}

impl FlashError {
    /// An [`FlashError::Io`] for `path`.
    pub(crate) fn io(path: impl Into<PathBuf>, what: &'static str, source: std::io::Error) -> Self {
        FlashError::Io {
            path: path.into(),
            what,
            source,
        }
    }
}

/// The result type of this module.
pub type Result<T, E = FlashError> = std::result::Result<T, E>;
