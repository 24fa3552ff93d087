//! The `mip` binary's shell conventions: completion scripts for the common shells, the `-v`/`-vv`/`-q` flags
//! accepted by every subcommand (and refused together), and `--log-format json` for log collectors.

use std::io::{BufRead as _, BufReader};
use std::process::Stdio;

use mip_tests::process::{mip, mip_cmd, text};

#[test]
fn completion_scripts_name_the_subcommands() {
    for (shell, marker) in [("bash", "_mip()"), ("zsh", "#compdef mip"), ("fish", "complete -c mip")] {
        let o = mip(&["completions", shell]);
        assert!(o.status.success(), "{shell}: {}", text(&o));
        let script = String::from_utf8_lossy(&o.stdout);
        assert!(script.contains(marker), "{shell} script lacks {marker:?}");
        for sub in ["generate", "submit", "bench-cluster", "completions"] {
            assert!(script.contains(sub), "{shell} script lacks {sub}");
        }
    }
    let o = mip(&["completions", "tcsh"]);
    assert!(!o.status.success(), "an unknown shell is refused");
    assert!(text(&o).contains("possible values"), "{}", text(&o));
}

#[test]
fn verbosity_flags_are_global_and_exclusive() {
    let help = mip(&["workers", "--help"]);
    let help = text(&help);
    assert!(help.contains("-v, --verbose") && help.contains("-q, --quiet"), "{help}");
    let o = mip(&["-q", "-vv", "workers", "--workers", "http://127.0.0.1:1"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("cannot be used with"), "{}", text(&o));
}

#[test]
fn enumerated_values_are_listed_and_checked_by_the_parser() {
    let help = text(&mip(&["generate", "--help"]));
    for listed in [
        "[possible values: euler, ddim, dpmpp_2m_karras]",
        "[possible values: f32, f16, bf16]",
    ] {
        assert!(help.contains(listed), "{listed} missing in\n{help}");
    }
    for (args, flag) in [
        (&["generate", "--prompt", "p", "--scheduler", "heun"][..], "--scheduler"),
        (&["generate", "--prompt", "p", "--dtype", "f64"][..], "--dtype"),
        (&["generate", "--prompt", "p", "--device", "gpu"][..], "--device"),
        (&["generate", "--prompt", "p", "--size", "big"][..], "--size"),
        (&["parity", "x", "--dtype", "f8"][..], "--dtype"),
    ] {
        let o = mip(args);
        assert_eq!(
            o.status.code(),
            Some(2),
            "clap's usage error for {args:?}: {}",
            text(&o)
        );
        let msg = text(&o);
        assert!(msg.contains("invalid value") && msg.contains(flag), "{msg}");
    }
}

#[test]
fn json_log_format_writes_one_object_per_line() {
    let help = text(&mip(&["serve", "coordinator", "--help"]));
    assert!(help.contains("[possible values: text, json]"), "{help}");
    // A coordinator at info level in JSON: its startup line on stderr is a JSON object with the usual keys.
    let mut child = mip_cmd()
        .args([
            "-v",
            "--log-format",
            "json",
            "serve",
            "coordinator",
            "--listen",
            "127.0.0.1:0",
        ])
        .args(["--workers", "http://127.0.0.1:1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mip serve coordinator starts");
    let mut first = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut first)
        .expect("first line");
    assert!(first.contains("listening on"), "{first:?}");
    // Read log lines until the startup event (or the end of stderr, should the process die), then stop it.
    let mut events: Vec<serde_json::Value> = Vec::new();
    for line in BufReader::new(child.stderr.take().expect("stderr")).lines() {
        let line = line.expect("stderr line");
        let e: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"));
        assert!(
            e["level"].is_string() && e["fields"].is_object() && e["timestamp"].is_string(),
            "{e}"
        );
        let found = e["fields"]["message"] == "coordinator listening";
        events.push(e);
        if found {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        events.iter().any(|e| e["fields"]["message"] == "coordinator listening"),
        "{events:?}"
    );
    let o = mip(&["--log-format", "xml", "workers", "--workers", "http://127.0.0.1:1"]);
    assert!(
        !o.status.success() && text(&o).contains("possible values"),
        "{}",
        text(&o)
    );
}
