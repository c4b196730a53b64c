//! The bench's results: each workload's runs by configuration, their medians and ratios, printed as one
//! Markdown table (with the machine it ran on above it, so that README can take both as they are) and written
//! to `target/bench/results.json`.

use std::{collections::BTreeMap, fs, path::PathBuf, process::Command, time::Duration};

use serde_json::{Value, json};

use super::{
    checks::PythonLoop,
    configs::{Config, SAMPLE_EVERY},
    library::Placement,
};

/// One run of one configuration.
pub struct Run {
    pub loop_ns: u64,
    pub ops: u64,
    pub wall: Duration,
    /// alloctrace's `lost` counters, by name; empty for the other configurations.
    pub lost: Vec<(String, u64)>,
    /// What alloctrace's report counted; `None` for the other configurations.
    pub totals: Option<Totals>,
}

/// Totals of one alloctrace report, to compare sampled estimates with exact counts.
#[derive(Clone, Copy)]
pub struct Totals {
    /// Bytes allocated at all the sites during the trace.
    pub allocated_bytes: u64,
    /// Bytes still live when the trace ended.
    pub live_bytes: u64,
}

impl Run {
    fn ns_per_op(&self) -> f64 {
        self.loop_ns as f64 / self.ops as f64
    }

    fn lost_any(&self) -> bool {
        self.lost.iter().any(|&(_, n)| n > 0)
    }
}

pub struct Measured {
    pub key: &'static str,
    pub title: String,
    /// What one op is: the workload's loop time is divided by the ops it reports.
    pub op: &'static str,
    pub iterations: u64,
    /// The CPython loop's exact Python stack, for the cost of walking Python frames.
    pub python_loop: Option<PythonLoop>,
    pub library: PathBuf,
    pub placements: Vec<Placement>,
    /// Runs by configuration, for the configurations run.
    pub runs: BTreeMap<Config, Vec<Run>>,
    /// Configurations that apply but could not run, with the reason the table gives.
    pub unavailable: Vec<(Config, &'static str)>,
}

/// Versions and counts printed with the table.
pub struct Context {
    pub bpftrace: String,
    pub memray: &'static str,
}

/// The machine, as README gives it above the table: CPUs, model, kernel, memory.
pub fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("model name")?.split_once(':'))
        .map_or("unknown CPU", |(_, model)| model.trim());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory_gib = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:")?.trim().strip_suffix("kB"))
        .and_then(|kb| kb.trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / (1024.0 * 1024.0));
    format!(
        "{cpus} CPUs ({model}), Linux {}, {memory_gib:.0} GiB RAM",
        kernel.trim()
    )
}

/// The commit the bench measured, for the record.
fn commit() -> String {
    Command::new("git")
        .args([
            "-C",
            &crate::root().to_string_lossy(),
            "describe",
            "--always",
            "--dirty",
        ])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map_or_else(
            || "unknown commit".into(),
            |out| String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        )
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    if values.len().is_multiple_of(2) {
        (values[middle - 1] + values[middle]) / 2.0
    } else {
        values[middle]
    }
}

/// How far an estimate is from the exact value, in percent.
fn difference(estimate: f64, exact: f64) -> String {
    if exact == 0.0 {
        return "exact is 0".into();
    }
    format!("{:+.1}%", (estimate / exact - 1.0) * 100.0)
}

/// A time in the unit that suits it.
fn duration(ns: f64) -> String {
    match ns {
        ns if ns >= 1e9 => format!("{:.2} s", ns / 1e9),
        ns if ns >= 1e6 => format!("{:.1} ms", ns / 1e6),
        ns if ns >= 1e3 => format!("{:.1} µs", ns / 1e3),
        ns => format!("{ns:.1} ns"),
    }
}

impl Measured {
    fn runs_of(&self, config: Config) -> &[Run] {
        self.runs.get(&config).map_or(&[], Vec::as_slice)
    }

    fn ns_per_op(&self, config: Config) -> Option<f64> {
        let runs = self.runs_of(config);
        (!runs.is_empty()).then(|| median(runs.iter().map(Run::ns_per_op).collect()))
    }

    fn loop_ns(&self, config: Config) -> f64 {
        median(
            self.runs_of(config)
                .iter()
                .map(|r| r.loop_ns as f64)
                .collect(),
        )
    }

    fn wall_s(&self, config: Config) -> f64 {
        median(
            self.runs_of(config)
                .iter()
                .map(|r| r.wall.as_secs_f64())
                .collect(),
        )
    }

    /// The ops of the untraced runs (every configuration's are the same).
    fn ops(&self) -> u64 {
        self.runs_of(Config::Untraced).first().map_or(0, |r| r.ops)
    }

    /// One configuration's median cost per op over another's, when both ran.
    fn ratio(&self, config: Config, other: Config) -> Option<f64> {
        Some(self.ns_per_op(config)? / self.ns_per_op(other)?)
    }

    /// "none", or which alloctrace runs lost what: their numbers are for less work than the others'.
    fn lost(&self, config: Config) -> String {
        if !config.is_alloctrace() {
            return "-".into();
        }
        let runs = self.runs_of(config);
        let lossy: Vec<String> = runs
            .iter()
            .enumerate()
            .filter(|(_, run)| run.lost_any())
            .map(|(i, run)| {
                let counts: Vec<String> = run
                    .lost
                    .iter()
                    .filter(|&&(_, n)| n > 0)
                    .map(|(name, n)| format!("{name} {n}"))
                    .collect();
                format!("run {}: {}", i + 1, counts.join(", "))
            })
            .collect();
        if lossy.is_empty() {
            "none".into()
        } else {
            format!(
                "LOST in {}/{} runs ({})",
                lossy.len(),
                runs.len(),
                lossy.join("; ")
            )
        }
    }

    /// Median allocated and live bytes of a configuration's reports.
    fn totals(&self, config: Config) -> Option<(f64, f64)> {
        let totals: Vec<Totals> = self
            .runs_of(config)
            .iter()
            .filter_map(|r| r.totals)
            .collect();
        (!totals.is_empty()).then(|| {
            (
                median(totals.iter().map(|t| t.allocated_bytes as f64).collect()),
                median(totals.iter().map(|t| t.live_bytes as f64).collect()),
            )
        })
    }

    pub fn to_json(&self) -> Value {
        let untraced = self.ns_per_op(Config::Untraced);
        let configs: Vec<Value> = self
            .runs
            .iter()
            .map(|(&config, runs)| {
                let per_op = self.ns_per_op(config);
                json!({
                    "name": config.key(),
                    "median_ns_per_op": per_op,
                    "slowdown": per_op.zip(untraced).map(|(a, b)| a / b),
                    "median_loop_ms": self.loop_ns(config) / 1e6,
                    "median_wall_s": self.wall_s(config),
                    "loop_ns": runs.iter().map(|r| r.loop_ns).collect::<Vec<_>>(),
                    "wall_s": runs.iter().map(|r| r.wall.as_secs_f64()).collect::<Vec<_>>(),
                    "lost": config.is_alloctrace().then(|| {
                        runs.iter()
                            .map(|r| r.lost.iter().cloned().collect::<BTreeMap<_, _>>())
                            .collect::<Vec<_>>()
                    }),
                    "allocated_bytes": config.is_alloctrace().then(|| {
                        runs.iter().filter_map(|r| r.totals).map(|t| t.allocated_bytes).collect::<Vec<_>>()
                    }),
                    "live_bytes": config.is_alloctrace().then(|| {
                        runs.iter().filter_map(|r| r.totals).map(|t| t.live_bytes).collect::<Vec<_>>()
                    }),
                })
            })
            .collect();
        json!({
            "name": self.key,
            "title": self.title,
            "op": self.op,
            "ops": self.ops(),
            "library": self.library,
            "probes": self.placements.iter().map(|p| json!({
                "function": p.function,
                "address": format!("{:#x}", p.address),
                "file_offset": format!("{:#x}", p.file_offset),
                "entry_offset": p.entry_offset,
            })).collect::<Vec<_>>(),
            "configs": configs,
            "unavailable": self.unavailable.iter().map(|(config, why)| json!({
                "name": config.key(),
                "why": why,
            })).collect::<Vec<_>>(),
            "alloctrace_vs_bpftrace_memleak": self.ratio(Config::Exact, Config::Peer),
            "alloctrace_vs_empty_probes": self.ratio(Config::Exact, Config::EmptyProbes),
            "alloctrace_vs_memray": self.ratio(Config::Exact, Config::Memray),
            "sampled_vs_empty_probes": self.ratio(Config::Sampled, Config::EmptyProbes),
            "python_frames": self.python_frames().map(|cost| json!({
                "depth": cost.depth,
                "captured_stacks": cost.stacks,
                "ns_per_allocator_call": cost.per_call,
                "ns_per_captured_stack": cost.per_stack,
                "ns_per_captured_stack_by_round": cost.by_round,
            })),
        })
    }

    /// What walking the Python frames costs, per allocator call and per captured stack (every allocation
    /// captures one, frees none): the median over the rounds of alloctrace's loop time less that without Python
    /// frames in the same round, so that drift between rounds does not count.
    fn python_frames(&self) -> Option<PythonFramesCost> {
        let python = self.python_loop.as_ref()?;
        let stacks = self.iterations * python.stacks_per_iteration;
        let by_round: Vec<f64> = self
            .runs_of(Config::Exact)
            .iter()
            .zip(self.runs_of(Config::NoPythonFrames))
            .map(|(with, without)| (with.loop_ns as f64 - without.loop_ns as f64) / stacks as f64)
            .collect();
        if by_round.is_empty() {
            return None;
        }
        let per_stack = median(by_round.clone());
        Some(PythonFramesCost {
            depth: python.depth,
            stacks,
            per_call: per_stack * stacks as f64 / self.ops() as f64,
            per_stack,
            by_round,
        })
    }
}

struct PythonFramesCost {
    depth: usize,
    /// Stacks the loop captures.
    stacks: u64,
    per_call: f64,
    per_stack: f64,
    /// ns per captured stack in each round.
    by_round: Vec<f64>,
}

/// The machine, then one Markdown table of every workload and configuration, then what the table cannot hold.
pub fn print(measured: &[Measured], context: &Context) {
    println!(
        "\nMachine: {}. alloctrace {}, {}, memray {}.",
        machine(),
        commit(),
        context.bpftrace,
        context.memray
    );
    println!(
        "Loop time is the workload's own (start-up and detach excluded), median of the runs, configurations \
         interleaved; ratios are of those medians; `lost` is what each alloctrace run's report counted.\n"
    );
    println!(
        "| workload | configuration | runs | loop | per op | × untraced | × floor | × bpftrace peer | × memray | \
         wall | lost |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    let ratio = |r: Option<f64>| r.map_or_else(|| "-".into(), |r| format!("{r:.2}"));
    for m in measured {
        let mut first = true;
        let mut workload = || {
            if std::mem::take(&mut first) {
                format!("**{}**: {}; op = {}", m.key, m.title, m.op)
            } else {
                String::new()
            }
        };
        for config in Config::ALL {
            if let Some((_, why)) = m.unavailable.iter().find(|(c, _)| *c == config) {
                println!(
                    "| {} | {} | - | {why} | - | - | - | - | - | - | - |",
                    workload(),
                    config.name()
                );
                continue;
            }
            let Some(per_op) = m.ns_per_op(config) else {
                continue;
            };
            println!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1} s | {} |",
                workload(),
                config.name(),
                m.runs_of(config).len(),
                duration(m.loop_ns(config)),
                duration(per_op),
                ratio(m.ratio(config, Config::Untraced)),
                ratio(m.ratio(config, Config::EmptyProbes)),
                ratio(m.ratio(config, Config::Peer)),
                ratio(m.ratio(config, Config::Memray)),
                m.wall_s(config),
                m.lost(config)
            );
        }
    }
    for m in measured {
        if let Some(cost) = m.python_frames() {
            println!(
                "\n{}: Python frames, {} deep, cost {:.0} ns per captured stack, {:.1} ns per allocator call \
                 (exact less --no-python-frames, median over the rounds; the loop captures {} stacks, one per \
                 allocation, none per free).",
                m.key, cost.depth, cost.per_stack, cost.per_call, cost.stacks
            );
        }
        if let (Some((exact_allocated, exact_live)), Some((allocated, live))) =
            (m.totals(Config::Exact), m.totals(Config::Sampled))
        {
            println!(
                "\n{}: sampled at {SAMPLE_EVERY}, allocated {:.1} MB against {:.1} MB exact ({}), live at the end \
                 {:.1} MB against {:.1} MB ({}) (medians).",
                m.key,
                allocated / 1e6,
                exact_allocated / 1e6,
                difference(allocated, exact_allocated),
                live / 1e6,
                exact_live / 1e6,
                difference(live, exact_live)
            );
        }
    }
}
