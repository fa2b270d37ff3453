//! CPU reference forward pass for llama-family models, computed in f32 the way
//! llama.cpp (`llm_build_llama` / `llm_build_qwen2` + the ggml CPU ops) does it.
//!
//! This is the ground truth the GPU kernels are tested against, so it favours
//! clarity and fidelity over speed. Two optimisations, neither of which changes a bit
//! of the results: the matrix-vector product is written so that the compiler can
//! vectorise it, and weight matrices whose 32-value blocks are exactly `d*q + m` or
//! `d*q` (dequantized Q4_1 / Q8_0 / Q4_0 / Q5_0) are stored as (d, m, q), verified bit
//! for bit at load time, which cuts the memory traffic per token 5-6x (see `Matrix`).
//!
//! Numerics follow ggml's CPU ops: f32 everywhere, the sums of `rms_norm` and `softmax`
//! in f64 (`ggml_float`), RoPE angles built by repeated multiplication with
//! `theta_scale = base^(-2/rope_dim)`. llama.cpp's CPU backend additionally quantizes
//! activations to Q8_1/Q8_0 inside quantized matmuls and keeps an f16 KV cache; this
//! reference does not, so it is the exact model (on SmolLM2-135M it agrees with a float64
//! numpy implementation to 2e-5 in the logits) while llama.cpp's CPU backend differs from
//! it by ~0.1-1.4, and its Vulkan backend, in f32, by under 0.01 in the top logits.
//!
//! Conventions (ggml order, as stored in GGUF):
//! * `token_embd.weight` has dims `[d_model, vocab]`: token `t`'s embedding is the
//!   contiguous slice `[t*d_model, (t+1)*d_model)`.
//! * A projection with dims `[n_in, n_out]` stores output `j`'s row contiguously:
//!   `y[j] = Σ_i W[j*n_in + i] · x[i]`.

use std::collections::HashMap;

pub use crate::model::{LlamaConfig, RopeStyle};

/// Errors of the reference model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RefError {
    /// The configuration is inconsistent (e.g. `n_heads` not a multiple of `n_kv_heads`).
    #[error("invalid model configuration: {0}")]
    Config(String),
    /// A tensor the configuration requires is not provided by the weights.
    #[error("missing tensor `{0}`")]
    MissingTensor(String),
    /// A tensor has the wrong number of elements.
    #[error("tensor `{name}` has {got} elements, expected {expected}")]
    TensorSize {
        /// The tensor.
        name: String,
        /// Elements the configuration needs.
        expected: usize,
        /// Elements the weights have.
        got: usize,
    },
    /// The weight source failed for another reason (I/O, format, ...).
    #[error("cannot load tensor `{name}`: {reason}")]
    Weights {
        /// The tensor.
        name: String,
        /// Why.
        reason: String,
    },
    /// A token id is outside the vocabulary.
    #[error("token id {token} is out of range (vocab size {vocab})")]
    TokenOutOfRange {
        /// The token.
        token: u32,
        /// Vocabulary size.
        vocab: usize,
    },
    /// A position is beyond the context length.
    #[error("position {pos} is out of range (context length {ctx_len})")]
    PositionOutOfRange {
        /// The position.
        pos: usize,
        /// Context length.
        ctx_len: usize,
    },
    /// A position would leave a hole in the KV cache (positions must be written in order).
    #[error("position {pos} skips ahead of the KV cache, which holds {cached} positions")]
    PositionGap {
        /// The position.
        pos: usize,
        /// Positions cached.
        cached: usize,
    },
    /// `generate_greedy` was called with an empty prompt.
    #[error("the prompt is empty")]
    EmptyPrompt,
}

impl LlamaConfig {
    fn validate(&self) -> Result<(), RefError> {
        let bad = |m: String| Err(RefError::Config(m));
        if self.n_layers == 0
            || self.d_model == 0
            || self.n_heads == 0
            || self.n_kv_heads == 0
            || self.head_dim == 0
            || self.d_ff == 0
            || self.vocab == 0
            || self.ctx_len == 0
        {
            return bad(format!("all sizes must be non-zero: {self:?}"));
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return bad(format!(
                "n_heads ({}) is not a multiple of n_kv_heads ({})",
                self.n_heads, self.n_kv_heads
            ));
        }
        if self.rope_dim > self.head_dim || !self.rope_dim.is_multiple_of(2) {
            return bad(format!(
                "rope_dim ({}) must be even and at most head_dim ({})",
                self.rope_dim, self.head_dim
            ));
        }
        if !(self.rope_base.is_finite() && self.rope_base > 0.0) {
            return bad(format!("rope_base ({}) must be positive", self.rope_base));
        }
        if !(self.rms_eps.is_finite() && self.rms_eps >= 0.0) {
            return bad(format!("rms_eps ({}) must be non-negative", self.rms_eps));
        }
        if u32::try_from(self.vocab).is_err() {
            return bad(format!(
                "vocab ({}) does not fit token ids (u32)",
                self.vocab
            ));
        }
        Ok(())
    }

    fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}

/// A source of dequantized tensors, in ggml order.
pub trait Weights {
    /// Returns the tensor called `name` as f32 values. A tensor that does not exist
    /// should be reported as [`RefError::MissingTensor`].
    fn tensor(&self, name: &str) -> Result<Vec<f32>, RefError>;
}

impl Weights for HashMap<String, Vec<f32>> {
    fn tensor(&self, name: &str) -> Result<Vec<f32>, RefError> {
        self.get(name)
            .cloned()
            .ok_or_else(|| RefError::MissingTensor(name.to_owned()))
    }
}

struct Layer {
    attn_norm: Vec<f32>,
    wq: Matrix,
    wk: Matrix,
    wv: Matrix,
    wo: Matrix,
    bias: Option<QkvBias>,
    ffn_norm: Vec<f32>,
    gate: Matrix,
    up: Matrix,
    down: Matrix,
}

struct QkvBias {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
}

/// Per-layer KV cache: position `p`'s keys are `k[p*kv_dim..(p+1)*kv_dim]`.
#[derive(Default, Clone)]
struct LayerCache {
    k: Vec<f32>,
    v: Vec<f32>,
}

/// Scratch buffers reused across tokens.
struct Scratch {
    x: Vec<f32>,
    h: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att_out: Vec<f32>,
    scores: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
}

/// A llama-family model with dequantized f32 weights (stored losslessly packed where
/// possible) and a KV cache.
pub struct CpuModel {
    cfg: LlamaConfig,
    token_embd: Matrix,
    /// `None` when the embeddings are tied (then `token_embd` is the output matrix).
    output: Option<Matrix>,
    output_norm: Vec<f32>,
    layers: Vec<Layer>,
    cache: Vec<LayerCache>,
    /// Number of positions currently held in the KV cache.
    cached: usize,
    scratch: Scratch,
}

/// Loads a matrix with rows of `n_in` values and packs it losslessly.
fn load_matrix(w: &dyn Weights, name: &str, n_in: usize, n_out: usize) -> Result<Matrix, RefError> {
    Ok(Matrix::pack(load(w, name, n_in * n_out)?, n_in))
}

fn load(w: &dyn Weights, name: &str, expected: usize) -> Result<Vec<f32>, RefError> {
    let t = w.tensor(name)?;
    if t.len() != expected {
        return Err(RefError::TensorSize {
            name: name.to_owned(),
            expected,
            got: t.len(),
        });
    }
    Ok(t)
}

impl CpuModel {
    /// Loads (and size-checks) every tensor the configuration requires.
    pub fn new(cfg: LlamaConfig, w: &dyn Weights) -> Result<Self, RefError> {
        cfg.validate()?;
        let (d, qd, kvd, ff) = (cfg.d_model, cfg.q_dim(), cfg.kv_dim(), cfg.d_ff);
        let token_embd = load_matrix(w, "token_embd.weight", d, cfg.vocab)?;
        let output = if cfg.tied_embeddings {
            None
        } else {
            Some(load_matrix(w, "output.weight", d, cfg.vocab)?)
        };
        let output_norm = load(w, "output_norm.weight", d)?;
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let n = |s: &str| format!("blk.{i}.{s}");
            let bias = if cfg.qkv_bias {
                Some(QkvBias {
                    q: load(w, &n("attn_q.bias"), qd)?,
                    k: load(w, &n("attn_k.bias"), kvd)?,
                    v: load(w, &n("attn_v.bias"), kvd)?,
                })
            } else {
                None
            };
            layers.push(Layer {
                attn_norm: load(w, &n("attn_norm.weight"), d)?,
                wq: load_matrix(w, &n("attn_q.weight"), d, qd)?,
                wk: load_matrix(w, &n("attn_k.weight"), d, kvd)?,
                wv: load_matrix(w, &n("attn_v.weight"), d, kvd)?,
                wo: load_matrix(w, &n("attn_output.weight"), qd, d)?,
                bias,
                ffn_norm: load(w, &n("ffn_norm.weight"), d)?,
                gate: load_matrix(w, &n("ffn_gate.weight"), d, ff)?,
                up: load_matrix(w, &n("ffn_up.weight"), d, ff)?,
                down: load_matrix(w, &n("ffn_down.weight"), ff, d)?,
            });
        }
        let scratch = Scratch {
            x: vec![0.0; d],
            h: vec![0.0; d],
            q: vec![0.0; qd],
            k: vec![0.0; kvd],
            v: vec![0.0; kvd],
            att_out: vec![0.0; qd],
            scores: Vec::new(),
            gate: vec![0.0; ff],
            up: vec![0.0; ff],
        };
        Ok(Self {
            cache: vec![LayerCache::default(); cfg.n_layers],
            cfg,
            token_embd,
            output,
            output_norm,
            layers,
            cached: 0,
            scratch,
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// Number of positions currently held in the KV cache.
    pub fn cached_positions(&self) -> usize {
        self.cached
    }

    /// Empties the KV cache.
    pub fn reset(&mut self) {
        for c in &mut self.cache {
            c.k.clear();
            c.v.clear();
        }
        self.cached = 0;
    }

    /// Runs one token at position `pos` and returns the logits for the next token.
    ///
    /// Writes the KV cache at `pos` and attends over positions `0..=pos`. `pos` may be
    /// at most the number of cached positions; positions after `pos` are discarded
    /// (so re-running from an earlier position is allowed, skipping ahead is not).
    pub fn forward(&mut self, token: u32, pos: usize) -> Result<Vec<f32>, RefError> {
        let cfg = &self.cfg;
        if pos >= cfg.ctx_len {
            return Err(RefError::PositionOutOfRange {
                pos,
                ctx_len: cfg.ctx_len,
            });
        }
        if pos > self.cached {
            return Err(RefError::PositionGap {
                pos,
                cached: self.cached,
            });
        }
        let row = usize::try_from(token)
            .ok()
            .filter(|&t| t < cfg.vocab)
            .ok_or(RefError::TokenOutOfRange {
                token,
                vocab: cfg.vocab,
            })?;

        let (kvd, hd) = (cfg.kv_dim(), cfg.head_dim);
        let group = cfg.n_heads / cfg.n_kv_heads;
        let kq_scale = 1.0 / (hd as f32).sqrt();
        let s = &mut self.scratch;
        self.token_embd.row(row, &mut s.x);

        for (layer, cache) in self.layers.iter().zip(self.cache.iter_mut()) {
            // --- attention ---
            rms_norm(&s.x, &layer.attn_norm, cfg.rms_eps, &mut s.h);
            layer.wq.matvec(&s.h, &mut s.q);
            layer.wk.matvec(&s.h, &mut s.k);
            layer.wv.matvec(&s.h, &mut s.v);
            if let Some(b) = &layer.bias {
                add_assign(&mut s.q, &b.q);
                add_assign(&mut s.k, &b.k);
                add_assign(&mut s.v, &b.v);
            }
            rope(
                &mut s.q,
                hd,
                pos,
                cfg.rope_dim,
                cfg.rope_base,
                cfg.rope_style,
            );
            rope(
                &mut s.k,
                hd,
                pos,
                cfg.rope_dim,
                cfg.rope_base,
                cfg.rope_style,
            );

            cache.k.truncate(pos * kvd);
            cache.v.truncate(pos * kvd);
            cache.k.extend_from_slice(&s.k);
            cache.v.extend_from_slice(&s.v);

            let n_ctx = pos + 1;
            s.scores.resize(n_ctx, 0.0);
            for (h, (q, out)) in
                s.q.chunks_exact(hd)
                    .zip(s.att_out.chunks_exact_mut(hd))
                    .enumerate()
            {
                let off = (h / group) * hd;
                for (score, k) in s.scores.iter_mut().zip(cache.k.chunks_exact(kvd)) {
                    *score = dot(q, &k[off..off + hd]) * kq_scale;
                }
                softmax(&mut s.scores);
                out.fill(0.0);
                for (&p, v) in s.scores.iter().zip(cache.v.chunks_exact(kvd)) {
                    axpy(p, &v[off..off + hd], out);
                }
            }
            layer.wo.matvec(&s.att_out, &mut s.h);
            add_assign(&mut s.x, &s.h);

            // --- feed-forward (SwiGLU) ---
            rms_norm(&s.x, &layer.ffn_norm, cfg.rms_eps, &mut s.h);
            layer.gate.matvec(&s.h, &mut s.gate);
            layer.up.matvec(&s.h, &mut s.up);
            for (g, &u) in s.gate.iter_mut().zip(&s.up) {
                *g = silu(*g) * u;
            }
            layer.down.matvec(&s.gate, &mut s.h);
            add_assign(&mut s.x, &s.h);
        }
        self.cached = pos + 1;

        rms_norm(&s.x, &self.output_norm, cfg.rms_eps, &mut s.h);
        let out_w = self.output.as_ref().unwrap_or(&self.token_embd);
        let mut logits = vec![0.0; cfg.vocab];
        out_w.matvec(&s.h, &mut logits);
        Ok(logits)
    }

    /// Resets the cache, runs `prompt` from position 0 and then generates up to `n`
    /// tokens greedily (argmax, lowest id on ties). Generation stops after the first
    /// token for which `stop` returns true; that token is included in the result.
    pub fn generate_greedy(
        &mut self,
        prompt: &[u32],
        n: usize,
        stop: impl Fn(u32) -> bool,
    ) -> Result<Vec<u32>, RefError> {
        if prompt.is_empty() {
            return Err(RefError::EmptyPrompt);
        }
        self.reset();
        let mut logits = Vec::new();
        for (pos, &t) in prompt.iter().enumerate() {
            logits = self.forward(t, pos)?;
        }
        let mut out = Vec::with_capacity(n);
        let mut pos = prompt.len();
        while out.len() < n {
            let t = argmax(&logits);
            out.push(t);
            if stop(t) || out.len() == n {
                break;
            }
            logits = self.forward(t, pos)?;
            pos += 1;
        }
        Ok(out)
    }
}

/// Index of the largest value (the first one on ties; NaNs are never chosen).
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &x) in v.iter().enumerate() {
        if x > best_v {
            best = i;
            best_v = x;
        }
    }
    // The vocabulary size is checked to fit in u32 when the model is built.
    u32::try_from(best).unwrap_or(u32::MAX)
}

const LANES: usize = 16;

/// Dot product with `LANES` independent f32 accumulators (vectorisable; keep the tail
/// out of `acc`, which would otherwise stop LLVM from keeping it in registers).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0.0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `y[j] = Σ_i w[j*x.len() + i] · x[i]` for every `j` in `0..y.len()`.
pub fn matvec(w: &[f32], x: &[f32], y: &mut [f32]) {
    debug_assert_eq!(w.len(), x.len() * y.len());
    if x.is_empty() {
        y.fill(0.0);
        return;
    }
    for (yj, row) in y.iter_mut().zip(w.chunks_exact(x.len())) {
        *yj = dot(row, x);
    }
}

fn add_assign(y: &mut [f32], x: &[f32]) {
    for (a, &b) in y.iter_mut().zip(x) {
        *a += b;
    }
}

fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (yi, &xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

/// ggml `rms_norm` followed by the multiplication with `weight`:
/// `out = x / sqrt(mean(x²) + eps) · weight` (the sum of squares is accumulated in
/// f64, like ggml's `ggml_float`).
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let sum: f64 = x.iter().map(|&v| f64::from(v * v)).sum();
    let mean = (sum / x.len().max(1) as f64) as f32;
    let scale = 1.0 / (mean + eps).sqrt();
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = (v * scale) * w;
    }
}

/// ggml `silu`: `x / (1 + e^-x)`.
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// In-place softmax (max-subtracted; the sum is accumulated in f64 like ggml).
pub fn softmax(v: &mut [f32]) {
    let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f64;
    for x in v.iter_mut() {
        *x = (*x - max).exp();
        sum += f64::from(*x);
    }
    let inv = (1.0 / sum) as f32;
    for x in v.iter_mut() {
        *x *= inv;
    }
}

/// Applies RoPE at integer position `pos` to every head of `x` (heads of `head_dim`
/// values, back to back). Only the first `rope_dim` dimensions of each head rotate;
/// the rest pass through. Pair `i` rotates by `pos · base^(-2i/rope_dim)`; like ggml,
/// the angle is built by repeated multiplication with `theta_scale` in f32.
/// A `rope_dim` larger than `head_dim` is clamped to `head_dim`.
pub fn rope(
    x: &mut [f32],
    head_dim: usize,
    pos: usize,
    rope_dim: usize,
    base: f32,
    style: RopeStyle,
) {
    let rope_dim = rope_dim.min(head_dim);
    let half = rope_dim / 2;
    if half == 0 || head_dim == 0 {
        return;
    }
    let theta_scale = base.powf(-2.0 / rope_dim as f32);
    let mut cos_sin = Vec::with_capacity(half);
    let mut theta = pos as f32;
    for _ in 0..half {
        cos_sin.push((theta.cos(), theta.sin()));
        theta *= theta_scale;
    }
    for head in x.chunks_exact_mut(head_dim) {
        for (i, &(c, s)) in cos_sin.iter().enumerate() {
            let (a, b) = match style {
                RopeStyle::Norm => (2 * i, 2 * i + 1),
                RopeStyle::Neox => (i, i + half),
            };
            let (x0, x1) = (head[a], head[b]);
            head[a] = x0 * c - x1 * s;
            head[b] = x0 * s + x1 * c;
        }
    }
}

// ---------------------------------------------------------------------------------
// Lossless packed storage of dequantized weights.
//
// Dequantized GGUF weights have a lot of structure: every 32-value block of a Q4_1
// tensor is exactly `d*q + m` (q in 0..=15) and every block of a Q8_0 tensor exactly
// `d*q` (q an i8), both evaluated in f32. Storing (d, m, q) instead of the f32 values
// cuts the memory traffic of a matrix-vector product (the bottleneck: 540 MB of f32 per
// token for a 135M model) 5-6x. A matrix is packed only if *every* block reproduces its
// f32 values bit for bit, otherwise it stays f32; and the packed products accumulate in
// exactly the lanes and order of the f32 `dot`, so the results are bit-identical to the
// plain f32 path (Rust never fuses `a*b + c` into an FMA on its own).
// ---------------------------------------------------------------------------------

/// Block size of the packed formats (the GGUF block size of Q4_x / Q5_x / Q8_0).
const BLOCK: usize = 32;

/// A block of 32 values `d * q + m` with `q` in `0..=15`: value `l` (`l < 16`) is the
/// low nibble of `q[l]`, value `l + 16` its high nibble.
#[derive(Clone, Copy)]
struct Affine4 {
    d: f32,
    m: f32,
    q: [u8; 16],
}

/// A block of 32 values `d * q` with `q` an i8.
#[derive(Clone, Copy)]
struct Scaled8 {
    d: f32,
    q: [i8; BLOCK],
}

/// A row-major matrix (`n_in` values per row), stored losslessly.
enum Matrix {
    F32 { n_in: usize, w: Vec<f32> },
    Affine4 { n_in: usize, blocks: Vec<Affine4> },
    Scaled8 { n_in: usize, blocks: Vec<Scaled8> },
}

/// `c` moved by `k` units in the last place (within the same sign).
fn nudge(c: f32, k: i32) -> f32 {
    f32::from_bits(c.to_bits().wrapping_add_signed(k))
}

fn block_of(v: &[f32]) -> Option<&[f32; BLOCK]> {
    v.try_into().ok()
}

fn pack_affine4(v: &[f32; BLOCK]) -> Option<Affine4> {
    if v.iter().any(|x| !x.is_finite()) {
        return None;
    }
    // The q = 0 value is exactly m and d >= 0 (Q4_1 maps the block's min to q = 0 and
    // its max to q = 15; other qmax values cover blocks whose max quantizes lower).
    let m = v.iter().copied().fold(f32::INFINITY, f32::min);
    let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let try_d = |d: f32| -> Option<Affine4> {
        let mut q = [0u8; 16];
        for (l, &x) in v.iter().enumerate() {
            let qf = if d > 0.0 { ((x - m) / d).round() } else { 0.0 };
            if !(0.0..=15.0).contains(&qf) {
                return None;
            }
            // Verify with the integer actually stored (a float q could be -0.0).
            let qi = qf as u8;
            if (d * f32::from(qi) + m).to_bits() != x.to_bits() {
                return None;
            }
            q[l % 16] |= if l < 16 { qi } else { qi << 4 };
        }
        Some(Affine4 { d, m, q })
    };
    (1..=15u8).rev().find_map(|qmax| {
        let c = (max - m) / f32::from(qmax);
        [0, 1, -1, 2, -2, 3, -3]
            .into_iter()
            .find_map(|k| try_d(nudge(c, k)))
    })
}

fn pack_scaled8(v: &[f32; BLOCK]) -> Option<Scaled8> {
    if v.iter().any(|x| !x.is_finite()) {
        return None;
    }
    let amax = v.iter().fold(0.0f32, |a, x| a.max(x.abs()));
    let try_d = |d: f32| -> Option<Scaled8> {
        let mut q = [0i8; BLOCK];
        for (qi, &x) in q.iter_mut().zip(v) {
            let qf = if d != 0.0 { (x / d).round() } else { 0.0 };
            if !(-128.0..=127.0).contains(&qf) {
                return None;
            }
            // Verify with the integer actually stored (a float q could be -0.0).
            *qi = qf as i8;
            if (d * f32::from(*qi)).to_bits() != x.to_bits() {
                return None;
            }
        }
        Some(Scaled8 { d, q })
    };
    // Largest |q|: 127 for Q8_0, 8 for Q4_0 (d*(q-8)), 16 for Q5_0. d may be negative
    // (Q4_0), which matters for the sign of zeros.
    [127.0f32, 8.0, 16.0].into_iter().find_map(|qmax| {
        let c = amax / qmax;
        [0, 1, -1, 2, -2, 3, -3]
            .into_iter()
            .flat_map(|k| [nudge(c, k), -nudge(c, k)])
            .find_map(try_d)
    })
}

impl Matrix {
    /// Packs `w` (rows of `n_in` values) if every block allows it, else keeps f32.
    fn pack(w: Vec<f32>, n_in: usize) -> Matrix {
        if n_in > 0 && n_in.is_multiple_of(BLOCK) && !w.is_empty() {
            let blocks: Option<Vec<Affine4>> = w
                .chunks_exact(BLOCK)
                .map(|b| block_of(b).and_then(pack_affine4))
                .collect();
            if let Some(blocks) = blocks {
                return Matrix::Affine4 { n_in, blocks };
            }
            let blocks: Option<Vec<Scaled8>> = w
                .chunks_exact(BLOCK)
                .map(|b| block_of(b).and_then(pack_scaled8))
                .collect();
            if let Some(blocks) = blocks {
                return Matrix::Scaled8 { n_in, blocks };
            }
        }
        Matrix::F32 { n_in, w }
    }

    /// Which storage was chosen (for tests and diagnostics).
    fn kind(&self) -> &'static str {
        match self {
            Matrix::F32 { .. } => "f32",
            Matrix::Affine4 { .. } => "affine4",
            Matrix::Scaled8 { .. } => "scaled8",
        }
    }

    /// Writes row `r` (as f32) into `out` (of length `n_in`); an out-of-range row
    /// leaves `out` untouched.
    fn row(&self, r: usize, out: &mut [f32]) {
        match self {
            Matrix::F32 { n_in, w } => {
                if let Some(src) = w.chunks_exact(*n_in).nth(r) {
                    out.copy_from_slice(src);
                }
            }
            Matrix::Affine4 { n_in, blocks } => {
                if let Some(bs) = blocks.chunks_exact(n_in / BLOCK).nth(r) {
                    for (b, o) in bs.iter().zip(out.chunks_exact_mut(BLOCK)) {
                        let (lo, hi) = o.split_at_mut(16);
                        for l in 0..16 {
                            lo[l] = b.d * f32::from(b.q[l] & 15) + b.m;
                            hi[l] = b.d * f32::from(b.q[l] >> 4) + b.m;
                        }
                    }
                }
            }
            Matrix::Scaled8 { n_in, blocks } => {
                if let Some(bs) = blocks.chunks_exact(n_in / BLOCK).nth(r) {
                    for (b, o) in bs.iter().zip(out.chunks_exact_mut(BLOCK)) {
                        for (o, &q) in o.iter_mut().zip(&b.q) {
                            *o = b.d * f32::from(q);
                        }
                    }
                }
            }
        }
    }

    /// `y = W·x`, bit-identical to [`matvec`] on the unpacked f32 values.
    fn matvec(&self, x: &[f32], y: &mut [f32]) {
        match self {
            Matrix::F32 { w, .. } => matvec(w, x, y),
            Matrix::Affine4 { n_in, blocks } => {
                for (yj, row) in y.iter_mut().zip(blocks.chunks_exact(n_in / BLOCK)) {
                    let mut acc = [0.0f32; LANES];
                    for (b, xs) in row.iter().zip(x.chunks_exact(BLOCK)) {
                        let (x0, x1) = xs.split_at(16);
                        for l in 0..16 {
                            acc[l] += (b.d * f32::from(b.q[l] & 15) + b.m) * x0[l];
                        }
                        for l in 0..16 {
                            acc[l] += (b.d * f32::from(b.q[l] >> 4) + b.m) * x1[l];
                        }
                    }
                    *yj = acc.iter().sum::<f32>() + 0.0;
                }
            }
            Matrix::Scaled8 { n_in, blocks } => {
                for (yj, row) in y.iter_mut().zip(blocks.chunks_exact(n_in / BLOCK)) {
                    let mut acc = [0.0f32; LANES];
                    for (b, xs) in row.iter().zip(x.chunks_exact(BLOCK)) {
                        let (q0, q1) = b.q.split_at(16);
                        let (x0, x1) = xs.split_at(16);
                        for l in 0..16 {
                            acc[l] += (b.d * f32::from(q0[l])) * x0[l];
                        }
                        for l in 0..16 {
                            acc[l] += (b.d * f32::from(q1[l])) * x1[l];
                        }
                    }
                    *yj = acc.iter().sum::<f32>() + 0.0;
                }
            }
        }
    }
}

impl CpuModel {
    /// How each weight matrix is stored (`"f32"`, `"affine4"` or `"scaled8"`), by GGUF
    /// name; all storages give bit-identical results.
    pub fn storage(&self) -> Vec<(String, &'static str)> {
        let mut out = vec![("token_embd.weight".to_owned(), self.token_embd.kind())];
        if let Some(o) = &self.output {
            out.push(("output.weight".to_owned(), o.kind()));
        }
        for (i, l) in self.layers.iter().enumerate() {
            for (n, m) in [
                ("attn_q", &l.wq),
                ("attn_k", &l.wk),
                ("attn_v", &l.wv),
                ("attn_output", &l.wo),
                ("ffn_gate", &l.gate),
                ("ffn_up", &l.up),
                ("ffn_down", &l.down),
            ] {
                out.push((format!("blk.{i}.{n}.weight"), m.kind()));
            }
        }
        out
    }
}

/// The weights of an opened GGUF model, dequantised tensor by tensor.
impl Weights for crate::model::LlamaModel {
    fn tensor(&self, name: &str) -> Result<Vec<f32>, RefError> {
        let t = self
            .gguf
            .tensor(name)
            .ok_or_else(|| RefError::MissingTensor(name.to_string()))?;
        let bytes = self.gguf.read_tensor(t).map_err(|e| RefError::Weights {
            name: name.to_string(),
            reason: e.to_string(),
        })?;
        let mut out = vec![0f32; t.n_elements as usize];
        crate::quant::dequantize(t.ty, &bytes, &mut out).map_err(|e| RefError::Weights {
            name: name.to_string(),
            reason: e.to_string(),
        })?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift in [-1, 1).
    fn rng(seed: &mut u64) -> f32 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        (*seed >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    /// f32 → nearest f16 value (as f32), normal range only: what GGUF scales hold.
    fn f16ish(x: f32) -> f32 {
        f32::from_bits((x.to_bits() + 0x1000) & !0x1fff)
    }

    fn q4_1_like(rows: usize, n_in: usize, seed: &mut u64) -> Vec<f32> {
        let mut w = Vec::new();
        for _ in 0..rows * n_in / BLOCK {
            let d = f16ish(0.01 + 0.05 * rng(seed).abs());
            let m = f16ish(-0.4 * rng(seed).abs());
            // Like quantize_row_q4_1: the min has q = 0, the max (usually) q = 15.
            let top = if rng(seed) > -0.8 { 15.0 } else { 13.0 };
            for i in 0..BLOCK {
                let q = match i {
                    3 => 0.0,
                    17 => top,
                    _ => ((rng(seed) + 1.0) * 0.5 * top).round(),
                };
                w.push(d * q + m);
            }
        }
        w
    }

    fn q8_0_like(rows: usize, n_in: usize, seed: &mut u64, q_range: f32) -> Vec<f32> {
        let mut w = Vec::new();
        for _ in 0..rows * n_in / BLOCK {
            let d = f16ish(0.001 + 0.01 * rng(seed));
            // Like quantize_row_q8_0: the largest magnitude has |q| = q_range.
            for i in 0..BLOCK {
                let q = if i == 5 {
                    -q_range
                } else {
                    (rng(seed) * q_range).round() + 0.0 // an integer q is never -0.0
                };
                w.push(d * q);
            }
        }
        w
    }

    fn check_bit_identical(w: Vec<f32>, n_in: usize, kind: &str) {
        let mut seed = 99;
        let rows = w.len() / n_in;
        let x: Vec<f32> = (0..n_in).map(|_| rng(&mut seed) * 3.0).collect();
        let mut want = vec![0.0; rows];
        matvec(&w, &x, &mut want);
        let m = Matrix::pack(w.clone(), n_in);
        assert_eq!(m.kind(), kind);
        let mut got = vec![0.0; rows];
        m.matvec(&x, &mut got);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got), bits(&want));
        let mut row = vec![0.0; n_in];
        for r in 0..rows {
            m.row(r, &mut row);
            assert_eq!(bits(&row), bits(&w[r * n_in..(r + 1) * n_in]));
        }
    }

    #[test]
    fn packed_matrices_are_bit_identical() {
        let mut seed = 7;
        check_bit_identical(q4_1_like(24, 96, &mut seed), 96, "affine4");
        check_bit_identical(q8_0_like(24, 96, &mut seed, 127.0), 96, "scaled8");
        check_bit_identical(q8_0_like(24, 96, &mut seed, 8.0), 96, "scaled8");
        // Unstructured values, or rows that are not whole blocks, stay f32.
        let w: Vec<f32> = (0..24 * 96).map(|_| rng(&mut seed)).collect();
        check_bit_identical(w, 96, "f32");
        check_bit_identical(q4_1_like(24, 96, &mut seed), 48, "f32");
        // One foreign value anywhere keeps the whole matrix f32.
        let mut w = q4_1_like(24, 96, &mut seed);
        w[777] += 1e-3;
        check_bit_identical(w, 96, "f32");
        // Constant and all-zero blocks.
        let mut w = q4_1_like(4, 64, &mut seed);
        w[..32].fill(0.25);
        check_bit_identical(w, 64, "affine4");
        check_bit_identical(vec![0.0; 128], 64, "affine4");
    }
}
