//! A language model ready to serve requests: the checked file, its tokenizer, its weights read
//! once, and its end-of-generation tokens. What `hashgrid generate`, `hashgrid chat` and the
//! OpenAI gateway share: prompts (plain or through the chat template) in, compiled jobs out,
//! generated tokens back to text.

use std::path::Path;

use crate::compile::{CompileError, CompiledJob, GenerateRequest, ModelWeights, Sampling, Target};
use crate::kernels::MAX_EOG;
use crate::model::{LlamaModel, ModelError};
use crate::template::{ChatMessage, TemplateError, render_chat};
use crate::tokenizer::Tokenizer;

/// Why a text model cannot serve a request.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TextError {
    /// The model file is unusable.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A chat was asked of a model without `tokenizer.chat_template`.
    #[error("{0} has no chat template (tokenizer.chat_template)")]
    NoTemplate(String),
    /// The chat template failed to render these messages.
    #[error("chat template: {0}")]
    Template(#[from] TemplateError),
    /// The prompt and the tokens wanted do not fit the model's context.
    #[error("the prompt is {prompt} tokens; the model's context is {context}")]
    Context {
        /// Prompt tokens.
        prompt: usize,
        /// The model's context length.
        context: usize,
    },
    /// The request does not compile (empty prompt, bad sampling values).
    #[error(transparent)]
    Compile(#[from] CompileError),
}

/// A GGUF language model, opened, checked and read.
pub struct TextModel {
    /// The model file's metadata and shapes.
    pub model: LlamaModel,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    /// Its weights, as the jobs' input blobs.
    pub weights: ModelWeights,
    /// Tokens that end a generation.
    pub eog: Vec<u32>,
}

impl TextModel {
    /// Opens and checks `path`, builds its tokenizer and reads its weights.
    pub fn open(path: &Path) -> Result<TextModel, TextError> {
        let model = LlamaModel::open(path)?;
        let tokenizer = model.tokenizer()?;
        let weights = ModelWeights::load(&model)?;
        let eog: Vec<u32> = (0..tokenizer.vocab_size() as u32)
            .filter(|&t| tokenizer.is_eog(t))
            .take(MAX_EOG)
            .collect();
        Ok(TextModel {
            model,
            tokenizer,
            weights,
            eog,
        })
    }

    /// The model's context length in tokens.
    pub fn context(&self) -> usize {
        self.model.config.ctx_len
    }

    /// Prompt tokens for plain text (with the model's BOS when it wants one; special-token
    /// text in `text` stays text).
    pub fn prompt(&self, text: &str) -> Vec<u32> {
        self.tokenizer.encode(text, true, false)
    }

    /// Prompt tokens for a conversation rendered through the model's chat template, ready for
    /// the assistant's reply (special tokens the template writes are parsed as such).
    pub fn chat_prompt(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, TextError> {
        let template = self
            .model
            .chat_template()?
            .ok_or_else(|| TextError::NoTemplate(self.model.path().display().to_string()))?;
        let piece = |t: Option<u32>| {
            t.and_then(|id| self.tokenizer.token_text(id))
                .unwrap_or("")
                .to_string()
        };
        let rendered = render_chat(
            template,
            messages,
            true,
            &piece(self.tokenizer.bos()),
            &piece(self.tokenizer.eos()),
        )?;
        Ok(self.tokenizer.encode(&rendered, false, true))
    }

    /// Compiles a generation of at most `max_tokens` new tokens (fewer when the context ends
    /// first; at least one), its kernels shaped for `target` (the adapter's kind where it is
    /// known: [`Target::for_device`]). A prompt that leaves no room is [`TextError::Context`].
    pub fn compile(
        &self,
        prompt: Vec<u32>,
        max_tokens: u32,
        sampling: Sampling,
        target: Target,
    ) -> Result<CompiledJob, TextError> {
        let context = self.context();
        if prompt.len() >= context {
            return Err(TextError::Context {
                prompt: prompt.len(),
                context,
            });
        }
        let room = u32::try_from(context - prompt.len()).unwrap_or(u32::MAX);
        Ok(crate::compile::compile_generate(
            &self.model,
            &self.weights,
            &GenerateRequest {
                prompt,
                max_new_tokens: max_tokens.min(room).max(1),
                sampling,
                eog: self.eog.clone(),
                check_every: target.check_every(),
                target,
            },
        )?)
    }

    /// The generated tokens a person sees: end-of-generation tokens dropped.
    pub fn visible(&self, tokens: &[u32]) -> Vec<u32> {
        tokens
            .iter()
            .copied()
            .filter(|t| !self.eog.contains(t))
            .collect()
    }

    /// Whether a generation ended on an end-of-generation token (else it ran out of tokens).
    pub fn stopped(&self, tokens: &[u32]) -> bool {
        tokens.last().is_some_and(|t| self.eog.contains(t))
    }
}
