//! The GPU executor: runs [`JobSpec`]s as wgpu compute passes, safely and measurably.
//!
//! [`Executor::start`] picks an adapter and starts `max_concurrent` worker threads, each with
//! its own wgpu device on that adapter. [`Executor::run`] checks a job completely before it
//! queues (limits, naga parse/validation, binding reflection, input hashes), then queues it
//! fairly (round-robin across buyers, FIFO within one, at most `queue_depth` waiting) and
//! resolves when a worker has run it and read its outputs back.
//!
//! Timeouts: wgpu cannot abort a dispatch. A job past `max_job_ms` is reported as
//! [`ExecError::Timeout`] and its device is abandoned (destroyed and dropped on a detached
//! thread); the worker opens a fresh device on the same adapter for the next job. On lavapipe
//! the abandoned shader keeps a CPU core busy until it finishes; real GPUs' driver watchdogs
//! kill it. Device errors are handled the same way.

mod adapter;
pub mod bench;
mod device;
mod error;
mod pin;
mod pool;
mod queue;
mod resident;
mod validate;
mod wake;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use hashgrid_protocol::{Benchmark, ContentId, GpuLimits, GpuProfile, JobLimits, JobSpec};
use tokio::sync::oneshot;

pub use adapter::{AdapterChoice, list_adapters};
pub use error::ExecError;

use device::{DeviceConfig, GpuDevice};
use queue::FairQueue;
use validate::CheckedJob;

/// Default most jobs running at once on one adapter. One keeps jobs from competing for the
/// GPU (and their timings honest); sites with large GPUs can raise it.
pub const DEFAULT_MAX_CONCURRENT: usize = 1;

/// Default most jobs waiting. Beyond this, [`Executor::run`] fails fast with
/// [`ExecError::QueueFull`] rather than letting memory (input blobs) pile up.
pub const DEFAULT_QUEUE_DEPTH: usize = 64;

/// Default compiled pipelines kept per device. Pipeline creation costs milliseconds (tens on
/// lavapipe), so repeat jobs reuse them; 64 covers a model's worth of distinct kernels.
pub const DEFAULT_PIPELINE_CACHE: usize = 64;

/// Default bytes of read-only blobs (model weights) kept on each device between jobs: 2 GiB.
/// A second request for a model then uploads nothing; sites with large GPUs raise it, sites
/// sharing a small one lower it (0 keeps nothing).
pub const DEFAULT_RESIDENT_BYTES: u64 = 2 * 1024 * 1024 * 1024;

/// Default bytes of idle buffers kept per device for later jobs of the same shapes: 512 MiB.
/// Reusing a buffer saves its allocation and, on CPU adapters, the page faults of fresh memory
/// (uploads run several times faster into reused buffers); 0 keeps none.
pub const DEFAULT_POOL_BYTES: u64 = 512 * 1024 * 1024;

/// Executor configuration. Every field has a documented default.
#[derive(Debug, Clone)]
pub struct ExecConfig {
    /// Which adapter to use (default: the best one).
    pub adapter: AdapterChoice,
    /// Job limits; a site can only lower them below [`JobLimits::default`]. The executor
    /// also caps each buffer at the adapter's `max_buffer_size` and, when `memory_bytes` is
    /// set, a job's total at it ([`Executor::limits`] says what applies).
    pub limits: JobLimits,
    /// Most jobs running at once ([`DEFAULT_MAX_CONCURRENT`]).
    pub max_concurrent: usize,
    /// Most jobs waiting ([`DEFAULT_QUEUE_DEPTH`]).
    pub queue_depth: usize,
    /// Pipelines cached per device ([`DEFAULT_PIPELINE_CACHE`]).
    pub pipeline_cache: usize,
    /// Memory to advertise, in bytes, and the most one job's buffers may total; wgpu cannot
    /// report VRAM, so without this the profile says the adapter's `max_buffer_size`.
    pub memory_bytes: Option<u64>,
    /// Bytes of read-only blobs kept resident per device ([`DEFAULT_RESIDENT_BYTES`]).
    pub resident_bytes: u64,
    /// Bytes of idle buffers kept per device for reuse ([`DEFAULT_POOL_BYTES`]).
    pub pool_bytes: u64,
    /// While a job runs on a CPU adapter (lavapipe), ask Linux for a 0 µs CPU wake-up latency
    /// (`/dev/cpu_dma_latency`, which needs root): idle cores then poll instead of halting
    /// between the adapter's dispatches, each of which wakes its worker threads. On by
    /// default; without the permission it does nothing. See `wake.rs`.
    pub cpu_low_wake_latency: bool,
    /// On a CPU adapter (lavapipe), pin the driver's threads to the cores, one after another
    /// (its compute workers each on a core of their own): left to the scheduler, a dispatch's
    /// wake-ups often stack two workers on one core. On by default (Linux only). See `pin.rs`.
    pub cpu_pin_threads: bool,
}

impl Default for ExecConfig {
    fn default() -> Self {
        ExecConfig {
            adapter: AdapterChoice::Best,
            limits: JobLimits::default(),
            max_concurrent: DEFAULT_MAX_CONCURRENT,
            queue_depth: DEFAULT_QUEUE_DEPTH,
            pipeline_cache: DEFAULT_PIPELINE_CACHE,
            memory_bytes: None,
            resident_bytes: DEFAULT_RESIDENT_BYTES,
            pool_bytes: DEFAULT_POOL_BYTES,
            cpu_low_wake_latency: true,
            cpu_pin_threads: true,
        }
    }
}

/// Inputs and outputs at least this large are hashed on all cores.
const PARALLEL_HASH_BYTES: usize = 1 << 20;

/// The content id of `bytes`, hashed on all cores when they are large (blake3's tree lets
/// each core hash its own chunks): the executor hashes every input it is given and every
/// output it reads back, and on one core that alone caps transfers at ~4.6 GB/s here.
pub(crate) fn content_id(bytes: &[u8]) -> ContentId {
    if bytes.len() < PARALLEL_HASH_BYTES {
        return ContentId::of(bytes);
    }
    let mut h = blake3::Hasher::new();
    h.update_rayon(bytes);
    ContentId::from(h.finalize())
}

/// Bytes each core copies at a time in [`copy_parallel`].
const COPY_CHUNK: usize = 1 << 20;

/// `dst.copy_from_slice(src)`, on all cores when large. A copy into memory nothing has
/// touched yet (a new readback vector) is bound by page faults, ~2.7 µs each on this VM:
/// spread over the cores they take a fraction of the time.
pub(crate) fn copy_parallel(dst: &mut [u8], src: &[u8]) {
    use rayon::prelude::*;
    if src.len() < PARALLEL_HASH_BYTES {
        dst.copy_from_slice(src);
        return;
    }
    dst.par_chunks_mut(COPY_CHUNK)
        .zip(src.par_chunks(COPY_CHUNK))
        .for_each(|(d, s)| d.copy_from_slice(s));
}

/// Checks a job the way a provider will, without a GPU: structure, the default job limits,
/// WGSL (naga parse and validation), entry points and bindings against the WebGPU default
/// adapter limits (except buffer sizes: how large a buffer may be is each adapter's to say,
/// and model weights exceed WebGPU's 256 MiB default), and (when given) that the inputs hash
/// to their ids. A buyer runs this before any network traffic; a job that passes may still
/// exceed a particular adapter.
pub fn check_offline<V: InputBytes>(
    spec: &JobSpec,
    inputs: Option<&BTreeMap<ContentId, V>>,
) -> Result<(), ExecError> {
    let mut gpu = adapter::gpu_limits(&wgpu::Limits::default());
    gpu.max_buffer_size = hashgrid_protocol::job::DEFAULT_MAX_BUFFER_BYTES;
    validate::check_job(spec, inputs, &JobLimits::default(), &gpu).map(|_| ())
}

/// Time of one pass, from GPU timestamp queries.
#[derive(Debug, Clone, PartialEq)]
pub struct PassTiming {
    /// The pass's entry point.
    pub entry: String,
    /// GPU time in milliseconds.
    pub gpu_ms: f64,
}

/// One output buffer, read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputBuffer {
    /// Buffer name.
    pub name: String,
    /// blake3 of `bytes`.
    pub id: ContentId,
    /// The contents (exactly the buffer's declared size).
    pub bytes: Vec<u8>,
}

/// What a job produced.
#[derive(Debug, Clone, PartialEq)]
pub struct JobOutput {
    /// Output buffers, in buffer order.
    pub outputs: Vec<OutputBuffer>,
    /// Per-pass GPU times; empty when the adapter has no timestamp queries.
    pub passes: Vec<PassTiming>,
    /// Sum of pass times, or the wall time from submit to completion without timestamps.
    pub gpu_ms: f64,
    /// Wall time on the worker: buffers, pipelines, passes, readback and hashing.
    pub wall_ms: f64,
    /// Iterations each loop ran, in loop order.
    pub iterations: Vec<u32>,
    /// Input bytes uploaded for this job.
    pub uploaded_bytes: u64,
    /// Input buffers served from the resident set instead of uploaded.
    pub resident_hits: u32,
    /// Bytes those resident buffers hold.
    pub resident_bytes: u64,
    /// Buffers taken from the pool of earlier jobs' buffers instead of allocated.
    pub reused_buffers: u32,
}

/// One streamed buffer, read back while its loop runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamedBuffer {
    /// Buffer name.
    pub name: String,
    /// Its contents at the check.
    pub bytes: Vec<u8>,
}

/// What a loop's check read back: the streamed buffers after `iterations` iterations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamUpdate {
    /// Which loop (index into [`JobSpec::loops`]).
    pub loop_index: usize,
    /// Iterations run so far.
    pub iterations: u32,
    /// The loop's streamed buffers.
    pub buffers: Vec<StreamedBuffer>,
}

/// Receives stream updates on the GPU worker thread; it must not block (forward to a channel
/// with `try_send`: every update carries the whole buffer, so a dropped one loses nothing).
/// Returning `false` ends the loop at this check, as if its stop flag were set: the caller no
/// longer wants more (a reader went away, Ctrl-C).
pub type StreamSink = dyn Fn(StreamUpdate) -> bool + Send + Sync;

/// Input blobs shared rather than owned ([`Executor::run_shared`]): a provider hands the
/// executor the weights it keeps in its input cache without copying them (a copy of a
/// 100 MB model costs 80–500 ms of page faults on a small VM).
pub type SharedInputs = BTreeMap<ContentId, Arc<Vec<u8>>>;

/// Input blobs, owned or shared, as [`SharedInputs`] (moving a `Vec` into an `Arc` copies
/// nothing).
pub trait IntoSharedInputs {
    /// The blobs as shared ones.
    fn into_shared(self) -> SharedInputs;
}

impl IntoSharedInputs for BTreeMap<ContentId, Vec<u8>> {
    fn into_shared(self) -> SharedInputs {
        self.into_iter().map(|(k, v)| (k, Arc::new(v))).collect()
    }
}

impl IntoSharedInputs for SharedInputs {
    fn into_shared(self) -> SharedInputs {
        self
    }
}

/// Input bytes, owned or shared.
pub trait InputBytes {
    /// The bytes.
    fn input_bytes(&self) -> &[u8];
}

impl InputBytes for Vec<u8> {
    fn input_bytes(&self) -> &[u8] {
        self
    }
}

impl InputBytes for Arc<Vec<u8>> {
    fn input_bytes(&self) -> &[u8] {
        self.as_slice()
    }
}

struct Pending {
    spec: JobSpec,
    checked: CheckedJob,
    inputs: SharedInputs,
    stream: Option<Box<StreamSink>>,
    reply: oneshot::Sender<Result<JobOutput, ExecError>>,
}

struct Shared {
    queue: Mutex<FairQueue<Pending>>,
    ready: Condvar,
    shutdown: std::sync::atomic::AtomicBool,
    running: AtomicUsize,
    peak: AtomicUsize,
    devices_replaced: AtomicUsize,
    /// The worker threads, joined by [`Executor::shutdown`].
    workers: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

struct Handle {
    shared: Arc<Shared>,
    profile: Mutex<GpuProfile>,
    gpu_limits: GpuLimits,
    limits: JobLimits,
}

impl Drop for Handle {
    /// The last handle stops the workers and waits until they have released their devices (as
    /// [`Executor::shutdown`]): a worker still tearing down its device while the process exits
    /// can crash the process after everything else succeeded (seen in test binaries).
    fn drop(&mut self) {
        signal_shutdown(&self.shared);
        let workers = match shared_workers(&self.shared) {
            Ok(mut w) => std::mem::take(&mut *w),
            Err(_) => return,
        };
        for w in workers {
            let _ = w.join();
        }
    }
}

/// A cheap, cloneable handle to the executor. Workers stop when the last handle is dropped.
#[derive(Clone)]
pub struct Executor {
    h: Arc<Handle>,
}

impl std::fmt::Debug for Executor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor")
            .field("adapter", &self.profile().name)
            .finish()
    }
}

impl Executor {
    /// Opens the configured adapter and starts the workers. Blocking (opens devices); call it
    /// before or outside the async runtime, or in `spawn_blocking`.
    pub fn start(config: ExecConfig) -> Result<Executor, ExecError> {
        let dev_config = DeviceConfig {
            pipeline_cache: config.pipeline_cache,
            resident_bytes: config.resident_bytes,
            pool_bytes: config.pool_bytes,
            low_wake_latency: config.cpu_low_wake_latency,
            pin_threads: config.cpu_pin_threads,
        };
        // Opened on a thread of their own, so the driver's threads can be told apart (`pin`).
        let choice = config.adapter.clone();
        let n_devices = config.max_concurrent.max(1);
        let (adapter, devices) = pin::on_init_thread(move || {
            let adapter = adapter::select_adapter(&choice)?;
            let devices = (0..n_devices)
                .map(|_| GpuDevice::open(&adapter, dev_config))
                .collect::<Result<Vec<_>, _>>()?;
            Ok::<_, ExecError>((adapter, devices))
        })??;
        pin_driver_threads(&adapter, dev_config);
        let profile = adapter::profile(&adapter, config.memory_bytes, Benchmark::default());
        let shared = Arc::new(Shared {
            queue: Mutex::new(FairQueue::new(config.queue_depth.max(1))),
            ready: Condvar::new(),
            shutdown: false.into(),
            running: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            devices_replaced: AtomicUsize::new(0),
            workers: Mutex::new(Vec::new()),
        });
        // Site config can only lower the protocol's limits; buffers go up to what the
        // adapter allows, a job's total up to the memory the site declares.
        let mut limits = config.limits.min(JobLimits::default());
        limits.max_buffer_bytes = limits.max_buffer_bytes.min(profile.limits.max_buffer_size);
        if let Some(memory) = config.memory_bytes {
            limits.max_job_bytes = limits.max_job_bytes.min(memory);
        }
        // Counted from when a worker starts the job, not from when it was queued.
        let limit = Duration::from_millis(limits.max_job_ms);
        let shared_for_join = shared.clone();
        for (i, dev) in devices.into_iter().enumerate() {
            let shared = shared.clone();
            let adapter = adapter.clone();
            let handle = std::thread::Builder::new()
                .name(format!("hashgrid-gpu-{i}"))
                .spawn(move || worker(shared, adapter, dev, dev_config, limit))
                .map_err(|e| ExecError::Device {
                    adapter: profile.name.clone(),
                    reason: format!("could not start a worker thread: {e}"),
                })?;
            if let Ok(mut w) = shared_workers(&shared_for_join) {
                w.push(handle);
            }
        }
        Ok(Executor {
            h: Arc::new(Handle {
                shared,
                gpu_limits: profile.limits,
                profile: Mutex::new(profile),
                limits,
            }),
        })
    }

    /// The adapter as advertised (with `bench` zero until [`bench::cached`] or
    /// [`Executor::set_benchmark`]).
    pub fn profile(&self) -> GpuProfile {
        match self.h.profile.lock() {
            Ok(p) => p.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Records a measured benchmark in the profile.
    pub fn set_benchmark(&self, bench: Benchmark) {
        match self.h.profile.lock() {
            Ok(mut p) => p.bench = bench,
            Err(p) => p.into_inner().bench = bench,
        }
    }

    /// The job limits in force.
    pub fn limits(&self) -> &JobLimits {
        &self.h.limits
    }

    /// Checks a job without running it: the same checks [`Executor::run`] does first.
    pub fn check(
        &self,
        spec: &JobSpec,
        inputs: &BTreeMap<ContentId, Vec<u8>>,
    ) -> Result<(), ExecError> {
        validate::check_job(spec, Some(inputs), &self.h.limits, &self.h.gpu_limits).map(|_| ())
    }

    /// Checks a job's spec without its inputs (WGSL, bindings, sizes, this adapter's limits):
    /// what a provider checks before it agrees to run a job.
    pub fn check_spec(&self, spec: &JobSpec) -> Result<(), ExecError> {
        validate::check_job::<Vec<u8>>(spec, None, &self.h.limits, &self.h.gpu_limits).map(|_| ())
    }

    /// Checks `spec`, queues it for `buyer` and resolves with its outputs.
    pub async fn run(
        &self,
        buyer: &str,
        spec: JobSpec,
        inputs: impl IntoSharedInputs,
    ) -> Result<JobOutput, ExecError> {
        self.run_streaming(buyer, spec, inputs, None).await
    }

    /// [`Executor::run`], handing each loop check's streamed buffers to `stream` while the job
    /// runs (see [`hashgrid_protocol::LoopSpec`]).
    pub async fn run_streaming(
        &self,
        buyer: &str,
        spec: JobSpec,
        inputs: impl IntoSharedInputs,
        stream: Option<Box<StreamSink>>,
    ) -> Result<JobOutput, ExecError> {
        self.run_shared(buyer, spec, inputs.into_shared(), stream)
            .await
    }

    /// [`Executor::run_streaming`] with shared input blobs.
    pub async fn run_shared(
        &self,
        buyer: &str,
        spec: JobSpec,
        inputs: SharedInputs,
        stream: Option<Box<StreamSink>>,
    ) -> Result<JobOutput, ExecError> {
        let checked =
            validate::check_job(&spec, Some(&inputs), &self.h.limits, &self.h.gpu_limits)?;
        let (tx, rx) = oneshot::channel();
        {
            let mut q = self
                .h
                .shared
                .queue
                .lock()
                .map_err(|_| ExecError::Shutdown)?;
            let pending = Pending {
                spec,
                checked,
                inputs,
                stream,
                reply: tx,
            };
            if q.push(buyer, pending).is_err() {
                return Err(ExecError::QueueFull(q.len()));
            }
        }
        self.h.shared.ready.notify_one();
        rx.await.map_err(|_| ExecError::Shutdown)?
    }

    /// Stops the workers after the jobs they are running and waits until they have released
    /// their devices. Blocking. Call it before the process exits: a GPU driver torn down by
    /// `exit` while a worker still holds a device can crash the process. Queued jobs fail with
    /// [`ExecError::Shutdown`]; other handles to this executor stop working.
    pub fn shutdown(&self) {
        signal_shutdown(&self.h.shared);
        let workers = match shared_workers(&self.h.shared) {
            Ok(mut w) => std::mem::take(&mut *w),
            Err(_) => return,
        };
        for w in workers {
            let _ = w.join();
        }
    }

    /// Most jobs that have run at once since start.
    pub fn peak_concurrency(&self) -> usize {
        self.h.shared.peak.load(Ordering::SeqCst)
    }

    /// Devices replaced after a timeout or device error since start.
    pub fn devices_replaced(&self) -> usize {
        self.h.shared.devices_replaced.load(Ordering::SeqCst)
    }
}

/// Tells the workers to stop. The flag is set while holding the queue's lock: a worker checks
/// it under that lock and then waits on `ready`, so without the lock the flag and the wake-up
/// could both land between its check and its wait, and it would sleep forever while the caller
/// joins it (the test binaries' intermittent hang, caught in gdb: the last `Executor` dropped
/// while its worker was between the two).
fn signal_shutdown(shared: &Shared) {
    let guard = match shared.queue.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    };
    shared.shutdown.store(true, Ordering::SeqCst);
    drop(guard);
    shared.ready.notify_all();
}

fn shared_workers(
    shared: &Shared,
) -> Result<std::sync::MutexGuard<'_, Vec<std::thread::JoinHandle<()>>>, ()> {
    shared.workers.lock().map_err(|_| ())
}

/// Pins the driver's threads ([`pin`]) when `config` asks and `adapter` is a CPU adapter.
fn pin_driver_threads(adapter: &wgpu::Adapter, config: DeviceConfig) {
    if config.pin_threads && adapter.get_info().device_type == wgpu::DeviceType::Cpu {
        pin::spread();
    }
}

/// A new device on `adapter`, opened like the first ones (its driver threads pinned on a CPU
/// adapter).
fn open_replacement(adapter: &wgpu::Adapter, config: DeviceConfig) -> Result<GpuDevice, ExecError> {
    let a = adapter.clone();
    let dev = pin::on_init_thread(move || GpuDevice::open(&a, config))??;
    pin_driver_threads(adapter, config);
    Ok(dev)
}

fn worker(
    shared: Arc<Shared>,
    adapter: wgpu::Adapter,
    mut dev: GpuDevice,
    config: DeviceConfig,
    limit: Duration,
) {
    loop {
        let job = {
            let Ok(mut q) = shared.queue.lock() else {
                return;
            };
            loop {
                if shared.shutdown.load(Ordering::SeqCst) {
                    return;
                }
                if let Some(j) = q.pop() {
                    break j;
                }
                q = match shared.ready.wait(q) {
                    Ok(q) => q,
                    Err(_) => return,
                };
            }
        };
        let now = shared.running.fetch_add(1, Ordering::SeqCst) + 1;
        shared.peak.fetch_max(now, Ordering::SeqCst);
        let result = dev.run(
            &job.spec,
            &job.checked,
            &job.inputs,
            Instant::now(),
            limit,
            job.stream.as_deref(),
        );
        shared.running.fetch_sub(1, Ordering::SeqCst);
        if matches!(result, Err(ExecError::Timeout { .. } | ExecError::Gpu(_))) {
            shared.devices_replaced.fetch_add(1, Ordering::SeqCst);
            // Open the replacement first so a failure leaves the old one in place.
            match open_replacement(&adapter, config) {
                Ok(fresh) => std::mem::replace(&mut dev, fresh).abandon(),
                Err(e) => {
                    let _ = job.reply.send(Err(e));
                    continue;
                }
            }
        }
        let _ = job.reply.send(result);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_parallel_copy_is_the_bytes_whatever_the_length() {
        // Below the threshold, a whole number of chunks, and a ragged last chunk.
        for len in [0, 17, super::COPY_CHUNK * 3, super::COPY_CHUNK * 3 + 12_345] {
            let src: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4099) as u8).collect();
            let mut dst = vec![0u8; len];
            super::copy_parallel(&mut dst, &src);
            assert!(dst == src, "length {len}");
        }
    }
}
