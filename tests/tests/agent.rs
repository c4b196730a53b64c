//! `alloctrace agent` with the real things: it starts first and watches every container; a container with an
//! 80 MiB memory limit runs a Python task that appends 1 MiB bytearrays until the kernel kills it, and the
//! agent's post-mortem names the container, the victim and the Python line that held the memory; a real
//! Prometheus scrapes the agent and, queried through its HTTP API, shows the kill and a second container's live
//! bytes. A container already running when the agent starts is watched too. A container past `--escalate-at`
//! gets the allocator uprobes, and loses them when it falls back; its OOM post-mortem then names, to the byte,
//! what its Python line allocated since.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use alloctrace_tests::{
    agent::{EVENT, HOG, Lines, Reaped, STARTUP, Task, get, get_bytes, start_agent, temp_dir},
    docker, go_pprof, pyenv_prefix,
    ready::ReadyPipe,
    require_root,
};
use serde_json::Value;

/// Holds 80 bytearrays of 1 MiB (83,886,080 bytes, every page written) once told to, until told to stop.
const HOLDER: &str = "import sys
print('ready', flush=True)
sys.stdin.readline()
held = [bytearray(1 << 20) for _ in range(80)]
print('held', flush=True)
sys.stdin.readline()
";
/// [`HOLDER`] in a forked child, as a task runner forks its task: forks once told to, and the child holds the
/// 80 MiB on line 8 once told to.
const FORKING_HOLDER: &str = "import os, sys
print('ready', flush=True)
sys.stdin.readline()
if os.fork():
    os.wait()
    sys.exit(0)
sys.stdin.readline()
held = [bytearray(1 << 20) for _ in range(80)]
print('held', flush=True)
sys.stdin.readline()
";
const HELD: f64 = 83_886_080.0;

/// A task driven step by step, each step answered with `done`: `fill N` appends one block of N MiB on line 5
/// (allocated at once, then written: however a tick falls, no allocation of that line follows it), `grow N`
/// appends N blocks of 1 MiB on line 8 (each 1,048,577 bytes: a bytearray keeps a byte past its end), `free`
/// drops them all, and `hog` allocates 100 MiB on line 11.
const STEPPER: &str = "import sys
held = []
def fill(n):
    if n:
        held.append(bytearray(n << 20))
def grow(n):
    for _ in range(n):
        block = bytearray(1 << 20)
        held.append(block)
def hog():
    held.append(bytearray(100 << 20))
print('ready', flush=True)
for line in sys.stdin:
    command, *count = line.split()
    if command == 'free':
        held.clear()
    elif command == 'hog':
        hog()
    else:
        globals()[command](int(count[0]))
    print('done', flush=True)
";
/// What one `grow` block of [`STEPPER`] is, as CPython 3.12 asks the allocator for it.
const GROW_BLOCK: u64 = (1 << 20) + 1;

/// Percent-encodes a query for a URL.
fn encode(query: &str) -> String {
    query
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Asks Prometheus, until `accept` takes a sample value or `bound` passes, for the one series `query` gives.
fn query_until(
    prometheus: &str,
    query: &str,
    bound: Duration,
    accept: impl Fn(f64) -> bool,
) -> f64 {
    let deadline = Instant::now() + bound;
    let mut last = Value::Null;
    while Instant::now() < deadline {
        let body = get(
            prometheus,
            &format!("/api/v1/query?query={}", encode(query)),
        );
        last = serde_json::from_str(&body).unwrap();
        let value = last["data"]["result"]
            .as_array()
            .filter(|series| series.len() == 1)
            .and_then(|series| series[0]["value"][1].as_str()?.parse::<f64>().ok());
        if let Some(value) = value.filter(|v| accept(*v)) {
            return value;
        }
        // Prometheus scrapes every second: asked again once it may have.
        std::thread::sleep(Duration::from_millis(500));
    }
    panic!("Prometheus never answered {query} as expected within {bound:?}; last: {last:#}");
}

/// Starts Prometheus on loopback, scraping `target` every second; returns it and the address it listens on.
fn start_prometheus(dir: &Path, target: &str) -> (Reaped, String) {
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: alloctrace\n    static_configs:\n      - targets: [\"{target}\"]\n"
        ),
    )
    .unwrap();
    let mut prometheus = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg("--web.listen-address=127.0.0.1:0")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("prometheus (Debian package prometheus: cargo xtask test installs it)");
    let mut log = Lines::new(prometheus.stderr.take().unwrap(), "prometheus");
    let listening = log.wait_for(STARTUP, |l| l.contains("msg=\"Listening on\""));
    let addr = listening
        .rsplit("address=")
        .next()
        .unwrap()
        .trim()
        .to_owned();
    log.wait_for(STARTUP, |l| {
        l.contains("Server is ready to receive web requests")
    });
    // Its log is not read from here on: a thread drains it.
    std::thread::spawn(move || while log.receiver.recv().is_ok() {});
    (Reaped(prometheus), addr)
}

#[test]
fn the_agent_writes_an_oom_post_mortem_with_the_python_line_and_prometheus_scrapes_its_series() {
    require_root();
    docker::require_docker();
    let image = docker::python_image(&pyenv_prefix("3.12"), "3.12");
    let dir = temp_dir("agent");
    let post_mortems = dir.join("post-mortems");
    let post_mortems_arg = post_mortems.to_string_lossy().into_owned();
    let mut agent = start_agent(&["--listen", "127.0.0.1:0", "--dir", &post_mortems_arg]);
    let listen = agent.listen.clone();
    assert_eq!(get(&listen, "/healthz"), "ok\n");
    let (_prometheus, prometheus) = start_prometheus(&dir, &listen);

    // A task that holds 80 MiB in a container started after the agent, with room for it, in a child it forks.
    let mut holder = Task::start(
        &image,
        format!("alloctrace-agent-holder-{}", std::process::id()),
        256,
        FORKING_HOLDER,
    );
    assert_eq!(agent.events.wait_python_frames(holder.pid), "3.12");
    holder.go();
    let (child, version) = agent.events.wait_python_frames_forked_by(holder.pid);
    assert_eq!(version, "3.12");
    assert_ne!(child, holder.pid);
    holder.go();
    holder.stdout.wait_for(EVENT, |l| l == "held");

    // A task that grows until the kernel kills it.
    let mut hog = Task::start(
        &image,
        format!("alloctrace-agent-hog-{}", std::process::id()),
        80,
        HOG,
    );
    let pid = hog.pid;
    agent.events.wait_python_frames(pid);
    hog.go();
    let path = agent.events.wait_wrote("oom_record", "json", Some(pid));
    let file_name = path.file_name().unwrap().to_string_lossy().into_owned();
    assert_eq!(path.parent(), Some(post_mortems.as_path()), "{path:?}");
    assert!(
        file_name.starts_with("oom-") && file_name.ends_with(&format!("-{}-{pid}.json", hog.name)),
        "{file_name}"
    );
    let record: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(
        (&record["schema"], &record["event"]),
        (&Value::from(1), &Value::from("oom_kill")),
        "{record:#}"
    );
    assert_eq!(record["container"]["name"], hog.name.as_str(), "{record:#}");
    assert_eq!(record["container"]["id"], hog.id.as_str(), "{record:#}");
    assert_eq!(record["victim"]["pid"], pid, "{record:#}");
    assert!(
        record["victim"]["comm"]
            .as_str()
            .unwrap()
            .starts_with("python"),
        "{record:#}"
    );
    assert_eq!(record["memcg"]["limit_bytes"], 80 << 20, "{record:#}");
    let by_the_line = record["top_stacks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|stack| {
            stack["stack"].as_array().unwrap().iter().any(|frame| {
                frame["lang"] == "python" && frame["function"] == "hog" && frame["line"] == 5
            })
        })
        .unwrap_or_else(|| panic!("no stack through hog, line 5: {record:#}"));
    assert!(
        by_the_line["live_bytes"].as_u64().unwrap() >= 40 << 20,
        "{by_the_line:#}"
    );

    // Prometheus, scraping the agent, sees the kill and what the other container holds.
    let kills = query_until(
        &prometheus,
        &format!("alloctrace_oom_kills_total{{container=\"{}\"}}", hog.name),
        EVENT,
        |v| v >= 1.0,
    );
    assert_eq!(kills, 1.0);
    let live = query_until(
        &prometheus,
        &format!("alloctrace_live_bytes{{container=\"{}\"}}", holder.name),
        EVENT,
        |v| v >= 0.85 * HELD,
    );
    // The bytearrays, give or take the sampling (one fault in 16: a few percent), and the interpreter's own
    // pages.
    assert!(live <= 1.25 * HELD, "{live} bytes for {HELD}");
    // The same memory in the heap profile Pyroscope and Parca scrape, read by the reference reader: the
    // holder's line in its forked child (the script is `-c`, so the file is `<string>`) holds it, labelled
    // with its container.
    let heap = dir.join("heap.pb.gz");
    std::fs::write(&heap, get_bytes(&listen, "/debug/pprof/heap")).unwrap();
    let top = go_pprof(
        &[
            "-top",
            "-lines",
            "-nodefraction=0",
            "-nodecount=100000",
            "-sample_index=inuse_space",
            "-unit=B",
            &format!("-tagfocus=container={}", holder.name),
        ],
        &heap,
    );
    let line_bytes = top
        .lines()
        .find(|row| row.ends_with(" <module> <string>:8"))
        .and_then(|row| row.split_whitespace().nth(3))
        .and_then(|cum| cum.strip_suffix('B')?.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no <module> <string>:8 in the heap profile:\n{top}"));
    assert!(
        (0.85 * HELD..=1.25 * HELD).contains(&line_bytes),
        "{line_bytes} bytes on the holder's line for {HELD}:\n{top}\nthe agent said:\n{}",
        agent.log.said()
    );
    // Beside the post-mortem, the flame graph of what the victim held, naming its line: said written before it.
    let graph = agent
        .events
        .wait_wrote("oom_record", "flamegraph", Some(pid));
    assert_eq!(graph, path.with_extension("svg"));
    let svg = std::fs::read_to_string(graph).expect("the post-mortem's flame graph");
    assert!(svg.starts_with("<?xml"), "{svg}");
    assert!(svg.contains("hog (&lt;string&gt;:5)"), "{svg}");
    let limit = query_until(
        &prometheus,
        &format!(
            "alloctrace_memcg_limit_bytes{{container=\"{}\"}}",
            holder.name
        ),
        EVENT,
        |v| v > 0.0,
    );
    assert_eq!(limit, f64::from(256 << 20));
    let rss = query_until(&prometheus, "alloctrace_agent_resident_bytes", EVENT, |v| {
        v > 0.0
    });
    eprintln!(
        "post-mortem {file_name}: {} bytes through hog line 5; holder live bytes {live}; agent RSS {rss}",
        by_the_line["live_bytes"]
    );

    holder.go();
    agent.stop();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The value of the one `alloctrace_live_bytes` series of `container` in the agent's `/metrics`.
fn live_bytes(listen: &str, container: &str) -> Option<f64> {
    let metrics = get(listen, "/metrics");
    let prefix = format!("alloctrace_live_bytes{{container=\"{container}\",");
    let mut values = metrics
        .lines()
        .filter(|line| line.starts_with(&prefix))
        .map(|line| line.rsplit(' ').next().unwrap().parse::<f64>().unwrap());
    let value = values.next();
    assert!(
        values.next().is_none(),
        "one series per container and task:\n{metrics}"
    );
    value
}

#[test]
fn a_container_running_before_the_agent_is_watched_from_its_start() {
    require_root();
    docker::require_docker();
    let image = docker::python_image(&pyenv_prefix("3.12"), "3.12");
    let mut holder = Task::start(
        &image,
        format!("alloctrace-agent-early-{}", std::process::id()),
        256,
        HOLDER,
    );
    let dir = temp_dir("agent-early");
    let dir_arg = dir.to_string_lossy().into_owned();
    let agent = start_agent(&[
        "--listen",
        "127.0.0.1:0",
        "--dir",
        &dir_arg,
        "--container",
        &holder.name,
    ]);
    let listen = agent.listen.clone();
    // Found in /proc at the start, its interpreter with it: said before the agent is ready.
    let pid = holder.pid;
    let said = agent.events.said();
    assert!(
        said.iter()
            .any(|l| l["python_frames"] == pid && l["version"] == "3.12"),
        "{said:?}"
    );
    assert_eq!(said.last().unwrap()["ready"], true, "{said:?}");
    holder.go();
    holder.stdout.wait_for(EVENT, |l| l == "held");
    // The agent's ledger takes the faults as they come; its series follow at its next tick.
    let deadline = Instant::now() + EVENT;
    let live = loop {
        let live = live_bytes(&listen, &holder.name);
        if live.is_some_and(|v| v >= 0.85 * HELD) || Instant::now() > deadline {
            break live;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let live = live.unwrap_or_else(|| panic!("no live bytes for {}", holder.name));
    assert!(
        (0.85 * HELD..=1.25 * HELD).contains(&live),
        "{live} bytes for {HELD}:\n{}",
        get(&listen, "/metrics")
    );
    holder.go();
    agent.stop();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// How many of the agent's descriptors are eBPF programs of this `prog_type` (2: kprobe, which uprobes are).
fn programs_of_type(agent: u32, prog_type: u32) -> usize {
    let wanted = format!("prog_type:\t{prog_type}");
    std::fs::read_dir(format!("/proc/{agent}/fdinfo"))
        .unwrap()
        .filter_map(|entry| std::fs::read_to_string(entry.ok()?.path()).ok())
        .filter(|info| info.lines().any(|line| line == wanted))
        .count()
}

/// How many perf events the agent holds open (its tracepoints, and a uprobe's per escalated process).
fn perf_events(agent: u32) -> usize {
    std::fs::read_dir(format!("/proc/{agent}/fd"))
        .unwrap()
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy() == "anon_inode:[perf_event]")
        .count()
}

/// The value of a series of the agent's `/metrics`, named with its labels exactly.
fn metric(listen: &str, series: &str) -> Option<f64> {
    get(listen, "/metrics").lines().find_map(|line| {
        line.strip_prefix(series)?
            .strip_prefix(' ')?
            .parse::<f64>()
            .ok()
    })
}

/// `(bytes, blocks)` of the stacks of `stacks` that pass through a Python function's line.
fn through_line(stacks: &Value, function: &str, line: u64) -> (u64, u64) {
    stacks
        .as_array()
        .unwrap()
        .iter()
        .filter(|stack| {
            stack["stack"].as_array().unwrap().iter().any(|frame| {
                frame["lang"] == "python" && frame["function"] == function && frame["line"] == line
            })
        })
        .fold((0, 0), |(bytes, blocks), stack| {
            (
                bytes + stack["live_bytes"].as_u64().unwrap(),
                blocks + stack["live_count"].as_u64().unwrap(),
            )
        })
}

/// The escalated test's container's memory limit.
const ESCALATED_LIMIT_MIB: u64 = 160;

/// Waits for the next `event` line (`escalated`, `relaxed`) about `container` (id, name, its one process), checks
/// it says `why` and the container's limit, and returns the usage it was decided at.
fn wait_container_change(
    events: &mut ReadyPipe,
    (id, name, pid): (&str, &str, u32),
    event: &str,
    why: &str,
) -> u64 {
    let line = events.wait_event(&format!("{event} {id}"), |l| l[event] == id);
    assert_eq!(
        (&line["name"], &line["why"], &line["pids"]),
        (
            &Value::from(name),
            &Value::from(why),
            &serde_json::json!([pid])
        ),
        "{line}"
    );
    assert_eq!(
        line["memory"]["limit_bytes"],
        ESCALATED_LIMIT_MIB << 20,
        "{line}"
    );
    line["memory"]["usage_bytes"].as_u64().unwrap()
}

#[test]
fn a_container_past_escalate_at_gets_the_uprobes_until_it_falls_back_and_its_post_mortem_names_the_exact_bytes()
 {
    require_root();
    docker::require_docker();
    let image = docker::python_image(&pyenv_prefix("3.12"), "3.12");
    // 160 MiB: escalated past 50 % (80 MiB), relaxed under 40 % (64 MiB).
    let mut task = Task::start(
        &image,
        format!("alloctrace-agent-escalated-{}", std::process::id()),
        ESCALATED_LIMIT_MIB as u32,
        STEPPER,
    );
    let dir = temp_dir("agent-escalation");
    let dir_arg = dir.to_string_lossy().into_owned();
    let mut agent = start_agent(&[
        "--listen",
        "127.0.0.1:0",
        "--dir",
        &dir_arg,
        "--container",
        &task.name,
        "--escalate-at",
        "50",
        "--escalate-exact",
    ]);
    let listen = agent.listen.clone();
    let (id, pid) = (task.id.clone(), task.pid);
    // The uprobe programs are loaded, for escalation; no process has them yet.
    assert!(
        programs_of_type(agent.pid(), 2) > 0,
        "no uprobe program loaded"
    );
    let watched_only = perf_events(agent.pid());
    let limit = ESCALATED_LIMIT_MIB << 20;
    let name = task.name.clone();
    let wait_change = |events: &mut ReadyPipe, event: &str, why: &str| {
        wait_container_change(events, (&id, &name, pid), event, why)
    };

    // Past 80 MiB: escalated at the agent's next tick.
    task.step("fill 88");
    let crossed = Instant::now();
    let usage = wait_change(&mut agent.events, "escalated", "limit");
    eprintln!(
        "escalated {:.2} s after the step that crossed the threshold ended, at {usage} bytes",
        crossed.elapsed().as_secs_f64()
    );
    assert!(usage >= limit / 2, "{usage} bytes");
    let escalated = perf_events(agent.pid());
    assert!(escalated > watched_only, "{escalated} perf events");
    let labels = format!("{{container=\"{}\",container_id=\"{id}\"}}", task.name);
    assert_eq!(
        metric(&listen, &format!("alloctrace_escalations_total{labels}")),
        Some(1.0)
    );
    assert_eq!(metric(&listen, "alloctrace_escalated_processes"), Some(1.0));

    // Back under 64 MiB: relaxed (after its 10 s escalated), the process's perf events closed. Each probe
    // point has one perf event of the agent's own, which carries its program and stays for the next escalation
    // (see uprobe_events.rs), and one per escalated process.
    task.step("grow 16");
    task.step("free");
    let usage = wait_change(&mut agent.events, "relaxed", "fell_back");
    assert!(usage < limit * 2 / 5, "{usage} bytes");
    let relaxed = perf_events(agent.pid());
    assert!(
        relaxed < escalated && relaxed - watched_only == escalated - relaxed,
        "{watched_only} perf events watched only, {escalated} escalated, {relaxed} relaxed"
    );
    assert_eq!(metric(&listen, "alloctrace_escalated_processes"), Some(0.0));

    // Escalated again; 16 MiB on line 8 since; then killed holding it.
    task.step("fill 88");
    wait_change(&mut agent.events, "escalated", "limit");
    assert_eq!(perf_events(agent.pid()), escalated);
    assert_eq!(
        metric(&listen, &format!("alloctrace_escalations_total{labels}")),
        Some(2.0)
    );
    task.step("grow 16");
    task.send("hog");
    let path = agent.events.wait_wrote("oom_record", "json", Some(pid));
    let record: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let escalation = &record["escalation"];
    assert!(
        escalation["seconds_before"].as_f64().unwrap() > 0.0,
        "{record:#}"
    );
    assert_eq!(escalation["sample_every_bytes"], Value::Null, "{record:#}");
    // Exactly what line 8 allocated since the second escalation (the first one's blocks were freed, and
    // forgotten as it relaxed), and the block the kill interrupted.
    assert_eq!(
        through_line(&escalation["top_stacks"], "grow", 8),
        (16 * GROW_BLOCK, 16),
        "{record:#}"
    );
    assert_eq!(
        through_line(&escalation["top_stacks"], "hog", 11),
        ((100 << 20) + 1, 1),
        "{record:#}"
    );
    eprintln!(
        "escalated {} s before the kill; its top stacks: {}",
        escalation["seconds_before"],
        escalation["top_stacks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| format!("{} B in {}", s["live_bytes"], s["live_count"]))
            .collect::<Vec<_>>()
            .join(", ")
    );
    assert_eq!(
        through_line(&escalation["top_stacks"], "fill", 5),
        (0, 0),
        "allocated before the escalation: {record:#}"
    );
    drop(task);
    agent.stop();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_agent_with_no_escalation_loads_no_uprobe_program() {
    require_root();
    let dir = temp_dir("agent-no-escalation");
    let dir_arg = dir.to_string_lossy().into_owned();
    let agent = start_agent(&[
        "--listen",
        "127.0.0.1:0",
        "--dir",
        &dir_arg,
        "--no-escalation",
    ]);
    // Its tracepoint programs are there (prog_type 5): the count is of the agent's programs.
    assert!(programs_of_type(agent.pid(), 5) > 0);
    assert_eq!(programs_of_type(agent.pid(), 2), 0);
    agent.stop();
    std::fs::remove_dir_all(&dir).unwrap();
}
