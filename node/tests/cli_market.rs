//! The `hashgrid` buyer CLI against an in-process testnet of two providers: `init`, `offers`,
//! `submit`, `jobs`, `status`, `result`, `receipts`, and its documented exit codes.

#![allow(clippy::unwrap_used)] // helpers outside #[test] fns: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use hashgrid_node::{AskSpec, ExecConfig, Executor, Node, NodeHandle};
use hashgrid_protocol::{ContentId, Msat, Network};

const NET: &str = "cli-test";

fn kernel(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../examples/kernels/{name}/job.toml"))
}

async fn provider(price: u64, boot: Option<&hashgrid_node::Multiaddr>) -> NodeHandle {
    let exec = tokio::task::spawn_blocking(|| {
        Executor::start(ExecConfig {
            max_concurrent: 1,
            memory_bytes: Some(8 << 30),
            ..ExecConfig::default()
        })
    })
    .await
    .unwrap()
    .unwrap();
    let gpu = exec.profile();
    let mut b = Node::builder()
        .network(Network::new(NET).unwrap())
        .listen("/ip4/127.0.0.1/tcp/0".parse().unwrap())
        .mdns(false)
        .region(if price < 100 { "us-east" } else { "eu-north" })
        .gpu_profiles(vec![gpu.clone()])
        .executor(exec);
    if let Some(a) = boot {
        b = b.bootstrap(a.clone());
    }
    let node = b.start().await.unwrap();
    node.market()
        .post_ask(AskSpec {
            gpu,
            units: 1,
            price: Msat(price),
            max_seconds: 600,
        })
        .await
        .unwrap();
    node
}

/// Runs `hashgrid` with the data dir, network and bootstrap flags, off the async runtime.
async fn hashgrid(data: &Path, boot: &str, args: &[&str]) -> Output {
    let mut all: Vec<String> = vec![
        "--data-dir".into(),
        data.to_str().unwrap().into(),
        "--network".into(),
        NET.into(),
        "--bootstrap".into(),
        boot.into(),
    ];
    all.extend(args.iter().map(|s| s.to_string()));
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_hashgrid"))
            .args(&all)
            .env("NO_COLOR", "1")
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

fn json(o: &Output) -> serde_json::Value {
    assert!(
        o.status.success(),
        "exit {:?}: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buyer_cli_finds_offers_and_runs_jobs_through_the_market() {
    let cheap = provider(50, None).await;
    let boot_addr = cheap.peers().listen_addrs().await.unwrap()[0].clone();
    let dear = provider(150, Some(&boot_addr)).await;
    let boot = boot_addr.to_string();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("buyer");

    // init: keys and config, PeerId printed.
    let v = json(&hashgrid(&data, &boot, &["init", "--json"]).await);
    assert!(v["peer_id"].as_str().unwrap().starts_with("12D3"), "{v}");
    assert!(data.join("config.toml").exists());

    // offers --json lists both providers, cheapest first.
    let v = json(&hashgrid(&data, &boot, &["offers", "--json"]).await);
    let offers = v.as_array().unwrap();
    assert_eq!(offers.len(), 2, "{v}");
    assert_eq!(offers[0]["provider"], cheap.public_key().to_string());
    assert_eq!(offers[0]["price_msat"], 50);
    assert_eq!(offers[1]["provider"], dear.public_key().to_string());
    // The models each site's ad lists (none preloaded here).
    assert!(
        offers
            .iter()
            .all(|o| o["models"].as_array().is_some_and(Vec::is_empty)),
        "{v}"
    );
    // Filters apply.
    let v = json(&hashgrid(&data, &boot, &["offers", "--json", "--region", "eu-north"]).await);
    assert_eq!(v.as_array().unwrap().len(), 1, "{v}");

    // submit --json: outputs whose hashes match the files and the receipt.
    let out = dir.path().join("out");
    let saxpy = kernel("saxpy");
    let v = json(
        &hashgrid(
            &data,
            &boot,
            &[
                "submit",
                saxpy.to_str().unwrap(),
                "--json",
                "--out",
                out.to_str().unwrap(),
                "--max-price",
                "100",
            ],
        )
        .await,
    );
    assert_eq!(v["state"], "done", "{v}");
    assert_eq!(v["provider"], cheap.public_key().to_string());
    let hash = v["outputs"]["out"]["blake3"].as_str().unwrap();
    let bytes = std::fs::read(out.join("out.bin")).unwrap();
    assert_eq!(ContentId::of(&bytes).to_string(), hash);
    let local = Command::new(env!("CARGO_BIN_EXE_hashgrid"))
        .args(["run-local", saxpy.to_str().unwrap(), "--json"])
        .output()
        .unwrap();
    assert_eq!(json(&local)["outputs"]["out"]["blake3"], hash);
    let verify = Command::new(env!("CARGO_BIN_EXE_hashgrid"))
        .args(["receipt", "verify"])
        .arg(out.join("receipt.json"))
        .arg("--outputs")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    let job = v["job"].as_str().unwrap().to_string();

    // A price nobody meets: exit 3, and the error says what to do.
    let o = hashgrid(
        &data,
        &boot,
        &["submit", saxpy.to_str().unwrap(), "--max-price", "10"],
    )
    .await;
    assert_eq!(
        o.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--max-price"), "{err}");

    // The local store: jobs, status, result, receipts.
    let v = json(&hashgrid(&data, &boot, &["jobs", "--json"]).await);
    let jobs = v.as_array().unwrap();
    assert_eq!(jobs.len(), 2, "{v}");
    assert_eq!(jobs[0]["state"], "done");
    assert_eq!(jobs[1]["state"], "failed");
    assert_eq!(jobs[1]["failure"], "NoMatch");
    let v = json(&hashgrid(&data, &boot, &["status", &job[..10], "--json"]).await);
    assert_eq!(v["job"], job);
    let again = dir.path().join("again");
    let o = hashgrid(
        &data,
        &boot,
        &["result", &job, "--out", again.to_str().unwrap()],
    )
    .await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read(again.join("out.bin")).unwrap(), bytes);
    let v = json(&hashgrid(&data, &boot, &["receipts", "--verify", "--json"]).await);
    assert_eq!(v[0]["verified"], true, "{v}");

    // What the buyer has seen of its providers: the one that ran the job, once, in good
    // standing, paid what its receipt charged.
    let p = json(&hashgrid(&data, &boot, &["providers", "--json"]).await);
    let rows = p.as_array().unwrap();
    assert_eq!(rows.len(), 1, "{p}");
    assert_eq!(rows[0]["provider"], v[0]["provider"], "{p}");
    assert_eq!(rows[0]["completed"], 1, "{p}");
    assert_eq!(rows[0]["failed"], 0, "{p}");
    assert_eq!(rows[0]["disputed"], 0, "{p}");
    assert_eq!(rows[0]["spent_msat"], v[0]["charge_msat"], "{p}");
    assert_eq!(rows[0]["standing"], "good", "{p}");

    // --verify replicate:2: both providers run it, their outputs agree, both receipts are
    // countersigned and saved, and the second's charge is what the assurance cost.
    let v = json(
        &hashgrid(
            &data,
            &boot,
            &[
                "submit",
                saxpy.to_str().unwrap(),
                "--json",
                "--verify",
                "replicate:2",
            ],
        )
        .await,
    );
    let ver = &v["verification"];
    assert_eq!(ver["mode"], "replicate:2", "{v}");
    assert_eq!(ver["outcome"], "agreed", "{v}");
    let runs = ver["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2, "{v}");
    assert_ne!(runs[0]["provider"], runs[1]["provider"]);
    assert!(runs.iter().all(|r| r["countersigned"] == true), "{v}");
    assert_eq!(ver["extra_msat"], runs[1]["charge_msat"], "{v}");
    assert_eq!(v["outputs"]["out"]["blake3"].as_str().unwrap(), hash);
    let second = data
        .join("receipts")
        .join(format!("{}.run2.json", v["job"].as_str().unwrap()));
    let check = Command::new(env!("CARGO_BIN_EXE_hashgrid"))
        .args(["receipt", "verify"])
        .arg(&second)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let p = json(&hashgrid(&data, &boot, &["providers", "--json"]).await);
    let rows = p.as_array().unwrap();
    assert_eq!(rows.len(), 2, "{p}");
    assert!(rows.iter().all(|r| r["spot_checks_passed"] == 1), "{p}");
    // A mode that makes no sense is refused before any network traffic.
    let o = hashgrid(
        &data,
        &boot,
        &["submit", saxpy.to_str().unwrap(), "--verify", "spot:7"],
    )
    .await;
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("spot:P"));

    cheap.shutdown().await;
    dear.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_jobs_fail_with_exit_2_before_any_network_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("buyer");
    // Nothing listens on this address: a command that touched the network would fail
    // differently (exit 1) and would create the store.
    let nowhere = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWEyoppNCUx8Yx66oV9fJnriXwCcXwDDUA2kj6vnc6iDEp";

    let malformed = dir.path().join("bad.toml");
    std::fs::write(&malformed, "name = \"x\"\n[[pass]]\nshader = 3\n").unwrap();
    let o = hashgrid(&data, nowhere, &["submit", malformed.to_str().unwrap()]).await;
    assert_eq!(
        o.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("bad.toml"));

    // Valid TOML, invalid WGSL.
    let src = kernel("saxpy");
    let job_dir = dir.path().join("wgsl");
    std::fs::create_dir_all(&job_dir).unwrap();
    for f in std::fs::read_dir(src.parent().unwrap()).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, job_dir.join(f.file_name().unwrap())).unwrap();
    }
    std::fs::write(
        job_dir.join("saxpy.wgsl"),
        "@compute @workgroup_size(64)\nfn main( {\n",
    )
    .unwrap();
    let o = hashgrid(
        &data,
        nowhere,
        &["submit", job_dir.join("job.toml").to_str().unwrap()],
    )
    .await;
    assert_eq!(
        o.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("saxpy.wgsl"), "{err}");
    assert!(err.contains("hint:"), "{err}");

    assert!(!data.join("store").exists(), "no node was started");
}

/// Ctrl-C during `submit` cancels the job cleanly: exit 130, and the job is recorded as
/// cancelled (nothing is countersigned for it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_cancels_a_running_submit() {
    use std::io::{BufRead, BufReader};
    let p = provider(50, None).await;
    let boot = p.peers().listen_addrs().await.unwrap()[0].to_string();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("buyer");
    // A job that runs for seconds on lavapipe: 64k invocations × 50k iterations.
    let job = dir.path().join("slow");
    std::fs::create_dir_all(&job).unwrap();
    std::fs::write(
        job.join("slow.wgsl"),
        "@group(0) @binding(0) var<storage, read_write> out: array<f32>;\n\
         @compute @workgroup_size(64)\n\
         fn main(@builtin(global_invocation_id) id: vec3<u32>) {\n\
           var acc = 0.0;\n\
           for (var i = 0u; i < 50000u; i++) { acc = acc * 0.999 + f32(i ^ id.x); }\n\
           out[id.x] = acc;\n\
         }\n",
    )
    .unwrap();
    std::fs::write(
        job.join("job.toml"),
        "name = \"slow\"\n[buffers]\nout = { size = 262144, output = true }\n\
         [[pass]]\nshader = \"slow.wgsl\"\nentry = \"main\"\nworkgroups = [1024, 1, 1]\n\
         bindings = { 0 = \"out\" }\n",
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_hashgrid"))
        .arg("--data-dir")
        .arg(&data)
        .args(["--network", NET, "--bootstrap", &boot, "submit"])
        .arg(job.join("job.toml"))
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let lines = tokio::task::spawn_blocking(move || {
        let mut seen = Vec::new();
        loop {
            let line = rx
                .recv_timeout(std::time::Duration::from_secs(30))
                .expect("submit never reached `running`");
            let running = line.contains("running");
            seen.push(line);
            if running {
                return (seen, rx);
            }
        }
    })
    .await
    .unwrap();
    let (seen, rx) = lines;
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(exit.code(), Some(130), "{seen:?}");
    // The reader thread may still be forwarding the last lines when the child has exited:
    // drain until it hangs up (stderr closed), not just what has arrived so far.
    let rest: Vec<String> = tokio::task::spawn_blocking(move || {
        let mut rest = Vec::new();
        while let Ok(line) = rx.recv_timeout(std::time::Duration::from_secs(10)) {
            rest.push(line);
        }
        rest
    })
    .await
    .unwrap();
    assert!(rest.iter().any(|l| l.contains("cancelled")), "{rest:?}");
    let v = json(&hashgrid(&data, &boot, &["jobs", "--json"]).await);
    assert_eq!(v[0]["state"], "failed", "{v}");
    assert_eq!(v[0]["reason"], "cancelled", "{v}");
    assert!(v[0]["receipt_id"].is_null());
    p.shutdown().await;
}
