//! Command-line arguments, as clap parses them, and the checks that keep a mistyped or empty one (an unset
//! shell variable) from tracing the wrong processes or running for ever.

use std::{ffi::OsString, net::SocketAddr, path::PathBuf, time::Duration};

use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum, builder::PossibleValue};

use crate::{
    output::{ColorWhen, Format},
    report::GroupBy,
    trace::TraceConfig,
};

#[derive(Debug, Parser)]
#[command(
    name = "alloctrace",
    version,
    about = "Traces the allocations of running processes with eBPF and names the stacks that hold memory"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,

    /// Write JSON lines to this open file descriptor, for scripts and tests that must not act before
    /// alloctrace sees what they do: `{"ready":true,"mode":"tracing","pids":[…]}` once tracing has begun (the
    /// probes on, the running targets attached; `"watching"` for the agent), `{"attached":PID}` whenever a
    /// process's allocator probes go on. It is closed when the trace ends. 3 or more.
    #[arg(long, global = true, value_name = "FD")]
    pub ready_fd: Option<i32>,

    /// Say more on stderr: -v details, -vv everything (RUST_LOG, when set, chooses instead).
    #[arg(short, long, global = true, action = clap::ArgAction::Count, conflicts_with = "quiet")]
    pub verbose: u8,

    /// Say less on stderr: -q only warnings, -qq only errors (an error that ends alloctrace is always said).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub quiet: u8,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Trace allocations and report the sites holding the most memory when the trace ends, each with a verdict:
    /// leak, lingering, churn or steady.
    Leaks(LeaksArgs),
    /// Trace allocations and list the large objects still alive when the trace ends.
    Large(LargeArgs),
    /// Report every OOM kill on the host as it happens, one record each: victim, container, memory cgroup and
    /// its limit, Airflow task, and, for a victim traced here (-p, --comm, or a command), its top stacks.
    Oom(OomArgs),
    /// Run on a host for good: watch every container's processes (or those --container, --cgroup and --comm
    /// name) without uprobes, write a post-mortem for each OOM kill, and serve /metrics for Prometheus.
    /// SIGTERM or SIGINT stops it.
    Agent(AgentArgs),
}

/// What to trace, and for how long. Children of traced processes are followed.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("target").multiple(true).args(["pids", "comms", "containers", "cgroups", "command"])))]
pub struct TargetArgs {
    /// Trace this running process (repeatable).
    #[arg(short = 'p', long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,

    /// Trace every process with this name (the kernel's 15-character comm), running or started later
    /// (repeatable).
    #[arg(long = "comm", value_name = "NAME", value_parser = parse_comm)]
    pub comms: Vec<String>,

    /// Trace every process of this container (a name, or an id or its prefix of 12 or more hex digits),
    /// running or started later (repeatable).
    #[arg(long = "container", value_name = "NAME|ID", value_parser = parse_container)]
    pub containers: Vec<String>,

    /// Trace every process in this cgroup or below it (an absolute path as `/proc/PID/cgroup` shows it, not
    /// the root), running or started later (repeatable).
    #[arg(long = "cgroup", value_name = "PATH", value_parser = parse_cgroup)]
    pub cgroups: Vec<String>,

    /// Report after this long (e.g. `30s`, `5m`; a bare number is seconds; at most 30 days). Ctrl-C, SIGTERM
    /// and SIGHUP also end the trace with a report, and so does the exit of every traced process (unless
    /// --comm, --container or --cgroup waits for more).
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub duration: Option<Duration>,

    /// Size of the ring buffer that carries events to alloctrace (a power of two, at least 4KiB). A bigger
    /// one loses fewer events in an allocation storm; every lost event is counted in the report.
    #[arg(long, value_name = "SIZE", value_parser = parse_buffer_size, default_value = "16MiB")]
    pub buffer_size: u64,

    /// Do not read Python frames (cheaper: stacks of CPython processes then end in the interpreter's C code).
    #[arg(long)]
    pub no_python_frames: bool,

    /// Sample allocations, one every SIZE bytes on average (e.g. `512KiB`), instead of recording each: much
    /// cheaper on allocation-heavy programs. Sampled blocks are weighted, so live bytes and counts are unbiased
    /// estimates; the report says it is sampled and how far off each site may be.
    #[arg(long, value_name = "SIZE", value_parser = parse_sample_interval)]
    pub sample_every: Option<u64>,

    /// Most live heap blocks the kernel keeps (each about 100 bytes of kernel memory: the first 262,144 taken
    /// when the trace starts, the rest as needed). Blocks past it are counted as lost, never hidden.
    #[arg(long, value_name = "N", default_value_t = 4 << 20)]
    pub max_live_blocks: u32,

    /// Most distinct stacks kept, named (a few hundred bytes each: frames are shared). Allocations from stacks
    /// past it are counted as allocated without a stack.
    #[arg(long, value_name = "N", default_value_t = 128 << 10)]
    pub max_stacks: usize,

    /// Start COMMAND and trace it from its first instruction; its exit ends the trace.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}

#[derive(Debug, Args)]
pub struct OutputArgs {
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,

    /// Write the report to FILE instead of standard output (created, or emptied, when alloctrace starts).
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub output: Option<PathBuf>,

    /// Colour the text report: auto (on a terminal, unless NO_COLOR is set), always, or never.
    #[arg(long, value_enum, value_name = "WHEN", default_value_t = ColorWhen::Auto)]
    pub color: ColorWhen,
}

/// `--top`, or its default: `text_default` for text and JSON, everything for a profile format.
fn top_or_default(top: Option<usize>, output: &OutputArgs, text_default: usize) -> usize {
    top.unwrap_or(if output.format.is_profile() {
        usize::MAX
    } else {
        text_default
    })
}

impl LeaksArgs {
    /// How many sites the report lists.
    pub fn top(&self) -> usize {
        top_or_default(self.top, &self.output, 10)
    }
}

impl LargeArgs {
    /// How many objects the report lists.
    pub fn top(&self) -> usize {
        top_or_default(self.top, &self.output, 20)
    }
}

impl OutputArgs {
    /// Whether the text is coloured.
    pub fn color(&self) -> bool {
        self.color.enabled(self.output.is_none())
    }
}

#[derive(Debug, Args)]
pub struct LeaksArgs {
    #[command(flatten)]
    pub target: TargetArgs,

    /// Count only blocks at least this old as live.
    #[arg(long, value_name = "DUR", value_parser = parse_duration, default_value = "0s")]
    pub min_age: Duration,

    /// Blocks at least this large that stay alive make a site `lingering` (e.g. `1MiB`, `512KiB`, `4096`).
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "1MiB")]
    pub min_size: u64,

    /// How many sites to show (0: all). By default 10, and all for the profile formats (folded,
    /// flamegraph, pprof, html), whose totals and shapes would otherwise be those of the 10 biggest only.
    #[arg(long, value_name = "N", value_parser = parse_top)]
    pub top: Option<usize>,

    /// Also sum the sites up by process or container.
    #[arg(long, value_enum, default_value_t = GroupBy::Stack)]
    pub group_by: GroupBy,

    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Args)]
pub struct LargeArgs {
    #[command(flatten)]
    pub target: TargetArgs,

    /// Only objects at least this large (e.g. `1MiB`, `512KiB`, `4096`).
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "1MiB")]
    pub min_size: u64,

    /// Only objects at least this old.
    #[arg(long, value_name = "DUR", value_parser = parse_duration, default_value = "0s")]
    pub min_age: Duration,

    /// How many objects to show (0: all). By default 20, and all for the profile formats.
    #[arg(long, value_name = "N", value_parser = parse_top)]
    pub top: Option<usize>,

    /// Also sum the objects up by process or container.
    #[arg(long, value_enum, default_value_t = GroupBy::Stack)]
    pub group_by: GroupBy,

    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Args)]
pub struct OomArgs {
    /// Processes whose allocations are traced, so that their OOM records carry the stacks that held memory.
    /// None: OOM kills are watched without tracing allocations.
    #[command(flatten)]
    pub target: TargetArgs,

    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Watch only the processes with this name (repeatable).
    #[arg(long = "comm", value_name = "NAME", value_parser = parse_comm)]
    pub comms: Vec<String>,

    /// Watch only the processes of this container (a name, or an id or its prefix of 12 or more hex
    /// digits; repeatable).
    #[arg(long = "container", value_name = "NAME|ID", value_parser = parse_container)]
    pub containers: Vec<String>,

    /// Watch only the processes in this cgroup or below it (repeatable).
    #[arg(long = "cgroup", value_name = "PATH", value_parser = parse_cgroup)]
    pub cgroups: Vec<String>,

    /// Where OOM post-mortems are written (created if missing).
    #[arg(long, value_name = "DIR", default_value = "/var/lib/alloctrace")]
    pub dir: PathBuf,

    /// Where the HTTP endpoints (/metrics, /debug/pprof/heap, /healthz) are served.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9464")]
    pub listen: SocketAddr,

    /// Sample one write fault in N, weighted by N: a larger N costs less and sees less.
    #[arg(long, value_name = "N", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub fault_sample_every: u32,

    /// How long a container's series are still exported after its last process is gone.
    #[arg(long, value_name = "DUR", value_parser = parse_duration, default_value = "10m")]
    pub series_ttl: Duration,

    /// Size of the ring buffer that carries events to the agent (a power of two, at least 4KiB).
    #[arg(long, value_name = "SIZE", value_parser = parse_buffer_size, default_value = "16MiB")]
    pub buffer_size: u64,

    /// Most distinct stacks kept, named.
    #[arg(long, value_name = "N", default_value_t = 128 << 10)]
    pub max_stacks: usize,

    /// Most sampled pages held at once (about 100 bytes each); samples past it are counted as lost.
    #[arg(long, value_name = "N", default_value_t = 1 << 20)]
    pub max_samples: usize,

    /// Escalate a container to the exact tier (allocator uprobes on its biggest processes) past this percent of
    /// its memory limit; it relaxes 10 points below, after at least 10 s.
    #[arg(long, value_name = "PERCENT", default_value_t = 80, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub escalate_at: u32,

    /// Escalate a container growing faster than SIZE per second over 10 s (the only trigger for a container
    /// without a limit); it relaxes under half of it.
    #[arg(long, value_name = "SIZE", value_parser = parse_rate, default_value = "64MiB")]
    pub escalate_rate: u64,

    /// Most processes escalated at once, host-wide: the biggest of the escalated containers'.
    #[arg(long, value_name = "N", default_value_t = 8, value_parser = parse_max_escalated)]
    pub max_escalated: usize,

    /// An escalated process's allocations are sampled, one every SIZE bytes on average, and weighted.
    #[arg(long, value_name = "SIZE", value_parser = parse_sample_interval, default_value = "512KiB")]
    pub escalate_sample_every: u64,

    /// Record every allocation of an escalated process, not a sample (dearer on allocation-heavy work).
    #[arg(long, conflicts_with = "escalate_sample_every")]
    pub escalate_exact: bool,

    /// Never escalate: no uprobe program is even loaded.
    #[arg(long, conflicts_with_all = ["escalate_at", "escalate_rate", "max_escalated", "escalate_sample_every", "escalate_exact"])]
    pub no_escalation: bool,
}

impl AgentArgs {
    /// The processes the agent watches, as the session takes them.
    pub fn targets(&self) -> TraceConfig {
        TraceConfig {
            pids: Vec::new(),
            comms: self.comms.clone(),
            containers: self.containers.clone(),
            cgroups: self.cgroups.clone(),
            duration: None,
            buffer_size: self.buffer_size,
            python_frames: true,
            // Escalated processes are traced with this sampling.
            sample_every: (!self.no_escalation && !self.escalate_exact)
                .then_some(self.escalate_sample_every),
            // Only escalated processes have heap blocks in the kernel (its table takes memory as it fills).
            max_live_blocks: if self.no_escalation { 1 } else { 4 << 20 },
            max_stacks: self.max_stacks,
            command: Vec::new(),
        }
    }
}

impl TargetArgs {
    /// Whether any process is named.
    pub fn is_empty(&self) -> bool {
        self.pids.is_empty()
            && self.comms.is_empty()
            && self.containers.is_empty()
            && self.cgroups.is_empty()
            && self.command.is_empty()
    }

    /// What the session takes: these arguments, as its own config.
    pub fn config(&self) -> TraceConfig {
        TraceConfig {
            pids: self.pids.clone(),
            comms: self.comms.clone(),
            containers: self.containers.clone(),
            cgroups: self.cgroups.clone(),
            duration: self.duration,
            buffer_size: self.buffer_size,
            python_frames: !self.no_python_frames,
            sample_every: self.sample_every,
            max_live_blocks: self.max_live_blocks,
            max_stacks: self.max_stacks,
            command: self.command.clone(),
        }
    }
}

// The library's enums as the command line spells them: clap stays above the library (see `lib.rs`).

impl ValueEnum for Format {
    fn value_variants<'a>() -> &'a [Self] {
        &Self::ALL
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        let help = match self {
            Self::Text => "For people: sites as blocks, sizes in KiB/MiB",
            Self::Json => "For programs: one JSON document, exact integers (schema 1)",
            Self::Folded => {
                "Brendan Gregg's folded stacks, outermost frame first, with the live bytes of each: what every \
                 flame-graph tool reads"
            }
            Self::Flamegraph => "An interactive SVG flame graph of live bytes by stack",
            Self::Pprof => {
                "A gzipped pprof profile (`go tool pprof`, Pyroscope, Parca, speedscope): in-use and allocated \
                 space and objects by stack. Binary: write it to a file with -o"
            }
            Self::Html => {
                "One self-contained page: summary, live memory over time, the flame graph, the sites and \
                 verdicts"
            }
        };
        Some(PossibleValue::new(self.name()).help(help))
    }
}

impl ValueEnum for ColorWhen {
    fn value_variants<'a>() -> &'a [Self] {
        &Self::ALL
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        let value = PossibleValue::new(self.name());
        Some(match self {
            Self::Auto => value.help("On a terminal, unless NO_COLOR is set"),
            Self::Always | Self::Never => value,
        })
    }
}

impl ValueEnum for GroupBy {
    fn value_variants<'a>() -> &'a [Self] {
        &Self::ALL
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        Some(PossibleValue::new(self.name()))
    }
}

/// The longest `--duration` and `--min-age`: longer than any trace runs, and far enough from the limits of
/// the clocks that no deadline computed from it overflows.
pub const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 60 * 60);

/// `1.5` (seconds), `250ms`, `30s`, `5m`, `1h 30m`; at most [`MAX_DURATION`].
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    const RANGE: &str = "a duration is from 0 to 30 days";
    let duration = match text.trim().parse::<f64>() {
        // NaN fails both comparisons: it is caught by the negation.
        Ok(seconds) if !(0.0..=MAX_DURATION.as_secs_f64()).contains(&seconds) => {
            return Err(RANGE.to_owned());
        }
        Ok(seconds) => Duration::from_secs_f64(seconds),
        Err(_) => humantime::parse_duration(text).map_err(|e| e.to_string())?,
    };
    if duration > MAX_DURATION {
        return Err(RANGE.to_owned());
    }
    Ok(duration)
}

/// `--top N`: `0` stands for all.
fn parse_top(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(0) => Ok(usize::MAX),
        Ok(n) => Ok(n),
        Err(_) => Err("a count is a whole number; 0 means all".to_owned()),
    }
}

/// `--cgroup PATH`: absolute and plain. An empty path (an unset shell variable), the root, or `/.` would
/// choose every process on the host; a relative one or one with `..` would not be the cgroup meant.
fn parse_cgroup(text: &str) -> Result<String, String> {
    if !text.starts_with('/') {
        return Err(
            "a cgroup is an absolute path, as /proc/PID/cgroup shows it (e.g. /system.slice/cron.service)"
                .to_owned(),
        );
    }
    if text.split('/').any(|part| part == "." || part == "..") {
        return Err("a cgroup path has no . or .. in it".to_owned());
    }
    if text.trim_end_matches('/').is_empty() {
        return Err(
            "the root cgroup holds every process on the host: name the cgroup below it to trace"
                .to_owned(),
        );
    }
    Ok(text.to_owned())
}

/// `--container NAME|ID`: not empty (an unset shell variable).
fn parse_container(text: &str) -> Result<String, String> {
    if text.trim().trim_start_matches('/').is_empty() {
        return Err("a container name or id is not empty".to_owned());
    }
    Ok(text.to_owned())
}

/// `--comm NAME`: not empty (an unset shell variable).
fn parse_comm(text: &str) -> Result<String, String> {
    if text.is_empty() {
        return Err("a process name is not empty".to_owned());
    }
    Ok(text.to_owned())
}

/// `4096`, `512K`, `512KiB`, `1M`, `1MiB`, `2G`, `2GiB` (binary units; `B` optional, case ignored).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let lower = text.trim().to_ascii_lowercase();
    let digits = lower.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = &lower[digits.len()..];
    let shift = match unit {
        "" | "b" => 0,
        "k" | "kb" | "ki" | "kib" => 10,
        "m" | "mb" | "mi" | "mib" => 20,
        "g" | "gb" | "gi" | "gib" => 30,
        _ => {
            return Err(format!(
                "{text:?}: unknown unit {unit:?} (use B, KiB, MiB or GiB)"
            ));
        }
    };
    let value: u64 = digits
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a size"))?;
    value
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// A ring buffer's size: a power of two and a whole number of pages, as the kernel requires.
fn parse_sample_interval(text: &str) -> Result<u64, String> {
    let interval = parse_size(text)?;
    if interval == 0 || interval > tracer_common::SAMPLE_INTERVAL_MAX {
        return Err(format!(
            "the sampling interval must be between 1 byte and {} GiB",
            tracer_common::SAMPLE_INTERVAL_MAX >> 30
        ));
    }
    Ok(interval)
}

/// A rate of growth per second: a size, not 0.
fn parse_rate(text: &str) -> Result<u64, String> {
    match parse_size(text)? {
        0 => Err("a rate of growth must be more than 0".to_owned()),
        rate => Ok(rate),
    }
}

fn parse_max_escalated(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(n) if (1..=4096).contains(&n) => Ok(n),
        _ => Err(format!("{text:?}: from 1 to 4096 processes")),
    }
}

fn parse_buffer_size(text: &str) -> Result<u64, String> {
    let size = parse_size(text)?;
    if size < 4096 || !size.is_power_of_two() || size > u32::MAX as u64 / 2 + 1 {
        return Err(format!(
            "{text:?}: the ring buffer size must be a power of two from 4KiB to 2GiB"
        ));
    }
    Ok(size)
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
    fn durations_are_bounded() {
        assert_eq!(parse_duration("30d"), Ok(MAX_DURATION));
        assert_eq!(parse_duration("2592000"), Ok(MAX_DURATION));
        assert_eq!(parse_duration(" 2 "), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        for text in [
            "1e19",
            "2592000.5",
            "31d",
            "1e308",
            "inf",
            "-inf",
            "NaN",
            "-0.5",
            "-1s",
            "18446744073709551615",
            "584942417355y",
            "99999999999999999999999s",
            "",
        ] {
            let err = parse_duration(text).expect_err(text);
            assert!(!err.contains('\n'), "{text}: {err}");
        }
        assert_eq!(
            parse_duration("1e19"),
            Err("a duration is from 0 to 30 days".to_owned())
        );
    }

    /// Whatever the text, the parsers answer; they never panic.
    #[test]
    fn parsers_never_panic() {
        let pieces = [
            "",
            "0",
            "1",
            "-",
            ".",
            "e",
            "9",
            "99999999999999999999",
            "1e400",
            "ms",
            "ns",
            "s",
            "m",
            "h",
            "d",
            "y",
            "KiB",
            "MiB",
            "GiB",
            "gb",
            "b",
            " ",
            "\u{0}",
            "\u{ff}",
            "\u{1f600}",
            "µs",
            "ı",
            "K",
            "\x1b",
            "NaN",
            "inf",
            "/",
            "..",
            "+",
        ];
        for a in pieces {
            for b in pieces {
                for c in pieces {
                    let text = format!("{a}{b}{c}");
                    let _ = parse_duration(&text);
                    let _ = parse_size(&text);
                    let _ = parse_buffer_size(&text);
                    let _ = parse_top(&text);
                    let _ = parse_cgroup(&text);
                    let _ = parse_container(&text);
                    let _ = parse_comm(&text);
                }
            }
        }
    }

    #[test]
    fn top_zero_means_all() {
        assert_eq!(parse_top("0"), Ok(usize::MAX));
        assert_eq!(parse_top("3"), Ok(3));
        assert!(parse_top("-1").is_err());
        let Command::Leaks(args) =
            Cli::try_parse_from(["alloctrace", "leaks", "-p", "1", "--top", "0"])
                .unwrap()
                .command
        else {
            panic!("leaks");
        };
        assert_eq!(args.top(), usize::MAX);
        let Command::Large(args) = Cli::try_parse_from(["alloctrace", "large", "-p", "1"])
            .unwrap()
            .command
        else {
            panic!("large");
        };
        assert_eq!(args.top(), 20);
        // A profile format draws every site unless told otherwise.
        let Command::Leaks(args) =
            Cli::try_parse_from(["alloctrace", "leaks", "-p", "1", "--format", "flamegraph"])
                .unwrap()
                .command
        else {
            panic!("leaks");
        };
        assert_eq!(args.top(), usize::MAX);
        let Command::Leaks(args) = Cli::try_parse_from([
            "alloctrace",
            "leaks",
            "-p",
            "1",
            "--format",
            "pprof",
            "--top",
            "3",
        ])
        .unwrap()
        .command
        else {
            panic!("leaks");
        };
        assert_eq!(args.top(), 3);
        let Command::Leaks(args) = Cli::try_parse_from(["alloctrace", "leaks", "-p", "1"])
            .unwrap()
            .command
        else {
            panic!("leaks");
        };
        assert_eq!(args.top(), 10);
    }

    #[test]
    fn selectors_that_would_choose_every_process_are_refused() {
        for cgroup in [
            "",
            "/",
            "//",
            "/.",
            "/a/../..",
            "/a/./b",
            "system.slice",
            "./a",
        ] {
            assert!(parse_cgroup(cgroup).is_err(), "{cgroup:?}");
        }
        for cgroup in ["/system.slice", "/system.slice/docker-1.scope/", "/a..b"] {
            assert_eq!(parse_cgroup(cgroup).as_deref(), Ok(cgroup));
        }
        for container in ["", "/", " "] {
            assert!(parse_container(container).is_err(), "{container:?}");
        }
        assert_eq!(parse_container("/web").as_deref(), Ok("/web"));
        assert!(parse_comm("").is_err());
        assert_eq!(parse_comm("python3").as_deref(), Ok("python3"));
        for args in [
            ["alloctrace", "leaks", "--cgroup", ""],
            ["alloctrace", "leaks", "--container", ""],
            ["alloctrace", "leaks", "--comm", ""],
            ["alloctrace", "leaks", "--duration", "1e19"],
            ["alloctrace", "large", "--min-age", "NaN"],
        ] {
            let err = Cli::try_parse_from(args).expect_err(args[3]);
            assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512KiB"), Ok(512 << 10));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("2gib"), Ok(2 << 30));
        assert!(parse_size("1 parsec").is_err());
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("99999999999GiB").is_err());
        assert_eq!(parse_buffer_size("64KiB"), Ok(64 << 10));
        assert!(parse_buffer_size("3000").is_err());
        assert!(parse_buffer_size("1KiB").is_err());
    }

    #[test]
    fn targets_combine_and_may_be_left_out() {
        let Command::Leaks(args) = Cli::try_parse_from(["alloctrace", "leaks"])
            .unwrap()
            .command
        else {
            panic!("leaks");
        };
        assert!(
            args.target.is_empty(),
            "checked when the command runs, which says what to name"
        );
        let Command::Oom(args) = Cli::try_parse_from(["alloctrace", "oom", "--duration", "1m"])
            .unwrap()
            .command
        else {
            panic!("oom");
        };
        assert!(args.target.is_empty());
        let cli = Cli::try_parse_from([
            "alloctrace",
            "leaks",
            "-p",
            "1",
            "--pid",
            "2",
            "--comm",
            "python3",
        ])
        .unwrap();
        let Command::Leaks(args) = cli.command else {
            panic!("leaks");
        };
        assert_eq!(
            (args.target.pids, args.target.comms),
            (vec![1, 2], vec!["python3".to_owned()])
        );
        assert_eq!(args.min_size, 1 << 20);
        let cli = Cli::try_parse_from([
            "alloctrace",
            "large",
            "--min-size",
            "4MiB",
            "--format",
            "json",
            "--",
            "python3",
            "-c",
            "x",
        ])
        .unwrap();
        let Command::Large(args) = cli.command else {
            panic!("large");
        };
        assert_eq!(args.target.command, ["python3", "-c", "x"]);
        assert_eq!((args.min_size, args.output.format), (4 << 20, Format::Json));
    }

    #[test]
    fn formats_and_colour_are_chosen_by_name() {
        for (name, format) in [
            ("folded", Format::Folded),
            ("flamegraph", Format::Flamegraph),
            ("pprof", Format::Pprof),
            ("html", Format::Html),
        ] {
            let Command::Leaks(args) =
                Cli::try_parse_from(["alloctrace", "leaks", "-p", "1", "--format", name])
                    .unwrap()
                    .command
            else {
                panic!("leaks");
            };
            assert_eq!(args.output.format, format);
            assert_eq!(format.name(), name);
            assert!(format.is_profile());
        }
        let Command::Oom(args) = Cli::try_parse_from(["alloctrace", "oom", "--color", "always"])
            .unwrap()
            .command
        else {
            panic!("oom");
        };
        assert_eq!(args.output.color, ColorWhen::Always);
        assert!(args.output.color());
        assert!(!ColorWhen::Never.enabled(true));
        // Auto colours a terminal only: a file never.
        assert!(!ColorWhen::Auto.enabled(false));
        assert!(Cli::try_parse_from(["alloctrace", "leaks", "--color", "sometimes"]).is_err());
    }
}
