//! Command-line arguments, as clap parses them, and the validated options the tracer runs with.

use std::{ffi::OsString, path::PathBuf, time::Duration};

use clap::{ArgGroup, Args, Parser, Subcommand};

use crate::output::Format;

#[derive(Debug, Parser)]
#[command(
    name = "alloctrace",
    version,
    about = "Traces the allocations of running processes with eBPF and names the stacks that hold memory"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Trace allocations and report the sites holding the most memory when the trace ends.
    Leaks(LeaksArgs),
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("target").required(true).args(["pids", "command"])))]
pub struct LeaksArgs {
    /// Trace this running process (repeatable).
    #[arg(short = 'p', long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,

    /// Report after this long (e.g. `30s`, `5m`; a bare number is seconds). Ctrl-C also ends the trace, and so
    /// does the exit of every traced process.
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub duration: Option<Duration>,

    /// Count only blocks at least this old as live.
    #[arg(long, value_name = "DUR", value_parser = parse_duration, default_value = "0s")]
    pub min_age: Duration,

    /// How many sites to show.
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub top: usize,

    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,

    /// Write the report to FILE instead of standard output.
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub output: Option<PathBuf>,

    /// Start COMMAND and trace it from its first instruction; its exit ends the trace.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}

/// `1.5` (seconds), `250ms`, `30s`, `5m`, `1h 30m`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    if let Ok(seconds) = text.parse::<f64>() {
        return Duration::try_from_secs_f64(seconds).map_err(|e| format!("{text:?}: {e}"));
    }
    humantime::parse_duration(text).map_err(|e| format!("{text:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert!(parse_duration("-1").is_err());
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn a_target_is_required_and_only_one_kind() {
        assert!(Cli::try_parse_from(["alloctrace", "leaks"]).is_err());
        assert!(Cli::try_parse_from(["alloctrace", "leaks", "-p", "1", "--", "true"]).is_err());
        let cli =
            Cli::try_parse_from(["alloctrace", "leaks", "-p", "1", "--pid", "2", "--top", "3"])
                .unwrap();
        let Command::Leaks(args) = cli.command;
        assert_eq!((args.pids, args.top), (vec![1, 2], 3));
        let cli = Cli::try_parse_from([
            "alloctrace",
            "leaks",
            "--format",
            "json",
            "--",
            "python3",
            "-c",
            "x",
        ])
        .unwrap();
        let Command::Leaks(args) = cli.command;
        assert_eq!(args.command, ["python3", "-c", "x"]);
        assert_eq!(args.format, Format::Json);
    }
}
