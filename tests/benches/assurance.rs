//! The cost of assurance: what verification by re-execution adds to a job, per mode, against
//! `none` measured in the same run on the same providers. Three providers at one price in one
//! process (production gossip settings), one buyer, N jobs per mode submitted one at a time,
//! modes interleaved job by job so that drift in the machine's load hits every mode alike.
//!
//! `cargo bench -p hashgrid-tests --bench assurance -- [--json] [--jobs N] [--job FILE]`
//!
//! Per mode: latency submit → verified (median, p90, mean), GPU time summed over every
//! provider's run of the job (from their receipts), msat paid per job (the countersigned
//! charges), and the share of jobs that were checked. The default job is the matmul kernel
//! (`examples/kernels/matmul`), long enough on lavapipe that GPU time is not noise.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hashgrid_node::Node;
use hashgrid_node::jobs::record::VerifyOutcome;
use hashgrid_node::jobs::{IntoSharedInputs, JobState, Submission};
use hashgrid_protocol::{JobLimits, Verification, VerifyMode, load_job_file};
use hashgrid_tests::{addr_of, start_provider, test_network, wait_for_asks};

/// Jobs before measuring (pipeline caches, connections).
const WARM_UP_JOBS: usize = 6;

fn pct(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

#[derive(Default)]
struct Figures {
    ms: Vec<f64>,
    gpu_ms: Vec<f64>,
    msat: Vec<f64>,
    checked: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut json = false;
    let mut jobs = 60usize;
    let mut file = hashgrid_examples::kernels_dir().join("matmul/job.toml");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--json" => json = true,
            "--jobs" => jobs = args.next().context("--jobs N")?.parse()?,
            "--job" => file = args.next().context("--job FILE")?.into(),
            "--bench" => {}
            other => bail!("unknown argument {other}; use --json, --jobs N, --job FILE"),
        }
    }
    let job = load_job_file(&file, &JobLimits::default())?;
    let modes = [
        VerifyMode::None,
        VerifyMode::Spot { permille: 100 },
        VerifyMode::Replicate { k: 2 },
    ];

    let p1 = start_provider(&[], 100, 8, None).await?;
    let boot = [addr_of(&p1).await?];
    let p2 = start_provider(&boot, 100, 8, None).await?;
    let p3 = start_provider(&boot, 100, 8, None).await?;
    let buyer = Node::builder()
        .network(test_network())
        .listen("/ip4/127.0.0.1/tcp/0".parse()?)
        .mdns(false)
        .bootstrap(boot[0].clone())
        .start()
        .await?;
    wait_for_asks(&buyer, 3).await?;

    let mut figures: Vec<Figures> = modes.iter().map(|_| Figures::default()).collect();
    let mut adapter = String::new();
    for i in 0..(jobs + WARM_UP_JOBS) {
        for (m, mode) in modes.iter().enumerate() {
            let mut sub = Submission {
                spec: job.spec.clone(),
                inputs: job.inputs.clone().into_shared(),
                options: Default::default(),
            };
            sub.options.verify = Verification {
                mode: *mode,
                ..job.verify.clone()
            };
            let t = Instant::now();
            let id = buyer.jobs().submit(sub).await?;
            let rec =
                tokio::time::timeout(Duration::from_secs(120), buyer.jobs().wait(&id)).await??;
            let ms = t.elapsed().as_secs_f64() * 1000.0;
            if rec.state != JobState::Done {
                bail!("{mode} job {i} did not complete: {:?}", rec.state);
            }
            if i < WARM_UP_JOBS {
                continue;
            }
            let (gpu_us, msat, checked) = match &rec.verification {
                Some(v) => {
                    let mut gpu = 0u64;
                    for r in &v.runs {
                        gpu += r.receipt.verify(&test_network())?.gpu_time_us;
                    }
                    let paid: u64 = v
                        .runs
                        .iter()
                        .filter(|r| r.countersigned.is_some())
                        .map(|r| r.charge.0)
                        .sum();
                    (gpu, paid, v.outcome == VerifyOutcome::Agreed)
                }
                None => {
                    let r = rec
                        .receipt
                        .context("a done job has a receipt")?
                        .verify(&test_network())?;
                    adapter = r.adapter.name.clone();
                    (r.gpu_time_us, r.charge.0, false)
                }
            };
            let f = &mut figures[m];
            f.ms.push(ms);
            f.gpu_ms.push(gpu_us as f64 / 1000.0);
            f.msat.push(msat as f64);
            f.checked += usize::from(checked);
        }
    }
    for n in [buyer, p1, p2, p3] {
        n.shutdown().await;
    }

    let base = &figures[0];
    let (base_ms, base_gpu, base_msat) = (mean(&base.ms), mean(&base.gpu_ms), mean(&base.msat));
    let rows: Vec<serde_json::Value> = modes
        .iter()
        .zip(&figures)
        .map(|(mode, f)| {
            serde_json::json!({
                "mode": mode.to_string(),
                "jobs": f.ms.len(),
                "checked": f.checked,
                "latency_ms": { "p50": pct(&f.ms, 0.5), "p90": pct(&f.ms, 0.9), "mean": mean(&f.ms) },
                "gpu_ms_per_job": mean(&f.gpu_ms),
                "msat_per_job": mean(&f.msat),
                "vs_none": {
                    "latency_mean": mean(&f.ms) / base_ms,
                    "gpu": mean(&f.gpu_ms) / base_gpu,
                    "msat": mean(&f.msat) / base_msat,
                },
            })
        })
        .collect();
    if json {
        println!(
            "{}",
            serde_json::json!({
                "bench": "assurance",
                "job": file.display().to_string(),
                "adapter": adapter,
                "modes": rows,
            })
        );
        return Ok(());
    }
    println!(
        "cost of assurance: {} ({} jobs per mode, adapter {adapter})",
        file.display(),
        jobs
    );
    println!(
        "{:<13} {:>8} {:>9} {:>9} {:>9} {:>10} {:>10} {:>8} {:>8}",
        "MODE",
        "CHECKED",
        "p50 ms",
        "p90 ms",
        "mean ms",
        "GPU ms/job",
        "msat/job",
        "× time",
        "× msat"
    );
    for r in &rows {
        println!(
            "{:<13} {:>8} {:>9.1} {:>9.1} {:>9.1} {:>10.2} {:>10.1} {:>8.2} {:>8.2}",
            r["mode"].as_str().unwrap_or(""),
            r["checked"].as_u64().unwrap_or(0),
            r["latency_ms"]["p50"].as_f64().unwrap_or(0.0),
            r["latency_ms"]["p90"].as_f64().unwrap_or(0.0),
            r["latency_ms"]["mean"].as_f64().unwrap_or(0.0),
            r["gpu_ms_per_job"].as_f64().unwrap_or(0.0),
            r["msat_per_job"].as_f64().unwrap_or(0.0),
            r["vs_none"]["latency_mean"].as_f64().unwrap_or(0.0),
            r["vs_none"]["msat"].as_f64().unwrap_or(0.0),
        );
    }
    Ok(())
}
