//! `-v` / `-vv` / `-vvv` and `-q`, global to every subcommand: the level of the logs on stderr (`RUST_LOG`, when
//! set, wins). Services log warnings and errors by default; client commands log nothing unless asked with `-v`.

/// The log verbosity flags.
#[derive(Debug, Clone, Copy, Default, clap::Args)]
pub struct Verbosity {
    /// More logs on stderr: -v info, -vv debug, -vvv trace.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Errors only on stderr.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
}

impl Verbosity {
    /// The level the flags ask for.
    pub fn level(self) -> &'static str {
        if self.quiet {
            return "error";
        }
        match self.verbose {
            0 => "warn",
            1 => "info",
            2 => "debug",
            _ => "trace",
        }
    }

    /// The `tracing` filter: `RUST_LOG` when set, else [`level`](Self::level).
    pub fn filter(self) -> String {
        std::env::var("RUST_LOG").unwrap_or_else(|_| self.level().to_owned())
    }

    /// Whether a client command should log at all (`-v` or more given).
    pub fn client_logs(self) -> bool {
        self.verbose > 0
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        v: Verbosity,
    }

    fn level(args: &[&str]) -> &'static str {
        Cli::try_parse_from(std::iter::once("mip").chain(args.iter().copied()))
            .expect("parses")
            .v
            .level()
    }

    #[test]
    fn counts_and_quiet() {
        assert_eq!(level(&[]), "warn");
        assert_eq!(level(&["-v"]), "info");
        assert_eq!(level(&["-vv"]), "debug");
        assert_eq!(level(&["-vvvv"]), "trace");
        assert_eq!(level(&["-q"]), "error");
        assert!(Cli::try_parse_from(["mip", "-q", "-v"]).is_err(), "-q and -v conflict");
    }
}
