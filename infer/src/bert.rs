//! BERT sentence embeddings from a sentence-transformers directory (all-MiniLM-L6-v2 layout:
//! `config.json`, `model.safetensors`, `tokenizer.json`, mean pooling, L2 normalisation),
//! compiled to a job like the decoder: weights as blobs (one per encoder layer, F32 or F16
//! tensors at 256-byte offsets), hashgrid's own kernels, the embedding as the output.
//!
//! The tokenizer is Hugging Face's `tokenizers` crate over the directory's `tokenizer.json`,
//! so WordPiece, normalisation and special tokens are exactly the model's.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hashgrid_protocol::job::RANGE_ALIGN;
use hashgrid_protocol::{Binding, BufferRange, ContentId};
use serde::Deserialize;

use crate::compile::{Builder, CompiledJob, MatvecPass, matvec_pass, ranged, whole};
use crate::kernels::{Matvec, bert as bk};
use crate::quant::GgmlType;

/// Largest safetensors header: the JSON directory of tensors (a few KiB for BERT; 100 MiB
/// bounds a forged length before anything is allocated).
pub const MAX_HEADER_BYTES: u64 = 100 * 1024 * 1024;

/// Longest input, in tokens, when the model does not say (`sentence_bert_config.json`).
pub const DEFAULT_MAX_TOKENS: usize = 256;

/// A model directory that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BertError {
    /// A file could not be read.
    #[error("{file}: {source}")]
    Io {
        /// The file.
        file: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file is malformed or uses something hashgrid does not implement.
    #[error("{file}: {message}")]
    Invalid {
        /// The file.
        file: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The text cannot be embedded.
    #[error("{0}")]
    Input(String),
}

fn invalid(file: &Path, message: impl Into<String>) -> BertError {
    BertError::Invalid {
        file: file.to_path_buf(),
        message: message.into(),
    }
}

/// One tensor in a safetensors file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SafeTensor {
    /// Element type: `F32` or `F16`.
    pub dtype: String,
    /// Shape, outermost first (PyTorch order).
    pub shape: Vec<u64>,
    /// Absolute byte range in the file.
    pub start: u64,
    /// End of the range (exclusive).
    pub end: u64,
}

/// A safetensors file's directory, checked against the file's length; data is read on demand.
#[derive(Debug, Clone)]
pub struct SafeTensors {
    /// Tensors by name.
    pub tensors: BTreeMap<String, SafeTensor>,
    path: PathBuf,
}

#[derive(Deserialize)]
struct RawEntry {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: [u64; 2],
}

impl SafeTensors {
    /// Reads and checks the header of `path`: length, JSON, every tensor's range inside the
    /// file and its size equal to its shape times its element size.
    pub fn open(path: &Path) -> Result<SafeTensors, BertError> {
        let io = |source| BertError::Io {
            file: path.to_path_buf(),
            source,
        };
        let mut f = std::fs::File::open(path).map_err(io)?;
        let len = f.metadata().map_err(io)?.len();
        let mut n = [0u8; 8];
        f.read_exact(&mut n).map_err(|_| {
            invalid(
                path,
                "not a safetensors file: shorter than its 8-byte header length",
            )
        })?;
        let n = u64::from_le_bytes(n);
        if n > MAX_HEADER_BYTES || n > len.saturating_sub(8) {
            return Err(invalid(
                path,
                format!("header length {n} is larger than the file ({len} bytes) or the limit"),
            ));
        }
        let mut header = vec![0u8; n as usize];
        f.read_exact(&mut header).map_err(io)?;
        let raw: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&header)
            .map_err(|e| invalid(path, format!("header is not valid JSON: {e}")))?;
        let data_start = 8 + n;
        let mut tensors = BTreeMap::new();
        for (name, v) in raw {
            if name == "__metadata__" {
                continue;
            }
            let e: RawEntry = serde_json::from_value(v)
                .map_err(|e| invalid(path, format!("tensor {name:?}: {e}")))?;
            let elem = match e.dtype.as_str() {
                "F32" => 4u64,
                "F16" => 2,
                _ => 0,
            };
            let [a, b] = e.data_offsets;
            let (start, end) = (data_start.saturating_add(a), data_start.saturating_add(b));
            if b < a || end > len {
                return Err(invalid(
                    path,
                    format!("tensor {name:?}: bytes {a}..{b} are not inside the file"),
                ));
            }
            if elem != 0 {
                let count = e
                    .shape
                    .iter()
                    .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                    .and_then(|c| c.checked_mul(elem));
                if count != Some(b - a) {
                    return Err(invalid(
                        path,
                        format!(
                            "tensor {name:?}: shape {:?} of {} does not fill its {} bytes",
                            e.shape,
                            e.dtype,
                            b - a
                        ),
                    ));
                }
            }
            tensors.insert(
                name,
                SafeTensor {
                    dtype: e.dtype,
                    shape: e.shape,
                    start,
                    end,
                },
            );
        }
        Ok(SafeTensors {
            tensors,
            path: path.to_path_buf(),
        })
    }

    /// The bytes of `t`.
    pub fn read(&self, t: &SafeTensor) -> Result<Vec<u8>, BertError> {
        let io = |source| BertError::Io {
            file: self.path.clone(),
            source,
        };
        let mut f = std::fs::File::open(&self.path).map_err(io)?;
        f.seek(SeekFrom::Start(t.start)).map_err(io)?;
        let mut buf = vec![0u8; (t.end - t.start) as usize];
        f.read_exact(&mut buf).map_err(io)?;
        Ok(buf)
    }
}

/// `config.json` of a BERT model.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct BertConfig {
    /// Width.
    pub hidden_size: usize,
    /// Encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Feed-forward width.
    pub intermediate_size: usize,
    /// Longest input (position embeddings).
    pub max_position_embeddings: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Layer norm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f32,
    /// Activation (`gelu` is supported).
    #[serde(default = "default_act")]
    pub hidden_act: String,
}

fn default_eps() -> f32 {
    1e-12
}

fn default_act() -> String {
    "gelu".into()
}

/// An opened sentence-embedding model.
pub struct BertModel {
    /// The shape.
    pub config: BertConfig,
    /// The directory's name, for people.
    pub name: String,
    /// Longest input in tokens.
    pub max_tokens: usize,
    tensors: SafeTensors,
    tokenizer: tokenizers::Tokenizer,
    dir: PathBuf,
}

impl std::fmt::Debug for BertModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BertModel")
            .field("name", &self.name)
            .field("config", &self.config)
            .finish()
    }
}

/// The per-layer tensors, in blob order.
const LAYER_TENSORS: [&str; 16] = [
    "attention.self.query.weight",
    "attention.self.key.weight",
    "attention.self.value.weight",
    "attention.self.query.bias",
    "attention.self.key.bias",
    "attention.self.value.bias",
    "attention.output.dense.weight",
    "attention.output.dense.bias",
    "attention.output.LayerNorm.weight",
    "attention.output.LayerNorm.bias",
    "intermediate.dense.weight",
    "intermediate.dense.bias",
    "output.dense.weight",
    "output.dense.bias",
    "output.LayerNorm.weight",
    "output.LayerNorm.bias",
];

impl BertModel {
    /// Opens a sentence-transformers directory and checks everything before any GPU work.
    pub fn open(dir: &Path) -> Result<BertModel, BertError> {
        let read = |name: &str| {
            let p = dir.join(name);
            std::fs::read(&p).map_err(|source| BertError::Io { file: p, source })
        };
        let cfg_path = dir.join("config.json");
        let config: BertConfig = serde_json::from_slice(&read("config.json")?)
            .map_err(|e| invalid(&cfg_path, format!("not a BERT config: {e}")))?;
        if config.hidden_act != "gelu" {
            return Err(invalid(
                &cfg_path,
                format!(
                    "activation {:?} is not supported (gelu is)",
                    config.hidden_act
                ),
            ));
        }
        let c = &config;
        if c.num_attention_heads == 0
            || !c.hidden_size.is_multiple_of(c.num_attention_heads)
            || !c.hidden_size.is_multiple_of(4)
            || !c.intermediate_size.is_multiple_of(4)
            || c.hidden_size > 1 << 16
            || c.intermediate_size > 1 << 18
            || c.vocab_size > 1 << 22
            || c.num_hidden_layers > 256
        {
            return Err(invalid(
                &cfg_path,
                "shape not supported (widths must be multiples of 4 and of the head count)",
            ));
        }
        let max_tokens = std::fs::read(dir.join("sentence_bert_config.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v.get("max_seq_length").and_then(|m| m.as_u64()))
            .map_or(DEFAULT_MAX_TOKENS, |m| m as usize)
            .min(c.max_position_embeddings);
        if let Ok(b) = std::fs::read(dir.join("1_Pooling/config.json")) {
            let v: serde_json::Value = serde_json::from_slice(&b)
                .map_err(|e| invalid(&dir.join("1_Pooling/config.json"), e.to_string()))?;
            if v.get("pooling_mode_mean_tokens").and_then(|m| m.as_bool()) != Some(true) {
                return Err(invalid(
                    &dir.join("1_Pooling/config.json"),
                    "only mean pooling is supported",
                ));
            }
        }
        let st_path = dir.join("model.safetensors");
        let tensors = SafeTensors::open(&st_path)?;
        let tok_path = dir.join("tokenizer.json");
        let mut tokenizer = tokenizers::Tokenizer::from_file(&tok_path)
            .map_err(|e| invalid(&tok_path, format!("cannot load the tokenizer: {e}")))?;
        // tokenizer.json files often pad and truncate to a fixed length (128 for MiniLM);
        // sentence-transformers embeds the sentence as is, up to max_seq_length.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| invalid(&tok_path, format!("cannot configure the tokenizer: {e}")))?;
        let name = dir
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "bert".into());
        let model = BertModel {
            config,
            name,
            max_tokens,
            tensors,
            tokenizer,
            dir: dir.to_path_buf(),
        };
        for (name, shape) in model.tensor_specs() {
            model.tensor(&name, &shape)?;
        }
        Ok(model)
    }

    /// The model directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn tensor_specs(&self) -> Vec<(String, Vec<u64>)> {
        let c = &self.config;
        let (d, ff) = (c.hidden_size as u64, c.intermediate_size as u64);
        let mut v = vec![
            (
                "embeddings.word_embeddings.weight".into(),
                vec![c.vocab_size as u64, d],
            ),
            (
                "embeddings.position_embeddings.weight".into(),
                vec![c.max_position_embeddings as u64, d],
            ),
            ("embeddings.LayerNorm.weight".into(), vec![d]),
            ("embeddings.LayerNorm.bias".into(), vec![d]),
        ];
        for l in 0..c.num_hidden_layers {
            for t in LAYER_TENSORS {
                let shape = match t {
                    "intermediate.dense.weight" => vec![ff, d],
                    "intermediate.dense.bias" => vec![ff],
                    "output.dense.weight" => vec![d, ff],
                    t if t.ends_with("weight") && !t.contains("LayerNorm") => vec![d, d],
                    _ => vec![d],
                };
                v.push((format!("encoder.layer.{l}.{t}"), shape));
            }
        }
        v
    }

    /// The tensor `name` (with or without a `bert.` prefix), checked for shape and type.
    fn tensor(&self, name: &str, shape: &[u64]) -> Result<&SafeTensor, BertError> {
        let file = &self.tensors.path;
        let t = self
            .tensors
            .tensors
            .get(name)
            .or_else(|| self.tensors.tensors.get(&format!("bert.{name}")))
            .ok_or_else(|| invalid(file, format!("tensor {name:?} is missing")))?;
        if t.shape != shape {
            return Err(invalid(
                file,
                format!(
                    "tensor {name:?} has shape {:?}, expected {shape:?}",
                    t.shape
                ),
            ));
        }
        if t.dtype != "F32" && !(t.dtype == "F16" && shape.len() == 2) {
            return Err(invalid(
                file,
                format!(
                    "tensor {name:?} is {}; F32 (or F16 matrices) is supported",
                    t.dtype
                ),
            ));
        }
        Ok(t)
    }

    fn bytes(&self, name: &str, shape: &[u64]) -> Result<(Vec<u8>, GgmlType), BertError> {
        let t = self.tensor(name, shape)?;
        let ty = if t.dtype == "F16" {
            GgmlType::F16
        } else {
            GgmlType::F32
        };
        Ok((self.tensors.read(t)?, ty))
    }

    /// Token ids of `text` with the model's special tokens, truncated to the longest input.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, BertError> {
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| BertError::Input(format!("tokenizing: {e}")))?;
        let mut ids = enc.get_ids().to_vec();
        if ids.len() > self.max_tokens {
            // Keep the closing [SEP] as sentence-transformers' truncation does.
            let last = ids.last().copied();
            ids.truncate(self.max_tokens);
            if let (Some(l), Some(end)) = (last, ids.last_mut()) {
                *end = l;
            }
        }
        Ok(ids)
    }
}

/// Where a tensor sits in a layer blob.
#[derive(Debug, Clone, Copy)]
struct Slot {
    offset: u64,
    size: u64,
    ty: GgmlType,
}

impl Slot {
    fn range(self) -> BufferRange {
        BufferRange {
            offset: self.offset,
            size: self.size.next_multiple_of(4),
        }
    }
}

/// A BERT model's weights as job blobs.
#[derive(Debug, Clone)]
pub struct BertWeights {
    blobs: Vec<(String, ContentId, Arc<Vec<u8>>)>,
    /// Per layer: the slots of `LAYER_TENSORS`, with q/k/v packed so one range spans them.
    layers: Vec<Vec<Slot>>,
}

impl BertWeights {
    /// The weight blobs: a name for people, the content id, the bytes (what jobs name as
    /// inputs, and what a provider preloads).
    pub fn blobs(&self) -> impl Iterator<Item = (&str, &ContentId, &[u8])> {
        self.blobs
            .iter()
            .map(|(n, id, b)| (n.as_str(), id, b.as_slice()))
    }

    /// The blobs as the market names the model (see [`ModelWeights::manifest`]).
    ///
    /// [`ModelWeights::manifest`]: crate::compile::ModelWeights::manifest
    pub fn manifest(&self) -> hashgrid_protocol::ModelManifest {
        hashgrid_protocol::ModelManifest::new(
            self.blobs.iter().map(|(_, id, b)| (*id, b.len() as u64)),
        )
    }

    /// Reads every tensor.
    pub fn load(m: &BertModel) -> Result<BertWeights, BertError> {
        let c = &m.config;
        let d = c.hidden_size as u64;
        let mut blobs = Vec::new();
        let mut push = |name: &str, mut bytes: Vec<u8>| {
            bytes.resize(bytes.len().next_multiple_of(4), 0);
            blobs.push((name.to_string(), ContentId::of(&bytes), Arc::new(bytes)));
        };
        let (word, word_ty) = m.bytes(
            "embeddings.word_embeddings.weight",
            &[c.vocab_size as u64, d],
        )?;
        if word_ty != GgmlType::F32 {
            return Err(invalid(
                &m.tensors.path,
                "F16 word embeddings are not supported",
            ));
        }
        push("word_embeddings", word);
        let (pos, _) = m.bytes(
            "embeddings.position_embeddings.weight",
            &[c.max_position_embeddings as u64, d],
        )?;
        push("position_embeddings", pos);
        // token type 0, then the embedding layer norm: one small blob.
        let ttype = m
            .tensors
            .tensors
            .get("embeddings.token_type_embeddings.weight")
            .or_else(|| {
                m.tensors
                    .tensors
                    .get("bert.embeddings.token_type_embeddings.weight")
            });
        let mut head = match ttype {
            Some(t) if t.dtype == "F32" && t.shape.len() == 2 && t.shape[1] == d => {
                let b = m.tensors.read(t)?;
                b[..(d * 4) as usize].to_vec()
            }
            _ => vec![0u8; (d * 4) as usize],
        };
        head.extend(m.bytes("embeddings.LayerNorm.weight", &[d])?.0);
        head.extend(m.bytes("embeddings.LayerNorm.bias", &[d])?.0);
        push("embeddings_head", head);
        let mut layers = Vec::new();
        for l in 0..c.num_hidden_layers {
            let mut bytes = Vec::new();
            let mut slots = Vec::new();
            for (i, t) in LAYER_TENSORS.iter().enumerate() {
                let spec = m
                    .tensor_specs()
                    .into_iter()
                    .find(|(n, _)| *n == format!("encoder.layer.{l}.{t}"))
                    .map(|(_, s)| s)
                    .unwrap_or_default();
                let (data, ty) = m.bytes(&format!("encoder.layer.{l}.{t}"), &spec)?;
                // q, k, v weights back to back (one range for the fused matvec) and their
                // biases back to back; everything else 256-aligned.
                let packed = matches!(i, 1 | 2 | 4 | 5);
                let offset = if packed {
                    bytes.len() as u64
                } else {
                    (bytes.len() as u64).next_multiple_of(RANGE_ALIGN)
                };
                bytes.resize(offset as usize, 0);
                bytes.extend_from_slice(&data);
                slots.push(Slot {
                    offset,
                    size: data.len() as u64,
                    ty,
                });
            }
            bytes.resize(
                (bytes.len() as u64).next_multiple_of(RANGE_ALIGN) as usize,
                0,
            );
            push(&format!("layer.{l}"), bytes);
            layers.push(slots);
        }
        Ok(BertWeights { blobs, layers })
    }

    fn blob(&self, name: &str) -> Option<&(String, ContentId, Arc<Vec<u8>>)> {
        self.blobs.iter().find(|b| b.0 == name)
    }
}

/// The output buffer of an embedding job: `hidden_size` f32, L2-normalised.
pub const EMBEDDING: &str = "embedding";

/// How far two providers' embeddings of the same text may differ, element by element, and
/// agree under verification: far above what another adapter's f32 rounding changes in a unit
/// vector, far below what changes its cosine similarities.
pub const EMBEDDING_TOLERANCE: hashgrid_protocol::Tolerance = hashgrid_protocol::Tolerance {
    rtol: 1e-3,
    atol: 1e-5,
};

/// Compiles the embedding of `ids` (from [`BertModel::encode`]) into a job.
pub fn compile_embed(
    m: &BertModel,
    w: &BertWeights,
    ids: &[u32],
) -> Result<CompiledJob, BertError> {
    let c = &m.config;
    if ids.is_empty() || ids.len() > m.max_tokens {
        return Err(BertError::Input(format!(
            "{} tokens; an input is 1 to {} tokens",
            ids.len(),
            m.max_tokens
        )));
    }
    if let Some(t) = ids.iter().find(|&&t| t as usize >= c.vocab_size) {
        return Err(BertError::Input(format!(
            "token {t} is outside the vocabulary"
        )));
    }
    let n = ids.len() as u64;
    let (d, ff) = (c.hidden_size as u64, c.intermediate_size as u64);
    let nh = c.num_attention_heads as u64;
    let hd = d / nh;
    let mut b = Builder::new();
    let out = b.zeroed(EMBEDDING, d * 4, true);
    let x = b.zeroed("x", n * d * 4, false);
    let tmp = b.zeroed("tmp", n * d * 4, false);
    let zero = b.zeroed("zero", n * d * 4, false);
    let qkv = b.zeroed("qkv", n * 3 * d * 4, false);
    let hbuf = b.zeroed("ffn", n * ff * 4, false);
    let scores = b.zeroed("scores", nh * n * n * 4, false);
    let id_bytes: Vec<u8> = ids.iter().flat_map(|t| t.to_le_bytes()).collect();
    let ids_buf = b.blob("ids", id_bytes, false);
    let weight = |b: &mut Builder, name: &str| -> Result<u32, BertError> {
        let blob = w
            .blob(name)
            .ok_or_else(|| BertError::Input(format!("weights have no blob {name}")))?;
        Ok(b.shared(name, blob.1, &blob.2, false))
    };
    let word = weight(&mut b, "word_embeddings")?;
    let pos = weight(&mut b, "position_embeddings")?;
    let head = weight(&mut b, "embeddings_head")?;
    let eps = c.layer_norm_eps.to_bits();

    // Embeddings: word + position + token type 0, then layer norm (no residual). The head blob
    // is [token_type0 | ln.weight | ln.bias], d floats each; the layer norm's weight and bias go
    // in as their own small buffers (d·4 bytes need not be 256-aligned).
    let sh = b.shader("bert_embed", bk::embed);
    let p = b.param(5, &[d as u32, n as u32, c.vocab_size as u32]);
    b.pass_xy(
        sh,
        "bert_embed",
        [d.div_ceil(u64::from(bk::THREADS)), n],
        vec![
            whole(0, word),
            whole(1, pos),
            whole(2, head),
            whole(3, ids_buf),
            whole(4, x),
            p,
        ],
    );
    let hb = w
        .blob("embeddings_head")
        .ok_or_else(|| BertError::Input("weights have no embeddings_head".into()))?;
    let ln_w = b.blob(
        "embeddings.ln.weight",
        hb.2[(d * 4) as usize..(2 * d * 4) as usize].to_vec(),
        false,
    );
    let ln_b = b.blob(
        "embeddings.ln.bias",
        hb.2[(2 * d * 4) as usize..(3 * d * 4) as usize].to_vec(),
        false,
    );
    let ln_sh = b.shader("layernorm", bk::layernorm);
    let layernorm = |b: &mut Builder, residual: u32, g: Binding, bias: Binding| {
        let p = b.param(4, &[d as u32, eps]);
        b.pass_xy(
            ln_sh,
            "layernorm",
            [n, 1],
            vec![whole(0, x), whole(1, residual), g, bias, p],
        );
    };
    layernorm(&mut b, zero, whole(2, ln_w), whole(3, ln_b));

    let att_sh = b.shader("bert_attention", bk::attention);
    let gelu_sh = b.shader("gelu", bk::gelu);
    let scale = 1.0 / (hd as f32).sqrt();
    for (l, s) in w.layers.iter().enumerate() {
        let lb = weight(&mut b, &format!("layer.{l}"))?;
        // y[t] = W x[t] + bias over `rows` outputs from the tensor at slot `i` (bias at i + 1).
        let dense = |b: &mut Builder, i: usize, cols: u64, rows: u64, input: u32, output: u32| {
            matvec_pass(
                b,
                MatvecPass {
                    kind: Matvec::Bias,
                    ty: s[i].ty,
                    weights: ranged(0, lb, s[i].range()),
                    x: input,
                    y: output,
                    rows,
                    cols,
                    segs: &[(rows, 0)],
                    yoff: 0,
                    y_stride: rows,
                    tokens: n,
                    n_prompt: 0,
                    extra: Some(ranged(4, lb, s[i + 1].range())),
                    rope: None,
                    norm: None,
                },
            );
        };
        // q, k, v: one matvec over the packed q/k/v weights (biases packed alike) → qkv[t].
        let span = BufferRange {
            offset: s[0].offset,
            size: (s[2].offset + s[2].size - s[0].offset).next_multiple_of(4),
        };
        let bspan = BufferRange {
            offset: s[3].offset,
            size: (s[5].offset + s[5].size - s[3].offset).next_multiple_of(4),
        };
        matvec_pass(
            &mut b,
            MatvecPass {
                kind: Matvec::Bias,
                ty: s[0].ty,
                weights: ranged(0, lb, span),
                x,
                y: qkv,
                rows: 3 * d,
                cols: d,
                segs: &[
                    (d, 0),
                    (d, s[1].offset - s[0].offset),
                    (d, s[2].offset - s[0].offset),
                ],
                yoff: 0,
                y_stride: 3 * d,
                tokens: n,
                n_prompt: 0,
                extra: Some(ranged(4, lb, bspan)),
                rope: None,
                norm: None,
            },
        );
        let p = b.param(3, &[nh as u32, hd as u32, n as u32, scale.to_bits()]);
        b.pass_xy(
            att_sh,
            "bert_attention",
            [nh, n],
            vec![whole(0, qkv), whole(1, tmp), whole(2, scores), p],
        );
        // Attention output: dense + bias, then x = LN(x + ·).
        dense(&mut b, 6, d, d, tmp, hbuf);
        layernorm(
            &mut b,
            hbuf,
            ranged(2, lb, s[8].range()),
            ranged(3, lb, s[9].range()),
        );
        // Feed-forward: GELU(W1 x + b1) → W2 · + b2, then x = LN(x + ·).
        dense(&mut b, 10, d, ff, x, hbuf);
        let p = b.param(1, &[(n * ff) as u32]);
        b.pass(
            gelu_sh,
            "gelu",
            (n * ff).div_ceil(u64::from(bk::THREADS)),
            vec![whole(0, hbuf), p],
        );
        dense(&mut b, 12, ff, d, hbuf, tmp);
        layernorm(
            &mut b,
            tmp,
            ranged(2, lb, s[14].range()),
            ranged(3, lb, s[15].range()),
        );
    }
    let sh = b.shader("mean_pool", bk::mean_pool);
    let p = b.param(2, &[d as u32, n as u32]);
    b.pass(sh, "mean_pool", 1, vec![whole(0, x), whole(1, out), p]);
    let (spec, inputs) = b.finish(format!("embed {}", m.name), Vec::new());
    Ok(CompiledJob {
        spec,
        inputs,
        n_prompt: ids.len(),
        max_total: ids.len(),
        model: w.manifest(),
        compare: hashgrid_protocol::Verification {
            tolerances: [(EMBEDDING.to_string(), EMBEDDING_TOLERANCE)].into(),
            ..Default::default()
        },
    })
}
