//! `hashgrid serve` on a local grid of real site processes, driven by the official `openai`
//! Python package (node/tests/openai_gateway.py): models, chat (plain and streamed: the same
//! text, in several chunks), completions, embeddings, and errors in OpenAI's shapes (404, 400,
//! 401). Greedy answers through the market equal `hashgrid generate --local`'s, and every
//! request left a countersigned receipt that `hashgrid receipts` lists.
//!
//! Needs the real models (`HASHGRID_SMOLLM2`, `HASHGRID_MINILM`) and a Python with `openai`
//! (`HASHGRID_PYTHON`, default `python3`, and `HASHGRID_PYTHONPATH`); `.ci/run` provides all three and sets
//! `HASHGRID_REQUIRE_OPENAI=1` so that CI cannot skip it.

#![allow(clippy::unwrap_used)] // helpers outside #[test] fns: a failed unwrap is a failed test

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const NET: &str = "gateway-openai-test";
const QUESTION: &str = "What is the capital of France? Answer in one sentence.";

fn env_path(var: &str) -> Option<PathBuf> {
    match std::env::var(var) {
        Ok(p) if Path::new(&p).exists() => Some(PathBuf::from(p)),
        _ => None,
    }
}

/// A Python command that can import `openai` (`HASHGRID_PYTHON`, default `python3`, with
/// `HASHGRID_PYTHONPATH` as its `PYTHONPATH` when set), or `None`: a skip, unless CI requires it.
fn python() -> Option<Command> {
    let py = std::env::var("HASHGRID_PYTHON").unwrap_or_else(|_| "python3".into());
    let cmd = || {
        let mut c = Command::new(&py);
        if let Ok(p) = std::env::var("HASHGRID_PYTHONPATH") {
            c.env("PYTHONPATH", p);
        }
        c
    };
    let ok = cmd()
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return Some(cmd());
    }
    assert!(
        std::env::var("HASHGRID_REQUIRE_OPENAI").is_err(),
        "{py} cannot import openai, and HASHGRID_REQUIRE_OPENAI is set"
    );
    eprintln!("note: {py} has no openai package; skipping (.ci/run installs it)");
    None
}

/// Kills the child when dropped (a failed test leaves no process behind).
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts a site: a `hashgrid-node run` process with its own data dir and port.
fn site(dir: &Path, price: u64, boot: Option<&str>) -> (Proc, String) {
    let node = env!("CARGO_BIN_EXE_hashgrid-node");
    let id = Command::new(node)
        .arg("--data-dir")
        .arg(dir)
        .arg("id")
        .output()
        .unwrap();
    assert!(
        id.status.success(),
        "{}",
        String::from_utf8_lossy(&id.stderr)
    );
    let peer = String::from_utf8_lossy(&id.stdout).trim().to_string();
    let port = free_port();
    let mut cmd = Command::new(node);
    cmd.arg("--data-dir")
        .arg(dir)
        .args(["run", "--network", NET, "--listen"])
        .arg(format!("/ip4/127.0.0.1/tcp/{port}"))
        .args(["--price", &price.to_string(), "--units", "2", "--no-mdns"]);
    if let Some(b) = boot {
        cmd.args(["--bootstrap", b]);
    }
    let log = std::fs::File::create(dir.join("node.log")).unwrap();
    let child = cmd
        .env("RUST_LOG", "info,libp2p=warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    // Ready once it accepts connections (it opens the GPU adapter first).
    let by = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < by,
            "site {} did not start listening",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    (Proc(child), format!("/ip4/127.0.0.1/tcp/{port}/p2p/{peer}"))
}

fn hashgrid(buyer: &Path, boot: &str, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hashgrid"));
    c.arg("--data-dir")
        .arg(buyer)
        .args(["--network", NET, "--bootstrap", boot])
        .args(args)
        .env("NO_COLOR", "1");
    c
}

fn ok(o: &Output) -> serde_json::Value {
    assert!(
        o.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&o.stdout)))
}

#[test]
fn the_openai_sdk_gets_answers_from_the_grid_with_receipts() {
    let (Some(smol), Some(minilm)) = (env_path("HASHGRID_SMOLLM2"), env_path("HASHGRID_MINILM"))
    else {
        eprintln!("note: HASHGRID_SMOLLM2 / HASHGRID_MINILM not set; skipping (.ci/run sets them)");
        return;
    };
    let Some(mut py) = python() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let (s0_dir, s1_dir, buyer) = (
        tmp.path().join("site0"),
        tmp.path().join("site1"),
        tmp.path().join("buyer"),
    );
    let (_s0, boot) = site(&s0_dir, 100, None);
    let (_s1, _) = site(&s1_dir, 120, Some(&boot));
    let keys = tmp.path().join("keys");
    std::fs::write(&keys, "# the office's key\nsk-office-1\n").unwrap();

    let port = free_port();
    let mut serve = Proc(
        hashgrid(
            &buyer,
            &boot,
            &[
                "serve",
                "--model",
                smol.to_str().unwrap(),
                "--model",
                &format!("minilm={}", minilm.display()),
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--api-keys-file",
                keys.to_str().unwrap(),
                "--metrics",
                "127.0.0.1:0",
                // Every request verified by the other site: generated tokens compare up to
                // a near-tie, embeddings within a tolerance, both runs paid.
                "--verify",
                "replicate:2",
            ],
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap(),
    );
    // The banner comes once the models are loaded and the book has the sites' asks.
    let stderr = serve.0.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut log = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let ready = line.starts_with("hashgrid serve: http://");
                log.push(line);
                if ready {
                    break;
                }
            }
            Err(_) => panic!("hashgrid serve did not start:\n{}", log.join("\n")),
        }
    }
    let metrics_line = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("hashgrid serve --metrics says where");
        if line.starts_with("metrics: http://") {
            break line;
        }
    };
    let metrics_addr = metrics_line
        .strip_prefix("metrics: http://")
        .and_then(|r| r.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("{metrics_line}"))
        .to_string();

    let run = py
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai_gateway.py"))
        .env("HASHGRID_BASE_URL", format!("http://127.0.0.1:{port}/v1"))
        .env("HASHGRID_API_KEY", "sk-office-1")
        .env("HASHGRID_CHAT_MODEL", "SmolLM2-135M-Instruct.Q4_1")
        .env("HASHGRID_EMBED_MODEL", "minilm")
        .output()
        .unwrap();
    let seen = match run.status.success() {
        true => ok(&run),
        false => {
            let rest: Vec<String> = rx.try_iter().collect();
            panic!(
                "the openai client failed:\n{}\n--- hashgrid serve ---\n{}\n{}",
                String::from_utf8_lossy(&run.stderr),
                log.join("\n"),
                rest.join("\n")
            );
        }
    };

    // Through the market, greedy: the same answer as this machine's engine gives.
    let local = hashgrid(
        &tmp.path().join("local"),
        &boot,
        &[
            "--json",
            "generate",
            "--model",
            smol.to_str().unwrap(),
            "--chat",
            "--prompt",
            QUESTION,
            "--max-tokens",
            "24",
            "--local",
        ],
    )
    .output()
    .unwrap();
    let local = ok(&local);
    assert_eq!(seen["chat"]["text"], local["text"], "market vs local");

    // The gateway's metrics count what the client did.
    let metrics = scrape(&metrics_addr);
    let sum = |prefix: &str| -> f64 {
        metrics
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(_, v)| v)
            .sum()
    };
    assert!(
        sum(r#"hashgrid_gateway_requests_total{route="/v1/chat/completions",status="200""#) >= 2.0,
        "{metrics:#?}"
    );
    assert!(sum(r#"hashgrid_gateway_requests_total{route="/v1/embeddings",status="200""#) >= 1.0);
    assert!(
        sum("hashgrid_gateway_requests_total{")
            > sum(r#"hashgrid_gateway_requests_total{route="/v1/chat/completions",status="200""#)
    );
    assert!(
        sum(r#"hashgrid_gateway_requests_total{route="/v1/models",status="401""#) >= 1.0,
        "the unauthorised request is counted: {metrics:#?}"
    );
    assert!(sum("hashgrid_gateway_time_to_first_token_seconds_count") >= 2.0);
    assert!(sum(r#"hashgrid_gateway_tokens_total{kind="completion""#) >= 2.0);
    let spent = sum("hashgrid_gateway_spent_msat_total");
    assert!(spent > 0.0);
    // Its node's metrics come with them.
    assert!(sum("hashgrid_buyer_jobs_total{") >= 6.0, "{metrics:#?}");
    assert_eq!(
        sum("hashgrid_buyer_spent_msat_total{"),
        spent,
        "the gateway's spend is what its node countersigned, the verifying runs included"
    );
    // Every job was run by both sites and they agreed.
    assert!(
        sum(r#"hashgrid_buyer_verifications_total{outcome="agreed""#) >= 6.0,
        "{metrics:#?}"
    );
    assert_eq!(
        sum("hashgrid_buyer_verifications_total{"),
        sum(r#"hashgrid_buyer_verifications_total{outcome="agreed""#)
    );

    // Stop the gateway (Ctrl-C), then its node's store lists a receipt for every job.
    let pid = serve.0.id().to_string();
    let _ = Command::new("kill").args(["-INT", &pid]).status();
    let stop_by = Instant::now() + Duration::from_secs(30);
    while serve.0.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < stop_by,
            "hashgrid serve did not stop on SIGINT"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let receipts = ok(
        &hashgrid(&buyer, &boot, &["--json", "receipts", "--verify"])
            .output()
            .unwrap(),
    );
    let ids: Vec<&str> = receipts
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["receipt_id"].as_str().unwrap())
        .collect();
    // Two chats, one completion, three embeddings.
    assert!(ids.len() >= 6, "{receipts}");
    for id in [&seen["chat"]["receipt_id"], &seen["stream"]["receipt_id"]] {
        assert!(ids.contains(&id.as_str().unwrap()), "{id} not in {ids:?}");
    }
    assert!(
        receipts
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["verified"] == serde_json::Value::Bool(true)),
        "{receipts}"
    );
}

/// `/metrics` of a `hashgrid serve --metrics` as `name{labels}` → value (a plain reading of the
/// text format's sample lines; node/tests/ops.rs checks the format with the reference parser).
fn scrape(addr: &str) -> std::collections::BTreeMap<String, f64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    text.lines()
        .filter(|l| l.starts_with("hashgrid_"))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}
