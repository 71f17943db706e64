//! Logging, the same for every command: one set of options (`--log-level`, `-v`, `-q`,
//! `--log-format`, accepted before or after the subcommand) and one environment variable,
//! `IOREQ_MUX_LOG`. What decides the filter, first match wins:
//!
//! | source | filter |
//! |---|---|
//! | `--log-level FILTER` | FILTER (`tracing` EnvFilter syntax: `debug`, `info,ioreq_mux_engine=debug`) |
//! | `-q` | `error` |
//! | `-v`, `-vv`, `-vvv` | `info`, `debug`, `trace` |
//! | `$IOREQ_MUX_LOG` | its value |
//! | nothing | the command's default: `info` for the long-running `serve` and `dm`, `warn` for the rest |
//!
//! Logs go to stderr (reports go to stdout), with colours only on a terminal; under systemd
//! (`JOURNAL_STREAM` set) without timestamps, since the journal adds its own.

use std::io::IsTerminal;
use thiserror::Error;
use tracing_subscriber::EnvFilter;

/// The environment variable every command reads its log filter from.
pub const LOG_ENV: &str = "IOREQ_MUX_LOG";

/// Log line format.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines (no colours unless stderr is a terminal).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The logging options of every command (listed under their own heading in `--help`).
#[derive(clap::Args, Debug, Clone, Default, PartialEq, Eq)]
#[command(next_help_heading = "Logging (every command)")]
pub struct LogArgs {
    /// Log filter in `tracing` EnvFilter syntax (`debug`, `info,ioreq_mux_engine=debug`).
    /// Default: $IOREQ_MUX_LOG, else `info` for serve and dm, `warn` for the other commands.
    #[arg(long, global = true, value_name = "FILTER")]
    pub log_level: Option<String>,
    /// More log: -v info, -vv debug (serve: every served access), -vvv trace.
    #[arg(short, long, global = true, action = clap::ArgAction::Count, conflicts_with = "quiet")]
    pub verbose: u8,
    /// Log errors only.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// A log filter that does not parse.
#[derive(Debug, Error)]
#[error("{source_name} '{filter}': {why}")]
pub struct FilterError {
    /// Where the filter came from: `--log-level` or the environment variable.
    pub source_name: &'static str,
    pub filter: String,
    pub why: String,
}

impl LogArgs {
    /// The filter these options, the environment (`env`: `$IOREQ_MUX_LOG`) and the command's
    /// `default` select, as text.
    pub fn filter_text(&self, env: Option<String>, default: &str) -> (String, &'static str) {
        if let Some(f) = &self.log_level {
            return (f.clone(), "--log-level");
        }
        if self.quiet {
            return ("error".into(), "-q");
        }
        match self.verbose {
            0 => {}
            1 => return ("info".into(), "-v"),
            2 => return ("debug".into(), "-vv"),
            _ => return ("trace".into(), "-vvv"),
        }
        match env {
            Some(e) if !e.trim().is_empty() => (e, LOG_ENV),
            _ => (default.into(), "the default"),
        }
    }
}

/// Installs the subscriber for the whole process: `default` is the command's own filter when
/// nothing else chooses one. A filter that does not parse is an error naming its source.
pub fn init(args: &LogArgs, default: &str) -> Result<(), FilterError> {
    let (text, source_name) = args.filter_text(std::env::var(LOG_ENV).ok(), default);
    let filter = EnvFilter::try_new(&text).map_err(|e| FilterError {
        source_name,
        filter: text.clone(),
        why: e.to_string(),
    })?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    // Only the first subscriber of a process counts; a second `init` (a test) is harmless.
    let _ = match (args.log_format, journald) {
        (LogFormat::Json, _) => builder.json().try_init(),
        (LogFormat::Text, true) => builder.without_time().try_init(),
        (LogFormat::Text, false) => builder.try_init(),
    };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        log: LogArgs,
    }

    fn filter(args: &[&str], env: Option<&str>) -> String {
        let mut v = vec!["x"];
        v.extend_from_slice(args);
        let c = Cli::try_parse_from(v).unwrap();
        c.log.filter_text(env.map(String::from), "warn").0
    }

    #[test]
    fn flags_then_environment_then_default() {
        assert_eq!(filter(&[], None), "warn");
        assert_eq!(filter(&[], Some("debug")), "debug");
        assert_eq!(filter(&[], Some("  ")), "warn");
        assert_eq!(filter(&["-v"], Some("error")), "info");
        assert_eq!(filter(&["-vv"], None), "debug");
        assert_eq!(filter(&["-vvvv"], None), "trace");
        assert_eq!(filter(&["-q"], Some("debug")), "error");
        assert_eq!(
            filter(
                &["--log-level", "info,ioreq_mux_engine=debug", "-v"],
                Some("error")
            ),
            "info,ioreq_mux_engine=debug"
        );
    }

    #[test]
    fn quiet_and_verbose_conflict() {
        assert!(Cli::try_parse_from(["x", "-q", "-v"]).is_err());
    }

    #[test]
    fn a_bad_filter_names_its_source() {
        let c = Cli::try_parse_from(["x", "--log-level", "info,[="]).unwrap();
        let e = init(&c.log, "warn").unwrap_err();
        assert_eq!(e.source_name, "--log-level");
        assert!(e.to_string().starts_with("--log-level 'info,[=': "), "{e}");
    }
}
