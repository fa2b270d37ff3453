//! Submit → verified, countersigned receipt on loopback, minus the provider's GPU time:
//! p50 and p99 over N small jobs (the reference saxpy), one buyer and three providers in one
//! process, production gossip settings.
//!
//! `cargo bench -p hashgrid-tests --bench lifecycle -- [--json] [--jobs N]`
//!
//! Baseline in the same run: the same job run directly on an executor (`Executor::run`, what
//! `hashgrid run-local` does), so the market's overhead can be read against local execution
//! on the same machine and adapter. The GPU time subtracted is the one the receipt reports.

use hashgrid_node::jobs::IntoSharedInputs;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hashgrid_node::jobs::{JobOptions, JobState, Submission};
use hashgrid_node::{ExecConfig, Executor, Node, NodeEvent};
use hashgrid_protocol::{JobLimits, load_job_file};
use hashgrid_tests::{addr_of, start_provider, test_network, wait_for_asks};

/// The states the buyer reports, and what the time up to each covers.
const STAGES: [(&str, &str); 7] = [
    ("matching", "submit: offline check, store, task start"),
    ("agreed", "match + propose + agreement signed/verified"),
    ("uploading", "countersign agreement"),
    ("queued", "dispatch (inputs inline), provider flush"),
    ("running", "provider queue → executor"),
    (
        "downloading",
        "run + receipt signed and flushed + long poll",
    ),
    ("done", "verify, store (flush), countersign round trip"),
];

/// Jobs before measuring (pipeline caches, connections).
const WARM_UP_JOBS: usize = 10;

fn saxpy() -> anyhow::Result<Submission> {
    let path = hashgrid_examples::kernels_dir().join("saxpy/job.toml");
    let job = load_job_file(&path, &JobLimits::default())?;
    Ok(Submission {
        spec: job.spec,
        inputs: job.inputs.into_shared(),
        options: JobOptions::default(),
    })
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut json = false;
    let mut jobs = 200usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--json" => json = true,
            "--jobs" => jobs = args.next().context("--jobs N")?.parse()?,
            "--bench" => {}
            other => bail!("unknown argument {other}; use --json, --jobs N"),
        }
    }
    let sub = saxpy()?;

    // Baseline: the same job straight on an executor.
    let exec = tokio::task::spawn_blocking(|| Executor::start(ExecConfig::default())).await??;
    let adapter = exec.profile().name;
    let mut local = Vec::new();
    for i in 0..jobs + WARM_UP_JOBS {
        let t = Instant::now();
        exec.run("bench", sub.spec.clone(), sub.inputs.clone())
            .await?;
        if i >= WARM_UP_JOBS {
            local.push(t.elapsed().as_secs_f64() * 1000.0);
        }
    }
    drop(exec);

    let p1 = start_provider(&[], 100, 8, None).await?;
    let boot = [addr_of(&p1).await?];
    let p2 = start_provider(&boot, 120, 8, None).await?;
    let p3 = start_provider(&boot, 140, 8, None).await?;
    let buyer = Node::builder()
        .network(test_network())
        .listen("/ip4/127.0.0.1/tcp/0".parse()?)
        .mdns(false)
        .bootstrap(boot[0].clone())
        .start()
        .await?;
    wait_for_asks(&buyer, 3).await?;

    let (mut total, mut gpu, mut overhead) = (Vec::new(), Vec::new(), Vec::new());
    // Time of each stage, from the job's state changes as the buyer's node reports them.
    let mut stages: Vec<Vec<f64>> = vec![Vec::new(); STAGES.len()];
    for i in 0..jobs + WARM_UP_JOBS {
        let mut events = buyer.events();
        let t = Instant::now();
        let id = buyer.jobs().submit(sub.clone()).await?;
        let mut at: Vec<(usize, f64)> = Vec::new();
        let follow = async {
            loop {
                match events.recv().await {
                    Ok(NodeEvent::Job(u)) if u.job == id => {
                        if let Some(k) = STAGES.iter().position(|(s, _)| *s == u.state.name()) {
                            at.push((k, t.elapsed().as_secs_f64() * 1000.0));
                        }
                        if u.state.is_terminal() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(60), follow).await?;
        let rec = buyer.jobs().wait(&id).await?;
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        if rec.state != JobState::Done {
            bail!("job {i} did not complete: {:?}", rec.state);
        }
        let receipt = rec
            .receipt
            .context("a done job has a receipt")?
            .verify(&test_network())?;
        let g = receipt.gpu_time_us as f64 / 1000.0;
        if i >= WARM_UP_JOBS {
            total.push(ms);
            gpu.push(g);
            overhead.push(ms - g);
            // Each stage ends when the next state is reported.
            let mut prev = 0.0;
            for (k, when) in at {
                stages[k].push(when - prev);
                prev = when;
            }
        }
    }
    // How long each node's swarm task went without polling over the run (its stalls).
    let lag: Vec<(&str, hashgrid_node::node::LagSnapshot)> = [
        ("buyer", &buyer),
        ("provider 1", &p1),
        ("provider 2", &p2),
        ("provider 3", &p3),
    ]
    .into_iter()
    .map(|(name, n)| (name, n.ops().loop_lag()))
    .collect();
    for n in [&buyer, &p1, &p2, &p3] {
        n.shutdown().await;
    }
    let r = |v: &mut Vec<f64>| (pct(v, 0.5), pct(v, 0.99));
    let (t50, t99) = r(&mut total);
    let (g50, g99) = r(&mut gpu);
    let (o50, o99) = r(&mut overhead);
    let (l50, l99) = r(&mut local);
    let stage_p50: Vec<(String, f64)> = STAGES
        .iter()
        .zip(stages.iter_mut())
        .map(|((_, what), v)| {
            (
                what.to_string(),
                if v.is_empty() { 0.0 } else { pct(v, 0.5) },
            )
        })
        .collect();
    if json {
        let st: Vec<String> = stage_p50
            .iter()
            .map(|(w, v)| format!("{w:?}:{v:.3}"))
            .collect();
        let stages = st.join(",");
        let stalls = lag
            .iter()
            .map(|(n, l)| {
                format!(
                    "{n:?}:{{\"max\":{:.3},\"p99\":{:.3},\"samples\":{}}}",
                    l.max.as_secs_f64() * 1000.0,
                    l.p99.as_secs_f64() * 1000.0,
                    l.samples
                )
            })
            .collect::<Vec<_>>()
            .join(",");
        println!(
            "{{\"benchmark\":\"lifecycle\",\"adapter\":{adapter:?},\"jobs\":{jobs},\
             \"submit_to_receipt_ms\":{{\"p50\":{t50:.3},\"p99\":{t99:.3}}},\
             \"gpu_ms\":{{\"p50\":{g50:.3},\"p99\":{g99:.3}}},\
             \"overhead_ms\":{{\"p50\":{o50:.3},\"p99\":{o99:.3}}},\
             \"baseline_local_run_ms\":{{\"p50\":{l50:.3},\"p99\":{l99:.3}}},\
             \"stages_p50_ms\":{{{stages}}},\"swarm_stall_ms\":{{{stalls}}}}}"
        );
    } else {
        println!("{jobs} saxpy jobs on {adapter}, 1 buyer + 3 providers on loopback:");
        println!("  submit → countersigned receipt  p50 {t50:.2} ms  p99 {t99:.2} ms");
        println!("  provider GPU time (receipt)     p50 {g50:.2} ms  p99 {g99:.2} ms");
        println!("  overhead (total − GPU time)     p50 {o50:.2} ms  p99 {o99:.2} ms");
        println!("  baseline: local Executor::run   p50 {l50:.2} ms  p99 {l99:.2} ms");
        println!("  stages (p50), each ending when the buyer reports the next state:");
        for (what, v) in &stage_p50 {
            println!("    {what:<44} {v:.2} ms");
        }
        println!("  swarm task stalls (probe every 50 ms; p99 is a bucket bound):");
        for (n, l) in &lag {
            println!(
                "    {n:<12} longest {:.1} ms  p99 ≤ {:.0} ms  ({} samples)",
                l.max.as_secs_f64() * 1000.0,
                l.p99.as_secs_f64() * 1000.0,
                l.samples
            );
        }
    }
    Ok(())
}
