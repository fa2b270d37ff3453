//! Executor benchmarks on this machine's adapter:
//! `cargo bench -p hashgrid-executor --bench executor -- [--json] [--no-pin]`.
//!
//! Reports matmul GFLOP/s at 512 and 1024, per-dispatch overhead (an empty kernel, in passes of
//! their own and in a loop as a decode step runs them), upload and readback GB/s (next to a host
//! copy into new memory, the floor under a first upload), and each job's overhead: wall time
//! beyond the sum of its kernel times, next to the goal of 1 ms plus host memory-bandwidth time
//! for its bytes. Medians of RUNS runs.

use std::time::Instant;

use anyhow::Context;
use hashgrid_executor::bench::{BenchJob, Data, copy_job, matmul_job, median_run, single_pass_job};
use hashgrid_executor::{ExecConfig, Executor, JobOutput};
use hashgrid_protocol::LoopSpec;

/// Timed runs per figure (after one warm-up); the median is reported.
const RUNS: usize = 5;

/// Passes and iterations of the looped per-dispatch overhead figure.
const LOOP_PASSES: u32 = 100;
const LOOP_ITERS: u32 = 20;

/// Bytes moved by the upload and readback figures: 64 MiB.
const TRANSFER_BYTES: u64 = 64 << 20;

const EMPTY_WGSL: &str = "
@group(0) @binding(0) var<storage, read_write> o: array<u32>;
@compute @workgroup_size(1)
fn main() { o[0] = o[0] + 1u; }";

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

async fn wall_median(exec: &Executor, job: &BenchJob) -> anyhow::Result<(f64, JobOutput)> {
    exec.run("bench", job.0.clone(), job.1.clone()).await?;
    let mut walls = Vec::new();
    let mut last = None;
    for _ in 0..RUNS {
        // The copy of the inputs is the caller's, not the executor's: outside the timing.
        let (spec, inputs) = job.clone();
        let t = Instant::now();
        let out = exec.run("bench", spec, inputs).await?;
        walls.push(t.elapsed().as_secs_f64() * 1e3);
        last = Some(out);
    }
    Ok((median(walls), last.context("no runs")?))
}

/// Wall time of jobs that each upload 64 MiB of new bytes (so never resident) as `pieces`
/// blobs: the first run (fresh buffers) and the median of the rest (buffers reused from the
/// pool).
async fn upload_walls(exec: &Executor, pieces: usize) -> anyhow::Result<(f64, f64)> {
    let piece = TRANSFER_BYTES as usize / pieces;
    let mut walls = Vec::new();
    for k in 0..=RUNS {
        let names: Vec<String> = (0..pieces).map(|p| format!("in{p}")).collect();
        let mut buffers = vec![("o", Data::Zeroed(4), true)];
        for (p, name) in names.iter().enumerate() {
            let byte = (k * pieces + p + 1) as u8;
            buffers.push((name.as_str(), Data::Bytes(vec![byte; piece]), false));
        }
        let mut job = single_pass_job("upload", EMPTY_WGSL, buffers, [1, 1, 1]);
        job.0.passes[0].bindings.truncate(1);
        let t = Instant::now();
        let out = exec.run("bench", job.0, job.1).await?;
        walls.push(t.elapsed().as_secs_f64() * 1e3);
        anyhow::ensure!(
            out.uploaded_bytes == TRANSFER_BYTES,
            "the blobs were not uploaded"
        );
    }
    let first = walls.remove(0);
    Ok((first, median(walls)))
}

fn main() -> anyhow::Result<()> {
    let json = std::env::args().any(|a| a == "--json");
    // `--no-pin`: leave a CPU adapter's driver threads to the scheduler (for comparisons).
    let pin = !std::env::args().any(|a| a == "--no-pin");
    let exec = Executor::start(ExecConfig {
        cpu_pin_threads: pin,
        ..ExecConfig::default()
    })?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let profile = exec.profile();
    let mut r = serde_json::Map::new();
    r.insert("adapter".into(), profile.name.clone().into());
    r.insert("driver".into(), profile.driver.clone().into());
    // Host memory bandwidth: the goal's "memory-bandwidth time for its bytes".
    let host = vec![7u8; TRANSFER_BYTES as usize];
    let mut dst = vec![1u8; TRANSFER_BYTES as usize];
    let mut copies = Vec::new();
    for _ in 0..RUNS {
        let t = Instant::now();
        dst.copy_from_slice(std::hint::black_box(&host));
        std::hint::black_box(&mut dst);
        copies.push(2.0 * TRANSFER_BYTES as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    let host_gbps = median(copies);
    drop(dst);
    r.insert("host_memcpy_gbps".into(), host_gbps.into());
    // The floor under a first upload: copying 64 MiB into memory nothing has touched yet (a
    // new allocation), on one thread, as wgpu's zero fill of a new buffer does. Counted like
    // the upload figures (bytes copied per second), not like the memcpy above.
    let mut fresh = Vec::new();
    for _ in 0..RUNS {
        let t = Instant::now();
        let mut new = vec![0u8; TRANSFER_BYTES as usize];
        new.copy_from_slice(std::hint::black_box(&host));
        std::hint::black_box(&mut new);
        fresh.push(TRANSFER_BYTES as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    drop(host);
    r.insert(
        "host_copy_into_new_memory_gbps".into(),
        median(fresh).into(),
    );
    rt.block_on(async {
        // 1024 takes ~9 s per run on lavapipe: 3 runs; the pipeline is warm from 512.
        for (n, runs) in [(512u32, RUNS), (1024, 3)] {
            let job = matmul_job(n);
            if n == 512 {
                exec.run("bench", job.0.clone(), job.1.clone()).await?;
            }
            let out = median_run(&exec, &job, runs).await?;
            let gflops = 2.0 * f64::from(n).powi(3) / (out.gpu_ms * 1e-3) / 1e9;
            r.insert(format!("matmul_{n}_gflops"), gflops.into());
            r.insert(format!("matmul_{n}_gpu_ms"), out.gpu_ms.into());
        }
        // Per-dispatch overhead: 101 passes of an empty kernel vs 1, wall time per extra pass.
        let one = single_pass_job(
            "empty",
            EMPTY_WGSL,
            vec![("o", Data::Zeroed(4), true)],
            [1, 1, 1],
        );
        let mut many = one.clone();
        let pass = many.0.passes[0].clone();
        many.0.passes = vec![pass; 101];
        let (w1, o1) = wall_median(&exec, &one).await?;
        let (w101, _) = wall_median(&exec, &many).await?;
        r.insert(
            "dispatch_overhead_us".into(),
            ((w101 - w1) / 100.0 * 1e3).into(),
        );
        r.insert("empty_job_wall_ms".into(), w1.into());
        // The same inside a loop, as a decode step runs its passes: 100 passes of an empty
        // kernel of 5 workgroups (a 576-row matvec's count), 20 iterations, one submission
        // each; wall time per dispatch beyond the single-pass job's.
        let mut looped = single_pass_job(
            "empty",
            EMPTY_WGSL,
            vec![("o", Data::Zeroed(4), true)],
            [5, 1, 1],
        );
        let pass = looped.0.passes[0].clone();
        looped.0.passes = vec![pass; LOOP_PASSES as usize];
        looped.0.loops = vec![LoopSpec {
            first: 0,
            len: LOOP_PASSES,
            max_iters: LOOP_ITERS,
            counter: None,
            stop: None,
            check_every: 1,
            stream: Vec::new(),
        }];
        let (wl, _) = wall_median(&exec, &looped).await?;
        r.insert(
            "loop_dispatch_overhead_us".into(),
            ((wl - w1) / f64::from(LOOP_PASSES * LOOP_ITERS) * 1e3).into(),
        );
        r.insert(
            "empty_job_overhead_ms".into(),
            (o1.wall_ms - o1.gpu_ms).into(),
        );
        // Upload: a new 64 MiB input each run that the kernel does not touch; readback: a
        // 64 MiB output.
        // On an executor that keeps no blobs resident, so each upload's buffer goes back to
        // the pool (weights stay resident instead: their first upload is the fresh figure).
        let uploader = || {
            Executor::start(ExecConfig {
                resident_bytes: 0,
                cpu_pin_threads: pin,
                ..ExecConfig::default()
            })
        };
        let one = uploader()?;
        let (wu_cold, wu) = upload_walls(&one, 1).await?;
        one.shutdown();
        // A model's weights are many blobs (one per tensor or layer): 16 of 4 MiB, into fresh
        // buffers (created on all cores) and into pooled ones.
        let many = uploader()?;
        let (wm_cold, wm) = upload_walls(&many, 16).await?;
        many.shutdown();
        let down = single_pass_job(
            "readback",
            EMPTY_WGSL,
            vec![("o", Data::Zeroed(TRANSFER_BYTES), true)],
            [1, 1, 1],
        );
        let (wd, od) = wall_median(&exec, &down).await?;
        let gbps = |wall: f64| TRANSFER_BYTES as f64 / ((wall - w1) * 1e-3) / 1e9;
        r.insert("upload_gbps".into(), gbps(wu).into());
        r.insert("upload_fresh_buffer_gbps".into(), gbps(wu_cold).into());
        r.insert("upload_16_blobs_gbps".into(), gbps(wm).into());
        r.insert(
            "upload_16_blobs_fresh_buffers_gbps".into(),
            gbps(wm_cold).into(),
        );
        r.insert("readback_gbps".into(), gbps(wd).into());
        // Overhead goal on the 16 MiB copy job: in + out bytes on the host at memcpy speed.
        let cp = copy_job(16 << 20);
        let (_, oc) = wall_median(&exec, &cp).await?;
        let bytes = 2.0 * (16u64 << 20) as f64;
        let goal_ms = 1.0 + bytes / (host_gbps * 1e9) * 1e3;
        r.insert(
            "copy16m_overhead_ms".into(),
            (oc.wall_ms - oc.gpu_ms).into(),
        );
        r.insert("copy16m_goal_ms".into(), goal_ms.into());
        r.insert(
            "readback64m_overhead_ms".into(),
            (od.wall_ms - od.gpu_ms).into(),
        );
        r.insert(
            "readback64m_goal_ms".into(),
            (1.0 + TRANSFER_BYTES as f64 / (host_gbps * 1e9) * 1e3).into(),
        );
        anyhow::Ok(())
    })?;
    if json {
        println!("{}", serde_json::Value::Object(r));
    } else {
        for (k, v) in &r {
            println!("{k:<26} {v}");
        }
    }
    Ok(())
}
