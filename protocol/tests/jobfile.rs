//! The TOML job file: good files parse, bad ones fail with a message that names the problem.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use hashgrid_protocol::*;
use std::path::Path;

const SHADER: &str = "@group(0) @binding(0) var<storage, read_write> out: array<f32>;\n@compute @workgroup_size(64) fn main() {}\n";

fn write(dir: &Path, name: &str, data: &[u8]) {
    std::fs::write(dir.join(name), data).unwrap();
}

fn setup(job: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "k.wgsl", SHADER.as_bytes());
    write(dir.path(), "x.bin", &[1, 0, 0, 0, 2, 0, 0, 0]);
    write(dir.path(), "job.toml", job.as_bytes());
    let p = dir.path().join("job.toml");
    (dir, p)
}

fn load(job: &str) -> Result<LoadedJob, JobFileError> {
    let (_dir, path) = setup(job);
    load_job_file(&path, &JobLimits::default())
}

fn err(job: &str) -> String {
    let e = load(job).unwrap_err();
    let s = e.to_string();
    assert!(s.contains("job.toml"), "error must name the job file: {s}");
    s
}

const GOOD: &str = r#"
name = "demo"
[buffers]
x      = { file = "x.bin" }
params = { f32 = [2.0, 0.5] }
counts = { u32 = [1, 2, 3] }
signed = { i32 = [-1] }
out    = { size = 4096, output = true }
[[pass]]
shader = "k.wgsl"
entry = "main"
workgroups = [16, 1, 1]
bindings = { 0 = "out", 1 = "x", 2 = "params" }
[[pass]]
shader = "k.wgsl"
workgroups = [4]
bindings = { 0 = "out" }
"#;

#[test]
fn good_job_file_parses() {
    let job = load(GOOD).unwrap();
    let spec = &job.spec;
    assert_eq!(spec.name, "demo");
    // Buffers sorted by name (deterministic spec id whatever the order in the file).
    let names: Vec<_> = spec.buffers.iter().map(|b| b.name.as_str()).collect();
    assert_eq!(names, ["counts", "out", "params", "signed", "x"]);
    let out = &spec.buffers[1];
    assert_eq!(
        (out.size, out.output, &out.init),
        (4096, true, &BufferInit::Zeroed)
    );
    let x = &spec.buffers[4];
    assert_eq!(x.size, 8);
    assert_eq!(
        x.init,
        BufferInit::Blob(ContentId::of(&[1, 0, 0, 0, 2, 0, 0, 0]))
    );
    let params = &spec.buffers[2];
    let bytes: Vec<u8> = [2.0f32, 0.5].iter().flat_map(|f| f.to_le_bytes()).collect();
    assert_eq!(params.init, BufferInit::Blob(ContentId::of(&bytes)));
    assert_eq!(job.inputs[&ContentId::of(&bytes)], bytes);
    assert_eq!(job.inputs.len(), 4);
    // The shared shader is stored once; default entry is `main`; workgroups padded.
    assert_eq!(spec.shaders.len(), 1);
    assert_eq!(spec.shaders[0].wgsl, SHADER);
    assert_eq!(spec.passes[1].entry, "main");
    assert_eq!(spec.passes[1].workgroups, [4, 1, 1]);
    assert_eq!(
        spec.passes[0].bindings,
        vec![
            Binding::whole(0, 1),
            Binding::whole(1, 4),
            Binding::whole(2, 2)
        ]
    );
    // Reordering the TOML does not change the spec id.
    let reordered = GOOD.replace(
        "x      = { file = \"x.bin\" }\nparams = { f32 = [2.0, 0.5] }",
        "params = { f32 = [2.0, 0.5] }\nx      = { file = \"x.bin\" }",
    );
    assert_ne!(reordered, GOOD);
    assert_eq!(load(&reordered).unwrap().spec.id(), spec.id());
}

#[test]
fn missing_buffer_is_named() {
    let job = GOOD.replace("2 = \"params\"", "2 = \"weights\"");
    let e = err(&job);
    assert!(e.contains("[[pass]] 1"), "{e}");
    assert!(e.contains("binding 2"), "{e}");
    assert!(e.contains("`weights`"), "{e}");
    assert!(e.contains("known: counts, out, params, signed, x"), "{e}");
}

#[test]
fn unknown_binding_name_is_named() {
    let job = GOOD.replace("1 = \"x\"", "input = \"x\"");
    let e = err(&job);
    assert!(e.contains("[[pass]] 1"), "{e}");
    assert!(e.contains("\"input\" is not a binding number"), "{e}");
}

#[test]
fn unreadable_file_is_named() {
    let job = GOOD.replace("x.bin", "missing.bin");
    let e = err(&job);
    assert!(e.contains("[buffers] `x` file"), "{e}");
    assert!(e.contains("missing.bin"), "{e}");
    assert!(e.contains("No such file"), "{e}");

    let job = GOOD.replace(
        "shader = \"k.wgsl\"\nentry",
        "shader = \"nope.wgsl\"\nentry",
    );
    let e = err(&job);
    assert!(e.contains("[[pass]] 1 shader"), "{e}");
    assert!(e.contains("nope.wgsl"), "{e}");

    // A directory where a file should be.
    let (dir, path) = setup(&GOOD.replace("x.bin", "sub"));
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    let e = load_job_file(&path, &JobLimits::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("[buffers] `x` file"), "{e}");

    // The job file itself.
    let e = load_job_file(Path::new("/nonexistent/job.toml"), &JobLimits::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("/nonexistent/job.toml") && e.contains("cannot read"),
        "{e}"
    );
}

#[test]
fn toml_errors_name_the_key_and_line() {
    let e = err(&GOOD.replace("workgroups = [4]", "workgroups = \"four\""));
    assert!(e.contains("workgroups"), "{e}");
    assert!(e.contains("line"), "{e}");
    let e = err(&GOOD.replace("entry = \"main\"", "entry = \"main\"\ncolour = 3"));
    assert!(e.contains("colour"), "{e}");
    let e = err(&GOOD.replace("name = \"demo\"", ""));
    assert!(e.contains("name"), "{e}");
    let e = err("this is [not toml");
    assert!(e.contains("line 1"), "{e}");
}

#[test]
fn buffer_entry_rules() {
    let e = err(&GOOD.replace("{ size = 4096, output = true }", "{ output = true }"));
    assert!(e.contains("`out`") && e.contains("exactly one"), "{e}");
    let e = err(&GOOD.replace("{ size = 4096,", "{ size = 4096, f32 = [1.0],"));
    assert!(e.contains("`out`") && e.contains("only one"), "{e}");
    let e = err(&GOOD.replace("size = 4096", "size = 0"));
    assert!(e.contains("`out`") && e.contains("at least 1"), "{e}");
    let e = err(&GOOD.replace("i32 = [-1]", "i32 = []"));
    assert!(e.contains("`signed`") && e.contains("empty"), "{e}");
    let e = err(&GOOD.replace(", output = true", ""));
    assert!(e.contains("output = true"), "{e}");
}

#[test]
fn limits_are_enforced() {
    let (_d, path) = setup(GOOD);
    let tight = JobLimits {
        max_buffer_bytes: 1024,
        ..JobLimits::default()
    };
    let e = load_job_file(&path, &tight).unwrap_err().to_string();
    assert!(
        e.contains("\"out\" is 4096 bytes, over the limit of 1024"),
        "{e}"
    );

    let tight = JobLimits {
        max_passes: 1,
        ..JobLimits::default()
    };
    let e = load_job_file(&path, &tight).unwrap_err().to_string();
    assert!(e.contains("2 passes is over the limit of 1"), "{e}");

    let tight = JobLimits {
        max_workgroups_per_dim: 8,
        ..JobLimits::default()
    };
    let e = load_job_file(&path, &tight).unwrap_err().to_string();
    assert!(e.contains("pass 1") && e.contains("per dimension"), "{e}");

    let tight = JobLimits {
        max_job_bytes: 4096,
        ..JobLimits::default()
    };
    let e = load_job_file(&path, &tight).unwrap_err().to_string();
    assert!(e.contains("per job"), "{e}");

    // An input file over the per-buffer limit is refused without being read.
    let tight = JobLimits {
        max_buffer_bytes: 4,
        ..JobLimits::default()
    };
    let e = load_job_file(&path, &tight).unwrap_err().to_string();
    assert!(
        e.contains("`x` file") && e.contains("over the limit"),
        "{e}"
    );

    let e = err(&GOOD.replace("workgroups = [4]", "workgroups = [4, 0, 1]"));
    assert!(e.contains("zero dimension"), "{e}");
    let e = err(&GOOD.replace("workgroups = [4]", "workgroups = []"));
    assert!(e.contains("1 to 3 numbers"), "{e}");
    let e = err(&GOOD.replace("workgroups = [4]", "workgroups = [4, 1, 1, 1]"));
    assert!(e.contains("1 to 3 numbers"), "{e}");
    let e = err(&GOOD.replace(
        "bindings = { 0 = \"out\" }",
        "bindings = { 0 = \"out\", \"00\" = \"x\" }",
    ));
    assert!(e.contains("binding 0 is given twice"), "{e}");
}

#[test]
fn no_passes_is_an_error() {
    let e = err("name = \"x\"\n[buffers]\nout = { size = 4, output = true }\n");
    assert!(e.contains("at least one [[pass]]"), "{e}");
}

const LOOPED: &str = r#"
name = "loop"
[buffers]
step = { size = 4 }
stop = { size = 4, output = true }
out  = { size = 4096, output = true }
[[pass]]
shader = "k.wgsl"
workgroups = [1]
bindings = { 0 = "out" }
[[pass]]
shader = "k.wgsl"
workgroups = [1]
bindings = { 0 = "out" }
[[pass]]
shader = "k.wgsl"
workgroups = [1]
bindings = { 0 = "out" }
[[loop]]
passes = [2, 3]
max_iters = 100
counter = "step"
stop = "stop"
check_every = 8
stream = ["out"]
"#;

#[test]
fn loops_parse_with_names_resolved() {
    let job = load(LOOPED).unwrap();
    let l = &job.spec.loops[0];
    assert_eq!((l.first, l.len, l.max_iters, l.check_every), (1, 2, 100, 8));
    let name = |i: Option<u32>| job.spec.buffers[i.unwrap() as usize].name.clone();
    assert_eq!(name(l.counter), "step");
    assert_eq!(name(l.stop), "stop");
    assert_eq!(name(l.stream.first().copied()), "out");
    // One pass before the loop, two passes 100 times.
    assert_eq!(job.spec.max_dispatches(), 201);
}

#[test]
fn bad_loops_are_named() {
    let e = err(&LOOPED.replace("passes = [2, 3]", "passes = [3, 4]"));
    assert!(
        e.contains("[[loop]] 1") && e.contains("within the 3 passes"),
        "{e}"
    );
    let e = err(&LOOPED.replace("counter = \"step\"", "counter = \"nope\""));
    assert!(e.contains("counter names buffer `nope`"), "{e}");
    let e = err(&LOOPED.replace("max_iters = 100", "max_iters = 0"));
    assert!(e.contains("max_iters must be at least 1"), "{e}");
    let e = err(&LOOPED.replace("check_every = 8", "check_every = 0"));
    assert!(e.contains("check_every"), "{e}");
    let e = err(&LOOPED.replace("stream = [\"out\"]", "stream = [\"step\"]"));
    assert!(e.contains("not an output"), "{e}");
    let e = err(&LOOPED.replace("max_iters = 100", "max_iters = 4000000000"));
    assert!(e.contains("dispatches, over the limit"), "{e}");
    let two = format!("{LOOPED}\n[[loop]]\npasses = [3, 3]\nmax_iters = 2\n");
    let e = err(&two);
    assert!(e.contains("not overlap"), "{e}");
}

#[test]
fn ranges_must_be_aligned_and_inside() {
    let mut spec = load(GOOD).unwrap().spec;
    let out = spec.buffers.iter().position(|b| b.name == "out").unwrap() as u32;
    let set = |spec: &mut JobSpec, offset: u64, size: u64| {
        spec.passes[1].bindings = vec![Binding {
            binding: 0,
            buffer: out,
            range: Some(BufferRange { offset, size }),
        }];
    };
    set(&mut spec, 256, 1024);
    spec.validate(&JobLimits::default()).unwrap();
    for (offset, size) in [
        (100, 64),
        (256, 0),
        (256, 6),
        (3840, 512),
        (u64::MAX - 255, 256),
    ] {
        set(&mut spec, offset, size);
        let e = spec
            .validate(&JobLimits::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("a range must start at a multiple of 256"), "{e}");
    }
}

#[test]
fn buffer_names_are_plain_names_never_paths() {
    let job = load(GOOD).unwrap();
    assert!(job.spec.validate(&JobLimits::default()).is_ok());
    for bad in ["../escape", "a/b", ".hidden", "a b"] {
        let mut spec = job.spec.clone();
        spec.buffers[1].name = bad.into();
        let e = spec
            .validate(&JobLimits::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("plain name"), "{bad:?}: {e}");
    }
}

#[test]
fn verification_is_read_from_the_job_file_and_checked() {
    use hashgrid_protocol::{Tolerance, VerifyMode};
    let job = load(
        &GOOD
            .replace("name = \"demo\"", "name = \"demo\"\nverify = \"spot:0.25\"")
            .replace(
                "out    = { size = 4096, output = true }",
                "out    = { size = 4096, output = true, compare = { rtol = 1e-5, atol = 1e-7 } }",
            ),
    )
    .unwrap();
    assert_eq!(job.verify.mode, VerifyMode::Spot { permille: 250 });
    assert_eq!(
        job.verify.tolerances.get("out"),
        Some(&Tolerance {
            rtol: 1e-5,
            atol: 1e-7
        })
    );
    // The default: no verification, every output exact.
    let plain = load(GOOD).unwrap();
    assert_eq!(plain.verify, Default::default());
    // The spec is the same either way: verification is the buyer's business.
    assert_eq!(plain.spec.id(), job.spec.id());

    let e = err(&GOOD.replace("name = \"demo\"", "name = \"demo\"\nverify = \"spot:2\""));
    assert!(e.contains("`verify`") && e.contains("at most 1"), "{e}");
    let e = err(&GOOD.replace(
        "params = { f32 = [2.0, 0.5] }",
        "params = { f32 = [2.0, 0.5], compare = { rtol = 0.1 } }",
    ));
    assert!(e.contains("outputs only"), "{e}");
    let e = err(&GOOD.replace(
        "out    = { size = 4096, output = true }",
        "out    = { size = 4095, output = true, compare = { atol = 0.1 } }",
    ));
    assert!(e.contains("multiple of 4"), "{e}");
    let e = err(&GOOD.replace(
        "out    = { size = 4096, output = true }",
        "out    = { size = 4096, output = true, compare = { rtol = -1.0 } }",
    ));
    assert!(e.contains("rtol"), "{e}");
    let e = err(&GOOD.replace(
        "out    = { size = 4096, output = true }",
        "out    = { size = 4096, output = true, compare = { rtol = 1.0, ulps = 2 } }",
    ));
    assert!(e.contains("ulps"), "{e}");
}
