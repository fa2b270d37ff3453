//! The TOML job file people write, parsed into a [`JobSpec`] and its input blobs.
//!
//! ```toml
//! name = "saxpy"
//! [buffers]
//! x      = { file = "x.bin" }              # raw little-endian bytes
//! params = { f32 = [2.0] }                 # small inline data: f32 / u32 / i32 arrays
//! out    = { size = 4096, output = true }  # zero-filled; returned to the buyer
//! # verify = "spot:0.1"                    # re-run on another provider with probability 0.1
//! # out  = { size = 4096, output = true, compare = { rtol = 1e-5, atol = 1e-6 } }
//! [[pass]]
//! shader = "saxpy.wgsl"                    # path relative to the job file
//! entry = "main"
//! workgroups = [16, 1, 1]
//! bindings = { 0 = "x", 2 = "out", 3 = "params" }   # @group(0) @binding(N)
//! ```
//!
//! [`parse_job`] is pure: it reads the files a job names through a [`SourceFiles`], so it can
//! be tested without a disk. [`load_job_file`] is the same over the file system.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use crate::id::ContentId;
use crate::job::{
    Binding, BufferInit, BufferSpec, JobLimits, JobSpec, JobSpecError, LoopSpec, PassSpec,
    ShaderSource,
};
use crate::limits::{MAX_JOB_FILE_BYTES, MAX_SHADER_BYTES};
use crate::verify::{Tolerance, Verification};

/// A job spec with the bytes of its input blobs, keyed by their ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedJob {
    /// The spec.
    pub spec: JobSpec,
    /// Input blobs by content id.
    pub inputs: BTreeMap<ContentId, Vec<u8>>,
    /// The verification the file asks for (`verify = "spot:0.2"`, and `compare = { rtol,
    /// atol }` on float outputs); the buyer's flags may override the mode.
    pub verify: Verification,
}

/// A job file could not be turned into a valid job.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {kind}")]
pub struct JobFileError {
    /// The job file.
    pub file: PathBuf,
    /// What went wrong.
    pub kind: JobFileErrorKind,
}

/// What went wrong with a job file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JobFileErrorKind {
    /// The job file itself could not be read.
    #[error("cannot read the job file: {0}")]
    Read(std::io::Error),
    /// The TOML is malformed or has an unknown or missing key.
    #[error("{0}")]
    Toml(String),
    /// A buffer entry is wrong.
    #[error("[buffers] `{name}`: {reason}")]
    Buffer {
        /// The buffer.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// A file that the job names could not be read.
    #[error("{key}: cannot read {path}: {source}")]
    Referenced {
        /// The key that names it, e.g. `[buffers] x` or `[[pass]] 1 shader`.
        key: String,
        /// The path as resolved.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A pass binds a buffer name that is not in `[buffers]`.
    #[error(
        "[[pass]] {pass}: binding {binding} names buffer `{name}`, which is not in [buffers] (known: {known})"
    )]
    UnknownBuffer {
        /// 1-based pass number.
        pass: usize,
        /// The binding number.
        binding: String,
        /// The unknown name.
        name: String,
        /// The buffers that exist.
        known: String,
    },
    /// A pass entry is wrong.
    #[error("[[pass]] {pass}: {reason}")]
    Pass {
        /// 1-based pass number.
        pass: usize,
        /// What is wrong.
        reason: String,
    },
    /// A loop entry is wrong.
    #[error("[[loop]] {index}: {reason}")]
    Loop {
        /// 1-based loop number.
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// The resulting spec breaks a limit or rule.
    #[error(transparent)]
    Spec(#[from] JobSpecError),
}

/// Reads the files a job file names.
pub trait SourceFiles {
    /// The bytes of `path`, refusing files over `max` bytes without reading them.
    fn read(&self, path: &Path, max: u64) -> std::io::Result<Vec<u8>>;
}

/// [`SourceFiles`] over the real file system.
#[derive(Debug, Clone, Copy, Default)]
pub struct FsSource;

impl SourceFiles for FsSource {
    fn read(&self, path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
        use std::io::Read;
        let file = std::fs::File::open(path)?;
        let len = file.metadata()?.len();
        if len > max {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{len} bytes is over the limit of {max} bytes"),
            ));
        }
        let mut buf = Vec::with_capacity(len as usize);
        // `take` guards against a file that grows while we read it.
        file.take(max + 1).read_to_end(&mut buf)?;
        if buf.len() as u64 > max {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("grew past the limit of {max} bytes while being read"),
            ));
        }
        Ok(buf)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJob {
    name: String,
    #[serde(default)]
    buffers: BTreeMap<String, RawBuffer>,
    #[serde(default, rename = "pass")]
    passes: Vec<RawPass>,
    #[serde(default, rename = "loop")]
    loops: Vec<RawLoop>,
    verify: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLoop {
    /// First and last pass of the body, 1-based and inclusive.
    passes: [u32; 2],
    max_iters: u32,
    counter: Option<String>,
    stop: Option<String>,
    #[serde(default = "default_check_every")]
    check_every: u32,
    #[serde(default)]
    stream: Vec<String>,
}

fn default_check_every() -> u32 {
    1
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBuffer {
    file: Option<String>,
    f32: Option<Vec<f32>>,
    u32: Option<Vec<u32>>,
    i32: Option<Vec<i32>>,
    size: Option<u64>,
    #[serde(default)]
    output: bool,
    compare: Option<Tolerance>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPass {
    shader: String,
    #[serde(default = "default_entry")]
    entry: String,
    workgroups: Vec<u32>,
    #[serde(default)]
    bindings: BTreeMap<String, String>,
}

fn default_entry() -> String {
    "main".into()
}

struct Names<'a>(&'a BTreeMap<String, RawBuffer>);
impl fmt::Display for Names<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("none");
        }
        for (i, name) in self.0.keys().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            f.write_str(name)?;
        }
        Ok(())
    }
}

/// Reads and parses the job file at `path` and every file it names.
pub fn load_job_file(path: &Path, limits: &JobLimits) -> Result<LoadedJob, JobFileError> {
    let text = FsSource
        .read(path, MAX_JOB_FILE_BYTES)
        .map_err(|e| JobFileError {
            file: path.to_owned(),
            kind: JobFileErrorKind::Read(e),
        })?;
    let text = String::from_utf8(text).map_err(|_| JobFileError {
        file: path.to_owned(),
        kind: JobFileErrorKind::Toml("the job file is not valid UTF-8".into()),
    })?;
    parse_job(path, &text, &FsSource, limits)
}

/// Parses job file `text` (read from `path`; relative names resolve against its directory),
/// reading the files it names through `files`.
pub fn parse_job(
    path: &Path,
    text: &str,
    files: &dyn SourceFiles,
    limits: &JobLimits,
) -> Result<LoadedJob, JobFileError> {
    let fail = |kind| JobFileError {
        file: path.to_owned(),
        kind,
    };
    let raw: RawJob = toml::from_str(text).map_err(|e| {
        fail(JobFileErrorKind::Toml(
            e.to_string().trim_end().replace('\n', "\n    "),
        ))
    })?;
    let dir = path.parent().unwrap_or(Path::new(""));

    let mut buffers = Vec::with_capacity(raw.buffers.len());
    let mut inputs = BTreeMap::new();
    let mut verify = Verification::default();
    if let Some(mode) = &raw.verify {
        verify.mode = mode.parse().map_err(|e: crate::verify::BadVerifyMode| {
            fail(JobFileErrorKind::Toml(format!("`verify`: {e}")))
        })?;
    }
    for (name, b) in &raw.buffers {
        let bad = |reason: String| {
            fail(JobFileErrorKind::Buffer {
                name: name.clone(),
                reason,
            })
        };
        let sources = [
            b.file.is_some(),
            b.f32.is_some(),
            b.u32.is_some(),
            b.i32.is_some(),
            b.size.is_some(),
        ];
        match sources.iter().filter(|&&s| s).count() {
            1 => {}
            0 => {
                return Err(bad(
                    "give exactly one of `file`, `f32`, `u32`, `i32` or `size`".into(),
                ));
            }
            _ => {
                return Err(bad(
                    "`file`, `f32`, `u32`, `i32` and `size` are alternatives; give only one".into(),
                ));
            }
        }
        let bytes: Option<Vec<u8>> = if let Some(file) = &b.file {
            let full = dir.join(file);
            let data = files
                .read(&full, limits.max_buffer_bytes)
                .map_err(|source| {
                    fail(JobFileErrorKind::Referenced {
                        key: format!("[buffers] `{name}` file"),
                        path: full.clone(),
                        source,
                    })
                })?;
            Some(data)
        } else if let Some(v) = &b.f32 {
            Some(v.iter().flat_map(|x| x.to_le_bytes()).collect())
        } else if let Some(v) = &b.u32 {
            Some(v.iter().flat_map(|x| x.to_le_bytes()).collect())
        } else {
            b.i32
                .as_ref()
                .map(|v| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        };
        let (size, init) = match bytes {
            Some(data) => {
                if data.is_empty() {
                    return Err(bad("is empty; a buffer needs at least one byte".into()));
                }
                let id = ContentId::of(&data);
                let size = data.len() as u64;
                inputs.entry(id).or_insert(data);
                (size, BufferInit::Blob(id))
            }
            None => {
                let size = b.size.unwrap_or(0);
                if size == 0 {
                    return Err(bad("`size` must be at least 1 byte".into()));
                }
                (size, BufferInit::Zeroed)
            }
        };
        if let Some(t) = &b.compare {
            if !b.output {
                return Err(bad(
                    "`compare` applies to outputs only; add `output = true` or remove it".into(),
                ));
            }
            if size % 4 != 0 {
                return Err(bad(format!(
                    "`compare` reads f32 elements, but the buffer is {size} bytes (not a multiple of 4)"
                )));
            }
            t.validate().map_err(|e| bad(format!("`compare`: {e}")))?;
            verify.tolerances.insert(name.clone(), *t);
        }
        buffers.push(BufferSpec {
            name: name.clone(),
            size,
            init,
            output: b.output,
        });
    }

    let mut shaders: Vec<ShaderSource> = Vec::new();
    let mut passes = Vec::with_capacity(raw.passes.len());
    for (i, p) in raw.passes.iter().enumerate() {
        let pass = i + 1;
        let shader = match shaders.iter().position(|s| s.name == p.shader) {
            Some(idx) => idx,
            None => {
                let full = dir.join(&p.shader);
                let src = files.read(&full, MAX_SHADER_BYTES).map_err(|source| {
                    fail(JobFileErrorKind::Referenced {
                        key: format!("[[pass]] {pass} shader"),
                        path: full.clone(),
                        source,
                    })
                })?;
                let wgsl = String::from_utf8(src).map_err(|_| {
                    fail(JobFileErrorKind::Pass {
                        pass,
                        reason: format!("shader {} is not valid UTF-8 text", p.shader),
                    })
                })?;
                shaders.push(ShaderSource {
                    name: p.shader.clone(),
                    wgsl,
                });
                shaders.len() - 1
            }
        };
        let workgroups = match p.workgroups.as_slice() {
            [x] => [*x, 1, 1],
            [x, y] => [*x, *y, 1],
            [x, y, z] => [*x, *y, *z],
            other => {
                return Err(fail(JobFileErrorKind::Pass {
                    pass,
                    reason: format!(
                        "`workgroups` needs 1 to 3 numbers (x, y, z), got {}",
                        other.len()
                    ),
                }));
            }
        };
        let mut bindings = Vec::with_capacity(p.bindings.len());
        for (key, buf_name) in &p.bindings {
            let binding: u32 = key.trim().parse().map_err(|_| {
                fail(JobFileErrorKind::Pass {
                    pass,
                    reason: format!(
                        "binding key {key:?} is not a binding number (write `bindings = {{ 0 = \"x\" }}`)"
                    ),
                })
            })?;
            let Some(buffer) = raw.buffers.keys().position(|n| n == buf_name) else {
                return Err(fail(JobFileErrorKind::UnknownBuffer {
                    pass,
                    binding: key.clone(),
                    name: buf_name.clone(),
                    known: Names(&raw.buffers).to_string(),
                }));
            };
            if bindings.iter().any(|b: &Binding| b.binding == binding) {
                return Err(fail(JobFileErrorKind::Pass {
                    pass,
                    reason: format!("binding {binding} is given twice"),
                }));
            }
            bindings.push(Binding::whole(binding, buffer as u32));
        }
        bindings.sort_by_key(|b| b.binding);
        passes.push(PassSpec {
            shader: shader as u32,
            entry: p.entry.clone(),
            workgroups,
            bindings,
        });
    }

    let mut loops = Vec::with_capacity(raw.loops.len());
    for (i, l) in raw.loops.iter().enumerate() {
        let bad = |reason: String| {
            fail(JobFileErrorKind::Loop {
                index: i + 1,
                reason,
            })
        };
        let [first, last] = l.passes;
        if first == 0 || last < first || last as usize > passes.len() {
            return Err(bad(format!(
                "passes = [{first}, {last}] must name the first and last pass of the body, 1-based, within the {} passes",
                passes.len()
            )));
        }
        let index_of = |key: &str, name: &str| {
            raw.buffers
                .keys()
                .position(|k| k == name)
                .map(|i| i as u32)
                .ok_or_else(|| {
                    bad(format!(
                        "{key} names buffer `{name}`, which is not in [buffers] (known: {})",
                        Names(&raw.buffers)
                    ))
                })
        };
        let counter = l
            .counter
            .as_deref()
            .map(|n| index_of("counter", n))
            .transpose()?;
        let stop = l.stop.as_deref().map(|n| index_of("stop", n)).transpose()?;
        let stream = l
            .stream
            .iter()
            .map(|n| index_of("stream", n))
            .collect::<Result<Vec<_>, _>>()?;
        loops.push(LoopSpec {
            first: first - 1,
            len: last - first + 1,
            max_iters: l.max_iters,
            counter,
            stop,
            check_every: l.check_every,
            stream,
        });
    }

    let spec = JobSpec {
        name: raw.name,
        buffers,
        shaders,
        passes,
        loops,
    };
    spec.validate(limits).map_err(|e| fail(e.into()))?;
    Ok(LoadedJob {
        spec,
        inputs,
        verify,
    })
}
