//! `cap-host bundle`, `cap-host flash` and `cap-host boards`: the command-line side of
//! [`cap_host::flash`] (arguments, progress bars, printing).

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use cap_host::flash::bundle::{self, BundleOptions, LoadedBundle};
use cap_host::flash::install::{FlashOptions, FlashReport, selftest_summary};
use cap_host::flash::remote::{BoardSpec, Ssh};
use cap_host::flash::status::BoardStatus;
use cap_host::flash::{FlashError, install, status};
use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// `cap-host bundle`.
#[derive(Args)]
pub struct BundleArgs {
    /// The `.cap` file (written by `compress`: it must carry a self-test figure).
    pub cap: PathBuf,
    /// The board's profile (`cap-host targets`): its rust_target picks the binary.
    #[arg(long)]
    pub target: String,
    /// The bundle folder to write (replaced atomically if it holds a bundle).
    #[arg(short, long, value_name = "DIR")]
    pub output: PathBuf,
    /// A prebuilt `cap-device` for the target, instead of building one with cargo.
    #[arg(long, value_name = "PATH")]
    pub device_bin: Option<PathBuf>,
    /// Build cap-device with `cross` (cross-rs: the toolchain in a Docker or Podman
    /// container, configured by Cross.toml) instead of cargo and a cross linker.
    #[arg(long, conflicts_with = "device_bin")]
    pub cross: bool,
    /// A folder of extra `NAME.toml` profiles.
    #[arg(long, value_name = "DIR")]
    pub targets_dir: Option<PathBuf>,
    /// The context the memory check counts the KV cache for (capped at the model's
    /// positions); `cap-device generate`'s default.
    #[arg(long, default_value_t = 2048)]
    pub ctx: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Options shared by `flash` and `boards`: which boards, and how to reach them.
#[derive(Args)]
pub struct BoardArgs {
    /// A board: `[user@]host[:port][:/path]` (install path default `~/cap`);
    /// repeat for several boards, which are handled in parallel.
    #[arg(long = "to", value_name = "BOARD", required = true)]
    pub to: Vec<String>,
    /// An ssh config file to use instead of `~/.ssh/config` (`ssh -F FILE`).
    #[arg(long, value_name = "FILE")]
    pub ssh_config: Option<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `cap-host flash`.
#[derive(Args)]
pub struct FlashArgs {
    /// The bundle folder (`cap-host bundle -o DIR`).
    #[arg(required_unless_present = "status")]
    pub bundle: Option<PathBuf>,
    /// The boards and how to reach them.
    #[command(flatten)]
    pub boards: BoardArgs,
    /// Say what would be copied where (after the read-only checks) and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Report what each board has installed instead (as `cap-host boards`).
    #[arg(long, conflicts_with_all = ["bundle", "dry_run"])]
    pub status: bool,
}

fn parse_boards(a: &BoardArgs) -> Result<Vec<Ssh>> {
    if let Some(f) = &a.ssh_config
        && !f.is_file()
    {
        bail!("--ssh-config {}: not a readable file", f.display());
    }
    let boards: Vec<Ssh> =
        a.to.iter()
            .map(|t| {
                Ok(Ssh {
                    board: BoardSpec::parse(t)?,
                    config: a.ssh_config.clone(),
                })
            })
            .collect::<Result<_>>()?;
    // Two threads flashing one install path would race on its files and links.
    for (i, x) in boards.iter().enumerate() {
        if boards[..i].iter().any(|y| y.board.raw == x.board.raw) {
            bail!("--to {} is given twice", x.board.raw);
        }
    }
    Ok(boards)
}

/// `cap-host bundle`.
pub fn bundle(a: BundleArgs) -> Result<()> {
    let profile = cap_host::targets::find(&a.target, a.targets_dir.as_deref())?;
    if let Ok(m) = std::fs::metadata(&a.cap)
        && !m.is_file()
    {
        bail!("{}: not a regular file", a.cap.display());
    }
    let opts = BundleOptions {
        cap: a.cap.clone(),
        profile,
        out: a.output.clone(),
        device_bin: a.device_bin.clone(),
        builder: if a.cross {
            bundle::Builder::Cross
        } else {
            bundle::Builder::Cargo
        },
        ctx: a.ctx,
    };
    let (b, fit) = bundle::write(&opts)?;
    if a.json {
        let mut v = serde_json::to_value(&b.manifest)?;
        v["dir"] = b.dir.display().to_string().into();
        v["sha256"] = b.sha256.clone().into();
        v["memory"]["spare_bytes"] = (fit.spare_bytes() as i64).into();
        println!("{v}");
        return Ok(());
    }
    let m = &b.manifest;
    let files: Vec<String> = b
        .files()
        .iter()
        .map(|f| format!("{} ({} bytes)", f.name, f.bytes))
        .collect();
    println!(
        "wrote {}: {}; bundle sha256 {}",
        b.dir.display(),
        files.join(", "),
        b.sha256
    );
    println!(
        "memory     fits {}: {} of {} usable; {} bytes to spare",
        m.profile,
        fit.needs(),
        fit.usable_bytes,
        fit.spare_bytes()
    );
    println!(
        "self-test  the board must reproduce ppl {:.4} (ctx {}, {} windows of {}); cap-device for {}",
        m.self_test.ppl, m.self_test.ctx, m.self_test.windows, m.self_test.text_name, m.rust_target
    );
    println!(
        "next       cap-host flash {} --to [user@]board[:port][:/path]",
        b.dir.display()
    );
    Ok(())
}

/// One progress bar per board on stderr when it is a terminal; hidden otherwise.
fn bars(n: usize) -> (MultiProgress, Vec<ProgressBar>) {
    let mp = if std::io::stderr().is_terminal() {
        MultiProgress::new()
    } else {
        MultiProgress::with_draw_target(ProgressDrawTarget::hidden())
    };
    let style =
        ProgressStyle::with_template("{msg:40} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
    let pbs = (0..n)
        .map(|_| {
            let pb = mp.add(ProgressBar::new(0));
            pb.set_style(style.clone());
            pb
        })
        .collect();
    (mp, pbs)
}

/// The first 12 characters of a version name (a link target read from the board,
/// so cut on a character boundary).
fn short(v: &str) -> &str {
    let v = v.trim_start_matches("versions/");
    &v[..v.floor_char_boundary(12)]
}

fn print_report(r: &FlashReport, b: &LoadedBundle) {
    let prev = r.previous.as_deref().map_or("none", short);
    if r.dry_run {
        let files: Vec<String> = r
            .files
            .iter()
            .map(|f| {
                if f.done {
                    format!("{} (already there)", f.name)
                } else if f.present_bytes > 0 {
                    format!(
                        "{} ({} of {} bytes, {} already there)",
                        f.name,
                        f.bytes - f.present_bytes,
                        f.bytes,
                        f.present_bytes
                    )
                } else {
                    format!("{} ({} bytes)", f.name, f.bytes)
                }
            })
            .collect();
        println!(
            "board {} ({}, {} bytes free): would copy {} into {}/versions/{}/, verify sha256 there, point {}/current at it (now {prev}) and run its self-test; nothing written",
            r.board,
            r.arch,
            r.free_bytes,
            files.join(", "),
            r.install_path,
            b.sha256,
            r.install_path
        );
        return;
    }
    let st = r
        .self_test
        .as_ref()
        .map_or_else(String::new, selftest_summary);
    println!(
        "board {}: PASS: {st}; installed {} ({}) at {}/current, previous {prev}; copied {} bytes",
        r.board,
        short(&r.version),
        b.manifest.profile,
        r.install_path,
        r.copied_bytes
    );
}

/// `cap-host flash`.
pub fn flash(a: FlashArgs) -> Result<()> {
    if a.status {
        return boards(a.boards);
    }
    let Some(dir) = &a.bundle else {
        bail!("flash needs a bundle folder (or --status)");
    };
    let boards = parse_boards(&a.boards)?;
    let b = bundle::load(dir)?;
    let num = |k: &str| -> Result<Option<u64>> {
        std::env::var(k)
            .ok()
            .map(|v| {
                v.trim()
                    .parse::<u64>()
                    .with_context(|| format!("{k}={v:?}"))
            })
            .transpose()
    };
    let opts = FlashOptions {
        ssh_config: a.boards.ssh_config.clone(),
        dry_run: a.dry_run,
        stop_after_bytes: num("CAP_FLASH_TEST_STOP_AFTER_BYTES")?,
        free_bytes_override: num("CAP_FLASH_TEST_FREE_BYTES")?,
    };
    let (_mp, pbs) = bars(boards.len());
    let results = per_board(&boards, "flashing", |i, ssh| {
        install::flash(ssh, &b, &opts, &pbs[i])
    });
    for pb in &pbs {
        pb.finish_and_clear();
    }
    finish(results, a.boards.json, |r| print_report(r, &b))
}

/// `e` with its causes, as `main` prints an error (`{:#}`), in one line.
fn message(e: &FlashError) -> String {
    let mut s = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        s.push_str(&format!(": {c}"));
        cause = c.source();
    }
    s
}

/// Prints the reports (text or one JSON object) and turns failures into the error
/// `main` prints: the one board's message, or how many failed (each named on stderr).
fn finish<R: serde::Serialize>(
    results: Vec<Result<R, FlashError>>,
    json: bool,
    print: impl Fn(&R),
) -> Result<()> {
    let total = results.len();
    let mut errors = vec![];
    let mut rows = vec![];
    for r in results {
        match r {
            Ok(r) => {
                if json {
                    rows.push(serde_json::to_value(&r)?);
                } else {
                    print(&r);
                }
            }
            Err(e) => {
                if json {
                    let mut v = match &e {
                        FlashError::SelfTest { report, .. } => serde_json::to_value(report)?,
                        FlashError::Board { board, .. } | FlashError::Connect { board, .. } => {
                            serde_json::json!({ "board": board })
                        }
                        _ => serde_json::json!({}),
                    };
                    v["error"] = message(&e).into();
                    rows.push(v);
                }
                errors.push(e);
            }
        }
    }
    if json {
        println!(
            "{}",
            serde_json::json!({ "boards": rows, "ok": errors.is_empty() })
        );
    }
    match errors.len() {
        0 => Ok(()),
        1 if total == 1 => Err(errors.remove(0).into()),
        n => {
            for e in &errors {
                eprintln!("error: {}", message(e));
            }
            bail!("{n} of {total} boards failed")
        }
    }
}

fn print_status(s: &BoardStatus) {
    let Some(v) = &s.version else {
        println!("board {}: nothing installed at {}", s.board, s.install_path);
        return;
    };
    let what = s.bundle.as_ref().map_or_else(String::new, |b| {
        format!(
            " (profile {}, {}, cap {}, model {})",
            b.profile, b.rust_target, b.cap_version, b.model_source
        )
    });
    let verdict = s.verdict.as_deref().unwrap_or("never run");
    let figures = s
        .self_test
        .as_ref()
        .and_then(|r| Some((r["ppl"].as_f64()?, r["stored_ppl"].as_f64())))
        .map_or_else(String::new, |(p, st)| match st {
            Some(st) => format!(" (ppl {p:.4} vs stored {st:.4})"),
            None => format!(" (ppl {p:.4})"),
        });
    println!(
        "board {}: version {}{what} at {}/current; last self-test {verdict}{figures}; previous {}",
        s.board,
        short(v),
        s.install_path,
        s.previous.as_deref().map_or("none", short)
    );
}

/// `cap-host boards` (and `flash --status`).
pub fn boards(a: BoardArgs) -> Result<()> {
    let boards = parse_boards(&a)?;
    let results = per_board(&boards, "status", |_, ssh| status::status(ssh));
    finish(results, a.json, print_status)
}

/// `f(i, board)` for every board at once, one thread each (the time is in the network
/// and on the boards); a thread that panicked is that board's error, named by `what`.
fn per_board<T: Send>(
    boards: &[Ssh],
    what: &str,
    f: impl Fn(usize, &Ssh) -> Result<T, FlashError> + Sync,
) -> Vec<Result<T, FlashError>> {
    std::thread::scope(|s| {
        let handles: Vec<_> = boards
            .iter()
            .enumerate()
            .map(|(i, ssh)| {
                let f = &f;
                s.spawn(move || f(i, ssh))
            })
            .collect();
        handles
            .into_iter()
            .zip(boards)
            .map(|(h, ssh)| {
                h.join().unwrap_or_else(|_| {
                    Err(FlashError::Board {
                        board: ssh.board.raw.clone(),
                        reason: format!("internal error (the {what} thread panicked)"),
                    })
                })
            })
            .collect()
    })
}
