//! `cap-host bundle`, `flash` and `boards` against a real OpenSSH server.
//!
//! Each test starts its own `/usr/sbin/sshd` on 127.0.0.1 and a free port, with a host
//! key and a client key made here by `ssh-keygen`, and reaches it through a generated
//! client config (`--ssh-config`): that sshd and this machine are "the board", which
//! runs the bundle built for the host's own target (the x86-64 `cap-device` of this
//! workspace). The install path lies in the test's temporary folder; the tests check
//! that nothing is written beside it. A guard kills sshd when the test ends, failed or
//! not. Without sshd the tests print `SKIPPED` and pass, unless `CAP_REQUIRE_SSHD=1`
//! (CI) makes that a failure.
//!
//! Interruption is simulated with `CAP_FLASH_TEST_STOP_AFTER_BYTES` (a test seam: the
//! copy stops after that many bytes, as a dropped connection would leave it); damage
//! by flipping a byte of the `.partial` file on the board between two runs; a full
//! disk with `CAP_FLASH_TEST_FREE_BYTES` (a test seam overriding what `df` reports).

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{cap_device, restamped, root};

const SSHD: &str = "/usr/sbin/sshd";

/// An sshd acting as a board; killed on drop.
struct Board {
    dir: tempfile::TempDir,
    sshd: Child,
    port: u16,
}

impl Drop for Board {
    fn drop(&mut self) {
        let _ = self.sshd.kill();
        let _ = self.sshd.wait();
    }
}

fn keygen(path: &Path) {
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "cap-test", "-f"])
        .arg(path)
        .status()
        .expect("run ssh-keygen");
    assert!(st.success(), "ssh-keygen failed");
}

fn user() -> String {
    let o = Command::new("id").arg("-un").output().expect("run id");
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

impl Board {
    /// Starts sshd, or `None` (and a SKIPPED line) when it is not installed.
    fn start() -> Option<Board> {
        if !Path::new(SSHD).exists() {
            let required = std::env::var_os("CAP_REQUIRE_SSHD").is_some_and(|v| v == "1");
            assert!(
                !required,
                "CAP_REQUIRE_SSHD=1 but {SSHD} is missing (apt-get install openssh-server)"
            );
            eprintln!("SKIPPED: {SSHD} is not installed (apt-get install openssh-server)");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        keygen(&d.join("host_key"));
        keygen(&d.join("client_key"));
        keygen(&d.join("other_key"));
        keygen(&d.join("other_host_key"));
        std::fs::copy(d.join("client_key.pub"), d.join("authorized_keys")).unwrap();
        // As root, sshd wants its privilege separation folder.
        if user() == "root" {
            let _ = std::fs::create_dir_all("/run/sshd");
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let cfg = d.join("sshd_config");
        std::fs::write(
            &cfg,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {hk}\nAuthorizedKeysFile {ak}\n\
                 StrictModes no\nUsePAM no\nPidFile {pid}\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nPubkeyAuthentication yes\n\
                 PermitRootLogin prohibit-password\n",
                hk = d.join("host_key").display(),
                ak = d.join("authorized_keys").display(),
                pid = d.join("sshd.pid").display(),
            ),
        )
        .unwrap();
        let log = std::fs::File::create(d.join("sshd.log")).unwrap();
        let mut sshd = Command::new(SSHD)
            .args(["-D", "-e", "-f"])
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start sshd");
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(st)) = sshd.try_wait() {
                panic!(
                    "sshd exited ({st}): {}",
                    std::fs::read_to_string(d.join("sshd.log")).unwrap_or_default()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "sshd did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        std::fs::create_dir_all(d.join("board")).unwrap();
        let b = Board { dir, sshd, port };
        b.client_config("ssh_config", "client_key", "host_key.pub");
        b.client_config(
            "ssh_config_wrong_hostkey",
            "client_key",
            "other_host_key.pub",
        );
        b.client_config("ssh_config_wrong_key", "other_key", "host_key.pub");
        Some(b)
    }

    /// Writes a client config naming the board `board`, logging in with `key` and
    /// trusting only `known` as its host key.
    fn client_config(&self, name: &str, key: &str, known: &str) {
        let d = self.dir.path();
        let pubkey = std::fs::read_to_string(d.join(known)).unwrap();
        let kh = d.join(format!("{name}.known_hosts"));
        std::fs::write(&kh, format!("board {pubkey}")).unwrap();
        std::fs::write(
            d.join(name),
            format!(
                "Host board\n  HostName 127.0.0.1\n  Port {}\n  User {}\n  IdentityFile {}\n  \
                 IdentitiesOnly yes\n  IdentityAgent none\n  HostKeyAlias board\n  \
                 UserKnownHostsFile {}\n  GlobalKnownHostsFile /dev/null\n  StrictHostKeyChecking yes\n",
                self.port,
                user(),
                d.join(key).display(),
                kh.display()
            ),
        )
        .unwrap();
    }

    fn config(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// The install path on the board (inside the test's folder).
    fn install(&self) -> PathBuf {
        self.dir.path().join("board/cap")
    }

    /// The folder `bundle`'s version is installed in on the board.
    fn version_dir(&self, bundle: &Path) -> PathBuf {
        self.install().join("versions").join(bundle_sha(bundle))
    }

    /// `--to` for the install path.
    fn to(&self) -> String {
        format!("board:{}", self.install().display())
    }

    /// Runs `cap-host flash|boards ARGS --ssh-config CONFIG` with `envs`.
    fn run(&self, config: &str, envs: &[(&str, &str)], args: &[&str]) -> (i32, String, String) {
        let cfg = self.config(config);
        let mut a: Vec<&str> = args.to_vec();
        a.extend(["--ssh-config", &cfg]);
        let envs: Vec<(&str, &std::ffi::OsStr)> = envs
            .iter()
            .map(|(k, v)| (*k, std::ffi::OsStr::new(*v)))
            .collect();
        common::cap_host_with(&envs, &a)
    }

    fn flash(&self, bundle: &Path, envs: &[(&str, &str)]) -> (i32, String, String) {
        let b = bundle.display().to_string();
        self.run(
            "ssh_config",
            envs,
            &["flash", &b, "--to", &self.to(), "--json"],
        )
    }

    /// Where `current` points (`versions/<sha>`), if anywhere.
    fn link(&self, name: &str) -> Option<String> {
        std::fs::read_link(self.install().join(name))
            .ok()
            .map(|p| p.display().to_string())
    }
}

/// The one line of a clean failure (exit 1, one line on stderr, no panic).
fn one_line_failure((code, out, err): (i32, String, String)) -> String {
    assert_eq!(code, 1, "expected exit 1; stdout {out}; stderr {err}");
    assert!(!err.contains("panicked"), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line: {err}");
    lines[0].to_string()
}

/// Damages the file at `path` on the "board": byte `at` XOR `mask`, same size.
fn flip(path: &Path, at: usize, mask: u8) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at] ^= mask;
    std::fs::write(path, bytes).unwrap();
}

fn sha256(path: &Path) -> String {
    use sha2::{Digest, Sha256};
    let bytes = std::fs::read(path).unwrap();
    Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn bundle_sha(bundle: &Path) -> String {
    sha256(&bundle.join("bundle.json"))
}

/// The tiny tied llama compressed at `ratio` into `dir/NAME.cap` (a stored self-test
/// figure and its text).
fn compressed(dir: &Path, name: &str, ratio: &str) -> PathBuf {
    let calib = common::calib_text(dir);
    let out = dir.join(format!("{name}.cap"));
    let o = out.display().to_string();
    let mut a = vec![
        "compress",
        "--model",
        "",
        "-o",
        &o,
        "--calib",
        &calib,
        "--no-source-eval",
        "--ratio",
        ratio,
        "--method",
        "wanda",
    ];
    let model = common::tiny("llama-tied");
    a[2] = &model;
    a.extend(common::SMALL_EVAL);
    let (code, _, err) = common::cap_host(&a);
    assert_eq!(code, 0, "compress failed: {err}");
    out
}

/// `cap-host bundle CAP --target TARGET -o dir/NAME --device-bin DEVICE`.
fn bundle(cap: &Path, target: &str, dir: &Path, name: &str, device: &Path) -> PathBuf {
    let out = dir.join(name);
    let (code, _, err) = common::cap_host(&[
        "bundle",
        &cap.display().to_string(),
        "--target",
        target,
        "-o",
        &out.display().to_string(),
        "--device-bin",
        &device.display().to_string(),
    ]);
    assert_eq!(code, 0, "bundle failed: {err}");
    out
}

/// Asserts that the board's `versions/<sha>` holds exactly the bundle's files, byte for
/// byte (by sha256), plus the self-test's log and verdict.
fn assert_installed(board: &Board, bundle: &Path) {
    let v = board.version_dir(bundle);
    for f in ["model.cap", "cap-device", "run.sh", "bundle.json"] {
        assert_eq!(sha256(&v.join(f)), sha256(&bundle.join(f)), "{f}");
    }
    let mut names: Vec<String> = std::fs::read_dir(&v)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            ".verdict",
            "bundle.json",
            "cap-device",
            "model.cap",
            "run.sh",
            "selftest.log"
        ]
    );
}

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// Top-level names in the login user's home (the board user is this user).
fn home_listing() -> Vec<String> {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    let mut v: Vec<String> = std::fs::read_dir(home)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The tiny model in two different compressions, bundled for this machine.
fn two_bundles(dir: &Path) -> (PathBuf, PathBuf) {
    let dev = cap_device();
    let a = compressed(dir, "a", "0.5");
    let b = compressed(dir, "b", "0.3");
    (
        bundle(&a, "host", dir, "bundle-a", &dev),
        bundle(&b, "host", dir, "bundle-b", &dev),
    )
}

#[test]
fn flash_installs_then_switches_keeping_previous() {
    let Some(board) = Board::start() else { return };
    let work = tempfile::tempdir().unwrap();
    let (ba, bb) = two_bundles(work.path());
    let home_before = home_listing();

    let (code, out, err) = board.flash(&ba, &[]);
    assert_eq!(code, 0, "{err}");
    let r = &json(&out)["boards"][0];
    assert_eq!(r["self_test"]["pass"], true, "{r}");
    assert_eq!(r["self_test"]["report"]["pass"], true, "{r}");
    assert_eq!(r["arch"], "x86_64");
    assert_eq!(r["version"], bundle_sha(&ba));
    assert_installed(&board, &ba);
    let va = format!("versions/{}", bundle_sha(&ba));
    assert_eq!(board.link("current").as_deref(), Some(va.as_str()));
    assert_eq!(board.link("previous"), None);
    let verdict = board.install().join(&va).join(".verdict");
    assert_eq!(std::fs::read_to_string(verdict).unwrap().trim(), "pass");

    // A second, different file: a new version beside the first, `previous` kept.
    let (code, out, err) = board.flash(&bb, &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(json(&out)["boards"][0]["previous"], va.as_str());
    assert_installed(&board, &bb);
    assert_installed(&board, &ba);
    let vb = format!("versions/{}", bundle_sha(&bb));
    assert_eq!(board.link("current").as_deref(), Some(vb.as_str()));
    assert_eq!(board.link("previous").as_deref(), Some(va.as_str()));

    // Flashing the same bundle again copies nothing and passes again.
    let (code, out, err) = board.flash(&bb, &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(json(&out)["boards"][0]["copied_bytes"], 0);
    assert_eq!(board.link("previous").as_deref(), Some(va.as_str()));

    // `boards` (and `flash --status`) report the installed version and verdict.
    let (code, out, err) = board.run(
        "ssh_config",
        &[],
        &["boards", "--to", &board.to(), "--json"],
    );
    assert_eq!(code, 0, "{err}");
    let s = &json(&out)["boards"][0];
    assert_eq!(s["version"], bundle_sha(&bb));
    assert_eq!(s["previous"], bundle_sha(&ba));
    assert_eq!(s["verdict"], "pass");
    assert_eq!(s["bundle"]["profile"], "host");
    assert_eq!(s["bundle"]["cap_version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(s["self_test"]["pass"], true);
    let (code, out, err) = board.run(
        "ssh_config",
        &[],
        &["flash", "--status", "--to", &board.to()],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&bundle_sha(&bb)[..12]) && out.contains("last self-test pass"),
        "{out}"
    );

    // Nothing was written outside the install path: its folder holds only it, and the
    // login user's home is as it was.
    let names: Vec<_> = std::fs::read_dir(board.dir.path().join("board"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["cap"]);
    let mut top: Vec<String> = std::fs::read_dir(board.install())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    top.sort();
    assert_eq!(top, ["current", "previous", "versions"]);
    assert_eq!(home_listing(), home_before);
}

#[test]
fn interrupted_flash_resumes_to_identical_files() {
    let Some(board) = Board::start() else { return };
    let work = tempfile::tempdir().unwrap();
    let (ba, _) = two_bundles(work.path());
    let model_bytes = std::fs::metadata(ba.join("model.cap")).unwrap().len();
    let half = (model_bytes / 2).to_string();
    let line = one_line_failure(board.flash(&ba, &[("CAP_FLASH_TEST_STOP_AFTER_BYTES", &half)]));
    assert!(
        line.contains("stopped after") && line.contains("model.cap"),
        "{line}"
    );
    let v = board.version_dir(&ba);
    assert_eq!(
        std::fs::metadata(v.join("model.cap.partial"))
            .unwrap()
            .len(),
        model_bytes / 2
    );
    assert_eq!(board.link("current"), None, "nothing switched");

    // The rerun copies only the rest and ends with identical files.
    let (code, out, err) = board.flash(&ba, &[]);
    assert_eq!(code, 0, "{err}");
    let r = &json(&out)["boards"][0];
    let total: u64 = ["model.cap", "cap-device", "run.sh", "bundle.json"]
        .iter()
        .map(|f| std::fs::metadata(ba.join(f)).unwrap().len())
        .sum();
    assert_eq!(r["copied_bytes"], total - model_bytes / 2);
    assert_installed(&board, &ba);
    assert_eq!(r["self_test"]["pass"], true);
}

#[test]
fn a_byte_flipped_on_the_board_is_caught_and_nothing_switches() {
    let Some(board) = Board::start() else { return };
    let work = tempfile::tempdir().unwrap();
    let (ba, bb) = two_bundles(work.path());
    assert_eq!(board.flash(&ba, &[]).0, 0);
    let va = format!("versions/{}", bundle_sha(&ba));

    // B stops halfway through its model; the copied half is then damaged on the board.
    let half = (std::fs::metadata(bb.join("model.cap")).unwrap().len() / 2).to_string();
    one_line_failure(board.flash(&bb, &[("CAP_FLASH_TEST_STOP_AFTER_BYTES", &half)]));
    let partial = board.version_dir(&bb).join("model.cap.partial");
    flip(&partial, 100, 0x40);

    let line = one_line_failure(board.flash(&bb, &[]));
    assert!(
        line.contains("checksum mismatch")
            && line.contains("model.cap")
            && line.contains("nothing switched"),
        "{line}"
    );
    assert_eq!(board.link("current").as_deref(), Some(va.as_str()));
    assert!(!partial.exists(), "the damaged copy is removed");

    // The next run copies it afresh and installs B.
    let (code, _, err) = board.flash(&bb, &[]);
    assert_eq!(code, 0, "{err}");
    assert_installed(&board, &bb);
    assert_eq!(board.link("previous").as_deref(), Some(va.as_str()));

    // A finished file damaged later (same size) is caught by the check before the
    // switch, removed, and copied again by the next run.
    let model = board.version_dir(&bb).join("model.cap");
    flip(&model, 200, 0x01);
    let line = one_line_failure(board.flash(&bb, &[]));
    assert!(
        line.contains("checksum mismatch") && line.contains("damaged: model.cap"),
        "{line}"
    );
    assert!(!model.exists());
    let (code, out, err) = board.flash(&bb, &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        json(&out)["boards"][0]["copied_bytes"],
        std::fs::metadata(bb.join("model.cap")).unwrap().len()
    );
    assert_installed(&board, &bb);
}

#[test]
fn a_failing_self_test_rolls_back() {
    let Some(board) = Board::start() else { return };
    let work = tempfile::tempdir().unwrap();
    let (ba, _) = two_bundles(work.path());
    // The same model with its stored figure 1.5 times too high: selftest exits 1.
    let bad = work.path().join("bad.cap");
    restamped(&ba.join("model.cap"), &bad, |m| {
        let p = m.compression.as_mut().unwrap().perplexity.as_mut().unwrap();
        p.value *= 1.5;
    });
    let bc = bundle(&bad, "host", work.path(), "bundle-bad", &cap_device());

    // On a fresh board: `current` is removed again.
    let line = one_line_failure(board.flash(&bc, &[]));
    assert!(
        line.contains("self-test failed") && line.contains("rolled back to nothing"),
        "{line}"
    );
    assert_eq!(board.link("current"), None);

    assert_eq!(board.flash(&ba, &[]).0, 0);
    let va = format!("versions/{}", bundle_sha(&ba));
    let (code, out, err) = board.flash(&bc, &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&format!("rolled back to {va}")), "{err}");
    let r = &json(&out)["boards"][0];
    assert_eq!(r["rolled_back"], true);
    assert_eq!(r["self_test"]["pass"], false);
    assert_eq!(r["self_test"]["exit_code"], 1);
    let stored = r["self_test"]["report"]["stored_ppl"].as_f64().unwrap();
    let ppl = r["self_test"]["report"]["ppl"].as_f64().unwrap();
    assert!((stored / ppl - 1.5).abs() < 1e-3, "{r}");
    assert_eq!(board.link("current").as_deref(), Some(va.as_str()));
    assert_eq!(board.link("previous"), None);
    let verdict = board.version_dir(&bc).join(".verdict");
    assert_eq!(
        std::fs::read_to_string(verdict).unwrap().trim(),
        "fail exit 1"
    );
    let (code, out, _) = board.run(
        "ssh_config",
        &[],
        &["boards", "--to", &board.to(), "--json"],
    );
    assert_eq!(code, 0);
    assert_eq!(json(&out)["boards"][0]["version"], bundle_sha(&ba));
}

/// A file that starts like an aarch64 ELF executable (`bundle` reads only the header).
fn fake_aarch64_binary(path: &Path) {
    let mut h = vec![0u8; 64];
    h[..4].copy_from_slice(b"\x7fELF");
    h[4] = 2; // 64-bit
    h[5] = 1; // little-endian
    h[6] = 1;
    h[18..20].copy_from_slice(&183u16.to_le_bytes()); // EM_AARCH64
    std::fs::write(path, h).unwrap();
}

#[test]
fn refusals_leave_the_board_unchanged() {
    let Some(board) = Board::start() else { return };
    let work = tempfile::tempdir().unwrap();
    let (ba, _) = two_bundles(work.path());
    let install = board.install();

    // Not enough free space: refused before anything is created.
    let line = one_line_failure(board.flash(&ba, &[("CAP_FLASH_TEST_FREE_BYTES", "1000")]));
    assert!(
        line.contains("not enough free space") && line.contains("1000 free"),
        "{line}"
    );
    assert!(!install.exists());

    // An aarch64 bundle to this x86-64 board: refused after `uname -m`.
    let arm = work.path().join("cap-device-aarch64");
    fake_aarch64_binary(&arm);
    let a = compressed(work.path(), "arm", "0.5");
    let barm = bundle(&a, "raspberry-pi-5-8gb", work.path(), "bundle-arm", &arm);
    let line = one_line_failure(board.flash(&barm, &[]));
    assert!(
        line.contains("the board is x86_64 (uname -m)")
            && line.contains("aarch64-unknown-linux-gnu"),
        "{line}"
    );
    assert!(!install.exists());

    // A host key other than the one known, and a key the board does not accept.
    let b = ba.display().to_string();
    let to = board.to();
    let line =
        one_line_failure(board.run("ssh_config_wrong_hostkey", &[], &["flash", &b, "--to", &to]));
    assert!(line.contains("host key verification failed"), "{line}");
    let line =
        one_line_failure(board.run("ssh_config_wrong_key", &[], &["flash", &b, "--to", &to]));
    assert!(
        line.contains("login refused") && line.contains("Permission denied"),
        "{line}"
    );
    // An unreachable board (a closed port).
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let line = one_line_failure(board.run(
        "ssh_config",
        &[],
        &[
            "flash",
            &b,
            "--to",
            &format!("board:{closed}:{}", install.display()),
        ],
    ));
    assert!(
        line.contains("cannot connect") && line.contains("refused"),
        "{line}"
    );
    assert!(!install.exists());

    // A dry run says what would go where, and writes nothing.
    let (code, out, err) = board.run("ssh_config", &[], &["flash", &b, "--to", &to, "--dry-run"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("would copy model.cap")
            && out.contains(&format!(
                "{}/versions/{}/",
                install.display(),
                bundle_sha(&ba)
            ))
            && out.contains("nothing written"),
        "{out}"
    );
    assert!(!install.exists());
    // The default install path is ~/cap.
    let (code, out, err) = board.run(
        "ssh_config",
        &[],
        &["flash", &b, "--to", "board", "--dry-run"],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("into ~/cap/versions/"), "{out}");
}

#[test]
fn bundle_contents_and_bad_input() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let dev = cap_device();
    let a = compressed(w, "a", "0.5");
    let out = w.join("bundle");
    let (code, stdout, err) = common::cap_host(&[
        "bundle",
        &a.display().to_string(),
        "--target",
        "host",
        "-o",
        &out.display().to_string(),
        "--device-bin",
        &dev.display().to_string(),
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v = json(&stdout);
    assert_eq!(v["sha256"], bundle_sha(&out));
    assert_eq!(v["rust_target"], "x86_64-unknown-linux-gnu");
    assert_eq!(v["profile"], "host");
    for f in v["files"].as_array().unwrap() {
        let p = out.join(f["name"].as_str().unwrap());
        assert_eq!(f["sha256"], sha256(&p));
        assert_eq!(f["bytes"], std::fs::metadata(&p).unwrap().len());
    }
    assert_eq!(sha256(&out.join("model.cap")), sha256(&a));
    assert_eq!(sha256(&out.join("cap-device")), sha256(&dev));
    // The stored self-test figure, as `inspect` reads it.
    let (_, info, _) = common::cap_host(&["inspect", &a.display().to_string(), "--json"]);
    assert_eq!(
        v["self_test"]["ppl"],
        json(&info)["compression"]["perplexity"]
    );
    assert!(v["memory"]["spare_bytes"].as_i64().unwrap() > 0);
    // run.sh runs the self-test by default, and passes its arguments on.
    let st = Command::new(out.join("run.sh")).output().unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let st = Command::new(out.join("run.sh"))
        .args(["info", "model.cap", "--json"])
        .output()
        .unwrap();
    assert!(st.status.success());
    // A temporary folder a SIGKILLed run left (its PID is gone) is removed by the next
    // run writing the same bundle; nothing but the bundle is left beside it.
    let stale = w.join("bundle.tmp-4294967");
    std::fs::create_dir(&stale).unwrap();
    std::fs::write(stale.join("model.cap"), "half").unwrap();
    let (code, _, err) = common::cap_host(&[
        "bundle",
        &a.display().to_string(),
        "--target",
        "host",
        "-o",
        &out.display().to_string(),
        "--device-bin",
        &dev.display().to_string(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(!stale.exists());
    assert_eq!(
        bundle_sha(&out),
        v["sha256"],
        "the same inputs, the same bundle"
    );
    let names: Vec<_> = std::fs::read_dir(w)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("bundle"))
        .collect();
    assert_eq!(names, ["bundle"]);

    let s = |p: &Path| p.display().to_string();
    let profiles = w.join("profiles");
    std::fs::create_dir(&profiles).unwrap();
    common::write_profile(&profiles, "tiny-board", 40 << 20, 20 << 20);
    let arm = w.join("arm-bin");
    fake_aarch64_binary(&arm);
    let cases: Vec<(Vec<String>, Vec<&str>, &str)> = vec![
        (
            vec!["--target".into(), "no-such-board".into()],
            vec![],
            "unknown target `no-such-board`",
        ),
        (
            vec![
                "--target".into(),
                "tiny-board".into(),
                "--targets-dir".into(),
                s(&profiles),
            ],
            vec![],
            "does not fit tiny-board",
        ),
        (
            vec![
                "--target".into(),
                "jetson-orin-nano-8gb".into(),
                "--device-bin".into(),
                s(&dev),
            ],
            vec![],
            "is built for x86_64, but target jetson-orin-nano-8gb needs aarch64-unknown-linux-gnu",
        ),
        (
            vec![
                "--target".into(),
                "host".into(),
                "--device-bin".into(),
                s(&arm),
            ],
            vec![],
            "is built for aarch64",
        ),
        (
            vec![
                "--target".into(),
                "host".into(),
                "--device-bin".into(),
                s(&a),
            ],
            vec![],
            "not a 64-bit little-endian ELF executable",
        ),
    ];
    for (extra, _, needle) in cases {
        let bad_out = w.join("bad-bundle");
        let mut args = vec!["bundle".to_string(), s(&a), "-o".into(), s(&bad_out)];
        args.extend(extra);
        let line = one_line_failure(common::cap_host(
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        ));
        assert!(line.contains(needle), "{line}");
        assert!(!bad_out.exists());
    }
    // A packed file has no self-test figure to reproduce.
    let packed = w.join("p.cap");
    let (c, _, e) = common::cap_host(&[
        "pack",
        "--model",
        &common::tiny("llama-tied"),
        "-o",
        &s(&packed),
    ]);
    assert_eq!(c, 0, "{e}");
    let line = one_line_failure(common::cap_host(&[
        "bundle",
        &s(&packed),
        "--target",
        "host",
        "-o",
        &s(&w.join("x")),
        "--device-bin",
        &s(&dev),
    ]));
    assert!(line.contains("no stored self-test figure"), "{line}");
    // A missing cross linker or cargo is named (PATH without them; nothing is built).
    // (`CARGO` is the toolchain's own cargo, in a folder without rustup or gcc; a fake
    // rustup lists only the x86-64 standard library.)
    let cargo_dir = PathBuf::from(env!("CARGO")).parent().unwrap().to_path_buf();
    let fake = w.join("fake-rustup");
    std::fs::create_dir(&fake).unwrap();
    std::fs::write(
        fake.join("rustup"),
        "#!/bin/sh\necho x86_64-unknown-linux-gnu\n",
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(fake.join("rustup"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
    }
    let with_fake = std::env::join_paths([&fake, &cargo_dir]).unwrap();
    for (path, needle) in [
        (cargo_dir.clone(), "the cross linker aarch64-linux-gnu-gcc"),
        (
            PathBuf::from(with_fake),
            "the Rust target aarch64-unknown-linux-gnu is not installed: rustup target add aarch64-unknown-linux-gnu",
        ),
        (w.join("empty"), "cargo is not installed"),
    ] {
        let line = one_line_failure(common::cap_host_with(
            &[
                ("PATH", path.as_os_str()),
                ("CARGO", std::ffi::OsStr::new("cargo")),
            ],
            &[
                "bundle",
                &s(&a),
                "--target",
                "jetson-orin-nano-8gb",
                "-o",
                &s(&w.join("y")),
            ],
        ));
        assert!(line.contains(needle), "{line}");
    }
    // One board twice (two threads would race on its install path); a bad --to.
    let line = one_line_failure(common::cap_host(&[
        "flash",
        &s(&out),
        "--to",
        "board:/x",
        "--to",
        "board:/x",
        "--dry-run",
    ]));
    assert!(line.contains("--to board:/x is given twice"), "{line}");
    let line = one_line_failure(common::cap_host(&[
        "flash",
        &s(&out),
        "--to",
        "board:relative",
    ]));
    assert!(
        line.contains("the install path must start with / or ~"),
        "{line}"
    );
    // Not a bundle.
    let line = one_line_failure(common::cap_host(&[
        "flash",
        &s(w),
        "--to",
        "board",
        "--dry-run",
    ]));
    assert!(line.contains("not a bundle"), "{line}");
    // A bundle damaged on the host is not sent anywhere.
    std::fs::write(out.join("run.sh"), "#!/bin/sh\nexit 0\n").unwrap();
    let line = one_line_failure(common::cap_host(&[
        "flash",
        &s(&out),
        "--to",
        "board",
        "--dry-run",
    ]));
    assert!(line.contains("the bundle is damaged"), "{line}");
    let _ = root();
}

/// The aarch64 bundle, checked the way CI checks the other aarch64 code: when the
/// board binary is built (`.ci/run` builds it before the tests), `bundle` for a Jetson
/// runs cargo itself (no `--device-bin`: the real build path, up to date by then) and
/// the bundled binary passes the file's self-test under qemu-aarch64. Without the
/// binary or qemu this skips, unless `CAP_REQUIRE_QEMU=1` (CI).
#[test]
fn aarch64_bundle_passes_its_self_test_under_qemu() {
    let host = PathBuf::from(env!("CARGO_BIN_EXE_cap-host"));
    let target_dir = host
        .parent()
        .and_then(Path::parent)
        .map_or_else(|| root().join("target"), Path::to_path_buf);
    let built = target_dir.join("aarch64-unknown-linux-gnu/release/cap-device");
    let qemu = Command::new("qemu-aarch64")
        .arg("--version")
        .output()
        .is_ok();
    let required = std::env::var_os("CAP_REQUIRE_QEMU").is_some_and(|v| v == "1");
    if !built.exists() || !qemu {
        assert!(
            !required,
            "CAP_REQUIRE_QEMU=1 but {} is not built or qemu-aarch64 is missing",
            built.display()
        );
        eprintln!(
            "SKIPPED: aarch64 bundle: {} not built (cargo build --release -p cap-device --target aarch64-unknown-linux-gnu) or no qemu-aarch64",
            built.display()
        );
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let a = compressed(work.path(), "a", "0.5");
    let out = work.path().join("bundle-jetson");
    let (code, stdout, err) = common::cap_host(&[
        "bundle",
        &a.display().to_string(),
        "--target",
        "jetson-orin-nano-8gb",
        "-o",
        &out.display().to_string(),
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v = json(&stdout);
    assert_eq!(v["rust_target"], "aarch64-unknown-linux-gnu");
    assert_eq!(sha256(&out.join("cap-device")), sha256(&built));
    let run = Command::new("qemu-aarch64")
        .args(["-L", "/usr/aarch64-linux-gnu"])
        .arg(out.join("cap-device"))
        .args(["selftest", "--json"])
        .arg(out.join("model.cap"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{err}");
    let r = json(&String::from_utf8_lossy(&run.stdout));
    assert_eq!(r["pass"], true, "{r}");
    assert_eq!(r["kernels"], "neon");
}

/// `bundle --cross` names what it lacks in one line, in the order cross needs it:
/// `cross` itself, then a container engine, then one that answers (`docker info`);
/// nothing is written. PATH holds only the test's stand-ins (shell scripts), so the
/// machine's own tools cannot mask a case.
#[test]
fn bundle_with_cross_names_the_missing_piece() {
    use std::os::unix::fs::PermissionsExt;
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let a = compressed(w, "a", "0.5");
    let bin = w.join("bin");
    std::fs::create_dir(&bin).unwrap();
    let script = |name: &str, body: &str| {
        let p = bin.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    let out = w.join("bundle");
    let run = || {
        let args = [
            "bundle",
            &a.display().to_string(),
            "--target",
            "host",
            "-o",
            &out.display().to_string(),
            "--cross",
        ]
        .map(String::from);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        one_line_failure(common::cap_host_with(
            &[
                ("PATH", bin.as_os_str()),
                ("CROSS_CONTAINER_ENGINE", std::ffi::OsStr::new("")),
            ],
            &refs,
        ))
    };
    // An empty CROSS_CONTAINER_ENGINE is treated as unset, as cross does.
    let line = run();
    assert!(line.contains("cross is not installed"), "{line}");
    script("cross", "exit 0");
    let line = run();
    assert!(line.contains("neither docker nor podman"), "{line}");
    script("docker", "exit 1");
    let line = run();
    assert!(line.contains("`docker info` fails"), "{line}");
    assert!(!out.exists());
}

/// Several `--to` in one run flash every board (two install paths behind the one sshd
/// stand in for two boards), each reported, each with the bundle's files byte for byte
/// and its own passing self-test.
#[test]
fn several_boards_in_one_run() {
    let Some(board) = Board::start() else { return };
    let work = tempfile::tempdir().unwrap();
    let (ba, _) = two_bundles(work.path());
    let second = board.dir.path().join("board2/cap");
    let to2 = format!("board:{}", second.display());
    let b = ba.display().to_string();
    let (code, out, err) = board.run(
        "ssh_config",
        &[],
        &["flash", &b, "--to", &board.to(), "--to", &to2, "--json"],
    );
    assert_eq!(code, 0, "{err}");
    let v = json(&out);
    let reports = v["boards"].as_array().unwrap();
    assert_eq!(reports.len(), 2, "{v}");
    for r in reports {
        assert_eq!(r["self_test"]["pass"], true, "{r}");
        assert_eq!(r["version"], bundle_sha(&ba));
    }
    assert_installed(&board, &ba);
    let v2 = second.join("versions").join(bundle_sha(&ba));
    for f in ["model.cap", "cap-device", "run.sh", "bundle.json"] {
        assert_eq!(sha256(&v2.join(f)), sha256(&ba.join(f)), "{f}");
    }
}
