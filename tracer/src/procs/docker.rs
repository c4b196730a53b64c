//! Container names from the Docker Engine API, over its unix socket. Asked through the container list
//! (`GET /containers/json?all=1&filters={"id":[ID]}`), which the daemon answers from its in-memory view: an
//! inspect (`GET /containers/ID/json`) waits for the container's lock, which the daemon holds for the whole of
//! `docker start` — exactly when the container's first process execs and alloctrace asks. Names found are
//! cached; a failure is not, so a container whose name could not be learned at one exec is asked about again at
//! the next, and a daemon that does not answer in time is left alone for [`BACK_OFF`] rather than stalling every
//! exec. Each container's first failure is said once, and so is a name learned after failures. The agent sees
//! containers come and go for days: the answers kept are bounded ([`MAX_CONTAINERS`]), the oldest going first.
//!
//! Still a blocking HTTP/1.0 exchange, not bollard or hyper: the name decides whether a held exec is traced
//! (`--container NAME`), and the caller decides before it returns; moving the ask off the event loop needs that
//! decision deferred first.

use std::{
    collections::{HashMap, VecDeque},
    io::{self, Read as _, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

/// Where the Docker Engine listens by default.
const SOCKET: &str = "/var/run/docker.sock";
/// A local API answers in milliseconds; a hung daemon must not stall the trace.
const TIMEOUT: Duration = Duration::from_secs(1);
/// How long a daemon that did not answer within [`TIMEOUT`] is left alone, for each container.
const BACK_OFF: Duration = Duration::from_secs(2);

/// The most containers whose name (or failure) is kept: far more than a host runs at once.
const MAX_CONTAINERS: usize = 4096;

/// A container whose name could not be learned yet.
struct Unnamed {
    failures: u32,
    /// Not asked again before then (a daemon that timed out).
    retry_at: Option<Instant>,
}

pub struct DockerNames {
    socket: PathBuf,
    names: HashMap<String, String>,
    unnamed: HashMap<String, Unnamed>,
    /// The ids of `names` and `unnamed`, the oldest first: the first forgotten past [`MAX_CONTAINERS`].
    order: VecDeque<String>,
    max_containers: usize,
}

impl Default for DockerNames {
    fn default() -> Self {
        Self::with_socket(PathBuf::from(SOCKET))
    }
}

impl DockerNames {
    fn with_socket(socket: PathBuf) -> Self {
        Self {
            socket,
            names: HashMap::new(),
            unnamed: HashMap::new(),
            order: VecDeque::new(),
            max_containers: MAX_CONTAINERS,
        }
    }

    /// Keeps `id` among the containers known; past the bound, forgets the one known longest.
    fn remember(&mut self, id: &str) {
        if self.names.contains_key(id) || self.unnamed.contains_key(id) {
            return;
        }
        self.order.push_back(id.to_owned());
        while self.order.len() > self.max_containers {
            if let Some(oldest) = self.order.pop_front() {
                self.names.remove(&oldest);
                self.unnamed.remove(&oldest);
            }
        }
    }

    /// The name of container `id`, without Docker's leading `/`; `None` when Docker does not list it or does
    /// not answer (asked again next time, see the module's comment).
    pub fn name(&mut self, id: &str) -> Option<String> {
        if let Some(name) = self.names.get(id) {
            return Some(name.clone());
        }
        let now = Instant::now();
        if let Some(unnamed) = self.unnamed.get(id)
            && unnamed.retry_at.is_some_and(|at| now < at)
        {
            return None;
        }
        let short = &id[..id.len().min(12)];
        let (reason, retry_at) = match list_name(&self.socket, id) {
            Ok(Some(name)) => {
                self.remember(id);
                if let Some(unnamed) = self.unnamed.remove(id) {
                    log::info!(
                        "Docker container {short} is {name} (learned after {} failed attempts)",
                        unnamed.failures
                    );
                }
                self.names.insert(id.to_owned(), name.clone());
                return Some(name);
            }
            Ok(None) => ("Docker does not list it".to_owned(), None),
            Err(err)
                if matches!(
                    err.kind(),
                    io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
                ) =>
            {
                (
                    format!("Docker did not answer within {TIMEOUT:?}"),
                    Some(now + BACK_OFF),
                )
            }
            Err(err) => (
                format!("cannot ask Docker at {}: {err}", self.socket.display()),
                None,
            ),
        };
        self.remember(id);
        let unnamed = self.unnamed.entry(id.to_owned()).or_insert_with(|| {
            log::warn!(
                "no name yet for Docker container {short} ({reason}): asked again at its next process"
            );
            Unnamed {
                failures: 0,
                retry_at: None,
            }
        });
        unnamed.failures += 1;
        unnamed.retry_at = retry_at;
        None
    }
}

/// The name the daemon lists container `id` under: `Ok(None)` when it answered without it.
fn list_name(socket: &Path, id: &str) -> io::Result<Option<String>> {
    let deadline = Instant::now() + TIMEOUT;
    let mut stream = UnixStream::connect(socket)?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    // The id is 64 hex digits (see `container`), so it needs no escaping; the filter is `{"id":["ID"]}`.
    // HTTP/1.0: the daemon closes the connection after its answer, which ends the read.
    let request = format!(
        "GET /containers/json?all=1&filters=%7B%22id%22%3A%5B%22{id}%22%5D%7D HTTP/1.0\r\nHost: docker\r\n\r\n"
    );
    stream.write_all(request.as_bytes())?;
    let mut response = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        // One deadline for the whole answer, not one per read: a trickling daemon is as bad as a silent one.
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => response.extend_from_slice(&chunk[..n]),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    name_from_list_response(&response, id)
}

/// The name of container `id` in a container-list response: its first name that is no link alias
/// (`/other/alias`), without the leading `/`. An error status or a body that is not a list is an error.
fn name_from_list_response(response: &[u8], id: &str) -> io::Result<Option<String>> {
    let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| invalid("no HTTP header"))?;
    let (head, body) = (&response[..split], &response[split + 4..]);
    let status_line = String::from_utf8_lossy(head.split(|&b| b == b'\n').next().unwrap_or(head))
        .trim_end()
        .to_owned();
    if status_line.split_whitespace().nth(1) != Some("200") {
        return Err(invalid(&format!("answered {status_line}")));
    }
    let list: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| invalid(&format!("answered no JSON: {e}")))?;
    let containers = list
        .as_array()
        .ok_or_else(|| invalid("answered no container list"))?;
    Ok(containers
        .iter()
        .filter(|c| c["Id"] == id)
        .filter_map(|c| c["Names"].as_array())
        .flatten()
        .filter_map(|name| name.as_str()?.strip_prefix('/'))
        .find(|name| !name.contains('/'))
        .map(str::to_owned))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "2c6a4b5a8f1e0d3c9b7a6f5e4d3c2b1a0f9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c";

    fn answer(status: &str, body: &str) -> Vec<u8> {
        format!("HTTP/1.0 {status}\r\nContent-Type: application/json\r\n\r\n{body}").into_bytes()
    }

    #[test]
    fn reads_the_name_of_a_list_answer() {
        let listed = answer(
            "200 OK",
            &format!(r#"[{{"Id":"{ID}","Names":["/app/db","/worker-3"],"State":"created"}}]"#),
        );
        assert_eq!(
            name_from_list_response(&listed, ID).unwrap(),
            Some("worker-3".to_owned())
        );
        let empty = answer("200 OK", "[]");
        assert_eq!(name_from_list_response(&empty, ID).unwrap(), None);
        let other = answer("200 OK", r#"[{"Id":"abc","Names":["/other"]}]"#);
        assert_eq!(name_from_list_response(&other, ID).unwrap(), None);
        let refused = answer("500 Internal Server Error", r#"{"message":"boom"}"#);
        assert!(name_from_list_response(&refused, ID).is_err());
        assert!(name_from_list_response(b"garbage", ID).is_err());
    }

    #[test]
    fn failures_are_not_cached() {
        let mut names = DockerNames::with_socket(PathBuf::from("/nonexistent/docker.sock"));
        assert_eq!(names.name(ID), None);
        assert_eq!(names.name(ID), None);
        assert_eq!(names.unnamed[ID].failures, 2, "asked again");
        assert!(names.names.is_empty());
    }

    #[test]
    fn the_containers_known_are_bounded_the_oldest_forgotten_first() {
        let mut names = DockerNames::with_socket(PathBuf::from("/nonexistent/docker.sock"));
        names.max_containers = 2;
        let id = |n: u8| format!("{n:064x}");
        names.names.insert(id(1), "one".to_owned());
        names.order.push_back(id(1));
        assert_eq!(names.name(&id(2)), None);
        assert_eq!(names.name(&id(3)), None);
        assert_eq!(names.order, [id(2), id(3)]);
        assert!(names.names.is_empty(), "the oldest went");
        assert_eq!(names.unnamed.len(), 2);
        // Asked again, a container already known is not counted twice.
        assert_eq!(names.name(&id(3)), None);
        assert_eq!(names.order.len(), 2);
    }

    /// A socket in a fresh directory of its own, for a daemon played by the test.
    fn socket(test: &str) -> (PathBuf, PathBuf) {
        let dir = std::env::temp_dir().join(format!("alloctrace-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        (dir.join("docker.sock"), dir)
    }

    /// A daemon that accepts the connection and never answers: one bounded wait, then left alone for a while.
    #[test]
    fn a_silent_daemon_is_waited_for_once_then_left_alone() {
        let (socket, dir) = socket("silent");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let mut names = DockerNames::with_socket(socket);
        assert_eq!(names.name(ID), None);
        assert_eq!(names.name(ID), None);
        assert_eq!(
            names.unnamed[ID].failures, 1,
            "asked again within the back-off"
        );
        assert!(names.unnamed[ID].retry_at.is_some());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A container the daemon does not list yet is asked about again, and its name kept once learned.
    #[test]
    fn a_name_is_learned_at_a_later_ask_and_then_cached() {
        let (socket, dir) = socket("later");
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let daemon = std::thread::spawn(move || {
            let listed = format!(r#"[{{"Id":"{ID}","Names":["/worker-3"]}}]"#);
            for body in ["[]", listed.as_str()] {
                let (mut stream, _) = listener.accept().unwrap();
                let mut request = Vec::new();
                let mut byte = [0u8];
                while !request.ends_with(b"\r\n\r\n") {
                    stream.read_exact(&mut byte).unwrap();
                    request.push(byte[0]);
                }
                stream.write_all(&answer("200 OK", body)).unwrap();
            }
        });
        let mut names = DockerNames::with_socket(socket);
        assert_eq!(names.name(ID), None);
        assert_eq!(names.name(ID), Some("worker-3".to_owned()));
        daemon.join().unwrap();
        assert_eq!(
            names.name(ID),
            Some("worker-3".to_owned()),
            "answered from the cache: the daemon is gone"
        );
        assert!(names.unnamed.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
