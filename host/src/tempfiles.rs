//! Temporary files (and folders) that must not outlive the process: removed on SIGINT/SIGTERM, and
//! stale ones from a killed run removed on the next run.
//!
//! The writers already remove their temporary files when they fail or are dropped, but
//! a signal's default action ends the process without running destructors, which left
//! `x.cap.tmp-PID` (up to the model's size) behind a Ctrl-C. So every temporary file is
//! [`register`]ed while it exists, and [`install_signal_cleanup`] starts a thread that,
//! on SIGINT, SIGTERM or SIGHUP, removes every registered file and then ends the process
//! the way the signal would have (so a shell still sees "killed by SIGINT").
//!
//! SIGKILL cannot be caught: [`remove_stale`] removes, beside an output, the temporary
//! files of processes that no longer exist (by the `PID` in their names, so a
//! concurrent run's files are left alone).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Paths to remove on a signal. A `Vec`: a handful of entries at most.
static REGISTRY: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn registry() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    // A panic while holding the lock cannot leave the Vec inconsistent.
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

/// A registered temporary path; dropping it unregisters the path (it does not remove
/// the file: its writer does that).
#[derive(Debug)]
pub struct Registration(PathBuf);

impl Drop for Registration {
    fn drop(&mut self) {
        let mut r = registry();
        if let Some(i) = r.iter().position(|p| *p == self.0) {
            r.swap_remove(i);
        }
    }
}

/// Registers `path` for removal on a signal until the returned value is dropped.
/// Register *before* creating the file: removing a file that is not there is harmless,
/// while a file created before its registration could be missed.
pub fn register(path: impl Into<PathBuf>) -> Registration {
    let path = path.into();
    registry().push(path.clone());
    Registration(path)
}

/// Runs `f` while no signal cleanup can run, for creating (or renaming) an entry of a
/// registered temporary *folder*. A folder's writer keeps running while the cleanup
/// thread removes the folder, so a file it created during that removal would make the
/// removal fail and leave the folder behind; created through `exclusive`, a file is
/// either there before the removal starts or never created (the cleanup keeps the lock
/// until the process ends, so `f` then never runs). `f` must be short and must not call
/// [`register`] (the lock is not reentrant).
pub fn exclusive<T>(f: impl FnOnce() -> T) -> T {
    let _guard = registry();
    f()
}

/// Registers the temporary file a [`cap_format::CapWriter`] for `output` will write
/// (beside the output's final target). `None` when the output cannot be written at all:
/// the writer then fails before creating anything.
pub fn register_writer(output: &Path) -> Option<Registration> {
    let target = cap_format::output_target(output).ok()?;
    cap_format::temporary_path(&target).ok().map(register)
}

/// Starts the thread that removes every registered file on SIGINT, SIGTERM or SIGHUP,
/// then ends the process as the signal would have. Call once, early in `main`.
pub fn install_signal_cleanup() -> std::io::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])?;
    std::thread::Builder::new()
        .name("signal-cleanup".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                // Keep the lock: no writer may register (or rename) anything after this.
                let r = registry();
                for p in r.iter() {
                    remove_path(p);
                }
                // The default action (terminate with the signal) after our cleanup; if
                // that fails, the shell convention 128 + signal number.
                let _ = signal_hook::low_level::emulate_default_handler(sig);
                std::process::exit(128 + sig);
            }
        })?;
    Ok(())
}

/// Removes a registered file, or a folder with its contents (`bundle` assembles its
/// output in a temporary folder). A symbolic link is removed, never followed.
fn remove_path(p: &Path) -> bool {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p).is_ok(),
        Ok(_) => std::fs::remove_file(p).is_ok(),
        Err(_) => false,
    }
}

/// Whether process `pid` exists. Only Linux can tell cheaply (`/proc/PID`); elsewhere
/// every process counts as alive, so nothing is removed.
fn alive(pid: u32) -> bool {
    if cfg!(target_os = "linux") {
        Path::new("/proc").join(pid.to_string()).exists()
    } else {
        true
    }
}

/// The PID a temporary name for `base` carries, when `name` is one: `BASE.tmp-PID`,
/// `BASE.unmeasured-PID` or `BASE.unmeasured-PID.tmp-PID`.
fn temp_pid(base: &str, name: &str) -> Option<u32> {
    let rest = name.strip_prefix(base)?.strip_prefix('.')?;
    let digits = |s: &str| -> Option<u32> {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    if let Some(p) = rest.strip_prefix("tmp-") {
        return digits(p);
    }
    let p = rest.strip_prefix("unmeasured-")?;
    match p.split_once(".tmp-") {
        Some((a, b)) => digits(b).and(digits(a)),
        None => digits(p),
    }
}

/// Removes the temporary files that a killed earlier run writing `output` left beside
/// it (see [`temp_pid`] for the names), when their process no longer exists. Returns
/// the files removed. Errors are ignored: this is tidying, never a reason to fail.
pub fn remove_stale(output: &Path) -> Vec<PathBuf> {
    let Some(base) = output.file_name().and_then(|n| n.to_str()) else {
        return vec![];
    };
    let dir = match output.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return vec![];
    };
    let me = std::process::id();
    let mut removed = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| temp_pid(base, n)) else {
            continue;
        };
        // Folders too: `bundle` writes `DIR.tmp-PID/` beside its output folder.
        let is_file = e.file_type().is_ok_and(|t| t.is_file() || t.is_dir());
        if pid != me && is_file && !alive(pid) && remove_path(&e.path()) {
            removed.push(e.path());
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_names_and_their_pids() {
        assert_eq!(temp_pid("x.cap", "x.cap.tmp-12"), Some(12));
        assert_eq!(temp_pid("x.cap", "x.cap.unmeasured-7"), Some(7));
        assert_eq!(temp_pid("x.cap", "x.cap.unmeasured-7.tmp-7"), Some(7));
        for other in [
            "x.cap",
            "x.cap.tmp-",
            "x.cap.tmp-1a",
            "x.cap.bak",
            "y.cap.tmp-1",
            "x.capx.tmp-1",
            "x.cap.unmeasured-1.tmp-",
        ] {
            assert_eq!(temp_pid("x.cap", other), None, "{other}");
        }
    }

    #[test]
    fn registration_is_removed_on_drop() {
        let p = PathBuf::from("/nonexistent/registration-test");
        let r = register(p.clone());
        assert!(registry().contains(&p));
        drop(r);
        assert!(!registry().contains(&p));
    }
}
