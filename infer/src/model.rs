//! Llama-family decoder models from GGUF: the hyper-parameters from the file's metadata and
//! the tensors by their GGUF names, checked before any GPU or market work.
//!
//! Supported architectures (`general.architecture`): `llama` (Llama 1–3 without rope scaling,
//! Mistral, SmolLM2, TinyLlama: rotary pairs of adjacent dimensions) and `qwen2` (Qwen2 / 2.5:
//! q/k/v biases, rotary pairs of the two halves, "NeoX" style).

use std::path::{Path, PathBuf};

use crate::gguf::{Gguf, GgufError, TensorInfo};
use crate::quant::GgmlType;

/// How RoPE pairs up a head's dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Dimensions `2i` and `2i + 1` (llama.cpp's `LLAMA_ROPE_TYPE_NORM`: Llama, Mistral).
    Norm,
    /// Dimensions `i` and `i + rope_dim / 2` (`LLAMA_ROPE_TYPE_NEOX`: Qwen2).
    Neox,
}

/// A decoder's shape and constants.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// Transformer blocks.
    pub n_layers: usize,
    /// Width of the residual stream.
    pub d_model: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `n_heads`).
    pub n_kv_heads: usize,
    /// Dimensions per head.
    pub head_dim: usize,
    /// Width of the feed-forward layer.
    pub d_ff: usize,
    /// Vocabulary size (rows of the embedding).
    pub vocab: usize,
    /// Longest context the model was trained for.
    pub ctx_len: usize,
    /// RoPE frequency base.
    pub rope_base: f32,
    /// Dimensions of each head that RoPE rotates.
    pub rope_dim: usize,
    /// RoPE pairing.
    pub rope_style: RopeStyle,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// Whether q, k and v have biases (Qwen2).
    pub qkv_bias: bool,
    /// Whether the output projection is the token embedding (no `output.weight`).
    pub tied_embeddings: bool,
}

/// A model file that cannot be used, found before any GPU or market work.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// The file is not a readable GGUF file.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// The architecture is not one hashgrid compiles.
    #[error("{file}: architecture {arch:?} is not supported (supported: llama, mistral, qwen2)")]
    Architecture {
        /// The model file.
        file: PathBuf,
        /// `general.architecture`.
        arch: String,
    },
    /// The metadata is inconsistent or uses a feature hashgrid does not implement.
    #[error("{file}: {message}")]
    Unsupported {
        /// The model file.
        file: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A tensor the architecture needs is missing or has the wrong shape or type.
    #[error("{file}: tensor {tensor:?}: {message}")]
    Tensor {
        /// The model file.
        file: PathBuf,
        /// The tensor's GGUF name.
        tensor: String,
        /// What is wrong.
        message: String,
    },
}

/// Largest shape value accepted from metadata: bounds every buffer size computed from them
/// (2^24 is far above any published model's widths and vocabularies).
const MAX_DIM: u64 = 1 << 24;

/// An opened decoder model: its config and tensor directory. Tensor data stays in the file
/// until a job is compiled.
#[derive(Debug)]
pub struct LlamaModel {
    /// The shape.
    pub config: LlamaConfig,
    /// `general.architecture`.
    pub arch: String,
    /// `general.name`, or the file name.
    pub name: String,
    /// The parsed file header.
    pub gguf: Gguf,
    path: PathBuf,
}

impl LlamaModel {
    /// Opens `path` and checks that everything a job needs is there, with the right shapes
    /// and supported types.
    pub fn open(path: &Path) -> Result<LlamaModel, ModelError> {
        let gguf = Gguf::open(path)?;
        Self::from_gguf(gguf, path)
    }

    /// Checks an already parsed file.
    pub fn from_gguf(gguf: Gguf, path: &Path) -> Result<LlamaModel, ModelError> {
        let file = path.to_path_buf();
        let arch = gguf.get_str("general.architecture")?.to_string();
        let rope_style = match arch.as_str() {
            "llama" | "mistral" => RopeStyle::Norm,
            "qwen2" => RopeStyle::Neox,
            _ => return Err(ModelError::Architecture { file, arch }),
        };
        let unsupported = |message: String| ModelError::Unsupported {
            file: path.to_path_buf(),
            message,
        };
        let key = |k: &str| format!("{arch}.{k}");
        let dim = |k: &str| -> Result<usize, ModelError> {
            let v = u64::from(gguf.get_u32(&key(k))?);
            if v == 0 || v > MAX_DIM {
                return Err(unsupported(format!("{} = {v} is out of range", key(k))));
            }
            Ok(v as usize)
        };
        let opt_dim = |k: &str| -> Result<Option<usize>, ModelError> {
            match gguf.opt_u32(&key(k))? {
                None => Ok(None),
                Some(v) if v == 0 || u64::from(v) > MAX_DIM => {
                    Err(unsupported(format!("{} = {v} is out of range", key(k))))
                }
                Some(v) => Ok(Some(v as usize)),
            }
        };
        let n_layers = dim("block_count")?;
        let d_model = dim("embedding_length")?;
        let d_ff = dim("feed_forward_length")?;
        let n_heads = dim("attention.head_count")?;
        let n_kv_heads = opt_dim("attention.head_count_kv")?.unwrap_or(n_heads);
        let ctx_len = dim("context_length")?;
        if d_model % n_heads != 0 && opt_dim("attention.key_length")?.is_none() {
            return Err(unsupported(format!(
                "embedding_length {d_model} is not a multiple of head_count {n_heads}"
            )));
        }
        let head_dim = opt_dim("attention.key_length")?.unwrap_or(d_model / n_heads);
        if let Some(v) = opt_dim("attention.value_length")?
            && v != head_dim
        {
            return Err(unsupported(format!(
                "value_length {v} differs from key_length {head_dim}"
            )));
        }
        let rope_dim = opt_dim("rope.dimension_count")?.unwrap_or(head_dim);
        if n_heads % n_kv_heads != 0 {
            return Err(unsupported(format!(
                "head_count {n_heads} is not a multiple of head_count_kv {n_kv_heads}"
            )));
        }
        if head_dim % 4 != 0 || rope_dim > head_dim || rope_dim % 2 != 0 {
            return Err(unsupported(format!(
                "head dimension {head_dim} with rope dimension {rope_dim} is not supported (head dimension a multiple of 4, rope dimension even and at most the head dimension)"
            )));
        }
        if let Some(kind) = gguf.opt_str(&key("rope.scaling.type"))?
            && kind != "none"
        {
            return Err(unsupported(format!(
                "rope scaling {kind:?} is not supported yet"
            )));
        }
        if gguf.tensor("rope_freqs.weight").is_some() {
            return Err(unsupported(
                "per-dimension rope frequency factors (rope_freqs.weight, Llama 3.1 style) are not supported yet".into(),
            ));
        }
        let rope_base = gguf.opt_f32(&key("rope.freq_base"))?.unwrap_or(10_000.0);
        let rms_eps = gguf.get_f32(&key("attention.layer_norm_rms_epsilon"))?;
        if !(rope_base.is_finite() && rope_base > 1.0 && rms_eps.is_finite() && rms_eps >= 0.0) {
            return Err(unsupported(format!(
                "rope base {rope_base} or rms epsilon {rms_eps} is out of range"
            )));
        }
        let embd = gguf
            .tensor("token_embd.weight")
            .ok_or_else(|| ModelError::Tensor {
                file: path.to_path_buf(),
                tensor: "token_embd.weight".into(),
                message: "missing".into(),
            })?;
        let vocab = embd.dims.get(1).copied().unwrap_or(0);
        if vocab == 0 || vocab > MAX_DIM {
            return Err(ModelError::Tensor {
                file: path.to_path_buf(),
                tensor: "token_embd.weight".into(),
                message: format!("vocabulary {vocab} is out of range"),
            });
        }
        let config = LlamaConfig {
            n_layers,
            d_model,
            n_heads,
            n_kv_heads,
            head_dim,
            d_ff,
            vocab: vocab as usize,
            ctx_len,
            rope_base,
            rope_dim,
            rope_style,
            rms_eps,
            qkv_bias: gguf.tensor("blk.0.attn_q.bias").is_some(),
            tied_embeddings: gguf.tensor("output.weight").is_none(),
        };
        let name = gguf
            .opt_str("general.name")?
            .map(str::to_string)
            .unwrap_or_else(|| {
                path.file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "model".into())
            });
        let model = LlamaModel {
            config,
            arch,
            name,
            gguf,
            path: file,
        };
        for spec in model.tensor_specs() {
            model.check(&spec)?;
        }
        Ok(model)
    }

    /// The model file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every tensor the model needs, with its expected shape (GGUF order: row length first).
    pub fn tensor_specs(&self) -> Vec<TensorSpec> {
        let c = &self.config;
        let (d, hd, ff) = (c.d_model as u64, c.head_dim as u64, c.d_ff as u64);
        let q = c.n_heads as u64 * hd;
        let kv = c.n_kv_heads as u64 * hd;
        let mut v = vec![
            TensorSpec::matrix("token_embd.weight", d, c.vocab as u64),
            TensorSpec::vector("output_norm.weight", d),
        ];
        if !c.tied_embeddings {
            v.push(TensorSpec::matrix("output.weight", d, c.vocab as u64));
        }
        for l in 0..c.n_layers {
            let n = |s: &str| format!("blk.{l}.{s}");
            v.push(TensorSpec::vector(&n("attn_norm.weight"), d));
            v.push(TensorSpec::matrix(&n("attn_q.weight"), d, q));
            v.push(TensorSpec::matrix(&n("attn_k.weight"), d, kv));
            v.push(TensorSpec::matrix(&n("attn_v.weight"), d, kv));
            if c.qkv_bias {
                v.push(TensorSpec::vector(&n("attn_q.bias"), q));
                v.push(TensorSpec::vector(&n("attn_k.bias"), kv));
                v.push(TensorSpec::vector(&n("attn_v.bias"), kv));
            }
            v.push(TensorSpec::matrix(&n("attn_output.weight"), q, d));
            v.push(TensorSpec::vector(&n("ffn_norm.weight"), d));
            v.push(TensorSpec::matrix(&n("ffn_gate.weight"), d, ff));
            v.push(TensorSpec::matrix(&n("ffn_up.weight"), d, ff));
            v.push(TensorSpec::matrix(&n("ffn_down.weight"), ff, d));
        }
        v
    }

    /// The tensor called `name`, checked against its spec.
    pub fn tensor(&self, name: &str) -> Result<&TensorInfo, ModelError> {
        self.gguf.tensor(name).ok_or_else(|| ModelError::Tensor {
            file: self.path.clone(),
            tensor: name.into(),
            message: "missing".into(),
        })
    }

    fn check(&self, spec: &TensorSpec) -> Result<(), ModelError> {
        let t = self.tensor(&spec.name)?;
        let err = |message: String| ModelError::Tensor {
            file: self.path.clone(),
            tensor: spec.name.clone(),
            message,
        };
        let dims: Vec<u64> = t.dims.clone();
        let want: Vec<u64> = spec.dims.to_vec();
        let trimmed: Vec<u64> = {
            let mut d = dims.clone();
            while d.len() > want.len() && d.last() == Some(&1) {
                d.pop();
            }
            d
        };
        if trimmed != want {
            return Err(err(format!(
                "shape {dims:?}, expected {want:?} for this model's metadata"
            )));
        }
        if spec.dims.len() == 1 && t.ty != GgmlType::F32 {
            return Err(err(format!(
                "type {}: norms and biases must be F32",
                t.ty.name()
            )));
        }
        if spec.dims.len() == 2 {
            let be = crate::kernels::quant::kernel_block_elems(t.ty);
            if !spec.dims[0].is_multiple_of(be) {
                return Err(err(format!(
                    "rows of {} elements are not a whole number of {} blocks ({be} elements)",
                    spec.dims[0],
                    t.ty.name()
                )));
            }
        }
        Ok(())
    }
}

/// A tensor a model needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// GGUF name.
    pub name: String,
    /// Expected dimensions, row length first.
    pub dims: Vec<u64>,
}

impl TensorSpec {
    fn matrix(name: &str, cols: u64, rows: u64) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            dims: vec![cols, rows],
        }
    }

    fn vector(name: &str, n: u64) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            dims: vec![n],
        }
    }
}

impl LlamaModel {
    /// The file's tokenizer fields, with llama.cpp's defaults where a key is absent.
    pub fn vocab_spec(&self) -> Result<crate::tokenizer::VocabSpec, ModelError> {
        use crate::tokenizer::{VocabKind, VocabSpec};
        let gguf = &self.gguf;
        let model = gguf.get_str("tokenizer.ggml.model")?;
        let kind = match model {
            "gpt2" => VocabKind::Bpe,
            "llama" => VocabKind::Spm,
            other => {
                return Err(ModelError::Unsupported {
                    file: self.path.clone(),
                    message: format!(
                        "tokenizer.ggml.model {other:?} is not supported (supported: gpt2, llama)"
                    ),
                });
            }
        };
        let pre = gguf
            .opt_str("tokenizer.ggml.pre")?
            .unwrap_or("default")
            .to_string();
        let id = |k: &str| gguf.opt_u32(k);
        // llama.cpp: SentencePiece vocabularies add BOS and a space prefix unless told
        // otherwise; byte-level BPE adds neither (Llama 3 style files say so explicitly).
        let spm = kind == VocabKind::Spm;
        Ok(VocabSpec {
            kind,
            pre,
            tokens: gguf
                .get_str_array("tokenizer.ggml.tokens")?
                .into_iter()
                .map(str::to_string)
                .collect(),
            token_types: gguf
                .opt_i32_array("tokenizer.ggml.token_type")?
                .unwrap_or_default(),
            scores: gguf
                .opt_f32_array("tokenizer.ggml.scores")?
                .unwrap_or_default(),
            merges: gguf
                .opt_str_array("tokenizer.ggml.merges")?
                .unwrap_or_default()
                .into_iter()
                .map(str::to_string)
                .collect(),
            bos: id("tokenizer.ggml.bos_token_id")?,
            eos: id("tokenizer.ggml.eos_token_id")?,
            eot: id("tokenizer.ggml.eot_token_id")?,
            unk: id("tokenizer.ggml.unknown_token_id")?,
            pad: id("tokenizer.ggml.padding_token_id")?,
            add_bos: gguf
                .opt_bool("tokenizer.ggml.add_bos_token")?
                .unwrap_or(spm),
            add_eos: gguf
                .opt_bool("tokenizer.ggml.add_eos_token")?
                .unwrap_or(false),
            add_space_prefix: gguf
                .opt_bool("tokenizer.ggml.add_space_prefix")?
                .unwrap_or(spm),
        })
    }

    /// The model's tokenizer.
    pub fn tokenizer(&self) -> Result<crate::tokenizer::Tokenizer, ModelError> {
        let mut t = crate::tokenizer::Tokenizer::new(self.vocab_spec()?).map_err(|e| {
            ModelError::Unsupported {
                file: self.path.clone(),
                message: format!("tokenizer: {e}"),
            }
        })?;
        t.apply_model_name_quirks(&self.name);
        Ok(t)
    }

    /// `tokenizer.chat_template`, when the file has one.
    pub fn chat_template(&self) -> Result<Option<&str>, ModelError> {
        Ok(self.gguf.opt_str("tokenizer.chat_template")?)
    }
}
