//! Which container a process runs in, from its cgroup path: the runtime and container id that Docker (cgroupfs
//! and systemd drivers), containerd/CRI, CRI-O and podman write into the paths they create, and for Kubernetes
//! the pod's uid and QoS class. Works on pure cgroup v2 hosts and on hybrid v1/v2 hosts, from
//! `/proc/PID/cgroup`.

use std::{
    fs::File,
    io::{self, BufRead, BufReader},
};

use serde::Serialize;

/// A process's container, as far as its cgroup path says.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Container {
    /// The runtime's full container id (64 hex digits).
    pub id: String,
    /// The name the runtime knows it by, when alloctrace could ask (Docker).
    pub name: Option<String>,
    /// `docker`, `containerd`, `cri-o`, `podman`, or `kubernetes` when a pod's cgroupfs path does not say which
    /// runtime made it.
    pub runtime: &'static str,
    /// The cgroup path (v2, or the v1 memory controller's on hosts where v2 has no controllers).
    pub cgroup: String,
    /// Kubernetes pod uid and QoS class (`guaranteed`, `burstable`, `besteffort`), when in a pod.
    pub pod_uid: Option<String>,
    pub qos_class: Option<&'static str>,
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The runtime and id a path segment names: `docker-<id>.scope`, `cri-containerd-<id>.scope`, `crio-<id>.scope`,
/// `libpod-<id>.scope`, or a bare id (cgroupfs drivers).
fn segment_container(segment: &str, parent: Option<&str>) -> Option<(&'static str, String)> {
    if let Some(scope) = segment.strip_suffix(".scope") {
        for (prefix, runtime) in [
            ("docker-", "docker"),
            ("cri-containerd-", "containerd"),
            ("crio-", "cri-o"),
            ("libpod-", "podman"),
        ] {
            if let Some(id) = scope.strip_prefix(prefix)
                && is_container_id(id)
            {
                return Some((runtime, id.to_owned()));
            }
        }
        return None;
    }
    if !is_container_id(segment) {
        return None;
    }
    let runtime = match parent {
        Some("docker") => "docker",
        Some("libpod_parent") => "podman",
        _ => "kubernetes",
    };
    Some((runtime, segment.to_owned()))
}

/// Kubernetes pod uid and QoS class from the `kubepods…` segments of a path.
fn pod(segments: &[&str]) -> (Option<String>, Option<&'static str>) {
    if !segments.iter().any(|s| s.starts_with("kubepods")) {
        return (None, None);
    }
    let qos = if segments.iter().any(|s| s.contains("burstable")) {
        "burstable"
    } else if segments.iter().any(|s| s.contains("besteffort")) {
        "besteffort"
    } else {
        "guaranteed"
    };
    let uid = segments.iter().find_map(|s| {
        let s = s.strip_suffix(".slice").unwrap_or(s);
        // cgroupfs: pod<uid>; systemd: kubepods-burstable-pod<uid with _>.slice.
        let pod = s
            .strip_prefix("pod")
            .or_else(|| s.rsplit_once("-pod").map(|(_, uid)| uid))?;
        Some(pod.replace('_', "-"))
    });
    (uid, Some(qos))
}

/// The container a cgroup path belongs to, if any.
pub fn from_cgroup_path(path: &str) -> Option<Container> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let (index, (runtime, id)) = segments.iter().enumerate().rev().find_map(|(i, s)| {
        let parent = i.checked_sub(1).map(|p| segments[p]);
        segment_container(s, parent).map(|found| (i, found))
    })?;
    let (pod_uid, qos_class) = pod(&segments[..index]);
    Some(Container {
        id,
        name: None,
        runtime,
        cgroup: path.to_owned(),
        pod_uid,
        qos_class,
    })
}

/// The cgroup path that says most about a process, from `/proc/PID/cgroup`: the v2 line (`0::…`) when it is
/// more than the root, else the v1 memory controller's (hybrid hosts), else systemd's named hierarchy.
pub fn cgroup_path(reader: impl BufRead) -> io::Result<Option<String>> {
    let mut v2 = None;
    let mut memory = None;
    let mut systemd = None;
    for line in reader.lines() {
        let line = line?;
        let mut fields = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        match controllers {
            // A process still in a cgroup that was removed (its container ended) reads `PATH (deleted)`.
            "" => v2 = Some(path.trim_end_matches(" (deleted)").to_owned()),
            "name=systemd" => systemd = Some(path.to_owned()),
            c if c.split(',').any(|c| c == "memory") => memory = Some(path.to_owned()),
            _ => {}
        }
    }
    Ok(v2.filter(|p| p != "/").or(memory).or(systemd))
}

/// Processes chosen by container (`--container NAME|ID`) or by cgroup (`--cgroup PATH`).
#[derive(Clone, Debug, Default)]
pub struct Selector {
    pub containers: Vec<String>,
    pub cgroups: Vec<String>,
}

impl Selector {
    pub fn is_empty(&self) -> bool {
        self.containers.is_empty() && self.cgroups.is_empty()
    }

    /// Whether a process in `container` (named, if its runtime could say) and cgroup `path` is chosen: a
    /// container by its name or an id prefix of 12 hex digits or more; a cgroup by its path or an ancestor's.
    pub fn matches(&self, container: Option<&Container>, path: Option<&str>) -> bool {
        let by_container = container.is_some_and(|c| {
            self.containers.iter().any(|wanted| {
                let wanted = wanted.trim_start_matches('/');
                c.name.as_deref() == Some(wanted)
                    || (wanted.len() >= 12 && c.id.starts_with(wanted))
            })
        });
        let by_cgroup = path.is_some_and(|path| {
            self.cgroups.iter().any(|wanted| {
                let wanted = wanted.trim_end_matches('/');
                path == wanted
                    || path
                        .strip_prefix(wanted)
                        .is_some_and(|rest| rest.starts_with('/'))
            })
        });
        by_container || by_cgroup
    }
}

/// The cgroup path of process `pid` (see [`cgroup_path`]).
pub fn path_of_pid(pid: u32) -> Option<String> {
    let file = File::open(format!("/proc/{pid}/cgroup")).ok()?;
    cgroup_path(BufReader::new(file)).ok()?
}

/// The container of process `pid`, if it runs in one.
pub fn of_pid(pid: u32) -> Option<Container> {
    from_cgroup_path(&path_of_pid(pid)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "2c6a4b5a8f1e0d3c9b7a6f5e4d3c2b1a0f9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c";

    fn parse(path: &str) -> Option<(&'static str, String, Option<String>, Option<&'static str>)> {
        from_cgroup_path(path).map(|c| (c.runtime, c.id, c.pod_uid, c.qos_class))
    }

    #[test]
    fn selectors_match_names_id_prefixes_and_cgroup_subtrees() {
        let mut container = from_cgroup_path(&format!("/docker/{ID}")).unwrap();
        container.name = Some("worker-3".to_owned());
        let path = format!("/docker/{ID}");
        let select = |containers: &[&str], cgroups: &[&str]| Selector {
            containers: containers.iter().map(|s| (*s).to_owned()).collect(),
            cgroups: cgroups.iter().map(|s| (*s).to_owned()).collect(),
        };
        assert!(select(&["worker-3"], &[]).matches(Some(&container), Some(&path)));
        assert!(select(&["/worker-3"], &[]).matches(Some(&container), Some(&path)));
        assert!(select(&[&ID[..12]], &[]).matches(Some(&container), Some(&path)));
        assert!(
            !select(&[&ID[..6]], &[]).matches(Some(&container), Some(&path)),
            "too short an id prefix"
        );
        assert!(!select(&["worker-4"], &[]).matches(Some(&container), Some(&path)));
        assert!(select(&[], &["/docker"]).matches(None, Some(&path)));
        assert!(select(&[], &["/docker/"]).matches(None, Some(&path)));
        assert!(
            !select(&[], &["/dock"]).matches(None, Some(&path)),
            "a prefix of a name is no ancestor"
        );
        assert!(!select(&["worker-3"], &[]).matches(None, None));
    }

    #[test]
    fn docker_with_either_driver() {
        assert_eq!(
            parse(&format!("/docker/{ID}")),
            Some(("docker", ID.to_owned(), None, None))
        );
        assert_eq!(
            parse(&format!("/system.slice/docker-{ID}.scope")),
            Some(("docker", ID.to_owned(), None, None))
        );
    }

    #[test]
    fn kubernetes_pods_with_each_runtime_and_qos_class() {
        let uid = "0d6c3e5a-1b2c-4d3e-8f9a-0b1c2d3e4f5a";
        let systemd_uid = uid.replace('-', "_");
        assert_eq!(
            parse(&format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{systemd_uid}.slice/cri-containerd-{ID}.scope"
            )),
            Some((
                "containerd",
                ID.to_owned(),
                Some(uid.to_owned()),
                Some("burstable")
            ))
        );
        assert_eq!(
            parse(&format!(
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{systemd_uid}.slice/crio-{ID}.scope"
            )),
            Some((
                "cri-o",
                ID.to_owned(),
                Some(uid.to_owned()),
                Some("besteffort")
            ))
        );
        assert_eq!(
            parse(&format!("/kubepods/pod{uid}/{ID}")),
            Some((
                "kubernetes",
                ID.to_owned(),
                Some(uid.to_owned()),
                Some("guaranteed")
            ))
        );
        assert_eq!(
            parse(&format!("/kubepods/burstable/pod{uid}/{ID}")),
            Some((
                "kubernetes",
                ID.to_owned(),
                Some(uid.to_owned()),
                Some("burstable")
            ))
        );
    }

    #[test]
    fn podman_and_paths_that_are_no_container() {
        assert_eq!(
            parse(&format!(
                "/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope"
            )),
            Some(("podman", ID.to_owned(), None, None))
        );
        assert_eq!(parse("/user.slice/user-1000.slice/session-3.scope"), None);
        assert_eq!(parse("/system.slice/ssh.service"), None);
        assert_eq!(parse("/"), None);
        assert_eq!(parse("/docker/not-an-id"), None);
    }

    #[test]
    fn hybrid_hosts_use_the_memory_controller_when_v2_is_the_root() {
        let hybrid = format!(
            "12:pids:/docker/{ID}\n5:memory:/docker/{ID}\n1:name=systemd:/docker/{ID}\n0::/\n"
        );
        assert_eq!(
            cgroup_path(hybrid.as_bytes()).unwrap(),
            Some(format!("/docker/{ID}"))
        );
        let deleted = format!("0::/docker/{ID} (deleted)\n");
        assert_eq!(
            cgroup_path(deleted.as_bytes()).unwrap(),
            Some(format!("/docker/{ID}"))
        );
        let pure_v2 = format!("0::/system.slice/docker-{ID}.scope\n");
        assert_eq!(
            cgroup_path(pure_v2.as_bytes()).unwrap(),
            Some(format!("/system.slice/docker-{ID}.scope"))
        );
        let this_machine = include_str!("../../test_data/cgroup_hybrid");
        assert_eq!(
            cgroup_path(this_machine.as_bytes())
                .unwrap()
                .and_then(|p| from_cgroup_path(&p))
                .map(|c| c.runtime),
            Some("docker")
        );
    }
}
