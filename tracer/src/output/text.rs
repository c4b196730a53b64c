//! Text output for people: a summary, the losses, then one block per site, most live bytes first.

use std::io::{self, Write};

use crate::{
    procs::Frame,
    report::{
        Exit, Group, Header, Losses,
        large::LargeReport,
        leaks::{LeaksReport, SiteReport},
        oom::OomRecord,
    },
};

/// `1536` → `1.5 KiB`; bytes below 1 KiB stay exact.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// Seconds for people: `0.25 s`, `4.8 s`, `3m 12s`.
pub fn age(seconds: f64) -> String {
    if seconds < 1.0 {
        format!("{seconds:.2} s")
    } else if seconds < 120.0 {
        format!("{seconds:.1} s")
    } else {
        let whole = seconds as u64;
        format!("{}m {:02}s", whole / 60, whole % 60)
    }
}

fn losses(lost: &Losses) -> String {
    let parts: Vec<String> = [
        (lost.events, "records dropped (ring buffer full)"),
        (
            lost.untracked_calls,
            "calls untracked (in-flight table full)",
        ),
        (lost.stacks, "allocations without a stack"),
        (lost.undecodable, "undecodable records"),
    ]
    .iter()
    .filter(|(n, _)| *n > 0)
    .map(|(n, what)| format!("{n} {what}"))
    .collect();
    if parts.is_empty() {
        "none".to_owned()
    } else {
        parts.join(", ")
    }
}

fn frame(f: &Frame) -> String {
    let module = f.module.as_deref().unwrap_or("?");
    let offset = f.offset.unwrap_or(0);
    match &f.function {
        Some(function) => format!(
            "{function}+{:#x}  ({module}+{offset:#x})",
            f.function_offset
        ),
        None => format!("{module}+{offset:#x}"),
    }
}

/// A stack, innermost first; its Python frames, if any, as a traceback (outermost first, like Python's own).
fn stack(out: &mut dyn Write, frames: &[Frame]) -> io::Result<()> {
    if frames.is_empty() {
        writeln!(out, "    (stack lost)")?;
    }
    let first_python = frames.iter().position(Frame::is_python);
    let last_python = frames.iter().rposition(Frame::is_python);
    let (Some(first), Some(last)) = (first_python, last_python) else {
        for f in frames {
            writeln!(out, "    {}", frame(f))?;
        }
        return Ok(());
    };
    for f in &frames[..first] {
        writeln!(out, "    {}", frame(f))?;
    }
    writeln!(out, "    Traceback (most recent call last):")?;
    for f in frames[first..=last].iter().rev() {
        if f.is_python() && f.file.is_none() {
            writeln!(out, "      {}", f.function.as_deref().unwrap_or("?"))?;
        } else if f.is_python() {
            let line = f.line.map_or_else(|| "?".to_owned(), |l| l.to_string());
            writeln!(
                out,
                "      File \"{}\", line {line}, in {}",
                f.file.as_deref().unwrap_or("?"),
                f.function.as_deref().unwrap_or("?")
            )?;
        } else {
            writeln!(out, "      [native] {}", frame(f))?;
        }
    }
    for f in &frames[last + 1..] {
        writeln!(out, "    {}", frame(f))?;
    }
    Ok(())
}

fn site(out: &mut dyn Write, rank: usize, s: &SiteReport, comm: &str) -> io::Result<()> {
    writeln!(
        out,
        "#{rank} {} [{}]: {} live in {} blocks, oldest {}; {} allocated in {} calls; pid {} {comm}",
        s.kind,
        s.verdict.name(),
        bytes(s.live_bytes),
        s.live_count,
        age(s.oldest_age_s),
        bytes(s.total_bytes),
        s.total_count,
        s.pid,
    )?;
    let h = &s.size_histogram;
    writeln!(
        out,
        "    sizes p50 {} p90 {} p99 {} max {}; {:.1} allocs/s, {:.1} frees/s",
        bytes(h.p50),
        bytes(h.p90),
        bytes(h.p99),
        bytes(h.max),
        s.alloc_rate_per_s,
        s.free_rate_per_s,
    )?;
    writeln!(out, "    {}: {}", s.verdict.name(), s.verdict_reason)?;
    stack(out, &s.stack)?;
    writeln!(out)
}

/// The lines every report starts with: processes, losses, and a warning when data was lost.
fn header(out: &mut dyn Write, h: &Header) -> io::Result<()> {
    for p in &h.processes {
        let exit = match p.exit {
            None => String::new(),
            Some(Exit::Code(code)) => format!(" (exited with status {code})"),
            Some(Exit::Signal(sig)) => format!(" (killed by signal {sig})"),
            Some(Exit::Exited) => " (exited)".to_owned(),
        };
        let container = p.info.container.as_ref().map_or_else(String::new, |c| {
            let short: String = c.id.chars().take(12).collect();
            format!(
                " [{} {} {short}]",
                c.runtime,
                c.name.as_deref().unwrap_or("?")
            )
        });
        let ns_pid = p
            .info
            .ns_pid
            .map_or_else(String::new, |ns| format!(" (pid {ns} inside)"));
        let task = p.info.task.as_ref().map_or_else(String::new, |t| {
            format!(
                " airflow {}.{} {}{}",
                t.dag_id,
                t.task_id,
                t.run_id.as_deref().unwrap_or(""),
                t.try_number
                    .map_or_else(String::new, |n| format!(" try {n}"))
            )
        });
        writeln!(
            out,
            "process {}{ns_pid} {}{container}{task}: {}{exit}",
            p.info.pid,
            p.info.comm,
            p.info.cmdline.join(" ")
        )?;
    }
    writeln!(out, "lost: {}", losses(&h.lost))?;
    if !h.complete {
        writeln!(
            out,
            "WARNING: data was lost during this trace; the numbers below are lower bounds."
        )?;
    }
    writeln!(out)
}

/// The `--group-by` summary, biggest first.
fn groups(out: &mut dyn Write, groups: &[Group], members: &str) -> io::Result<()> {
    for g in groups {
        writeln!(
            out,
            "{}: {} live in {} blocks, {} {members}",
            g.key,
            bytes(g.live_bytes),
            g.live_count,
            g.members
        )?;
    }
    if !groups.is_empty() {
        writeln!(out)?;
    }
    Ok(())
}

pub fn write_leaks(report: &LeaksReport, out: &mut dyn Write) -> io::Result<()> {
    writeln!(
        out,
        "alloctrace leaks: {} live in {} blocks at {} sites, traced {}{}",
        bytes(report.live_bytes),
        report.live_count,
        report.site_count,
        age(report.header.duration_s),
        if report.min_age_s > 0.0 {
            format!(", counting blocks older than {}", age(report.min_age_s))
        } else {
            String::new()
        }
    )?;
    header(out, &report.header)?;
    groups(out, &report.groups, "sites")?;
    if report.sites.is_empty() {
        writeln!(out, "No live allocations.")?;
    }
    for (rank, s) in report.sites.iter().enumerate() {
        site(out, rank + 1, s, report.header.comm(s.pid))?;
    }
    if report.site_count > report.sites.len() {
        writeln!(
            out,
            "({} more sites not shown: raise --top)",
            report.site_count - report.sites.len()
        )?;
    }
    Ok(())
}

pub fn write_oom(record: &OomRecord, out: &mut dyn Write) -> io::Result<()> {
    let v = &record.victim;
    writeln!(
        out,
        "{} OOM kill: pid {} {} ({}): anon {}, file {}, shmem {}",
        record.time,
        v.pid,
        v.comm,
        v.cmdline.join(" "),
        bytes(v.anon_rss_bytes),
        bytes(v.file_rss_bytes),
        bytes(v.shmem_rss_bytes),
    )?;
    if let Some(c) = &record.container {
        writeln!(
            out,
            "    container: {} {} ({})",
            c.runtime,
            c.name.as_deref().unwrap_or("?"),
            c.id
        )?;
    }
    match &record.memcg {
        Some(m) => writeln!(
            out,
            "    memory cgroup {} hit its limit of {}",
            m.path,
            bytes(m.limit_bytes)
        )?,
        None => writeln!(out, "    no memory cgroup limit: the host ran out")?,
    }
    if let Some(t) = &record.task {
        writeln!(
            out,
            "    airflow task {}.{} {}",
            t.dag_id,
            t.task_id,
            t.run_id.as_deref().unwrap_or("")
        )?;
    }
    if !record.traced {
        writeln!(
            out,
            "    (not traced: no stacks; name it with -p, --comm or a command to get them)"
        )?;
    }
    if !record.growth.is_empty() {
        let series: Vec<String> = record
            .growth
            .iter()
            .map(|g| format!("{} at -{:.0}s", bytes(g.live_bytes), g.seconds_before))
            .collect();
        writeln!(
            out,
            "    live memory before the kill: {}",
            series.join(", ")
        )?;
    }
    for (rank, s) in record.top_stacks.iter().enumerate() {
        writeln!(
            out,
            "  #{} {} live in {} blocks",
            rank + 1,
            bytes(s.live_bytes),
            s.live_count
        )?;
        stack(out, &s.stack)?;
    }
    writeln!(out)
}

pub fn write_large(report: &LargeReport, out: &mut dyn Write) -> io::Result<()> {
    writeln!(
        out,
        "alloctrace large: {} objects of at least {} hold {}, traced {}{}",
        report.object_count,
        bytes(report.min_size),
        bytes(report.object_bytes),
        age(report.header.duration_s),
        if report.min_age_s > 0.0 {
            format!(", older than {}", age(report.min_age_s))
        } else {
            String::new()
        }
    )?;
    header(out, &report.header)?;
    groups(out, &report.groups, "objects")?;
    if report.objects.is_empty() {
        writeln!(out, "No large objects alive.")?;
    }
    for (rank, o) in report.objects.iter().enumerate() {
        writeln!(
            out,
            "#{} {} at {:#x}, alive {}, from {}; pid {} {}",
            rank + 1,
            bytes(o.size),
            o.address,
            age(o.age_s),
            o.kind,
            o.pid,
            report.header.comm(o.pid),
        )?;
        stack(out, &o.stack)?;
        writeln!(out)?;
    }
    if report.object_count > report.objects.len() {
        writeln!(
            out,
            "({} more objects not shown: raise --top)",
            report.object_count - report.objects.len()
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_like_people_write_them() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(8 << 20), "8.0 MiB");
        assert_eq!(bytes(3 << 30), "3.0 GiB");
    }

    #[test]
    fn ages_read_like_people_write_them() {
        assert_eq!(age(0.25), "0.25 s");
        assert_eq!(age(4.81), "4.8 s");
        assert_eq!(age(192.0), "3m 12s");
    }

    #[test]
    fn losses_are_spelled_out() {
        assert_eq!(losses(&Losses::default()), "none");
        let lost = Losses {
            events: 3,
            stacks: 1,
            ..Losses::default()
        };
        assert_eq!(
            losses(&lost),
            "3 records dropped (ring buffer full), 1 allocations without a stack"
        );
    }

    #[test]
    fn a_truncated_python_stack_says_so_where_its_outer_frames_would_be() {
        let frames = [
            Frame::python("recurse".to_owned(), "/app/deep.py".to_owned(), Some(7)),
            Frame::python("recurse".to_owned(), "/app/deep.py".to_owned(), Some(9)),
            Frame::outer_python_frames_missing(),
        ];
        let mut out = Vec::new();
        stack(&mut out, &frames).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "    Traceback (most recent call last):\n      \
             (outer frames not captured: deeper than 48)\n      \
             File \"/app/deep.py\", line 9, in recurse\n      \
             File \"/app/deep.py\", line 7, in recurse\n"
        );
    }
}
