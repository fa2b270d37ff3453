//! Operating a site: a real `hashgrid-node run` daemon with `--metrics` and `--dashboard`.
//!
//! - `/metrics` parsed by the reference OpenMetrics parser (the Python `prometheus_client`
//!   package's): after N jobs it shows N receipts, the msat the buyer countersigned, the input
//!   cache's hit, the node's identity and libp2p's own metrics.
//! - The dashboard in real headless Chromium: after the jobs, the page lists each of them by
//!   agreement and shows the earnings (`HASHGRID_DASHBOARD_SCREENSHOT=PATH` also saves a
//!   screenshot, as docs/dashboard.png was made).
//! - SIGHUP with a changed price: a config that does not parse changes nothing; a good one
//!   replaces the ask (gossiped: the buyer's book shows the new price), and the job running
//!   meanwhile finishes under its agreement.
//!
//! `.ci/run` installs the parser (`HASHGRID_PYTHONPATH`) and Chromium and sets
//! `HASHGRID_REQUIRE_OPS=1`, so CI cannot skip them.

#![allow(clippy::unwrap_used)] // helpers outside #[test] fns: a failed unwrap is a failed test

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hashgrid_node::jobs::{IntoSharedInputs, JobOptions, Submission};
use hashgrid_node::{JobState, Node, NodeHandle};
use hashgrid_protocol::{Msat, Network};

mod support;
use support::{LIMIT, get, http_addr, spawn, wait_line};

const NET: &str = "ops-test";

/// Whether a tool this test needs is here; a skip, unless CI requires it.
fn required(what: &str, ok: bool) -> bool {
    if !ok {
        assert!(
            std::env::var("HASHGRID_REQUIRE_OPS").is_err(),
            "{what} is missing, and HASHGRID_REQUIRE_OPS is set"
        );
        eprintln!("note: {what} is missing; skipping that part (.ci/run installs it)");
    }
    ok
}

fn python() -> Command {
    let mut c = Command::new(std::env::var("HASHGRID_PYTHON").unwrap_or_else(|_| "python3".into()));
    if let Ok(p) = std::env::var("HASHGRID_PYTHONPATH") {
        c.env("PYTHONPATH", p);
    }
    c
}

/// Every sample of an OpenMetrics exposition, as the `prometheus_client` package parses it:
/// `name{label="value",...}` (labels sorted) → value. `None` when the package is missing.
fn parse_openmetrics(text: &str) -> Option<BTreeMap<String, f64>> {
    const SCRIPT: &str = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = {}
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
        out[f"{s.name}{{{labels}}}"] = s.value
print(json.dumps(out))
"#;
    let ok = python()
        .args(["-c", "import prometheus_client"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !required("the prometheus_client Python package", ok) {
        return None;
    }
    let mut child = python()
        .args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the OpenMetrics parser refused the exposition: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(serde_json::from_slice(&out.stdout).unwrap())
}

fn sample(m: &BTreeMap<String, f64>, key: &str) -> f64 {
    *m.get(key)
        .unwrap_or_else(|| panic!("no sample {key}; have {:#?}", m.keys().collect::<Vec<_>>()))
}

async fn buyer() -> (NodeHandle, String) {
    let node = Node::builder()
        .network(Network::new(NET).unwrap())
        .mdns(false)
        .listen("/ip4/127.0.0.1/tcp/0".parse().unwrap())
        .start()
        .await
        .unwrap();
    let boot = node.peers().listen_addrs().await.unwrap()[0].to_string();
    (node, boot)
}

async fn wait_for_ask(node: &NodeHandle, price: u64) {
    let deadline = Instant::now() + LIMIT;
    loop {
        let book = node.market().book().await.unwrap();
        if book.asks.iter().any(|a| a.price == Msat(price)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no ask at {price} msat in the buyer's book: {:?}",
            book.asks.iter().map(|a| a.price).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn submission(job: hashgrid_node::executor::bench::BenchJob) -> Submission {
    let (spec, inputs) = job;
    Submission {
        spec,
        inputs: inputs.into_shared(),
        options: JobOptions::default(),
    }
}

fn config(dir: &Path, price: u64) -> std::path::PathBuf {
    let path = dir.join("site.toml");
    std::fs::write(
        &path,
        format!("units = 2\n\n[pricing]\ndefault_price = {price}\n"),
    )
    .unwrap();
    path
}

fn chromium() -> Option<String> {
    let found = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| {
            Command::new(b)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        });
    required("Chromium", found.is_some()).then(|| found.unwrap_or_default().to_string())
}

/// The page as Chromium rendered it after its scripts ran against the live node.
fn render_dashboard(browser: &str, url: &str, profile: &Path) -> String {
    let out = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--virtual-time-budget=5000",
            "--window-size=1400,1100",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("--dump-dom")
        .arg(url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The text of the element with `id` in a rendered page.
fn text_of(dom: &str, id: &str) -> String {
    let start = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id} in the page"));
    let open = start + dom[start..].find('>').unwrap() + 1;
    let close = open + dom[open..].find('<').unwrap();
    dom[open..close].trim().to_string()
}

/// `1234567` as the page writes it (en-US grouping).
fn grouped(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_dashboard_show_what_the_site_did() {
    let (buyer, boot) = buyer().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let cfg = config(dir.path(), 100);
    let (mut daemon, rx) = spawn(&[
        "run",
        "--config",
        cfg.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
        "--network",
        NET,
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--bootstrap",
        &boot,
        "--no-mdns",
        "--metrics",
        "127.0.0.1:0",
        "--dashboard",
        "127.0.0.1:0",
    ]);
    let started = wait_line(&rx, |l| l.contains("node started"));
    let metrics = http_addr(&wait_line(&rx, |l| l.contains("/metrics")));
    let dashboard = http_addr(&wait_line(&rx, |l| {
        l.contains("dashboard") && l.contains("http://")
    }));
    let site_peer = started
        .split("peer_id=")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    wait_for_ask(&buyer, 100).await;

    // Three jobs: the same 1 MiB input twice (the second finds it in the site's cache), and
    // a small matmul.
    let big = 1 << 20;
    let mut charges = 0u64;
    let mut agreements = Vec::new();
    for job in [
        hashgrid_node::executor::bench::copy_job(big),
        hashgrid_node::executor::bench::copy_job(big),
        hashgrid_node::executor::bench::matmul_job(64),
    ] {
        let id = buyer.jobs().submit(submission(job)).await.unwrap();
        let rec = buyer.jobs().wait(&id).await.unwrap();
        assert_eq!(rec.state, JobState::Done, "{:?}", rec.attempts);
        let receipt = rec.receipt.unwrap().signed.decode_unverified().unwrap();
        charges += receipt.charge.0;
        agreements.push(receipt.agreement_id.to_string());
    }
    assert!(charges > 0);

    let (status, ctype, body) = get(&metrics, "/metrics");
    assert_eq!(status, 200, "{body}");
    assert!(ctype.starts_with("application/openmetrics-text"), "{ctype}");
    if let Some(m) = parse_openmetrics(&body) {
        assert_eq!(sample(&m, "hashgrid_provider_receipts_total{}"), 3.0);
        assert_eq!(
            sample(&m, "hashgrid_provider_receipts_countersigned_total{}"),
            3.0
        );
        assert_eq!(
            sample(&m, r#"hashgrid_provider_jobs_total{outcome="done"}"#),
            3.0
        );
        assert_eq!(
            sample(&m, r#"hashgrid_provider_proposals_total{outcome="agreed"}"#),
            3.0
        );
        assert_eq!(
            sample(&m, "hashgrid_provider_charged_msat_total{}"),
            charges as f64
        );
        assert_eq!(
            sample(
                &m,
                r#"hashgrid_provider_earned_msat_total{method="ledger"}"#
            ),
            charges as f64,
            "earned = what the buyer countersigned"
        );
        assert_eq!(
            sample(
                &m,
                r#"hashgrid_settlement_owed_to_us_msat{state="accrued"}"#
            ),
            charges as f64
        );
        assert_eq!(sample(&m, "hashgrid_cache_hits_total{}"), 1.0);
        assert_eq!(sample(&m, "hashgrid_cache_hit_bytes_total{}"), big as f64);
        assert!(sample(&m, "hashgrid_cache_misses_total{}") >= 1.0);
        let busy: f64 = m
            .iter()
            .filter(|(k, _)| k.starts_with("hashgrid_gpu_busy_seconds_total{adapter="))
            .map(|(_, v)| *v)
            .sum();
        assert!(busy > 0.0, "GPU busy seconds");
        assert_eq!(sample(&m, "hashgrid_provider_job_gpu_seconds_count{}"), 3.0);
        assert_eq!(sample(&m, "hashgrid_provider_units{}"), 2.0);
        assert_eq!(sample(&m, "hashgrid_provider_units_busy{}"), 0.0);
        let info = m
            .keys()
            .find(|k| k.starts_with("hashgrid_node_info{"))
            .unwrap();
        assert!(info.contains(&format!("peer_id=\"{site_peer}\"")), "{info}");
        assert!(info.contains(&format!("network=\"{NET}\"")), "{info}");
        assert!(sample(&m, r#"hashgrid_book_orders{kind="ask"}"#) >= 1.0);
        assert!(sample(&m, "hashgrid_peers{}") >= 1.0);
        assert!(sample(&m, "hashgrid_store_size_bytes{}") > 0.0);
        assert!(
            m.keys().any(|k| k.starts_with("libp2p_")),
            "libp2p's own metrics"
        );
    }

    if let Some(browser) = chromium() {
        let profile = tempfile::tempdir().unwrap();
        let url = format!("http://{dashboard}/");
        let dom = render_dashboard(&browser, &url, profile.path());
        assert_eq!(text_of(&dom, "peer-id"), site_peer);
        assert_eq!(text_of(&dom, "jobs-done"), "3");
        assert_eq!(text_of(&dom, "earned"), grouped(charges));
        for a in &agreements {
            assert!(
                dom.contains(&format!("data-agreement=\"{a}\"")),
                "job {a} is not listed"
            );
        }
        assert!(dom.contains("countersigned"), "the jobs' state");
        if let Ok(path) = std::env::var("HASHGRID_DASHBOARD_SCREENSHOT") {
            let out = Command::new(&browser)
                .args([
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--hide-scrollbars",
                    "--virtual-time-budget=5000",
                    "--window-size=1400,1100",
                ])
                .arg(format!("--user-data-dir={}", profile.path().display()))
                .arg(format!("--screenshot={path}"))
                .arg(&url)
                .output()
                .unwrap();
            assert!(out.status.success());
        }
    }
    let (status, _, _) = get(&dashboard, "/api/state");
    assert_eq!(status, 200);

    let pid = daemon.0.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(daemon.0.wait().unwrap().success());
    buyer.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reprices_without_dropping_the_running_job() {
    let (buyer, boot) = buyer().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let cfg = config(dir.path(), 100);
    let (mut daemon, rx) = spawn(&[
        "run",
        "--config",
        cfg.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
        "--network",
        NET,
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--bootstrap",
        &boot,
        "--no-mdns",
        "--log-format",
        "json",
    ]);
    wait_for_ask(&buyer, 100).await;
    let pid = daemon.0.id().to_string();
    let hup = || {
        assert!(
            Command::new("kill")
                .args(["-HUP", &pid])
                .status()
                .unwrap()
                .success()
        );
    };

    // A job long enough to still be running when the price changes.
    let id = buyer
        .jobs()
        .submit(submission(hashgrid_node::executor::bench::matmul_job(1024)))
        .await
        .unwrap();
    let deadline = Instant::now() + LIMIT;
    loop {
        let rec = buyer.jobs().get(&id).unwrap().unwrap();
        if matches!(rec.state, JobState::Queued | JobState::Running) {
            break;
        }
        assert!(
            !rec.state.is_terminal(),
            "the job ended before the reload: {:?}",
            rec.state
        );
        assert!(Instant::now() < deadline, "the job never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // A config that does not parse changes nothing.
    std::fs::write(&cfg, "units = 2\n[pricing\n").unwrap();
    hup();
    wait_line(&rx, |l| l.contains("SIGHUP") && l.contains("does not load"));
    // The good one replaces the ask.
    config(dir.path(), 300);
    hup();
    wait_line(&rx, |l| l.contains("SIGHUP: offering") && l.contains("300"));
    wait_for_ask(&buyer, 300).await;
    let job_state = buyer.jobs().get(&id).unwrap().unwrap().state;
    eprintln!("job state when the new ask arrived: {job_state:?}");

    let rec = buyer.jobs().wait(&id).await.unwrap();
    assert_eq!(rec.state, JobState::Done, "{:?}", rec.attempts);
    // JSON logs: the receipt's line is an object carrying the job's span.
    let line = wait_line(&rx, |l| l.contains("receipt signed"));
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["fields"]["message"], "receipt signed", "{line}");
    assert!(
        v["spans"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["name"] == "job" && s["agreement"].is_string()),
        "no job span: {line}"
    );
    let agreement = rec.agreement.unwrap().signed.decode_unverified().unwrap();
    assert_eq!(
        agreement.price,
        Msat(100),
        "the running job keeps the price it was agreed at"
    );
    // The old ask is gone from the book: only the new price is offered.
    let deadline = Instant::now() + LIMIT;
    loop {
        let prices: Vec<Msat> = buyer
            .market()
            .book()
            .await
            .unwrap()
            .asks
            .iter()
            .map(|a| a.price)
            .collect();
        if prices == [Msat(300)] {
            break;
        }
        assert!(Instant::now() < deadline, "asks in the book: {prices:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(daemon.0.wait().unwrap().success());
    buyer.shutdown().await;
}

#[test]
fn a_taken_metrics_port_stops_the_daemon_before_it_starts() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (mut daemon, log) = spawn(&[
        "run",
        "--data-dir",
        data.to_str().unwrap(),
        "--network",
        NET,
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--no-mdns",
        "--metrics",
        &addr,
    ]);
    let line = wait_line(&log, |l| l.contains("metrics on"));
    assert!(line.contains(&format!("metrics on {addr}")), "{line}");
    let status = daemon.0.wait().unwrap();
    assert!(!status.success());
    // Nothing was started: no GPU opened, no node.
    assert!(
        wait_line_now(&log, |l| l.contains("GPU detected")
            || l.contains("node started"))
        .is_none()
    );
}

/// A line logged so far that `pred` accepts, without waiting.
fn wait_line_now(log: &support::Log, pred: impl Fn(&str) -> bool) -> Option<String> {
    log.lines().into_iter().find(|l| pred(l))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_wants_its_token() {
    use hashgrid_node::ops::server::{SiteInfo, serve_dashboard};
    let (node, _) = buyer().await;
    // Reachable from other machines without a token: refused at start.
    let open = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let err = serve_dashboard(
        open,
        node.clone(),
        SiteInfo::default(),
        None,
        std::future::pending(),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("needs a token"), "{err}");

    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve_dashboard(
        l,
        node.clone(),
        SiteInfo::default(),
        Some("s3cret-token".into()),
        async {
            let _ = stopped.await;
        },
    ));
    let status = |path: &'static str, bearer: Option<&'static str>| {
        let addr = addr.clone();
        tokio::task::spawn_blocking(move || {
            use std::io::Read;
            let mut s = std::net::TcpStream::connect(&addr).unwrap();
            let auth = bearer.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
            write!(
                s,
                "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n"
            )
            .unwrap();
            let mut text = String::new();
            s.read_to_string(&mut text).unwrap();
            text.split(' ').nth(1).unwrap().parse::<u16>().unwrap()
        })
    };
    assert_eq!(status("/api/state", None).await.unwrap(), 401);
    assert_eq!(status("/", None).await.unwrap(), 401);
    assert_eq!(status("/api/state?token=wrong", None).await.unwrap(), 401);
    assert_eq!(status("/api/state", Some("wrong")).await.unwrap(), 401);
    assert_eq!(
        status("/api/state?token=s3cret-token", None).await.unwrap(),
        200
    );
    assert_eq!(
        status("/api/state", Some("s3cret-token")).await.unwrap(),
        200
    );
    assert_eq!(status("/?token=s3cret-token", None).await.unwrap(), 200);
    let _ = stop.send(());
    server.await.unwrap().unwrap();
    node.shutdown().await;
}
