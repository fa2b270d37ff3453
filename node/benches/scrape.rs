//! What Prometheus scraping costs a busy site.
//!
//! A real `hashgrid-node run --metrics` daemon sells its GPU to a buyer in this process that
//! keeps one job in flight at all times. In alternating windows of the same length the daemon
//! is left alone (A) or scraped back to back (B); the daemon's CPU time in each window comes
//! from `/proc/<pid>/stat`. The cost of one scrape is (B − A) / scrapes in B, and at one scrape
//! a second its share of one core is that cost per second. Medians over the rounds.
//!
//! ```text
//! cargo bench -p hashgrid-node --bench scrape -- [--rounds 5] [--window-secs 3] [--json]
//! ```
//! Linux only (it reads `/proc`).

#![allow(clippy::unwrap_used)] // a benchmark: a failed unwrap is a failed run

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hashgrid_node::Node;
use hashgrid_node::jobs::{IntoSharedInputs, JobOptions, Submission};
use hashgrid_protocol::Network;

const NET: &str = "scrape-bench";

/// The daemon's user + system CPU time so far, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) start after its ')'.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    // USER_HZ is 100 on Linux.
    ticks as f64 / 100.0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn arg(args: &[String], name: &str, default: u64) -> u64 {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(default)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let json = args.iter().any(|a| a == "--json");
    let rounds = arg(&args, "--rounds", 5);
    let window = Duration::from_secs(arg(&args, "--window-secs", 3));

    let buyer = Node::builder()
        .network(Network::new(NET).unwrap())
        .mdns(false)
        .listen("/ip4/127.0.0.1/tcp/0".parse().unwrap())
        .start()
        .await
        .unwrap();
    let boot = buyer.peers().listen_addrs().await.unwrap()[0].to_string();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (daemon, rx) = support::spawn(&[
        "run",
        "--data-dir",
        data.to_str().unwrap(),
        "--network",
        NET,
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--bootstrap",
        &boot,
        "--no-mdns",
        "--units",
        "2",
        "--metrics",
        "127.0.0.1:0",
    ]);
    support::wait_line(&rx, |l| l.contains("node started"));
    let metrics = support::http_addr(&support::wait_line(&rx, |l| l.contains("/metrics")));
    let pid = daemon.0.id();
    let deadline = Instant::now() + support::LIMIT;
    while buyer.market().book().await.unwrap().asks.is_empty() {
        assert!(Instant::now() < deadline, "the daemon's ask never arrived");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Keep the site busy: one job in flight at all times.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let load = {
        let (buyer, stop, done) = (buyer.clone(), stop.clone(), done.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let (spec, inputs) = hashgrid_node::executor::bench::copy_job(256 << 10);
                let sub = Submission {
                    spec,
                    inputs: inputs.into_shared(),
                    options: JobOptions::default(),
                };
                if let Ok(id) = buyer.jobs().submit(sub).await
                    && buyer.jobs().wait(&id).await.is_ok()
                {
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    // Warm up: the first jobs, and a first scrape.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, _, body) = support::get(&metrics, "/metrics");
    let bytes = body.len();
    let series = body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .count();

    let mut per_scrape_ms = Vec::new();
    let mut latency_ms = Vec::new();
    let mut idle_cpu = Vec::new();
    let mut jobs_per_s = Vec::new();
    for _ in 0..rounds {
        // A: busy, not scraped.
        let (c0, j0, t0) = (
            cpu_seconds(pid),
            done.load(Ordering::Relaxed),
            Instant::now(),
        );
        tokio::time::sleep(window).await;
        let a = cpu_seconds(pid) - c0;
        jobs_per_s.push((done.load(Ordering::Relaxed) - j0) as f64 / t0.elapsed().as_secs_f64());
        idle_cpu.push(a / window.as_secs_f64());
        // B: busy, scraped back to back.
        let c0 = cpu_seconds(pid);
        let t0 = Instant::now();
        let mut n = 0u32;
        let addr = metrics.clone();
        let lat = tokio::task::spawn_blocking(move || {
            let mut lat = Vec::new();
            while t0.elapsed() < window {
                let s = Instant::now();
                let (status, _, _) = support::get(&addr, "/metrics");
                assert_eq!(status, 200);
                lat.push(s.elapsed().as_secs_f64() * 1e3);
            }
            lat
        })
        .await
        .unwrap();
        n += lat.len() as u32;
        let b = cpu_seconds(pid) - c0;
        // Scale A to B's length (B ends after its last scrape, a little past the window).
        let a_scaled = a * t0.elapsed().as_secs_f64() / window.as_secs_f64();
        per_scrape_ms.push(((b - a_scaled) / f64::from(n)).max(0.0) * 1e3);
        latency_ms.push(median(lat));
    }
    stop.store(true, Ordering::Relaxed);
    let _ = load.await;

    let cost_ms = median(per_scrape_ms.clone());
    // At one scrape a second: that many ms of CPU per 1000 ms.
    let share_pct = cost_ms / 1000.0 * 100.0;
    let busy_pct = median(idle_cpu) * 100.0;
    let jobs = median(jobs_per_s);
    let lat = median(latency_ms);
    if json {
        println!(
            "{}",
            serde_json::json!({
                "bench": "scrape",
                "rounds": rounds,
                "window_secs": window.as_secs(),
                "exposition_bytes": bytes,
                "series": series,
                "daemon_cpu_busy_pct": busy_pct,
                "jobs_per_s": jobs,
                "scrape_cpu_ms_median": cost_ms,
                "scrape_cpu_ms_rounds": per_scrape_ms,
                "scrape_latency_ms_median": lat,
                "share_of_one_core_at_1hz_pct": share_pct,
            })
        );
    } else {
        println!(
            "busy site: {jobs:.1} jobs/s, daemon at {busy_pct:.0}% of a core; /metrics is {bytes} bytes, {series} series"
        );
        println!(
            "one scrape: {cost_ms:.3} ms of the daemon's CPU (rounds: {per_scrape_ms:.3?}), {lat:.2} ms to answer"
        );
        println!("scraped every second: {share_pct:.4}% of one core (goal: under 1%)");
    }
    let pid = pid.to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    drop(daemon);
    buyer.shutdown().await;
}
