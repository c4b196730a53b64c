//! The `alloctrace` command: parses arguments, runs the subcommand, prints any error as one line and exits 2.

use std::process::ExitCode;

use clap::Parser as _;
use tracer::{
    cli::{Cli, Command},
    output::{self, Report},
    report::{
        large::{self, LargeOptions},
        leaks::{self, LeaksOptions},
    },
    trace,
};

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Leaks(args) => {
            let trace = trace::run(&args.target).await?;
            let report = leaks::build(
                &trace,
                &LeaksOptions {
                    min_age_ns: args.min_age.as_nanos() as u64,
                    min_size: args.min_size,
                    top: args.top,
                },
            );
            let written = output::write_to(
                Report::Leaks(&report),
                args.output.format,
                args.output.output.as_deref(),
            );
            trace.stop_unfinished_command();
            written
        }
        Command::Large(args) => {
            let trace = trace::run(&args.target).await?;
            let report = large::build(
                &trace,
                &LargeOptions {
                    min_size: args.min_size,
                    min_age_ns: args.min_age.as_nanos() as u64,
                    top: args.top,
                },
            );
            let written = output::write_to(
                Report::Large(&report),
                args.output.format,
                args.output.output.as_deref(),
            );
            trace.stop_unfinished_command();
            written
        }
    }
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
