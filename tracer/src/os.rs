//! Thin, safe wrappers over OS facilities: signals. SIGINT (Ctrl-C), SIGTERM (`timeout`, systemd,
//! `kubectl delete`) and SIGHUP (a closed terminal) all mean "stop and report", never "die without a report".

use std::{io, sync::Mutex};

use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
};

/// Whether a stop signal has arrived, from the task that listens for them. Its sender lives as long as the
/// runtime that runs that task.
static STOP: Mutex<Option<watch::Receiver<bool>>> = Mutex::new(None);

/// Takes over SIGINT, SIGTERM and SIGHUP from now on: from here none of them ends the process, and the first
/// one makes [`stop_requested`] resolve, even if it arrives before anything waits for it (while probes are
/// being attached, say). Call it at startup, inside the runtime that runs the trace; calling it again does
/// nothing.
pub fn catch_stop_signals() -> io::Result<()> {
    let mut stop = STOP.lock().unwrap_or_else(|e| e.into_inner());
    // A listener whose runtime has gone can no longer hear anything: replace it.
    if stop.as_ref().is_some_and(|rx| rx.has_changed().is_ok()) {
        return Ok(());
    }
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut hangup = signal(SignalKind::hangup())?;
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
            _ = hangup.recv() => {}
        }
        let _ = tx.send(true);
        // Kept open, so that a closed channel means a runtime that has gone, never a stop.
        tx.closed().await;
    });
    *stop = Some(rx);
    Ok(())
}

/// Resolves once SIGINT, SIGTERM or SIGHUP has arrived since [`catch_stop_signals`] (which it calls, for a
/// caller that did not), at once if one already has.
pub async fn stop_requested() -> io::Result<()> {
    loop {
        catch_stop_signals()?;
        let mut stop = STOP
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .expect("set by catch_stop_signals");
        if stop.wait_for(|&stopped| stopped).await.is_ok() {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sends `signal` to this process.
    fn raise(signal: libc::c_int) {
        // SAFETY: kill has no memory preconditions; the handler tokio installed turns it into a wake-up.
        assert_eq!(unsafe { libc::kill(libc::getpid(), signal) }, 0);
    }

    /// One test, because the signals and their listener belong to the whole process.
    #[tokio::test]
    async fn sigterm_and_sighup_stop_like_ctrl_c_even_when_sent_before_anything_waits() {
        catch_stop_signals().unwrap();
        // Before anyone waits: remembered, not fatal.
        raise(libc::SIGTERM);
        stop_requested().await.unwrap();
        // A stop stays requested.
        stop_requested().await.unwrap();
        raise(libc::SIGHUP);
        raise(libc::SIGINT);
        stop_requested().await.unwrap();
    }
}
