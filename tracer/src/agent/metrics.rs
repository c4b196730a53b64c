//! The agent's Prometheus series, through `prometheus-client`: what the watch tier attributes to each container
//! and Airflow task, their OOM kills, each container's memory cgroup usage and limit and escalations to the
//! exact tier, the processes escalated now, events lost, and the agent's own RSS. Labels are per container and task, never per stack or pid, so the number of series follows
//! the containers. A container's series stay for a set time after it was last seen (an OOM-killed container's
//! counter can still be scraped and alerted on), then go.

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::{
    procs::{airflow::TaskIdentity, container::Container},
    report::oom::OomRecord,
    trace::WatchTick,
};

/// The labels of a container and task's live bytes.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GroupLabels {
    pub container: String,
    pub container_id: String,
    pub pod: String,
    pub namespace: String,
    pub dag_id: String,
    pub task_id: String,
}

/// The labels of a container and task's OOM kills.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KillLabels {
    pub container: String,
    pub container_id: String,
    pub dag_id: String,
    pub task_id: String,
}

/// The labels of a container's memory cgroup.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ContainerLabels {
    pub container: String,
    pub container_id: String,
}

impl GroupLabels {
    fn new(container: Option<&Container>, task: Option<&TaskIdentity>) -> Self {
        let (pod, namespace) = container.map(kubernetes_pod).unwrap_or_default();
        Self {
            container: container.and_then(|c| c.name.clone()).unwrap_or_default(),
            container_id: container.map(|c| c.id.clone()).unwrap_or_default(),
            pod,
            namespace,
            dag_id: task.map(|t| t.dag_id.clone()).unwrap_or_default(),
            task_id: task.map(|t| t.task_id.clone()).unwrap_or_default(),
        }
    }

    fn kill(&self) -> KillLabels {
        KillLabels {
            container: self.container.clone(),
            container_id: self.container_id.clone(),
            dag_id: self.dag_id.clone(),
            task_id: self.task_id.clone(),
        }
    }

    fn container(&self) -> ContainerLabels {
        ContainerLabels {
            container: self.container.clone(),
            container_id: self.container_id.clone(),
        }
    }
}

/// Pod and namespace of a container the kubelet made through Docker: its name is
/// `k8s_<container>_<pod>_<namespace>_<pod uid>_<attempt>`.
fn kubernetes_pod(container: &Container) -> (String, String) {
    let Some(name) = container.name.as_deref() else {
        return Default::default();
    };
    let parts: Vec<&str> = name.split('_').collect();
    match parts.as_slice() {
        ["k8s", _, pod, namespace, _, _] => ((*pod).to_owned(), (*namespace).to_owned()),
        _ => Default::default(),
    }
}

pub struct Metrics {
    registry: Registry,
    live_bytes: Family<GroupLabels, Gauge>,
    oom_kills: Family<KillLabels, Counter>,
    memcg_usage: Family<ContainerLabels, Gauge>,
    memcg_limit: Family<ContainerLabels, Gauge>,
    escalations: Family<ContainerLabels, Counter>,
    escalated_processes: Gauge,
    lost_events: Counter,
    agent_rss: Gauge,
    /// When each group and container was last seen (a watched process, or a kill).
    groups: HashMap<GroupLabels, Instant>,
    containers: HashMap<ContainerLabels, (Instant, Option<String>)>,
    ttl: Duration,
}

impl Metrics {
    pub fn new(ttl: Duration) -> Self {
        let mut registry = Registry::default();
        let live_bytes = Family::<GroupLabels, Gauge>::default();
        let oom_kills = Family::<KillLabels, Counter>::default();
        let memcg_usage = Family::<ContainerLabels, Gauge>::default();
        let memcg_limit = Family::<ContainerLabels, Gauge>::default();
        let escalations = Family::<ContainerLabels, Counter>::default();
        let escalated_processes = Gauge::default();
        let lost_events = Counter::default();
        let agent_rss = Gauge::default();
        registry.register(
            "alloctrace_live_bytes",
            "Memory the watch tier saw the group's processes make resident and not release (sampled page faults)",
            live_bytes.clone(),
        );
        registry.register(
            "alloctrace_oom_kills",
            "OOM kills of the group's processes",
            oom_kills.clone(),
        );
        registry.register(
            "alloctrace_memcg_usage_bytes",
            "The container's memory cgroup usage",
            memcg_usage.clone(),
        );
        registry.register(
            "alloctrace_memcg_limit_bytes",
            "The container's memory cgroup limit",
            memcg_limit.clone(),
        );
        registry.register(
            "alloctrace_escalations",
            "Escalations of the container to the exact tier (allocator uprobes on its biggest processes)",
            escalations.clone(),
        );
        registry.register(
            "alloctrace_escalated_processes",
            "Processes that have the allocator uprobes now",
            escalated_processes.clone(),
        );
        registry.register(
            "alloctrace_lost_events",
            "Events that never reached the agent's ledger (ring buffer full, undecodable, ledger full)",
            lost_events.clone(),
        );
        registry.register(
            "alloctrace_agent_resident_bytes",
            "The agent's own resident memory",
            agent_rss.clone(),
        );
        Self {
            registry,
            live_bytes,
            oom_kills,
            memcg_usage,
            memcg_limit,
            escalations,
            escalated_processes,
            lost_events,
            agent_rss,
            groups: HashMap::new(),
            containers: HashMap::new(),
            ttl,
        }
    }

    /// Takes a tick of the watch tier, with the memory cgroups of its containers (by cgroup path) read once for
    /// this tick; returns the containers seen for the first time (name or id).
    pub fn update(
        &mut self,
        tick: &WatchTick,
        memory: &HashMap<String, Memory>,
        now: Instant,
    ) -> Vec<String> {
        let mut sums: HashMap<GroupLabels, u64> = HashMap::new();
        let mut new_containers = Vec::new();
        for process in &tick.processes {
            let labels = GroupLabels::new(process.container.as_ref(), process.task.as_ref());
            *sums.entry(labels.clone()).or_default() += process.resident_bytes;
            if let Some(container) = &process.container {
                let key = labels.container();
                if !self.containers.contains_key(&key) {
                    new_containers.push(format!(
                        "{} ({})",
                        container.name.as_deref().unwrap_or("unnamed"),
                        container.id.chars().take(12).collect::<String>()
                    ));
                }
                self.containers
                    .insert(key, (now, Some(container.cgroup.clone())));
            }
        }
        for (labels, bytes) in &sums {
            self.groups.insert(labels.clone(), now);
            self.live_bytes
                .get_or_create(labels)
                .set(i64::try_from(*bytes).unwrap_or(i64::MAX));
        }
        // Groups with no process left read 0 until their time is up, then go.
        let ttl = self.ttl;
        let live_bytes = &self.live_bytes;
        let oom_kills = &self.oom_kills;
        self.groups.retain(|labels, seen| {
            if sums.contains_key(labels) {
                return true;
            }
            if now.duration_since(*seen) > ttl {
                live_bytes.remove(labels);
                oom_kills.remove(&labels.kill());
                return false;
            }
            live_bytes.get_or_create(labels).set(0);
            true
        });
        let (usage, limit) = (&self.memcg_usage, &self.memcg_limit);
        let escalations = &self.escalations;
        self.containers.retain(|labels, (seen, cgroup)| {
            if now.duration_since(*seen) > ttl {
                usage.remove(labels);
                limit.remove(labels);
                escalations.remove(labels);
                return false;
            }
            // A container without a process this tick keeps its last values until its time is up.
            if let Some(memory) = cgroup.as_deref().and_then(|cgroup| memory.get(cgroup)) {
                usage.get_or_create(labels).set(saturating(memory.usage));
                match memory.limit {
                    Some(bytes) => {
                        limit.get_or_create(labels).set(saturating(bytes));
                    }
                    None => {
                        limit.remove(labels);
                    }
                }
            }
            true
        });
        let lost = self.lost_events.get();
        if tick.lost_events > lost {
            self.lost_events.inc_by(tick.lost_events - lost);
        }
        if let Some(rss) = own_resident_bytes() {
            self.agent_rss.set(saturating(rss));
        }
        let escalated = tick.processes.iter().filter(|p| p.escalated).count();
        self.escalated_processes
            .set(i64::try_from(escalated).unwrap_or(i64::MAX));
        new_containers
    }

    /// Counts an escalation of `container` to the exact tier.
    pub fn escalated(&mut self, container: &Container, now: Instant) {
        let labels = GroupLabels::new(Some(container), None).container();
        self.escalations.get_or_create(&labels).inc();
        self.containers
            .entry(labels)
            .and_modify(|(seen, _)| *seen = now)
            .or_insert((now, Some(container.cgroup.clone())));
    }

    /// Sets the number of processes that have the allocator uprobes, as they are after a tick's escalations.
    pub fn set_escalated_processes(&mut self, count: usize) {
        self.escalated_processes
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// Counts an OOM kill against its victim's container and task.
    pub fn oom_kill(&mut self, record: &OomRecord, now: Instant) {
        let labels = GroupLabels::new(record.container.as_ref(), record.task.as_ref());
        self.oom_kills.get_or_create(&labels.kill()).inc();
        self.groups.entry(labels.clone()).or_insert(now);
        let _ = self.live_bytes.get_or_create(&labels);
        if record.container.is_some() {
            let key = labels.container();
            self.containers
                .entry(key)
                .and_modify(|(seen, _)| *seen = now)
                .or_insert((now, None));
        }
    }

    /// The text exposition (OpenMetrics) of every series.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

fn saturating(bytes: u64) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}

/// A memory cgroup's usage and limit (`None`: unlimited).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Memory {
    pub usage: u64,
    pub limit: Option<u64>,
}

impl Memory {
    /// From the values of v2's `memory.current` and `memory.max` (`max` when unlimited), or v1's
    /// `memory.usage_in_bytes` and `memory.limit_in_bytes` (a huge page-aligned number when unlimited).
    pub fn from_values(usage: &str, limit: &str) -> Option<Self> {
        let usage = usage.trim().parse().ok()?;
        let limit = match limit.trim() {
            "max" => None,
            text => Some(text.parse::<u64>().ok()?).filter(|&l| l < 1 << 62),
        };
        Some(Self { usage, limit })
    }

    /// The cgroup at `path` (as `/proc/PID/cgroup` gives it) in `v2_root`, or in v1's memory controller at
    /// `v1_root` (hybrid hosts, whose v2 hierarchy has no controllers).
    pub fn from_roots(path: &str, v2_root: &Path, v1_root: &Path) -> Option<Self> {
        let relative = path.trim_start_matches('/');
        let read = |dir: &Path, file: &str| fs::read_to_string(dir.join(relative).join(file)).ok();
        if let (Some(usage), Some(limit)) =
            (read(v2_root, "memory.current"), read(v2_root, "memory.max"))
        {
            return Self::from_values(&usage, &limit);
        }
        Self::from_values(
            &read(v1_root, "memory.usage_in_bytes")?,
            &read(v1_root, "memory.limit_in_bytes")?,
        )
    }

    /// The cgroup at `path` on this host: v2 at `/sys/fs/cgroup/unified` (hybrid) or `/sys/fs/cgroup`, else v1.
    pub fn from_sys(path: &str) -> Option<Self> {
        let v2 = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
            .into_iter()
            .map(PathBuf::from)
            .find(|root| root.join("cgroup.controllers").exists())?;
        Self::from_roots(path, &v2, Path::new("/sys/fs/cgroup/memory"))
    }
}

/// The agent's resident memory, from `/proc/self/statm` (pages).
fn own_resident_bytes() -> Option<u64> {
    let statm = fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * rustix::param::page_size() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::WatchedProcess;

    const ID: &str = "2c6a4b5a8f1e0d3c9b7a6f5e4d3c2b1a0f9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c";

    fn container(name: &str) -> Container {
        let mut container =
            crate::procs::container::from_cgroup_path(&format!("/docker/{ID}")).unwrap();
        container.name = Some(name.to_owned());
        // No such cgroup on any machine: the tests read no cgroupfs.
        container.cgroup = "/alloctrace-test/none".to_owned();
        container
    }

    fn process(pid: u32, name: &str, dag: Option<&str>, bytes: u64) -> WatchedProcess {
        WatchedProcess {
            pid,
            comm: "python3".to_owned(),
            container: Some(container(name)),
            task: dag.map(|dag| TaskIdentity {
                dag_id: dag.to_owned(),
                task_id: "load".to_owned(),
                run_id: None,
                try_number: None,
            }),
            resident_bytes: bytes,
            escalated: false,
            stacks: Vec::new(),
        }
    }

    fn lines(metrics: &Metrics, prefix: &str) -> Vec<String> {
        metrics
            .encode()
            .unwrap()
            .lines()
            .filter(|l| l.starts_with(prefix))
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn live_bytes_are_summed_per_container_and_task_never_per_pid() {
        let mut metrics = Metrics::new(Duration::from_secs(600));
        let now = Instant::now();
        let tick = WatchTick {
            processes: vec![
                process(1, "worker", Some("etl"), 1000),
                process(2, "worker", Some("etl"), 500),
                process(3, "worker", None, 7),
            ],
            lost_events: 3,
        };
        assert_eq!(
            metrics.update(&tick, &HashMap::new(), now),
            ["worker (2c6a4b5a8f1e)"],
            "said once"
        );
        let mut live = lines(&metrics, "alloctrace_live_bytes{");
        live.sort();
        let labels = |dag: &str, task: &str| {
            format!(
                "container=\"worker\",container_id=\"{ID}\",pod=\"\",namespace=\"\",dag_id=\"{dag}\",task_id=\"{task}\""
            )
        };
        assert_eq!(
            live,
            [
                format!("alloctrace_live_bytes{{{}}} 7", labels("", "")),
                format!("alloctrace_live_bytes{{{}}} 1500", labels("etl", "load")),
            ]
        );
        assert_eq!(
            lines(&metrics, "alloctrace_lost_events_total"),
            ["alloctrace_lost_events_total 3"]
        );
        // Seen again: not new.
        assert!(metrics.update(&tick, &HashMap::new(), now).is_empty());
    }

    #[test]
    fn a_gone_containers_series_read_zero_then_go_after_the_ttl() {
        let mut metrics = Metrics::new(Duration::from_secs(600));
        let start = Instant::now();
        let tick = WatchTick {
            processes: vec![process(1, "web", None, 4096)],
            lost_events: 0,
        };
        metrics.update(&tick, &HashMap::new(), start);
        let empty = WatchTick {
            processes: Vec::new(),
            lost_events: 0,
        };
        metrics.update(&empty, &HashMap::new(), start + Duration::from_secs(599));
        let live = lines(&metrics, "alloctrace_live_bytes{");
        assert_eq!(live.len(), 1);
        assert!(live[0].ends_with(" 0"), "{live:?}");
        metrics.update(&empty, &HashMap::new(), start + Duration::from_secs(601));
        assert!(lines(&metrics, "alloctrace_live_bytes{").is_empty());
    }

    #[test]
    fn escalations_are_counted_per_container_and_the_escalated_processes_are_a_gauge() {
        let mut metrics = Metrics::new(Duration::from_secs(600));
        let now = Instant::now();
        let mut escalated = process(1, "worker", None, 4096);
        escalated.escalated = true;
        let tick = WatchTick {
            processes: vec![escalated, process(2, "worker", None, 4096)],
            lost_events: 0,
        };
        let cgroup = container("worker").cgroup;
        let memory = HashMap::from([(
            cgroup,
            Memory {
                usage: 90 << 20,
                limit: Some(100 << 20),
            },
        )]);
        metrics.update(&tick, &memory, now);
        assert_eq!(
            lines(&metrics, "alloctrace_escalated_processes"),
            ["alloctrace_escalated_processes 1"]
        );
        // The usage handed in, not read again.
        assert_eq!(
            lines(&metrics, "alloctrace_memcg_usage_bytes{"),
            [format!(
                "alloctrace_memcg_usage_bytes{{container=\"worker\",container_id=\"{ID}\"}} 94371840"
            )]
        );
        metrics.escalated(&container("worker"), now);
        metrics.escalated(&container("worker"), now);
        assert_eq!(
            lines(&metrics, "alloctrace_escalations_total{"),
            [format!(
                "alloctrace_escalations_total{{container=\"worker\",container_id=\"{ID}\"}} 2"
            )]
        );
        metrics.set_escalated_processes(0);
        assert_eq!(
            lines(&metrics, "alloctrace_escalated_processes"),
            ["alloctrace_escalated_processes 0"]
        );
    }

    #[test]
    fn memory_cgroup_values_v1_and_v2() {
        assert_eq!(
            Memory::from_values("1048576\n", "max\n"),
            Some(Memory {
                usage: 1 << 20,
                limit: None
            })
        );
        assert_eq!(
            Memory::from_values("4096", "83886080"),
            Some(Memory {
                usage: 4096,
                limit: Some(80 << 20)
            })
        );
        // v1's "unlimited".
        assert_eq!(
            Memory::from_values("4096", "9223372036854771712").map(|m| m.limit),
            Some(None)
        );
        assert_eq!(Memory::from_values("", "max"), None);
    }

    #[test]
    fn memory_cgroups_are_read_from_v2_or_else_v1_files() {
        let root = std::env::temp_dir().join(format!("alloctrace-memcg-{}", std::process::id()));
        let (v2, v1) = (root.join("unified"), root.join("memory"));
        let write = |dir: &Path, file: &str, text: &str| {
            fs::create_dir_all(dir).unwrap();
            fs::write(dir.join(file), text).unwrap();
        };
        write(&v1.join("docker/a"), "memory.usage_in_bytes", "100\n");
        write(&v1.join("docker/a"), "memory.limit_in_bytes", "200\n");
        write(&v2.join("docker/b"), "memory.current", "300\n");
        write(&v2.join("docker/b"), "memory.max", "max\n");
        assert_eq!(
            Memory::from_roots("/docker/a", &v2, &v1),
            Some(Memory {
                usage: 100,
                limit: Some(200)
            })
        );
        assert_eq!(
            Memory::from_roots("/docker/b", &v2, &v1),
            Some(Memory {
                usage: 300,
                limit: None
            })
        );
        assert_eq!(Memory::from_roots("/docker/c", &v2, &v1), None);
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn kubelet_docker_names_give_pod_and_namespace() {
        assert_eq!(
            kubernetes_pod(&container("k8s_base_airflow-worker-0_data_1234-abcd_0")),
            ("airflow-worker-0".to_owned(), "data".to_owned())
        );
        assert_eq!(kubernetes_pod(&container("worker")), Default::default());
    }
}
