//! Boards and the commands run on them.
//!
//! A board is named `[user@]host[:port][:/path]` ([`BoardSpec::parse`]). Commands run
//! through the system OpenSSH client (`ssh`), not an SSH library: the user's
//! `~/.ssh/config` (aliases, `ProxyJump`, per-host keys), their agent, hardware keys
//! and `known_hosts` then work exactly as they do for `ssh` itself, with nothing for
//! cap to re-implement or get subtly different. `BatchMode=yes` makes every prompt
//! (password, unknown host key) a failure instead of a hang, since flashing runs
//! several boards at once with progress bars on the terminal.
//!
//! Control steps are POSIX `sh` scripts sent on `ssh`'s standard input (`sh -s`), so
//! the board's login shell (bash, dash, zsh, fish) does not matter and nothing needs
//! quoting twice; data goes through `cat >> FILE` with the bytes on standard input.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::{FlashError, Result};

/// Where on the board cap installs: under the login user's home, or an absolute path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InstallPath {
    /// Relative to the login user's `$HOME` (`~/cap` is `Home("cap")`).
    Home(String),
    /// An absolute path.
    Absolute(String),
}

impl InstallPath {
    /// The path as a POSIX shell word (`"$HOME"/'cap'`): single-quoted, so no name can
    /// inject a command.
    pub fn shell(&self) -> String {
        match self {
            InstallPath::Home(rel) if rel.is_empty() => "\"$HOME\"".into(),
            InstallPath::Home(rel) => format!("\"$HOME\"/{}", quote(rel)),
            InstallPath::Absolute(p) => quote(p),
        }
    }
}

impl std::fmt::Display for InstallPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InstallPath::Home(rel) if rel.is_empty() => f.write_str("~"),
            InstallPath::Home(rel) => write!(f, "~/{rel}"),
            InstallPath::Absolute(p) => f.write_str(p),
        }
    }
}

/// `s` as one single-quoted POSIX shell word.
pub fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The default install path on a board.
pub const DEFAULT_INSTALL_PATH: &str = "~/cap";

/// A board as named on the command line: `[user@]host[:port][:/path]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BoardSpec {
    /// The text as given (used in every message about the board).
    pub raw: String,
    /// Login user; `None` leaves it to ssh (its config, then the local user).
    pub user: Option<String>,
    /// Host name, address or `~/.ssh/config` alias.
    pub host: String,
    /// Port; `None` leaves it to ssh.
    pub port: Option<u16>,
    /// Install path on the board.
    pub path: InstallPath,
}

impl BoardSpec {
    /// Parses `[user@]host[:port][:/path]` (the path may also be `~` or `~/…`; default
    /// [`DEFAULT_INSTALL_PATH`]). IPv6 literals are not accepted: name them in
    /// `~/.ssh/config`.
    pub fn parse(raw: &str) -> Result<Self> {
        let bad = |why: &str| {
            FlashError::Invalid(format!(
                "--to {raw:?}: {why} (expected [user@]host[:port][:/path])"
            ))
        };
        if raw.chars().any(|c| c.is_control()) {
            return Err(bad("control characters"));
        }
        let (user, rest) = match raw.split_once('@') {
            Some((u, r)) if !u.is_empty() && !u.contains(':') => (Some(u.to_string()), r),
            Some(_) => return Err(bad("empty user")),
            None => (None, raw),
        };
        let (host, mut rest) = rest.split_once(':').unwrap_or((rest, ""));
        // A host starting with '-' would be read by ssh as an option.
        if host.is_empty() || host.starts_with('-') || host.contains(char::is_whitespace) {
            return Err(bad("bad host name"));
        }
        let mut port = None;
        let first = rest.split(':').next().unwrap_or("");
        if !first.is_empty() && first.bytes().all(|b| b.is_ascii_digit()) {
            port = Some(
                first
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or_else(|| bad("port out of range"))?,
            );
            rest = rest[first.len()..].strip_prefix(':').unwrap_or("");
        }
        let path = if rest.is_empty() {
            InstallPath::Home(DEFAULT_INSTALL_PATH[2..].into())
        } else if rest == "~" {
            InstallPath::Home(String::new())
        } else if let Some(rel) = rest.strip_prefix("~/") {
            InstallPath::Home(rel.trim_end_matches('/').into())
        } else if rest.starts_with('/') {
            let p = rest.trim_end_matches('/');
            if p.is_empty() {
                return Err(bad("the install path cannot be /"));
            }
            InstallPath::Absolute(p.into())
        } else {
            return Err(bad("the install path must start with / or ~"));
        };
        Ok(BoardSpec {
            raw: raw.to_string(),
            user,
            host: host.to_string(),
            port,
            path,
        })
    }
}

/// What a remote script printed, when it ran (ssh connected and the script exited).
#[derive(Clone, Debug)]
pub struct ScriptOutput {
    /// The script's exit status.
    pub code: i32,
    /// Its standard output.
    pub stdout: String,
    /// Its standard error.
    pub stderr: String,
}

impl ScriptOutput {
    /// The last non-empty line of standard error (or output), for one-line messages.
    pub fn last_line(&self) -> String {
        last_line(&self.stderr)
            .or_else(|| last_line(&self.stdout))
            .unwrap_or_else(|| format!("exit status {}", self.code))
    }
}

fn last_line(s: &str) -> Option<String> {
    s.lines()
        .map(|l| l.trim())
        .rfind(|l| !l.is_empty())
        .map(String::from)
}

/// Runs commands on one board through the system `ssh`.
#[derive(Clone, Debug)]
pub struct Ssh {
    /// The board.
    pub board: BoardSpec,
    /// `-F FILE`: an ssh config file to use instead of `~/.ssh/config`.
    pub config: Option<PathBuf>,
}

/// ssh's own exit status for connection and authentication failures (a remote command
/// exiting 255 reads the same; cap's scripts never do).
const SSH_FAILED: i32 = 255;

impl Ssh {
    /// An `ssh` invocation for `remote_command`, with the options every call shares.
    fn command(&self, remote_command: &str) -> Command {
        let mut c = Command::new("ssh");
        c.args([
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=15",
            // A board that vanishes mid-copy ends the call within a minute instead of
            // hanging on a dead TCP connection.
            "-o",
            "ServerAliveInterval=15",
            "-o",
            "ServerAliveCountMax=3",
        ]);
        if let Some(f) = &self.config {
            c.arg("-F").arg(f);
        }
        if let Some(p) = self.board.port {
            c.arg("-p").arg(p.to_string());
        }
        if let Some(u) = &self.board.user {
            c.arg("-l").arg(u);
        }
        c.arg("--").arg(&self.board.host).arg(remote_command);
        c
    }

    /// The error for a failed ssh call, from its standard error, in one line.
    fn connect_error(&self, stderr: &str) -> FlashError {
        let find = |needle: &str| {
            stderr
                .lines()
                .map(str::trim)
                .find(|l| l.contains(needle))
                .map(String::from)
        };
        let reason = if stderr.contains("Host key verification failed")
            || stderr.contains("REMOTE HOST IDENTIFICATION HAS CHANGED")
        {
            "host key verification failed: the board's host key is not the one known_hosts has for it (ssh refused to connect)".to_string()
        } else if let Some(l) = find("Permission denied") {
            format!("login refused: {l}")
        } else {
            let l = last_line(stderr).unwrap_or_else(|| "ssh failed".into());
            format!("cannot connect: {l}")
        };
        FlashError::Connect {
            board: self.board.raw.clone(),
            reason,
        }
    }

    fn spawn_error(&self, e: std::io::Error) -> FlashError {
        if e.kind() == std::io::ErrorKind::NotFound {
            FlashError::Missing(
                "ssh (the OpenSSH client) is not installed; flash uses it to reach boards (Debian: apt-get install openssh-client)".into(),
            )
        } else {
            FlashError::io("ssh", "cannot run", e)
        }
    }

    /// Runs the POSIX `sh` script `script` on the board (`sh -s`, the script on
    /// standard input) and returns what it printed. A failed connection or login is a
    /// [`FlashError::Connect`]; the script's own exit status is the caller's to judge.
    pub fn script(&self, script: &str) -> Result<ScriptOutput> {
        let mut child = self
            .command("sh -s")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| self.spawn_error(e))?;
        if let Some(mut stdin) = child.stdin.take() {
            // A connection that fails at once closes the pipe: its error is in stderr.
            let _ = stdin.write_all(script.as_bytes());
        }
        let out = child
            .wait_with_output()
            .map_err(|e| FlashError::io("ssh", "waiting for", e))?;
        let o = ScriptOutput {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        if o.code == SSH_FAILED {
            return Err(self.connect_error(&o.stderr));
        }
        Ok(o)
    }

    /// Like [`Ssh::script`], but a non-zero exit is a [`FlashError::Board`] saying
    /// `what` failed, with the script's last line.
    pub fn script_ok(&self, script: &str, what: &str) -> Result<ScriptOutput> {
        let o = self.script(script)?;
        if o.code != 0 {
            return Err(FlashError::Board {
                board: self.board.raw.clone(),
                reason: format!("{what} failed: {}", o.last_line()),
            });
        }
        Ok(o)
    }

    /// Appends bytes `offset..offset + len` of the local file `local` to the file
    /// `remote` (a shell word, see [`InstallPath::shell`]) on the board, calling
    /// `sent(bytes so far)` as it goes. Returns the bytes sent. A short count with no
    /// error is not possible: a broken connection is an error, and what reached the
    /// board stays there for the next run to continue from.
    pub fn append(
        &self,
        local: &Path,
        offset: u64,
        len: u64,
        remote: &str,
        sent: &dyn Fn(u64),
    ) -> Result<u64> {
        use std::io::Seek;
        let mut f =
            std::fs::File::open(local).map_err(|e| FlashError::io(local, "cannot open", e))?;
        f.seek(std::io::SeekFrom::Start(offset))
            .map_err(|e| FlashError::io(local, "cannot seek", e))?;
        let mut child = self
            .command(&format!("cat >> {remote}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| self.spawn_error(e))?;
        let mut done = 0u64;
        let mut write_failed = false;
        if let Some(mut stdin) = child.stdin.take() {
            let mut buf = vec![0u8; 256 << 10];
            while done < len {
                let want = (len - done).min(buf.len() as u64) as usize;
                let n = f
                    .read(&mut buf[..want])
                    .map_err(|e| FlashError::io(local, "read error", e))?;
                if n == 0 {
                    break;
                }
                if stdin.write_all(&buf[..n]).is_err() {
                    write_failed = true;
                    break;
                }
                done += n as u64;
                sent(done);
            }
            // Dropping stdin closes the pipe: `cat` sees the end and exits.
        }
        let out = child
            .wait_with_output()
            .map_err(|e| FlashError::io("ssh", "waiting for", e))?;
        let code = out.status.code().unwrap_or(-1);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if code == SSH_FAILED {
            return Err(self.connect_error(&stderr));
        }
        if code != 0 || write_failed || done < len {
            return Err(FlashError::Board {
                board: self.board.raw.clone(),
                reason: format!(
                    "copying {} stopped after {done} of {len} bytes: {}",
                    local.display(),
                    last_line(&stderr).unwrap_or_else(|| format!("exit status {code}"))
                ),
            });
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> BoardSpec {
        BoardSpec::parse(s).unwrap()
    }

    #[test]
    fn board_specs() {
        let b = p("board");
        assert_eq!((b.user, b.host.as_str(), b.port), (None, "board", None));
        assert_eq!(b.path, InstallPath::Home("cap".into()));
        let b = p("pi@10.0.0.2:2222:/opt/cap/");
        assert_eq!(b.user.as_deref(), Some("pi"));
        assert_eq!((b.host.as_str(), b.port), ("10.0.0.2", Some(2222)));
        assert_eq!(b.path, InstallPath::Absolute("/opt/cap".into()));
        let b = p("jetson:/srv/x");
        assert_eq!(
            (b.port, b.path),
            (None, InstallPath::Absolute("/srv/x".into()))
        );
        assert_eq!(p("j:22").port, Some(22));
        assert_eq!(p("j:~/models").path, InstallPath::Home("models".into()));
        for bad in [
            "",
            "@h",
            "-oProxyCommand=x",
            "h:0",
            "h:70000",
            "h:rel/path",
            "h:/",
            "a\nb",
        ] {
            assert!(BoardSpec::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn shell_words_cannot_escape_their_quotes() {
        assert_eq!(quote("a'b"), r"'a'\''b'");
        assert_eq!(InstallPath::Home("cap".into()).shell(), "\"$HOME\"/'cap'");
        assert_eq!(InstallPath::Absolute("/x y".into()).shell(), "'/x y'");
    }
}
