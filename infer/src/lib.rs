//! hashgrid-infer: language models as hashgrid jobs.
//!
//! A model request compiles, on the buyer's side, to an ordinary [`JobSpec`]: the weights are
//! content-addressed input blobs (the GGUF tensors' own bytes, one blob per transformer block),
//! the passes are hashgrid's own WGSL kernels ([`kernels`]), and decoding is a loop inside the
//! job whose token buffer streams back as it grows. Providers stay a generic WGSL executor; a
//! receipt binds the exact weights, kernels, prompt and output, so anyone can re-run a request
//! and compare.
//!
//! This crate is pure: model files in, jobs and blobs out, plus the GGUF reader, the quant
//! formats, tokenizers, chat templates and a CPU reference of the decoder for tests. It knows
//! nothing of networks or GPUs.
//!
//! ```no_run
//! use hashgrid_infer::{
//!     GenerateRequest, LlamaModel, ModelWeights, Sampling, Target, compile_generate,
//! };
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let model = LlamaModel::open(std::path::Path::new("SmolLM2-135M-Instruct.Q4_1.gguf"))?;
//! let weights = ModelWeights::load(&model)?;
//! let job = compile_generate(&model, &weights, &GenerateRequest {
//!     prompt: vec![504, 3575, 282, 4649, 314],
//!     max_new_tokens: 16,
//!     sampling: Sampling::default(),
//!     eog: vec![2],
//!     check_every: 1,
//!     target: Target::Cpu,
//! })?;
//! // job.spec and job.inputs run on any hashgrid executor.
//! # Ok(()) }
//! ```
//!
//! [`JobSpec`]: hashgrid_protocol::JobSpec

pub mod bert;
pub mod chat;
pub mod compile;
pub mod gguf;
pub mod kernels;
pub mod model;
pub mod quant;
pub mod reference;
pub mod template;
pub mod tokenizer;

pub use chat::{TextError, TextModel};
pub use compile::{
    CompileError, CompiledJob, GenerateRequest, Generation, Inputs, ModelWeights, Sampling, Target,
    compile_generate, read_generation,
};
pub use model::{LlamaConfig, LlamaModel, ModelError, RopeStyle};
