//! The `hashgrid-node run` daemon: logs its addresses with the PeerId, offers the asks of its
//! pricing policy to the network, stops cleanly on SIGTERM, and refuses a taken port clearly.

#![allow(clippy::unwrap_used)] // helpers outside #[test] fns: a failed unwrap is a failed test

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hashgrid_node::Node;
use hashgrid_protocol::{Msat, Network};

/// Bound on every wait for the daemon.
const LIMIT: Duration = Duration::from_secs(20);

fn network() -> Network {
    Network::new("daemon-test").unwrap()
}

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

/// Spawns the daemon and forwards its stderr lines.
fn spawn(args: &[&str]) -> (Daemon, mpsc::Receiver<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_hashgrid-node"))
        .args(args)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("daemon: {line}");
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (Daemon(child), rx)
}

fn wait_line(rx: &mpsc::Receiver<String>, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + LIMIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .expect("expected log line did not come");
        if pred(&line) {
            return line;
        }
    }
}

fn wait_exit(Daemon(child): &mut Daemon) -> std::process::ExitStatus {
    let deadline = Instant::now() + LIMIT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "daemon did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_offers_priced_asks_and_stops_on_sigterm() {
    let peer = Node::builder()
        .network(network())
        .mdns(false)
        .listen("/ip4/127.0.0.1/tcp/0".parse().unwrap())
        .start()
        .await
        .unwrap();
    let boot = peer.peers().listen_addrs().await.unwrap()[0].to_string();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("site.toml");
    std::fs::write(
        &config,
        "region = \"eu-north\"\n[[gpus]]\nname = \"NVIDIA H100\"\nmemory_gib = 80\n\
         [pricing]\ndefault_price = 100\nregion_adjust_percent = { \"eu-north\" = -10 }\n\
         [[pricing.rules]]\ngpu = \"h100\"\nprice = 500\n",
    )
    .unwrap();
    let data = dir.path().join("data");
    let (mut child, rx) = spawn(&[
        "run",
        "--config",
        config.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
        "--network",
        "daemon-test",
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--bootstrap",
        &boot,
        "--units",
        "3",
        "--no-mdns",
    ]);
    let line = wait_line(&rx, |l| l.contains("listening") && l.contains("/p2p/12D3"));
    assert!(line.contains("/ip4/127.0.0.1/tcp/"), "{line}");

    // The ask arrives with the policy's price: rule 500, region -10% = 450 msat, 3 units.
    let deadline = Instant::now() + LIMIT;
    let ask = loop {
        let book = peer.market().book().await.unwrap();
        if let Some(a) = book.asks.first() {
            break a.clone();
        }
        assert!(Instant::now() < deadline, "the daemon's ask never arrived");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        (ask.price, ask.units, ask.region.as_str()),
        (Msat(450), 3, "eu-north")
    );

    let pid = child.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    wait_line(&rx, |l| l.contains("node stopped"));
    let status = wait_exit(&mut child);
    assert!(status.success(), "{status:?}");

    // Same data dir and port taken by the running peer: a clear error and a failing exit.
    let taken = boot.rsplit_once("/p2p/").unwrap().0.to_string();
    let (mut child, rx) = spawn(&[
        "run",
        "--data-dir",
        data.to_str().unwrap(),
        "--network",
        "daemon-test",
        "--listen",
        &taken,
        "--no-mdns",
    ]);
    let line = wait_line(&rx, |l| l.contains("already in use"));
    assert!(line.contains("--listen"), "{line}");
    assert!(!wait_exit(&mut child).success());
    peer.shutdown().await;
}

#[test]
fn id_is_stable() {
    let dir = tempfile::tempdir().unwrap();
    let id = |d: &std::path::Path| {
        let out = Command::new(env!("CARGO_BIN_EXE_hashgrid-node"))
            .args(["id", "--data-dir", d.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    };
    let first = id(dir.path());
    assert!(first.starts_with("12D3"));
    assert_eq!(id(dir.path()), first);
}

/// With no `[[gpus]]`, the daemon detects this machine's adapter (lavapipe in CI), benchmarks
/// it, caches the benchmark in the data dir, and sells it: the ask that arrives names the real
/// adapter and carries the measured throughput.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_sells_the_detected_gpu() {
    let peer = Node::builder()
        .network(network())
        .mdns(false)
        .listen("/ip4/127.0.0.1/tcp/0".parse().unwrap())
        .start()
        .await
        .unwrap();
    let boot = peer.peers().listen_addrs().await.unwrap()[0].to_string();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (mut child, rx) = spawn(&[
        "run",
        "--data-dir",
        data.to_str().unwrap(),
        "--network",
        "daemon-test",
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--bootstrap",
        &boot,
        "--price",
        "42",
        "--no-mdns",
    ]);
    let line = wait_line(&rx, |l| l.contains("GPU detected"));
    assert!(line.contains("matmul_mflops"), "{line}");
    let deadline = Instant::now() + LIMIT;
    let ask = loop {
        let book = peer.market().book().await.unwrap();
        if let Some(a) = book.asks.first() {
            break a.clone();
        }
        assert!(Instant::now() < deadline, "the daemon's ask never arrived");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(ask.price, Msat(42));
    assert!(!ask.gpu.name.is_empty());
    assert!(ask.gpu.bench.matmul_mflops > 0, "{:?}", ask.gpu.bench);
    assert!(ask.gpu.limits.max_buffer_size > 0, "{:?}", ask.gpu.limits);
    assert!(
        data.join("bench-cache.json").exists(),
        "benchmark cached in the data dir"
    );
    let pid = child.0.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(wait_exit(&mut child).success());
}
