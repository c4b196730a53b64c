//! The profile formats on real traces: `go tool pprof` reads the pprof of the C workload and agrees with the
//! JSON report to the byte, function by function; Python functions and lines come through; the folded stacks
//! and the SVG flame graph name the sites and parse.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use alloctrace_tests::{
    SITES_EXPECTED, alloctrace, docker, go_pprof, interrupt, pyenv_prefix,
    ready::alloctrace_with_ready_fd, require_root, start_tracing_pid, workload, workspace,
};
use serde_json::Value;

/// A file in the temporary folder, named for this test process.
fn temp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("alloctrace-formats-{}-{name}", std::process::id()))
}

/// `alloctrace leaks --top 0 --format FORMAT -o FILE -- sites`: the file's bytes.
fn leaks_of_sites(format: &str) -> Vec<u8> {
    require_root();
    let path = temp(&format!("sites.{format}"));
    let out = Command::new(alloctrace())
        .args(["leaks", "--top", "0", "--format", format, "-o"])
        .arg(&path)
        .arg("--")
        .arg(workload("sites"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "alloctrace failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    bytes
}

/// How a flame graph or pprof names a JSON frame: its function, or `module+0xoffset` by the module's file name.
fn json_frame_name(frame: &Value) -> String {
    match frame["function"].as_str() {
        // pprof keeps a call inlined into the next frame as a line of that frame's location, which go tool
        // pprof shows as a function of its own, marked.
        Some(function) if frame["inlined"] == true => format!("{function} (inline)"),
        Some(function) => function.to_owned(),
        None => {
            let module = frame["module"].as_str().unwrap_or("?");
            let file = module.rsplit('/').next().unwrap();
            format!("{file}+{}", frame["offset"].as_str().unwrap())
        }
    }
}

/// In-use bytes per function from a JSON report: flat (the innermost frame's function) and cumulative (every
/// site whose stack passes through it, once per site).
fn json_per_function(report: &Value) -> (BTreeMap<String, u64>, BTreeMap<String, u64>) {
    let mut flat = BTreeMap::new();
    let mut cum = BTreeMap::new();
    for site in report["sites"].as_array().unwrap() {
        let bytes = site["live_bytes"].as_u64().unwrap();
        let stack = site["stack"].as_array().unwrap();
        // go tool pprof shows a function inlined into a copy of itself (a location's lines of one name) once,
        // as the function it was inlined into.
        let names: Vec<String> = stack
            .iter()
            .enumerate()
            .filter(|(depth, frame)| {
                !(frame["inlined"] == true
                    && stack
                        .get(depth + 1)
                        .is_some_and(|next| next["function"] == frame["function"]))
            })
            .map(|(_, frame)| json_frame_name(frame))
            .collect();
        *flat.entry(names[0].clone()).or_insert(0) += bytes;
        let mut seen: Vec<&String> = Vec::new();
        for name in &names {
            if !seen.contains(&name) {
                seen.push(name);
                *cum.entry(name.clone()).or_insert(0) += bytes;
            }
        }
    }
    // pprof lists only functions that hold something.
    flat.retain(|_, b| *b > 0);
    cum.retain(|_, b| *b > 0);
    (flat, cum)
}

/// `go tool pprof -top` in bytes: flat and cumulative in-use bytes per function.
fn pprof_per_function(profile: &Path) -> (BTreeMap<String, u64>, BTreeMap<String, u64>) {
    let top = go_pprof(
        &[
            "-top",
            "-nodefraction=0",
            // A node is marked `(inline)` by its incoming edges, and by default edges under 0.1% of the total
            // are dropped: a small site's inlined frame would lose its mark.
            "-edgefraction=0",
            "-nodecount=100000",
            "-sample_index=inuse_space",
            "-unit=B",
        ],
        profile,
    );
    let bytes = |field: &str| -> u64 {
        field
            .strip_suffix('B')
            .unwrap_or(field)
            .parse()
            .unwrap_or_else(|_| panic!("{field:?} is not a byte count: {top}"))
    };
    let mut flat = BTreeMap::new();
    let mut cum = BTreeMap::new();
    let rows = top
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("flat"))
        .skip(1);
    for row in rows {
        // flat flat% sum% cum cum% name (a name may hold spaces)
        let fields: Vec<&str> = row.split_whitespace().collect();
        assert!(fields.len() >= 6, "{row}: {top}");
        let name = fields[5..].join(" ");
        if bytes(fields[0]) > 0 {
            flat.insert(name.clone(), bytes(fields[0]));
        }
        cum.insert(name, bytes(fields[3]));
    }
    (flat, cum)
}

#[test]
fn formats_go_pprof_agrees_with_the_json_report_to_the_byte() {
    let report: Value = serde_json::from_slice(&leaks_of_sites("json")).unwrap();
    let profile = temp("sites.pb.gz");
    std::fs::write(&profile, leaks_of_sites("pprof")).unwrap();
    let (json_flat, json_cum) = json_per_function(&report);
    let (pprof_flat, pprof_cum) = pprof_per_function(&profile);
    assert_eq!(pprof_flat, json_flat, "flat in-use bytes per function");
    assert_eq!(pprof_cum, json_cum, "cumulative in-use bytes per function");
    for (_, function, bytes, _) in SITES_EXPECTED {
        assert_eq!(pprof_flat[function], bytes, "{function}");
    }
    // Objects, allocations and labels come through too; the sites workload's binary is named with its build id.
    let raw = go_pprof(&["-raw"], &profile);
    std::fs::remove_file(&profile).unwrap();
    assert!(
        raw.contains(
            "inuse_space/bytes[dflt] inuse_objects/count alloc_space/bytes alloc_objects/count"
        ),
        "{raw}"
    );
    assert!(
        raw.contains("      51200         25     102400         50: "),
        "{raw}"
    );
    assert!(raw.contains("comm:[sites-cc-"), "{raw}");
    assert!(raw.contains("kind:[calloc]"), "{raw}");
    let sites = workload("sites");
    let mapping = raw
        .lines()
        .find(|l| l.contains(sites.to_str().unwrap()))
        .unwrap_or_else(|| panic!("no mapping of {}: {raw}", sites.display()));
    let readelf = Command::new("readelf")
        .arg("-n")
        .arg(&sites)
        .output()
        .unwrap();
    let notes = String::from_utf8_lossy(&readelf.stdout);
    let build_id = notes
        .lines()
        .find_map(|l| l.trim().strip_prefix("Build ID: "))
        .expect("the workload has a build id");
    assert!(mapping.contains(build_id), "{mapping}");
}

#[test]
fn formats_folded_stacks_and_the_flame_graph_name_the_sites() {
    let folded = String::from_utf8(leaks_of_sites("folded")).unwrap();
    for (_, function, bytes, _) in SITES_EXPECTED {
        let line = format!(";main;{function} {bytes}");
        assert!(
            folded.lines().any(|l| l.ends_with(&line)),
            "no line ending {line:?}: {folded}"
        );
    }
    let svg = String::from_utf8(leaks_of_sites("flamegraph")).unwrap();
    // inferno declares the SVG 1.1 DTD (and defines no entity).
    let options = roxmltree::ParsingOptions {
        allow_dtd: true,
        ..roxmltree::ParsingOptions::default()
    };
    let document = roxmltree::Document::parse_with_options(&svg, options)
        .unwrap_or_else(|e| panic!("the flame graph is not XML: {e}: {svg}"));
    assert_eq!(document.root_element().tag_name().name(), "svg");
    let titles: Vec<&str> = document
        .descendants()
        .filter(|n| n.has_tag_name("title"))
        .filter_map(|n| n.text())
        .collect();
    for (_, function, bytes, _) in SITES_EXPECTED {
        // inferno's frame titles: `NAME (BYTES bytes, P%)`.
        let title = format!("{function} ({} bytes", group_thousands(bytes));
        assert!(
            titles.iter().any(|t| t.starts_with(&title)),
            "no frame titled {title:?}: {titles:?}"
        );
    }
    let heading = document
        .descendants()
        .find(|n| n.attribute("id") == Some("title"))
        .and_then(|n| n.text())
        .unwrap();
    assert!(heading.starts_with("alloctrace leaks: "), "{heading}");
}

/// `8388608` → `8,388,608`, as inferno writes counts.
fn group_thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The line of the Python workload that carries `# site: NAME`.
fn python_marker(name: &str) -> usize {
    let source = std::fs::read_to_string(pysites()).unwrap();
    let tag = format!("# site: {name}");
    source
        .lines()
        .position(|l| l.trim_end().ends_with(&tag))
        .unwrap_or_else(|| panic!("no {tag} in the workload"))
        + 1
}

fn pysites() -> PathBuf {
    workspace().join("tests/workloads/pysites.py")
}

/// Runs `pysites.py` on pyenv's 3.11 under `alloctrace leaks --top 0 --format FORMAT -o FILE`, and stops the
/// trace (as Ctrl-C does) once the workload holds everything: it is still alive when the report is written.
fn trace_pysites(format: &str, file: &Path) {
    require_root();
    let python = pyenv_prefix("3.11").join("bin/python3.11");
    let mut tracer = Command::new(alloctrace())
        .args(["leaks", "--format", format, "--top", "0", "-o"])
        .arg(file)
        .arg("--")
        .arg(&python)
        .arg(pysites())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(tracer.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n", "the workload did not get ready");
    let input = tracer.stdin.take();
    let mut errors = tracer.stderr.take().unwrap();
    // SAFETY: signalling the child we spawned and have not reaped.
    unsafe { libc::kill(tracer.id() as libc::pid_t, libc::SIGINT) };
    let status = tracer.wait().unwrap();
    // The workload's forked child shares these pipes and waits for its input to close.
    drop(input);
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut errors, &mut stderr).unwrap();
    assert!(status.success(), "alloctrace failed: {stderr}");
}

/// The workload's line that carries `# site: NAME`, as a traceback shows it (stripped).
fn python_source(name: &str) -> String {
    let source = std::fs::read_to_string(pysites()).unwrap();
    source
        .lines()
        .nth(python_marker(name) - 1)
        .unwrap()
        .trim()
        .to_owned()
}

#[test]
fn formats_python_functions_files_and_lines_reach_go_pprof() {
    let profile = temp("pysites.pb.gz");
    trace_pysites("pprof", &profile);
    let raw = go_pprof(&["-raw"], &profile);
    let traces = go_pprof(&["-traces", "-sample_index=inuse_space"], &profile);
    std::fs::remove_file(&profile).unwrap();
    let file = pysites();
    for (function, marker) in [
        ("cache_results", "cache"),
        ("keep_one_large_object", "large"),
        ("thread_worker", "thread"),
    ] {
        // A Location line: `ID: 0x0 M=0 FUNCTION FILE:LINE s=0`.
        let location = format!(
            "{function} {}:{} s=0",
            file.display(),
            python_marker(marker)
        );
        assert!(raw.contains(&location), "no location {location:?}: {raw}");
    }
    assert!(traces.contains("main"), "{traces}");
    assert!(traces.contains("<module>"), "{traces}");
}

#[test]
fn formats_pprof_is_refused_on_a_terminal_and_written_to_a_pipe() {
    require_root();
    let sites = workload("sites");
    let piped = Command::new(alloctrace())
        .args(["leaks", "--format", "pprof", "--top", "0", "--"])
        .arg(&sites)
        .output()
        .unwrap();
    assert!(
        piped.status.success(),
        "{}",
        String::from_utf8_lossy(&piped.stderr)
    );
    assert_eq!(&piped.stdout[..2], [0x1f, 0x8b], "gzip");
    // util-linux's `script` gives the command a terminal.
    let on_terminal = Command::new("script")
        .args(["--quiet", "--return", "--command"])
        .arg(format!(
            "{} leaks --format pprof -- {}",
            alloctrace().display(),
            sites.display()
        ))
        .arg("/dev/null")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("script (util-linux) is needed: {e}"));
    let said = String::from_utf8_lossy(&on_terminal.stdout);
    assert_eq!(on_terminal.status.code(), Some(2), "{said}");
    assert!(
        said.contains("alloctrace: error: pprof is binary: write it to a file with -o FILE"),
        "{said}"
    );
}

/// Loads `page` in headless Chromium and takes a screenshot of it: what Chromium printed on its console (every
/// message, of any level: the page logs nothing when it works).
fn chromium(page: &Path, screenshot: &Path) -> Vec<String> {
    let profile = temp("chromium-profile");
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--no-first-run",
            "--disable-component-update",
            "--disable-sync",
            "--enable-logging=stderr",
            "--v=0",
            "--window-size=1300,1500",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--screenshot={}", screenshot.display()))
        .arg(format!("file://{}", page.display()))
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!("chromium (Debian's chromium) is needed for the HTML test: {e}")
        });
    let _ = std::fs::remove_dir_all(&profile);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "chromium failed: {stderr}");
    stderr
        .lines()
        .filter(|l| l.contains(":CONSOLE"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn formats_html_page_loads_in_chromium_without_console_errors() {
    require_root();
    // The check sees errors: a page with a console error and a script error, in the page and in an embedded
    // SVG document as the flame graph is embedded, is caught.
    let canary = temp("canary.html");
    std::fs::write(
        &canary,
        "<!DOCTYPE html><html><body><script>console.error('canary')</script><object type=\"image/svg+xml\" \
         data=\"data:image/svg+xml;charset=utf-8,%3Csvg xmlns=%22http://www.w3.org/2000/svg%22 onload=%22nosuch()%22/%3E\">\
         </object></body></html>",
    )
    .unwrap();
    let caught = chromium(&canary, &temp("canary.png"));
    std::fs::remove_file(&canary).unwrap();
    let _ = std::fs::remove_file(temp("canary.png"));
    assert!(
        caught.iter().any(|l| l.contains("\"canary\"")),
        "{caught:?}"
    );
    assert!(
        caught.iter().any(|l| l.contains("nosuch is not defined")),
        "{caught:?}"
    );

    let page = temp("sites.html");
    std::fs::write(&page, leaks_of_sites("html")).unwrap();
    let html = std::fs::read_to_string(&page).unwrap();
    assert!(html.contains("<svg id=\"memory-chart\""), "{html}");
    assert!(html.contains("<polyline"), "{html}");
    assert!(html.contains("data:image/svg+xml;charset=utf-8,"), "{html}");
    for (_, function, _, _) in SITES_EXPECTED {
        assert!(
            html.contains(&format!("<code>{function}</code>")),
            "{function}: {html}"
        );
    }
    assert!(
        html.contains("<td class=\"churn\""),
        "freed_site is churn: {html}"
    );
    let screenshot = workspace().join("target/formats-sites-html.png");
    let console = chromium(&page, &screenshot);
    std::fs::remove_file(&page).unwrap();
    assert_eq!(console, Vec::<String>::new(), "console messages");
    let png = std::fs::read(&screenshot).unwrap();
    assert_eq!(&png[1..4], b"PNG", "{}", screenshot.display());
}

#[test]
fn formats_text_tracebacks_show_each_python_frames_source_line() {
    let report = temp("pysites.txt");
    trace_pysites("text", &report);
    let text = std::fs::read_to_string(&report).unwrap();
    std::fs::remove_file(&report).unwrap();
    let file = pysites();
    for (function, marker) in [("cache_results", "cache"), ("thread_worker", "thread")] {
        let frame = format!(
            "      File \"{}\", line {}, in {function}\n        {}\n",
            file.display(),
            python_marker(marker),
            python_source(marker)
        );
        assert!(text.contains(&frame), "no {frame:?} in {text}");
    }
    // Written to a file: no colour unless asked for.
    assert!(!text.contains('\u{1b}'), "{text}");
}

#[test]
fn formats_text_tracebacks_read_a_containers_source_through_its_root() {
    require_root();
    docker::require_docker();
    let prefix = pyenv_prefix("3.12");
    let image = docker::python_image(&prefix, "3.12");
    // The workload is at /w inside the container only: its lines can come from nowhere but the container.
    assert!(
        !Path::new("/w/pysites.py").exists(),
        "/w/pysites.py exists on the host"
    );
    let name = format!("alloctrace-formats-{}", std::process::id());
    let mut container = Command::new("docker")
        .args([
            "run",
            "-i",
            "--rm",
            "--network",
            "none",
            "--name",
            &name,
            "-v",
        ])
        .arg(format!("{}:/w:ro", pysites().parent().unwrap().display()))
        .arg(&image)
        .arg(prefix.join("bin/python3.12"))
        .args(["/w/pysites.py", "--wait"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(container.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "waiting\n");
    let pid = docker::container_pid(&name);
    let report = temp("container.txt");
    let tracing = start_tracing_pid(&["leaks", "--top", "0", "--color", "always"], pid, &report);
    writeln!(container.stdin.as_mut().unwrap(), "go").unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n");
    interrupt(tracing);
    drop(container.stdin.take());
    container.wait().unwrap();
    let text = std::fs::read_to_string(&report).unwrap();
    std::fs::remove_file(&report).unwrap();
    // --color always: the frame's file, line and function in magenta, its source plain under it.
    let frame = format!(
        "      File \"\u{1b}[35m/w/pysites.py\u{1b}[0m\", line \u{1b}[35m{}\u{1b}[0m, in \u{1b}[35mcache_results\u{1b}[0m\n        {}\n",
        python_marker("cache"),
        python_source("cache")
    );
    assert!(text.contains(&frame), "no {frame:?} in {text}");
}

#[test]
fn formats_oom_writes_a_flame_graph_per_kill_into_a_directory() {
    require_root();
    docker::require_docker();
    // Without a directory it refuses, before anything is attached.
    let refused = Command::new(alloctrace())
        .args(["oom", "--format", "flamegraph"])
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&refused.stderr)
            .contains("writes a file per OOM kill: name their directory with -o DIR"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let prefix = pyenv_prefix("3.12");
    let image = docker::python_image(&prefix, "3.12");
    let name = format!("alloctrace-oom-svg-{}", std::process::id());
    let dir = temp("oom-graphs");
    let (mut command, mut ready) = alloctrace_with_ready_fd();
    let mut tracer = command
        .args([
            "oom",
            "--comm",
            "python3.12",
            "--format",
            "flamegraph",
            "-o",
        ])
        .arg(&dir)
        .spawn()
        .unwrap();
    ready.wait_ready();
    // It waits for a line, then allocates 1 MiB a step into its 64 MiB limit.
    let workload = "import sys\nsys.stdin.readline()\nheld = []\nwhile True:\n    held.append(bytes(1 << 20))  # grows\n";
    let mut container = Command::new("docker")
        .args([
            "run",
            "-i",
            "--rm",
            "--network",
            "none",
            "--memory=64m",
            "--memory-swap=64m",
            "--name",
            &name,
        ])
        .arg(&image)
        .arg(prefix.join("bin/python3.12"))
        .args(["-c", workload])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = docker::started_container_pid(&name);
    ready.wait_attached(&[pid]);
    writeln!(container.stdin.as_mut().unwrap()).unwrap();
    assert_eq!(
        container.wait().unwrap().code(),
        Some(137),
        "the container should be OOM-killed"
    );
    let path = ready.wait_wrote("oom_record", "flamegraph", Some(pid));
    // SAFETY: signalling the child we spawned and have not reaped.
    unsafe { libc::kill(tracer.id() as libc::pid_t, libc::SIGINT) };
    assert!(tracer.wait().unwrap().success());
    assert_eq!(path.parent(), Some(dir.as_path()), "{path:?}");
    assert!(
        path.to_string_lossy().ends_with(&format!("-pid{pid}.svg")),
        "{path:?}"
    );
    let svg = std::fs::read_to_string(&path).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let options = roxmltree::ParsingOptions {
        allow_dtd: true,
        ..roxmltree::ParsingOptions::default()
    };
    let document = roxmltree::Document::parse_with_options(&svg, options)
        .unwrap_or_else(|e| panic!("not XML: {e}: {svg}"));
    let heading = document
        .descendants()
        .find(|n| n.attribute("id") == Some("title"))
        .and_then(|n| n.text())
        .unwrap();
    assert!(
        heading.starts_with(&format!("OOM kill of pid {pid} python3.12 at ")),
        "{heading}"
    );
    // The list of 1 MiB buffers, named by its line of `-c` code.
    assert!(
        svg.contains("<title>&lt;module&gt; (&lt;string&gt;:5) ("),
        "{svg}"
    );
}
