//! SIGKILL a real `hashgrid-node` provider process while it runs a job, restart it on the same
//! data dir: no receipt it signed is lost and its receipt chain is intact.

#![allow(clippy::unwrap_used)] // helpers outside #[test] fns: a failed unwrap is a failed test

use hashgrid_node::jobs::IntoSharedInputs;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use hashgrid_node::jobs::{JobOptions, JobState, Submission};
use hashgrid_node::{Node, NodeEvent, NodeHandle};
use hashgrid_protocol::{ChainAuditor, JobLimits, Network, Signed, load_job_file};

const NET: &str = "sigkill-test";
const LIMIT: Duration = Duration::from_secs(60);

/// The daemon process, killed if the test fails before it exits.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn spawn_provider(data: &Path, boot: &str) -> Daemon {
    let mut child = Command::new(env!("CARGO_BIN_EXE_hashgrid-node"))
        .args([
            "run",
            "--data-dir",
            data.to_str().unwrap(),
            "--network",
            NET,
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--bootstrap",
            boot,
            "--price",
            "10",
            "--units",
            "1",
            "--no-mdns",
        ])
        .env("RUST_LOG", "info,libp2p=warn")
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("provider: {line}");
        }
    });
    Daemon(child)
}

fn saxpy() -> Submission {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/kernels/saxpy/job.toml");
    let job = load_job_file(&path, &JobLimits::default()).unwrap();
    Submission {
        spec: job.spec,
        inputs: job.inputs.into_shared(),
        options: JobOptions {
            max_attempts: 1,
            ..JobOptions::default()
        },
    }
}

/// About a second of matmul on lavapipe: long enough to kill the provider mid-run.
fn slow() -> Submission {
    let (spec, inputs) = hashgrid_node::executor::bench::matmul_job(512);
    Submission {
        spec,
        inputs: inputs.into_shared(),
        options: JobOptions {
            max_attempts: 1,
            ..JobOptions::default()
        },
    }
}

/// Waits until the buyer's book holds an ask from a provider whose ad lists a new address.
async fn wait_for_ask(buyer: &NodeHandle, newer_than: u64) -> u64 {
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let book = buyer.market().book().await.unwrap();
        if let Some(a) = book.asks.iter().find(|a| a.seq > newer_than) {
            return a.seq;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the provider's ask never arrived"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn run_job(buyer: &NodeHandle, sub: Submission) -> hashgrid_node::JobRecord {
    let id = buyer.jobs().submit(sub).await.unwrap();
    tokio::time::timeout(LIMIT, buyer.jobs().wait(&id))
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_provider_keeps_every_receipt_and_an_intact_chain() {
    let network = Network::new(NET).unwrap();
    let buyer = Node::builder()
        .network(network.clone())
        .mdns(false)
        .listen("/ip4/127.0.0.1/tcp/0".parse().unwrap())
        .provider_down_for(Duration::from_millis(200))
        .start()
        .await
        .unwrap();
    let boot = buyer.peers().listen_addrs().await.unwrap()[0].to_string();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("provider");

    // First run: one job completes (receipt 0).
    let mut provider = spawn_provider(&data, &boot);
    let seq = wait_for_ask(&buyer, 0).await;
    let a = run_job(&buyer, saxpy()).await;
    assert_eq!(a.state, JobState::Done, "{:?}", a.attempts);
    let receipt_a = a.receipt.clone().unwrap();

    // A slow job: SIGKILL the provider while it runs.
    let mut events = buyer.events();
    let id = buyer.jobs().submit(slow()).await.unwrap();
    loop {
        match tokio::time::timeout(LIMIT, events.recv()).await.unwrap() {
            Ok(NodeEvent::Job(u)) if u.job == id && u.state == JobState::Running => break,
            Ok(NodeEvent::Job(u)) if u.job == id && u.state.is_terminal() => {
                panic!("the slow job ended before it could be killed: {u:?}")
            }
            _ => {}
        }
    }
    let status = Command::new("kill")
        .args(["-KILL", &provider.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    provider.0.wait().unwrap();
    let killed = tokio::time::timeout(LIMIT, buyer.jobs().wait(&id))
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(killed.state, JobState::Failed { .. }),
        "{killed:?}"
    );
    assert!(killed.receipt.is_none());

    // Restart on the same data dir: the next job's receipt links to receipt 0.
    provider = spawn_provider(&data, &boot);
    wait_for_ask(&buyer, seq).await;
    tokio::time::sleep(Duration::from_millis(300)).await; // past provider_down_for
    let c = run_job(&buyer, saxpy()).await;
    assert_eq!(c.state, JobState::Done, "{:?}", c.attempts);
    let receipt_c = c.receipt.clone().unwrap();
    let provider_key = receipt_a.signed.verify(&network).unwrap().provider;
    let mut audit = ChainAuditor::new(provider_key, network.clone());
    let chain: [&Signed<_>; 2] = [&receipt_a.signed, &receipt_c.signed];
    for r in chain {
        audit.push(r).unwrap();
    }
    assert_eq!(audit.len(), 2);

    // Stop it cleanly and audit its store from the command line.
    tokio::time::sleep(Duration::from_millis(300)).await;
    Command::new("kill")
        .args(["-TERM", &provider.0.id().to_string()])
        .status()
        .unwrap();
    assert!(provider.0.wait().unwrap().success());
    let out = Command::new(env!("CARGO_BIN_EXE_hashgrid-node"))
        .args([
            "receipts",
            "--data-dir",
            data.to_str().unwrap(),
            "--network",
            NET,
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["receipts"], 2, "{report}");
    assert_eq!(report["countersigned"], 2, "{report}");
    assert_eq!(
        report["head"],
        serde_json::json!(receipt_c.id().to_string())
    );
    buyer.shutdown().await;
}
