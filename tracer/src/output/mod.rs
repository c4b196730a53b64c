//! Renders reports: one module per format, chosen with `--format`.

pub mod json;
pub mod text;

use std::io::{self, Write};

use clap::ValueEnum;

use crate::report::leaks::LeaksReport;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// For people: sites as blocks, sizes in KiB/MiB.
    Text,
    /// For programs: one JSON document, exact integers (schema 1).
    Json,
}

pub fn write_leaks(report: &LeaksReport, format: Format, out: &mut dyn Write) -> io::Result<()> {
    match format {
        Format::Text => text::write_leaks(report, out),
        Format::Json => json::write(report, out),
    }
}
