//! `alloctrace oom`: one record per OOM kill, anywhere on the host, as it happens: the victim and its memory, its
//! container and task, the memory cgroup that hit its limit, and — when the victim was traced — the stacks that
//! held its memory. The evidence that dies with the process.

use std::{
    collections::{HashMap, VecDeque},
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use serde::Serialize;
use tracer_common::OomEvent;

use crate::{
    aggregate::{Ledger, Sites},
    procs::{Frame, ProcessInfo, Registry, airflow::TaskIdentity, container::Container, debuginfo},
};

/// Stacks a record gives for a traced victim, biggest first.
pub const TOP_STACKS: usize = 5;

#[derive(Clone, Debug, Serialize)]
pub struct OomRecord {
    pub schema: u32,
    pub event: &'static str,
    /// When alloctrace read the kill, RFC 3339 UTC.
    pub time: String,
    pub victim: Victim,
    pub container: Option<Container>,
    pub memcg: Option<Memcg>,
    pub task: Option<TaskIdentity>,
    /// Whether alloctrace was tracing the victim's allocations, or (the agent) watching its page faults:
    /// `top_stacks` and `growth` are empty otherwise.
    pub traced: bool,
    pub top_stacks: Vec<TopStack>,
    /// The victim's live memory over the minutes before the kill, oldest first, the last at the kill.
    pub growth: Vec<GrowthSample>,
    /// The agent had escalated the victim to the allocator uprobes: what they saw. `null` otherwise.
    pub escalation: Option<Escalation>,
}

/// What the allocator uprobes saw of an escalated victim: the blocks allocated since its escalation and still
/// live at the kill, by stack, exact or (sampled) estimated.
#[derive(Clone, Debug, Serialize)]
pub struct Escalation {
    /// How long before the kill the uprobes went on.
    pub seconds_before: f64,
    /// Blocks were sampled every this many bytes on average, and weighted; `null` when each was recorded.
    pub sample_every_bytes: Option<u64>,
    /// Biggest first, at most [`TOP_STACKS`].
    pub top_stacks: Vec<TopStack>,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct GrowthSample {
    /// Seconds before the kill (0 at the kill).
    pub seconds_before: f64,
    pub live_bytes: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Victim {
    pub pid: u32,
    pub ns_pid: Option<u32>,
    pub comm: String,
    pub cmdline: Vec<String>,
    pub total_vm_bytes: u64,
    pub anon_rss_bytes: u64,
    pub file_rss_bytes: u64,
    pub shmem_rss_bytes: u64,
}

/// The memory cgroup that hit its limit: the nearest one, from the task that triggered the kill up, that has a
/// limit. `None` for a kill of the whole host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Memcg {
    pub path: String,
    pub limit_bytes: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct TopStack {
    pub live_bytes: u64,
    /// Blocks, or for the agent's watch tier pages (estimated from sampled page faults).
    pub live_count: u64,
    pub stack: Vec<Frame>,
}

/// Finds cgroup paths from the cgroup ids the kernel gives: the id is the inode of the cgroup's directory in
/// the v2 hierarchy. The hierarchy is searched on a miss and the answers kept, at most [`MAX_CGROUPS`] of
/// each, the oldest forgotten first (the agent sees OOM kills in containers that come and go for days).
#[derive(Default)]
pub struct Cgroups {
    paths: HashMap<u64, Option<String>>,
    /// The nearest limited memory cgroup of each path, read once: a killed container's cgroup is soon removed.
    memcgs: HashMap<String, Option<Memcg>>,
    /// The keys of `paths` and of `memcgs`, oldest first.
    path_order: VecDeque<u64>,
    memcg_order: VecDeque<String>,
}

/// The most cgroups whose path, and paths whose memory cgroup, are kept: far more than the kills reported at
/// once.
const MAX_CGROUPS: usize = 1024;

/// Keeps `order` (the keys of `map`, oldest first) within [`MAX_CGROUPS`].
fn bound<K: std::hash::Hash + Eq, V>(map: &mut HashMap<K, V>, order: &mut VecDeque<K>) {
    while order.len() > MAX_CGROUPS {
        if let Some(oldest) = order.pop_front() {
            map.remove(&oldest);
        }
    }
}

/// The v2 hierarchy: `/sys/fs/cgroup/unified` on hybrid hosts, `/sys/fs/cgroup` on pure v2 ones.
fn v2_root() -> Option<PathBuf> {
    ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .into_iter()
        .map(PathBuf::from)
        .find(|root| root.join("cgroup.procs").exists() && root.join("cgroup.controllers").exists())
}

fn find_inode(dir: &Path, inode: u64, depth: usize) -> Option<PathBuf> {
    if fs::metadata(dir).ok()?.ino() == inode {
        return Some(dir.to_path_buf());
    }
    if depth == 0 {
        return None;
    }
    fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .find_map(|e| find_inode(&e.path(), inode, depth - 1))
}

impl Cgroups {
    /// The path (relative to the hierarchy's root, as `/proc/PID/cgroup` prints it) of cgroup `id`.
    pub fn path(&mut self, id: u64) -> Option<String> {
        if let Some(known) = self.paths.get(&id) {
            return known.clone();
        }
        let found = (|| {
            let root = v2_root()?;
            let found = find_inode(&root, id, 8)?;
            let relative = found.strip_prefix(&root).ok()?;
            Some(format!("/{}", relative.display()))
        })();
        self.paths.insert(id, found.clone());
        self.path_order.push_back(id);
        bound(&mut self.paths, &mut self.path_order);
        found
    }

    /// The nearest cgroup with a memory limit, from `path` up.
    pub fn memcg(&mut self, path: &str) -> Option<Memcg> {
        if let Some(known) = self.memcgs.get(path) {
            return known.clone();
        }
        let found = limited_memcg(path);
        self.memcgs.insert(path.to_owned(), found.clone());
        self.memcg_order.push_back(path.to_owned());
        bound(&mut self.memcgs, &mut self.memcg_order);
        found
    }

    /// Reads now, while they exist, the cgroup of `id` and its limit, for a record built later.
    pub fn remember(&mut self, id: u64) {
        if let Some(path) = self.path(id) {
            self.memcg(&path);
        }
    }
}

/// The limit of a memory cgroup: `memory.max` in v2, `memory.limit_in_bytes` in v1 (where an unlimited cgroup
/// reports a huge number).
fn limit(path: &str) -> Option<u64> {
    let relative = path.trim_start_matches('/');
    let v2 = v2_root().map(|root| root.join(relative).join("memory.max"));
    let v1 = Path::new("/sys/fs/cgroup/memory")
        .join(relative)
        .join("memory.limit_in_bytes");
    let text = v2
        .and_then(|p| fs::read_to_string(p).ok())
        .or_else(|| fs::read_to_string(v1).ok())?;
    let value: u64 = text.trim().parse().ok()?;
    // v1 says "unlimited" with the largest page-aligned value.
    (value < 1 << 62).then_some(value)
}

/// The nearest cgroup with a memory limit, from `path` up.
fn limited_memcg(path: &str) -> Option<Memcg> {
    let mut current = path.to_owned();
    loop {
        if let Some(limit_bytes) = limit(&current) {
            return Some(Memcg {
                path: current,
                limit_bytes,
            });
        }
        let parent = current.rsplit_once('/')?.0.to_owned();
        if parent.is_empty() {
            return None;
        }
        current = parent;
    }
}

/// What a record is built from.
pub struct OomInput<'a> {
    pub event: &'a OomEvent,
    pub registry: &'a mut Registry,
    pub ledger: &'a Ledger,
    pub sites: &'a Sites,
    pub traced: bool,
    /// Samples of the victim's live bytes: (`bpf_ktime_get_ns` time, bytes), oldest first.
    pub samples: &'a [(u64, u64)],
    pub cgroups: &'a mut Cgroups,
    /// The trace's start and now, in `bpf_ktime_get_ns` time: for `live_by_site`.
    pub window: (u64, u64),
    /// What the agent's watch tier saw the victim make resident, biggest first, in place of the ledger's
    /// allocations.
    pub watched: Option<Vec<TopStack>>,
    /// What the allocator uprobes saw since the agent escalated the victim.
    pub escalation: Option<Escalation>,
}

pub fn build(input: OomInput<'_>) -> OomRecord {
    let event = input.event;
    let pid = event.victim_pid;
    let comm =
        String::from_utf8_lossy(event.comm.split(|&b| b == 0).next().unwrap_or(&[])).into_owned();
    // Known from the trace, or read now if the victim is still there; its name is in the record either way.
    let info = input
        .registry
        .info(pid)
        .cloned()
        .or_else(|| ProcessInfo::from_pid(pid))
        .unwrap_or(ProcessInfo {
            pid,
            comm: comm.clone(),
            ..Default::default()
        });
    let cgroup = input.cgroups.path(event.header.cgroup_id);
    let mut container = info.container.clone().or_else(|| {
        cgroup
            .as_deref()
            .and_then(crate::procs::container::from_cgroup_path)
    });
    if let Some(container) = container.as_mut() {
        input.registry.name_container(container);
    }
    let memcg = cgroup
        .as_deref()
        .or(container.as_ref().map(|c| c.cgroup.as_str()))
        .and_then(|path| input.cgroups.memcg(path));
    let mut top_stacks: Vec<TopStack> = input.watched.unwrap_or_else(|| {
        input
            .ledger
            .live_by_site(u64::MAX, input.window)
            .into_iter()
            .filter(|(site, _)| input.sites.get(*site).pid == pid)
            .map(|(site, live)| TopStack {
                live_bytes: live.bytes,
                live_count: live.count,
                stack: input
                    .sites
                    .get(site)
                    .frames
                    .iter()
                    .map(|f| Frame::clone(f))
                    .collect(),
            })
            .collect()
    });
    let live_now: u64 = top_stacks.iter().map(|s| s.live_bytes).sum();
    top_stacks.sort_by_key(|s| std::cmp::Reverse(s.live_bytes));
    top_stacks.truncate(TOP_STACKS);
    let mut escalation = input.escalation;
    let escalation_stacks = escalation.iter_mut().flat_map(|e| &mut e.top_stacks);
    debuginfo::resolve(
        top_stacks
            .iter_mut()
            .chain(escalation_stacks)
            .map(|s| &mut s.stack),
    );
    let killed_at = event.header.ts_ns;
    let mut growth: Vec<GrowthSample> = input
        .samples
        .iter()
        .filter(|(at, _)| *at <= killed_at)
        .map(|&(at, live_bytes)| GrowthSample {
            seconds_before: (killed_at - at) as f64 / 1e9,
            live_bytes,
        })
        .collect();
    if input.traced {
        growth.push(GrowthSample {
            seconds_before: 0.0,
            live_bytes: live_now,
        });
    }
    let kib = |k: u64| k * 1024;
    OomRecord {
        schema: 1,
        event: "oom_kill",
        time: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        victim: Victim {
            pid,
            ns_pid: info.ns_pid,
            comm: if info.comm.is_empty() {
                comm
            } else {
                info.comm.clone()
            },
            cmdline: info.cmdline.clone(),
            total_vm_bytes: kib(event.total_vm_kib),
            anon_rss_bytes: kib(event.anon_rss_kib),
            file_rss_bytes: kib(event.file_rss_kib),
            shmem_rss_bytes: kib(event.shmem_rss_kib),
        },
        container,
        memcg,
        task: info.task.clone(),
        traced: input.traced,
        top_stacks,
        growth,
        escalation,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_this_processs_cgroup_by_its_id() {
        let Some(root) = v2_root() else {
            panic!("no cgroup v2 hierarchy on this machine");
        };
        let id = fs::metadata(&root).unwrap().ino();
        assert_eq!(Cgroups::default().path(id), Some("/".to_owned()));
        assert_eq!(Cgroups::default().path(u64::MAX - 1), None);
    }
}
