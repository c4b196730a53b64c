//! Renders reports: one module per format, chosen with `--format`.

pub mod escape;
pub mod json;
pub mod text;

use std::{
    fs::File,
    io::{self, BufWriter, Write},
    path::Path,
};

use anyhow::Context as _;
use clap::ValueEnum;

use crate::report::{large::LargeReport, leaks::LeaksReport, oom::OomRecord};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// For people: sites as blocks, sizes in KiB/MiB.
    Text,
    /// For programs: one JSON document, exact integers (schema 1).
    Json,
}

/// A report every format can render.
pub enum Report {
    Leaks(LeaksReport),
    Large(LargeReport),
}

pub fn write(report: &Report, format: Format, out: &mut dyn Write) -> io::Result<()> {
    match (format, report) {
        (Format::Text, Report::Leaks(r)) => text::write_leaks(r, out),
        (Format::Text, Report::Large(r)) => text::write_large(r, out),
        (Format::Json, Report::Leaks(r)) => json::write(r, out),
        (Format::Json, Report::Large(r)) => json::write(r, out),
    }
}

/// `path`, created (or emptied), or standard output. Opened when alloctrace starts, so that a path it cannot
/// write fails before a trace, not after it.
pub fn open(path: Option<&Path>) -> anyhow::Result<Box<dyn Write>> {
    Ok(match path {
        Some(path) => Box::new(BufWriter::new(
            File::create(path).with_context(|| format!("cannot create {}", path.display()))?,
        )),
        None => Box::new(io::stdout()),
    })
}

/// One OOM record: a JSON line, or a block of text.
pub fn write_oom(record: &OomRecord, format: Format, out: &mut dyn Write) -> io::Result<()> {
    match format {
        Format::Text => text::write_oom(record, out),
        Format::Json => json::write_line(record, out),
    }
}
