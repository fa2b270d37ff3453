//! Runnable hashgrid examples. The job files and WGSL kernels live in `kernels/`; the Rust
//! examples in `examples/` (run with `cargo run -p hashgrid-examples --example NAME`).

use std::path::PathBuf;

/// The directory of the reference kernels (`examples/kernels`).
pub fn kernels_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("kernels")
}
