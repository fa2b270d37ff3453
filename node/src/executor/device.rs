//! One wgpu device and the code that runs a checked job on it: buffers, pipelines (cached),
//! passes with timestamp queries, readback and hashing.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hashgrid_protocol::{BufferInit, ContentId, JobSpec};

use super::validate::CheckedJob;
use super::{ExecError, JobOutput, OutputBuffer, PassTiming};

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
}

impl GpuDevice {
    /// Opens a device on `adapter` with the adapter's own limits.
    pub(crate) fn open(adapter: &wgpu::Adapter, cache_size: usize) -> Result<Self, ExecError> {
        let timestamps = adapter.features().contains(wgpu::Features::TIMESTAMP_QUERY);
        let desc = wgpu::DeviceDescriptor {
            label: Some("hashgrid executor"),
            required_features: if timestamps {
                wgpu::Features::TIMESTAMP_QUERY
            } else {
                wgpu::Features::empty()
            },
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
            cache_size,
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

    /// Runs a checked job. `deadline` is when it must have finished. On `Timeout` or `Gpu`
    /// errors the caller must abandon this device.
    pub(crate) fn run(
        &mut self,
        spec: &JobSpec,
        checked: &CheckedJob,
        inputs: &BTreeMap<ContentId, Vec<u8>>,
        started: Instant,
        limit: Duration,
    ) -> Result<JobOutput, ExecError> {
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let usage = wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::UNIFORM
            | wgpu::BufferUsages::COPY_SRC
            | wgpu::BufferUsages::COPY_DST;
        let mut buffers = Vec::with_capacity(spec.buffers.len());
        for (b, &alloc) in spec.buffers.iter().zip(&checked.alloc_sizes) {
            let buf = self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(&b.name),
                size: alloc,
                usage,
                mapped_at_creation: false,
            });
            // New buffers are zeroed by wgpu; only blobs need writing.
            if let BufferInit::Blob(id) = &b.init
                && let Some(bytes) = inputs.get(id)
            {
                let aligned = bytes.len() & !3;
                if aligned > 0 {
                    self.queue.write_buffer(&buf, 0, &bytes[..aligned]);
                }
                if aligned < bytes.len() {
                    let mut tail = [0u8; 4];
                    tail[..bytes.len() - aligned].copy_from_slice(&bytes[aligned..]);
                    self.queue.write_buffer(&buf, aligned as u64, &tail);
                }
            }
            buffers.push(buf);
        }
        let mut pipelines = Vec::with_capacity(spec.passes.len());
        for p in &spec.passes {
            let key = (checked.shader_hashes[p.shader as usize], p.entry.clone());
            pipelines.push(self.pipeline(key, &spec.shaders[p.shader as usize].wgsl)?);
        }
        let n = spec.passes.len() as u32;
        let queries = if self.timestamps {
            let set = self.device.create_query_set(&wgpu::QuerySetDescriptor {
                label: None,
                ty: wgpu::QueryType::Timestamp,
                count: 2 * n,
            });
            let resolve = self.device.create_buffer(&wgpu::BufferDescriptor {
                label: None,
                size: 16 * u64::from(n),
                usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            });
            Some((set, resolve))
        } else {
            None
        };
        let mut enc = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
        for (i, (p, cp)) in spec.passes.iter().zip(&checked.passes).enumerate() {
            let pipeline = &pipelines[i];
            let layout = pipeline.get_bind_group_layout(0);
            let entries: Vec<wgpu::BindGroupEntry<'_>> = cp
                .bindings
                .iter()
                .map(|&(binding, buf)| wgpu::BindGroupEntry {
                    binding,
                    resource: buffers[buf].as_entire_binding(),
                })
                .collect();
            let bg = if entries.is_empty() {
                None
            } else {
                Some(self.device.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: None,
                    layout: &layout,
                    entries: &entries,
                }))
            };
            let tw = queries
                .as_ref()
                .map(|(set, _)| wgpu::ComputePassTimestampWrites {
                    query_set: set,
                    beginning_of_pass_write_index: Some(2 * i as u32),
                    end_of_pass_write_index: Some(2 * i as u32 + 1),
                });
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: None,
                timestamp_writes: tw,
            });
            pass.set_pipeline(pipeline);
            if let Some(bg) = &bg {
                pass.set_bind_group(0, bg, &[]);
            }
            let [x, y, z] = p.workgroups;
            pass.dispatch_workgroups(x, y, z);
        }
        let mut staging = Vec::new();
        for (i, b) in spec.buffers.iter().enumerate() {
            if !b.output {
                continue;
            }
            let size = checked.alloc_sizes[i];
            let s = self.device.create_buffer(&wgpu::BufferDescriptor {
                label: None,
                size,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            enc.copy_buffer_to_buffer(&buffers[i], 0, &s, 0, size);
            staging.push((i, s));
        }
        let ts_staging = queries.as_ref().map(|(set, resolve)| {
            enc.resolve_query_set(set, 0..2 * n, resolve, 0);
            let s = self.device.create_buffer(&wgpu::BufferDescriptor {
                label: None,
                size: 16 * u64::from(n),
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            enc.copy_buffer_to_buffer(resolve, 0, &s, 0, 16 * u64::from(n));
            s
        });
        let submit_at = Instant::now();
        self.queue.submit([enc.finish()]);
        if let Some(e) = super::adapter::block_on(scope.pop())? {
            return Err(ExecError::Gpu(e.to_string()));
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let all: Vec<&wgpu::Buffer> = staging
            .iter()
            .map(|(_, s)| s)
            .chain(ts_staging.as_ref())
            .collect();
        for s in &all {
            let tx = tx.clone();
            s.slice(..).map_async(wgpu::MapMode::Read, move |r| {
                let _ = tx.send(r.is_ok());
            });
        }
        let remaining = limit.saturating_sub(started.elapsed());
        match self.device.poll(wgpu::PollType::Wait {
            submission_index: None,
            timeout: Some(remaining),
        }) {
            Ok(_) => {}
            Err(wgpu::PollError::Timeout) => {
                return Err(ExecError::Timeout {
                    limit_ms: limit.as_millis() as u64,
                });
            }
            Err(e) => return Err(ExecError::Gpu(e.to_string())),
        }
        let wall_gpu = submit_at.elapsed();
        for _ in &all {
            if !rx.try_recv().unwrap_or(false) {
                return Err(ExecError::Gpu("mapping a readback buffer failed".into()));
            }
        }
        if let Ok(mut errs) = self.uncaptured.lock()
            && !errs.is_empty()
        {
            let msg = errs.join("; ");
            errs.clear();
            return Err(ExecError::Gpu(msg));
        }
        let mut outputs = Vec::with_capacity(staging.len());
        for (i, s) in &staging {
            let b = &spec.buffers[*i];
            let bytes = {
                let view = s
                    .slice(..)
                    .get_mapped_range()
                    .map_err(|e| ExecError::Gpu(format!("reading back {:?}: {e}", b.name)))?;
                view[..b.size as usize].to_vec()
            };
            s.unmap();
            outputs.push(OutputBuffer {
                name: b.name.clone(),
                id: ContentId::of(&bytes),
                bytes,
            });
        }
        let passes = match &ts_staging {
            Some(s) => {
                let period = f64::from(self.queue.get_timestamp_period());
                let ticks: Vec<u64> = {
                    let view = s
                        .slice(..)
                        .get_mapped_range()
                        .map_err(|e| ExecError::Gpu(format!("reading timestamps: {e}")))?;
                    view.chunks_exact(8)
                        .map(|c| {
                            let mut a = [0u8; 8];
                            a.copy_from_slice(c);
                            u64::from_le_bytes(a)
                        })
                        .collect()
                };
                s.unmap();
                spec.passes
                    .iter()
                    .enumerate()
                    .map(|(i, p)| PassTiming {
                        entry: p.entry.clone(),
                        gpu_ms: ticks[2 * i + 1].saturating_sub(ticks[2 * i]) as f64 * period / 1e6,
                    })
                    .collect()
            }
            None => Vec::new(),
        };
        let gpu_ms = if passes.is_empty() {
            wall_gpu.as_secs_f64() * 1e3
        } else {
            passes.iter().map(|p| p.gpu_ms).sum()
        };
        Ok(JobOutput {
            outputs,
            passes,
            gpu_ms,
            wall_ms: started.elapsed().as_secs_f64() * 1e3,
        })
    }
}
