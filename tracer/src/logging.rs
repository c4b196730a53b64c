//! How alloctrace talks to its user on stderr. Every module says what it does through `log` (info: what it
//! traces and watches; warn: what it cannot do and the user should know; debug and trace: details), and the
//! binary installs this logger: one line per message, `alloctrace: ` then the message escaped as a whole
//! ([`Escaped`]), so that a name or path a target chose can neither drive the terminal nor forge a line.
//! `-q` and `-v` choose how much is said; `RUST_LOG`, when set, says it instead.

use std::io::Write as _;

use log::{Level, Record};

use crate::output::escape::Escaped;

/// The crates whose messages are alloctrace's own: the library and the binary.
const OWN_CRATES: [&str; 2] = ["tracer", "alloctrace"];

/// The filter, in `RUST_LOG`'s syntax: `rust_log` when it is set and not blank; else alloctrace's own messages
/// from info up (what it has always said), one level fewer per `-q` and one more per `-v`; other crates' are
/// said from `-v` on.
pub fn filter(verbose: u8, quiet: u8, rust_log: Option<&str>) -> String {
    if let Some(spec) = rust_log.filter(|spec| !spec.trim().is_empty()) {
        return spec.to_owned();
    }
    let (own, others) = match i16::from(verbose) - i16::from(quiet) {
        ..=-2 => ("error", "off"),
        -1 => ("warn", "off"),
        0 => ("info", "off"),
        1 => ("debug", "warn"),
        _ => ("trace", "info"),
    };
    let own: Vec<String> = OWN_CRATES
        .iter()
        .map(|name| format!("{name}={own}"))
        .collect();
    format!("{others},{}", own.join(","))
}

fn is_own(target: &str) -> bool {
    OWN_CRATES.iter().any(|name| {
        target
            .strip_prefix(name)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
    })
}

/// The line `record` is shown as (without its newline). alloctrace's own messages read as they always have,
/// `alloctrace: …`; details and other crates' messages say their level and where they come from.
pub fn line(record: &Record<'_>) -> String {
    let message = record.args().to_string();
    if is_own(record.target()) && record.level() <= Level::Info {
        format!("alloctrace: {}", Escaped(&message))
    } else {
        format!(
            "alloctrace: {} {}: {}",
            record.level().as_str().to_lowercase(),
            Escaped(record.target()),
            Escaped(&message)
        )
    }
}

/// Installs the logger for the process, with [`filter`]`(verbose, quiet, $RUST_LOG)`.
pub fn init(verbose: u8, quiet: u8) {
    let rust_log = std::env::var("RUST_LOG").ok();
    env_logger::Builder::new()
        .parse_filters(&filter(verbose, quiet, rust_log.as_deref()))
        .format(|out, record| writeln!(out, "{}", line(record)))
        .target(env_logger::Target::Stderr)
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_says_what_alloctrace_always_said_and_q_and_v_move_it() {
        assert_eq!(filter(0, 0, None), "off,tracer=info,alloctrace=info");
        assert_eq!(filter(0, 1, None), "off,tracer=warn,alloctrace=warn");
        assert_eq!(filter(0, 3, None), "off,tracer=error,alloctrace=error");
        assert_eq!(filter(1, 0, None), "warn,tracer=debug,alloctrace=debug");
        assert_eq!(filter(2, 0, None), "info,tracer=trace,alloctrace=trace");
        assert_eq!(filter(1, 1, None), "off,tracer=info,alloctrace=info");
    }

    #[test]
    fn rust_log_decides_when_it_is_set() {
        assert_eq!(
            filter(2, 0, Some("tracer::probes=debug")),
            "tracer::probes=debug"
        );
        assert_eq!(filter(0, 0, Some("  ")), "off,tracer=info,alloctrace=info");
    }

    #[test]
    fn own_messages_read_as_before_and_every_line_is_escaped() {
        let info = line(
            &Record::builder()
                .args(format_args!("tracing pid 7 through /tmp/\x1b[2Jx\nforged"))
                .level(Level::Info)
                .target("tracer::trace")
                .build(),
        );
        assert_eq!(
            info,
            "alloctrace: tracing pid 7 through /tmp/\\x1b[2Jx\\nforged"
        );
        let warning = line(
            &Record::builder()
                .args(format_args!("no name"))
                .level(Level::Warn)
                .target("alloctrace")
                .build(),
        );
        assert_eq!(warning, "alloctrace: no name");
        let detail = line(
            &Record::builder()
                .args(format_args!("a\tb"))
                .level(Level::Debug)
                .target("tracer::probes")
                .build(),
        );
        assert_eq!(detail, "alloctrace: debug tracer::probes: a\\tb");
        let other = line(
            &Record::builder()
                .args(format_args!("loaded"))
                .level(Level::Info)
                .target("aya::bpf")
                .build(),
        );
        assert_eq!(other, "alloctrace: info aya::bpf: loaded");
        // A crate whose name only starts like ours is not ours.
        assert!(!is_own("tracer_common"));
    }
}
