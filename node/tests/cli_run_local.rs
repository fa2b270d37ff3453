//! `hashgrid run-local` as a user runs it: the real binary, on a reference kernel and on a bad
//! job file.

use std::path::PathBuf;
use std::process::Command;

fn kernels() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/kernels")
}

#[test]
fn run_local_json_prints_one_object_and_writes_outputs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(env!("CARGO_BIN_EXE_hashgrid"))
        .arg("run-local")
        .arg(kernels().join("mix/job.toml"))
        .arg("--out")
        .arg(dir.path())
        .arg("--json")
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("stdout is one JSON object");
    assert!(v["adapter"].as_str().is_some_and(|a| !a.is_empty()));
    assert!(v["gpu_ms"].as_f64().is_some_and(|t| t > 0.0));
    let o = &v["outputs"]["out"];
    assert_eq!(o["bytes"], 16384);
    let bytes = std::fs::read(dir.path().join("out.bin")).expect("out.bin written");
    assert_eq!(bytes.len(), 16384);
    assert_eq!(
        o["blake3"].as_str(),
        Some(blake3::hash(&bytes).to_hex().as_str())
    );
}

#[test]
fn run_local_bad_job_exits_nonzero_with_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("bad.wgsl"),
        "@group(0) @binding(0) var<storage, read_write> o: array<u32>;\n@compute @workgroup_size(1)\nfn main() { o[0] = 1u +; }\n",
    )
    .expect("write");
    std::fs::write(
        dir.path().join("job.toml"),
        "name = \"bad\"\n[buffers]\no = { size = 4, output = true }\n[[pass]]\nshader = \"bad.wgsl\"\nentry = \"main\"\nworkgroups = [1, 1, 1]\nbindings = { 0 = \"o\" }\n",
    )
    .expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_hashgrid"))
        .arg("run-local")
        .arg(dir.path().join("job.toml"))
        .arg("--json")
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.wgsl:3:"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(out.stdout.is_empty());
    let missing = Command::new(env!("CARGO_BIN_EXE_hashgrid"))
        .args(["run-local", "/nonexistent/job.toml"])
        .output()
        .expect("runs");
    assert!(!missing.status.success());
}
