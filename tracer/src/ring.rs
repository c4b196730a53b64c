//! Reads the ring buffer on a thread of its own: records leave the kernel's buffer as soon as they come,
//! whatever the event loop is doing (naming a stack, reading a process's maps, asking Docker), and wait in a
//! bounded queue. Only a queue that stays full makes the kernel's buffer fill, and the kernel counts what it
//! then drops.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc as std_mpsc,
    },
    thread::JoinHandle,
};

use aya::maps::{MapData, RingBuf};
use tokio::sync::mpsc;

/// How long the reader sleeps when the probes do not wake it: they only do so for records that must be acted
/// on at once, or when a lot is waiting.
const POLL_INTERVAL_MS: i64 = 20;

/// Bytes of records handed over at once, and batches the queue holds: at most 64 MiB wait in userspace.
const BATCH_BYTES: usize = 1 << 20;
const QUEUE_BATCHES: usize = 64;

/// What the reader hands over.
pub enum Delivery {
    /// Records, in the order the probes wrote them.
    Records(Vec<Vec<u8>>),
    /// Every record written before [`RingReader::request_flush`] was called has been delivered.
    Flushed,
}

pub struct RingReader {
    deliveries: mpsc::Receiver<Delivery>,
    flush_requests: std_mpsc::Sender<()>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl RingReader {
    /// Starts reading. `first_look` sees each record on the reader thread, as soon as it is read: for what
    /// must be done before the event loop gets to it (an OOM victim's cgroup is removed within milliseconds).
    pub fn start(
        ring: RingBuf<MapData>,
        first_look: impl FnMut(&[u8]) + Send + 'static,
    ) -> std::io::Result<Self> {
        let (deliver, deliveries) = mpsc::channel(QUEUE_BATCHES);
        let (flush_requests, requests) = std_mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("ring-reader".into())
            .spawn(move || read(ring, first_look, &deliver, &requests, &stopped))?;
        Ok(Self {
            deliveries,
            flush_requests,
            stop,
            thread: Some(thread),
        })
    }

    /// The next delivery; `None` once the reader has stopped.
    pub async fn next(&mut self) -> Option<Delivery> {
        self.deliveries.recv().await
    }

    /// Asks for everything the probes have written so far, followed by [`Delivery::Flushed`].
    pub fn request_flush(&self) {
        let _ = self.flush_requests.send(());
    }
}

impl Drop for RingReader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // A reader blocked on a full queue is released by closing it.
        self.deliveries.close();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn read(
    mut ring: RingBuf<MapData>,
    mut first_look: impl FnMut(&[u8]),
    deliver: &mpsc::Sender<Delivery>,
    requests: &std_mpsc::Receiver<()>,
    stop: &AtomicBool,
) {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let interval = Timespec {
        tv_sec: 0,
        tv_nsec: POLL_INTERVAL_MS * 1_000_000,
    };
    while !stop.load(Ordering::Relaxed) {
        // An error (EINTR) only means the ring is read sooner.
        let _ = poll(&mut [PollFd::new(&ring, PollFlags::IN)], Some(&interval));
        // Requests seen before the ring is read: what they ask for is written by then.
        let flushes = requests.try_iter().count();
        let mut batch = Vec::new();
        let mut bytes = 0;
        while let Some(record) = ring.next() {
            first_look(&record);
            bytes += record.len();
            batch.push(record.to_vec());
            if bytes >= BATCH_BYTES {
                if deliver.blocking_send(Delivery::Records(batch)).is_err() {
                    return;
                }
                batch = Vec::new();
                bytes = 0;
            }
        }
        if !batch.is_empty() && deliver.blocking_send(Delivery::Records(batch)).is_err() {
            return;
        }
        for _ in 0..flushes {
            if deliver.blocking_send(Delivery::Flushed).is_err() {
                return;
            }
        }
    }
}
