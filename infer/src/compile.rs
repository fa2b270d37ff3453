//! A generation request → an ordinary hashgrid job.
//!
//! The weights become input blobs: the token embedding, the output projection (when not tied)
//! and one blob per transformer block holding that block's tensors at 256-byte aligned offsets,
//! each tensor's bytes as in the GGUF file (Q8_0 and Q4_1 matrices rearranged row by row so the
//! kernels read aligned 16-byte vectors: `kernels::quant::pack`). Passes bind the tensor they need as a byte
//! range of its block's buffer. The prompt is an input blob too, so a receipt binds weights,
//! kernels, prompt and output.
//!
//! Two loops. The **prefill** loop takes the prompt's positions before its last in chunks of
//! [`PREFILL_TOKENS`]: each pass of its body handles a whole chunk (the embedding, every block,
//! the K and V of each position into the cache, causal attention within the chunk), so a
//! chunk costs one dispatch per operation where one position at a time cost one per
//! position. The **generation** loop's body is the decoder step for one position: at step `s`
//! (position `p = n_prompt − 1 + s`) it embeds `tokens[p]`, runs every block, computes the
//! logits and samples `tokens[p + 1]`, and goes on without the host until the sampler sets the
//! stop flag (an end-of-generation token or the token limit). The executor streams `tokens`
//! and `status` back at every check, so text appears as it is generated: at every token, or,
//! with checks every few tokens ([`GenerateRequest::check_every`], 8 in a GPU-shaped job), the
//! first new token alone (its step then a loop of its own) and the rest a few at a time.

use std::collections::BTreeMap;
use std::sync::Arc;

use hashgrid_protocol::{
    Binding, BufferInit, BufferRange, BufferSpec, ContentId, DeviceType, JobSpec, LoopSpec,
    ModelManifest, PassSpec, ShaderSource,
    job::{DEFAULT_MAX_PASSES, RANGE_ALIGN},
};

use crate::kernels::{self, MAX_EOG, Matvec};
use crate::model::{LlamaModel, ModelError, RopeStyle};
use crate::quant::GgmlType;

/// Tokens between the executor's checks of the stop flag (and streamed readbacks) after the
/// first token, for a job shaped for a CPU adapter ([`Target::check_every`]): every token. On
/// lavapipe a token takes ~40 ms and a check is a small part of it (decode with checks every
/// 4 tokens was the same within noise: docs/PERFORMANCE.md, "Language models"), so text
/// streams token by token.
pub const CHECK_EVERY_CPU: u32 = 1;

/// [`CHECK_EVERY_CPU`] for a job shaped for a GPU: 8. There a token takes ~3 ms and a check,
/// a round trip through the driver, a large share of it: on an H200, 288 decode tokens/s
/// checking every token against 347 checking every 8 (docs/PERFORMANCE.md, "Language models").
pub const CHECK_EVERY_GPU: u32 = 8;

/// Most tokens one request may generate.
pub const MAX_NEW_TOKENS: u32 = 32_768;

/// The kind of adapter a job's kernels are shaped for. Both shapes compute the same values on
/// any adapter (the same arithmetic per weight, summed in another order, so results agree to
/// rounding); they differ in how the work is spread over threads, and each is several times
/// slower than the other on the wrong kind of adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Target {
    /// CPU adapters (lavapipe, SwiftShader): a workgroup is a loop on one core and every
    /// buffer load costs, so each invocation computes several whole rows of a matvec.
    #[default]
    Cpu,
    /// GPUs: thousands of threads, so the decoder's matvecs split each row over several
    /// invocations ([`kernels::matvec_split`]).
    Gpu,
}

impl Target {
    /// The shape for an adapter of this type: [`Target::Cpu`] for a CPU adapter,
    /// [`Target::Gpu`] for the rest.
    pub fn for_device(t: DeviceType) -> Target {
        match t {
            DeviceType::Cpu => Target::Cpu,
            _ => Target::Gpu,
        }
    }

    /// Tokens between checks after the first ([`GenerateRequest::check_every`]) that a
    /// streaming caller wants for this shape ([`CHECK_EVERY_CPU`], [`CHECK_EVERY_GPU`]): the
    /// first token arrives as soon as it is sampled, then text token by token on a CPU
    /// adapter, and 8 tokens at a time (every ~25 ms) on a GPU, where a round trip per token
    /// would cost a sixth of the decode speed.
    pub fn check_every(self) -> u32 {
        match self {
            Target::Cpu => CHECK_EVERY_CPU,
            Target::Gpu => CHECK_EVERY_GPU,
        }
    }
}

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// 0 picks the most likely token (greedy); above 0 draws from the tempered distribution.
    pub temperature: f32,
    /// Keep only the k most likely tokens (0: all).
    pub top_k: u32,
    /// Keep the smallest set of most likely tokens whose probability reaches p (1: all).
    pub top_p: f32,
    /// Seed of the counter-based random numbers (with the position), so a run is reproducible.
    pub seed: u32,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

/// A request to continue `prompt`.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    /// Prompt token ids (at least one).
    pub prompt: Vec<u32>,
    /// Most tokens to generate.
    pub max_new_tokens: u32,
    /// Sampling settings.
    pub sampling: Sampling,
    /// Token ids that end generation (at most [`MAX_EOG`]).
    pub eog: Vec<u32>,
    /// Tokens between the executor's stop checks and streamed readbacks after the first
    /// token, which is always checked alone (1: every token; [`Target::check_every`]: what a
    /// streaming caller wants). The outputs are the same whatever it is.
    pub check_every: u32,
    /// The adapter kind the kernels are shaped for.
    pub target: Target,
}

/// Why a request cannot be compiled.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CompileError {
    /// The model file is unusable.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The request is malformed.
    #[error("{0}")]
    Request(String),
    /// Prompt and generation do not fit the model's context.
    #[error(
        "the prompt ({prompt} tokens) plus up to {max_new} new tokens is over the model's context of {ctx} tokens"
    )]
    Context {
        /// Prompt tokens.
        prompt: usize,
        /// Requested new tokens.
        max_new: u32,
        /// The model's context length.
        ctx: usize,
    },
}

/// A tensor's place in its block's blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    offset: u64,
    size: u64,
    ty: GgmlType,
}

impl Slot {
    fn range(&self) -> BufferRange {
        BufferRange {
            offset: self.offset,
            size: self.size.next_multiple_of(4),
        }
    }
}

/// One block's tensors in its blob.
#[derive(Debug, Clone)]
struct BlockLayout {
    attn_norm: Slot,
    q: Slot,
    k: Slot,
    v: Slot,
    /// `[bq | bk | bv]`, contiguous, when the model has biases.
    bias: Option<Slot>,
    o: Slot,
    ffn_norm: Slot,
    gate: Slot,
    up: Slot,
    down: Slot,
}

/// A weight blob: a name for people, its bytes and their content id.
#[derive(Debug, Clone)]
pub struct WeightBlob {
    /// `token_embd`, `output`, `output_norm` or `blk.N`.
    pub name: String,
    /// blake3 of `bytes`.
    pub id: ContentId,
    /// The bytes, shared with every job compiled from these weights (a request copies none).
    pub bytes: Arc<Vec<u8>>,
}

/// A model's weights as job blobs, read from the file once and reused for every request.
#[derive(Debug, Clone)]
pub struct ModelWeights {
    /// The blobs: `token_embd`, `output_norm`, `output` (when not tied), then `blk.0`….
    pub blobs: Vec<WeightBlob>,
    embd_ty: GgmlType,
    output_ty: GgmlType,
    blocks: Vec<BlockLayout>,
}

fn align(n: u64) -> u64 {
    n.next_multiple_of(RANGE_ALIGN)
}

impl ModelWeights {
    /// The blobs as the market names the model: a site that preloads the file and a buyer
    /// that compiles from it compute the same manifest, and so the same model id.
    pub fn manifest(&self) -> ModelManifest {
        ModelManifest::new(self.blobs.iter().map(|b| (b.id, b.bytes.len() as u64)))
    }

    /// Reads every tensor of `model` from its file and lays the blobs out.
    pub fn load(model: &LlamaModel) -> Result<ModelWeights, ModelError> {
        // Matrices of Q8_0 and Q4_1 are repacked for aligned vector loads (kernels::quant::pack);
        // everything else keeps the file's bytes.
        let read = |name: &str| -> Result<(Vec<u8>, GgmlType), ModelError> {
            let t = model.tensor(name)?;
            let bytes = model.gguf.read_tensor(t)?;
            let bytes = match t.dims.as_slice() {
                [cols, _, ..] => kernels::quant::pack(t.ty, &bytes, *cols),
                _ => bytes,
            };
            Ok((bytes, t.ty))
        };
        let mut blobs = Vec::new();
        let blob = |name: &str, mut bytes: Vec<u8>| {
            bytes.resize(bytes.len().next_multiple_of(4), 0);
            WeightBlob {
                name: name.into(),
                id: ContentId::of(&bytes),
                bytes: Arc::new(bytes),
            }
        };
        let (embd, embd_ty) = read("token_embd.weight")?;
        blobs.push(blob("token_embd", embd));
        let (norm, _) = read("output_norm.weight")?;
        blobs.push(blob("output_norm", norm));
        let output_ty = if model.config.tied_embeddings {
            embd_ty
        } else {
            let (out, ty) = read("output.weight")?;
            blobs.push(blob("output", out));
            ty
        };
        let mut blocks = Vec::with_capacity(model.config.n_layers);
        for l in 0..model.config.n_layers {
            let mut bytes: Vec<u8> = Vec::new();
            let mut put = |name: &str, packed: bool| -> Result<Slot, ModelError> {
                let (data, ty) = read(&format!("blk.{l}.{name}"))?;
                let offset = if packed {
                    bytes.len() as u64
                } else {
                    align(bytes.len() as u64)
                };
                bytes.resize(offset as usize, 0);
                bytes.extend_from_slice(&data);
                Ok(Slot {
                    offset,
                    size: data.len() as u64,
                    ty,
                })
            };
            let attn_norm = put("attn_norm.weight", false)?;
            let q = put("attn_q.weight", false)?;
            let k = put("attn_k.weight", false)?;
            let v = put("attn_v.weight", false)?;
            let bias = if model.config.qkv_bias {
                let bq = put("attn_q.bias", false)?;
                let bk = put("attn_k.bias", true)?;
                let bv = put("attn_v.bias", true)?;
                Some(Slot {
                    offset: bq.offset,
                    size: bq.size + bk.size + bv.size,
                    ty: GgmlType::F32,
                })
            } else {
                None
            };
            let o = put("attn_output.weight", false)?;
            let ffn_norm = put("ffn_norm.weight", false)?;
            let gate = put("ffn_gate.weight", false)?;
            let up = put("ffn_up.weight", false)?;
            let down = put("ffn_down.weight", false)?;
            let end = align(bytes.len() as u64);
            bytes.resize(end as usize, 0);
            blobs.push(blob(&format!("blk.{l}"), bytes));
            blocks.push(BlockLayout {
                attn_norm,
                q,
                k,
                v,
                bias,
                o,
                ffn_norm,
                gate,
                up,
                down,
            });
        }
        Ok(ModelWeights {
            blobs,
            embd_ty,
            output_ty,
            blocks,
        })
    }

    /// Total bytes of all weight blobs.
    pub fn total_bytes(&self) -> u64 {
        self.blobs.iter().map(|b| b.bytes.len() as u64).sum()
    }

    fn blob(&self, name: &str) -> Option<&WeightBlob> {
        self.blobs.iter().find(|b| b.name == name)
    }
}

/// A job's input blobs by content id, shared rather than owned (the executor's and the
/// node's `SharedInputs`).
pub type Inputs = BTreeMap<ContentId, Arc<Vec<u8>>>;

/// A compiled request: the job and its inputs.
#[derive(Debug, Clone)]
pub struct CompiledJob {
    /// The job.
    pub spec: JobSpec,
    /// Its input blobs (weights, prompt, parameters) by id; the weights are shared with the
    /// [`ModelWeights`] they came from, not copied.
    pub inputs: Inputs,
    /// Prompt tokens.
    pub n_prompt: usize,
    /// Prompt plus the most new tokens.
    pub max_total: usize,
    /// The weights among the inputs, as the market names the model (a bid names its id).
    pub model: ModelManifest,
    /// How two providers' runs of this job compare when the buyer verifies it by
    /// re-execution (the mode is the buyer's): generated tokens up to the first near-tie,
    /// embeddings within a tolerance.
    pub compare: hashgrid_protocol::Verification,
}

/// The largest top-1 − top-2 logit margin at which two providers' runs of a generation job
/// may pick different tokens and still agree: logits computed on different adapters differ
/// in their last bits (f32 reductions in another order), far below this, so only a choice
/// that was nearly a coin toss can flip.
pub const NEAR_TIE_LOGITS: f32 = 0.1;

/// How runs of a generation job with `n_prompt` prompt tokens compare under verification.
pub fn token_comparison(n_prompt: usize) -> hashgrid_protocol::Verification {
    hashgrid_protocol::Verification {
        tokens: Some(hashgrid_protocol::TokenCompare {
            tokens: outputs::TOKENS.into(),
            status: outputs::STATUS.into(),
            margins: outputs::MARGINS.into(),
            n_prompt: u32::try_from(n_prompt).unwrap_or(u32::MAX),
            max_tie: NEAR_TIE_LOGITS,
        }),
        ..Default::default()
    }
}

/// Names of the output buffers a generation job returns.
pub mod outputs {
    /// `u32` per position: the prompt, then the generated tokens.
    pub const TOKENS: &str = "tokens";
    /// `[done, generated]` as `u32`s.
    pub const STATUS: &str = "status";
    /// `f32` per generated token: the top-1 minus top-2 logit at that step.
    pub const MARGINS: &str = "margins";
}

/// What a generation job produced, read from its output buffers.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// Generated token ids (the end-of-generation token included when one was sampled).
    pub tokens: Vec<u32>,
    /// Top-1 minus top-2 logit at each generated step.
    pub margins: Vec<f32>,
    /// Whether generation stopped (end of generation or the token limit).
    pub done: bool,
}

fn u32s(bytes: &[u8]) -> impl Iterator<Item = u32> + '_ {
    bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
}

/// Reads generated tokens from `tokens` and `status` (and `margins` when given): the job's
/// outputs or a streamed update. Never reads past what the buffers hold.
pub fn read_generation(
    n_prompt: usize,
    tokens: &[u8],
    status: &[u8],
    margins: Option<&[u8]>,
) -> Generation {
    let mut st = u32s(status);
    let done = st.next().unwrap_or(0) != 0;
    let generated = st.next().unwrap_or(0) as usize;
    let toks: Vec<u32> = u32s(tokens).skip(n_prompt).take(generated).collect();
    let margins = margins
        .map(|m| {
            u32s(m)
                .take(toks.len())
                .map(f32::from_bits)
                .collect::<Vec<f32>>()
        })
        .unwrap_or_default();
    Generation {
        tokens: toks,
        margins,
        done,
    }
}

/// Builds a job: buffers by name, shaders deduplicated by text, parameters in 256-byte slots
/// of one buffer (the first), deduplicated. Shared by the decoder and the encoder compilers.
pub(crate) struct Builder {
    buffers: Vec<BufferSpec>,
    inputs: Inputs,
    shaders: Vec<ShaderSource>,
    shader_keys: Vec<String>,
    passes: Vec<PassSpec>,
    params: Vec<[u32; 64]>,
    params_buf: u32,
    /// The adapter kind the kernels are shaped for.
    pub(crate) target: Target,
}

impl Builder {
    /// An empty job whose first buffer will hold the parameters.
    pub(crate) fn new() -> Builder {
        let mut b = Builder {
            buffers: Vec::new(),
            inputs: BTreeMap::new(),
            shaders: Vec::new(),
            shader_keys: Vec::new(),
            passes: Vec::new(),
            params: Vec::new(),
            params_buf: 0,
            target: Target::Cpu,
        };
        // Its contents are known at `finish`.
        b.params_buf = b.zeroed("params", 4, false);
        b
    }

    /// A zero-filled buffer.
    pub(crate) fn zeroed(&mut self, name: &str, size: u64, output: bool) -> u32 {
        self.buffers.push(BufferSpec {
            name: name.into(),
            size: size.max(4),
            init: BufferInit::Zeroed,
            output,
        });
        (self.buffers.len() - 1) as u32
    }

    /// A buffer initialised from `bytes` (an input blob, shared by content id).
    pub(crate) fn blob(&mut self, name: &str, bytes: Vec<u8>, output: bool) -> u32 {
        let id = ContentId::of(&bytes);
        self.shared(name, id, &Arc::new(bytes), output)
    }

    /// A buffer initialised from a shared blob whose content id is `id` (weights: neither
    /// copied nor hashed again per request).
    pub(crate) fn shared(
        &mut self,
        name: &str,
        id: ContentId,
        bytes: &Arc<Vec<u8>>,
        output: bool,
    ) -> u32 {
        self.buffers.push(BufferSpec {
            name: name.into(),
            size: bytes.len() as u64,
            init: BufferInit::Blob(id),
            output,
        });
        self.inputs.entry(id).or_insert_with(|| bytes.clone());
        (self.buffers.len() - 1) as u32
    }

    /// The shader called `key`, made by `make` the first time.
    pub(crate) fn shader(&mut self, key: &str, make: impl FnOnce() -> String) -> u32 {
        if let Some(i) = self.shader_keys.iter().position(|k| k == key) {
            return i as u32;
        }
        self.shader_keys.push(key.into());
        self.shaders.push(ShaderSource {
            name: format!("{key}.wgsl"),
            wgsl: make(),
        });
        (self.shaders.len() - 1) as u32
    }

    /// The binding of a parameter slot holding `values`.
    pub(crate) fn param(&mut self, binding: u32, values: &[u32]) -> Binding {
        let mut slot = [0u32; 64];
        for (s, v) in slot.iter_mut().zip(values) {
            *s = *v;
        }
        let i = match self.params.iter().position(|p| *p == slot) {
            Some(i) => i,
            None => {
                self.params.push(slot);
                self.params.len() - 1
            }
        };
        Binding {
            binding,
            buffer: self.params_buf,
            range: Some(BufferRange {
                offset: i as u64 * RANGE_ALIGN,
                size: RANGE_ALIGN,
            }),
        }
    }

    /// A pass of `groups` workgroups.
    pub(crate) fn pass(&mut self, shader: u32, entry: &str, groups: u64, bindings: Vec<Binding>) {
        self.pass_xy(shader, entry, [groups, 1], bindings);
    }

    /// A pass of `x × y` workgroups.
    pub(crate) fn pass_xy(
        &mut self,
        shader: u32,
        entry: &str,
        [x, y]: [u64; 2],
        mut bindings: Vec<Binding>,
    ) {
        bindings.sort_by_key(|b| b.binding);
        self.passes.push(PassSpec {
            shader,
            entry: entry.into(),
            workgroups: [x.max(1) as u32, y.max(1) as u32, 1],
            bindings,
        });
    }

    /// Passes so far.
    pub(crate) fn n_passes(&self) -> u32 {
        self.passes.len() as u32
    }

    /// Writes the parameter buffer and returns the job and its inputs.
    pub(crate) fn finish(mut self, name: String, loops: Vec<LoopSpec>) -> (JobSpec, Inputs) {
        let params: Vec<u8> = self
            .params
            .iter()
            .flat_map(|slot| slot.iter().flat_map(|v| v.to_le_bytes()))
            .collect();
        let pid = ContentId::of(&params);
        let pb = &mut self.buffers[self.params_buf as usize];
        pb.size = params.len() as u64;
        pb.init = BufferInit::Blob(pid);
        self.inputs.insert(pid, Arc::new(params));
        let spec = JobSpec {
            name,
            buffers: self.buffers,
            shaders: self.shaders,
            passes: self.passes,
            loops,
        };
        (spec, self.inputs)
    }
}

pub(crate) fn whole(binding: u32, buffer: u32) -> Binding {
    Binding::whole(binding, buffer)
}

pub(crate) fn ranged(binding: u32, buffer: u32, range: BufferRange) -> Binding {
    Binding {
        binding,
        buffer,
        range: Some(range),
    }
}

fn groups(n: u64, per: u32) -> u64 {
    n.div_ceil(u64::from(per))
}

/// Row bytes of a `cols`-wide row of `ty` as the kernels read it (packed for Q8_0 and Q4_1).
fn row_bytes(ty: GgmlType, cols: u64) -> u64 {
    kernels::quant::kernel_row_bytes(ty, cols)
}

/// Compiles `req` for `model` into a job whose inputs are `weights` and the request.
pub fn compile_generate(
    model: &LlamaModel,
    weights: &ModelWeights,
    req: &GenerateRequest,
) -> Result<CompiledJob, CompileError> {
    let c = &model.config;
    let bad = |s: String| Err(CompileError::Request(s));
    if req.prompt.is_empty() {
        return bad("the prompt has no tokens".into());
    }
    if req.max_new_tokens == 0 || req.max_new_tokens > MAX_NEW_TOKENS {
        return bad(format!(
            "max new tokens must be 1 to {MAX_NEW_TOKENS}, not {}",
            req.max_new_tokens
        ));
    }
    if let Some(t) = req.prompt.iter().find(|&&t| t as usize >= c.vocab) {
        return bad(format!(
            "prompt token {t} is outside the vocabulary of {}",
            c.vocab
        ));
    }
    if req.eog.len() > MAX_EOG {
        return bad(format!(
            "{} end-of-generation tokens, at most {MAX_EOG}",
            req.eog.len()
        ));
    }
    let s = &req.sampling;
    let temperature_ok = s.temperature.is_finite() && s.temperature >= 0.0;
    let top_p_ok = s.top_p.is_finite() && s.top_p > 0.0 && s.top_p <= 1.0;
    if !(temperature_ok && top_p_ok) {
        return bad(format!(
            "temperature must be ≥ 0 and top_p in (0, 1]; got {} and {}",
            s.temperature, s.top_p
        ));
    }
    let n_prompt = req.prompt.len();
    let max_total = n_prompt + req.max_new_tokens as usize;
    if max_total > c.ctx_len {
        return Err(CompileError::Context {
            prompt: n_prompt,
            max_new: req.max_new_tokens,
            ctx: c.ctx_len,
        });
    }
    // The prompt's positions before its last run first, in a loop over chunks of up to
    // `PREFILL_TOKENS` positions that go through the weights together (one dispatch per
    // operation for a whole chunk). The last chunk may run past the prompt: those positions'
    // K and V are overwritten by the generation loop before anything reads them. The
    // generation loop then starts at the prompt's last position, whose logits give the first
    // new token.
    let pre = n_prompt - 1;
    let chunk_len = pre.min(match req.target {
        Target::Cpu => PREFILL_TOKENS,
        Target::Gpu => PREFILL_TOKENS_GPU,
    });
    let chunks = if pre == 0 { 0 } else { pre.div_ceil(chunk_len) };
    let cap = chunk_len.max(1) as u64;
    // KV rows per layer, a multiple of 64 so every layer's slice starts 256-aligned.
    let ctx = max_total.max(chunks * chunk_len).next_multiple_of(64) as u64;
    let Dims {
        d,
        ff,
        vocab,
        nh,
        qd,
        kvd,
        qkv_len,
        ..
    } = Dims::of(c);

    let mut b = Builder::new();
    b.target = req.target;
    let step = b.zeroed("step", 16, false);
    let mut prompt_bytes: Vec<u8> = req.prompt.iter().flat_map(|t| t.to_le_bytes()).collect();
    prompt_bytes.resize(max_total * 4, 0);
    let tokens = b.blob(outputs::TOKENS, prompt_bytes, true);
    let status = b.zeroed(outputs::STATUS, 16, true);
    let margins = b.zeroed(outputs::MARGINS, u64::from(req.max_new_tokens) * 4, true);
    let gate_up_fused = c.n_layers == 0
        || weights
            .blocks
            .iter()
            .all(|l| l.gate.ty == l.up.ty && l.up.offset == align(l.gate.offset + l.gate.size));
    // Activations for up to `cap` tokens; one token uses the first.
    let bufs = Activations {
        tokens,
        x: b.zeroed("x", cap * d * 4, false),
        xn: b.zeroed("xn", cap * d * 4, false),
        qkv: b.zeroed("qkv", cap * qkv_len * 4, false),
        att: b.zeroed("att", cap * qd * 4, false),
        ffh: b.zeroed("ffh", cap * ff * 4, false),
        gu: (!gate_up_fused).then(|| b.zeroed("gate_up", cap * 2 * ff * 4, false)),
        kcache: b.zeroed("k_cache", c.n_layers as u64 * ctx * kvd * 4, false),
        vcache: b.zeroed("v_cache", c.n_layers as u64 * ctx * kvd * 4, false),
        scores: b.zeroed("scores", cap * nh * ctx * 4, false),
    };
    let logits = b.zeroed("logits", vocab * 4, false);

    let weight_buf = |b: &mut Builder, name: &str| -> Result<u32, CompileError> {
        let w = weights.blob(name).ok_or_else(|| {
            CompileError::Request(format!("weights have no blob {name:?}: reload the model"))
        })?;
        Ok(b.shared(name, w.id, &w.bytes, false))
    };
    let embd = weight_buf(&mut b, "token_embd")?;
    let out_norm = weight_buf(&mut b, "output_norm")?;
    let output = if c.tied_embeddings {
        embd
    } else {
        weight_buf(&mut b, "output")?
    };
    let blks = (0..weights.blocks.len())
        .map(|l| weight_buf(&mut b, &format!("blk.{l}")))
        .collect::<Result<Vec<u32>, _>>()?;
    let dec = Decoder {
        model,
        weights,
        bufs,
        embd,
        blks,
        ctx,
    };

    let mut loops = Vec::new();
    if chunks > 0 {
        let counter = b.zeroed("chunk", 16, false);
        let first = b.n_passes();
        let at = At {
            counter,
            stride: chunk_len as u32,
            offset: 0,
        };
        dec.positions(&mut b, at, cap)?;
        loops.push(LoopSpec {
            first,
            len: b.n_passes() - first,
            max_iters: chunks as u32,
            counter: Some(counter),
            stop: None,
            check_every: PREFILL_CHECK_EVERY.min(chunks as u32),
            stream: Vec::new(),
        });
    }
    // The generation loop: positions `pre ..= max_total − 2` each sample the token after them.
    // With checks less often than every token, its first iteration is a loop of its own,
    // checked at once, so the first new token reaches the caller as soon as it would with a
    // check at every token; the rest follow `check_every` at a time. The two loops run the
    // same passes from two positions on (the step counter restarts at 0 for each), so the
    // split is made only where the job's passes stay within [`DEFAULT_MAX_PASSES`] (a very
    // deep model keeps one loop and its first token waits for the first check). Every
    // iteration the sampler runs after the stop flag is set changes nothing (it writes no
    // token, and what it leaves in the KV cache is never read), so the outputs are the same
    // whatever the checks.
    let iters = (max_total - 1 - pre) as u32;
    let check_every = req.check_every.max(1);
    let f = |v: f32| v.to_bits();
    // The decoder step's passes, for positions `offset + step`.
    let step_passes = |b: &mut Builder, offset: usize| -> Result<(), CompileError> {
        let at = At {
            counter: step,
            stride: 1,
            offset: offset as u32,
        };
        dec.positions(b, at, 1)?;

        // Output norm (fused into the logits matvec when it can be), logits, sampling.
        let x = dec.bufs.x;
        let fuse = fusable(weights.output_ty, d);
        if !fuse {
            dec.rms_pass(b, whole(1, out_norm), 1);
        }
        matvec_pass(
            b,
            MatvecPass {
                kind: Matvec::Logits,
                ty: weights.output_ty,
                weights: whole(0, output),
                x: if fuse { x } else { dec.bufs.xn },
                y: logits,
                rows: vocab,
                cols: d,
                segs: &[(vocab, 0)],
                yoff: 0,
                y_stride: 0,
                tokens: 1,
                // The loop starts at the prompt's last position: every step needs its logits.
                n_prompt: 0,
                extra: Some(whole(4, step)),
                rope: None,
                norm: fuse.then(|| {
                    let size = d * 4;
                    (
                        ranged(5, out_norm, BufferRange { offset: 0, size }),
                        c.rms_eps,
                    )
                }),
            },
        );
        let sh = b.shader("sample", kernels::sample);
        let mut sp = vec![
            n_prompt as u32,
            max_total as u32,
            vocab as u32,
            req.eog.len() as u32,
        ];
        let mut eog = [u32::MAX; MAX_EOG];
        for (e, id) in eog.iter_mut().zip(&req.eog) {
            *e = *id;
        }
        sp.extend_from_slice(&eog);
        sp.extend_from_slice(&[f(s.temperature), s.top_k, f(s.top_p), s.seed, offset as u32]);
        let p = b.param(4, &sp);
        b.pass(
            sh,
            "sample",
            1,
            vec![
                whole(0, logits),
                whole(1, tokens),
                whole(2, status),
                whole(3, margins),
                p,
                whole(5, step),
            ],
        );
        Ok(())
    };
    let gen_loop = |first: u32, len: u32, iters: u32, check_every: u32| LoopSpec {
        first,
        len,
        max_iters: iters,
        counter: Some(step),
        stop: Some(status),
        check_every: check_every.min(iters),
        stream: vec![tokens, status],
    };
    let first = b.n_passes();
    step_passes(&mut b, pre)?;
    let len = b.n_passes() - first;
    if check_every > 1 && iters > 1 && b.n_passes() + len <= DEFAULT_MAX_PASSES {
        loops.push(gen_loop(first, len, 1, 1));
        let second = b.n_passes();
        step_passes(&mut b, pre + 1)?;
        loops.push(gen_loop(
            second,
            b.n_passes() - second,
            iters - 1,
            check_every,
        ));
    } else {
        loops.push(gen_loop(first, len, iters, check_every));
    }
    let (spec, inputs) = b.finish(format!("generate {}", model.name), loops);
    Ok(CompiledJob {
        spec,
        inputs,
        n_prompt,
        max_total,
        model: weights.manifest(),
        compare: token_comparison(n_prompt),
    })
}

/// Prompt positions run together, through the same weights, before the generation loop.
/// Eight: the activations of a chunk (8 × the widest row) stay small, and a chunk costs one
/// dispatch per operation instead of eight.
pub const PREFILL_TOKENS: usize = 8;

/// [`PREFILL_TOKENS`] for a GPU-shaped job ([`Target::Gpu`]): a chunk is a loop iteration of
/// ~180 dispatches whose cost hardly depends on its tokens there, so larger chunks mean fewer
/// iterations (a 1,024-token prompt is 16 instead of 128).
pub const PREFILL_TOKENS_GPU: usize = 64;

/// Prefill chunks between the executor's checks (each a GPU round trip; a check is also
/// where a job past its time limit stops).
const PREFILL_CHECK_EVERY: u32 = 8;

/// A decoder's shapes, as the job's sizes and kernel parameters use them.
struct Dims {
    d: u64,
    hd: u64,
    ff: u64,
    vocab: u64,
    nh: u64,
    nkv: u64,
    /// q's width (`nh · hd`).
    qd: u64,
    /// k's and v's width (`nkv · hd`).
    kvd: u64,
    /// q, k and v together.
    qkv_len: u64,
}

impl Dims {
    fn of(c: &crate::model::LlamaConfig) -> Dims {
        let (hd, nh, nkv) = (c.head_dim as u64, c.n_heads as u64, c.n_kv_heads as u64);
        let (qd, kvd) = (nh * hd, nkv * hd);
        Dims {
            d: c.d_model as u64,
            hd,
            ff: c.d_ff as u64,
            vocab: c.vocab as u64,
            nh,
            nkv,
            qd,
            kvd,
            qkv_len: qd + 2 * kvd,
        }
    }
}

/// Where a run of positions starts: `counter · stride + offset` (the counter is the loop's
/// iteration number).
#[derive(Debug, Clone, Copy)]
struct At {
    counter: u32,
    stride: u32,
    offset: u32,
}

/// The job's activation buffers, each sized for a prefill chunk (one token uses the start).
struct Activations {
    /// The prompt, then the generated tokens.
    tokens: u32,
    x: u32,
    xn: u32,
    qkv: u32,
    att: u32,
    ffh: u32,
    /// Gate and up outputs when they are two matvecs (types differ).
    gu: Option<u32>,
    kcache: u32,
    vcache: u32,
    scores: u32,
}

/// What every decoder pass needs: the model, its weights and the job's buffers.
struct Decoder<'a> {
    model: &'a LlamaModel,
    weights: &'a ModelWeights,
    bufs: Activations,
    embd: u32,
    /// One weight buffer per block.
    blks: Vec<u32>,
    /// KV cache rows per layer.
    ctx: u64,
}

impl Decoder<'_> {
    /// `xn = rmsnorm(x) · w` for `tokens` vectors, as its own pass (for the norms that cannot
    /// be fused into the matvec after them). The kernel is made on first use: with every norm
    /// fused, the job carries none.
    fn rms_pass(&self, b: &mut Builder, w: Binding, tokens: u64) {
        let c = &self.model.config;
        let d = c.d_model as u64;
        let p = b.param(3, &[d as u32, c.rms_eps.to_bits()]);
        let sh = if d.is_multiple_of(4) {
            b.shader("rmsnorm_vec4", kernels::rmsnorm_vec4)
        } else {
            b.shader("rmsnorm", kernels::rmsnorm)
        };
        b.pass_xy(
            sh,
            "rmsnorm",
            [1, tokens],
            vec![whole(0, self.bufs.x), w, whole(2, self.bufs.xn), p],
        );
    }

    /// The passes that take `tokens` consecutive positions from `at` through the
    /// embedding and every block (their K and V into the cache, the last hidden state in `x`).
    /// One token gets the decode kernels (norms fused into matvecs, q as a uniform array).
    fn positions(&self, b: &mut Builder, at: At, tokens: u64) -> Result<(), CompileError> {
        let c = &self.model.config;
        let w = self.weights;
        let a = &self.bufs;
        let Dims {
            d,
            hd,
            ff,
            vocab,
            nh,
            nkv,
            qd,
            kvd,
            qkv_len,
        } = Dims::of(c);
        let ctx = self.ctx;
        let one = tokens == 1;
        let f = |v: f32| v.to_bits();

        // Embedding.
        let sh = b.shader(&format!("embed_{}", w.embd_ty.name()), || {
            kernels::embed(w.embd_ty)
        });
        let embd_rb = row_bytes(w.embd_ty, d);
        let p = b.param(
            3,
            &[d as u32, embd_rb as u32, vocab as u32, at.offset, at.stride],
        );
        let be = kernels::quant::kernel_block_elems(w.embd_ty);
        b.pass_xy(
            sh,
            "embed",
            [groups(d / be, kernels::ROWS_PER_GROUP), tokens],
            vec![
                whole(0, self.embd),
                whole(1, a.tokens),
                whole(2, a.x),
                p,
                whole(4, at.counter),
            ],
        );

        // On a GPU, one token's RoPE and KV append happen inside its attention dispatch.
        let rope_in_attention = one
            && b.target == Target::Gpu
            && c.head_dim <= kernels::ATTN_ROPE_MAX_HEAD as usize
            && c.head_dim / 4 <= kernels::ATTN_SPLIT_THREADS as usize;
        // Else RoPE runs in its own `rope_store` pass, or, in a CPU-shaped decode step with
        // adjacent-pair RoPE, inside each layer's q, k, v matvec where that matvec fuses its
        // norm (per layer: types can differ). (Shaders are registered only where a pass uses
        // them.)
        let rope_in_matvec = one
            && b.target == Target::Cpu
            && c.rope_style != RopeStyle::Neox
            && qd.is_multiple_of(u64::from(kernels::rows_per_lane(Matvec::Plain)))
            && kvd.is_multiple_of(u64::from(kernels::rows_per_lane(Matvec::Plain)))
            && hd.is_multiple_of(2);
        let mut rope_sh: Option<u32> = None;
        // One token's q (the first `qd` floats of qkv) as a uniform array when it fits.
        let q_bytes = qd * 4;
        let uniform_q = one && q_bytes <= MAX_UNIFORM_X;
        let uq = uniform_q.then_some((q_bytes / 16) as u32);
        // A CPU-shaped job keeps the K and V caches as textures: every pass that touches them
        // binds them so (`kernels::KV_TEXTURE`); lavapipe reads texels far faster than
        // storage buffers. GPUs read them as buffers.
        let kv_tex = b.target == Target::Cpu;
        let attn_sh = if rope_in_attention {
            b.shader("attention_rope", kernels::attention_rope)
        } else if b.target == Target::Gpu && c.head_dim / 4 <= kernels::ATTN_SPLIT_THREADS as usize
        {
            let key = format!("attention_split_q{}", uq.unwrap_or(0));
            b.shader(&key, || kernels::attention_split(uq))
        } else if kv_tex {
            let n = uq.unwrap_or(0);
            b.shader(&format!("attention_q{n}_tex"), || {
                kernels::attention_q_tex(uq)
            })
        } else if let Some(n) = uq {
            b.shader(&format!("attention_q{n}"), || kernels::attention_q(Some(n)))
        } else {
            b.shader("attention", kernels::attention)
        };
        let q_binding = if uniform_q {
            ranged(
                0,
                a.qkv,
                BufferRange {
                    offset: 0,
                    size: q_bytes,
                },
            )
        } else {
            whole(0, a.qkv)
        };
        for (l, lay) in w.blocks.iter().enumerate() {
            let blk = self.blks[l];
            // attn_norm: fused into the q, k, v matvec when the three share a type it can fuse.
            let qkv_one = lay.q.ty == lay.k.ty && lay.k.ty == lay.v.ty;
            let fuse = one && qkv_one && fusable(lay.q.ty, d);
            let rope_fused = fuse && rope_in_matvec;
            // This layer's K and V caches.
            let kv_range = BufferRange {
                offset: l as u64 * ctx * kvd * 4,
                size: ctx * kvd * 4,
            };
            if !fuse {
                self.rms_pass(b, ranged(1, blk, lay.attn_norm.range()), tokens);
            }
            // q, k, v: one dispatch when the three share a type.
            let kind = if lay.bias.is_some() {
                Matvec::Bias
            } else {
                Matvec::Plain
            };
            let segs = [(lay.q, qd), (lay.k, kvd), (lay.v, kvd)];
            if qkv_one {
                let base = lay.q.offset;
                let span = BufferRange {
                    offset: base,
                    // Packed weights are read as a texture: whole 16-byte texels.
                    size: (lay.v.offset + lay.v.size - base).next_multiple_of(
                        if kernels::quant::is_packed(lay.q.ty) {
                            16
                        } else {
                            4
                        },
                    ),
                };
                let segs: Vec<(u64, u64)> = segs
                    .iter()
                    .map(|(slot, rows)| (*rows, slot.offset - base))
                    .collect();
                matvec_pass(
                    b,
                    MatvecPass {
                        kind,
                        ty: lay.q.ty,
                        weights: ranged(0, blk, span),
                        x: if fuse { a.x } else { a.xn },
                        y: a.qkv,
                        rows: qkv_len,
                        cols: d,
                        segs: &segs,
                        yoff: 0,
                        y_stride: qkv_len,
                        tokens,
                        n_prompt: 0,
                        extra: lay.bias.map(|bias| ranged(4, blk, bias.range())),
                        norm: fuse.then(|| (ranged(5, blk, lay.attn_norm.range()), c.rms_eps)),
                        rope: rope_fused.then(|| RopeFuse {
                            kc: ranged(6, a.kcache, kv_range),
                            vc: ranged(7, a.vcache, kv_range),
                            step: whole(8, at.counter),
                            params: [
                                qd as u32,
                                kvd as u32,
                                hd as u32,
                                c.rope_dim as u32,
                                f(c.rope_base),
                                at.offset,
                                at.stride,
                            ],
                        }),
                    },
                );
            } else {
                let mut yoff = 0u64;
                for (slot, rows) in segs {
                    let extra = match lay.bias {
                        None => None,
                        Some(bias) => {
                            // The bias slice for this segment: F32 values at yoff.
                            let start = bias.offset + yoff * 4;
                            if !start.is_multiple_of(RANGE_ALIGN) {
                                return Err(CompileError::Request(
                                    "mixed-type q/k/v with biases at unaligned offsets are not supported"
                                        .into(),
                                ));
                            }
                            Some(ranged(
                                4,
                                blk,
                                BufferRange {
                                    offset: start,
                                    size: rows * 4,
                                },
                            ))
                        }
                    };
                    matvec_pass(
                        b,
                        MatvecPass {
                            kind,
                            ty: slot.ty,
                            weights: ranged(0, blk, slot.range()),
                            x: a.xn,
                            y: a.qkv,
                            rows,
                            cols: d,
                            segs: &[(rows, 0)],
                            yoff,
                            y_stride: qkv_len,
                            tokens,
                            n_prompt: 0,
                            extra,
                            rope: None,
                            norm: None,
                        },
                    );
                    yoff += rows;
                }
            }
            // RoPE, KV cache append (done already where the q, k, v matvec fused them).
            let neox = u32::from(c.rope_style == RopeStyle::Neox);
            let scale = 1.0 / (hd as f32).sqrt();
            // Attention's parameters; with RoPE inside it, the RoPE's after them.
            let mut attn_p = vec![
                nh as u32,
                nkv as u32,
                hd as u32,
                ctx as u32,
                f(scale),
                at.offset,
                (qkv_len / 4) as u32,
                (qd / 4) as u32,
                at.stride,
            ];
            let q_bind = if rope_fused {
                q_binding
            } else if !rope_in_attention {
                let rope_sh = *rope_sh.get_or_insert_with(|| {
                    if kv_tex {
                        b.shader("rope_store_tex", kernels::rope_store_tex)
                    } else {
                        b.shader("rope_store", kernels::rope_store)
                    }
                });
                // The texture variant: q's pairs, then one thread per texel of k and v.
                let threads = if kv_tex {
                    nh * (hd / 2) + nkv * (hd / 4)
                } else {
                    (nh + nkv) * (hd / 2)
                };
                let p = b.param(
                    3,
                    &[
                        nh as u32,
                        nkv as u32,
                        hd as u32,
                        c.rope_dim as u32,
                        neox,
                        f(c.rope_base),
                        at.offset,
                        qkv_len as u32,
                        at.stride,
                    ],
                );
                b.pass_xy(
                    rope_sh,
                    "rope_store",
                    [groups(threads, kernels::ROWS_PER_GROUP), tokens],
                    vec![
                        whole(0, a.qkv),
                        ranged(1, a.kcache, kv_range),
                        ranged(2, a.vcache, kv_range),
                        p,
                        whole(4, at.counter),
                    ],
                );
                q_binding
            } else {
                attn_p.extend([c.rope_dim as u32, neox, f(c.rope_base)]);
                // The raw q, k and v: the kernel rotates them itself.
                whole(0, a.qkv)
            };
            // Attention.
            let p = b.param(5, &attn_p);
            b.pass_xy(
                attn_sh,
                "attention",
                [nh, tokens],
                vec![
                    q_bind,
                    ranged(1, a.kcache, kv_range),
                    ranged(2, a.vcache, kv_range),
                    whole(3, a.att),
                    whole(4, a.scores),
                    p,
                    whole(6, at.counter),
                ],
            );
            // x += Wo · att
            matvec_add(b, blk, lay.o, a.att, a.x, qd, d, tokens);
            // ffn_norm: fused into the gate-up matvec when it can be.
            let fuse = one && a.gu.is_none() && fusable(lay.gate.ty, d);
            if !fuse {
                self.rms_pass(b, ranged(1, blk, lay.ffn_norm.range()), tokens);
            }
            // SwiGLU
            if let Some(gu) = a.gu {
                for (i, slot) in [lay.gate, lay.up].into_iter().enumerate() {
                    matvec_pass(
                        b,
                        MatvecPass {
                            kind: Matvec::Plain,
                            ty: slot.ty,
                            weights: ranged(0, blk, slot.range()),
                            x: a.xn,
                            y: gu,
                            rows: ff,
                            cols: d,
                            segs: &[(ff, 0)],
                            yoff: i as u64 * ff,
                            y_stride: 2 * ff,
                            tokens,
                            n_prompt: 0,
                            extra: None,
                            rope: None,
                            norm: None,
                        },
                    );
                }
                let sh = b.shader("silu_mul", kernels::silu_mul);
                let p = b.param(2, &[ff as u32]);
                b.pass_xy(
                    sh,
                    "silu_mul",
                    [groups(ff, kernels::ROWS_PER_GROUP), tokens],
                    vec![whole(0, gu), whole(1, a.ffh), p],
                );
            } else {
                let span = BufferRange {
                    offset: lay.gate.offset,
                    size: (lay.up.offset + lay.up.size - lay.gate.offset).next_multiple_of(4),
                };
                matvec_pass(
                    b,
                    MatvecPass {
                        kind: Matvec::GateUp,
                        ty: lay.gate.ty,
                        weights: ranged(0, blk, span),
                        x: if fuse { a.x } else { a.xn },
                        y: a.ffh,
                        rows: ff,
                        cols: d,
                        segs: &[(ff, 0), (ff, lay.up.offset - lay.gate.offset)],
                        yoff: 0,
                        y_stride: ff,
                        tokens,
                        n_prompt: 0,
                        extra: None,
                        rope: None,
                        norm: fuse.then(|| (ranged(5, blk, lay.ffn_norm.range()), c.rms_eps)),
                    },
                );
            }
            // x += Wd · h
            matvec_add(b, blk, lay.down, a.ffh, a.x, ff, d, tokens);
        }
        Ok(())
    }
}

/// Largest activation vector a matvec reads as `var<uniform>`: WebGPU's guaranteed
/// `maxUniformBufferBindingSize`.
const MAX_UNIFORM_X: u64 = 64 * 1024;

/// One matvec pass. The kernel's parameter layout (`kernels::matvec`) is written here only.
pub(crate) struct MatvecPass<'a> {
    /// Flavour.
    pub(crate) kind: Matvec,
    /// Weight type.
    pub(crate) ty: GgmlType,
    /// The weights (binding 0): one range spanning every segment.
    pub(crate) weights: Binding,
    /// Input vectors (`cols` floats per token).
    pub(crate) x: u32,
    /// Output buffer.
    pub(crate) y: u32,
    /// Output rows (for `GateUp`, rows of each of its two segments).
    pub(crate) rows: u64,
    /// Row length.
    pub(crate) cols: u64,
    /// (rows, byte offset in the weights range) per segment, at most three.
    pub(crate) segs: &'a [(u64, u64)],
    /// First output element.
    pub(crate) yoff: u64,
    /// Output floats per token (0 for one token).
    pub(crate) y_stride: u64,
    /// Tokens (the dispatch's y dimension).
    pub(crate) tokens: u64,
    /// Prompt length (`Logits` only).
    pub(crate) n_prompt: u64,
    /// Binding 4: the bias (`Bias`) or the step counter (`Logits`).
    pub(crate) extra: Option<Binding>,
    /// The RMS norm to fuse in (`x` is then the raw residual): its weights as binding 5 and
    /// its epsilon. Only where [`fusable`] says the kernel can.
    pub(crate) norm: Option<(Binding, f32)>,
    /// RoPE and the KV-cache append to fuse into a q, k, v matvec with a fused norm
    /// ([`kernels::matvec_norm_rope`]).
    pub(crate) rope: Option<RopeFuse>,
}

/// What [`kernels::matvec_norm_rope`] needs beyond a matvec: the layer's K and V caches
/// (bindings 6 and 7), the step counter (binding 8) and its parameters
/// `[q rows, kv rows, head_dim, rope_dim, base as f32 bits, offset, step_stride]`.
pub(crate) struct RopeFuse {
    pub(crate) kc: Binding,
    pub(crate) vc: Binding,
    pub(crate) step: Binding,
    pub(crate) params: [u32; 7],
}

/// Whether a one-token matvec over `ty` with rows of `cols` can fuse the RMS norm before it
/// ([`kernels::matvec_norm`]): packed weights and activations (and norm weights) that fit a
/// uniform array.
pub(crate) fn fusable(ty: GgmlType, cols: u64) -> bool {
    kernels::quant::is_packed(ty) && cols.is_multiple_of(4) && cols * 4 <= MAX_UNIFORM_X
}

/// Adds `m` to the job.
pub(crate) fn matvec_pass(b: &mut Builder, m: MatvecPass<'_>) {
    let mut pv = vec![
        m.rows as u32,
        m.cols as u32,
        row_bytes(m.ty, m.cols) as u32,
        m.yoff as u32,
        m.segs.len() as u32,
    ];
    for k in 0..3 {
        let (r, o) = m.segs.get(k).copied().unwrap_or((0, 0));
        pv.push(r as u32);
        pv.push(o as u32);
    }
    pv.push(m.n_prompt as u32);
    pv.push(m.y_stride as u32);
    // Callers fuse a norm only where `fusable` says so (else they run `rmsnorm` first).
    debug_assert!(m.norm.is_none() || (m.tokens == 1 && fusable(m.ty, m.cols)));
    let norm = m.norm;
    if let Some((_, eps)) = norm {
        pv.push(eps.to_bits());
    }
    // Only with the norm fused, on the CPU shape's one-token kernel: the caller, which then
    // runs no `rope_store` pass, checks that.
    debug_assert!(
        m.rope.is_none() || (norm.is_some() && b.target == Target::Cpu && m.tokens == 1),
        "RoPE fused where the kernel cannot take it"
    );
    let rope = m.rope.filter(|_| norm.is_some() && b.target == Target::Cpu);
    if let Some(r) = &rope {
        pv.extend(r.params);
    }
    // The slot the CPU-shaped kernels over packed weights mask their prefetch with: 0.
    debug_assert_eq!(
        pv.len(),
        kernels::matvec_zero_slot(norm.is_some(), rope.is_some()) as usize
    );
    pv.push(0);
    let p = b.param(3, &pv);
    let (kind, ty) = (m.kind, m.ty);
    // The activations as a uniform array when they fit the 64 KiB every adapter allows.
    let x_bytes = m.tokens * m.cols * 4;
    let uniform_x = (m.cols.is_multiple_of(4) && x_bytes <= MAX_UNIFORM_X).then_some(x_bytes);
    let (name, x) = match uniform_x {
        Some(n) => (
            format!("{}_{}_x{}", kind.entry(), ty.name(), n / 16),
            ranged(1, m.x, BufferRange { offset: 0, size: n }),
        ),
        None => (format!("{}_{}", kind.entry(), ty.name()), whole(1, m.x)),
    };
    // On a GPU, rows split over several invocations (one token's or a prefill chunk's), when
    // a token's activations fit the kernel's workgroup memory; a chunk's activations too wide
    // for a uniform binding are read from storage.
    if b.target == Target::Gpu
        && kernels::quant::is_packed(ty)
        && m.cols.is_multiple_of(4)
        && m.cols / 4 <= u64::from(kernels::SPLIT_MAX_X)
        && (norm.is_none() || uniform_x.is_some())
    {
        let (un, cols4) = (uniform_x.map(|n| (n / 16) as u32), (m.cols / 4) as u32);
        let fused = norm.is_some();
        // The key names the per-token width too: the same total (`name`) can be one wide token
        // or several narrow ones.
        let key = format!("{name}_c{cols4}_split{}", if fused { "_norm" } else { "" });
        let sh = b.shader(&key, || kernels::matvec_split(ty, kind, un, cols4, fused));
        let mut bind = vec![m.weights, x, whole(2, m.y), p];
        bind.extend(m.extra);
        bind.extend(norm.map(|(w, _)| w));
        b.pass_xy(
            sh,
            kind.entry(),
            [groups(m.rows, kernels::SPLIT_ROWS), m.tokens],
            bind,
        );
        return;
    }
    // Several tokens through packed weights: each weight block read once for all of them.
    if let (true, Some(n), None) = (
        m.tokens > 1 && kernels::quant::is_packed(ty) && kind != Matvec::Logits,
        uniform_x,
        norm,
    ) {
        let t = m.tokens as u32;
        let sh = b.shader(&format!("{name}_t{t}"), || {
            kernels::matmul(ty, kind, t, (n / 16) as u32)
        });
        let mut bind = vec![m.weights, x, whole(2, m.y), p];
        bind.extend(m.extra);
        b.pass(
            sh,
            kind.entry(),
            groups(m.rows, kernels::matmul_rows_per_group(kind)),
            bind,
        );
        return;
    }
    let sh = match (norm, uniform_x) {
        // Only CPU-shaped jobs fuse RoPE here, and they keep the caches as textures.
        (Some(_), Some(n)) if rope.is_some() => b.shader(&format!("{name}_norm_rope_tex"), || {
            kernels::matvec_norm_rope_tex(ty, kind, (n / 16) as u32)
        }),
        (Some(_), Some(n)) => b.shader(&format!("{name}_norm"), || {
            kernels::matvec_norm(ty, kind, (n / 16) as u32)
        }),
        _ => b.shader(&name, || {
            kernels::matvec_x(ty, kind, uniform_x.map(|n| (n / 16) as u32))
        }),
    };
    let mut bind = vec![m.weights, x, whole(2, m.y), p];
    bind.extend(m.extra);
    bind.extend(norm.map(|(w, _)| w));
    if let Some(r) = rope {
        bind.extend([r.kc, r.vc, r.step]);
    }
    b.pass_xy(
        sh,
        kind.entry(),
        [
            groups(m.rows, kernels::matvec_rows_per_group(kind)),
            m.tokens,
        ],
        bind,
    );
}

/// `y += W · x` for one weight slot of block buffer `blk`, for `tokens` vectors.
#[allow(clippy::too_many_arguments)]
fn matvec_add(
    b: &mut Builder,
    blk: u32,
    slot: Slot,
    x: u32,
    y: u32,
    cols: u64,
    rows: u64,
    tokens: u64,
) {
    matvec_pass(
        b,
        MatvecPass {
            kind: Matvec::Add,
            ty: slot.ty,
            weights: ranged(0, blk, slot.range()),
            x,
            y,
            rows,
            cols,
            segs: &[(rows, 0)],
            yoff: 0,
            y_stride: rows,
            tokens,
            n_prompt: 0,
            extra: None,
            rope: None,
            norm: None,
        },
    );
}
