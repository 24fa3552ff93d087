//! `-v` / `-vv` / `-vvv`, `-q` and `--log-format text|json`, global to every subcommand: the level and shape of the
//! logs on stderr (`RUST_LOG`, when set, wins over the level). Services log warnings and errors by default; client
//! commands log nothing unless asked with `-v`.

use clap::builder::TypedValueParser as _;
use mip_common::telemetry::LogFormat;

/// The log verbosity flags.
#[derive(Debug, Clone, Copy, Default, clap::Args)]
pub struct Verbosity {
    /// More logs on stderr: -v info, -vv debug, -vvv trace.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Errors only on stderr.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
    /// Log lines as text, or as one JSON object per line (services: overrides `telemetry.log_format`).
    #[arg(long, global = true,
        value_parser = clap::builder::PossibleValuesParser::new(["text", "json"]).try_map(|s| s.parse::<LogFormat>()))]
    log_format: Option<LogFormat>,
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

    /// `--log-format`, else `configured`.
    pub fn log_format_or(self, configured: LogFormat) -> LogFormat {
        self.log_format.unwrap_or(configured)
    }

    /// `--log-format`, else text.
    pub fn log_format(self) -> LogFormat {
        self.log_format_or(LogFormat::Text)
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
