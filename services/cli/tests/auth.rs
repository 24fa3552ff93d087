//! Bearer tokens end to end, as a user meets them: `mip serve coordinator --tokens-file F` in a child process, and
//! `mip jobs` / `mip workers` against it with the right token (`--token` or `$MIP_TOKEN`), a wrong one and none:
//! served, or refused with a non-zero exit and one line that names the authentication failure.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};

/// `mip serve coordinator` in a child process, killed when dropped.
struct Coordinator {
    child: Child,
    url: String,
}

impl Coordinator {
    /// A memory-only coordinator over one worker nothing listens at (listing needs no worker), with `tokens`.
    fn start(tokens: &std::path::Path) -> Self {
        let dead = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        let mut child = Command::new(env!("CARGO_BIN_EXE_mip"))
            .args(["serve", "coordinator", "--listen", "127.0.0.1:0"])
            .arg("--workers")
            .arg(format!("http://{dead}"))
            .arg("--tokens-file")
            .arg(tokens)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("mip serve coordinator starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("first line");
        assert!(
            line.starts_with("coordinator listening on ") && line.contains("bearer auth"),
            "{line:?}"
        );
        let addr = line
            .split_whitespace()
            .find(|w| w.starts_with("127.0.0.1:"))
            .unwrap_or_else(|| panic!("no address in {line:?}"));
        Self {
            url: format!("http://{addr}"),
            child,
        }
    }

    /// `mip <command> --coordinator URL <args>`, with `$MIP_TOKEN` set to `env_token` or unset.
    fn mip(&self, command: &str, args: &[&str], env_token: Option<&str>) -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_mip"));
        cmd.args([command, "--coordinator", &self.url]).args(args);
        match env_token {
            Some(t) => cmd.env("MIP_TOKEN", t),
            None => cmd.env_remove("MIP_TOKEN"),
        };
        cmd.output().expect("mip runs")
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Asserts a served call: exit 0 and `{"jobs": [...]}` (or the worker list) on stdout.
fn served(o: &Output, what: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{what}: {err}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{what}: {e}: {err}"));
    assert!(v.is_object() || v.is_array(), "{what}: {v}");
}

/// Asserts a refusal: a non-zero exit, nothing on stdout and one line on stderr about the authentication.
fn refused(o: &Output, what: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{what} must fail: {err}");
    assert!(o.stdout.is_empty(), "{what}: {}", String::from_utf8_lossy(&o.stdout));
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{what}: one line, got {err:?}");
    assert!(lines[0].starts_with("error: "), "{what}: {err:?}");
    assert!(lines[0].contains("Unauthenticated"), "{what}: {err:?}");
}

#[test]
fn tokens_from_the_flag_or_the_environment_and_refusals_in_one_line() {
    let dir = tempfile::tempdir().expect("tmp");
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "# CLI users\nright-token\n").expect("tokens file");
    let coordinator = Coordinator::start(&tokens);

    served(
        &coordinator.mip("jobs", &["--json", "--token", "right-token"], None),
        "--token RIGHT",
    );
    served(
        &coordinator.mip("jobs", &["--json"], Some("right-token")),
        "MIP_TOKEN=RIGHT",
    );
    served(
        &coordinator.mip("workers", &["--json", "--token", "right-token"], None),
        "workers --token RIGHT",
    );

    refused(
        &coordinator.mip("jobs", &["--json", "--token", "wrong-token"], None),
        "--token WRONG",
    );
    refused(&coordinator.mip("jobs", &["--json"], None), "no token");
    refused(
        &coordinator.mip("jobs", &["--json"], Some("wrong-token")),
        "MIP_TOKEN=WRONG",
    );
    refused(
        &coordinator.mip("workers", &["--json"], None),
        "workers without a token",
    );
    // The flag wins over the environment.
    refused(
        &coordinator.mip("jobs", &["--json", "--token", "wrong-token"], Some("right-token")),
        "--token WRONG over MIP_TOKEN=RIGHT",
    );
}
