//! The `alloctrace` command: parses arguments, runs the subcommand, prints any error as one line and exits 2.

use std::{io::Write, path::Path, process::ExitCode};

use clap::{CommandFactory as _, Parser as _, error::ErrorKind};

use anyhow::{Context as _, bail};
use tracer::{
    agent::{self, AgentOptions},
    cli::{Cli, Command, LargeArgs, LeaksArgs, OutputArgs, TargetArgs},
    logging,
    model::Trace,
    os::{self, FileKind},
    output::{self, Format, Report, escape::Escaped},
    report::{
        large::{self, LargeOptions},
        leaks::{self, LeaksOptions},
        oom::OomRecord,
    },
    system, trace,
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
                top: args.top(),
                group_by: args.group_by,
            };
            traced(&args.target, &args.output, |trace, tracer_max_rss_bytes| {
                let mut report = leaks::build(trace, &options, tracer_max_rss_bytes);
                report.name_source_lines();
                Report::Leaks(report)
            })
            .await
        }
        Command::Large(args) => {
            let options = LargeOptions {
                min_size: args.min_size,
                min_age_ns: args.min_age.as_nanos() as u64,
                top: args.top(),
                group_by: args.group_by,
            };
            traced(&args.target, &args.output, |trace, tracer_max_rss_bytes| {
                let mut report = large::build(trace, &options, tracer_max_rss_bytes);
                report.name_source_lines();
                Report::Large(report)
            })
            .await
        }
        Command::Oom(args) => {
            let format = args.output.format;
            let color = args.output.color();
            // A profile format draws one document per kill: each goes to its own file in a directory.
            let dir = match (format.is_profile(), args.output.output.as_deref()) {
                (false, _) => None,
                (true, Some(dir)) => {
                    std::fs::create_dir_all(dir)
                        .with_context(|| format!("cannot create {}", dir.display()))?;
                    Some(dir.to_path_buf())
                }
                (true, None) => bail!(
                    "oom --format {} writes a file per OOM kill: name their directory with -o DIR",
                    format.name()
                ),
            };
            let mut out = match dir {
                Some(_) => None,
                None => Some(output::open(args.output.output.as_deref(), format)?),
            };
            if args.target.is_empty() {
                log::info!("watching for OOM kills on this host; Ctrl-C or SIGTERM stops");
            }
            let file = args.output.output.as_deref();
            let mut sink = |record: &OomRecord| -> anyhow::Result<()> {
                if let Some(out) = out.as_mut() {
                    output::write_oom(record, format, color, out)?;
                    out.flush()?;
                    // Appended to the one file -o names: said as written, as a file per kill is.
                    if let Some(path) = file {
                        say_wrote(path, FileKind::OomRecord, format, Some(record.victim.pid));
                    }
                    return Ok(());
                }
                let dir = dir.as_deref().expect("a directory when there is no output");
                let path = output::oom_path(dir, record, format);
                let mut file = output::open(Some(&path), format)?;
                output::write_oom(record, format, false, &mut file)?;
                file.flush()
                    .with_context(|| format!("cannot write {}", path.display()))?;
                log::info!("wrote {}", path.display());
                say_wrote(&path, FileKind::OomRecord, format, Some(record.victim.pid));
                Ok(())
            };
            let traced = trace::run(&args.target.config(), Some(&mut sink)).await?;
            traced.stop_unfinished_command();
            traced.finish();
            Ok(())
        }
        Command::Agent(args) => {
            let options = AgentOptions {
                dir: args.dir.clone(),
                listen: args.listen,
                fault_every: args.fault_sample_every,
                max_samples: args.max_samples,
                series_ttl: args.series_ttl,
                escalation: (!args.no_escalation).then_some(agent::EscalationOptions {
                    thresholds: agent::escalation::Thresholds {
                        at_percent: args.escalate_at,
                        rate: args.escalate_rate,
                    },
                    max_processes: args.max_escalated,
                }),
            };
            agent::run(&args.targets(), &options).await
        }
    }
}

/// Runs a trace, writes the report `build` makes of it (given alloctrace's peak resident memory, as the trace
/// ended), then stops the command alloctrace started if it still runs. The output is opened first: a path that
/// cannot be written fails at once, not after the trace.
async fn traced(
    target: &TargetArgs,
    output: &OutputArgs,
    build: impl FnOnce(&Trace, u64) -> Report,
) -> anyhow::Result<()> {
    let mut out = output::open(output.output.as_deref(), output.format)?;
    let traced = trace::run(&target.config(), None).await?;
    let report = build(&traced.trace, system::max_rss_bytes());
    let written =
        output::write(&report, output.format, output.color(), &mut out).and_then(|()| out.flush());
    if let (Ok(()), Some(path)) = (&written, output.output.as_deref()) {
        say_wrote(path, FileKind::Report, output.format, None);
    }
    traced.stop_unfinished_command();
    traced.finish();
    Ok(written?)
}

/// Says on `--ready-fd` that `path` is written; a reader gone is said on stderr, and the run goes on.
fn say_wrote(path: &Path, kind: FileKind, format: Format, pid: Option<u32>) {
    if let Err(err) = os::say_wrote(path, kind, format.name(), pid) {
        log::warn!("cannot write to --ready-fd: {err}");
    }
}

/// Help and version as clap prints them; a usage error as `alloctrace: error: …` on its first line, then
/// clap's usage and hint, exit 2.
fn usage_error(err: clap::Error) -> ExitCode {
    match err.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => err.exit(),
        // clap would print the whole help: the usage says enough.
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            eprintln!(
                "alloctrace: error: name a command: leaks, large, oom or agent\n\n{}\n\nFor more information, try '--help'.",
                Cli::command().render_usage()
            );
        }
        _ => {
            let rendered = err.render().to_string();
            let message = rendered.strip_prefix("error: ").unwrap_or(&rendered);
            eprint!("alloctrace: error: {message}");
        }
    }
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => return usage_error(err),
    };
    // Before the runtime opens descriptors of its own, so that it cannot be one of them.
    if let Some(fd) = cli.ready_fd
        && let Err(err) = os::claim_ready_fd(fd)
    {
        eprintln!("alloctrace: error: {err:#}");
        return ExitCode::from(2);
    }
    logging::init(cli.verbose, cli.quiet);
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
    // The stop signals are caught before anything is attached: one that arrives meanwhile ends the trace
    // as soon as it runs, with its report, instead of killing alloctrace.
    let stopped_or_done = runtime.block_on(async {
        os::catch_stop_signals().context("cannot catch SIGINT, SIGTERM and SIGHUP")?;
        run(cli.command).await
    });
    match stopped_or_done {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            // An error may quote a target's path or name.
            eprintln!("alloctrace: error: {}", Escaped(&format!("{err:#}")));
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
