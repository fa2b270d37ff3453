//! The start-up benchmark that goes into capacity ads: GFLOP/s of the reference tiled f32
//! matmul and GB/s of a copy kernel, cached per adapter in the data dir.

use std::collections::BTreeMap;
use std::path::Path;

use hashgrid_protocol::{
    Benchmark, Binding, BufferInit, BufferSpec, ContentId, GpuProfile, JobSpec, PassSpec,
    ShaderSource,
};

use super::{ExecError, Executor, JobOutput};

/// The reference tiled matmul (the same WGSL as `examples/kernels/matmul`).
pub const MATMUL_WGSL: &str = include_str!("../../examples/kernels/matmul/matmul.wgsl");

/// A copy kernel: one u32 per invocation, 256 per workgroup, 2D grid for large buffers.
pub const COPY_WGSL: &str = "
@group(0) @binding(0) var<storage, read> src: array<vec4<u32>>;
@group(0) @binding(1) var<storage, read_write> dst: array<vec4<u32>>;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) id: vec3<u32>, @builtin(num_workgroups) n: vec3<u32>) {
    let i = id.y * n.x * 256u + id.x;
    if (i < arrayLength(&dst)) {
        dst[i] = src[i];
    }
}";

/// Matrix size of the start-up matmul: 256 takes ~0.1 s on lavapipe and well under 1 ms on a
/// GPU, enough to rank adapters without delaying start-up.
pub const STARTUP_MATMUL_N: u32 = 256;

/// Bytes copied by the start-up copy benchmark: 16 MiB, larger than typical GPU L2 caches.
pub const STARTUP_COPY_BYTES: u64 = 16 << 20;

/// Timed repetitions; the median is reported.
pub const STARTUP_RUNS: usize = 3;

/// A job and its input blobs.
pub type BenchJob = (JobSpec, BTreeMap<ContentId, Vec<u8>>);

/// How a benchmark buffer starts.
#[derive(Debug, Clone)]
pub enum Data {
    /// These bytes (an input blob).
    Bytes(Vec<u8>),
    /// This many zero bytes.
    Zeroed(u64),
}

fn f32_bytes(v: impl Iterator<Item = f32>) -> Vec<u8> {
    v.flat_map(f32::to_le_bytes).collect()
}

/// A job with one pass of `wgsl:main` over `buffers` bound at 0, 1, 2... in order.
pub fn single_pass_job(
    name: &str,
    wgsl: &str,
    buffers: Vec<(&str, Data, bool)>,
    workgroups: [u32; 3],
) -> BenchJob {
    let mut inputs = BTreeMap::new();
    let mut specs = Vec::new();
    for (name, data, output) in buffers {
        let (size, init) = match data {
            Data::Bytes(bytes) => {
                let id = ContentId::of(&bytes);
                let size = bytes.len() as u64;
                inputs.insert(id, bytes);
                (size, BufferInit::Blob(id))
            }
            Data::Zeroed(size) => (size, BufferInit::Zeroed),
        };
        specs.push(BufferSpec {
            name: name.into(),
            size,
            init,
            output,
        });
    }
    let bindings = (0..specs.len() as u32)
        .map(|i| Binding::whole(i, i))
        .collect();
    let spec = JobSpec {
        name: name.into(),
        buffers: specs,
        shaders: vec![ShaderSource {
            name: format!("{name}.wgsl"),
            wgsl: wgsl.into(),
        }],
        passes: vec![PassSpec {
            shader: 0,
            entry: "main".into(),
            workgroups,
            bindings,
        }],
        loops: Vec::new(),
    };
    (spec, inputs)
}

/// An `n`×`n` matmul job with the reference kernel.
pub fn matmul_job(n: u32) -> BenchJob {
    let len = (n * n) as usize;
    let a = f32_bytes((0..len).map(|i| ((i * 7) % 13) as f32 / 8.0 - 0.75));
    let b = f32_bytes((0..len).map(|i| ((i * 11) % 17) as f32 / 16.0 - 0.5));
    let dims: Vec<u8> = [n, n, n, 0].iter().flat_map(|v| v.to_le_bytes()).collect();
    single_pass_job(
        "matmul",
        MATMUL_WGSL,
        vec![
            ("a", Data::Bytes(a), false),
            ("b", Data::Bytes(b), false),
            ("c", Data::Zeroed(u64::from(n) * u64::from(n) * 4), true),
            ("dims", Data::Bytes(dims), false),
        ],
        [n.div_ceil(16), n.div_ceil(16), 1],
    )
}

/// A copy job over `bytes` (a multiple of 16).
pub fn copy_job(bytes: u64) -> BenchJob {
    let groups = bytes.div_ceil(16 * 256) as u32;
    let (x, y) = if groups > 65_535 {
        (65_535, groups.div_ceil(65_535))
    } else {
        (groups, 1)
    };
    let src: Vec<u8> = (0..bytes).map(|i| (i % 251) as u8).collect();
    single_pass_job(
        "copy",
        COPY_WGSL,
        vec![
            ("src", Data::Bytes(src), false),
            ("dst", Data::Zeroed(bytes), true),
        ],
        [x, y, 1],
    )
}

/// Runs `job` `runs` times and returns the output of the run with the median `gpu_ms`.
pub async fn median_run(
    exec: &Executor,
    job: &BenchJob,
    runs: usize,
) -> Result<JobOutput, ExecError> {
    let mut outs = Vec::with_capacity(runs);
    for _ in 0..runs.max(1) {
        outs.push(exec.run("benchmark", job.0.clone(), job.1.clone()).await?);
    }
    outs.sort_by(|a, b| a.gpu_ms.total_cmp(&b.gpu_ms));
    let mid = outs.len() / 2;
    Ok(outs.swap_remove(mid))
}

/// Measures the start-up benchmark (one warm-up run, then the median of [`STARTUP_RUNS`]).
pub async fn measure(exec: &Executor) -> Result<Benchmark, ExecError> {
    let mm = matmul_job(STARTUP_MATMUL_N);
    exec.run("benchmark", mm.0.clone(), mm.1.clone()).await?;
    let m = median_run(exec, &mm, STARTUP_RUNS).await?;
    let n = f64::from(STARTUP_MATMUL_N);
    let mflops = 2.0 * n * n * n / (m.gpu_ms.max(1e-6) * 1e3);
    let cp = copy_job(STARTUP_COPY_BYTES);
    exec.run("benchmark", cp.0.clone(), cp.1.clone()).await?;
    let c = median_run(exec, &cp, STARTUP_RUNS).await?;
    let mbps = 2.0 * STARTUP_COPY_BYTES as f64 / (c.gpu_ms.max(1e-6) * 1e3);
    Ok(Benchmark {
        matmul_mflops: mflops as u64,
        copy_mbps: mbps as u64,
    })
}

/// The cache key of an adapter: name, driver and backend.
pub fn cache_key(p: &GpuProfile) -> String {
    format!("{}|{}|{:?}", p.name, p.driver, p.backend)
}

/// The benchmark for `exec`'s adapter from the cache at `path`, measured and stored on a miss.
pub async fn cached(exec: &Executor, path: &Path) -> Result<Benchmark, ExecError> {
    let err = |reason: String| ExecError::Cache {
        path: path.display().to_string(),
        reason,
    };
    let mut cache: BTreeMap<String, Benchmark> = match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| err(format!("{e}: delete the file to re-measure")))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
        Err(e) => return Err(err(e.to_string())),
    };
    let key = cache_key(&exec.profile());
    if let Some(b) = cache.get(&key) {
        exec.set_benchmark(*b);
        return Ok(*b);
    }
    let b = measure(exec).await?;
    cache.insert(key, b);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
    }
    let json = serde_json::to_vec_pretty(&cache).map_err(|e| err(e.to_string()))?;
    std::fs::write(path, json).map_err(|e| err(e.to_string()))?;
    exec.set_benchmark(b);
    Ok(b)
}
