//! `cap-host flash`: one bundle onto one board, verified, switched atomically,
//! self-tested, rolled back on failure.
//!
//! Layout on the board, under the install path `P`:
//!
//! ```text
//! P/versions/<bundle sha256>/   model.cap cap-device run.sh bundle.json
//!                               selftest.log .verdict      (written by the self-test)
//! P/current  -> versions/<sha>  the version in use
//! P/previous -> versions/<sha>  the one before it
//! ```
//!
//! Steps: a read-only probe (`uname -m` against the bundle's architecture, free space
//! from `df -Pk`, what of this version is already there); then each file is appended to
//! `NAME.partial` from where an earlier, interrupted run stopped, checked with
//! `sha256sum` on the board and renamed into place; every file is checked again; then
//! `current` is switched with `ln -sfn` + `mv -T` (a rename: a reader sees the old or
//! the new link, never none) and `run.sh` runs the self-test. A failed self-test
//! switches `current` back. Nothing is written outside `P`.

use std::path::PathBuf;

use indicatif::ProgressBar;
use serde::Serialize;

use super::bundle::{LoadedBundle, triple_arch};
use super::remote::{BoardSpec, Ssh, quote};
use super::{FlashError, Result};

/// How to flash.
#[derive(Clone, Debug, Default)]
pub struct FlashOptions {
    /// `-F FILE` for ssh.
    pub ssh_config: Option<PathBuf>,
    /// Probe and report the plan; write nothing.
    pub dry_run: bool,
    /// Test seam (`CAP_FLASH_TEST_STOP_AFTER_BYTES`): stop copying after this many
    /// bytes in this run, as a dropped connection would, and fail.
    pub stop_after_bytes: Option<u64>,
    /// Test seam (`CAP_FLASH_TEST_FREE_BYTES`): the board's free bytes, instead of
    /// what `df` reports.
    pub free_bytes_override: Option<u64>,
}

/// One file's state on the board before copying.
#[derive(Clone, Debug, Serialize)]
pub struct FilePlan {
    /// Name in the bundle.
    pub name: String,
    /// Its size.
    pub bytes: u64,
    /// Bytes already on the board (a finished file or a `.partial` one).
    pub present_bytes: u64,
    /// Whether the finished file is already there.
    pub done: bool,
}

/// What the self-test on the board reported.
#[derive(Clone, Debug, Serialize)]
pub struct SelfTestResult {
    /// Whether it passed (exit 0).
    pub pass: bool,
    /// `cap-device`'s exit status.
    pub exit_code: i32,
    /// Its `--json` report, when it printed one.
    pub report: Option<serde_json::Value>,
    /// The last line it printed (its error, when it failed).
    pub last_line: String,
}

/// The outcome of flashing one board.
#[derive(Clone, Debug, Serialize)]
pub struct FlashReport {
    /// The board as given.
    pub board: String,
    /// The install path.
    pub install_path: String,
    /// The version installed (the bundle's sha256).
    pub version: String,
    /// `uname -m` on the board.
    pub arch: String,
    /// Free bytes the board reported (or the test override).
    pub free_bytes: u64,
    /// Each file's state before copying.
    pub files: Vec<FilePlan>,
    /// Bytes copied in this run.
    pub copied_bytes: u64,
    /// Whether this was a dry run (nothing written).
    pub dry_run: bool,
    /// What `current` pointed at before (`versions/<sha>`), if anything.
    pub previous: Option<String>,
    /// The self-test, unless a dry run.
    pub self_test: Option<SelfTestResult>,
    /// Whether `current` was switched back after a failed self-test.
    pub rolled_back: bool,
}

/// What the read-only probe found.
struct Probe {
    arch: String,
    free_bytes: u64,
    current: Option<String>,
    previous: Option<String>,
    files: Vec<FilePlan>,
}

fn board_err(board: &BoardSpec, reason: impl Into<String>) -> FlashError {
    FlashError::Board {
        board: board.raw.clone(),
        reason: reason.into(),
    }
}

/// The shell lines that set `P` (install path) and `V` (this version's folder).
fn vars(ssh: &Ssh, sha: &str) -> String {
    format!("P={}\nV=\"$P/versions/{sha}\"\n", ssh.board.path.shell())
}

fn probe(ssh: &Ssh, bundle: &LoadedBundle) -> Result<Probe> {
    let files = bundle.files();
    let names: Vec<String> = files.iter().map(|f| quote(&f.name)).collect();
    // Read-only: nothing here creates or changes a file. `df` runs on the deepest
    // existing folder of the install path, which is where the copy will land.
    let script = format!(
        r#"{vars}echo "arch $(uname -m)"
d="$P"
while [ ! -e "$d" ]; do d=$(dirname "$d"); done
echo "free $(df -Pk "$d" | awk 'NR==2 {{print $4}}')"
echo "current $(readlink "$P/current" 2>/dev/null)"
echo "previous $(readlink "$P/previous" 2>/dev/null)"
for f in {names}; do
  if [ -f "$V/$f" ]; then echo "file done $(stat -c %s "$V/$f") $f"
  elif [ -f "$V/$f.partial" ]; then echo "file partial $(stat -c %s "$V/$f.partial") $f"
  else echo "file none 0 $f"; fi
done
"#,
        vars = vars(ssh, &bundle.sha256),
        names = names.join(" ")
    );
    let o = ssh.script_ok(&script, "probing the board")?;
    let mut p = Probe {
        arch: String::new(),
        free_bytes: 0,
        current: None,
        previous: None,
        files: vec![],
    };
    let mut free = None;
    let nonempty = |s: &str| (!s.is_empty()).then(|| s.to_string());
    for line in o.stdout.lines() {
        let (key, rest) = line.split_once(' ').unwrap_or((line, ""));
        match key {
            "arch" => p.arch = rest.trim().to_string(),
            "free" => free = rest.trim().parse::<u64>().ok(),
            "current" => p.current = nonempty(rest.trim()),
            "previous" => p.previous = nonempty(rest.trim()),
            "file" => {
                let mut it = rest.splitn(3, ' ');
                let (state, size, name) = (it.next(), it.next(), it.next());
                let (Some(state), Some(size), Some(name)) = (state, size, name) else {
                    continue;
                };
                let Some(f) = files.iter().find(|f| f.name == name) else {
                    continue;
                };
                let size = size.parse::<u64>().unwrap_or(0);
                let done = state == "done" && size == f.bytes;
                p.files.push(FilePlan {
                    name: f.name.clone(),
                    bytes: f.bytes,
                    // A partial file longer than the real one is not a prefix of it,
                    // and a finished file of the wrong size is not this one: both are
                    // started over.
                    present_bytes: match state {
                        "partial" if size <= f.bytes => size,
                        _ if done => size,
                        _ => 0,
                    },
                    done,
                });
            }
            _ => {}
        }
    }
    if p.arch.is_empty() || p.files.len() != files.len() {
        return Err(board_err(
            &ssh.board,
            format!("the probe printed nothing usable: {}", o.last_line()),
        ));
    }
    p.free_bytes = free.ok_or_else(|| {
        board_err(
            &ssh.board,
            format!("cannot read free space with df -Pk: {}", o.last_line()),
        )
    })? * 1024;
    Ok(p)
}

/// Flashes `bundle` onto the board `ssh` reaches, reporting progress on `pb`.
/// Failures before the switch leave `current` as it was; a failed self-test switches
/// back and is reported as a [`FlashError::Board`] carrying the figures.
pub fn flash(
    ssh: &Ssh,
    bundle: &LoadedBundle,
    opts: &FlashOptions,
    pb: &ProgressBar,
) -> Result<FlashReport> {
    let board = &ssh.board;
    let sha = &bundle.sha256;
    let short = &sha[..12];
    pb.set_message(format!("{}: probing", board.raw));
    let mut probe = probe(ssh, bundle)?;
    if let Some(f) = opts.free_bytes_override {
        probe.free_bytes = f;
    }
    let target = &bundle.manifest.rust_target;
    let want = triple_arch(target);
    if probe.arch != want {
        return Err(board_err(
            board,
            format!(
                "the board is {} (uname -m) but the bundle is built for {target}; make a bundle for a target whose rust_target is {}-…",
                probe.arch, probe.arch
            ),
        ));
    }
    let remaining: u64 = probe.files.iter().map(|f| f.bytes - f.present_bytes).sum();
    if probe.free_bytes < remaining {
        return Err(board_err(
            board,
            format!(
                "not enough free space at {}: {remaining} bytes to copy, {} free; nothing copied",
                board.path, probe.free_bytes
            ),
        ));
    }
    let mut report = FlashReport {
        board: board.raw.clone(),
        install_path: board.path.to_string(),
        version: sha.clone(),
        arch: probe.arch.clone(),
        free_bytes: probe.free_bytes,
        files: probe.files.clone(),
        copied_bytes: 0,
        dry_run: opts.dry_run,
        previous: probe.current.clone(),
        self_test: None,
        rolled_back: false,
    };
    if opts.dry_run {
        return Ok(report);
    }

    // Copy.
    let v = vars(ssh, sha);
    ssh.script_ok(
        &format!("{v}mkdir -p \"$V\"\n"),
        "creating the version folder",
    )?;
    pb.set_length(remaining);
    pb.set_position(0);
    let mut budget = opts.stop_after_bytes;
    let mut copied = 0u64;
    for f in probe.files.iter().filter(|f| !f.done) {
        pb.set_message(format!("{}: {} → {short}", board.raw, f.name));
        let local = bundle.dir.join(&f.name);
        let mut len = f.bytes - f.present_bytes;
        let stop = budget.is_some_and(|b| b < len);
        if let Some(b) = budget.as_mut() {
            len = len.min(*b);
            *b -= len;
        }
        let partial = format!(
            "{}/versions/{sha}/{}",
            board.path.shell(),
            quote(&format!("{}.partial", f.name))
        );
        if f.present_bytes == 0 {
            // A `.partial` longer than the file (see the probe) or none: start empty.
            ssh.script_ok(
                &format!("{v}: > \"$V\"/{}\n", quote(&format!("{}.partial", f.name))),
                "starting a copy",
            )?;
        }
        let base = copied;
        if len > 0 {
            ssh.append(&local, f.present_bytes, len, &partial, &|n| {
                pb.set_position(base + n)
            })?;
        }
        copied += len;
        report.copied_bytes = copied;
        if stop {
            return Err(board_err(
                board,
                format!(
                    "stopped after {copied} bytes (CAP_FLASH_TEST_STOP_AFTER_BYTES, a test seam); {} is partly copied, run flash again to continue",
                    f.name
                ),
            ));
        }
        let expected = bundle
            .files()
            .into_iter()
            .find(|b| b.name == f.name)
            .map(|b| b.sha256)
            .unwrap_or_default();
        let mode = if f.name == super::bundle::DEVICE_FILE || f.name == super::bundle::RUN_FILE {
            "755"
        } else {
            "644"
        };
        // Checked on the board: what reached the disk, not what was sent. A damaged
        // partial file is removed so the next run copies it afresh.
        let name = quote(&f.name);
        let o = ssh.script_ok(
            &format!(
                r#"{v}f={name}
s=$(sha256sum "$V/$f.partial" | cut -d' ' -f1)
if [ "$s" = {expected} ]; then chmod {mode} "$V/$f.partial" && mv -f "$V/$f.partial" "$V/$f" && echo ok
else rm -f "$V/$f.partial"; echo "bad $s"; fi
"#
            ),
            "verifying a copied file",
        )?;
        if o.stdout.trim() != "ok" {
            let got = o
                .stdout
                .trim()
                .strip_prefix("bad ")
                .unwrap_or("?")
                .to_string();
            return Err(board_err(
                board,
                format!(
                    "checksum mismatch on the board for {} (sha256 {got}, expected {expected}): the copy was damaged and is removed; nothing switched, run flash again",
                    f.name
                ),
            ));
        }
    }
    pb.set_position(remaining);

    // Every file once more, finished ones from earlier runs included, then switch.
    pb.set_message(format!("{}: verifying {short}", board.raw));
    // A file that fails here (damaged on the board after an earlier run finished it)
    // is removed, so the next run copies it again instead of failing forever.
    let sums: Vec<String> = bundle
        .files()
        .iter()
        .map(|f| format!("{} {}", f.sha256, f.name))
        .collect();
    let o = ssh.script(&format!(
        r#"{v}cd "$V" || exit 3
bad=""
while read -r sum name; do
  s=$(sha256sum "$name" 2>/dev/null | cut -d' ' -f1)
  if [ "$s" != "$sum" ]; then rm -f "$name"; bad="$bad $name"; fi
done <<'EOF'
{}
EOF
if [ -n "$bad" ]; then echo "damaged:$bad"; exit 4; fi
"#,
        sums.join("\n")
    ))?;
    if o.code != 0 {
        return Err(board_err(
            board,
            format!(
                "checksum mismatch on the board in versions/{sha} ({}): removed; nothing switched, run flash again",
                o.last_line()
            ),
        ));
    }
    let new = format!("versions/{sha}");
    let old = probe.current.clone();
    let moved_previous = old.as_deref().is_some_and(|o| o != new);
    pb.set_message(format!("{}: switching to {short}", board.raw));
    let mut switch = v.clone();
    if moved_previous {
        let o = quote(old.as_deref().unwrap_or_default());
        switch.push_str(&format!(
            "ln -sfn {o} \"$P/previous.new\" && mv -T \"$P/previous.new\" \"$P/previous\" || exit 1\n"
        ));
    }
    switch.push_str(&format!(
        "ln -sfn {} \"$P/current.new\" && mv -T \"$P/current.new\" \"$P/current\"\n",
        quote(&new)
    ));
    ssh.script_ok(&switch, "switching to the new version")?;

    // The self-test, through the `current` link as a user would run it.
    pb.set_message(format!("{}: self-test", board.raw));
    let o = ssh.script(&format!(
        r#"{v}"$P/current/run.sh" selftest model.cap --json > "$V/selftest.log" 2>&1 < /dev/null
rc=$?
if [ "$rc" -eq 0 ]; then echo pass > "$V/.verdict"; else echo "fail exit $rc" > "$V/.verdict"; fi
echo "rc $rc"
cat "$V/selftest.log"
"#
    ))?;
    // Found by its prefix, not position: a chatty shell startup file on the board may
    // print lines of its own first.
    let all: Vec<&str> = o.stdout.lines().collect();
    let at = all.iter().position(|l| l.starts_with("rc "));
    let code = at
        .and_then(|i| all[i]["rc ".len()..].trim().parse::<i32>().ok())
        .unwrap_or(-1);
    let log: Vec<&str> = at.map_or(vec![], |i| all[i + 1..].to_vec());
    let json = log
        .iter()
        .find(|l| l.starts_with('{'))
        .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok());
    let last = log
        .iter()
        .rfind(|l| !l.trim().is_empty())
        .map_or_else(|| o.last_line(), |l| l.trim().to_string());
    let st = SelfTestResult {
        pass: code == 0,
        exit_code: code,
        report: json,
        last_line: last,
    };
    report.self_test = Some(st.clone());
    if st.pass {
        return Ok(report);
    }

    // Roll back: `current` to what it was (or, when this version was already current,
    // to the previous one; or nothing), `previous` to what it was.
    let back = if moved_previous {
        old.clone()
    } else {
        probe.previous.clone()
    };
    let mut rb = v;
    match &back {
        Some(b) => rb.push_str(&format!(
            "ln -sfn {} \"$P/current.new\" && mv -T \"$P/current.new\" \"$P/current\" || exit 1\n",
            quote(b)
        )),
        None => rb.push_str("rm -f \"$P/current\" || exit 1\n"),
    }
    if moved_previous {
        match &probe.previous {
            Some(p) => rb.push_str(&format!(
                "ln -sfn {} \"$P/previous.new\" && mv -T \"$P/previous.new\" \"$P/previous\"\n",
                quote(p)
            )),
            None => rb.push_str("rm -f \"$P/previous\"\n"),
        }
    }
    ssh.script_ok(&rb, "rolling back")?;
    report.rolled_back = true;
    Err(FlashError::SelfTest {
        board: board.raw.clone(),
        summary: selftest_summary(&st),
        rolled_back_to: back,
        report: Box::new(report),
    })
}

/// The self-test's figures in one phrase (`ppl 12.3 vs stored 12.3 (relative
/// difference 1e-7)`), or its last line when it printed no report.
pub fn selftest_summary(st: &SelfTestResult) -> String {
    let Some(r) = &st.report else {
        return format!("exit {}: {}", st.exit_code, st.last_line);
    };
    let f = |k: &str| r[k].as_f64();
    let mut s = match (f("ppl"), f("stored_ppl"), f("relative_difference")) {
        (Some(p), Some(s), Some(d)) => {
            format!("ppl {p:.4} vs stored {s:.4} (relative difference {d:.1e})")
        }
        (Some(p), _, _) => format!("ppl {p:.4}, nothing stored to compare"),
        _ => st.last_line.clone(),
    };
    if let Some(t) = f("tokens_per_s") {
        s.push_str(&format!(", {t:.1} tokens/s"));
    }
    if let Some(m) = r["peak_rss_bytes"].as_u64() {
        s.push_str(&format!(
            ", peak RSS {:.1} MiB",
            m as f64 / (1 << 20) as f64
        ));
    }
    if let Some(k) = r["kernels"].as_str() {
        s.push_str(&format!(", {k} kernels"));
    }
    if !st.pass {
        s.push_str(&format!(", exit {}", st.exit_code));
    }
    s
}
