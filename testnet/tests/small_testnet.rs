//! A small testnet of real `hashgrid-node` processes (5 sites, 10 jobs): every job succeeds,
//! every receipt verifies and is in its provider's chain, settlement adds up, and no process is
//! left running afterwards.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The hashgrid-node binary next to this package's binary; built if `cargo test` did not.
fn node_binary() -> PathBuf {
    let dir = Path::new(env!("CARGO_BIN_EXE_hashgrid-testnet"))
        .parent()
        .unwrap()
        .to_path_buf();
    let bin = dir.join("hashgrid-node");
    if !bin.is_file() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "-p", "hashgrid-node", "--bin", "hashgrid-node"])
            .status()
            .unwrap();
        assert!(status.success());
    }
    assert!(bin.is_file(), "{} missing", bin.display());
    bin
}

/// Processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(needle) {
            found.push(cmd);
        }
    }
    found
}

#[test]
fn small_testnet_runs_every_job_and_balances() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    let json = dir.path().join("report.json");
    let out = Command::new(env!("CARGO_BIN_EXE_hashgrid-testnet"))
        .args([
            "--workload",
            "jobs",
            "--sites",
            "5",
            "--regions",
            "2",
            "--buyers",
            "2",
            "--jobs",
            "10",
        ])
        .args(["--duration", "8"])
        .arg("--node-binary")
        .arg(node_binary())
        .arg("--work-dir")
        .arg(&work)
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "exit {:?}\n{stdout}\n{stderr}",
        out.status.code()
    );
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(r["jobs_ok"], 10, "{stdout}");
    assert_eq!(r["jobs_failed"], 0, "{stdout}");
    assert_eq!(r["receipts_held"], 10);
    assert_eq!(r["receipts_verified"], 10);
    assert_eq!(r["receipts_in_provider_chains"], 10);
    assert_eq!(r["chains_intact"], 5);
    let s = &r["settlement"];
    assert_eq!(s["balanced"], true, "{s}");
    assert_eq!(s["buyers_total_msat"], s["providers_total_msat"]);
    let by_buyers: u64 = s["buyers"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    let by_providers: u64 = s["providers"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(by_buyers, by_providers);
    assert_eq!(r["no_processes_left"], true);
    assert!(json.with_extension("svg").is_file());
    // Independently of the report: nothing runs from the work dir any more.
    let left = processes_mentioning(work.to_str().unwrap());
    assert!(left.is_empty(), "left running: {left:?}");
}
