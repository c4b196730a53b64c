//! JSON output: the report as one document, followed by a newline, with no character a terminal acts on.

use std::io::{self, Write};

use serde::Serialize;

use super::escape::json_for_terminal;

/// The report as one indented document.
pub fn write(report: &impl Serialize, out: &mut dyn Write) -> io::Result<()> {
    let json = serde_json::to_string_pretty(report)?;
    writeln!(out, "{}", json_for_terminal(&json))
}

/// A record as one line (JSON Lines).
pub fn write_line(record: &impl Serialize, out: &mut dyn Write) -> io::Result<()> {
    let json = serde_json::to_string(record)?;
    writeln!(out, "{}", json_for_terminal(&json))
}
