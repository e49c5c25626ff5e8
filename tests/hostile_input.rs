//! Hostile and careless input, round two: special output paths, interrupted writes,
//! files with valid checksums but impossible contents, absurd flags. Every case must
//! end with a non-zero exit, one clear line on stderr, no panic or abort, bounded
//! memory (each run is limited with `prlimit --as`), and nothing left behind.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{cap_device, tiny};

/// The address-space limit every run here gets (`prlimit --as`): far above what a tiny
/// model needs (about 0.3 GiB of mappings: thread stacks, allocator arenas), far below
/// the allocations the hostile inputs used to ask for (5 TB, 96 GB, 4.4 GB).
const AS_LIMIT: u64 = 2 << 30;

/// A command limited to [`AS_LIMIT`] bytes of address space when `prlimit` exists.
fn limited(bin: &Path) -> Command {
    if Path::new("/usr/bin/prlimit").exists() {
        let mut c = Command::new("/usr/bin/prlimit");
        c.arg(format!("--as={AS_LIMIT}")).arg(bin);
        c
    } else {
        Command::new(bin)
    }
}

fn host_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_cap-host"))
}

/// Runs `bin args` under the memory limit with `envs`; (exit code, stdout, stderr).
fn run(bin: &Path, args: &[&str], envs: &[(&str, &str)]) -> (i32, String, String) {
    let out = limited(bin)
        .args(args)
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("run");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Asserts that `bin args` exits with `code`, prints exactly one non-empty line on
/// stderr containing every needle, and neither panicked nor aborted.
fn refused(bin: &Path, args: &[&str], code: i32, needles: &[&str]) -> String {
    let (c, _, err) = run(bin, args, &[]);
    assert!(!err.contains("panicked"), "panic for {args:?}: {err}");
    assert!(
        !err.contains("memory allocation"),
        "allocation failure for {args:?}: {err}"
    );
    assert_eq!(c, code, "exit code for {args:?}, stderr: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line for {args:?}, got: {err}");
    for n in needles {
        assert!(err.contains(n), "stderr for {args:?} lacks {n:?}: {err}");
    }
    err
}

/// `cap-host args` must fail with exit 1 and one line holding every needle.
fn host_refuses(args: &[&str], needles: &[&str]) -> String {
    refused(&host_bin(), args, 1, needles)
}

#[allow(dead_code)] // used by the board cases below as they are added
/// `cap-device args` must fail with exit 2 (unusable file or wrong argument) and one line.
fn device_refuses(args: &[&str], needles: &[&str]) -> String {
    refused(&cap_device(), args, 2, needles)
}

/// The names in `dir`, sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn mkfifo(p: &Path) {
    let st = Command::new("mkfifo").arg(p).status().expect("mkfifo");
    assert!(st.success());
}

// --- 1. Outputs -------------------------------------------------------------------

#[test]
fn outputs_that_are_not_regular_files_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let model = tiny("llama-tied");
    let fifo = d.path().join("fifo.cap");
    mkfifo(&fifo);
    let dir = d.path().join("dir.cap");
    std::fs::create_dir(&dir).unwrap();
    let (a, b) = (d.path().join("a.cap"), d.path().join("b.cap"));
    std::os::unix::fs::symlink(&b, &a).unwrap();
    std::os::unix::fs::symlink(&a, &b).unwrap();
    let calib = common::calib_text(d.path());
    let before = entries(d.path());
    for (out, what) in [
        ("/dev/full", "a character device"),
        ("/dev/null", "a character device"),
        (s(&fifo), "a FIFO"),
        (s(&dir), "a directory"),
        (s(&a), "symbolic links"),
    ] {
        host_refuses(&["pack", "--model", &model, "-o", out], &[what]);
        host_refuses(
            &[
                "compress", "--model", &model, "-o", out, "--ratio", "0.5", "--calib", &calib,
            ],
            &[what],
        );
    }
    assert_eq!(std::fs::metadata("/dev/full").unwrap().len(), 0);
    assert!(!std::fs::metadata("/dev/full").unwrap().is_file());
    assert_eq!(
        entries(d.path()),
        before,
        "nothing written, nothing replaced"
    );
}

#[test]
fn a_symbolic_link_output_is_written_through_to_its_target() {
    let d = tempfile::tempdir().unwrap();
    let model = tiny("llama-tied");
    let real_dir = d.path().join("real");
    std::fs::create_dir(&real_dir).unwrap();
    let target = real_dir.join("model.cap");
    std::fs::write(&target, b"old").unwrap();
    let link = d.path().join("link.cap");
    std::os::unix::fs::symlink("real/model.cap", &link).unwrap();
    let (c, _, err) = run(
        &host_bin(),
        &["pack", "--model", &model, "-o", s(&link)],
        &[],
    );
    assert_eq!(c, 0, "{err}");
    assert!(std::fs::symlink_metadata(&link).unwrap().is_symlink());
    assert_eq!(
        std::fs::read_link(&link).unwrap(),
        Path::new("real/model.cap")
    );
    let bytes = std::fs::read(&target).unwrap();
    assert_eq!(&bytes[..8], &cap_format::MAGIC);
    assert_eq!(entries(&real_dir), vec!["model.cap"]);
    // A dangling link: its target is created.
    std::fs::remove_file(&target).unwrap();
    let (c, _, err) = run(
        &host_bin(),
        &["pack", "--model", &model, "-o", s(&link)],
        &[],
    );
    assert_eq!(c, 0, "{err}");
    assert!(target.is_file());
    assert_eq!(entries(d.path()), vec!["link.cap", "real"]);
}

/// Starts `cap-host args` with every tensor write slowed down, waits until a file whose
/// name contains `marker` appears in `dir`, then sends `signal`; returns the exit status.
fn interrupt(args: &[&str], dir: &Path, marker: &str, signal: &str) -> std::process::ExitStatus {
    let mut child = Command::new(host_bin())
        .args(args)
        .env("CAP_TEST_WRITE_DELAY_MS", "200")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while !entries(dir).iter().any(|n| n.contains(marker)) {
        assert!(
            t0.elapsed().as_secs() < 60,
            "no {marker} file appeared in {:?}",
            entries(dir)
        );
        assert!(child.try_wait().unwrap().is_none(), "finished too early");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let st = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    child.wait().unwrap()
}

#[test]
fn an_interrupted_pack_or_compress_leaves_nothing_behind() {
    use std::os::unix::process::ExitStatusExt;
    let d = tempfile::tempdir().unwrap();
    let model = tiny("llama-tied");
    let out = d.path().join("x.cap");
    for sig in ["-INT", "-TERM"] {
        let st = interrupt(
            &["pack", "--model", &model, "-o", s(&out)],
            d.path(),
            ".tmp-",
            sig,
        );
        assert!(!st.success());
        assert!(st.signal().is_some() || st.code() != Some(0), "{st:?}");
        assert_eq!(entries(d.path()), Vec::<String>::new(), "after {sig}");
    }
    let work = tempfile::tempdir().unwrap();
    let calib = common::calib_text(work.path());
    let cache = work.path().join("cache");
    let mut args = vec![
        "compress",
        "--model",
        &model,
        "-o",
        s(&out),
        "--ratio",
        "0.5",
    ];
    let small = common::small_args(&calib, s(&cache));
    args.extend(small.iter().map(String::as_str));
    let st = interrupt(&args, d.path(), ".unmeasured-", "-INT");
    assert!(!st.success());
    assert_eq!(entries(d.path()), Vec::<String>::new());
}

#[test]
fn stale_temporary_files_of_a_killed_run_are_removed() {
    let d = tempfile::tempdir().unwrap();
    let model = tiny("llama-tied");
    // PIDs above the kernel's maximum (4194304) belong to no process.
    let stale = [
        "x.cap.tmp-4194399",
        "x.cap.unmeasured-4194398",
        "x.cap.unmeasured-4194398.tmp-4194398",
    ];
    for n in stale {
        std::fs::write(d.path().join(n), b"debris").unwrap();
    }
    // A live process's file (PID 1) and other names are not touched.
    for n in ["x.cap.tmp-1", "x.cap.bak", "y.cap.tmp-4194399"] {
        std::fs::write(d.path().join(n), b"keep").unwrap();
    }
    let out = d.path().join("x.cap");
    let (c, _, err) = run(
        &host_bin(),
        &["pack", "--model", &model, "-o", s(&out)],
        &[],
    );
    assert_eq!(c, 0, "{err}");
    assert_eq!(
        entries(d.path()),
        vec!["x.cap", "x.cap.bak", "x.cap.tmp-1", "y.cap.tmp-4194399"]
    );
}

#[test]
fn an_os_error_is_printed_once() {
    let err = host_refuses(
        &[
            "pack",
            "--model",
            &tiny("llama-tied"),
            "-o",
            "/no/such/dir/x.cap",
        ],
        &["/no/such/dir/x.cap", "No such file or directory"],
    );
    assert_eq!(err.matches("os error").count(), 1, "{err}");
}
