//! Which Airflow task a process runs: dag, task, run and try, from the process titles and command lines of
//! Airflow 2.x and 3.x task runners, or from the `AIRFLOW_CTX_*` variables Airflow puts in a task's
//! environment. Children inherit their parent's identity when they show none of their own.

use serde::Serialize;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TaskIdentity {
    pub dag_id: String,
    pub task_id: String,
    pub run_id: Option<String>,
    pub try_number: Option<u32>,
}

/// From a command line: `airflow task runner: DAG TASK RUN JOB` and `airflow task supervisor: …` (2.x process
/// titles, which may arrive as one argument), `airflow tasks run DAG TASK RUN …` (2.x CLI), and
/// `… execute_workload --json-string JSON` (3.x, whose JSON has a `ti` object).
pub fn from_cmdline(cmdline: &[String]) -> Option<TaskIdentity> {
    let words: Vec<&str> = cmdline.iter().flat_map(|a| a.split_whitespace()).collect();
    let position = |pattern: &[&str]| words.windows(pattern.len()).position(|w| w == pattern);
    for title in [["task", "runner:"], ["task", "supervisor:"]] {
        if let Some(at) = position(&title) {
            let rest = &words[at + 2..];
            if rest.len() >= 2 {
                return Some(TaskIdentity {
                    dag_id: rest[0].to_owned(),
                    task_id: rest[1].to_owned(),
                    run_id: rest.get(2).map(|s| (*s).to_owned()),
                    try_number: None,
                });
            }
        }
    }
    if let Some(at) = position(&["tasks", "run"]) {
        let positional: Vec<&str> = words[at + 2..]
            .iter()
            .take_while(|w| !w.starts_with('-'))
            .copied()
            .collect();
        if positional.len() >= 2 {
            return Some(TaskIdentity {
                dag_id: positional[0].to_owned(),
                task_id: positional[1].to_owned(),
                run_id: positional.get(2).map(|s| (*s).to_owned()),
                try_number: None,
            });
        }
    }
    let json_at = cmdline.iter().position(|a| a == "--json-string")?;
    let json: serde_json::Value = serde_json::from_str(cmdline.get(json_at + 1)?).ok()?;
    let ti = &json["ti"];
    Some(TaskIdentity {
        dag_id: ti["dag_id"].as_str()?.to_owned(),
        task_id: ti["task_id"].as_str()?.to_owned(),
        run_id: ti["run_id"].as_str().map(str::to_owned),
        try_number: ti["try_number"]
            .as_u64()
            .and_then(|n| u32::try_from(n).ok()),
    })
}

/// From a process's environment (`/proc/PID/environ`, NUL-separated): `AIRFLOW_CTX_DAG_ID`, `…_TASK_ID`,
/// `…_DAG_RUN_ID`, `…_TRY_NUMBER`.
pub fn from_environ(environ: &[u8]) -> Option<TaskIdentity> {
    let var = |name: &str| {
        environ.split(|&b| b == 0).find_map(|entry| {
            let entry = std::str::from_utf8(entry).ok()?;
            entry
                .strip_prefix(name)?
                .strip_prefix('=')
                .map(str::to_owned)
        })
    };
    Some(TaskIdentity {
        dag_id: var("AIRFLOW_CTX_DAG_ID")?,
        task_id: var("AIRFLOW_CTX_TASK_ID")?,
        run_id: var("AIRFLOW_CTX_DAG_RUN_ID"),
        try_number: var("AIRFLOW_CTX_TRY_NUMBER").and_then(|n| n.parse().ok()),
    })
}

/// A process's identity: its command line first, its environment next.
pub fn of_pid(pid: u32, cmdline: &[String]) -> Option<TaskIdentity> {
    from_cmdline(cmdline)
        .or_else(|| from_environ(&super::read_bounded(format!("/proc/{pid}/environ")).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(words: &[&str]) -> Vec<String> {
        words.iter().map(|w| (*w).to_owned()).collect()
    }

    fn identity(
        dag: &str,
        task: &str,
        run: Option<&str>,
        try_number: Option<u32>,
    ) -> Option<TaskIdentity> {
        Some(TaskIdentity {
            dag_id: dag.to_owned(),
            task_id: task.to_owned(),
            run_id: run.map(str::to_owned),
            try_number,
        })
    }

    #[test]
    fn airflow_2_process_titles_and_cli() {
        assert_eq!(
            from_cmdline(&args(&[
                "airflow task runner: etl load_partitions scheduled__2026-11-27T00:00:00+00:00 42"
            ])),
            identity(
                "etl",
                "load_partitions",
                Some("scheduled__2026-11-27T00:00:00+00:00"),
                None
            )
        );
        assert_eq!(
            from_cmdline(&args(&["airflow task supervisor: ['airflow', 'tasks']"]))
                .map(|i| i.dag_id),
            Some("['airflow',".to_owned()),
            "a supervisor title is split like a runner's"
        );
        assert_eq!(
            from_cmdline(&args(&[
                "/usr/local/bin/python",
                "/usr/local/bin/airflow",
                "tasks",
                "run",
                "etl",
                "load",
                "manual__1",
                "--job-id",
                "7",
                "--local",
                "--subdir",
                "DAGS_FOLDER/etl.py"
            ])),
            identity("etl", "load", Some("manual__1"), None)
        );
        assert_eq!(from_cmdline(&args(&["python3", "job.py"])), None);
    }

    #[test]
    fn airflow_3_workloads() {
        let json = r#"{"token":"x","ti":{"id":"0193","task_id":"load","dag_id":"etl","run_id":"manual__2","try_number":3,"map_index":-1}}"#;
        assert_eq!(
            from_cmdline(&args(&[
                "python",
                "-m",
                "airflow.sdk.execution_time.execute_workload",
                "--json-string",
                json
            ])),
            identity("etl", "load", Some("manual__2"), Some(3))
        );
    }

    #[test]
    fn environment_variables() {
        let environ = b"PATH=/usr/bin\0AIRFLOW_CTX_DAG_ID=etl\0AIRFLOW_CTX_TASK_ID=load\0AIRFLOW_CTX_DAG_RUN_ID=manual__3\0AIRFLOW_CTX_TRY_NUMBER=2\0";
        assert_eq!(
            from_environ(environ),
            identity("etl", "load", Some("manual__3"), Some(2))
        );
        assert_eq!(from_environ(b"PATH=/usr/bin\0"), None);
    }
}
