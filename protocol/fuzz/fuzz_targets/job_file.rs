//! A TOML job file (with in-memory referenced files): parse. Must never panic.
#![no_main]
use hashgrid_protocol::jobfile::{SourceFiles, parse_job};
use hashgrid_protocol::JobLimits;
use libfuzzer_sys::fuzz_target;
use std::path::Path;

struct Mem;
impl SourceFiles for Mem {
    fn read(&self, path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let data = match name {
            "k.wgsl" => b"@compute @workgroup_size(1) fn main() {}".to_vec(),
            "x.bin" => vec![1u8; 64],
            _ => return Err(std::io::ErrorKind::NotFound.into()),
        };
        if data.len() as u64 > max {
            return Err(std::io::ErrorKind::InvalidData.into());
        }
        Ok(data)
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = parse_job(Path::new("fuzz/job.toml"), text, &Mem, &JobLimits::default());
    }
});
