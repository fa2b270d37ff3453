//! One wgpu device and the code that runs a checked job on it: buffers, pipelines (cached),
//! passes with timestamp queries, readback and hashing.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hashgrid_protocol::{BufferInit, BufferRange, JobSpec};

use super::pool::Pool;
use super::resident::{Kept, Key, Resident};
use super::validate::{CheckedBinding, CheckedJob, texture_shape};
use super::{
    ExecError, JobOutput, OutputBuffer, PassTiming, StreamSink, StreamUpdate, StreamedBuffer,
};

/// Smallest blob kept resident between jobs: below this, uploading costs less than tracking.
const RESIDENT_MIN_BYTES: u64 = 64 * 1024;

/// What a job's buffers cost to set up.
#[derive(Debug, Default)]
struct UploadStats {
    uploaded_bytes: u64,
    resident_hits: u32,
    resident_bytes: u64,
    reused_buffers: u32,
}

/// What a device keeps between jobs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DeviceConfig {
    /// Compiled pipelines kept.
    pub(crate) pipeline_cache: usize,
    /// Bytes of read-only blobs kept resident.
    pub(crate) resident_bytes: u64,
    /// Bytes of idle buffers kept for reuse.
    pub(crate) pool_bytes: u64,
    /// Hold a low wake-up latency request while a job runs, on a CPU adapter.
    pub(crate) low_wake_latency: bool,
    /// Pin the driver's threads to cores when opening a device on a CPU adapter ([`crate::pin`]).
    pub(crate) pin_threads: bool,
}

/// A job's buffers, and which of them go back to the pool when it ends.
struct JobBuffers {
    buffers: Vec<wgpu::Buffer>,
    /// (buffer index, allocated size, usage) of buffers this job owns alone.
    recyclable: Vec<(usize, u64, wgpu::BufferUsages)>,
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = bytes.get(at..at + 8) {
        a.copy_from_slice(s);
    }
    u64::from_le_bytes(a)
}

/// A device with its queue and pipeline cache. Replaced after a timeout or a device error.
pub(crate) struct GpuDevice {
    device: wgpu::Device,
    queue: wgpu::Queue,
    timestamps: bool,
    /// Errors wgpu reported outside error scopes (e.g. device loss), drained after each job.
    uncaptured: Arc<Mutex<Vec<String>>>,
    /// (shader hash, entry) -> pipeline, most recently used last.
    pipelines: VecDeque<(([u8; 32], String), wgpu::ComputePipeline)>,
    cache_size: usize,
    /// Read-only blob buffers kept for later jobs (model weights), LRU under a byte budget.
    resident: Resident,
    /// Buffers of finished jobs, reused by later jobs of the same shapes.
    pool: Pool,
    /// A CPU adapter (lavapipe): "GPU" memory is host memory, so blobs are written straight
    /// into mapped buffers and outputs read straight from them (`MAPPABLE_PRIMARY_BUFFERS`),
    /// one copy each way instead of wgpu's staging copies.
    host_mapped: bool,
    /// A CPU adapter whose jobs hold a low wake-up latency request ([`crate::wake`]).
    low_wake_latency: bool,
}

impl GpuDevice {
    /// Opens a device on `adapter` with the adapter's own limits.
    pub(crate) fn open(adapter: &wgpu::Adapter, config: DeviceConfig) -> Result<Self, ExecError> {
        let timestamps = adapter.features().contains(wgpu::Features::TIMESTAMP_QUERY);
        let host_mapped = adapter.get_info().device_type == wgpu::DeviceType::Cpu
            && adapter
                .features()
                .contains(wgpu::Features::MAPPABLE_PRIMARY_BUFFERS);
        let mut features = wgpu::Features::empty();
        if timestamps {
            features |= wgpu::Features::TIMESTAMP_QUERY;
        }
        if host_mapped {
            features |= wgpu::Features::MAPPABLE_PRIMARY_BUFFERS;
        }
        let desc = wgpu::DeviceDescriptor {
            label: Some("hashgrid executor"),
            required_features: features,
            required_limits: adapter.limits(),
            ..Default::default()
        };
        let (device, queue) =
            super::adapter::block_on(adapter.request_device(&desc))?.map_err(|e| {
                ExecError::Device {
                    adapter: adapter.get_info().name,
                    reason: e.to_string(),
                }
            })?;
        let uncaptured = Arc::new(Mutex::new(Vec::new()));
        let sink = uncaptured.clone();
        // wgpu's default handler panics; record the error and fail the job instead.
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            if let Ok(mut v) = sink.lock() {
                v.push(e.to_string());
            }
        }));
        Ok(GpuDevice {
            device,
            queue,
            timestamps,
            uncaptured,
            pipelines: VecDeque::new(),
            cache_size: config.pipeline_cache,
            resident: Resident::new(config.resident_bytes),
            pool: Pool::new(config.pool_bytes),
            host_mapped,
            low_wake_latency: config.low_wake_latency
                && adapter.get_info().device_type == wgpu::DeviceType::Cpu,
        })
    }

    /// Gives up on this device without waiting for its work: the drop happens on a detached
    /// thread because dropping a device with a dispatch still running can block until it ends.
    pub(crate) fn abandon(self) {
        let _ = std::thread::Builder::new()
            .name("hashgrid-abandoned-device".into())
            .spawn(move || {
                self.device.destroy();
                drop(self);
            });
    }

    fn pipeline(
        &mut self,
        key: ([u8; 32], String),
        wgsl: &str,
    ) -> Result<wgpu::ComputePipeline, ExecError> {
        if let Some(i) = self.pipelines.iter().position(|(k, _)| *k == key)
            && let Some(entry) = self.pipelines.remove(i)
        {
            let p = entry.1.clone();
            self.pipelines.push_back(entry);
            return Ok(p);
        }
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = self
            .device
            .create_shader_module(wgpu::ShaderModuleDescriptor {
                label: None,
                source: wgpu::ShaderSource::Wgsl(wgsl.into()),
            });
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: None,
                layout: None,
                module: &module,
                entry_point: Some(&key.1),
                compilation_options: Default::default(),
                cache: None,
            });
        if let Some(e) = super::adapter::block_on(scope.pop())? {
            return Err(ExecError::Gpu(format!("creating pipeline {}: {e}", key.1)));
        }
        if self.cache_size > 0 {
            if self.pipelines.len() >= self.cache_size {
                self.pipelines.pop_front();
            }
            self.pipelines.push_back((key, pipeline.clone()));
        }
        Ok(pipeline)
    }

    /// Creates the job's buffers: zeroed, written from their blob, or (read-only blobs) taken
    /// from the resident set, which keeps them for later jobs that name the same blob. Buffers
    /// come from the pool when an earlier job left one of the same size and usage; a reused
    /// buffer is overwritten or cleared whole before any pass runs.
    fn buffers(
        &mut self,
        spec: &JobSpec,
        checked: &CheckedJob,
        inputs: &crate::SharedInputs,
        stats: &mut UploadStats,
    ) -> Result<JobBuffers, ExecError> {
        let mut created = self.create_blob_buffers(spec, checked, inputs)?;
        let mut buffers = Vec::with_capacity(spec.buffers.len());
        let mut recyclable = Vec::new();
        let mut clear = Vec::new();
        for (i, (b, &alloc)) in spec.buffers.iter().zip(&checked.alloc_sizes).enumerate() {
            // Only ever a texture, which starts as zeros: its bytes are never needed as a
            // buffer (a K/V cache), so a placeholder stands in for them.
            let alloc = if texture_only(spec, checked, i) {
                BUFFER_PLACEHOLDER
            } else {
                alloc
            };
            let shareable = matches!(b.init, BufferInit::Blob(_))
                && !checked.written.get(i).copied().unwrap_or(true)
                && b.size >= RESIDENT_MIN_BYTES;
            if shareable
                && let BufferInit::Blob(id) = &b.init
                && let Some(buf) = self.resident.buffer(id)
            {
                stats.resident_hits += 1;
                stats.resident_bytes += b.size;
                buffers.push(buf);
                continue;
            }
            let blob = match &b.init {
                BufferInit::Blob(id) => inputs.get(id).map(|bytes| (id, bytes.as_slice())),
                _ => None,
            };
            let usage = self.usage(b.output, blob.is_some());
            // (buffer, new rather than pooled, blob already written into it)
            let (buf, fresh, written) = match created[i].take() {
                Some(buf) => (buf, true, true),
                None => match self.pool.take(alloc, usage) {
                    Some(buf) => {
                        stats.reused_buffers += 1;
                        (buf, false, false)
                    }
                    None => {
                        let buf = self.device.create_buffer(&wgpu::BufferDescriptor {
                            label: Some(&b.name),
                            size: alloc,
                            usage,
                            mapped_at_creation: self.host_mapped && blob.is_some(),
                        });
                        (buf, true, false)
                    }
                },
            };
            match blob {
                Some((id, bytes)) => {
                    if !written {
                        self.write_blob(&buf, &b.name, bytes, alloc, fresh)?;
                    }
                    stats.uploaded_bytes += bytes.len() as u64;
                    let kept = shareable
                        && self.resident.insert(
                            Key {
                                blob: *id,
                                texture: None,
                            },
                            Kept::Buffer(buf.clone()),
                            alloc,
                        );
                    if !kept {
                        recyclable.push((i, alloc, usage));
                    }
                }
                None => {
                    // New buffers are zeroed by wgpu; reused ones are cleared here.
                    if !fresh {
                        clear.push(buf.clone());
                    }
                    recyclable.push((i, alloc, usage));
                }
            }
            buffers.push(buf);
        }
        if !clear.is_empty() {
            let mut enc = self
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
            for buf in &clear {
                enc.clear_buffer(buf, 0, None);
            }
            self.queue.submit([enc.finish()]);
        }
        Ok(JobBuffers {
            buffers,
            recyclable,
        })
    }

    /// The usage of a job buffer: host-mapped adapters map outputs for reading and blob
    /// buffers for writing.
    fn usage(&self, output: bool, blob: bool) -> wgpu::BufferUsages {
        let mut usage = wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::UNIFORM
            | wgpu::BufferUsages::COPY_SRC
            | wgpu::BufferUsages::COPY_DST;
        if self.host_mapped && output {
            usage |= wgpu::BufferUsages::MAP_READ;
        }
        if self.host_mapped && blob {
            usage |= wgpu::BufferUsages::MAP_WRITE;
        }
        usage
    }

    /// On a host-mapped adapter, the new buffers a job's blobs need, created and written on
    /// all cores; `None` for every other buffer, which [`Self::buffers`] makes as before. wgpu
    /// zero-fills a new buffer's mapping on the thread that creates it, and on a CPU adapter
    /// that fill is the first touch of fresh memory (page faults, ~2 GB/s on one core of the
    /// 2-core VM), so creating several at once spreads it over the cores. Taken: a blob's
    /// first buffer when the job has two or more such blobs, none of them resident and no
    /// pooled buffer of its size and usage idle (a later buffer naming the same blob still
    /// finds it resident, in order, as before).
    fn create_blob_buffers(
        &self,
        spec: &JobSpec,
        checked: &CheckedJob,
        inputs: &crate::SharedInputs,
    ) -> Result<Vec<Option<wgpu::Buffer>>, ExecError> {
        use rayon::prelude::*;
        let mut out = vec![None; spec.buffers.len()];
        if !self.host_mapped {
            return Ok(out);
        }
        let mut seen = std::collections::HashSet::new();
        let mut todo = Vec::new();
        for (i, (b, &alloc)) in spec.buffers.iter().zip(&checked.alloc_sizes).enumerate() {
            let BufferInit::Blob(id) = &b.init else {
                continue;
            };
            if !seen.insert(*id) || texture_only(spec, checked, i) || self.resident.holds(id) {
                continue;
            }
            let Some(bytes) = inputs.get(id) else {
                continue;
            };
            let usage = self.usage(b.output, true);
            if self.pool.holds(alloc, usage) {
                continue;
            }
            todo.push((i, &b.name, alloc, usage, bytes.as_slice()));
        }
        if todo.len() < 2 {
            return Ok(out);
        }
        let made: Vec<Result<(usize, wgpu::Buffer), ExecError>> = todo
            .into_par_iter()
            .map(|(i, name, alloc, usage, bytes)| {
                // Error scopes are per thread: this one catches what the job's would have.
                let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
                let buf = self.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some(name),
                    size: alloc,
                    usage,
                    mapped_at_creation: true,
                });
                let written = self.write_blob(&buf, name, bytes, alloc, true);
                if let Some(e) = super::adapter::block_on(scope.pop())? {
                    return Err(ExecError::Gpu(format!(
                        "creating input buffer {name:?}: {e}"
                    )));
                }
                written?;
                Ok((i, buf))
            })
            .collect();
        for r in made {
            let (i, buf) = r?;
            out[i] = Some(buf);
        }
        Ok(out)
    }

    /// Writes blob `bytes` into `buf` (`alloc` bytes) and zeroes the rest: one copy into the
    /// mapped buffer on a CPU adapter (a `fresh` one is mapped at creation and zeroed by wgpu,
    /// a reused one is mapped here), queued writes elsewhere.
    fn write_blob(
        &self,
        buf: &wgpu::Buffer,
        name: &str,
        bytes: &[u8],
        alloc: u64,
        fresh: bool,
    ) -> Result<(), ExecError> {
        let len = bytes.len();
        if self.host_mapped {
            if !fresh {
                let (tx, rx) = std::sync::mpsc::channel();
                buf.slice(..).map_async(wgpu::MapMode::Write, move |r| {
                    let _ = tx.send(r.is_ok());
                });
                self.device
                    .poll(wgpu::PollType::Wait {
                        submission_index: None,
                        timeout: Some(Duration::from_secs(10)),
                    })
                    .map_err(|e| ExecError::Gpu(format!("mapping input buffer {name:?}: {e}")))?;
                if !rx.try_recv().unwrap_or(false) {
                    return Err(ExecError::Gpu(format!(
                        "mapping input buffer {name:?} failed"
                    )));
                }
            }
            {
                let mut view = buf
                    .slice(..)
                    .get_mapped_range_mut()
                    .map_err(|e| ExecError::Gpu(format!("mapping input buffer {name:?}: {e}")))?;
                view.slice(..len).copy_from_slice(bytes);
                if !fresh {
                    view.slice(len..).fill(0);
                }
            }
            buf.unmap();
            return Ok(());
        }
        let aligned = len & !3;
        if aligned > 0 {
            self.queue.write_buffer(buf, 0, &bytes[..aligned]);
        }
        if aligned < len {
            let mut tail = [0u8; 4];
            tail[..len - aligned].copy_from_slice(&bytes[aligned..]);
            self.queue.write_buffer(buf, aligned as u64, &tail);
        }
        let written = (len as u64).div_ceil(4) * 4;
        if !fresh && written < alloc {
            let zeros = vec![0u8; (alloc - written) as usize];
            self.queue.write_buffer(buf, written, &zeros);
        }
        Ok(())
    }

    /// The textures the job reads (every distinct buffer range bound as a texture, sampled or
    /// read-only storage: one texture serves both):
    /// copied from their buffers as the job starts, or, for resident blobs, kept from an
    /// earlier job that read the same range.
    fn textures(
        &mut self,
        spec: &JobSpec,
        checked: &CheckedJob,
        buffers: &[wgpu::Buffer],
    ) -> Vec<((usize, BufferRange), wgpu::TextureView)> {
        let mut out: Vec<((usize, BufferRange), wgpu::TextureView)> = Vec::new();
        let mut encoder = None;
        for b in checked.passes.iter().flat_map(|p| &p.bindings) {
            if !b.texture {
                continue;
            }
            let buf = &spec.buffers[b.buffer];
            let range = b.range.unwrap_or(BufferRange {
                offset: 0,
                size: buf.size,
            });
            if out.iter().any(|(k, _)| *k == (b.buffer, range)) {
                continue;
            }
            // A texture a pass writes is this job's alone: never from or into the resident set.
            let key = match &buf.init {
                BufferInit::Blob(id)
                    if buf.size >= RESIDENT_MIN_BYTES && !checked.written[b.buffer] =>
                {
                    Some(Key {
                        blob: *id,
                        texture: Some(range),
                    })
                }
                _ => None,
            };
            if let Some(Kept::Texture(view)) = key.and_then(|k| self.resident.get(&k)) {
                out.push(((b.buffer, range), view));
                continue;
            }
            let (width, rows) = texture_shape(range.size);
            let texture = self.device.create_texture(&wgpu::TextureDescriptor {
                label: Some(&buf.name),
                size: wgpu::Extent3d {
                    width,
                    height: rows,
                    depth_or_array_layers: 1,
                },
                mip_level_count: 1,
                sample_count: 1,
                dimension: wgpu::TextureDimension::D2,
                format: wgpu::TextureFormat::Rgba32Uint,
                usage: wgpu::TextureUsages::TEXTURE_BINDING
                    | wgpu::TextureUsages::STORAGE_BINDING
                    | wgpu::TextureUsages::COPY_DST
                    | wgpu::TextureUsages::COPY_SRC,
                view_formats: &[],
            });
            if texture_only(spec, checked, b.buffer) {
                // Nothing to copy: wgpu clears a texture before its first use.
                out.push((
                    (b.buffer, range),
                    texture.create_view(&wgpu::TextureViewDescriptor::default()),
                ));
                continue;
            }
            let enc = encoder.get_or_insert_with(|| {
                self.device
                    .create_command_encoder(&wgpu::CommandEncoderDescriptor::default())
            });
            for run in texel_runs(range) {
                enc.copy_buffer_to_texture(
                    run.buffer_side(&buffers[b.buffer]),
                    run.texture_side(&texture),
                    run.extent(),
                );
            }
            let view = texture.create_view(&wgpu::TextureViewDescriptor::default());
            if let Some(k) = key
                && !checked.written[b.buffer]
            {
                let bytes = u64::from(width) * u64::from(rows) * 16;
                let _ = self.resident.insert(k, Kept::Texture(view.clone()), bytes);
            }
            out.push(((b.buffer, range), view));
        }
        if let Some(enc) = encoder {
            self.queue.submit([enc.finish()]);
        }
        out
    }

    fn bind_group(
        &self,
        pipeline: &wgpu::ComputePipeline,
        bindings: &[CheckedBinding],
        buffers: &[wgpu::Buffer],
        textures: &[((usize, BufferRange), wgpu::TextureView)],
        spec: &JobSpec,
    ) -> Option<wgpu::BindGroup> {
        if bindings.is_empty() {
            return None;
        }
        let layout = pipeline.get_bind_group_layout(0);
        let entries: Vec<wgpu::BindGroupEntry<'_>> = bindings
            .iter()
            .map(|b| wgpu::BindGroupEntry {
                binding: b.binding,
                resource: if b.texture {
                    let range = b.range.unwrap_or(BufferRange {
                        offset: 0,
                        size: spec.buffers[b.buffer].size,
                    });
                    match textures.iter().find(|(k, _)| *k == (b.buffer, range)) {
                        Some((_, view)) => wgpu::BindingResource::TextureView(view),
                        // `textures` made one for every texture binding.
                        None => buffers[b.buffer].as_entire_binding(),
                    }
                } else {
                    match b.range {
                        None => buffers[b.buffer].as_entire_binding(),
                        Some(r) => wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                            buffer: &buffers[b.buffer],
                            offset: r.offset,
                            size: wgpu::BufferSize::new(r.size),
                        }),
                    }
                },
            })
            .collect();
        Some(self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &layout,
            entries: &entries,
        }))
    }

    /// Waits for everything submitted so far, within the job's time limit.
    fn wait(&self, started: Instant, limit: Duration) -> Result<(), ExecError> {
        let remaining = limit.saturating_sub(started.elapsed());
        match self.device.poll(wgpu::PollType::Wait {
            submission_index: None,
            timeout: Some(remaining),
        }) {
            Ok(_) => Ok(()),
            Err(wgpu::PollError::Timeout) => Err(ExecError::Timeout {
                limit_ms: limit.as_millis() as u64,
            }),
            Err(e) => Err(ExecError::Gpu(e.to_string())),
        }
    }

    fn take_uncaptured(&self) -> Result<(), ExecError> {
        if let Ok(mut errs) = self.uncaptured.lock()
            && !errs.is_empty()
        {
            let msg = errs.join("; ");
            errs.clear();
            return Err(ExecError::Gpu(msg));
        }
        Ok(())
    }

    /// Maps `bufs` (staging buffers with a pending copy already submitted), waits, and
    /// returns their first `lens[i]` bytes, unmapping them again.
    fn read_staging(
        &self,
        bufs: &[(&wgpu::Buffer, u64)],
        started: Instant,
        limit: Duration,
    ) -> Result<Vec<Vec<u8>>, ExecError> {
        let (tx, rx) = std::sync::mpsc::channel();
        for (s, _) in bufs {
            let tx = tx.clone();
            s.slice(..).map_async(wgpu::MapMode::Read, move |r| {
                let _ = tx.send(r.is_ok());
            });
        }
        self.wait(started, limit)?;
        for _ in bufs {
            if !rx.try_recv().unwrap_or(false) {
                return Err(ExecError::Gpu("mapping a readback buffer failed".into()));
            }
        }
        self.take_uncaptured()?;
        let mut out = Vec::with_capacity(bufs.len());
        for (s, len) in bufs {
            let bytes = {
                let view = s
                    .slice(..)
                    .get_mapped_range()
                    .map_err(|e| ExecError::Gpu(format!("reading back: {e}")))?;
                // Zeroed memory from the allocator is fresh pages, faulted in by the copy.
                let mut v = vec![0u8; *len as usize];
                crate::copy_parallel(&mut v, &view[..*len as usize]);
                v
            };
            s.unmap();
            out.push(bytes);
        }
        Ok(out)
    }

    fn staging(&self, size: u64) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    }

    /// Runs a checked job: passes outside loops once (each timed with timestamp queries when
    /// the adapter has them), loop bodies in chunks of `check_every` iterations, each chunk one
    /// submission followed by a read of the stop flag and the streamed buffers. On `Timeout`
    /// or `Gpu` errors the caller must abandon this device.
    pub(crate) fn run(
        &mut self,
        spec: &JobSpec,
        checked: &CheckedJob,
        inputs: &crate::SharedInputs,
        started: Instant,
        limit: Duration,
        stream: Option<&StreamSink>,
    ) -> Result<JobOutput, ExecError> {
        // Held until the job returns (see `wake.rs`).
        let _wake = if self.low_wake_latency {
            crate::wake::LowWakeLatency::request()
        } else {
            None
        };
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let mut upload = UploadStats::default();
        let JobBuffers {
            buffers,
            recyclable,
        } = self.buffers(spec, checked, inputs, &mut upload)?;
        let textures = self.textures(spec, checked, &buffers);
        let mut pipelines = Vec::with_capacity(spec.passes.len());
        for p in &spec.passes {
            let key = (checked.shader_hashes[p.shader as usize], p.entry.clone());
            pipelines.push(self.pipeline(key, &spec.shaders[p.shader as usize].wgsl)?);
        }
        let groups: Vec<Option<wgpu::BindGroup>> = pipelines
            .iter()
            .zip(&checked.passes)
            .map(|(pl, cp)| self.bind_group(pl, &cp.bindings, &buffers, &textures, spec))
            .collect();
        if let Some(e) = super::adapter::block_on(scope.pop())? {
            return Err(ExecError::Gpu(e.to_string()));
        }

        // Passes outside loops get a timestamp pair each; each loop one pair, reused per chunk.
        let in_loop = |i: usize| {
            spec.loops
                .iter()
                .any(|l| i >= l.first as usize && i < (l.first + l.len) as usize)
        };
        let once: Vec<usize> = (0..spec.passes.len()).filter(|&i| !in_loop(i)).collect();
        let n_queries = 2 * (once.len() as u32 + 1);
        let queries = (self.timestamps && n_queries <= wgpu::QUERY_SET_MAX_QUERIES).then(|| {
            let set = self.device.create_query_set(&wgpu::QuerySetDescriptor {
                label: None,
                ty: wgpu::QueryType::Timestamp,
                count: n_queries,
            });
            let resolve = self.device.create_buffer(&wgpu::BufferDescriptor {
                label: None,
                size: 8 * u64::from(n_queries),
                usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            });
            let staging = self.staging(8 * u64::from(n_queries));
            (set, resolve, staging)
        });
        // The loop's pair sits after the once-passes' pairs.
        let loop_slot = 2 * once.len() as u32;
        let period = f64::from(self.queue.get_timestamp_period());

        let mut enc = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
        let mut pass_times: Vec<PassTiming> = Vec::new();
        let mut loop_gpu_ms = 0.0f64;
        let mut loop_wall = Duration::ZERO;
        let mut iterations = Vec::with_capacity(spec.loops.len());
        let mut i = 0usize;
        let mut once_slot = 0u32;
        while i < spec.passes.len() {
            if let Some((li, l)) = spec
                .loops
                .iter()
                .enumerate()
                .find(|(_, l)| l.first as usize == i)
            {
                let body = l.first as usize..(l.first + l.len) as usize;
                let steps = l.counter.map(|_| {
                    let bytes: Vec<u8> = (0..l.max_iters).flat_map(u32::to_le_bytes).collect();
                    let b = self.device.create_buffer(&wgpu::BufferDescriptor {
                        label: Some("loop steps"),
                        size: bytes.len() as u64,
                        usage: wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
                        mapped_at_creation: false,
                    });
                    self.queue.write_buffer(&b, 0, &bytes);
                    b
                });
                let stop_staging = l.stop.map(|_| self.staging(4));
                let stream_staging: Vec<(usize, wgpu::Buffer)> = l
                    .stream
                    .iter()
                    .map(|&b| (b as usize, self.staging(checked.alloc_sizes[b as usize])))
                    .collect();
                let mut done = 0u32;
                while done < l.max_iters {
                    let chunk_end = done.saturating_add(l.check_every).min(l.max_iters);
                    for it in done..chunk_end {
                        if let (Some(steps), Some(c)) = (&steps, l.counter) {
                            enc.copy_buffer_to_buffer(
                                steps,
                                4 * u64::from(it),
                                &buffers[c as usize],
                                0,
                                4,
                            );
                        }
                        let first = it == done;
                        let last = it + 1 == chunk_end;
                        let tw = queries
                            .as_ref()
                            .filter(|_| first || last)
                            .map(|(set, _, _)| wgpu::ComputePassTimestampWrites {
                                query_set: set,
                                beginning_of_pass_write_index: first.then_some(loop_slot),
                                end_of_pass_write_index: last.then_some(loop_slot + 1),
                            });
                        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                            label: None,
                            timestamp_writes: tw,
                        });
                        for pi in body.clone() {
                            pass.set_pipeline(&pipelines[pi]);
                            if let Some(bg) = &groups[pi] {
                                pass.set_bind_group(0, bg, &[]);
                            }
                            let [x, y, z] = spec.passes[pi].workgroups;
                            pass.dispatch_workgroups(x, y, z);
                        }
                    }
                    let mut reads: Vec<(&wgpu::Buffer, u64)> = Vec::new();
                    if let (Some(s), Some(b)) = (&stop_staging, l.stop) {
                        enc.copy_buffer_to_buffer(&buffers[b as usize], 0, s, 0, 4);
                        reads.push((s, 4));
                    }
                    for (b, s) in &stream_staging {
                        enc.copy_buffer_to_buffer(&buffers[*b], 0, s, 0, checked.alloc_sizes[*b]);
                        reads.push((s, spec.buffers[*b].size));
                    }
                    if let Some((set, resolve, staging)) = &queries {
                        enc.resolve_query_set(set, loop_slot..loop_slot + 2, resolve, 0);
                        enc.copy_buffer_to_buffer(resolve, 0, staging, 0, 16);
                        reads.push((staging, 16));
                    }
                    let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
                    let submit_at = Instant::now();
                    let full = std::mem::replace(
                        &mut enc,
                        self.device
                            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                                label: None,
                            }),
                    );
                    self.queue.submit([full.finish()]);
                    if let Some(e) = super::adapter::block_on(scope.pop())? {
                        return Err(ExecError::Gpu(e.to_string()));
                    }
                    let got = if reads.is_empty() {
                        self.wait(started, limit)?;
                        self.take_uncaptured()?;
                        Vec::new()
                    } else {
                        self.read_staging(&reads, started, limit)?
                    };
                    loop_wall += submit_at.elapsed();
                    done = chunk_end;
                    let mut got = got.into_iter();
                    let stopped = match l.stop {
                        Some(_) => got.next().is_some_and(|b| b.iter().any(|&x| x != 0)),
                        None => false,
                    };
                    let streamed: Vec<StreamedBuffer> = stream_staging
                        .iter()
                        .zip(got.by_ref())
                        .map(|((b, _), bytes)| StreamedBuffer {
                            name: spec.buffers[*b].name.clone(),
                            bytes,
                        })
                        .collect();
                    if queries.is_some()
                        && let Some(ts) = got.next()
                    {
                        let t0 = u64_at(&ts, 0);
                        let t1 = u64_at(&ts, 8);
                        loop_gpu_ms += t1.saturating_sub(t0) as f64 * period / 1e6;
                    }
                    let mut wanted = true;
                    if let Some(sink) = stream
                        && !streamed.is_empty()
                    {
                        wanted = sink(StreamUpdate {
                            loop_index: li,
                            iterations: done,
                            buffers: streamed,
                        });
                    }
                    if stopped || !wanted {
                        break;
                    }
                    if started.elapsed() > limit {
                        return Err(ExecError::Timeout {
                            limit_ms: limit.as_millis() as u64,
                        });
                    }
                }
                iterations.push(done);
                pass_times.push(PassTiming {
                    entry: format!("loop {} ({} passes × {done} iterations)", li + 1, l.len),
                    gpu_ms: if queries.is_some() {
                        loop_gpu_ms
                    } else {
                        loop_wall.as_secs_f64() * 1e3
                    },
                });
                i = body.end;
                continue;
            }
            let tw = queries
                .as_ref()
                .map(|(set, _, _)| wgpu::ComputePassTimestampWrites {
                    query_set: set,
                    beginning_of_pass_write_index: Some(2 * once_slot),
                    end_of_pass_write_index: Some(2 * once_slot + 1),
                });
            once_slot += 1;
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: None,
                timestamp_writes: tw,
            });
            pass.set_pipeline(&pipelines[i]);
            if let Some(bg) = &groups[i] {
                pass.set_bind_group(0, bg, &[]);
            }
            let [x, y, z] = spec.passes[i].workgroups;
            pass.dispatch_workgroups(x, y, z);
            drop(pass);
            i += 1;
        }

        // Outputs written as textures: their textures' texels back into the buffer first.
        for ((bi, range), view) in &textures {
            if spec.buffers[*bi].output && checked.texture_written[*bi] {
                texture_to_buffer(&mut enc, view.texture(), &buffers[*bi], *range);
            }
        }
        // Outputs, and the once-passes' timestamps.
        // On a CPU adapter outputs are mapped where they are; elsewhere copied to staging.
        let mut staging = Vec::new();
        for (i, b) in spec.buffers.iter().enumerate() {
            if !b.output {
                continue;
            }
            if self.host_mapped {
                staging.push((i, buffers[i].clone()));
                continue;
            }
            let size = checked.alloc_sizes[i];
            let s = self.staging(size);
            enc.copy_buffer_to_buffer(&buffers[i], 0, &s, 0, size);
            staging.push((i, s));
        }
        let ts_len = 16 * once.len() as u64;
        if let Some((set, resolve, ts_staging)) = &queries
            && !once.is_empty()
        {
            enc.resolve_query_set(set, 0..2 * once.len() as u32, resolve, 0);
            enc.copy_buffer_to_buffer(resolve, 0, ts_staging, 0, ts_len);
        }
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let submit_at = Instant::now();
        self.queue.submit([enc.finish()]);
        if let Some(e) = super::adapter::block_on(scope.pop())? {
            return Err(ExecError::Gpu(e.to_string()));
        }
        let mut reads: Vec<(&wgpu::Buffer, u64)> = staging
            .iter()
            .map(|(i, s)| (s, spec.buffers[*i].size))
            .collect();
        let with_ts = !once.is_empty() && queries.is_some();
        if let (true, Some((_, _, ts_staging))) = (with_ts, &queries) {
            reads.push((ts_staging, ts_len));
        }
        let mut got = self.read_staging(&reads, started, limit)?;
        let wall_gpu = submit_at.elapsed() + loop_wall;
        let ts = if with_ts { got.pop() } else { None };
        let outputs = staging
            .iter()
            .zip(got)
            .map(|((i, _), bytes)| OutputBuffer {
                name: spec.buffers[*i].name.clone(),
                id: super::content_id(&bytes),
                bytes,
            })
            .collect();
        let mut passes: Vec<PassTiming> = match &ts {
            Some(ticks) => once
                .iter()
                .enumerate()
                .map(|(k, &pi)| PassTiming {
                    entry: spec.passes[pi].entry.clone(),
                    gpu_ms: u64_at(ticks, 16 * k + 8).saturating_sub(u64_at(ticks, 16 * k)) as f64
                        * period
                        / 1e6,
                })
                .collect(),
            None => Vec::new(),
        };
        if queries.is_some() {
            passes.extend(pass_times);
        }
        let gpu_ms = if queries.is_none() {
            wall_gpu.as_secs_f64() * 1e3
        } else {
            passes.iter().map(|p| p.gpu_ms).sum()
        };
        // Everything this job submitted has completed and its outputs are copied out.
        for (i, size, usage) in recyclable {
            self.pool.put(size, usage, buffers[i].clone());
        }
        Ok(JobOutput {
            outputs,
            passes,
            gpu_ms,
            wall_ms: started.elapsed().as_secs_f64() * 1e3,
            iterations,
            uploaded_bytes: upload.uploaded_bytes,
            resident_hits: upload.resident_hits,
            resident_bytes: upload.resident_bytes,
            reused_buffers: upload.reused_buffers,
        })
    }
}

/// Copies the texels of `texture`, made from `range` of `buffer` (whole rows of
/// [`texture_shape`]'s width, then a partial last row), back into that range.
fn texture_to_buffer(
    enc: &mut wgpu::CommandEncoder,
    texture: &wgpu::Texture,
    buffer: &wgpu::Buffer,
    range: BufferRange,
) {
    for run in texel_runs(range) {
        enc.copy_texture_to_buffer(
            run.texture_side(texture),
            run.buffer_side(buffer),
            run.extent(),
        );
    }
}

/// One copy between a buffer range and the texture made from it ([`texel_runs`]).
#[derive(Debug, Clone, Copy)]
struct TexelRun {
    /// Byte offset in the buffer.
    offset: u64,
    /// First texture row.
    y: u32,
    /// Texels a row (the texture's width).
    width: u32,
    /// Texels of each copied row.
    texels: u32,
    /// Rows copied.
    rows: u32,
}

impl TexelRun {
    fn buffer_side<'a>(&self, buffer: &'a wgpu::Buffer) -> wgpu::TexelCopyBufferInfo<'a> {
        wgpu::TexelCopyBufferInfo {
            buffer,
            layout: wgpu::TexelCopyBufferLayout {
                offset: self.offset,
                // Needed (and 256-aligned, as `width · 16` is once a binding fills a row) only
                // for several rows; a binding shorter than one row is one row of any width.
                bytes_per_row: (self.rows > 1).then_some(self.width * 16),
                rows_per_image: None,
            },
        }
    }

    fn texture_side<'a>(&self, texture: &'a wgpu::Texture) -> wgpu::TexelCopyTextureInfo<'a> {
        wgpu::TexelCopyTextureInfo {
            texture,
            mip_level: 0,
            origin: wgpu::Origin3d {
                x: 0,
                y: self.y,
                z: 0,
            },
            aspect: wgpu::TextureAspect::All,
        }
    }

    fn extent(&self) -> wgpu::Extent3d {
        wgpu::Extent3d {
            width: self.texels,
            height: self.rows,
            depth_or_array_layers: 1,
        }
    }
}

/// The copies between `range` of a buffer and the texture made from it: the whole rows of
/// [`texture_shape`]'s width, then the partial last row, skipping either when empty.
fn texel_runs(range: BufferRange) -> impl Iterator<Item = TexelRun> {
    let (width, _) = texture_shape(range.size);
    let row_bytes = u64::from(width) * 16;
    let full = (range.size / row_bytes) as u32;
    let tail = ((range.size % row_bytes) / 16) as u32;
    [
        (range.offset, 0, width, full),
        (range.offset + u64::from(full) * row_bytes, full, tail, 1),
    ]
    .into_iter()
    .filter(|&(_, _, texels, rows)| texels != 0 && rows != 0)
    .map(move |(offset, y, texels, rows)| TexelRun {
        offset,
        y,
        width,
        texels,
        rows,
    })
}
/// Size of the buffer that stands in for one only ever used as a texture ([`texture_only`]).
const BUFFER_PLACEHOLDER: u64 = 16;

/// Whether buffer `i` is only ever a zero-initialised texture: written as a texture (so every
/// pass binds it as one), zeroed at the start and not an output.
fn texture_only(spec: &JobSpec, checked: &CheckedJob, i: usize) -> bool {
    let b = &spec.buffers[i];
    checked.texture_written[i] && matches!(b.init, BufferInit::Zeroed) && !b.output
}
