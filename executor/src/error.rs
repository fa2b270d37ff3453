//! The executor's error type.

use hashgrid_protocol::JobSpecError;

/// Why a job was rejected or failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExecError {
    /// No usable adapter.
    #[error(
        "no GPU adapter found{0}: install a Vulkan driver, e.g. Mesa's lavapipe with `apt-get install mesa-vulkan-drivers`"
    )]
    NoAdapter(String),
    /// The adapter refused to open a device.
    #[error("could not open a device on adapter {adapter}: {reason}")]
    Device {
        /// Adapter name.
        adapter: String,
        /// What wgpu said.
        reason: String,
    },
    /// The job spec breaks a structural rule or a limit.
    #[error("job rejected: {0}")]
    Spec(#[from] JobSpecError),
    /// A limit of the executor or the adapter.
    #[error("job rejected: {0}")]
    Limit(String),
    /// WGSL does not parse.
    #[error("{file}:{line}:{column}: WGSL parse error: {message}")]
    Parse {
        /// Shader file name.
        file: String,
        /// 1-based line (0 if unknown).
        line: u32,
        /// 1-based column (0 if unknown).
        column: u32,
        /// naga's message.
        message: String,
    },
    /// WGSL parses but is not a valid module.
    #[error("{file}: invalid shader: {message}")]
    Shader {
        /// Shader file name.
        file: String,
        /// What is wrong.
        message: String,
    },
    /// A pass's bindings do not match its shader.
    #[error("pass {pass} ({file}:{entry}): {message}")]
    Binding {
        /// 0-based pass index.
        pass: usize,
        /// Shader file name.
        file: String,
        /// Entry point.
        entry: String,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// An input blob is missing or its bytes do not hash to its id.
    #[error("buffer {buffer:?}: {message}")]
    Input {
        /// Buffer name.
        buffer: String,
        /// What is wrong.
        message: String,
    },
    /// The job ran past its wall-clock limit and was stopped; the device was replaced.
    #[error(
        "job timed out after {limit_ms} ms (limit max_job_ms); its device was abandoned and replaced"
    )]
    Timeout {
        /// The limit it ran past.
        limit_ms: u64,
    },
    /// The device was lost or wgpu reported an error while running; the device was replaced.
    #[error("GPU error while running the job (device replaced): {0}")]
    Gpu(String),
    /// The queue is full: too many jobs are waiting.
    #[error("executor queue is full ({0} jobs waiting): retry later or raise queue_depth")]
    QueueFull(usize),
    /// The executor was shut down.
    #[error("executor is shut down")]
    Shutdown,
    /// Reading or writing the benchmark cache.
    #[error("benchmark cache {path}: {reason}")]
    Cache {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
}
