//! Executor tests on whatever adapter the machine has (lavapipe in CI). With no adapter at all
//! they fail: CI installs Mesa's lavapipe.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use hashgrid_executor::{ExecConfig, ExecError, Executor, JobOutput};
use hashgrid_protocol::{
    Binding, BufferInit, BufferSpec, ContentId, JobLimits, JobSpec, LoadedJob, PassSpec,
    ShaderSource, load_job_file,
};

fn kernel(name: &str) -> LoadedJob {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/kernels")
        .join(name)
        .join("job.toml");
    load_job_file(&path, &JobLimits::default()).expect("reference job file loads")
}

fn start(config: ExecConfig) -> Executor {
    Executor::start(config).expect("a wgpu adapter (install mesa-vulkan-drivers for lavapipe)")
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn run(exec: &Executor, job: LoadedJob) -> Result<JobOutput, ExecError> {
    rt().block_on(exec.run("buyer", job.spec, job.inputs))
}

fn input_f32(job: &LoadedJob, buffer: &str) -> Vec<f32> {
    input_bytes(job, buffer)
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn input_u32(job: &LoadedJob, buffer: &str) -> Vec<u32> {
    input_bytes(job, buffer)
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn input_bytes(job: &LoadedJob, buffer: &str) -> Vec<u8> {
    let b = job
        .spec
        .buffers
        .iter()
        .find(|b| b.name == buffer)
        .expect("buffer");
    match &b.init {
        BufferInit::Blob(id) => job.inputs[id].clone(),
        BufferInit::Zeroed => vec![0; b.size as usize],
    }
}

fn output_f32(out: &JobOutput, name: &str) -> Vec<f32> {
    let o = out.outputs.iter().find(|o| o.name == name).expect("output");
    assert_eq!(
        o.id,
        ContentId::of(&o.bytes),
        "output id is the blake3 of its bytes"
    );
    o.bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Float results must satisfy |gpu - cpu| <= abs + rel * scale, where `scale` is the magnitude
/// the result is computed from (see each test for why its bound holds).
fn assert_close(gpu: &[f32], cpu: &[f64], scale: &[f64], abs: f64, rel: f64, what: &str) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: length");
    for (i, ((&g, &c), &s)) in gpu.iter().zip(cpu).zip(scale).enumerate() {
        let err = (f64::from(g) - c).abs();
        assert!(
            err <= abs + rel * s,
            "{what}[{i}]: gpu {g} cpu {c} error {err} over {abs} + {rel}*{s}"
        );
    }
}

#[test]
fn saxpy_matches_cpu() {
    let exec = start(ExecConfig::default());
    let job = kernel("saxpy");
    let (x, y, a) = (
        input_f32(&job, "x"),
        input_f32(&job, "y"),
        input_f32(&job, "params")[0],
    );
    let out = run(&exec, job).expect("saxpy runs");
    let cpu: Vec<f64> = x
        .iter()
        .zip(&y)
        .map(|(&x, &y)| f64::from(a) * f64::from(x) + f64::from(y))
        .collect();
    let scale: Vec<f64> = x
        .iter()
        .zip(&y)
        .map(|(&x, &y)| (f64::from(a) * f64::from(x)).abs() + f64::from(y).abs())
        .collect();
    // One multiply and one add (or an fma): at most 2 roundings of half an ulp (2^-24) each.
    assert_close(
        &output_f32(&out, "out"),
        &cpu,
        &scale,
        0.0,
        2.0 * f64::from(f32::EPSILON),
        "saxpy",
    );
    assert_eq!(out.passes.len(), 1);
    assert!(out.gpu_ms > 0.0 && out.wall_ms >= out.gpu_ms * 0.5);
}

#[test]
fn matmul_matches_cpu() {
    let exec = start(ExecConfig::default());
    let job = kernel("matmul");
    let dims = input_u32(&job, "dims");
    let (m, n, k) = (dims[0] as usize, dims[1] as usize, dims[2] as usize);
    let (a, b) = (input_f32(&job, "a"), input_f32(&job, "b"));
    let out = run(&exec, job).expect("matmul runs");
    let mut cpu = vec![0f64; m * n];
    let mut scale = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            for l in 0..k {
                let p = f64::from(a[i * k + l]) * f64::from(b[l * n + j]);
                cpu[i * n + j] += p;
                scale[i * n + j] += p.abs();
            }
        }
    }
    // A K-term f32 dot product in any order errs by at most K * eps * sum|a_i b_i|.
    assert_close(
        &output_f32(&out, "c"),
        &cpu,
        &scale,
        0.0,
        k as f64 * f64::from(f32::EPSILON),
        "matmul",
    );
}

#[test]
fn reduction_matches_cpu() {
    let exec = start(ExecConfig::default());
    let job = kernel("reduce");
    let v = input_f32(&job, "values");
    let out = run(&exec, job).expect("reduce runs");
    assert_eq!(out.passes.len(), 2, "two passes timed");
    let cpu: f64 = v.iter().map(|&x| f64::from(x)).sum();
    let scale: f64 = v.iter().map(|&x| f64::from(x).abs()).sum();
    // Tree summation of n terms errs by at most log2(n) * eps * sum|x|; 13 levels for 4096.
    assert_close(
        &output_f32(&out, "sum"),
        &[cpu],
        &[scale],
        0.0,
        13.0 * f64::from(f32::EPSILON),
        "sum",
    );
}

#[test]
fn softmax_matches_cpu() {
    let exec = start(ExecConfig::default());
    let job = kernel("softmax");
    let x = input_f32(&job, "x");
    let out = run(&exec, job).expect("softmax runs");
    let cols = 64;
    let mut cpu = Vec::new();
    for row in x.chunks(cols) {
        let m = row.iter().fold(f64::MIN, |m, &v| m.max(f64::from(v)));
        let e: Vec<f64> = row.iter().map(|&v| (f64::from(v) - m).exp()).collect();
        let s: f64 = e.iter().sum();
        cpu.extend(e.iter().map(|v| v / s));
    }
    let gpu = output_f32(&out, "y");
    // WGSL allows exp an error of 3 + 2|x| ulp; with |x - max| <= 11 that is 25 ulp (3e-6
    // relative), plus 64-term summation and a division: 1e-5 relative, 1e-7 absolute for the
    // tiny probabilities.
    assert_close(&gpu, &cpu, &cpu, 1e-7, 1e-5, "softmax");
    for row in gpu.chunks(cols) {
        let s: f32 = row.iter().sum();
        assert!((s - 1.0).abs() < 1e-5, "row sums to {s}");
    }
}

fn pcg(v: u32) -> u32 {
    let state = v.wrapping_mul(747_796_405).wrapping_add(2_891_336_453);
    let word = ((state >> ((state >> 28) + 4)) ^ state).wrapping_mul(277_803_737);
    (word >> 22) ^ word
}

fn mix_cpu(seeds: &[u32]) -> Vec<u8> {
    seeds
        .iter()
        .enumerate()
        .flat_map(|(i, &s)| {
            let mut h = s ^ i as u32;
            for r in 0..16 {
                h = pcg(h ^ r);
            }
            h.to_le_bytes()
        })
        .collect()
}

#[test]
fn integer_mix_matches_cpu_exactly() {
    let exec = start(ExecConfig::default());
    let job = kernel("mix");
    let expected = mix_cpu(&input_u32(&job, "seeds"));
    let out = run(&exec, job).expect("mix runs");
    assert_eq!(out.outputs[0].bytes, expected);
    assert_eq!(out.outputs[0].id, ContentId::of(&expected));
}

fn rejected(job: LoadedJob, limits: JobLimits) -> String {
    let exec = start(ExecConfig {
        limits,
        ..ExecConfig::default()
    });
    match run(&exec, job) {
        Ok(_) => panic!("job should have been rejected"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_wgsl_names_file_line_and_column() {
    let mut job = kernel("saxpy");
    job.spec.shaders[0].wgsl = job.spec.shaders[0]
        .wgsl
        .replace("params.x * x[i]", "params.x * x[i] +* 1");
    let e = rejected(job, JobLimits::default());
    assert!(e.starts_with("saxpy.wgsl:11:"), "{e}");
}

#[test]
fn missing_binding_is_rejected() {
    let mut job = kernel("saxpy");
    job.spec.passes[0].bindings.retain(|b| b.binding != 1);
    let e = rejected(job, JobLimits::default());
    assert!(
        e.contains("@binding(1)") && e.contains("does not bind it"),
        "{e}"
    );
}

#[test]
fn undeclared_binding_and_missing_entry_are_rejected() {
    let mut job = kernel("saxpy");
    job.spec.passes[0].bindings.push(Binding::whole(7, 0));
    let e = rejected(job, JobLimits::default());
    assert!(e.contains("binding 7") && e.contains("not declared"), "{e}");
    let mut job = kernel("saxpy");
    job.spec.passes[0].entry = "nope".into();
    let e = rejected(job, JobLimits::default());
    assert!(e.contains("entry point \"nope\" not found"), "{e}");
}

#[test]
fn conflicting_binding_kinds_are_rejected() {
    // The output buffer bound both as the read_write `out` and as the `params` uniform.
    let mut job = kernel("saxpy");
    let out = job
        .spec
        .buffers
        .iter()
        .position(|b| b.name == "out")
        .expect("out") as u32;
    for b in &mut job.spec.passes[0].bindings {
        if b.binding == 3 {
            b.buffer = out;
        }
    }
    let e = rejected(job, JobLimits::default());
    assert!(
        e.contains("var<storage, read_write>") && e.contains("var<uniform>"),
        "{e}"
    );
}

#[test]
fn uniform_smaller_than_its_type_is_rejected() {
    let mut job = kernel("saxpy");
    let x = job
        .spec
        .buffers
        .iter()
        .position(|b| b.name == "x")
        .expect("x");
    job.spec.shaders[0].wgsl = job.spec.shaders[0]
        .wgsl
        .replace(
            "var<uniform> params: vec4<f32>",
            "var<uniform> params: array<vec4<f32>, 1024>",
        )
        .replace("params.x", "params[0].x");
    job.spec.passes[0].bindings.iter_mut().for_each(|b| {
        if b.binding == 3 {
            b.buffer = x as u32
        }
    });
    let e = rejected(job, JobLimits::default());
    assert!(e.contains("needs at least 16384"), "{e}");
}

#[test]
fn blob_hash_mismatch_is_rejected() {
    let mut job = kernel("saxpy");
    let id = *job.inputs.keys().next().expect("an input");
    job.inputs.get_mut(&id).expect("blob")[0] ^= 1;
    let e = rejected(job, JobLimits::default());
    assert!(
        e.contains("hash to") && e.contains("not the declared"),
        "{e}"
    );
}

#[test]
fn every_limit_is_enforced_before_running() {
    let l = JobLimits::default();
    let e = rejected(
        kernel("matmul"),
        JobLimits {
            max_buffer_bytes: 8192,
            ..l
        },
    );
    assert!(e.contains("limit"), "buffer bytes: {e}");
    let e = rejected(
        kernel("matmul"),
        JobLimits {
            max_job_bytes: 40_000,
            ..l
        },
    );
    assert!(e.contains("limit"), "job bytes: {e}");
    let e = rejected(kernel("reduce"), JobLimits { max_passes: 1, ..l });
    assert!(e.contains("2 passes"), "passes: {e}");
    let e = rejected(
        kernel("mix"),
        JobLimits {
            max_workgroups_per_dim: 32,
            ..l
        },
    );
    assert!(e.contains("limit"), "workgroups per dim: {e}");
    let e = rejected(
        kernel("matmul"),
        JobLimits {
            max_workgroups_per_dispatch: 8,
            ..l
        },
    );
    assert!(e.contains("limit"), "workgroups per dispatch: {e}");
}

/// A shader whose invocations each run `n.x` PCG rounds, over `workgroups` workgroups of 64.
/// Lavapipe (gallivm) silently caps a loop at 65535 iterations, so the work scales with the
/// dispatch instead: about 5 ms of CPU per workgroup on lavapipe, so 200 workgroups run ~1 s,
/// well past a 300 ms limit but short enough that the abandoned work frees its CPU soon.
fn spin_job(workgroups: u32) -> LoadedJob {
    let wgsl = "
@group(0) @binding(0) var<storage, read_write> out: array<u32>;
@group(0) @binding(1) var<uniform> n: vec4<u32>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    var h = id.x;
    for (var i = 0u; i < n.x; i++) {
        let s = (h ^ i) * 747796405u + 2891336453u;
        h = ((s >> ((s >> 28u) + 4u)) ^ s) * 277803737u;
    }
    if (h == 0xffffffffu) {
        out[0] = h;
    }
}";
    let nbytes: Vec<u8> = [60_000u32, 0, 0, 0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let id = ContentId::of(&nbytes);
    LoadedJob {
        spec: JobSpec {
            name: "spin".into(),
            buffers: vec![
                BufferSpec {
                    name: "out".into(),
                    size: 4,
                    init: BufferInit::Zeroed,
                    output: true,
                },
                BufferSpec {
                    name: "n".into(),
                    size: 16,
                    init: BufferInit::Blob(id),
                    output: false,
                },
            ],
            shaders: vec![ShaderSource {
                name: "spin.wgsl".into(),
                wgsl: wgsl.into(),
            }],
            passes: vec![PassSpec {
                shader: 0,
                entry: "main".into(),
                workgroups: [workgroups, 1, 1],
                bindings: vec![Binding::whole(0, 0), Binding::whole(1, 1)],
            }],
            loops: Vec::new(),
        },
        inputs: BTreeMap::from([(id, nbytes)]),
        verify: Default::default(),
    }
}

#[test]
fn timeout_then_next_job_runs() {
    let exec = start(ExecConfig {
        limits: JobLimits {
            max_job_ms: 300,
            ..JobLimits::default()
        },
        ..ExecConfig::default()
    });
    let t = Instant::now();
    let e = run(&exec, spin_job(200)).expect_err("spins past 300 ms");
    assert!(matches!(e, ExecError::Timeout { limit_ms: 300 }), "{e}");
    assert!(
        t.elapsed().as_millis() < 3000,
        "reported promptly: {:?}",
        t.elapsed()
    );
    assert_eq!(exec.devices_replaced(), 1);
    // wgpu cannot abort a dispatch: lavapipe finishes the abandoned ~1 s of work first, and it
    // runs work from all devices on the same CPU threads, so later jobs wait behind it (real
    // GPUs' driver watchdogs kill it). Let it drain, then the same executor serves the next
    // job correctly on its fresh device, within the same 300 ms limit.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    // The same executor serves the next job correctly on its fresh device.
    let job = kernel("mix");
    let expected = mix_cpu(&input_u32(&job, "seeds"));
    let out = run(&exec, job).expect("next job runs");
    assert_eq!(out.outputs[0].bytes, expected);
}

#[test]
fn many_buyers_run_fairly_within_the_concurrency_cap() {
    let exec = start(ExecConfig {
        max_concurrent: 2,
        ..ExecConfig::default()
    });
    let job = kernel("mix");
    let expected = mix_cpu(&input_u32(&job, "seeds"));
    let rt = rt();
    let results = rt.block_on(async {
        let mut tasks = Vec::new();
        for buyer in 0..3 {
            for _ in 0..4 {
                let exec = exec.clone();
                let job = kernel("mix");
                tasks.push(tokio::spawn(async move {
                    exec.run(&format!("buyer-{buyer}"), job.spec, job.inputs)
                        .await
                }));
            }
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.expect("task"));
        }
        out
    });
    assert_eq!(results.len(), 12);
    for r in results {
        assert_eq!(r.expect("job runs").outputs[0].bytes, expected);
    }
    let peak = exec.peak_concurrency();
    assert!((1..=2).contains(&peak), "peak concurrency {peak}");
}

#[test]
fn full_queue_is_refused() {
    let exec = start(ExecConfig {
        queue_depth: 1,
        ..ExecConfig::default()
    });
    let rt = rt();
    rt.block_on(async {
        // Occupy the only worker (~0.5 s), then one job fits the queue and the next does not.
        let busy = {
            let exec = exec.clone();
            let job = spin_job(100);
            tokio::spawn(async move { exec.run("a", job.spec, job.inputs).await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let queued = {
            let exec = exec.clone();
            let job = kernel("mix");
            tokio::spawn(async move { exec.run("b", job.spec, job.inputs).await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let job = kernel("mix");
        let refused = exec.run("c", job.spec, job.inputs).await;
        assert!(
            matches!(refused, Err(ExecError::QueueFull(1))),
            "{refused:?}"
        );
        busy.await.expect("task").expect("spin job runs");
        queued.await.expect("task").expect("queued job runs");
    });
}

#[test]
fn profile_and_cached_benchmark() {
    use hashgrid_executor::{AdapterChoice, bench, list_adapters};
    let adapters = list_adapters().expect("enumerate");
    assert!(
        !adapters.is_empty(),
        "no adapter: install mesa-vulkan-drivers"
    );
    let exec = start(ExecConfig {
        adapter: AdapterChoice::Index(0),
        ..ExecConfig::default()
    });
    let p = exec.profile();
    assert_eq!(p.name, adapters[0].name);
    assert!(p.limits.max_buffer_size > 0 && p.memory_bytes == p.limits.max_buffer_size);
    let by_name = start(ExecConfig {
        adapter: AdapterChoice::Name(p.name[..3].to_uppercase()),
        ..ExecConfig::default()
    });
    assert!(
        by_name
            .profile()
            .name
            .to_lowercase()
            .contains(&p.name[..3].to_lowercase())
    );
    let missing = Executor::start(ExecConfig {
        adapter: AdapterChoice::Name("no such adapter".into()),
        ..ExecConfig::default()
    });
    assert!(matches!(missing, Err(ExecError::NoAdapter(_))));

    let dir = tempfile::tempdir().expect("tempdir");
    let cache_path = dir.path().join("bench.json");
    let rt = rt();
    let b = rt
        .block_on(bench::cached(&exec, &cache_path))
        .expect("benchmark");
    assert!(b.matmul_mflops > 0 && b.copy_mbps > 0, "{b:?}");
    assert_eq!(exec.profile().bench, b);
    // Second start: read from the cache, not re-measured (the file's value comes back).
    let cache: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cache_path).expect("cache file")).expect("json");
    assert_eq!(
        cache[bench::cache_key(&p)]["matmul_mflops"],
        b.matmul_mflops
    );
    let planted =
        serde_json::json!({ bench::cache_key(&p): { "matmul_mflops": 7, "copy_mbps": 9 } });
    std::fs::write(&cache_path, planted.to_string()).expect("write");
    let again = rt
        .block_on(bench::cached(&by_name, &cache_path))
        .expect("cached");
    assert_eq!((again.matmul_mflops, again.copy_mbps), (7, 9));
}

fn output_u32(out: &JobOutput, name: &str) -> Vec<u32> {
    let o = out.outputs.iter().find(|o| o.name == name).expect("output");
    o.bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[test]
fn loop_counts_steps_stops_on_flag_and_streams() {
    let exec = start(ExecConfig::default());
    let job = kernel("countdown");
    let updates = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = updates.clone();
    let out = rt()
        .block_on(exec.run_streaming(
            "buyer",
            job.spec,
            job.inputs,
            Some(Box::new(move |u| {
                sink.lock().expect("lock").push(u);
                true
            })),
        ))
        .expect("loop job runs");
    let squares = output_u32(&out, "squares");
    // Steps 0..=9 ran; the stop flag was read after the chunk holding step 9 (steps 8..12),
    // whose later iterations saw the flag and did nothing.
    for s in 0..10u32 {
        assert_eq!(squares[s as usize], s * s, "step {s}");
    }
    assert!(squares[10..].iter().all(|&v| v == 0), "{squares:?}");
    assert_eq!(
        out.iterations,
        vec![12],
        "stopped at the first check after the flag"
    );
    assert_eq!(output_u32(&out, "stop")[0], 1);
    let updates = updates.lock().expect("lock");
    let seen: Vec<u32> = updates.iter().map(|u| u.iterations).collect();
    assert_eq!(seen, vec![4, 8, 12], "one update per check");
    let first: Vec<u32> = updates[0].buffers[0]
        .bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert_eq!(
        &first[..5],
        &[0, 1, 4, 9, 0],
        "the first update holds steps 0..4"
    );
}

#[test]
fn loop_without_stop_runs_max_iters() {
    let exec = start(ExecConfig::default());
    let mut job = kernel("countdown");
    job.spec.loops[0].stop = None;
    job.spec.loops[0].max_iters = 7;
    let out = run(&exec, job).expect("runs");
    assert_eq!(out.iterations, vec![7]);
    let squares = output_u32(&out, "squares");
    assert_eq!(&squares[..8], &[0, 1, 4, 9, 16, 25, 36, 0]);
}

#[test]
fn bound_ranges_see_only_their_bytes() {
    // One 1024-byte buffer; the pass binds bytes 256..512 and writes its index into each u32.
    let wgsl = "@group(0) @binding(0) var<storage, read_write> out: array<u32>;\n\
                @compute @workgroup_size(64) fn main(@builtin(global_invocation_id) g: vec3<u32>) {\n\
                if (g.x < arrayLength(&out)) { out[g.x] = g.x + 1u; } }";
    let spec = JobSpec {
        name: "range".into(),
        buffers: vec![BufferSpec {
            name: "out".into(),
            size: 1024,
            init: BufferInit::Zeroed,
            output: true,
        }],
        shaders: vec![ShaderSource {
            name: "range.wgsl".into(),
            wgsl: wgsl.into(),
        }],
        passes: vec![PassSpec {
            shader: 0,
            entry: "main".into(),
            workgroups: [2, 1, 1],
            bindings: vec![Binding {
                binding: 0,
                buffer: 0,
                range: Some(hashgrid_protocol::BufferRange {
                    offset: 256,
                    size: 256,
                }),
            }],
        }],
        loops: Vec::new(),
    };
    let exec = start(ExecConfig::default());
    let out = run(
        &exec,
        LoadedJob {
            spec,
            inputs: BTreeMap::new(),
            verify: Default::default(),
        },
    )
    .expect("runs");
    let v = output_u32(&out, "out");
    assert!(v[..64].iter().all(|&x| x == 0));
    assert_eq!(v[64..128], (1..=64).collect::<Vec<u32>>()[..]);
    assert!(v[128..].iter().all(|&x| x == 0));
}

#[test]
fn read_only_blobs_stay_resident_between_jobs() {
    let exec = start(ExecConfig::default());
    // 256 KiB of read-only input: over the resident threshold.
    let data: Vec<u8> = (0..256 * 1024u32).map(|i| (i % 251) as u8).collect();
    let id = ContentId::of(&data);
    let wgsl = "@group(0) @binding(0) var<storage, read> w: array<u32>;\n\
                @group(0) @binding(1) var<storage, read_write> out: array<u32>;\n\
                @compute @workgroup_size(1) fn main() { out[0] = w[1000]; }";
    let job = || LoadedJob {
        spec: JobSpec {
            name: "resident".into(),
            buffers: vec![
                BufferSpec {
                    name: "w".into(),
                    size: data.len() as u64,
                    init: BufferInit::Blob(id),
                    output: false,
                },
                BufferSpec {
                    name: "out".into(),
                    size: 4,
                    init: BufferInit::Zeroed,
                    output: true,
                },
            ],
            shaders: vec![ShaderSource {
                name: "r.wgsl".into(),
                wgsl: wgsl.into(),
            }],
            passes: vec![PassSpec {
                shader: 0,
                entry: "main".into(),
                workgroups: [1, 1, 1],
                bindings: vec![Binding::whole(0, 0), Binding::whole(1, 1)],
            }],
            loops: Vec::new(),
        },
        inputs: BTreeMap::from([(id, data.clone())]),
        verify: Default::default(),
    };
    let first = run(&exec, job()).expect("first");
    assert_eq!(first.resident_hits, 0);
    assert_eq!(first.uploaded_bytes, data.len() as u64);
    let second = run(&exec, job()).expect("second");
    assert_eq!(second.resident_hits, 1, "the weights were kept");
    assert_eq!(second.uploaded_bytes, 0);
    let want = u32::from_le_bytes([data[4000], data[4001], data[4002], data[4003]]);
    assert_eq!(output_u32(&second, "out")[0], want);
}

#[test]
fn a_stream_reader_can_end_the_loop() {
    let exec = start(ExecConfig::default());
    let mut job = kernel("countdown");
    job.spec.loops[0].stop = None;
    job.spec.loops[0].check_every = 2;
    let out = rt()
        .block_on(exec.run_streaming(
            "buyer",
            job.spec,
            job.inputs,
            Some(Box::new(|u| u.iterations < 6)),
        ))
        .expect("runs");
    assert_eq!(out.iterations, vec![6], "ended at the check that said no");
}

/// A job that copies `texels` texels of buffer `w`, read as `texture_2d<u32>` through `range`,
/// into `out`.
fn texture_copy_job(data: &[u8], range: hashgrid_protocol::BufferRange, texels: u32) -> LoadedJob {
    texture_copy_job_as(data, range, texels, "texture_2d<u32>")
}

/// [`texture_copy_job`] with `w` declared as `decl` (`texture_2d<u32>` is read with a level).
fn texture_copy_job_as(
    data: &[u8],
    range: hashgrid_protocol::BufferRange,
    texels: u32,
    decl: &str,
) -> LoadedJob {
    let id = ContentId::of(data);
    let level = if decl.starts_with("texture_2d") {
        ", 0"
    } else {
        ""
    };
    let wgsl = format!(
        "@group(0) @binding(0) var w: {decl};\n\
         @group(0) @binding(1) var<storage, read_write> out: array<vec4<u32>>;\n\
         @compute @workgroup_size(64) fn main(@builtin(global_invocation_id) g: vec3<u32>) {{\n\
           if (g.x < {texels}u) {{ out[g.x] = textureLoad(w, vec2<u32>(g.x % {row}u, g.x / {row}u){level}); }}\n\
         }}",
        row = hashgrid_protocol::job::TEXTURE_ROW_TEXELS
    );
    LoadedJob {
        spec: JobSpec {
            name: "texture".into(),
            buffers: vec![
                BufferSpec {
                    name: "w".into(),
                    size: data.len() as u64,
                    init: BufferInit::Blob(id),
                    output: false,
                },
                BufferSpec {
                    name: "out".into(),
                    size: u64::from(texels) * 16,
                    init: BufferInit::Zeroed,
                    output: true,
                },
            ],
            shaders: vec![ShaderSource {
                name: "t.wgsl".into(),
                wgsl,
            }],
            passes: vec![PassSpec {
                shader: 0,
                entry: "main".into(),
                workgroups: [texels.div_ceil(64), 1, 1],
                bindings: vec![
                    Binding {
                        binding: 0,
                        buffer: 0,
                        range: Some(range),
                    },
                    Binding::whole(1, 1),
                ],
            }],
            loops: Vec::new(),
        },
        inputs: BTreeMap::from([(id, data.to_vec())]),
        verify: Default::default(),
    }
}

#[test]
fn buffers_read_as_textures_see_their_bytes_and_stay_resident() {
    let exec = start(ExecConfig::default());
    // Two full rows and a partial third, from byte 512 of a larger blob.
    let row = hashgrid_protocol::job::TEXTURE_ROW_TEXELS as u32;
    let texels = 2 * row + 100;
    let data: Vec<u8> = (0..(texels as usize * 16 + 1024))
        .map(|i| (i.wrapping_mul(7919) % 253) as u8)
        .collect();
    let range = hashgrid_protocol::BufferRange {
        offset: 512,
        size: u64::from(texels) * 16,
    };
    let want = &data[512..512 + texels as usize * 16];
    let first = run(&exec, texture_copy_job(&data, range, texels)).expect("first run");
    assert_eq!(
        first.outputs[0].bytes, want,
        "texel i is bytes 16i.. of the range"
    );
    let second = run(&exec, texture_copy_job(&data, range, texels)).expect("second run");
    assert_eq!(second.outputs[0].bytes, want);
    assert_eq!(
        second.uploaded_bytes, 0,
        "the blob and its texture were kept"
    );
    assert!(second.resident_hits >= 1);
}

#[test]
fn a_buffer_read_as_a_read_only_storage_texture_sees_the_same_texels() {
    let exec = start(ExecConfig::default());
    let row = hashgrid_protocol::job::TEXTURE_ROW_TEXELS as u32;
    let texels = row + 37;
    let data: Vec<u8> = (0..(texels as usize * 16 + 256))
        .map(|i| (i.wrapping_mul(31) % 251) as u8)
        .collect();
    let range = hashgrid_protocol::BufferRange {
        offset: 256,
        size: u64::from(texels) * 16,
    };
    let want = &data[256..256 + texels as usize * 16];
    let storage = "texture_storage_2d<rgba32uint, read>";
    let first = run(&exec, texture_copy_job_as(&data, range, texels, storage)).expect("runs");
    assert_eq!(
        first.outputs[0].bytes, want,
        "texel i is bytes 16i.. of the range"
    );
    // The sampled view of the same range is the same texture, kept from the first job.
    let second = run(&exec, texture_copy_job(&data, range, texels)).expect("runs");
    assert_eq!(second.outputs[0].bytes, want);
    assert_eq!(second.uploaded_bytes, 0, "the texture was kept");
    // A storage texture the job could write is not a way to read bytes.
    let decl = "texture_storage_2d<rgba32uint, read_write>";
    let err = run(&exec, texture_copy_job_as(&data, range, texels, decl))
        .expect_err(decl)
        .to_string();
    assert!(err.contains("texture or sampler other than"), "{err}");
}

#[test]
fn texture_bindings_are_checked() {
    let exec = start(ExecConfig::default());
    let data = vec![7u8; 4096];
    // Not a whole number of texels.
    let err = run(
        &exec,
        texture_copy_job(
            &data,
            hashgrid_protocol::BufferRange {
                offset: 0,
                size: 1000,
            },
            8,
        ),
    )
    .expect_err("1000 bytes is not a whole number of texels")
    .to_string();
    assert!(err.contains("multiple of 16"), "{err}");
    // A buffer some pass writes cannot be read as a texture (it is a snapshot).
    let mut job = texture_copy_job(
        &data,
        hashgrid_protocol::BufferRange {
            offset: 0,
            size: 4096,
        },
        8,
    );
    job.spec.shaders.push(ShaderSource {
        name: "write.wgsl".into(),
        wgsl: "@group(0) @binding(0) var<storage, read_write> w: array<u32>;\n\
               @compute @workgroup_size(1) fn main() { w[0] = 1u; }"
            .into(),
    });
    job.spec.passes.push(PassSpec {
        shader: 1,
        entry: "main".into(),
        workgroups: [1, 1, 1],
        bindings: vec![Binding::whole(0, 0)],
    });
    let err = run(&exec, job)
        .expect_err("a written buffer read as a texture")
        .to_string();
    assert!(err.contains("snapshot"), "{err}");
}

/// A job whose loop writes buffer `kv` as a texture, `n` texels an iteration at texel
/// `step · n + i` (`[step + 1, i, 7, 9]`), for `iters` iterations, then a pass after the loop
/// that reads the texture back into `out`. `kv` is an output too.
fn texture_write_job(n: u32, iters: u32) -> LoadedJob {
    let row = hashgrid_protocol::job::TEXTURE_ROW_TEXELS;
    let texels = u64::from(n * iters);
    let coord = format!("vec2<u32>(i % {row}u, i / {row}u)");
    let writer = format!(
        "@group(0) @binding(0) var t: texture_storage_2d<rgba32uint, write>;\n\
         @group(0) @binding(1) var<storage, read> step: array<u32>;\n\
         @compute @workgroup_size(64) fn main(@builtin(global_invocation_id) g: vec3<u32>) {{\n\
           if (g.x < {n}u) {{ let i = step[0] * {n}u + g.x; textureStore(t, {coord}, vec4<u32>(step[0] + 1u, g.x, 7u, 9u)); }}\n\
         }}"
    );
    let reader = format!(
        "@group(0) @binding(0) var t: texture_storage_2d<rgba32uint, read>;\n\
         @group(0) @binding(1) var<storage, read_write> out: array<vec4<u32>>;\n\
         @compute @workgroup_size(64) fn main(@builtin(global_invocation_id) g: vec3<u32>) {{\n\
           let i = g.x;\n\
           if (i < {texels}u) {{ out[i] = textureLoad(t, {coord}); }}\n\
         }}"
    );
    let buf = |name: &str, size: u64, output: bool| BufferSpec {
        name: name.into(),
        size,
        init: BufferInit::Zeroed,
        output,
    };
    LoadedJob {
        spec: JobSpec {
            name: "texture-write".into(),
            buffers: vec![
                buf("kv", texels * 16, true),
                buf("step", 4, false),
                buf("out", texels * 16, true),
            ],
            shaders: vec![
                ShaderSource {
                    name: "write.wgsl".into(),
                    wgsl: writer,
                },
                ShaderSource {
                    name: "read.wgsl".into(),
                    wgsl: reader,
                },
            ],
            passes: vec![
                PassSpec {
                    shader: 0,
                    entry: "main".into(),
                    workgroups: [n.div_ceil(64), 1, 1],
                    bindings: vec![Binding::whole(0, 0), Binding::whole(1, 1)],
                },
                PassSpec {
                    shader: 1,
                    entry: "main".into(),
                    workgroups: [(texels as u32).div_ceil(64), 1, 1],
                    bindings: vec![Binding::whole(0, 0), Binding::whole(1, 2)],
                },
            ],
            loops: vec![hashgrid_protocol::LoopSpec {
                first: 0,
                len: 1,
                max_iters: iters,
                counter: Some(1),
                stop: None,
                check_every: 1,
                stream: Vec::new(),
            }],
        },
        inputs: BTreeMap::new(),
        verify: Default::default(),
    }
}

#[test]
fn a_buffer_written_as_a_texture_is_one_texture_for_the_whole_job() {
    let exec = start(ExecConfig::default());
    // 3 × 1400 texels: a full row of 4096 and a partial second one.
    let (n, iters) = (1400u32, 3u32);
    let out = run(&exec, texture_write_job(n, iters)).expect("runs");
    let want: Vec<u8> = (0..iters)
        .flat_map(|s| (0..n).flat_map(move |i| [s + 1, i, 7, 9]))
        .flat_map(u32::to_le_bytes)
        .collect();
    let get = |name: &str| &out.outputs.iter().find(|o| o.name == name).unwrap().bytes;
    assert!(
        *get("out") == want,
        "a later pass reads what every iteration wrote"
    );
    assert!(
        *get("kv") == want,
        "the output is copied back from the texture"
    );
    // Again, stopping after one iteration, and with `kv` no output (only ever a texture, so
    // no buffer behind it): nothing of the first job's texture is left, the texels no
    // iteration wrote read as zeros.
    let mut job = texture_write_job(n, iters);
    job.spec.loops[0].max_iters = 1;
    job.spec.buffers[0].output = false;
    let out = run(&exec, job).expect("runs");
    assert_eq!(out.outputs.len(), 1, "only out");
    let got = &out.outputs[0].bytes;
    let third = want.len() / 3;
    assert!(
        got[..third] == want[..third],
        "the first iteration's texels"
    );
    assert!(got[third..].iter().all(|&b| b == 0), "the rest are zeros");
}

#[test]
fn a_buffer_written_as_a_texture_is_only_ever_a_texture() {
    let exec = start(ExecConfig::default());
    // Bound as a storage buffer by another pass.
    let mut job = texture_write_job(64, 2);
    job.spec.shaders.push(ShaderSource {
        name: "poke.wgsl".into(),
        wgsl: "@group(0) @binding(0) var<storage, read_write> w: array<u32>;\n\
               @compute @workgroup_size(1) fn main() { w[0] = 1u; }"
            .into(),
    });
    job.spec.passes.push(PassSpec {
        shader: 2,
        entry: "main".into(),
        workgroups: [1, 1, 1],
        bindings: vec![Binding::whole(0, 0)],
    });
    let err = run(&exec, job).expect_err("bound as a buffer").to_string();
    assert!(err.contains("must bind it as a texture"), "{err}");
    // Streamed from the loop (its bytes exist only at the end).
    let mut job = texture_write_job(64, 2);
    job.spec.loops[0].stream = vec![0];
    let err = run(&exec, job).expect_err("streamed").to_string();
    assert!(err.contains("writes as a texture"), "{err}");
    // Two overlapping ranges (two textures of the same bytes).
    let mut job = texture_write_job(64, 2);
    job.spec.passes[1].bindings[0] = Binding {
        binding: 0,
        buffer: 0,
        range: Some(hashgrid_protocol::BufferRange {
            offset: 256,
            size: 1024,
        }),
    };
    let err = run(&exec, job).expect_err("overlapping ranges").to_string();
    assert!(err.contains("identical or disjoint"), "{err}");
}

/// A job of one input blob (`input_len` bytes of `fill`), one scratch buffer and one output:
/// `mode` "copy" copies every word of the input's buffer (padding included) to the output,
/// "dirty" writes 0xdeadbeef over the scratch and the output, "peek" copies the scratch.
fn pool_job(input_len: usize, fill: u8, mode: &str) -> LoadedJob {
    let data = vec![fill; input_len];
    let id = ContentId::of(&data);
    let body = match mode {
        "copy" => "o[i] = inp[i];",
        "dirty" => "s[i] = 0xdeadbeefu; o[i] = 0xdeadbeefu;",
        _ => "o[i] = s[i];",
    };
    let wgsl = format!(
        "@group(0) @binding(0) var<storage, read> inp: array<u32>;\n\
         @group(0) @binding(1) var<storage, read_write> s: array<u32>;\n\
         @group(0) @binding(2) var<storage, read_write> o: array<u32>;\n\
         @compute @workgroup_size(64) fn main(@builtin(global_invocation_id) g: vec3<u32>) {{\n\
           let i = g.x;\n\
           if (i < arrayLength(&o)) {{ {body} }}\n\
         }}"
    );
    LoadedJob {
        spec: JobSpec {
            name: format!("pool-{mode}"),
            buffers: vec![
                BufferSpec {
                    name: "inp".into(),
                    size: input_len as u64,
                    init: BufferInit::Blob(id),
                    output: false,
                },
                BufferSpec {
                    name: "s".into(),
                    size: 1024,
                    init: BufferInit::Zeroed,
                    output: false,
                },
                BufferSpec {
                    name: "o".into(),
                    size: 1024,
                    init: BufferInit::Zeroed,
                    output: true,
                },
            ],
            shaders: vec![ShaderSource {
                name: "pool.wgsl".into(),
                wgsl,
            }],
            passes: vec![PassSpec {
                shader: 0,
                entry: "main".into(),
                workgroups: [4, 1, 1],
                bindings: vec![
                    Binding::whole(0, 0),
                    Binding::whole(1, 1),
                    Binding::whole(2, 2),
                ],
            }],
            loops: Vec::new(),
        },
        inputs: BTreeMap::from([(id, data)]),
        verify: Default::default(),
    }
}

#[test]
fn reused_buffers_never_carry_one_jobs_bytes_into_the_next() {
    let exec = start(ExecConfig::default());
    // A job leaves 0xdeadbeef in its scratch and output buffers and 0xff in its input.
    let dirty = run(&exec, pool_job(1024, 0xff, "dirty")).expect("dirty job");
    assert!(dirty.outputs[0].bytes.iter().all(|&b| b != 0));
    // The next job of the same shapes gets those buffers back, cleared.
    let peek = run(&exec, pool_job(1024, 0xff, "peek")).expect("peek job");
    assert!(peek.reused_buffers >= 2, "{} reused", peek.reused_buffers);
    assert!(
        peek.outputs[0].bytes.iter().all(|&b| b == 0),
        "a reused scratch buffer reads as zeros"
    );
    // A shorter blob in a reused input buffer: its bytes, then zeros to the end.
    let copy = run(&exec, pool_job(1021, 0x01, "copy")).expect("copy job");
    let mut want = vec![0x01u8; 1021];
    want.resize(1024, 0);
    assert_eq!(copy.outputs[0].bytes, want);
    let copy = run(&exec, pool_job(1021, 0x01, "copy")).expect("copy job again");
    assert!(copy.reused_buffers >= 3, "{} reused", copy.reused_buffers);
    assert_eq!(
        copy.outputs[0].bytes, want,
        "same answer from reused buffers"
    );
    // No pool: every buffer is new.
    let none = start(ExecConfig {
        pool_bytes: 0,
        ..ExecConfig::default()
    });
    run(&none, pool_job(1024, 0xff, "dirty")).expect("dirty job");
    let peek = run(&none, pool_job(1024, 0xff, "peek")).expect("peek job");
    assert_eq!(peek.reused_buffers, 0);
    assert!(peek.outputs[0].bytes.iter().all(|&b| b == 0));
}

#[test]
fn buffers_go_up_to_the_adapter_limit_not_a_protocol_cap() {
    let exec = start(ExecConfig::default());
    let adapter_max = exec.profile().limits.max_buffer_size;
    assert_eq!(
        exec.limits().max_buffer_bytes,
        adapter_max.min(hashgrid_protocol::job::DEFAULT_MAX_BUFFER_BYTES)
    );
    // 300 MiB: over WebGPU's default max_buffer_size (256 MiB) and the old protocol cap.
    let big: u64 = 300 << 20;
    if adapter_max < big {
        eprintln!("adapter allows only {adapter_max} bytes per buffer; skipping the 300 MiB job");
        return;
    }
    // A kernel writes the last word of the big buffer through a 1 KiB range bound at its end,
    // and a second pass reads it back through the same range.
    let end = hashgrid_protocol::BufferRange {
        offset: big - 1024,
        size: 1024,
    };
    let wgsl = "@group(0) @binding(0) var<storage, read_write> tail: array<u32>;\n\
                @group(0) @binding(1) var<storage, read_write> o: array<u32>;\n\
                @compute @workgroup_size(1) fn store() { tail[255] = 0x600dcafeu; }\n\
                @compute @workgroup_size(1) fn load() { o[0] = tail[255]; o[1] = arrayLength(&tail); }";
    let pass = |entry: &str| PassSpec {
        shader: 0,
        entry: entry.into(),
        workgroups: [1, 1, 1],
        bindings: vec![
            Binding {
                binding: 0,
                buffer: 0,
                range: Some(end),
            },
            Binding::whole(1, 1),
        ],
    };
    let job = LoadedJob {
        spec: JobSpec {
            name: "big".into(),
            buffers: vec![
                BufferSpec {
                    name: "big".into(),
                    size: big,
                    init: BufferInit::Zeroed,
                    output: false,
                },
                BufferSpec {
                    name: "o".into(),
                    size: 8,
                    init: BufferInit::Zeroed,
                    output: true,
                },
            ],
            shaders: vec![ShaderSource {
                name: "big.wgsl".into(),
                wgsl: wgsl.into(),
            }],
            passes: vec![pass("store"), pass("load")],
            loops: Vec::new(),
        },
        inputs: BTreeMap::new(),
        verify: Default::default(),
    };
    let out = run(&exec, job.clone()).expect("a 300 MiB buffer runs");
    let o = &out.outputs[0].bytes;
    assert_eq!(&o[..4], &0x600dcafeu32.to_le_bytes());
    assert_eq!(&o[4..], &256u32.to_le_bytes());
    // A site can still cap lower.
    let capped = start(ExecConfig {
        limits: hashgrid_protocol::JobLimits {
            max_buffer_bytes: 256 << 20,
            ..Default::default()
        },
        ..ExecConfig::default()
    });
    let err = run(&capped, job)
        .expect_err("over the site's cap")
        .to_string();
    assert!(err.contains("bytes per buffer"), "{err}");
}

#[test]
fn a_texture_binding_shorter_than_a_row_may_have_any_number_of_texels() {
    let exec = start(ExecConfig::default());
    // 100 texels: one row of 1600 bytes, not a multiple of wgpu's 256-byte copy row pitch.
    let data: Vec<u8> = (0..1600u32).map(|i| (i % 251) as u8).collect();
    let range = hashgrid_protocol::BufferRange {
        offset: 0,
        size: 1600,
    };
    let out = run(&exec, texture_copy_job(&data, range, 100)).expect("runs");
    assert_eq!(out.outputs[0].bytes, data);
}

/// A job whose blobs all need new buffers (the first job of an executor) has them created and
/// written on all cores on a CPU adapter: each buffer holds exactly its own blob, a second
/// buffer naming the same blob still shares the first one's, and a blob the kernel writes is
/// still uploaded for every job while the read-only ones stay resident.
#[test]
fn several_blobs_in_new_buffers_each_hold_their_bytes() {
    let exec = start(ExecConfig::default());
    let pattern = |len: usize, m: u32, k: u32| -> Vec<u8> {
        (0..len as u32).map(|i| ((i * m) % k) as u8).collect()
    };
    let a = pattern(256 * 1024, 7, 251);
    let b = pattern(256 * 1024, 13, 241);
    let c = pattern(300 * 1024, 1, 199);
    let d = pattern(80 * 1024, 3, 97);
    // (buffer, blob, written by the kernel)
    let layout = [
        (&a, false),
        (&b, false),
        (&a, false),
        (&c, false),
        (&d, true),
    ];
    // lavapipe caps a shader invocation at 65535 loop iterations, so each invocation sums
    // one chunk of CHUNK words of every buffer.
    const CHUNK: usize = 4096;
    let chunks = layout
        .iter()
        .map(|(v, _)| v.len() / 4)
        .max()
        .unwrap()
        .div_ceil(CHUNK);
    let mut wgsl = String::new();
    for (i, (_, written)) in layout.iter().enumerate() {
        let access = if *written { "read_write" } else { "read" };
        wgsl.push_str(&format!(
            "@group(0) @binding({i}) var<storage, {access}> w{i}: array<u32>;\n"
        ));
    }
    wgsl.push_str("@group(0) @binding(5) var<storage, read_write> out: array<u32>;\n");
    wgsl.push_str(
        "@compute @workgroup_size(1) fn main(@builtin(global_invocation_id) id: vec3<u32>) {\n",
    );
    wgsl.push_str(&format!("  let c = id.x;\n  let lo = c * {CHUNK}u;\n"));
    for i in 0..layout.len() {
        wgsl.push_str(&format!(
            "  var s{i} = 0u;\n  for (var j = lo; j < min(lo + {CHUNK}u, arrayLength(&w{i})); j++) {{ s{i} = s{i} + w{i}[j] * (j + 1u); }}\n  out[{i}u * {chunks}u + c] = s{i};\n"
        ));
    }
    wgsl.push_str("  if (c == 0u) { w4[0] = 7u; }\n}\n");
    let ids: Vec<ContentId> = layout
        .iter()
        .map(|(bytes, _)| ContentId::of(bytes))
        .collect();
    let job = || {
        let mut buffers: Vec<BufferSpec> = layout
            .iter()
            .zip(&ids)
            .enumerate()
            .map(|(i, ((bytes, _), id))| BufferSpec {
                name: format!("w{i}"),
                size: bytes.len() as u64,
                init: BufferInit::Blob(*id),
                output: false,
            })
            .collect();
        buffers.push(BufferSpec {
            name: "out".into(),
            size: (4 * layout.len() * chunks) as u64,
            init: BufferInit::Zeroed,
            output: true,
        });
        LoadedJob {
            spec: JobSpec {
                name: "blobs".into(),
                buffers,
                shaders: vec![ShaderSource {
                    name: "blobs.wgsl".into(),
                    wgsl: wgsl.clone(),
                }],
                passes: vec![PassSpec {
                    shader: 0,
                    entry: "main".into(),
                    workgroups: [chunks as u32, 1, 1],
                    bindings: (0..=layout.len() as u32)
                        .map(|i| Binding::whole(i, i))
                        .collect(),
                }],
                loops: Vec::new(),
            },
            inputs: layout
                .iter()
                .zip(&ids)
                .map(|((bytes, _), id)| (*id, (*bytes).clone()))
                .collect(),
            verify: Default::default(),
        }
    };
    // Each chunk's words weighted by position: a byte out of place changes its sum.
    let want: Vec<u32> = layout
        .iter()
        .flat_map(|(bytes, _)| {
            let words: Vec<u32> = bytes
                .chunks_exact(4)
                .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
                .collect();
            (0..chunks).map(move |c| {
                let hi = ((c + 1) * CHUNK).min(words.len());
                (c * CHUNK..hi.max(c * CHUNK)).fold(0u32, |s, j| {
                    s.wrapping_add(words[j].wrapping_mul(j as u32 + 1))
                })
            })
        })
        .collect();
    let total: u64 = [&a, &b, &c, &d].iter().map(|v| v.len() as u64).sum();
    let first = run(&exec, job()).expect("first");
    assert_eq!(output_u32(&first, "out"), want);
    assert_eq!(
        first.resident_hits, 1,
        "the second buffer of blob a shares the first"
    );
    assert_eq!(first.uploaded_bytes, total);
    let second = run(&exec, job()).expect("second");
    assert_eq!(
        output_u32(&second, "out"),
        want,
        "the written blob was uploaded afresh"
    );
    assert_eq!(second.resident_hits, 4);
    assert_eq!(second.uploaded_bytes, d.len() as u64);
}
