//! A profile: memory by stack, in the neutral shape every picture and standard format is drawn from (folded
//! stacks, flame graphs, pprof, the HTML page). Each sample owns its stack, its labels and its values, so that
//! any source can build one: the `leaks`, `large` and `oom` reports here, or a long-running agent from its own
//! tables. The writers take a [`Profile`] and nothing report-specific.

use std::{collections::BTreeMap, ops::AddAssign, path::Path};

use crate::{
    model::Exit,
    os,
    procs::{Frame, container::Container, module},
    report::{Header, large::LargeReport, leaks::LeaksReport, oom::OomRecord, verdict::Verdict},
};

use super::text::bytes;

/// Memory by stack.
#[derive(Clone, Debug, Default)]
pub struct Profile {
    /// What the profile is of, with its totals: the title of a flame graph or a page.
    pub title: String,
    pub samples: Vec<ProfileSample>,
    /// One allocation recorded every this many bytes on average (the values are already weighted), `None`
    /// when every allocation was recorded.
    pub sampled_every_bytes: Option<u64>,
    /// Whether `alloc_*` values are known: an OOM record keeps only what was live at the kill.
    pub alloc_known: bool,
    /// How long the trace ran.
    pub duration_ns: u64,
    /// GNU build ids of the modules the stacks name (path as the process mapped it → lowercase hex), where
    /// [`Profile::read_build_ids`] could read one.
    pub build_ids: BTreeMap<String, String>,
    /// Each process's live bytes over time, oldest first (for the HTML page's chart).
    pub series: Vec<Series>,
    /// Lines that say what was traced and how (processes, losses, sampling), for pages.
    pub summary: Vec<String>,
}

/// One process's live bytes over time.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Series {
    pub pid: u32,
    pub comm: String,
    pub container: Option<String>,
    /// (seconds since the trace began, live bytes), oldest first.
    pub points: Vec<(f64, u64)>,
}

/// One stack and what it holds.
#[derive(Clone, Debug, PartialEq)]
pub struct ProfileSample {
    /// Innermost first.
    pub frames: Vec<Frame>,
    pub labels: Labels,
    pub values: Values,
    /// What the site's history says of it, and why, where a report judged it.
    pub verdict: Option<(Verdict, String)>,
}

/// Who held the memory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Labels {
    pub pid: u32,
    pub comm: String,
    /// The allocator function or system call (`malloc`, `mmap`, …).
    pub kind: &'static str,
    /// The container's name, or its id when it has none known.
    pub container: Option<String>,
    pub container_id: Option<String>,
    pub dag_id: Option<String>,
    pub task_id: Option<String>,
}

/// What a stack holds and has allocated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Values {
    pub inuse_bytes: u64,
    pub inuse_objects: u64,
    pub alloc_bytes: u64,
    pub alloc_objects: u64,
}

impl AddAssign for Values {
    fn add_assign(&mut self, other: Self) {
        self.inuse_bytes += other.inuse_bytes;
        self.inuse_objects += other.inuse_objects;
        self.alloc_bytes += other.alloc_bytes;
        self.alloc_objects += other.alloc_objects;
    }
}

impl Labels {
    fn new(header: &Header, pid: u32, kind: &'static str, container: Option<&Container>) -> Self {
        let task = header
            .processes
            .iter()
            .find(|p| p.info.pid == pid)
            .and_then(|p| p.info.task.as_ref());
        Self {
            pid,
            comm: header.comm(pid).to_owned(),
            kind,
            container: container.map(container_name),
            container_id: container.map(|c| c.id.clone()),
            dag_id: task.map(|t| t.dag_id.clone()),
            task_id: task.map(|t| t.task_id.clone()),
        }
    }
}

fn container_name(c: &Container) -> String {
    c.name.clone().unwrap_or_else(|| c.id.clone())
}

/// `1536 B (1.5 KiB)`: the exact number, then the readable one.
fn exact_bytes(n: u64) -> String {
    if n < 1024 {
        format!("{n} B")
    } else {
        format!("{} ({n} B)", bytes(n))
    }
}

impl Profile {
    /// A site per sample, as the report lists them (after `--top`).
    pub fn from_leaks(report: &LeaksReport) -> Self {
        let samples: Vec<ProfileSample> = report
            .sites
            .iter()
            .map(|s| ProfileSample {
                frames: s.stack.clone(),
                labels: Labels::new(&report.header, s.pid, s.kind, s.container.as_ref()),
                values: Values {
                    inuse_bytes: s.live_bytes,
                    inuse_objects: s.live_count,
                    alloc_bytes: s.total_bytes,
                    alloc_objects: s.total_count,
                },
                verdict: Some((s.verdict, s.verdict_reason.clone())),
            })
            .collect();
        let mut profile = Self::new(&report.header, samples, true);
        let totals = profile.totals();
        profile.title = format!(
            "alloctrace leaks: {} live in {} blocks at {} sites; {} allocated in {} calls",
            exact_bytes(totals.inuse_bytes),
            totals.inuse_objects,
            profile.samples.len(),
            bytes(totals.alloc_bytes),
            totals.alloc_objects,
        );
        profile
    }

    /// Each object its own sample, even where objects share a stack.
    pub fn from_large(report: &LargeReport) -> Self {
        let samples: Vec<ProfileSample> = report
            .objects
            .iter()
            .map(|o| ProfileSample {
                frames: o.stack.clone(),
                labels: Labels::new(&report.header, o.pid, o.kind, o.container.as_ref()),
                values: Values {
                    inuse_bytes: o.size,
                    inuse_objects: 1,
                    alloc_bytes: o.size,
                    alloc_objects: 1,
                },
                verdict: None,
            })
            .collect();
        let mut profile = Self::new(&report.header, samples, true);
        profile.title = format!(
            "alloctrace large: {} objects of at least {}, {} live",
            profile.samples.len(),
            bytes(report.min_size),
            exact_bytes(profile.totals().inuse_bytes),
        );
        profile
    }

    /// The stacks that held the victim's memory when it was killed (the biggest the record keeps).
    pub fn from_oom(record: &OomRecord) -> Self {
        let v = &record.victim;
        let labels = Labels {
            pid: v.pid,
            comm: v.comm.clone(),
            kind: "",
            container: record.container.as_ref().map(container_name),
            container_id: record.container.as_ref().map(|c| c.id.clone()),
            dag_id: record.task.as_ref().map(|t| t.dag_id.clone()),
            task_id: record.task.as_ref().map(|t| t.task_id.clone()),
        };
        let samples: Vec<ProfileSample> = record
            .top_stacks
            .iter()
            .map(|s| ProfileSample {
                frames: s.stack.clone(),
                labels: labels.clone(),
                values: Values {
                    inuse_bytes: s.live_bytes,
                    inuse_objects: s.live_count,
                    ..Values::default()
                },
                verdict: None,
            })
            .collect();
        let oldest = record.growth.first().map_or(0.0, |g| g.seconds_before);
        let series = Series {
            pid: v.pid,
            comm: v.comm.clone(),
            container: labels.container.clone(),
            points: record
                .growth
                .iter()
                .map(|g| (oldest - g.seconds_before, g.live_bytes))
                .collect(),
        };
        let mut summary = vec![format!(
            "victim: pid {} {}: anon {}, file {}, shmem {}",
            v.pid,
            v.comm,
            bytes(v.anon_rss_bytes),
            bytes(v.file_rss_bytes),
            bytes(v.shmem_rss_bytes)
        )];
        if let Some(m) = &record.memcg {
            summary.push(format!(
                "memory cgroup {} hit its limit of {}",
                m.path,
                bytes(m.limit_bytes)
            ));
        }
        let mut profile = Self {
            samples,
            summary,
            alloc_known: false,
            duration_ns: (oldest * 1e9) as u64,
            series: if series.points.is_empty() {
                Vec::new()
            } else {
                vec![series]
            },
            ..Self::default()
        };
        profile.title = format!(
            "OOM kill of pid {} {} at {}: its {} biggest stacks held {}",
            v.pid,
            v.comm,
            record.time,
            profile.samples.len(),
            exact_bytes(profile.totals().inuse_bytes),
        );
        profile
    }

    fn new(header: &Header, samples: Vec<ProfileSample>, alloc_known: bool) -> Self {
        let series = header
            .memory_over_time
            .iter()
            .map(|m| Series {
                pid: m.pid,
                comm: header.comm(m.pid).to_owned(),
                container: header.container(m.pid).as_ref().map(container_name),
                points: m
                    .samples
                    .iter()
                    .map(|s| (s.seconds, s.live_bytes))
                    .collect(),
            })
            .collect();
        Self {
            samples,
            sampled_every_bytes: header.sampled_every_bytes,
            alloc_known,
            duration_ns: (header.duration_s * 1e9) as u64,
            series,
            summary: summary(header),
            ..Self::default()
        }
    }

    /// The values of every sample, summed.
    pub fn totals(&self) -> Values {
        let mut totals = Values::default();
        for s in &self.samples {
            totals += s.values;
        }
        totals
    }

    /// Reads the GNU build id of each native module the stacks name, inside the root of a process that maps
    /// it (`/proc/PID/root`, resolved as that process resolves it: a container's own files are read, its
    /// absolute symlinks included), and at the path itself for a process on the host: a container's module
    /// once its process is gone is not the host's file of the same path. Modules that cannot be read, or have
    /// no build id, are left out: pprof then names them by path only.
    pub fn read_build_ids(&mut self) {
        for sample in &self.samples {
            for module in sample.frames.iter().filter_map(|f| f.module.as_deref()) {
                if self.build_ids.contains_key(module) {
                    continue;
                }
                let path = Path::new(module);
                let in_root = os::open_root(sample.labels.pid)
                    .ok()
                    .and_then(|root| module::read_build_id_in_root(&root, path, module));
                let on_host = || {
                    (sample.labels.container_id.is_none())
                        .then(|| module::read_build_id(path, module))
                        .flatten()
                };
                if let Some(id) = in_root.or_else(on_host) {
                    self.build_ids.insert(module.to_owned(), hex(&id));
                }
            }
        }
    }
}

/// What a report's header says, line by line: the processes, the losses, the sampling.
fn summary(header: &Header) -> Vec<String> {
    let mut lines = vec![format!("traced for {:.1} s", header.duration_s)];
    for p in &header.processes {
        let exit = match p.exit {
            None => String::new(),
            Some(Exit::Code(code)) => format!(" (exited with status {code})"),
            Some(Exit::Signal(signal)) => format!(" (killed by signal {signal})"),
            Some(Exit::Exited) => " (exited)".to_owned(),
        };
        let container = p.info.container.as_ref().map_or_else(String::new, |c| {
            format!(" in container {}", container_name(c))
        });
        let task = p.info.task.as_ref().map_or_else(String::new, |t| {
            format!(" running Airflow task {}.{}", t.dag_id, t.task_id)
        });
        lines.push(format!(
            "process {} {}{container}{task}: {}{exit}",
            p.info.pid,
            p.info.comm,
            p.info.cmdline.join(" ")
        ));
    }
    let lost = header.lost.total();
    lines.push(if lost == 0 {
        "nothing lost: the numbers are exact".to_owned()
    } else {
        format!("{lost} records or allocations lost: the numbers are lower bounds")
    });
    if let Some(every) = header.sampled_every_bytes {
        lines.push(format!(
            "sampled: one allocation every {} on average, weighted: live bytes are estimates",
            bytes(every)
        ));
    }
    lines
}

/// A build id as pprof writes it, lowercase hex. The file it was read from may be a container's: it was opened
/// as the symbol reader opens objects (a regular file, never waiting on a FIFO), and only its headers and
/// notes were read, within a bound.
fn hex(id: &[u8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// A frame's name in a flame graph: `function (file:line)` for Python, `function` for native code with a
/// symbol, `module+0xoffset` (the module's file name) without one. Not escaped: each writer escapes for
/// its own format.
pub fn frame_name(f: &Frame) -> String {
    let function = f.function.as_deref().unwrap_or("?");
    if f.is_python() {
        return match (&f.file, f.line) {
            (Some(file), Some(line)) => format!("{function} ({file}:{line})"),
            (Some(file), None) => format!("{function} ({file})"),
            (None, _) => function.to_owned(),
        };
    }
    match (&f.function, &f.module) {
        (Some(function), _) => function.clone(),
        (None, Some(module)) => {
            let file = module.rsplit('/').next().unwrap_or(module);
            format!("{file}+{:#x}", f.offset.unwrap_or(0))
        }
        (None, None) => format!("{:#x}", f.offset.unwrap_or(0)),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn native(function: Option<&str>, module: &str, offset: u64) -> Frame {
        Frame::native(
            function.map(str::to_owned),
            Some(module.to_owned()),
            Some(offset),
        )
    }

    /// Two processes, Python over native code, and a native-only stack.
    pub fn sample_profile() -> Profile {
        let python_stack = vec![
            native(Some("PyMem_Malloc"), "/usr/lib/libpython3.11.so", 0x1000),
            Frame::python("load".to_owned(), "/app/etl.py".to_owned(), Some(12)),
            Frame::python("<module>".to_owned(), "/app/etl.py".to_owned(), Some(40)),
            native(Some("main"), "/usr/bin/python3.11", 0x40),
        ];
        let native_stack = vec![
            native(Some("leak_site"), "/work/sites", 0x1139),
            native(None, "/lib/x86_64-linux-gnu/libc.so.6", 0x2724a),
        ];
        let labels = |pid, comm: &str| Labels {
            pid,
            comm: comm.to_owned(),
            kind: "malloc",
            ..Labels::default()
        };
        Profile {
            title: "test".to_owned(),
            samples: vec![
                ProfileSample {
                    frames: python_stack,
                    labels: labels(10, "python3"),
                    values: Values {
                        inuse_bytes: 3000,
                        inuse_objects: 3,
                        alloc_bytes: 5000,
                        alloc_objects: 5,
                    },
                    verdict: Some((Verdict::Leak, "it grows".to_owned())),
                },
                ProfileSample {
                    frames: native_stack,
                    labels: Labels {
                        container: Some("web".to_owned()),
                        dag_id: Some("etl".to_owned()),
                        task_id: Some("load".to_owned()),
                        ..labels(20, "sites")
                    },
                    values: Values {
                        inuse_bytes: 100_000,
                        inuse_objects: 100,
                        alloc_bytes: 100_000,
                        alloc_objects: 100,
                    },
                    verdict: Some((Verdict::Steady, "it holds".to_owned())),
                },
            ],
            alloc_known: true,
            duration_ns: 2_000_000_000,
            series: vec![Series {
                pid: 10,
                comm: "python3".to_owned(),
                container: None,
                points: vec![(0.0, 0), (1.0, 2000), (2.0, 3000)],
            }],
            summary: vec!["traced for 2.0 s".to_owned()],
            ..Profile::default()
        }
    }

    #[test]
    fn frames_are_named_as_flame_graphs_show_them() {
        let p = sample_profile();
        let names: Vec<String> = p.samples[0].frames.iter().map(frame_name).collect();
        assert_eq!(
            names,
            [
                "PyMem_Malloc",
                "load (/app/etl.py:12)",
                "<module> (/app/etl.py:40)",
                "main"
            ]
        );
        assert_eq!(frame_name(&p.samples[1].frames[1]), "libc.so.6+0x2724a");
        assert_eq!(
            frame_name(&Frame::python("f".to_owned(), "x.py".to_owned(), None)),
            "f (x.py)"
        );
    }

    #[test]
    fn totals_sum_every_sample() {
        assert_eq!(
            sample_profile().totals(),
            Values {
                inuse_bytes: 103_000,
                inuse_objects: 103,
                alloc_bytes: 105_000,
                alloc_objects: 105
            }
        );
    }

    #[test]
    fn build_ids_are_read_from_elf_notes_inside_a_root() {
        let root = os::open_root(std::process::id()).unwrap();
        let build_id = |path: &Path| {
            module::read_build_id_in_root(&root, path, &path.to_string_lossy()).map(|id| hex(&id))
        };
        // Linkers as distributions set them up (gcc's default) give every executable a build id: this test's too.
        let exe = std::env::current_exe().unwrap();
        let id = build_id(&exe).expect("the test binary has a build id");
        assert!(
            id.len() >= 32 && id.chars().all(|c| c.is_ascii_hexdigit()),
            "{id}"
        );
        assert_eq!(build_id(Path::new("/nonexistent")), None);
        assert_eq!(build_id(Path::new("/proc/self/status")), None);
        // A container's "library" that is a FIFO with no writer: refused at once, never waited on.
        let fifo = std::env::temp_dir().join(format!("alloctrace-fifo-{}", std::process::id()));
        let path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo takes a NUL-terminated path and a mode.
        assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
        assert_eq!(build_id(&fifo), None);
        std::fs::remove_file(&fifo).unwrap();
    }
}
