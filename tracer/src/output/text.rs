//! Text output for people: a summary, the losses, then one block per site, most live bytes first. Every
//! string that comes from a target is shown through [`Escaped`], so that none can drive the terminal or
//! forge a line.

use std::io::{self, Write};

use super::{
    escape::Escaped,
    source::{Root, Sources},
};
use crate::{
    model::{Exit, Losses},
    procs::Frame,
    report::{
        Group, Header,
        large::LargeReport,
        leaks::{LeaksReport, SiteReport},
        oom::OomRecord,
        verdict::Verdict,
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
        (
            lost.untracked_blocks,
            "blocks untracked (live-block table full)",
        ),
        (
            lost.untracked_sites,
            "allocations uncounted (site table full)",
        ),
        (lost.histogram_sizes, "sizes missing from histograms"),
        (lost.stacks, "allocations without a stack"),
        (lost.undecodable, "undecodable records"),
        (lost.untraced_processes, "processes not attached to"),
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
    let module = Escaped(f.module.as_deref().unwrap_or("?"));
    let offset = f.offset.unwrap_or(0);
    let source = match (&f.file, f.line) {
        (Some(file), Some(line)) => format!(" at {}:{line}", Escaped(file)),
        (Some(file), None) => format!(" at {}", Escaped(file)),
        (None, _) => String::new(),
    };
    match &f.function {
        Some(function) if f.inlined => {
            format!(
                "{} (inlined){source}  ({module}+{offset:#x})",
                Escaped(function)
            )
        }
        // A name from the DWARF alone (no symbol) comes without the offset into its function.
        Some(function) if f.function_offset == 0 => {
            format!("{}{source}  ({module}+{offset:#x})", Escaped(function))
        }
        Some(function) => format!(
            "{}+{:#x}{source}  ({module}+{offset:#x})",
            Escaped(function),
            f.function_offset
        ),
        None => format!("{module}+{offset:#x}{source}"),
    }
}

/// How text is drawn: with colour or not, and the source lines of Python frames, read as they are needed.
pub struct Painter {
    color: bool,
    sources: Sources,
}

/// SGR codes of what is coloured: Python's own traceback colours (3.13) for file, line and function.
const MAGENTA: &str = "35";
const BOLD: &str = "1";
const DIM: &str = "2";

impl Painter {
    pub fn new(color: bool) -> Self {
        Self {
            color,
            sources: Sources::default(),
        }
    }

    /// `text` in the colour `sgr`, when colour is on. `text` is already escaped: the only control characters
    /// in the output are these.
    fn paint(&self, sgr: &str, text: impl std::fmt::Display) -> String {
        if self.color {
            format!("\x1b[{sgr}m{text}\x1b[0m")
        } else {
            text.to_string()
        }
    }

    fn verdict(&self, verdict: Verdict) -> String {
        let sgr = match verdict {
            Verdict::Leak => "1;31",
            Verdict::Lingering => "33",
            Verdict::Churn => "36",
            Verdict::Steady => "32",
        };
        self.paint(sgr, verdict.name())
    }
}

/// A stack, innermost first; its Python frames, if any, as a traceback (outermost first, like Python's own),
/// each with its source line under it when `root`'s process can show the file.
fn stack(out: &mut dyn Write, frames: &[Frame], p: &mut Painter, root: Root) -> io::Result<()> {
    if frames.is_empty() {
        writeln!(out, "    (stack lost)")?;
    }
    let first_python = frames.iter().position(Frame::is_python);
    let last_python = frames.iter().rposition(Frame::is_python);
    let (Some(first), Some(last)) = (first_python, last_python) else {
        for f in frames {
            writeln!(out, "    {}", p.paint(DIM, frame(f)))?;
        }
        return Ok(());
    };
    for f in &frames[..first] {
        writeln!(out, "    {}", p.paint(DIM, frame(f)))?;
    }
    writeln!(out, "    Traceback (most recent call last):")?;
    for f in frames[first..=last].iter().rev() {
        if f.is_python() && f.file.is_none() {
            writeln!(
                out,
                "      {}",
                Escaped(f.function.as_deref().unwrap_or("?"))
            )?;
        } else if f.is_python() {
            let file = f.file.as_deref().unwrap_or("?");
            let line = f.line.map_or_else(|| "?".to_owned(), |l| l.to_string());
            writeln!(
                out,
                "      File \"{}\", line {}, in {}",
                p.paint(MAGENTA, Escaped(file)),
                p.paint(MAGENTA, line),
                p.paint(MAGENTA, Escaped(f.function.as_deref().unwrap_or("?")))
            )?;
            if let Some(source) = f.line.and_then(|line| p.sources.line(root, file, line)) {
                writeln!(out, "        {}", Escaped(&source))?;
            }
        } else {
            writeln!(
                out,
                "      {}",
                p.paint(DIM, format!("[native] {}", frame(f)))
            )?;
        }
    }
    for f in &frames[last + 1..] {
        writeln!(out, "    {}", p.paint(DIM, frame(f)))?;
    }
    Ok(())
}

fn site(
    out: &mut dyn Write,
    rank: usize,
    s: &SiteReport,
    comm: &str,
    p: &mut Painter,
) -> io::Result<()> {
    writeln!(
        out,
        "#{rank} {} [{}]: {}{} live in {} blocks, oldest {}; {} allocated in {} calls; pid {} {}",
        s.kind,
        p.verdict(s.verdict),
        p.paint(BOLD, bytes(s.live_bytes)),
        s.live_bytes_error
            .map_or_else(String::new, |error| format!(" ± {}", bytes(error))),
        s.live_count,
        age(s.oldest_age_s),
        bytes(s.total_bytes),
        s.total_count,
        s.pid,
        Escaped(comm),
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
    writeln!(out, "    {}: {}", p.verdict(s.verdict), s.verdict_reason)?;
    let root = Root {
        pid: s.pid,
        on_host: s.container.is_none(),
    };
    stack(out, &s.stack, p, root)?;
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
                " [{} {} {}]",
                c.runtime,
                Escaped(c.name.as_deref().unwrap_or("?")),
                Escaped(&short)
            )
        });
        let ns_pid = p
            .info
            .ns_pid
            .map_or_else(String::new, |ns| format!(" (pid {ns} inside)"));
        let task = p.info.task.as_ref().map_or_else(String::new, |t| {
            format!(
                " airflow {}.{} {}{}",
                Escaped(&t.dag_id),
                Escaped(&t.task_id),
                Escaped(t.run_id.as_deref().unwrap_or("")),
                t.try_number
                    .map_or_else(String::new, |n| format!(" try {n}"))
            )
        });
        writeln!(
            out,
            "process {}{ns_pid} {}{container}{task}: {}{exit}",
            p.info.pid,
            Escaped(&p.info.comm),
            Escaped(&p.info.cmdline.join(" "))
        )?;
    }
    writeln!(out, "lost: {}", losses(&h.lost))?;
    if h.unreadable_python_frames > 0 {
        writeln!(
            out,
            "{} Python frames could not be read (code freed before it was read, mostly imports)",
            h.unreadable_python_frames
        )?;
    }
    if h.cache_evictions.total() > 0 {
        writeln!(
            out,
            "caches at their bounds: {} symbol files and {} Python code objects evicted (read again when needed)",
            h.cache_evictions.modules, h.cache_evictions.python_code_objects
        )?;
    }
    if let Some(every) = h.sampled_every_bytes {
        writeln!(
            out,
            "sampled: one allocation every {} on average, weighted; live bytes are estimates (± one standard error)",
            bytes(every)
        )?;
    }
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
            Escaped(&g.key),
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

pub fn write_leaks(report: &LeaksReport, color: bool, out: &mut dyn Write) -> io::Result<()> {
    let p = &mut Painter::new(color);
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
        site(out, rank + 1, s, report.header.comm(s.pid), p)?;
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

pub fn write_oom(record: &OomRecord, color: bool, out: &mut dyn Write) -> io::Result<()> {
    let p = &mut Painter::new(color);
    let root = Root {
        pid: record.victim.pid,
        on_host: record.container.is_none(),
    };
    let v = &record.victim;
    writeln!(
        out,
        "{} OOM kill: pid {} {} ({}): anon {}, file {}, shmem {}",
        record.time,
        v.pid,
        Escaped(&v.comm),
        Escaped(&v.cmdline.join(" ")),
        bytes(v.anon_rss_bytes),
        bytes(v.file_rss_bytes),
        bytes(v.shmem_rss_bytes),
    )?;
    if let Some(c) = &record.container {
        writeln!(
            out,
            "    container: {} {} ({})",
            c.runtime,
            Escaped(c.name.as_deref().unwrap_or("?")),
            Escaped(&c.id)
        )?;
    }
    match &record.memcg {
        Some(m) => writeln!(
            out,
            "    memory cgroup {} hit its limit of {}",
            Escaped(&m.path),
            bytes(m.limit_bytes)
        )?,
        None => writeln!(out, "    no memory cgroup limit: the host ran out")?,
    }
    if let Some(t) = &record.task {
        writeln!(
            out,
            "    airflow task {}.{} {}",
            Escaped(&t.dag_id),
            Escaped(&t.task_id),
            Escaped(t.run_id.as_deref().unwrap_or(""))
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
            p.paint(BOLD, bytes(s.live_bytes)),
            s.live_count
        )?;
        stack(out, &s.stack, p, root)?;
    }
    writeln!(out)
}

pub fn write_large(report: &LargeReport, color: bool, out: &mut dyn Write) -> io::Result<()> {
    let p = &mut Painter::new(color);
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
            p.paint(BOLD, bytes(o.size)),
            o.address,
            age(o.age_s),
            o.kind,
            o.pid,
            Escaped(report.header.comm(o.pid)),
        )?;
        let root = Root {
            pid: o.pid,
            on_host: o.container.is_none(),
        };
        stack(out, &o.stack, p, root)?;
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
    use crate::{
        model::{CacheEvictions, ProcessReport},
        procs::{ProcessInfo, airflow::TaskIdentity, container::Container},
        report::{
            GroupBy, large,
            large::LargeObject,
            leaks,
            leaks::SizeHistogram,
            oom::{Memcg, TopStack, Victim},
            tests as synthetic,
        },
    };

    /// What a hostile target puts in every string it controls: a screen clear, a window-title change, a C1
    /// control sequence, and a newline that forges a traceback line.
    const HOSTILE: &str = "x\x1b[2J\x1b]0;owned\x07\u{9b}31m\n  File \"/etc/shadow\", line 1";
    const HOSTILE_SHOWN: &str =
        "x\\x1b[2J\\x1b]0;owned\\x07\\x9b31m\\n  File \"/etc/shadow\", line 1";

    fn hostile() -> String {
        HOSTILE.to_owned()
    }

    /// Native, a traceback of four frames (one native, one without a file), native: 7 lines.
    fn hostile_stack() -> Vec<Frame> {
        let native = |function: Option<String>| Frame {
            function_offset: 4,
            ..Frame::native(function, Some(hostile()), Some(0x1234))
        };
        vec![
            native(Some(hostile())),
            Frame::python(hostile(), hostile(), Some(3)),
            Frame {
                file: None,
                ..Frame::python(hostile(), hostile(), None)
            },
            native(Some(hostile())),
            Frame::python(hostile(), hostile(), Some(1)),
            native(None),
        ]
    }

    fn hostile_container() -> Container {
        Container {
            id: hostile(),
            name: Some(hostile()),
            runtime: "docker",
            cgroup: hostile(),
            pod_uid: Some(hostile()),
            qos_class: None,
        }
    }

    fn hostile_task() -> TaskIdentity {
        TaskIdentity {
            dag_id: hostile(),
            task_id: hostile(),
            run_id: Some(hostile()),
            try_number: Some(1),
        }
    }

    fn hostile_header() -> Header {
        Header {
            schema: 1,
            command: "leaks",
            duration_s: 1.0,
            lost: Losses::default(),
            complete: true,
            frees_of_untraced_blocks: 0,
            frees_not_seen: 0,
            processes: vec![ProcessReport {
                info: ProcessInfo {
                    pid: 42,
                    ns_pid: Some(7),
                    comm: hostile(),
                    cmdline: vec![hostile(), hostile()],
                    container: Some(hostile_container()),
                    task: Some(hostile_task()),
                },
                exit: Some(Exit::Code(0)),
                python: None,
            }],
            allocators: Vec::new(),
            tracer_max_rss_bytes: 0,
            sampled_every_bytes: None,
            unreadable_python_frames: 0,
            cache_evictions: CacheEvictions::default(),
            memory_over_time: Vec::new(),
        }
    }

    fn hostile_group() -> Group {
        Group {
            key: hostile(),
            pid: Some(42),
            container: Some(hostile_container()),
            live_bytes: 1,
            live_count: 1,
            members: 1,
        }
    }

    /// Checks that `text`, a report rendered from hostile strings, shows them escaped, and that none of their
    /// control characters or newlines got through: each line is one the writer wrote.
    fn assert_escaped(text: &str, lines: usize) {
        assert!(
            !text.chars().any(|c| c != '\n' && c.is_control()),
            "a control character reached the output:\n{text}"
        );
        assert!(text.contains(HOSTILE_SHOWN), "{text}");
        assert_eq!(
            text.matches("File \"/etc/shadow\"").count(),
            text.matches(HOSTILE_SHOWN).count(),
            "every /etc/shadow line is inside an escaped string:\n{text}"
        );
        assert!(
            !text
                .lines()
                .any(|l| l.trim_start().starts_with("File \"/etc/shadow\"")),
            "a forged traceback line:\n{text}"
        );
        assert_eq!(text.lines().count(), lines, "{text}");
    }

    #[test]
    fn no_string_from_a_target_reaches_the_terminal_raw_in_leaks() {
        let report = LeaksReport {
            header: hostile_header(),
            min_age_s: 0.0,
            live_bytes: 1,
            live_count: 1,
            site_count: 1,
            allocated_bytes: 1,
            allocated_count: 1,
            groups: vec![hostile_group()],
            sites: vec![SiteReport {
                pid: 42,
                container: Some(hostile_container()),
                kind: "malloc",
                live_bytes: 1,
                live_bytes_error: None,
                live_count: 1,
                total_bytes: 1,
                total_count: 1,
                freed_bytes: 0,
                freed_count: 0,
                alloc_rate_per_s: 1.0,
                free_rate_per_s: 0.0,
                oldest_age_s: 1.0,
                size_histogram: SizeHistogram::default(),
                verdict: Verdict::Leak,
                verdict_reason: "grows".to_owned(),
                stack: hostile_stack(),
            }],
        };
        let mut out = Vec::new();
        write_leaks(&report, false, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        // Title, process, losses, blank, group, blank, 3 site lines, 7 stack lines, blank.
        assert_escaped(&text, 17);
        assert!(text.contains("(pid 7 inside)"), "{text}");
    }

    #[test]
    fn no_string_from_a_target_reaches_the_terminal_raw_in_large() {
        let report = LargeReport {
            header: hostile_header(),
            min_size: 1,
            min_age_s: 0.0,
            object_count: 1,
            object_bytes: 1,
            groups: vec![hostile_group()],
            objects: vec![LargeObject {
                pid: 42,
                container: Some(hostile_container()),
                kind: "mmap",
                address: 0x1000,
                size: 1,
                age_s: 1.0,
                stack: hostile_stack(),
            }],
        };
        let mut out = Vec::new();
        write_large(&report, false, &mut out).unwrap();
        // Title, process, losses, blank, group, blank, object, 7 stack lines, blank.
        assert_escaped(&String::from_utf8(out).unwrap(), 15);
    }

    #[test]
    fn no_string_from_a_target_reaches_the_terminal_raw_in_oom() {
        let record = OomRecord {
            schema: 1,
            event: "oom_kill",
            time: "2024-01-01T00:00:00Z".to_owned(),
            victim: Victim {
                pid: 42,
                ns_pid: None,
                comm: hostile(),
                cmdline: vec![hostile()],
                total_vm_bytes: 0,
                anon_rss_bytes: 0,
                file_rss_bytes: 0,
                shmem_rss_bytes: 0,
            },
            container: Some(hostile_container()),
            memcg: Some(Memcg {
                path: hostile(),
                limit_bytes: 1 << 20,
            }),
            task: Some(hostile_task()),
            traced: true,
            top_stacks: vec![TopStack {
                live_bytes: 1,
                live_count: 1,
                stack: hostile_stack(),
            }],
            growth: Vec::new(),
            escalation: None,
        };
        let mut out = Vec::new();
        write_oom(&record, false, &mut out).unwrap();
        // Kill, container, memcg, task, stack title, 7 stack lines, blank.
        assert_escaped(&String::from_utf8(out).unwrap(), 13);
    }

    #[test]
    fn python_frames_show_their_source_line_escaped_and_a_missing_file_is_skipped() {
        let dir = std::env::temp_dir().join(format!("alloctrace-text-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("etl.py");
        std::fs::write(&file, "def load():\n    rows = '\x1b[2J' * 10\n").unwrap();
        let path = file.to_str().unwrap().to_owned();
        let frames = vec![
            Frame::python("load".to_owned(), path.clone(), Some(2)),
            Frame::python("main".to_owned(), "/nonexistent/etl.py".to_owned(), Some(1)),
        ];
        let root = Root {
            pid: std::process::id(),
            on_host: false,
        };
        let mut plain = Vec::new();
        stack(&mut plain, &frames, &mut Painter::new(false), root).unwrap();
        let mut colored = Vec::new();
        stack(&mut colored, &frames, &mut Painter::new(true), root).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            String::from_utf8(plain).unwrap(),
            format!(
                "    Traceback (most recent call last):\n      \
                 File \"/nonexistent/etl.py\", line 1, in main\n      \
                 File \"{path}\", line 2, in load\n        \
                 rows = '\\x1b[2J' * 10\n"
            )
        );
        let colored = String::from_utf8(colored).unwrap();
        assert!(
            colored.contains(&format!(
                "File \"\x1b[35m{path}\x1b[0m\", line \x1b[35m2\x1b[0m, in \x1b[35mload\x1b[0m\n"
            )),
            "{colored:?}"
        );
        // The only escape sequences are the colours: the file's own is shown, not run.
        assert!(colored.contains("rows = '\\x1b[2J'"), "{colored:?}");
    }

    #[test]
    fn leaks_of_a_synthetic_trace_read_to_the_byte() {
        let options = synthetic::leaks_options(GroupBy::Process);
        let report = leaks::build(&synthetic::trace(), &options, synthetic::TRACER_RSS);
        let mut out = Vec::new();
        write_leaks(&report, false, &mut out).unwrap();
        let expected = [
            "alloctrace leaks: 1.0 MiB live in 5 blocks at 3 sites, traced 10.0 s",
            "process 100 worker: worker",
            "process 200 etl-job [docker etl c0ffeec0ffee]: etl-job",
            "lost: none",
            "",
            "pid 100 worker: 1.0 MiB live in 5 blocks, 2 sites",
            "pid 200 etl-job: 0 B live in 0 blocks, 1 sites",
            "",
            "#1 mmap [lingering]: 1.0 MiB live in 1 blocks, oldest 8.0 s; 1.0 MiB allocated in 1 calls; pid 100 worker",
            "    sizes p50 1.0 MiB p90 1.0 MiB p99 1.0 MiB max 1.0 MiB; 0.1 allocs/s, 0.0 frees/s",
            "    lingering: a block of 1048576 bytes has been alive for 8.0 s",
            "    load_table  (/usr/bin/worker+0x1000)",
            "    main  (/usr/bin/worker+0x1000)",
            "",
            "#2 malloc [leak]: 3.9 KiB live in 4 blocks, oldest 9.0 s; 5.9 KiB allocated in 6 calls; pid 100 worker",
            "    sizes p50 1000 B p90 1000 B p99 1000 B max 1000 B; 0.6 allocs/s, 0.2 frees/s",
            "    leak: 4 blocks allocated all through the trace are still live (67% of 6 never freed)",
            "    leak_site  (/usr/bin/worker+0x1000)",
            "    main  (/usr/bin/worker+0x1000)",
            "",
            "#3 malloc [churn]: 0 B live in 0 blocks, oldest 0.00 s; 125.0 KiB allocated in 2000 calls; pid 200 etl-job",
            "    sizes p50 64 B p90 64 B p99 64 B max 64 B; 200.0 allocs/s, 200.0 frees/s",
            "    churn: allocates 200 blocks/s and frees 100% of them",
            "    parse_row  (/usr/bin/worker+0x1000)",
            "    main  (/usr/bin/worker+0x1000)",
            "",
            "",
        ];
        assert_eq!(String::from_utf8(out).unwrap(), expected.join("\n"));
    }

    #[test]
    fn large_objects_of_a_synthetic_trace_read_to_the_byte() {
        let options = large::LargeOptions {
            min_size: 1000,
            min_age_ns: 0,
            top: 2,
            group_by: GroupBy::Container,
        };
        let report = large::build(&synthetic::trace(), &options, synthetic::TRACER_RSS);
        let mut out = Vec::new();
        write_large(&report, false, &mut out).unwrap();
        let expected = [
            "alloctrace large: 5 objects of at least 1000 B hold 1.0 MiB, traced 10.0 s",
            "process 100 worker: worker",
            "process 200 etl-job [docker etl c0ffeec0ffee]: etl-job",
            "lost: none",
            "",
            "host: 1.0 MiB live in 5 blocks, 5 objects",
            "",
            "#1 1.0 MiB at 0x7f0000000000, alive 8.0 s, from mmap; pid 100 worker",
            "    load_table  (/usr/bin/worker+0x1000)",
            "    main  (/usr/bin/worker+0x1000)",
            "",
            "#2 1000 B at 0x1000, alive 9.0 s, from malloc; pid 100 worker",
            "    leak_site  (/usr/bin/worker+0x1000)",
            "    main  (/usr/bin/worker+0x1000)",
            "",
            "(3 more objects not shown: raise --top)",
            "",
        ];
        assert_eq!(String::from_utf8(out).unwrap(), expected.join("\n"));
    }

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
        // No such process: no source is read.
        let nowhere = Root {
            pid: u32::MAX,
            on_host: false,
        };
        stack(&mut out, &frames, &mut Painter::new(false), nowhere).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "    Traceback (most recent call last):\n      \
             (outer frames not captured: deeper than 48)\n      \
             File \"/app/deep.py\", line 9, in recurse\n      \
             File \"/app/deep.py\", line 7, in recurse\n"
        );
    }
}
