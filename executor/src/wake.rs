//! Cores that wake fast while a job runs on a CPU adapter.
//!
//! lavapipe runs every dispatch on its own thread pool and hands each one between threads:
//! its queue thread wakes the workers, the last worker to finish wakes the queue thread. A
//! core with nothing to run in between halts, and in a virtual machine a halted virtual CPU
//! takes tens of microseconds to wake (the host must schedule it again). A decode step is
//! ~150 dispatches, so on a 2-core VM a quarter of the time was cores waking up (`perf sched`:
//! ~57 µs from a worker's wake-up to its running). Linux lets a process ask for a wake-up
//! latency bound (PM QoS, `/dev/cpu_dma_latency`): while the request is held, idle cores poll
//! instead of halting. The executor holds one for as long as a job runs on a CPU adapter
//! ([`crate::ExecConfig::cpu_low_wake_latency`]); it needs write access to the device (root,
//! by default), and without it the job runs as before. The request ends when the job ends, so
//! an idle node lets its cores sleep.

use std::fs::File;

/// The PM QoS device.
const DEVICE: &str = "/dev/cpu_dma_latency";

/// A held wake-up latency request; dropping it withdraws the request.
pub(crate) struct LowWakeLatency {
    _file: File,
}

impl LowWakeLatency {
    /// Asks for a 0 µs wake-up latency (idle cores poll); `None` where the device is missing or
    /// not writable (not root, not Linux, a container without it).
    pub(crate) fn request() -> Option<Self> {
        request_file().map(|f| LowWakeLatency { _file: f })
    }
}

#[cfg(target_os = "linux")]
fn request_file() -> Option<File> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().write(true).open(DEVICE).ok()?;
    // The request is the latency in µs as a native-endian 32-bit integer; the kernel keeps
    // it for as long as this file stays open.
    f.write_all(&0i32.to_ne_bytes()).ok()?;
    Some(f)
}

#[cfg(not(target_os = "linux"))]
fn request_file() -> Option<File> {
    None
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::io::Read;

    /// The latency bound in force now (the minimum over every process's requests).
    fn current() -> Option<i32> {
        let mut b = [0u8; 4];
        File::open(DEVICE).ok()?.read_exact(&mut b).ok()?;
        Some(i32::from_ne_bytes(b))
    }

    #[test]
    fn a_held_request_bounds_the_wake_up_latency_and_ends_with_it() {
        let before = current();
        let Some(guard) = LowWakeLatency::request() else {
            // Not permitted here (not root): the executor runs without it, and so does this.
            assert!(
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(DEVICE)
                    .is_err(),
                "{DEVICE} is writable, yet the request failed"
            );
            return;
        };
        assert_eq!(current(), Some(0), "the request is in force while held");
        drop(guard);
        // Ours no longer counts: the bound is what it was (unless another process changed
        // its own request meanwhile, which a test machine does not do).
        assert_eq!(current(), before, "the request ends when dropped");
    }
}
