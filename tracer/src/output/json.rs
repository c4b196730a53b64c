//! JSON output: the report as one document, followed by a newline.

use std::io::{self, Write};

use serde::Serialize;

pub fn write(report: &impl Serialize, out: &mut dyn Write) -> io::Result<()> {
    serde_json::to_writer_pretty(&mut *out, report)?;
    writeln!(out)
}
