//! Job specs: one or more compute passes over named buffers, and the limits they must meet.

use serde::{Deserialize, Serialize};

use crate::codec::{self, DecodeError};
use crate::id::ContentId;
use crate::limits::{MAX_MESSAGE_BYTES, MAX_STRING_LEN};

/// Most buffers in one job. wgpu's default limit of storage buffers per stage is 8; a job can
/// hold more buffers than one pass binds.
pub const MAX_BUFFERS: usize = 256;

/// Most distinct shader sources in one job.
pub const MAX_SHADERS: usize = 64;

/// Most bindings in one pass.
pub const MAX_BINDINGS_PER_PASS: usize = 32;

/// Default largest buffer: 16 GiB, which in practice leaves the bound to the adapter: an
/// executor also caps each buffer at its adapter's `max_buffer_size` (WebGPU's default is
/// 256 MiB, desktop GPUs allow several GiB), and a site can set a lower cap. Model files have
/// tensors well over 256 MiB (a 128k-token vocabulary's embedding at 6 bits is 430 MB).
pub const DEFAULT_MAX_BUFFER_BYTES: u64 = 16 * 1024 * 1024 * 1024;

/// Default largest total of all buffers in one job: 64 GiB, enough for the weights of a
/// quantised 70B-parameter model. An executor also caps it at the memory its site declares
/// (`memory_bytes`), and a site can set a lower cap.
pub const DEFAULT_MAX_JOB_BYTES: u64 = 64 * 1024 * 1024 * 1024;

/// Default most passes in one job (a loop body counts once). A compiled language model is about
/// ten passes per layer plus a few: a 32-layer model with its prompt and sampling passes fits
/// well inside 1024.
pub const DEFAULT_MAX_PASSES: u32 = 1024;

/// Default most dispatches one job may run in all, loop iterations counted: 2^22. Token
/// generation runs a ~300-pass body once per token; 4096 tokens of a 32-layer model are about
/// 1.4 million dispatches. The wall-clock limit bounds the time; this bounds the encoding work
/// a spec can ask for before it runs.
pub const DEFAULT_MAX_DISPATCHES: u64 = 1 << 22;

/// Most loops in one job.
pub const MAX_LOOPS: usize = 16;

/// Most buffers one loop streams back while it runs.
pub const MAX_STREAMED: usize = 8;

/// Alignment of a bound buffer range's offset: WebGPU's `minStorageBufferOffsetAlignment` and
/// `minUniformBufferOffsetAlignment` are at most 256 on every adapter, so a spec that uses
/// multiples of 256 binds anywhere.
pub const RANGE_ALIGN: u64 = 256;

/// Texels per row when a shader reads a buffer as a texture. A binding the shader declares as
/// `texture_2d<u32>` (or `texture_storage_2d<rgba32uint, read>`, the same texture without mip
/// levels or a sampler) sees the bound bytes as an `rgba32uint` texture, 16 bytes per texel,
/// [`TEXTURE_ROW_TEXELS`] texels per row (fewer when the whole binding is shorter than a row):
/// texel `i` (bytes `16·i..16·i + 16`) is at `(i % TEXTURE_ROW_TEXELS, i / TEXTURE_ROW_TEXELS)`.
/// It is a read-only snapshot of the bytes as the job starts, so no pass may write a buffer
/// that a pass reads as a texture, except as a texture: a buffer some pass binds as
/// `texture_storage_2d<rgba32uint, write>` is a texture for the whole job (every pass binds it
/// as one, each bound range its own texture, ranges identical or disjoint; later passes see
/// earlier writes; not a loop's counter, stop flag or stream; as an output, copied back at
/// the end). On CPU adapters (lavapipe) a texel fetch costs a fraction
/// of a storage-buffer load, which makes weight-bound kernels several times faster.
pub const TEXTURE_ROW_TEXELS: u64 = 4096;

/// Most rows of a buffer-as-texture binding: WebGPU's guaranteed `maxTextureDimension2D`, so a
/// spec within it binds on every adapter (`TEXTURE_ROW_TEXELS · 16 · 8192` = 512 MiB).
pub const MAX_TEXTURE_ROWS: u64 = 8192;

/// Most buffer-as-texture bindings in one pass: WebGPU's guaranteed
/// `maxSampledTexturesPerShaderStage`.
pub const MAX_TEXTURES_PER_PASS: usize = 16;

/// Most buffers one pass reads as `texture_storage_2d<rgba32uint, read>`: WebGPU's
/// guaranteed `maxStorageTexturesPerShaderStage`.
pub const MAX_STORAGE_TEXTURES_PER_PASS: usize = 4;

/// Default most workgroups in one dimension of a dispatch: WebGPU's guaranteed minimum.
pub const DEFAULT_MAX_WORKGROUPS_PER_DIM: u32 = 65_535;

/// Default most workgroups in one dispatch (x·y·z): 2^24, enough for a 4096² matmul in
/// 16×16 tiles 64 times over, small enough to bound a single dispatch.
pub const DEFAULT_MAX_WORKGROUPS_PER_DISPATCH: u64 = 1 << 24;

/// Default wall-clock limit for one job: 60 s. Inference requests are sub-second; a minute
/// catches runaway shaders without cutting off real batch work.
pub const DEFAULT_MAX_JOB_MS: u64 = 60_000;

/// Execution limits. The defaults are the constants above; a site can lower each in config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct JobLimits {
    /// Largest buffer, in bytes.
    pub max_buffer_bytes: u64,
    /// Largest total of all buffers, in bytes.
    pub max_job_bytes: u64,
    /// Most passes.
    pub max_passes: u32,
    /// Most workgroups in one dimension.
    pub max_workgroups_per_dim: u32,
    /// Most workgroups in one dispatch.
    pub max_workgroups_per_dispatch: u64,
    /// Wall-clock limit for a whole job, in milliseconds.
    pub max_job_ms: u64,
    /// Most dispatches in all, loop iterations counted.
    pub max_dispatches: u64,
}

impl Default for JobLimits {
    fn default() -> Self {
        JobLimits {
            max_buffer_bytes: DEFAULT_MAX_BUFFER_BYTES,
            max_job_bytes: DEFAULT_MAX_JOB_BYTES,
            max_passes: DEFAULT_MAX_PASSES,
            max_workgroups_per_dim: DEFAULT_MAX_WORKGROUPS_PER_DIM,
            max_workgroups_per_dispatch: DEFAULT_MAX_WORKGROUPS_PER_DISPATCH,
            max_job_ms: DEFAULT_MAX_JOB_MS,
            max_dispatches: DEFAULT_MAX_DISPATCHES,
        }
    }
}

impl JobLimits {
    /// The tighter of two limit sets, field by field (site config can only lower limits).
    pub fn min(self, other: JobLimits) -> JobLimits {
        JobLimits {
            max_buffer_bytes: self.max_buffer_bytes.min(other.max_buffer_bytes),
            max_job_bytes: self.max_job_bytes.min(other.max_job_bytes),
            max_passes: self.max_passes.min(other.max_passes),
            max_workgroups_per_dim: self
                .max_workgroups_per_dim
                .min(other.max_workgroups_per_dim),
            max_workgroups_per_dispatch: self
                .max_workgroups_per_dispatch
                .min(other.max_workgroups_per_dispatch),
            max_job_ms: self.max_job_ms.min(other.max_job_ms),
            max_dispatches: self.max_dispatches.min(other.max_dispatches),
        }
    }
}

/// How a buffer starts.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BufferInit {
    /// All zeros.
    Zeroed,
    /// The bytes of an input blob (its length is the buffer's size).
    Blob(ContentId),
}

/// A named buffer.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BufferSpec {
    /// Name (the key in the job file's `[buffers]`).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Initial contents.
    pub init: BufferInit,
    /// Whether it is returned to the buyer after the last pass.
    pub output: bool,
}

/// A WGSL source.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ShaderSource {
    /// Where it came from (a file name), for error messages.
    pub name: String,
    /// WGSL text.
    pub wgsl: String,
}

/// `@group(0) @binding(binding)` is bound to `buffers[buffer]`, or to a byte range of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Binding {
    /// The binding number in the shader.
    pub binding: u32,
    /// Index into [`JobSpec::buffers`].
    pub buffer: u32,
    /// The bytes bound; `None` binds the whole buffer. Lets one buffer hold many tensors (a
    /// model layer's weights, every layer's KV cache) that passes bind one at a time.
    pub range: Option<BufferRange>,
}

impl Binding {
    /// Binds the whole buffer.
    pub fn whole(binding: u32, buffer: u32) -> Binding {
        Binding {
            binding,
            buffer,
            range: None,
        }
    }
}

/// A byte range of a buffer: `offset` a multiple of [`RANGE_ALIGN`], `size` a non-zero multiple
/// of 4, inside the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BufferRange {
    /// First byte.
    pub offset: u64,
    /// Length in bytes.
    pub size: u64,
}

/// A group of consecutive passes run up to `max_iters` times, e.g. one decoding step of a
/// language model per iteration.
///
/// Before each iteration the executor writes the iteration number (a `u32`, from 0) into the
/// first four bytes of `counter`, so shaders know the step. Every `check_every` iterations (and
/// at the end) it reads `stop` back: a non-zero first `u32` ends the loop early (end of
/// sequence), and the buffers in `stream` are read back and handed to the caller while the job
/// goes on (tokens as they are generated). Passes before and after the loop run once.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LoopSpec {
    /// Index of the body's first pass in [`JobSpec::passes`].
    pub first: u32,
    /// Passes in the body (at least 1).
    pub len: u32,
    /// Most iterations (at least 1).
    pub max_iters: u32,
    /// Buffer that receives the iteration number.
    pub counter: Option<u32>,
    /// Buffer whose first `u32`, when non-zero, stops the loop.
    pub stop: Option<u32>,
    /// Iterations between stop checks and stream readbacks (at least 1). Each check waits for
    /// the GPU, so larger values trade latency for throughput.
    pub check_every: u32,
    /// Output buffers read back at every check.
    pub stream: Vec<u32>,
}

/// One compute dispatch.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PassSpec {
    /// Index into [`JobSpec::shaders`].
    pub shader: u32,
    /// Entry point name.
    pub entry: String,
    /// Workgroup counts (x, y, z).
    pub workgroups: [u32; 3],
    /// Bindings, sorted by binding number.
    pub bindings: Vec<Binding>,
}

/// A job: passes run in order on one device and share buffers.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct JobSpec {
    /// A name for people.
    pub name: String,
    /// Buffers.
    pub buffers: Vec<BufferSpec>,
    /// Shader sources.
    pub shaders: Vec<ShaderSource>,
    /// Passes, in order.
    pub passes: Vec<PassSpec>,
    /// Loops over ranges of `passes`, in pass order, not overlapping.
    pub loops: Vec<LoopSpec>,
}

/// A job spec breaks a structural rule or a limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JobSpecError {
    /// No passes, too many passes, or too many buffers/shaders.
    #[error("{0}")]
    Shape(String),
    /// A buffer is empty, over the size limit, or the total is.
    #[error("{0}")]
    Size(String),
    /// A pass refers to a buffer or shader that does not exist, or binds one number twice.
    #[error("{0}")]
    Reference(String),
    /// A dispatch is too large.
    #[error("{0}")]
    Workgroups(String),
}

impl JobSpec {
    /// The content id of the canonical encoding: what agreements and receipts name.
    pub fn id(&self) -> ContentId {
        ContentId::of(&self.encode())
    }

    /// The canonical encoding.
    pub fn encode(&self) -> Vec<u8> {
        codec::encode(self)
    }

    /// Decodes untrusted bytes (at most [`MAX_MESSAGE_BYTES`]). Run [`JobSpec::validate`] next.
    pub fn decode(bytes: &[u8]) -> Result<JobSpec, DecodeError> {
        codec::decode(bytes, MAX_MESSAGE_BYTES, "job spec")
    }

    /// Total bytes of all buffers (saturating).
    pub fn total_bytes(&self) -> u64 {
        self.buffers
            .iter()
            .fold(0u64, |acc, b| acc.saturating_add(b.size))
    }

    /// The input blobs this job needs, in buffer order, without repeats.
    pub fn input_ids(&self) -> Vec<ContentId> {
        let mut ids = Vec::new();
        for b in &self.buffers {
            if let BufferInit::Blob(id) = b.init
                && !ids.contains(&id)
            {
                ids.push(id);
            }
        }
        ids
    }

    /// Checks structure and `limits`. Shader validation (naga) is the executor's job.
    pub fn validate(&self, limits: &JobLimits) -> Result<(), JobSpecError> {
        let err = |s: String| Err(JobSpecError::Shape(s));
        let encoded = self.encode().len();
        if encoded > MAX_MESSAGE_BYTES {
            return err(format!(
                "the job spec is {encoded} bytes encoded, over the limit of {MAX_MESSAGE_BYTES} \
                 (shader sources travel in the spec; data belongs in input blobs)"
            ));
        }
        if self.name.is_empty() || self.name.len() > MAX_STRING_LEN {
            return err(format!("job name must be 1-{MAX_STRING_LEN} characters"));
        }
        if self.passes.is_empty() {
            return err("a job needs at least one [[pass]]".into());
        }
        if self.passes.len() > limits.max_passes as usize {
            return err(format!(
                "{} passes is over the limit of {}",
                self.passes.len(),
                limits.max_passes
            ));
        }
        if self.buffers.len() > MAX_BUFFERS {
            return err(format!(
                "{} buffers is over the limit of {MAX_BUFFERS}",
                self.buffers.len()
            ));
        }
        if self.shaders.len() > MAX_SHADERS {
            return err(format!(
                "{} shaders is over the limit of {MAX_SHADERS}",
                self.shaders.len()
            ));
        }
        if !self.buffers.iter().any(|b| b.output) {
            return err("no buffer is marked `output = true`: the job would return nothing".into());
        }
        for (i, b) in self.buffers.iter().enumerate() {
            if !crate::validate::is_plain_name(&b.name) {
                return err(format!(
                    "buffer {i}: name {:?} is not a plain name (1-{MAX_STRING_LEN} characters of letters, digits, `_`, `-` and `.`, not starting with `.`): outputs are written to files by name",
                    b.name
                ));
            }
            if self.buffers[..i].iter().any(|o| o.name == b.name) {
                return err(format!("buffer name {:?} appears twice", b.name));
            }
            if b.size == 0 {
                return Err(JobSpecError::Size(format!("buffer {:?} is empty", b.name)));
            }
            if b.size > limits.max_buffer_bytes {
                return Err(JobSpecError::Size(format!(
                    "buffer {:?} is {} bytes, over the limit of {} bytes per buffer",
                    b.name, b.size, limits.max_buffer_bytes
                )));
            }
        }
        let total = self.total_bytes();
        if total > limits.max_job_bytes {
            return Err(JobSpecError::Size(format!(
                "the job's buffers total {total} bytes, over the limit of {} bytes per job",
                limits.max_job_bytes
            )));
        }
        for s in &self.shaders {
            if s.name.is_empty() || s.name.len() > MAX_STRING_LEN {
                return err(format!("shader name must be 1-{MAX_STRING_LEN} characters"));
            }
        }
        for (p, pass) in self.passes.iter().enumerate() {
            let pass_no = p + 1;
            if pass.shader as usize >= self.shaders.len() {
                return Err(JobSpecError::Reference(format!(
                    "pass {pass_no}: shader index {} does not exist",
                    pass.shader
                )));
            }
            if pass.entry.is_empty() || pass.entry.len() > MAX_STRING_LEN {
                return err(format!(
                    "pass {pass_no}: entry point name must be 1-{MAX_STRING_LEN} characters"
                ));
            }
            if pass.bindings.len() > MAX_BINDINGS_PER_PASS {
                return err(format!(
                    "pass {pass_no}: {} bindings is over the limit of {MAX_BINDINGS_PER_PASS}",
                    pass.bindings.len()
                ));
            }
            for (i, b) in pass.bindings.iter().enumerate() {
                if b.buffer as usize >= self.buffers.len() {
                    return Err(JobSpecError::Reference(format!(
                        "pass {pass_no}: binding {} refers to buffer index {}, which does not exist",
                        b.binding, b.buffer
                    )));
                }
                if let Some(r) = b.range {
                    let size = self.buffers[b.buffer as usize].size;
                    let ok = r.offset % RANGE_ALIGN == 0
                        && r.size > 0
                        && r.size % 4 == 0
                        && r.offset
                            .checked_add(r.size)
                            .is_some_and(|end| end <= size.next_multiple_of(4));
                    if !ok {
                        return Err(JobSpecError::Reference(format!(
                            "pass {pass_no}: binding {} binds bytes {}..+{} of buffer {:?} ({size} bytes): a range must start at a multiple of {RANGE_ALIGN}, have a non-zero size that is a multiple of 4, and lie inside the buffer",
                            b.binding, r.offset, r.size, self.buffers[b.buffer as usize].name
                        )));
                    }
                }
                if pass.bindings[..i].iter().any(|o| o.binding == b.binding) {
                    return Err(JobSpecError::Reference(format!(
                        "pass {pass_no}: binding {} is bound twice",
                        b.binding
                    )));
                }
            }
            let [x, y, z] = pass.workgroups;
            if x == 0 || y == 0 || z == 0 {
                return Err(JobSpecError::Workgroups(format!(
                    "pass {pass_no}: workgroups {:?} has a zero dimension",
                    pass.workgroups
                )));
            }
            if pass
                .workgroups
                .iter()
                .any(|&d| d > limits.max_workgroups_per_dim)
            {
                return Err(JobSpecError::Workgroups(format!(
                    "pass {pass_no}: workgroups {:?} is over the limit of {} per dimension",
                    pass.workgroups, limits.max_workgroups_per_dim
                )));
            }
            let count = u64::from(x) * u64::from(y) * u64::from(z);
            if count > limits.max_workgroups_per_dispatch {
                return Err(JobSpecError::Workgroups(format!(
                    "pass {pass_no}: {count} workgroups is over the limit of {} per dispatch",
                    limits.max_workgroups_per_dispatch
                )));
            }
        }
        self.validate_loops(limits)
    }

    /// Dispatches the job runs at most: passes outside loops once, loop bodies `max_iters`
    /// times (saturating).
    pub fn max_dispatches(&self) -> u64 {
        let in_loops: u64 = self.loops.iter().map(|l| u64::from(l.len)).sum();
        let once = (self.passes.len() as u64).saturating_sub(in_loops);
        self.loops.iter().fold(once, |acc, l| {
            acc.saturating_add(u64::from(l.len).saturating_mul(u64::from(l.max_iters)))
        })
    }

    fn validate_loops(&self, limits: &JobLimits) -> Result<(), JobSpecError> {
        let shape = |s: String| Err(JobSpecError::Shape(s));
        if self.loops.len() > MAX_LOOPS {
            return shape(format!(
                "{} loops is over the limit of {MAX_LOOPS}",
                self.loops.len()
            ));
        }
        let mut next_free = 0u64;
        for (i, l) in self.loops.iter().enumerate() {
            let n = i + 1;
            let first = u64::from(l.first);
            let end = first + u64::from(l.len);
            if l.len == 0 || end > self.passes.len() as u64 {
                return shape(format!(
                    "loop {n}: passes {}..{end} are not a non-empty range of the job's {} passes",
                    l.first,
                    self.passes.len()
                ));
            }
            if first < next_free {
                return shape(format!(
                    "loop {n} starts at pass {} inside the previous loop: loops must be in pass order and not overlap",
                    l.first
                ));
            }
            next_free = end;
            if l.max_iters == 0 {
                return shape(format!("loop {n}: max_iters must be at least 1"));
            }
            if l.check_every == 0 {
                return shape(format!("loop {n}: check_every must be at least 1"));
            }
            if l.stream.len() > MAX_STREAMED {
                return shape(format!(
                    "loop {n} streams {} buffers, over the limit of {MAX_STREAMED}",
                    l.stream.len()
                ));
            }
            for (what, buf) in [("counter", l.counter), ("stop", l.stop)] {
                if let Some(b) = buf {
                    match self.buffers.get(b as usize) {
                        None => {
                            return Err(JobSpecError::Reference(format!(
                                "loop {n}: {what} buffer index {b} does not exist"
                            )));
                        }
                        Some(spec) if spec.size < 4 => {
                            return Err(JobSpecError::Size(format!(
                                "loop {n}: {what} buffer {:?} must hold at least one u32",
                                spec.name
                            )));
                        }
                        Some(_) => {}
                    }
                }
            }
            for &b in &l.stream {
                match self.buffers.get(b as usize) {
                    None => {
                        return Err(JobSpecError::Reference(format!(
                            "loop {n}: streamed buffer index {b} does not exist"
                        )));
                    }
                    Some(spec) if !spec.output => {
                        return Err(JobSpecError::Reference(format!(
                            "loop {n}: streamed buffer {:?} is not an output",
                            spec.name
                        )));
                    }
                    Some(_) => {}
                }
            }
        }
        let total = self.max_dispatches();
        if total > limits.max_dispatches {
            return Err(JobSpecError::Workgroups(format!(
                "the job runs up to {total} dispatches, over the limit of {}",
                limits.max_dispatches
            )));
        }
        Ok(())
    }
}
