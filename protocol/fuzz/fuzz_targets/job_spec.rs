//! A job spec received from a buyer: decode and validate. Must never panic.
#![no_main]
use hashgrid_protocol::{JobLimits, JobSpec};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(spec) = JobSpec::decode(data) {
        let _ = spec.validate(&JobLimits::default());
        let _ = spec.input_ids();
        let _ = spec.total_bytes();
    }
});
