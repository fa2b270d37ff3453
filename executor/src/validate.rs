//! Checking a job before it runs: limits, naga parse and validation, binding reflection, input
//! hashes. Everything a job can get wrong is caught here, so the GPU only sees valid work.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use hashgrid_protocol::job::{
    MAX_STORAGE_TEXTURES_PER_PASS, MAX_TEXTURE_ROWS, MAX_TEXTURES_PER_PASS, TEXTURE_ROW_TEXELS,
};
use hashgrid_protocol::{BufferInit, BufferRange, ContentId, GpuLimits, JobLimits, JobSpec};
use naga::{AddressSpace, ShaderStage};

use super::ExecError;

/// How a pass binds a buffer, as the shader declares it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BindKind {
    /// `var<storage, read>`.
    StorageRead,
    /// `var<storage, read_write>`.
    StorageReadWrite,
    /// `var<uniform>`.
    Uniform,
    /// `texture_2d<u32>`: the bound bytes as an `rgba32uint` texture
    /// ([`TEXTURE_ROW_TEXELS`] texels per row).
    Texture,
    /// `texture_storage_2d<rgba32uint, read>`: the same texture read as a read-only storage
    /// texture (no mip levels: lavapipe compiles its loads to a few instructions inline where a
    /// sampled texel fetch is a call of ~170).
    StorageTexture,
    /// `texture_storage_2d<rgba32uint, write>`: the bound bytes as a texture that the pass
    /// writes. A buffer any pass binds this way is a texture for the whole job: every pass
    /// must bind it as a texture (ranges identical or disjoint), later passes see what earlier
    /// ones wrote, and as an output it is copied back into the buffer at the end.
    TextureWrite,
}

impl BindKind {
    fn describe(self) -> &'static str {
        match self {
            BindKind::StorageRead => "var<storage, read>",
            BindKind::StorageReadWrite => "var<storage, read_write>",
            BindKind::Uniform => "var<uniform>",
            BindKind::Texture => "texture_2d<u32>",
            BindKind::StorageTexture => "texture_storage_2d<rgba32uint, read>",
            BindKind::TextureWrite => "texture_storage_2d<rgba32uint, write>",
        }
    }

    /// Whether the binding sees the bytes as a texture (of any kind).
    fn is_texture(self) -> bool {
        matches!(
            self,
            BindKind::Texture | BindKind::StorageTexture | BindKind::TextureWrite
        )
    }
}

/// One binding a pass's entry point uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CheckedBinding {
    /// The binding number.
    pub(crate) binding: u32,
    /// Index into the job's buffers.
    pub(crate) buffer: usize,
    /// The bound bytes (`None`: the whole buffer).
    pub(crate) range: Option<BufferRange>,
    /// Whether the shader reads it as a texture.
    pub(crate) texture: bool,
}

/// A pass after validation: the bindings the entry point uses, with their kinds.
#[derive(Debug, Clone)]
pub(crate) struct CheckedPass {
    /// Every binding the entry point uses.
    pub(crate) bindings: Vec<CheckedBinding>,
}

/// Rows and row width (texels) of the texture that `bytes` bound as `texture_2d<u32>` make.
pub(crate) fn texture_shape(bytes: u64) -> (u32, u32) {
    let texels = bytes / 16;
    let width = texels.min(TEXTURE_ROW_TEXELS);
    let rows = texels.div_ceil(TEXTURE_ROW_TEXELS);
    (width as u32, rows as u32)
}

/// Shaders that parsed and validated, by blake3 of their WGSL: a model's kernels are checked
/// three times per request (the buyer before sending, the provider before agreeing, the
/// executor before running) and again for every request, always the same text. Only successes
/// are kept; the outcome depends on the text alone (fixed flags and capabilities).
type Validated = Arc<(naga::Module, naga::valid::ModuleInfo)>;

/// Most validated shaders remembered per process (first in, first out).
const VALIDATED_SHADERS: usize = 256;

/// The validated shaders by hash, and their hashes in the order they came.
type ValidatedSet = (HashMap<[u8; 32], Validated>, VecDeque<[u8; 32]>);

static VALIDATED: Mutex<Option<ValidatedSet>> = Mutex::new(None);

fn validated_module(hash: &[u8; 32]) -> Option<Validated> {
    let g = VALIDATED.lock().ok()?;
    g.as_ref().and_then(|(m, _)| m.get(hash).cloned())
}

fn remember_module(hash: [u8; 32], m: Validated) {
    let Ok(mut g) = VALIDATED.lock() else { return };
    let (map, order) = g.get_or_insert_with(Default::default);
    if map.insert(hash, m).is_none() {
        order.push_back(hash);
    }
    while order.len() > VALIDATED_SHADERS {
        if let Some(old) = order.pop_front() {
            map.remove(&old);
        }
    }
}

/// A job after validation.
#[derive(Debug, Clone)]
pub(crate) struct CheckedJob {
    /// blake3 of each shader's WGSL, the pipeline cache key with the entry point.
    pub(crate) shader_hashes: Vec<[u8; 32]>,
    /// Per pass.
    pub(crate) passes: Vec<CheckedPass>,
    /// Allocation size of each buffer (its size rounded up to 16 bytes: storage bindings need a
    /// multiple of 4 and uniform ones 16). Outputs are trimmed back on readback.
    pub(crate) alloc_sizes: Vec<u64>,
    /// Per buffer: whether a pass may write it. Read-only blob buffers can stay resident on
    /// the device and serve later jobs that name the same blob.
    pub(crate) written: Vec<bool>,
    /// Per buffer: whether a pass writes it as a texture (`texture_storage_2d<rgba32uint,
    /// write>`): its textures live for the whole job, and an output is copied back from them.
    pub(crate) texture_written: Vec<bool>,
}

/// Rounding for buffer allocations: uniform buffers need sizes in multiples of 16.
const BUFFER_ALIGN: u64 = 16;

fn round_up(n: u64, to: u64) -> u64 {
    n.div_ceil(to).saturating_mul(to)
}

/// Checks `spec` against `limits`, the adapter's `gpu` limits, its shaders and `inputs`.
pub(crate) fn check_job<V: super::InputBytes>(
    spec: &JobSpec,
    inputs: Option<&BTreeMap<ContentId, V>>,
    limits: &JobLimits,
    gpu: &GpuLimits,
) -> Result<CheckedJob, ExecError> {
    spec.validate(limits)?;
    for (i, p) in spec.passes.iter().enumerate() {
        for (axis, &n) in p.workgroups.iter().enumerate() {
            if n > gpu.max_compute_workgroups_per_dimension {
                return Err(ExecError::Limit(format!(
                    "pass {i} ({}) dispatches {n} workgroups on axis {axis}, over the adapter's limit of {}",
                    p.entry, gpu.max_compute_workgroups_per_dimension
                )));
            }
        }
    }
    let mut alloc_sizes = Vec::with_capacity(spec.buffers.len());
    for b in &spec.buffers {
        let alloc = round_up(b.size, BUFFER_ALIGN);
        if alloc > gpu.max_buffer_size {
            return Err(ExecError::Limit(format!(
                "buffer {:?} is {} bytes, over the adapter's max_buffer_size of {}",
                b.name, b.size, gpu.max_buffer_size
            )));
        }
        if let (BufferInit::Blob(id), Some(inputs)) = (&b.init, inputs) {
            let Some(bytes) = inputs.get(id).map(V::input_bytes) else {
                return Err(ExecError::Input {
                    buffer: b.name.clone(),
                    message: format!("input blob {id} was not supplied"),
                });
            };
            let got = super::content_id(bytes);
            if got != *id {
                return Err(ExecError::Input {
                    buffer: b.name.clone(),
                    message: format!(
                        "input bytes hash to {got}, not the declared {id}: the blob is corrupt or the wrong file"
                    ),
                });
            }
            if bytes.len() as u64 != b.size {
                return Err(ExecError::Input {
                    buffer: b.name.clone(),
                    message: format!("input is {} bytes, the spec says {}", bytes.len(), b.size),
                });
            }
        }
        alloc_sizes.push(alloc);
    }

    let mut modules = Vec::with_capacity(spec.shaders.len());
    let mut shader_hashes = Vec::with_capacity(spec.shaders.len());
    for s in &spec.shaders {
        let hash = *blake3::hash(s.wgsl.as_bytes()).as_bytes();
        if let Some(m) = validated_module(&hash) {
            modules.push(m);
            shader_hashes.push(hash);
            continue;
        }
        let module = naga::front::wgsl::parse_str(&s.wgsl).map_err(|e| {
            let loc = e.location(&s.wgsl);
            ExecError::Parse {
                file: s.name.clone(),
                line: loc.map_or(0, |l| l.line_number),
                column: loc.map_or(0, |l| l.line_position),
                message: e.emit_to_string(&s.wgsl).trim().to_string(),
            }
        })?;
        let info = naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::default(),
        )
        .validate(&module)
        .map_err(|e| ExecError::Shader {
            file: s.name.clone(),
            message: e.emit_to_string(&s.wgsl).trim().to_string(),
        })?;
        let m = Arc::new((module, info));
        remember_module(hash, m.clone());
        modules.push(m);
        shader_hashes.push(hash);
    }

    // Buffers some pass writes (or a loop counts into): never shared between jobs.
    let mut written = vec![false; spec.buffers.len()];
    let mut texture_written = vec![false; spec.buffers.len()];
    for l in &spec.loops {
        if let Some(c) = l.counter {
            written[c as usize] = true;
        }
    }
    let mut passes = Vec::with_capacity(spec.passes.len());
    for (pi, p) in spec.passes.iter().enumerate() {
        let shader = &spec.shaders[p.shader as usize];
        let (module, info) = &*modules[p.shader as usize];
        let berr = |message: String| ExecError::Binding {
            pass: pi,
            file: shader.name.clone(),
            entry: p.entry.clone(),
            message,
        };
        let Some(ep_index) = module.entry_points.iter().position(|e| e.name == p.entry) else {
            let names: Vec<&str> = module
                .entry_points
                .iter()
                .map(|e| e.name.as_str())
                .collect();
            return Err(berr(format!(
                "entry point {:?} not found; the shader has {names:?}",
                p.entry
            )));
        };
        let ep = &module.entry_points[ep_index];
        if ep.stage != ShaderStage::Compute {
            return Err(berr(format!(
                "entry point {:?} is not a @compute entry point",
                p.entry
            )));
        }
        let invocations: u32 = ep.workgroup_size.iter().product();
        if invocations > gpu.max_compute_invocations_per_workgroup {
            return Err(berr(format!(
                "@workgroup_size has {invocations} invocations, over the adapter's limit of {}",
                gpu.max_compute_invocations_per_workgroup
            )));
        }
        let fi = info.get_entry_point(ep_index);
        // Declared group-0 resources: binding -> (kind, minimum size, used by this entry).
        let mut declared: HashMap<u32, (BindKind, u64, bool)> = HashMap::new();
        for (h, g) in module.global_variables.iter() {
            let Some(rb) = &g.binding else { continue };
            let used = !fi[h].is_empty();
            let kind = match g.space {
                AddressSpace::Uniform => BindKind::Uniform,
                AddressSpace::Handle if is_u32_texture_2d(&module.types[g.ty].inner) => {
                    BindKind::Texture
                }
                AddressSpace::Handle
                    if is_rgba32uint_storage(
                        &module.types[g.ty].inner,
                        naga::StorageAccess::LOAD,
                    ) =>
                {
                    BindKind::StorageTexture
                }
                AddressSpace::Handle
                    if is_rgba32uint_storage(
                        &module.types[g.ty].inner,
                        naga::StorageAccess::STORE,
                    ) =>
                {
                    BindKind::TextureWrite
                }
                AddressSpace::Storage { access } => {
                    if access.contains(naga::StorageAccess::STORE) {
                        BindKind::StorageReadWrite
                    } else {
                        BindKind::StorageRead
                    }
                }
                _ => {
                    if used {
                        return Err(berr(format!(
                            "@group({}) @binding({}) is a texture or sampler other than texture_2d<u32> or texture_storage_2d<rgba32uint, read or write>; jobs bind buffers, as storage, uniform or one of those textures",
                            rb.group, rb.binding
                        )));
                    }
                    continue;
                }
            };
            if rb.group != 0 {
                if used {
                    return Err(berr(format!(
                        "@group({}) @binding({}) is used, but jobs bind only @group(0)",
                        rb.group, rb.binding
                    )));
                }
                continue;
            }
            let min = if kind.is_texture() {
                16
            } else {
                u64::from(module.types[g.ty].inner.size(module.to_ctx()))
            };
            declared.insert(rb.binding, (kind, min, used));
        }
        let mut bindings = Vec::new();
        // buffer index -> (binding, kind, range) of its uses in this pass.
        let mut seen: HashMap<u32, Vec<(u32, BindKind, BufferRange)>> = HashMap::new();
        for b in &p.bindings {
            let buf = &spec.buffers[b.buffer as usize];
            let Some(&(kind, min, used)) = declared.get(&b.binding) else {
                return Err(berr(format!(
                    "binding {} (buffer {:?}) is not declared as @group(0) @binding({}) in the shader: remove it from the pass",
                    b.binding, buf.name, b.binding
                )));
            };
            let bound = b.range.map_or(buf.size, |r| r.size);
            if bound < min {
                return Err(berr(format!(
                    "binding {} (buffer {:?}) is {bound} bytes, but the shader's {} type needs at least {min}",
                    b.binding,
                    buf.name,
                    kind.describe()
                )));
            }
            if b.range.is_some() && kind == BindKind::Uniform && bound % BUFFER_ALIGN != 0 {
                return Err(berr(format!(
                    "binding {} (buffer {:?}) binds {bound} bytes as var<uniform>: a uniform range must be a multiple of {BUFFER_ALIGN} bytes",
                    b.binding, buf.name
                )));
            }
            if kind.is_texture() {
                let rows = (bound / 16).div_ceil(TEXTURE_ROW_TEXELS);
                if bound % 16 != 0 || rows > MAX_TEXTURE_ROWS {
                    return Err(berr(format!(
                        "binding {} (buffer {:?}) binds {bound} bytes as {}: a texture binding must be a multiple of 16 bytes (one rgba32uint texel) and at most {} bytes ({MAX_TEXTURE_ROWS} rows of {TEXTURE_ROW_TEXELS} texels)",
                        b.binding,
                        buf.name,
                        kind.describe(),
                        MAX_TEXTURE_ROWS * TEXTURE_ROW_TEXELS * 16
                    )));
                }
            }
            let alloc = b.range.map_or(alloc_sizes[b.buffer as usize], |r| r.size);
            let max = match kind {
                BindKind::Uniform => gpu.max_uniform_buffer_binding_size,
                BindKind::Texture | BindKind::StorageTexture | BindKind::TextureWrite => u64::MAX,
                _ => gpu.max_storage_buffer_binding_size,
            };
            if alloc > max {
                return Err(berr(format!(
                    "binding {} (buffer {:?}) binds {} bytes, over the adapter's {} binding limit of {max}",
                    b.binding,
                    buf.name,
                    alloc,
                    kind.describe()
                )));
            }
            // The job spec names no kinds, so the shader decides; what can conflict is one buffer
            // bound twice in a pass where one binding writes (WebGPU forbids a writable storage
            // usage alongside any other usage of the same buffer in one dispatch).
            // A texture written in a pass likewise, where the ranges (textures) overlap.
            if used {
                let range = b.range.unwrap_or(BufferRange {
                    offset: 0,
                    size: buf.size,
                });
                let uses = seen.entry(b.buffer).or_default();
                if let Some(&(other, other_kind, _)) = uses.iter().find(|(_, k, r)| {
                    kind == BindKind::StorageReadWrite
                        || *k == BindKind::StorageReadWrite
                        || ((kind == BindKind::TextureWrite || *k == BindKind::TextureWrite)
                            && overlap(*r, range))
                }) {
                    return Err(berr(format!(
                        "buffer {:?} is bound at binding {other} as {} and at binding {} as {}: a buffer written in a pass cannot be bound twice in it; use a separate buffer",
                        buf.name,
                        other_kind.describe(),
                        b.binding,
                        kind.describe()
                    )));
                }
                uses.push((b.binding, kind, range));
                bindings.push(CheckedBinding {
                    binding: b.binding,
                    buffer: b.buffer as usize,
                    range: b.range,
                    texture: kind.is_texture(),
                });
                if kind == BindKind::StorageReadWrite {
                    written[b.buffer as usize] = true;
                }
                if kind == BindKind::TextureWrite {
                    texture_written[b.buffer as usize] = true;
                }
            }
        }
        for (&n, &(kind, _, used)) in &declared {
            if used && !p.bindings.iter().any(|b| b.binding == n) {
                return Err(berr(format!(
                    "the shader uses @group(0) @binding({n}) ({}) but the pass does not bind it: add `{n} = \"<buffer>\"` to the pass's bindings",
                    kind.describe()
                )));
            }
        }
        let textures = bindings.iter().filter(|b| b.texture).count();
        if textures > MAX_TEXTURES_PER_PASS {
            return Err(berr(format!(
                "the pass binds {textures} buffers as textures, over the {MAX_TEXTURES_PER_PASS} every adapter allows"
            )));
        }
        let storage_textures = declared
            .values()
            .filter(|(k, _, used)| {
                *used && matches!(k, BindKind::StorageTexture | BindKind::TextureWrite)
            })
            .count();
        if storage_textures > MAX_STORAGE_TEXTURES_PER_PASS {
            return Err(berr(format!(
                "the shader binds {storage_textures} buffers as texture_storage_2d, over the {MAX_STORAGE_TEXTURES_PER_PASS} every adapter allows"
            )));
        }
        passes.push(CheckedPass { bindings });
    }
    // A texture is a snapshot of its buffer as the job starts: nothing may write that buffer.
    for (pi, p) in passes.iter().enumerate() {
        // (A buffer written as a texture is checked below, with its own rules.)
        for b in p
            .bindings
            .iter()
            .filter(|b| b.texture && !texture_written[b.buffer])
        {
            if written[b.buffer] {
                let pass = &spec.passes[pi];
                return Err(ExecError::Binding {
                    pass: pi,
                    file: spec.shaders[pass.shader as usize].name.clone(),
                    entry: pass.entry.clone(),
                    message: format!(
                        "buffer {:?} is read as a texture at binding {}, but a pass writes it (or a loop counts into it): a texture is a read-only snapshot of the buffer as the job starts",
                        spec.buffers[b.buffer].name, b.binding
                    ),
                });
            }
        }
    }
    // A buffer written as a texture is a texture for the whole job: only texture bindings,
    // each range one texture (identical or disjoint), nothing that reads or writes its bytes
    // as a buffer while the job runs.
    let mut ranges: Vec<Vec<BufferRange>> = vec![Vec::new(); spec.buffers.len()];
    for (pi, p) in passes.iter().enumerate() {
        let pass = &spec.passes[pi];
        let perr = |message: String| ExecError::Binding {
            pass: pi,
            file: spec.shaders[pass.shader as usize].name.clone(),
            entry: pass.entry.clone(),
            message,
        };
        for b in p.bindings.iter().filter(|b| texture_written[b.buffer]) {
            let name = &spec.buffers[b.buffer].name;
            if !b.texture {
                return Err(perr(format!(
                    "buffer {name:?} is written as a texture by a pass, so every pass must bind it as a texture, but binding {} is not one",
                    b.binding
                )));
            }
            let r = b.range.unwrap_or(BufferRange {
                offset: 0,
                size: spec.buffers[b.buffer].size,
            });
            if ranges[b.buffer].iter().any(|&o| o != r && overlap(o, r)) {
                return Err(perr(format!(
                    "buffer {name:?} is written as a texture, and binding {} binds bytes {}..{} of it, which overlap another of its ranges: each range is its own texture, so ranges must be identical or disjoint",
                    b.binding,
                    r.offset,
                    r.offset + r.size
                )));
            }
            if !ranges[b.buffer].contains(&r) {
                ranges[b.buffer].push(r);
            }
        }
    }
    for (li, l) in spec.loops.iter().enumerate() {
        for b in l.counter.iter().chain(l.stop.iter()).chain(l.stream.iter()) {
            if texture_written[*b as usize] {
                return Err(ExecError::Limit(format!(
                    "loop {li} counts into, stops on or streams buffer {:?}, which a pass writes as a texture: its bytes exist only when the job ends",
                    spec.buffers[*b as usize].name
                )));
            }
        }
    }
    for (w, t) in written.iter_mut().zip(&texture_written) {
        *w |= *t;
    }
    Ok(CheckedJob {
        shader_hashes,
        passes,
        alloc_sizes,
        written,
        texture_written,
    })
}

/// Whether two byte ranges share a byte.
fn overlap(a: BufferRange, b: BufferRange) -> bool {
    a.offset < b.offset + b.size && b.offset < a.offset + a.size
}

/// Whether `ty` is `texture_storage_2d<rgba32uint, ...>` with exactly `access` (`LOAD`: read,
/// `STORE`: write), not an array.
fn is_rgba32uint_storage(ty: &naga::TypeInner, access: naga::StorageAccess) -> bool {
    matches!(
        ty,
        naga::TypeInner::Image {
            dim: naga::ImageDimension::D2,
            arrayed: false,
            class: naga::ImageClass::Storage {
                format: naga::StorageFormat::Rgba32Uint,
                access: a,
            },
        } if *a == access
    )
}

/// Whether `ty` is `texture_2d<u32>` (sampled, not multisampled, not an array).
fn is_u32_texture_2d(ty: &naga::TypeInner) -> bool {
    matches!(
        ty,
        naga::TypeInner::Image {
            dim: naga::ImageDimension::D2,
            arrayed: false,
            class: naga::ImageClass::Sampled {
                kind: naga::ScalarKind::Uint,
                multi: false,
            },
        }
    )
}
