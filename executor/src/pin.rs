//! A CPU adapter's driver threads, one per core.
//!
//! lavapipe runs each dispatch on a pool of worker threads (one per core) that its queue
//! thread wakes and then waits for. Left to the scheduler, a wake-up often puts two workers on
//! one core while the other core idles, and the pair is only pulled apart later: on a 2-core
//! VM an empty dispatch took ~25 µs, and ~16 µs with each worker kept on a core of its own; a
//! SmolLM2 decode step is 153 dispatches (medians of 8 alternating runs: 48.4 → 52.4 tokens/s).
//!
//! The executor creates its adapter and devices on a short-lived thread of its own with a
//! name nothing else uses ([`INIT_THREAD`]). Threads inherit their creator's name, and the
//! driver names only some of its threads (lavapipe's rasterizer threads, its disk-cache
//! thread), so the ones still bearing that name afterwards are the driver's unnamed ones: its
//! queue thread and its compute workers. On a CPU adapter the executor then pins them, in the
//! order they were created, to the cores this process may use, one after another
//! ([`spread`]): each worker gets a core of its own, and the queue thread shares one with a
//! worker (it sleeps while they run). Only Linux; elsewhere nothing is pinned.

use super::ExecError;

/// The name of the thread that opens adapters and devices (at most 15 bytes, Linux's limit).
pub(crate) const INIT_THREAD: &str = "hashgrid-driver";

/// Runs `f` on a fresh thread named [`INIT_THREAD`] and waits for it, so the threads a driver
/// starts inside `f` bear that name.
pub(crate) fn on_init_thread<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ExecError> {
    let failed = |reason: String| ExecError::Device {
        adapter: String::new(),
        reason,
    };
    std::thread::Builder::new()
        .name(INIT_THREAD.into())
        .spawn(f)
        .map_err(|e| failed(format!("could not start a thread to open the adapter: {e}")))?
        .join()
        .map_err(|_| failed("the thread that opened the adapter panicked".into()))
}

/// The core for each of `n` threads, in order, over `cpus` (the allowed cores, ascending):
/// one after another, round and round.
pub(crate) fn assignment(n: usize, cpus: &[usize]) -> Vec<usize> {
    if cpus.is_empty() {
        return Vec::new();
    }
    (0..n).map(|i| cpus[i % cpus.len()]).collect()
}

/// Pins the threads of this process named [`INIT_THREAD`] (the driver's, once
/// [`on_init_thread`] has returned), in creation order, one per allowed core round and round.
/// Returns how many were pinned; 0 where the platform has no thread affinity or the process
/// may use a single core.
pub(crate) fn spread() -> usize {
    imp::spread()
}

#[cfg(target_os = "linux")]
mod imp {
    use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
    use nix::unistd::Pid;

    /// The thread ids of this process whose name is `name`, ascending (creation order: Linux
    /// hands out ids in increasing order until they wrap, which changes only who shares).
    pub(crate) fn threads_named(name: &str) -> Vec<i32> {
        let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
            return Vec::new();
        };
        let mut tids: Vec<i32> = dir
            .flatten()
            .filter_map(|e| {
                let tid: i32 = e.file_name().to_str()?.parse().ok()?;
                let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
                (comm.trim_end_matches('\n') == name).then_some(tid)
            })
            .collect();
        tids.sort_unstable();
        tids
    }

    /// The cores this process may run on, ascending.
    pub(crate) fn allowed_cpus() -> Vec<usize> {
        let Ok(set) = sched_getaffinity(Pid::from_raw(0)) else {
            return Vec::new();
        };
        (0..CpuSet::count())
            .filter(|&c| set.is_set(c).unwrap_or(false))
            .collect()
    }

    pub(super) fn spread() -> usize {
        let cpus = allowed_cpus();
        if cpus.len() < 2 {
            return 0;
        }
        let tids = threads_named(super::INIT_THREAD);
        let mut pinned = 0;
        for (tid, cpu) in tids.iter().zip(super::assignment(tids.len(), &cpus)) {
            let mut one = CpuSet::new();
            // A thread that has exited meanwhile is simply skipped.
            if one.set(cpu).is_ok() && sched_setaffinity(Pid::from_raw(*tid), &one).is_ok() {
                pinned += 1;
            }
        }
        pinned
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    pub(super) fn spread() -> usize {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_go_to_the_allowed_cores_one_after_another() {
        assert_eq!(assignment(3, &[0, 1]), vec![0, 1, 0]);
        assert_eq!(assignment(5, &[2, 5, 7]), vec![2, 5, 7, 2, 5]);
        assert_eq!(assignment(2, &[4]), vec![4, 4]);
        assert!(assignment(3, &[]).is_empty());
        assert!(assignment(0, &[0, 1]).is_empty());
    }

    /// Each thread of this process named [`INIT_THREAD`], with the cores it may run on.
    #[cfg(target_os = "linux")]
    fn driver_affinities() -> Vec<(i32, String)> {
        imp::threads_named(INIT_THREAD)
            .into_iter()
            .filter_map(|tid| {
                let status =
                    std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).ok()?;
                let list = status
                    .lines()
                    .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))?;
                Some((tid, list.trim().to_string()))
            })
            .collect()
    }

    /// One test, not several: pinning acts on every thread of the process with the name.
    #[cfg(target_os = "linux")]
    #[test]
    fn driver_threads_get_a_core_each_and_only_when_asked() {
        stand_ins_started_on_the_init_thread_bear_its_name_and_get_pinned();
        a_cpu_adapters_driver_threads_are_pinned_only_when_the_config_says_so();
    }

    #[cfg(target_os = "linux")]
    fn a_cpu_adapters_driver_threads_are_pinned_only_when_the_config_says_so() {
        use crate::{ExecConfig, Executor};
        use hashgrid_protocol::DeviceType;
        let cpus = imp::allowed_cpus();
        let start = |pin: bool| {
            Executor::start(ExecConfig {
                cpu_pin_threads: pin,
                ..ExecConfig::default()
            })
        };
        let Ok(exec) = start(false) else {
            return; // no adapter on this machine: nothing to pin
        };
        if exec.profile().device_type != DeviceType::Cpu || cpus.len() < 2 {
            return;
        }
        let unpinned = driver_affinities();
        assert!(!unpinned.is_empty(), "lavapipe starts threads of its own");
        for (tid, list) in &unpinned {
            assert!(
                list.parse::<usize>().is_err(),
                "thread {tid} was pinned to {list} with pinning off"
            );
        }
        drop(exec);
        let _exec = start(true).unwrap();
        let pinned = driver_affinities();
        let cores: std::collections::BTreeSet<usize> = pinned
            .iter()
            .map(|(tid, list)| {
                list.parse::<usize>()
                    .unwrap_or_else(|_| panic!("thread {tid} may run on {list}, not one core"))
            })
            .collect();
        // The queue thread and one compute worker per core: every core gets one.
        if pinned.len() >= cpus.len() {
            assert_eq!(cores.into_iter().collect::<Vec<_>>(), cpus);
        }
    }

    #[cfg(target_os = "linux")]
    fn stand_ins_started_on_the_init_thread_bear_its_name_and_get_pinned() {
        // Stand-ins for a driver's threads: started from inside `on_init_thread`, they
        // inherit its name; they wait until the pinning has been checked.
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let rx = std::sync::Arc::new(std::sync::Mutex::new(rx));
        let handles = on_init_thread(move || {
            (0..3)
                .map(|_| {
                    let rx = rx.clone();
                    std::thread::spawn(move || {
                        let _ = rx.lock().map(|r| r.recv());
                    })
                })
                .collect::<Vec<_>>()
        })
        .unwrap();
        let tids = imp::threads_named(INIT_THREAD);
        // Other tests in this binary may be opening adapters too: at least our three.
        assert!(tids.len() >= 3, "{tids:?}");
        let cpus = imp::allowed_cpus();
        let pinned = spread();
        if cpus.len() < 2 {
            assert_eq!(pinned, 0);
        } else {
            assert!(pinned >= 3, "pinned {pinned} of {tids:?}");
            for (tid, list) in driver_affinities() {
                assert!(
                    list.parse::<usize>().is_ok(),
                    "thread {tid} may run on {list}, not one core"
                );
            }
        }
        for _ in 0..handles.len() {
            tx.send(()).unwrap();
        }
        for h in handles {
            h.join().unwrap();
        }
    }
}
