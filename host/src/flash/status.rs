//! `cap-host boards`: what a board has installed (read only).
//!
//! Reads the `current` and `previous` links under the install path, the current
//! version's `bundle.json` and the verdict and report its last self-test left
//! (`.verdict`, `selftest.log`, written by [`super::install::flash`]).

use serde::Serialize;

use super::bundle::BundleManifest;
use super::remote::Ssh;
use super::{FlashError, Result};

/// What one board has installed.
#[derive(Clone, Debug, Serialize)]
pub struct BoardStatus {
    /// The board as given.
    pub board: String,
    /// The install path.
    pub install_path: String,
    /// The current version (bundle sha256), if any.
    pub version: Option<String>,
    /// The previous version, if any.
    pub previous: Option<String>,
    /// The current bundle's manifest, when it could be read.
    pub bundle: Option<BundleManifest>,
    /// The last self-test verdict (`pass`, `fail exit N`), if one ran.
    pub verdict: Option<String>,
    /// The last self-test's `--json` report, if it printed one.
    pub self_test: Option<serde_json::Value>,
}

/// The version name in a link target `versions/<sha>`.
fn version_of(link: &str) -> Option<String> {
    let v = link.trim().trim_start_matches("versions/");
    (!v.is_empty()).then(|| v.to_string())
}

/// Reads what the board `ssh` reaches has installed under its install path.
pub fn status(ssh: &Ssh) -> Result<BoardStatus> {
    let script = format!(
        r#"P={}
cur=$(readlink "$P/current" 2>/dev/null)
echo "current $cur"
echo "previous $(readlink "$P/previous" 2>/dev/null)"
if [ -n "$cur" ]; then
  echo "verdict $(cat "$P/$cur/.verdict" 2>/dev/null)"
  echo "log $(grep '^{{' "$P/$cur/selftest.log" 2>/dev/null | head -n 1)"
  echo "bundle $(tr -d '\n' < "$P/$cur/bundle.json" 2>/dev/null)"
fi
"#,
        ssh.board.path.shell()
    );
    let o = ssh.script_ok(&script, "reading the install path")?;
    let mut s = BoardStatus {
        board: ssh.board.raw.clone(),
        install_path: ssh.board.path.to_string(),
        version: None,
        previous: None,
        bundle: None,
        verdict: None,
        self_test: None,
    };
    for line in o.stdout.lines() {
        let (key, rest) = line.split_once(' ').unwrap_or((line, ""));
        let rest = rest.trim();
        match key {
            "current" => s.version = version_of(rest),
            "previous" => s.previous = version_of(rest),
            "verdict" if !rest.is_empty() => s.verdict = Some(rest.to_string()),
            "log" => s.self_test = serde_json::from_str(rest).ok(),
            "bundle" => s.bundle = serde_json::from_str(rest).ok(),
            _ => {}
        }
    }
    if s.version.is_some() && s.bundle.is_none() {
        return Err(FlashError::Board {
            board: ssh.board.raw.clone(),
            reason: format!(
                "{}/current has no readable bundle.json; flash a bundle again",
                s.install_path
            ),
        });
    }
    Ok(s)
}
