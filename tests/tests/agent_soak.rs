//! `alloctrace agent` bounded while containers come and go, then killed with SIGKILL leaving nothing behind.
//!
//! Waves of real Docker containers run Python tasks that allocate in a few functions and fork a child that
//! allocates too, beside one task per wave that grows under a 64 MiB limit until the kernel kills it. Each task
//! is let go only once the agent says it reads its Python frames, so every one is watched. After each wave, once
//! the agent exports no series of its containers any more (`--series-ttl 1s`: it has seen them all gone), the
//! agent's resident memory is read from `/proc/PID/status`.
//!
//! The rule: the agent's peak resident memory (`VmHWM`) stays within 256 MiB, and after the warm-up (the first
//! [`WARM_UP`] waves: libraries read, the allocator's arenas made) its resident memory after any later wave
//! exceeds that after the warm-up by at most [`GROWTH_BOUND`] — whatever the number of containers gone by.
//! And what it keeps of gone containers is bounded where it counts: the agent runs with a table of
//! [`MAX_STACKS`] stacks, about four waves' worth (a wave's tasks and their children make about 250), and every
//! wave's OOM post-mortem must still name the victim's Python function. An agent that kept the stacks of gone
//! processes fills that table by the fourth wave, and from then on names no new stack at all.
//!
//! Then the agent is killed with SIGKILL: every BPF program, map and link it held (read from its
//! `/proc/PID/fdinfo` before) is gone from the kernel, its helper process has exited, and tracefs lists no uprobe
//! event of its group.

use alloctrace_tests::{
    agent::{
        EVENT, HOG, STARTUP, Task, bpf_object_exists, bpf_objects, children, get, resident_bytes,
        start_agent, temp_dir, uprobe_events_of, wait_until,
    },
    docker, pyenv_prefix, require_root,
};

/// Waves of containers, and tasks in each (one of them the OOM victim).
const WAVES: usize = 10;
const TASKS_PER_WAVE: usize = 5;
/// Waves after which the agent has read the libraries every container maps and made its arenas.
const WARM_UP: usize = 2;
/// The most the agent's resident memory may grow past the warm-up, however many containers go by.
const GROWTH_BOUND: u64 = 16 << 20;
/// The most resident memory the agent may ever take (issue 10).
const MAX_AGENT_RSS: u64 = 256 << 20;
/// The agent's `--max-stacks`.
const MAX_STACKS: usize = 1000;

/// Allocates 16 MiB over two functions, forks a child that allocates 8 MiB and exits, then ends.
const WORKER: &str = "import os, sys
def build(n):
    return [bytearray(1 << 20) for _ in range(n)]
def work():
    held = build(8) + build(8)
    pid = os.fork()
    if pid == 0:
        build(8)
        os._exit(0)
    os.waitpid(pid, 0)
    return held
print('ready', flush=True)
sys.stdin.readline()
held = work()
print('done', flush=True)
";

#[test]
fn the_agent_stays_bounded_as_containers_come_and_go_and_leaves_nothing_behind_when_killed() {
    require_root();
    docker::require_docker();
    let image = docker::python_image(&pyenv_prefix("3.12"), "3.12");
    let dir = temp_dir("agent-soak");
    let dir_arg = dir.to_string_lossy().into_owned();
    let mut agent = start_agent(&[
        "--listen",
        "127.0.0.1:0",
        "--dir",
        &dir_arg,
        "--series-ttl",
        "1s",
        "--max-stacks",
        &MAX_STACKS.to_string(),
    ]);
    let (agent_pid, listen) = (agent.pid(), agent.listen.clone());

    let mut after_wave: Vec<u64> = Vec::new();
    for wave in 0..WAVES {
        let mut tasks: Vec<(Task, bool)> = (0..TASKS_PER_WAVE)
            .map(|index| {
                let hog = index == 0;
                let name = format!("alloctrace-soak-{}-{wave}-{index}", std::process::id());
                let (memory_mib, script) = if hog { (64, HOG) } else { (256, WORKER) };
                (Task::start(&image, name, memory_mib, script), hog)
            })
            .collect();
        // Let go once watched: the agent reads each one's Python frames from then on.
        for (task, _) in &mut tasks {
            agent.events.wait_python_frames(task.pid);
            task.go();
        }
        for (task, hog) in &mut tasks {
            if *hog {
                let path = agent
                    .events
                    .wait_wrote("oom_record", "json", Some(task.pid));
                let record: serde_json::Value =
                    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
                let through_hog =
                    record["top_stacks"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|stack| {
                            stack["stack"].as_array().unwrap().iter().any(|frame| {
                                frame["lang"] == "python" && frame["function"] == "hog"
                            })
                        });
                assert!(
                    through_hog,
                    "wave {}: the post-mortem names no stack through hog: {record:#}",
                    wave + 1
                );
            } else {
                task.stdout.wait_for(EVENT, |l| l == "done");
            }
            task.wait_exit(EVENT);
        }
        let ids: Vec<String> = tasks.iter().map(|(task, _)| task.id.clone()).collect();
        drop(tasks);
        // The agent has seen every process of the wave gone once their series are gone (one second after).
        wait_until(EVENT, "the wave's series never left /metrics", || {
            let metrics = get(&listen, "/metrics");
            !ids.iter().any(|id| metrics.contains(id.as_str()))
        });
        let (rss, peak) = resident_bytes(agent_pid);
        println!(
            "after wave {} ({} containers): agent RSS {:.1} MiB, peak {:.1} MiB",
            wave + 1,
            (wave + 1) * TASKS_PER_WAVE,
            rss as f64 / 1048576.0,
            peak as f64 / 1048576.0
        );
        assert!(
            peak <= MAX_AGENT_RSS,
            "the agent's peak RSS is {peak} bytes, more than {MAX_AGENT_RSS}"
        );
        after_wave.push(rss);
    }
    let warm = after_wave[WARM_UP - 1];
    for (wave, &rss) in after_wave.iter().enumerate().skip(WARM_UP) {
        assert!(
            rss <= warm + GROWTH_BOUND,
            "after wave {} the agent's RSS is {rss} bytes, {} more than after the warm-up ({warm}); every wave: {after_wave:?}",
            wave + 1,
            rss.saturating_sub(warm)
        );
    }

    // SIGKILL: what the agent held goes with it.
    let held = bpf_objects(agent_pid);
    assert!(
        held.iter()
            .any(|(kind, _)| *kind == alloctrace_tests::agent::BpfKind::Program),
        "the agent holds no BPF program: {held:?}"
    );
    let helpers = children(agent_pid);
    assert_eq!(
        helpers.len(),
        1,
        "the agent has one child, its helper: {helpers:?}"
    );
    let helper = helpers[0];
    // SAFETY: pidfd_open takes a pid and flags; the helper is alive (listed as a child just now).
    let helper_fd = unsafe { libc::syscall(libc::SYS_pidfd_open, helper as libc::pid_t, 0) };
    assert!(helper_fd >= 0, "pidfd_open of the helper {helper}");
    agent.process.0.kill().unwrap();
    agent.process.0.wait().unwrap();
    wait_until(STARTUP, "the agent's helper never exited", || {
        let mut poll = libc::pollfd {
            fd: helper_fd as i32,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, no wait.
        unsafe { libc::poll(&mut poll, 1, 0) == 1 }
    });
    // SAFETY: our pidfd, closed once.
    unsafe { libc::close(helper_fd as i32) };
    // The kernel frees an object once its last descriptor is closed (the helper held two maps).
    wait_until(
        EVENT,
        "the agent's BPF objects were still in the kernel",
        || held.iter().all(|&(kind, id)| !bpf_object_exists(kind, id)),
    );
    assert_eq!(uprobe_events_of(agent_pid), Vec::<String>::new());
    println!(
        "after SIGKILL: {} BPF programs, maps and links gone, helper {helper} exited, no uprobe event left",
        held.len()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
