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

/// Default largest buffer: 256 MiB, the WebGPU default `maxStorageBufferBindingSize` is
/// 128 MiB and most desktop GPUs allow several GiB; 256 MiB keeps one job from monopolising a
/// shared GPU while fitting real inference layers.
pub const DEFAULT_MAX_BUFFER_BYTES: u64 = 256 * 1024 * 1024;

/// Default largest total of all buffers in one job: 1 GiB.
pub const DEFAULT_MAX_JOB_BYTES: u64 = 1024 * 1024 * 1024;

/// Default most passes in one job. Neural-network inference pipelines are tens of passes.
pub const DEFAULT_MAX_PASSES: u32 = 256;

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

/// `@group(0) @binding(binding)` is bound to `buffers[buffer]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Binding {
    /// The binding number in the shader.
    pub binding: u32,
    /// Index into [`JobSpec::buffers`].
    pub buffer: u32,
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
            if b.name.is_empty() || b.name.len() > MAX_STRING_LEN {
                return err(format!(
                    "buffer {i}: name must be 1-{MAX_STRING_LEN} characters"
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
        Ok(())
    }
}
