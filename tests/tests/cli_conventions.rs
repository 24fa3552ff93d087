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
