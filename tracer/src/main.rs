//! The `alloctrace` command: parses arguments, runs the subcommand, prints any error as one line and exits 2.

use std::process::ExitCode;

use clap::Parser as _;
use std::io::Write as _;

use anyhow::bail;
use tracer::{
    cli::{Cli, Command, LargeArgs, LeaksArgs, OutputArgs, TargetArgs},
    output::{self, Report},
    report::{
        large::{self, LargeOptions},
        leaks::{self, LeaksOptions},
        oom::OomRecord,
    },
    trace::{self, Trace},
};

async fn run(command: Command) -> anyhow::Result<()> {
    match &command {
        Command::Leaks(LeaksArgs { target, .. }) | Command::Large(LargeArgs { target, .. })
            if target.is_empty() =>
        {
            bail!("name what to trace: -p PID, --comm NAME, or -- COMMAND")
        }
        _ => {}
    }
    match command {
        Command::Leaks(args) => {
            let options = LeaksOptions {
                min_age_ns: args.min_age.as_nanos() as u64,
                min_size: args.min_size,
                top: args.top,
                group_by: args.group_by,
            };
            traced(&args.target, &args.output, |trace| {
                Report::Leaks(leaks::build(trace, &options))
            })
            .await
        }
        Command::Large(args) => {
            let options = LargeOptions {
                min_size: args.min_size,
                min_age_ns: args.min_age.as_nanos() as u64,
                top: args.top,
                group_by: args.group_by,
            };
            traced(&args.target, &args.output, |trace| {
                Report::Large(large::build(trace, &options))
            })
            .await
        }
        Command::Oom(args) => {
            let mut out = output::open(args.output.output.as_deref())?;
            if args.target.is_empty() {
                eprintln!("alloctrace: watching for OOM kills on this host; Ctrl-C stops");
            }
            let format = args.output.format;
            let mut sink = |record: &OomRecord| -> anyhow::Result<()> {
                output::write_oom(record, format, &mut out)?;
                Ok(out.flush()?)
            };
            let trace = trace::run(&args.target, Some(&mut sink)).await?;
            trace.stop_unfinished_command();
            Ok(())
        }
    }
}

/// Runs a trace, writes the report `build` makes of it, then stops the command alloctrace started if it
/// still runs.
async fn traced(
    target: &TargetArgs,
    output: &OutputArgs,
    build: impl FnOnce(&Trace) -> Report,
) -> anyhow::Result<()> {
    let trace = trace::run(target, None).await?;
    let written = output::write_to(&build(&trace), output.format, output.output.as_deref());
    trace.stop_unfinished_command();
    written
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("alloctrace: error: cannot start the runtime: {err}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("alloctrace: error: {err:#}");
            ExitCode::from(2)
        }
    }
}

/// A reader that stopped reading (`alloctrace … | head`) is not an error.
fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
