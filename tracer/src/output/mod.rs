//! Renders reports: one module per format, chosen with `--format`.

pub mod escape;
pub mod flamegraph;
pub mod html;
pub mod json;
pub mod pprof;
pub mod profile;
pub mod source;
pub mod text;

use std::{
    fs::File,
    io::{self, BufWriter, IsTerminal as _, Write},
    path::{Path, PathBuf},
};

use anyhow::Context as _;

use crate::report::{large::LargeReport, leaks::LeaksReport, oom::OomRecord};
use profile::Profile;

/// A report's format (`--format`; `cli` spells it for clap).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// For people: sites as blocks, sizes in KiB/MiB.
    Text,
    /// For programs: one JSON document, exact integers (schema 1).
    Json,
    /// Brendan Gregg's folded stacks, outermost frame first, with the live bytes of each: what every
    /// flame-graph tool reads.
    Folded,
    /// An interactive SVG flame graph of live bytes by stack.
    Flamegraph,
    /// A gzipped pprof profile (`go tool pprof`, Pyroscope, Parca, speedscope): in-use and allocated space
    /// and objects by stack. Binary: write it to a file with -o.
    Pprof,
    /// One self-contained page: summary, live memory over time, the flame graph, the sites and verdicts.
    Html,
}

impl Format {
    pub const ALL: [Self; 6] = [
        Self::Text,
        Self::Json,
        Self::Folded,
        Self::Flamegraph,
        Self::Pprof,
        Self::Html,
    ];

    /// Whether the format draws the report as a profile (stacks and their bytes).
    pub fn is_profile(self) -> bool {
        matches!(
            self,
            Self::Folded | Self::Flamegraph | Self::Pprof | Self::Html
        )
    }

    /// Its name, as `--format` takes it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Json => "json",
            Self::Folded => "folded",
            Self::Flamegraph => "flamegraph",
            Self::Pprof => "pprof",
            Self::Html => "html",
        }
    }

    /// Whether its output is binary, never for a terminal.
    pub fn is_binary(self) -> bool {
        self == Self::Pprof
    }

    /// The file extension of its files.
    pub fn extension(self) -> &'static str {
        match self {
            Self::Text => "txt",
            Self::Json => "json",
            Self::Folded => "folded",
            Self::Flamegraph => "svg",
            Self::Pprof => "pb.gz",
            Self::Html => "html",
        }
    }
}

/// A report every format can render.
pub enum Report {
    Leaks(LeaksReport),
    Large(LargeReport),
}

/// When text is coloured (`--color`; `cli` spells it for clap).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ColorWhen {
    /// On a terminal, unless NO_COLOR is set.
    Auto,
    Always,
    Never,
}

impl ColorWhen {
    pub const ALL: [Self; 3] = [Self::Auto, Self::Always, Self::Never];

    /// Its name, as `--color` takes it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Always => "always",
            Self::Never => "never",
        }
    }

    /// Whether to colour output that goes to standard output (`to_stdout`) or to a file.
    pub fn enabled(self, to_stdout: bool) -> bool {
        match self {
            Self::Always => true,
            Self::Never => false,
            Self::Auto => {
                to_stdout
                    && io::stdout().is_terminal()
                    && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
            }
        }
    }
}

/// A report in `format`; text in colour when `color`.
pub fn write(report: &Report, format: Format, color: bool, out: &mut dyn Write) -> io::Result<()> {
    match (format, report) {
        (Format::Text, Report::Leaks(r)) => text::write_leaks(r, color, out),
        (Format::Text, Report::Large(r)) => text::write_large(r, color, out),
        (Format::Json, Report::Leaks(r)) => json::write(r, out),
        (Format::Json, Report::Large(r)) => json::write(r, out),
        (_, Report::Leaks(r)) => write_profile(&mut Profile::from_leaks(r), format, out),
        (_, Report::Large(r)) => write_profile(&mut Profile::from_large(r), format, out),
    }
}

/// A profile in one of the profile formats ([`Format::is_profile`]); for pprof, the build ids of its
/// modules are read first.
pub fn write_profile(profile: &mut Profile, format: Format, out: &mut dyn Write) -> io::Result<()> {
    match format {
        Format::Folded => flamegraph::write_folded(profile, out),
        Format::Flamegraph => flamegraph::write_svg(profile, out),
        Format::Pprof => {
            profile.read_build_ids();
            pprof::write(profile, out)
        }
        Format::Html => html::write(profile, out),
        Format::Text | Format::Json => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "text and JSON are not profile formats",
        )),
    }
}

/// `path`, created (or emptied), or standard output. Opened when alloctrace starts, so that a path it cannot
/// write fails before a trace, not after it; a binary format is refused for a terminal.
pub fn open(path: Option<&Path>, format: Format) -> anyhow::Result<Box<dyn Write>> {
    if path.is_none() && format.is_binary() && io::stdout().is_terminal() {
        anyhow::bail!(
            "{} is binary: write it to a file with -o FILE, or redirect standard output",
            format.name()
        );
    }
    Ok(match path {
        Some(path) => Box::new(BufWriter::new(
            File::create(path).with_context(|| format!("cannot create {}", path.display()))?,
        )),
        None => Box::new(io::stdout()),
    })
}

/// Where `oom` writes a record in a profile format: one file per kill in the directory `dir`, named by the
/// time and the victim's pid.
pub fn oom_path(dir: &Path, record: &OomRecord, format: Format) -> PathBuf {
    dir.join(format!(
        "oom-{}-pid{}.{}",
        record.time,
        record.victim.pid,
        format.extension()
    ))
}

/// One OOM record: a JSON line, a block of text, or a profile of the stacks that held its memory.
pub fn write_oom(
    record: &OomRecord,
    format: Format,
    color: bool,
    out: &mut dyn Write,
) -> io::Result<()> {
    match format {
        Format::Text => text::write_oom(record, color, out),
        Format::Json => json::write_line(record, out),
        _ => write_profile(&mut Profile::from_oom(record), format, out),
    }
}
