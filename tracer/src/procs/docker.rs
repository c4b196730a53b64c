//! Container names from the Docker Engine API, over its unix socket (`GET /containers/<id>/json`). Asked
//! lazily, once per container; answers and failures are both cached, so a host without Docker costs one failed
//! connection per container, not one per event.

use std::{
    collections::HashMap,
    io::{self, Read as _, Write as _},
    os::unix::net::UnixStream,
    path::PathBuf,
    time::Duration,
};

/// Where the Docker Engine listens by default.
const SOCKET: &str = "/var/run/docker.sock";
/// A local API answers in milliseconds; a hung daemon must not stall the trace.
const TIMEOUT: Duration = Duration::from_secs(1);

pub struct DockerNames {
    socket: PathBuf,
    cache: HashMap<String, Option<String>>,
}

impl Default for DockerNames {
    fn default() -> Self {
        Self {
            socket: PathBuf::from(SOCKET),
            cache: HashMap::new(),
        }
    }
}

impl DockerNames {
    /// The name of container `id`, without Docker's leading `/`; `None` when Docker does not know it or does
    /// not answer.
    pub fn name(&mut self, id: &str) -> Option<String> {
        if let Some(cached) = self.cache.get(id) {
            return cached.clone();
        }
        let name = inspect(&self.socket, id).ok().flatten();
        self.cache.insert(id.to_owned(), name.clone());
        name
    }
}

fn inspect(socket: &PathBuf, id: &str) -> io::Result<Option<String>> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    // HTTP/1.0: the daemon closes the connection after its answer, which ends the read.
    write!(
        stream,
        "GET /containers/{id}/json HTTP/1.0\r\nHost: docker\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    Ok(name_from_response(&response))
}

/// The `Name` of a container-inspect response, if the status is 200.
fn name_from_response(response: &[u8]) -> Option<String> {
    let split = response.windows(4).position(|w| w == b"\r\n\r\n")?;
    let (head, body) = (&response[..split], &response[split + 4..]);
    let status_line = String::from_utf8_lossy(head.split(|&b| b == b'\n').next()?).into_owned();
    if status_line.split_whitespace().nth(1) != Some("200") {
        return None;
    }
    let json: serde_json::Value = serde_json::from_slice(body).ok()?;
    Some(json["Name"].as_str()?.trim_start_matches('/').to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_name_of_an_inspect_answer() {
        let ok = b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{\"Id\":\"abc\",\"Name\":\"/worker-3\"}";
        assert_eq!(name_from_response(ok), Some("worker-3".to_owned()));
        let missing = b"HTTP/1.0 404 Not Found\r\n\r\n{\"message\":\"No such container\"}";
        assert_eq!(name_from_response(missing), None);
        assert_eq!(name_from_response(b"garbage"), None);
    }

    #[test]
    fn failures_are_cached_too() {
        let mut names = DockerNames {
            socket: PathBuf::from("/nonexistent/docker.sock"),
            cache: HashMap::new(),
        };
        assert_eq!(names.name("abc"), None);
        assert_eq!(names.cache.get("abc"), Some(&None));
    }
}
