//! The `mip` binary's shell conventions: completion scripts for the common shells, and the `-v`/`-vv`/`-q` flags
//! accepted by every subcommand (and refused together).

use mip_tests::process::{mip, text};

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
