//! The tokenizer: text to token ids and back, matching llama.cpp's
//! `llama_tokenize` / `llama_token_to_piece` / `llama_detokenize` for
//! byte-level BPE (`tokenizer.ggml.model = "gpt2"`) and SentencePiece
//! (`"llama"`) vocabularies.
//!
//! Encoding first cuts the text at special tokens (llama.cpp's "partition by
//! special tokens"): every control, user-defined and unknown-type token, the
//! longest first, is searched in every not-yet-matched stretch of text; each
//! occurrence becomes that token. Without `parse_special` only user-defined
//! tokens are matched. The stretches in between go through the BPE
//! pre-tokenizer and merges, or through the SPM merge.
//!
//! Like llama.cpp, the tokenizer also looks at token texts: tokens such as
//! `<|im_end|>`, `<|endoftext|>`, `<|eot_id|>` or `<end_of_turn>` end
//! generation and are treated as control tokens even when the file marks
//! them normal; fill-in-the-middle tokens (`<fim_prefix>` and the like) are
//! treated as control tokens too.

mod bpe;
mod pretok;
mod spm;
mod unicode;
mod unicode_tables;

use std::collections::HashMap;

use self::bpe::{BpeScratch, MergeMap};
use self::pretok::PreConfig;
use self::spm::SpmVocab;

/// Most tokens a vocabulary may have.
pub const MAX_TOKENS: usize = 1 << 22;
/// Longest token text, in bytes.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// Most merges a BPE vocabulary may have.
pub const MAX_MERGES: usize = 1 << 22;

/// The tokenizer family, from `tokenizer.ggml.model`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VocabKind {
    /// Byte-level BPE (`tokenizer.ggml.model = "gpt2"`).
    Bpe,
    /// SentencePiece BPE with byte fallback (`tokenizer.ggml.model = "llama"`).
    Spm,
}

/// The tokenizer fields of a GGUF file, as read by the GGUF parser.
///
/// Defaults that llama.cpp fills in when a key is absent (for example
/// `add_bos = true` for SPM and Llama-3 BPE vocabularies) are the parser's
/// business: the values here are taken as final.
#[derive(Clone, Debug)]
pub struct VocabSpec {
    /// Tokenizer family.
    pub kind: VocabKind,
    /// Pre-tokenizer name, `tokenizer.ggml.pre` (BPE only), e.g. `"smollm"`.
    pub pre: String,
    /// Token texts, `tokenizer.ggml.tokens`; the index is the token id.
    pub tokens: Vec<String>,
    /// Token types, `tokenizer.ggml.token_type` (1 normal, 2 unknown,
    /// 3 control, 4 user-defined, 5 unused, 6 byte); empty means all normal.
    pub token_types: Vec<i32>,
    /// Token scores, `tokenizer.ggml.scores` (SPM); empty means all zero.
    pub scores: Vec<f32>,
    /// Merges `"left right"` in rank order, `tokenizer.ggml.merges` (BPE only).
    pub merges: Vec<String>,
    /// Beginning-of-sequence token.
    pub bos: Option<u32>,
    /// End-of-sequence token.
    pub eos: Option<u32>,
    /// End-of-turn token.
    pub eot: Option<u32>,
    /// Unknown token.
    pub unk: Option<u32>,
    /// Padding token.
    pub pad: Option<u32>,
    /// Prepend BOS when encoding with `add_special`.
    pub add_bos: bool,
    /// Append EOS when encoding with `add_special`.
    pub add_eos: bool,
    /// SPM: prefix text that starts the input or follows a special token with
    /// a space.
    pub add_space_prefix: bool,
}

/// Why a vocabulary was rejected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenizerError {
    /// The token list is empty.
    #[error("the vocabulary has no tokens")]
    EmptyVocab,
    /// Too many tokens.
    #[error("the vocabulary has {count} tokens, more than the supported {max}")]
    TooManyTokens {
        /// Tokens in the spec.
        count: usize,
        /// [`MAX_TOKENS`].
        max: usize,
    },
    /// A token text is too long.
    #[error("token {id} is {len} bytes long, more than the supported {max}")]
    TokenTooLong {
        /// The token id.
        id: usize,
        /// Its length in bytes.
        len: usize,
        /// [`MAX_TOKEN_BYTES`].
        max: usize,
    },
    /// A per-token list does not have one entry per token.
    #[error("{field} has {got} entries but the vocabulary has {expected} tokens")]
    LengthMismatch {
        /// `"token_types"` or `"scores"`.
        field: &'static str,
        /// Entries in the list.
        got: usize,
        /// Tokens in the vocabulary.
        expected: usize,
    },
    /// Two tokens have the same text.
    #[error("token text {text:?} appears twice, as ids {first} and {second}")]
    DuplicateToken {
        /// The repeated text.
        text: String,
        /// Its first id.
        first: usize,
        /// Its second id.
        second: usize,
    },
    /// A score is NaN.
    #[error("the score of token {id} is NaN")]
    NanScore {
        /// The token id.
        id: usize,
    },
    /// A special token id is not a token.
    #[error("the {name} token id {id} is out of range: the vocabulary has {count} tokens")]
    SpecialOutOfRange {
        /// `"bos"`, `"eos"`, `"eot"`, `"unk"` or `"pad"`.
        name: &'static str,
        /// The id.
        id: u32,
        /// Tokens in the vocabulary.
        count: usize,
    },
    /// `add_bos` / `add_eos` is set but that token is not.
    #[error("{flag} is true but the {name} token id is not set")]
    MissingSpecial {
        /// `"add_bos"` or `"add_eos"`.
        flag: &'static str,
        /// `"bos"` or `"eos"`.
        name: &'static str,
    },
    /// Too many merges.
    #[error("the vocabulary has {count} merges, more than the supported {max}")]
    TooManyMerges {
        /// Merges in the spec.
        count: usize,
        /// [`MAX_MERGES`].
        max: usize,
    },
    /// A merge is not two tokens separated by a space.
    #[error("merge {index} ({merge:?}) is not two token texts separated by a space")]
    MalformedMerge {
        /// Its rank.
        index: usize,
        /// The merge text.
        merge: String,
    },
    /// A merge names, or produces, a text that is not a token.
    #[error("merge {index} ({merge:?}) refers to {text:?}, which is not a token")]
    MergeNotInVocab {
        /// Its rank.
        index: usize,
        /// The merge text.
        merge: String,
        /// The missing token text.
        text: String,
    },
    /// A BPE vocabulary without merges.
    #[error("the BPE vocabulary has no merges")]
    NoMerges,
    /// The pre-tokenizer is not implemented.
    #[error(
        "unsupported pre-tokenizer {0:?} (supported: default, gpt-2, smollm, starcoder, llama3/llama-bpe, qwen2 and their aliases)"
    )]
    UnsupportedPreTokenizer(String),
    /// A token id passed to a method is out of range.
    #[error("token id {id} is out of range: the vocabulary has {count} tokens")]
    TokenOutOfRange {
        /// The id.
        id: u32,
        /// Tokens in the vocabulary.
        count: usize,
    },
}

/// llama.cpp's token attributes (`llama_token_attr`).
mod attr {
    pub(super) const UNDEFINED: u16 = 0;
    pub(super) const UNKNOWN: u16 = 1 << 0;
    pub(super) const UNUSED: u16 = 1 << 1;
    pub(super) const NORMAL: u16 = 1 << 2;
    pub(super) const CONTROL: u16 = 1 << 3;
    pub(super) const USER_DEFINED: u16 = 1 << 4;
    pub(super) const BYTE: u16 = 1 << 5;
    pub(super) const LSTRIP: u16 = 1 << 7;
    pub(super) const RSTRIP: u16 = 1 << 8;

    /// The attribute of a `tokenizer.ggml.token_type` value.
    pub(super) fn from_type(t: i32) -> u16 {
        match t {
            1 => NORMAL,
            2 => UNKNOWN,
            3 => CONTROL,
            4 => USER_DEFINED,
            5 => UNUSED,
            6 => BYTE,
            _ => UNDEFINED,
        }
    }
}

/// Token texts that end generation (llama.cpp's list in `llama_vocab::impl::load`).
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<｜end▁of▁sentence｜>",
    "[e~[",
];

/// Texts llama.cpp takes as the end-of-turn token when none is given.
const EOT_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
];

/// Fill-in-the-middle token texts: (prefix, suffix, middle, pad, repo, file
/// separator). The pad, repo and separator tokens also end generation.
const FIM_TEXTS: [&[&str]; 6] = [
    &[
        "<|fim_prefix|>",
        "<fim-prefix>",
        "<fim_prefix>",
        "<｜fim▁begin｜>",
        "<PRE>",
        "▁<PRE>",
        "<|code_prefix|>",
        "<|prefix|>",
    ],
    &[
        "<|fim_suffix|>",
        "<fim-suffix>",
        "<fim_suffix>",
        "<｜fim▁hole｜>",
        "<SUF>",
        "▁<SUF>",
        "<|code_suffix|>",
        "<|suffix|>",
    ],
    &[
        "<|fim_middle|>",
        "<fim-middle>",
        "<fim_middle>",
        "<｜fim▁end｜>",
        "<MID>",
        "▁<MID>",
        "<|code_middle|>",
        "<|middle|>",
    ],
    &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"],
    &[
        "<|fim_repo|>",
        "<|repo_name|>",
        "<fim-repo>",
        "<REPO>",
        "<reponame>",
    ],
    &["<|file_sep|>"],
];

/// Family-specific tables.
enum Model {
    Bpe {
        pre: PreConfig,
        merges: MergeMap,
        /// Token id of each byte's GPT-2 alphabet character.
        byte_ids: Box<[Option<u32>; 256]>,
        /// GPT-2 alphabet character of each byte.
        byte_chars: Box<[char; 256]>,
    },
    Spm {
        /// Byte-fallback token of each byte (`<0xXX>`, else the byte itself,
        /// else the unknown token).
        byte_tokens: Box<[Option<u32>; 256]>,
    },
}

/// A piece of the input after the special-token partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fragment {
    /// Bytes `start..end` of the input.
    Text(usize, usize),
    /// A special token.
    Token(u32),
}

/// A validated vocabulary with its lookup tables; see the module docs.
pub struct Tokenizer {
    texts: Vec<Box<str>>,
    attrs: Vec<u16>,
    scores: Vec<f32>,
    token_to_id: HashMap<Box<str>, u32>,
    /// `token_to_piece(id, special = true)` for every id.
    pieces: Vec<Box<[u8]>>,
    /// Special-token partition candidates, longest text first.
    specials: Vec<u32>,
    eog: Vec<bool>,
    model: Model,
    bos: Option<u32>,
    eos: Option<u32>,
    eot: Option<u32>,
    unk: Option<u32>,
    pad: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    add_space_prefix: bool,
    clean_spaces: bool,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("kind", &self.kind())
            .field("vocab_size", &self.texts.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("eot", &self.eot)
            .finish_non_exhaustive()
    }
}

fn idx(id: u32) -> usize {
    usize::try_from(id).unwrap_or(usize::MAX)
}

fn id_of(i: usize) -> u32 {
    u32::try_from(i).unwrap_or(u32::MAX)
}

impl Tokenizer {
    /// Validates `spec` and builds the lookup tables.
    ///
    /// Rejects: an empty or oversized vocabulary, duplicate token texts,
    /// per-token lists of the wrong length, NaN scores, special ids out of
    /// range, `add_bos`/`add_eos` without the token, and for BPE a missing or
    /// unknown pre-tokenizer, no merges, or merges whose two sides or whose
    /// concatenation are not tokens. An empty token text becomes
    /// `[EMPTY_<id>]`, as in llama.cpp.
    pub fn new(spec: VocabSpec) -> Result<Tokenizer, TokenizerError> {
        let n = spec.tokens.len();
        if n == 0 {
            return Err(TokenizerError::EmptyVocab);
        }
        if n > MAX_TOKENS {
            return Err(TokenizerError::TooManyTokens {
                count: n,
                max: MAX_TOKENS,
            });
        }
        if !spec.token_types.is_empty() && spec.token_types.len() != n {
            return Err(TokenizerError::LengthMismatch {
                field: "token_types",
                got: spec.token_types.len(),
                expected: n,
            });
        }
        if !spec.scores.is_empty() && spec.scores.len() != n {
            return Err(TokenizerError::LengthMismatch {
                field: "scores",
                got: spec.scores.len(),
                expected: n,
            });
        }
        if let Some(id) = spec.scores.iter().position(|s| s.is_nan()) {
            return Err(TokenizerError::NanScore { id });
        }
        for (name, id) in [
            ("bos", spec.bos),
            ("eos", spec.eos),
            ("eot", spec.eot),
            ("unk", spec.unk),
            ("pad", spec.pad),
        ] {
            if let Some(id) = id.filter(|&id| idx(id) >= n) {
                return Err(TokenizerError::SpecialOutOfRange { name, id, count: n });
            }
        }
        if spec.add_bos && spec.bos.is_none() {
            return Err(TokenizerError::MissingSpecial {
                flag: "add_bos",
                name: "bos",
            });
        }
        if spec.add_eos && spec.eos.is_none() {
            return Err(TokenizerError::MissingSpecial {
                flag: "add_eos",
                name: "eos",
            });
        }

        let mut texts: Vec<Box<str>> = Vec::with_capacity(n);
        let mut token_to_id: HashMap<Box<str>, u32> = HashMap::with_capacity(n);
        for (i, text) in spec.tokens.into_iter().enumerate() {
            let text = if text.is_empty() {
                format!("[EMPTY_{i}]")
            } else {
                text
            };
            if text.len() > MAX_TOKEN_BYTES {
                return Err(TokenizerError::TokenTooLong {
                    id: i,
                    len: text.len(),
                    max: MAX_TOKEN_BYTES,
                });
            }
            let text: Box<str> = text.into_boxed_str();
            if let Some(&first) = token_to_id.get(&text) {
                return Err(TokenizerError::DuplicateToken {
                    text: text.into(),
                    first: idx(first),
                    second: i,
                });
            }
            token_to_id.insert(text.clone(), id_of(i));
            texts.push(text);
        }
        let mut attrs: Vec<u16> = if spec.token_types.is_empty() {
            vec![attr::NORMAL; n]
        } else {
            spec.token_types
                .iter()
                .map(|&t| attr::from_type(t))
                .collect()
        };
        let scores = if spec.scores.is_empty() {
            vec![0.0; n]
        } else {
            spec.scores
        };

        let model = match spec.kind {
            VocabKind::Bpe => {
                let pre = PreConfig::from_name(&spec.pre)
                    .ok_or_else(|| TokenizerError::UnsupportedPreTokenizer(spec.pre.clone()))?;
                let merges = build_merges(&spec.merges, &token_to_id)?;
                let byte_chars = Box::new(unicode::byte_to_char_table());
                let mut byte_ids = Box::new([None; 256]);
                for (slot, c) in byte_ids.iter_mut().zip(byte_chars.iter()) {
                    let mut buf = [0u8; 4];
                    *slot = token_to_id.get(&*c.encode_utf8(&mut buf)).copied();
                }
                Model::Bpe {
                    pre,
                    merges,
                    byte_ids,
                    byte_chars,
                }
            }
            VocabKind::Spm => {
                let mut byte_tokens = Box::new([None; 256]);
                for (b, slot) in (0u8..=255).zip(byte_tokens.iter_mut()) {
                    let hex = format!("<0x{b:02X}>");
                    *slot = token_to_id
                        .get(hex.as_str())
                        .or_else(|| {
                            char::from_u32(u32::from(b))
                                .filter(|_| b < 0x80)
                                .and_then(|c| token_to_id.get(c.to_string().as_str()))
                        })
                        .copied()
                        .or(spec.unk);
                }
                Model::Spm { byte_tokens }
            }
        };
        let clean_spaces = match &model {
            Model::Bpe { pre, .. } => pre.clean_spaces,
            Model::Spm { .. } => false,
        };

        let (eog, eot) = mark_special_texts(&texts, &token_to_id, &mut attrs, spec.eos, spec.eot);

        let mut specials: Vec<u32> = (0..n)
            .filter(|&i| {
                attrs
                    .get(i)
                    .is_some_and(|a| a & (attr::CONTROL | attr::USER_DEFINED | attr::UNKNOWN) != 0)
            })
            .map(id_of)
            .collect();
        specials.sort_by_key(|&id| std::cmp::Reverse(texts.get(idx(id)).map_or(0, |t| t.len())));

        let mut tok = Tokenizer {
            texts,
            attrs,
            scores,
            token_to_id,
            pieces: Vec::new(),
            specials,
            eog,
            model,
            bos: spec.bos,
            eos: spec.eos,
            eot,
            unk: spec.unk,
            pad: spec.pad,
            add_bos: spec.add_bos,
            add_eos: spec.add_eos,
            add_space_prefix: spec.add_space_prefix,
            clean_spaces,
        };
        tok.pieces = (0..n)
            .map(|i| tok.compute_piece(i).into_boxed_slice())
            .collect();
        Ok(tok)
    }

    /// Encodes `text` like llama.cpp's `llama_tokenize`.
    ///
    /// `add_special` adds BOS / EOS as the vocabulary asks (`add_bos`,
    /// `add_eos`); `parse_special` lets control tokens written in the text
    /// (`<|im_start|>`) become those tokens instead of being spelled out.
    /// User-defined tokens are always matched.
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<u32> {
        let fragments = self.partition(text, parse_special);
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if add_special && self.add_bos {
            out.extend(self.bos);
        }
        match &self.model {
            Model::Spm { byte_tokens } => {
                let vocab = SpmVocab {
                    token_to_id: &self.token_to_id,
                    scores: &self.scores,
                    byte_tokens,
                };
                // A text fragment at the start or after a special token gets the space prefix.
                let mut prev_special = true;
                for frag in fragments {
                    match frag {
                        Fragment::Text(start, end) => {
                            let mut piece = String::with_capacity(end - start + 4);
                            if self.add_space_prefix && prev_special {
                                piece.push(' ');
                            }
                            piece.push_str(text.get(start..end).unwrap_or(""));
                            let escaped = piece.replace(' ', "\u{2581}");
                            spm::tokenize(&vocab, &escaped, &mut out);
                            prev_special = false;
                        }
                        Fragment::Token(id) => {
                            out.push(id);
                            prev_special = true;
                        }
                    }
                }
            }
            Model::Bpe {
                pre,
                merges,
                byte_ids,
                byte_chars,
            } => {
                let mut scratch = BpeScratch::default();
                for frag in fragments {
                    match frag {
                        Fragment::Text(start, end) => {
                            let piece = text.get(start..end).unwrap_or("");
                            self.encode_bpe(
                                piece,
                                *pre,
                                merges,
                                byte_ids,
                                byte_chars,
                                &mut scratch,
                                &mut out,
                            );
                        }
                        Fragment::Token(id) => out.push(id),
                    }
                }
            }
        }
        if add_special && self.add_eos {
            out.extend(self.eos);
        }
        out
    }

    /// Pre-tokenizes and merges one stretch of text without special tokens.
    #[allow(clippy::too_many_arguments)]
    fn encode_bpe(
        &self,
        piece: &str,
        pre: PreConfig,
        merges: &MergeMap,
        byte_ids: &[Option<u32>; 256],
        byte_chars: &[char; 256],
        scratch: &mut BpeScratch,
        out: &mut Vec<u32>,
    ) {
        let cpts: Vec<char> = piece.chars().collect();
        let mut bounds: Vec<usize> = piece.char_indices().map(|(i, _)| i).collect();
        bounds.push(piece.len());
        let mut encoded = String::new();
        let mut cp = 0usize;
        for len in pretok::split(pre.pre, &cpts) {
            let (Some(&a), Some(&b)) = (bounds.get(cp), bounds.get(cp + len)) else {
                break;
            };
            cp += len;
            let Some(word) = piece.get(a..b) else {
                continue;
            };
            if pre.ignore_merges {
                encoded.clear();
                encoded.extend(word.bytes().map(|b| byte_chars[usize::from(b)]));
                if let Some(&id) = self.token_to_id.get(encoded.as_str()) {
                    out.push(id);
                    continue;
                }
            }
            bpe::merge_word(
                merges,
                word.bytes().map(|b| byte_ids[usize::from(b)]),
                scratch,
                out,
            );
        }
    }

    /// llama.cpp's `tokenizer_st_partition`: cuts `text` at special tokens.
    fn partition(&self, text: &str, parse_special: bool) -> Vec<Fragment> {
        if text.is_empty() {
            return Vec::new();
        }
        let bytes = text.as_bytes();
        let is_c_space = |b: u8| matches!(b, b' ' | b'\t' | b'\n' | 0x0B | 0x0C | b'\r');
        let mut frags = vec![Fragment::Text(0, text.len())];
        for &id in &self.specials {
            let a = self.attr(id);
            if !parse_special && a & (attr::CONTROL | attr::UNKNOWN) != 0 {
                continue;
            }
            let Some(special) = self.texts.get(idx(id)) else {
                continue;
            };
            let special: &str = special;
            if !text.contains(special) {
                continue;
            }
            let mut next = Vec::with_capacity(frags.len() + 2);
            for frag in frags {
                let Fragment::Text(start, end) = frag else {
                    next.push(frag);
                    continue;
                };
                let mut base = start;
                loop {
                    let Some(rel) = text.get(base..end).and_then(|h| h.find(special)) else {
                        if base < end {
                            next.push(Fragment::Text(base, end));
                        }
                        break;
                    };
                    let m = base + rel;
                    let mut left_end = m;
                    if a & attr::LSTRIP != 0 {
                        while left_end > base
                            && bytes.get(left_end - 1).is_some_and(|&b| is_c_space(b))
                        {
                            left_end -= 1;
                        }
                    }
                    if left_end > base {
                        next.push(Fragment::Text(base, left_end));
                    }
                    next.push(Fragment::Token(id));
                    let mut right = m + special.len();
                    if right >= end {
                        break;
                    }
                    if a & attr::RSTRIP != 0 {
                        while right < end && bytes.get(right).is_some_and(|&b| is_c_space(b)) {
                            right += 1;
                        }
                    }
                    base = right;
                }
            }
            frags = next;
        }
        frags
    }

    fn attr(&self, id: u32) -> u16 {
        self.attrs.get(idx(id)).copied().unwrap_or(attr::UNDEFINED)
    }

    /// llama.cpp's `token_to_piece(id, special = true)` without lstrip.
    fn compute_piece(&self, i: usize) -> Vec<u8> {
        let (Some(&a), Some(text)) = (self.attrs.get(i), self.texts.get(i)) else {
            return Vec::new();
        };
        if a & (attr::UNKNOWN | attr::CONTROL | attr::USER_DEFINED) != 0 {
            return text.as_bytes().to_vec();
        }
        if a & attr::NORMAL != 0 {
            return match self.model {
                Model::Spm { .. } => text.replace('\u{2581}', " ").into_bytes(),
                Model::Bpe { .. } => decode_gpt2_text(text),
            };
        }
        if a & attr::BYTE != 0 {
            return vec![byte_token_value(text)];
        }
        Vec::new()
    }

    /// The bytes of one token as llama.cpp's `llama_token_to_piece` with
    /// `special = true` gives them: GPT-2 alphabet mapped back to bytes (BPE),
    /// `▁` as space and `<0xXX>` as that byte (SPM), and the text of control
    /// tokens. Unused tokens and ids out of range give nothing.
    pub fn decode_token(&self, id: u32) -> Vec<u8> {
        self.token_piece(id, true).to_vec()
    }

    /// The bytes of one token; with `special` false, control and unknown
    /// tokens give nothing (user-defined tokens always give their text).
    pub fn token_piece(&self, id: u32, special: bool) -> &[u8] {
        if !special && self.attr(id) & (attr::UNKNOWN | attr::CONTROL) != 0 {
            return &[];
        }
        self.pieces.get(idx(id)).map_or(&[], |p| p)
    }

    /// Decodes ids to text like llama.cpp's `llama_detokenize` with
    /// `remove_special = skip_special` and `unparse_special = !skip_special`:
    /// with `skip_special`, a leading BOS / trailing EOS that the vocabulary
    /// adds is dropped and control tokens are not rendered. Applies the SPM
    /// leading-space removal and, where the pre-tokenizer asks for it,
    /// llama.cpp's space clean-up (`" ,"` to `","`, ...). Invalid UTF-8 and
    /// unknown ids: U+FFFD and nothing, respectively.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> String {
        String::from_utf8_lossy(&self.decode_bytes(ids, skip_special, !skip_special)).into_owned()
    }

    /// [`Tokenizer::decode`] as bytes, with llama.cpp's two flags apart.
    pub fn decode_bytes(
        &self,
        ids: &[u32],
        remove_special: bool,
        unparse_special: bool,
    ) -> Vec<u8> {
        let mut ids = ids;
        let mut remove_space = self.add_space_prefix;
        if remove_special
            && self.add_bos
            && let Some((&first, rest)) = ids.split_first()
            && Some(first) == self.bos
        {
            remove_space = false;
            ids = rest;
        }
        if remove_special
            && self.add_eos
            && let Some((&last, rest)) = ids.split_last()
            && Some(last) == self.eos
        {
            ids = rest;
        }
        let mut out = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            let piece = self.token_piece(id, unparse_special);
            let piece = match piece.split_first() {
                Some((b' ', rest)) if remove_space => rest,
                _ => piece,
            };
            out.extend_from_slice(piece);
            remove_space = false;
        }
        if self.clean_spaces {
            clean_up_spaces(&mut out);
        }
        out
    }

    /// Number of tokens.
    pub fn vocab_size(&self) -> usize {
        self.texts.len()
    }

    /// The tokenizer family.
    pub fn kind(&self) -> VocabKind {
        match self.model {
            Model::Bpe { .. } => VocabKind::Bpe,
            Model::Spm { .. } => VocabKind::Spm,
        }
    }

    /// Beginning-of-sequence token.
    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    /// End-of-sequence token.
    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// End-of-turn token: the spec's, else the lowest id among the texts
    /// llama.cpp recognises (`<|eot_id|>`, `<|im_end|>`, `<end_of_turn>`, ...).
    pub fn eot(&self) -> Option<u32> {
        self.eot
    }

    /// Unknown token.
    pub fn unk(&self) -> Option<u32> {
        self.unk
    }

    /// Padding token.
    pub fn pad(&self) -> Option<u32> {
        self.pad
    }

    /// Whether `encode(.., add_special = true, ..)` prepends BOS.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// The text of a token as stored in the vocabulary (GPT-2 alphabet or
    /// `▁` escaped), or `None` for an id out of range.
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.texts.get(idx(id)).map(|t| &**t)
    }

    /// The id of the token with exactly this (stored) text.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.token_to_id.get(text).copied()
    }

    /// Whether generation stops at `id`: EOS, EOT, and the tokens llama.cpp
    /// treats as end of generation by their text.
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.get(idx(id)).copied().unwrap_or(false)
    }

    /// Whether `id` is a control (or unknown-type) token, which decoding
    /// skips unless asked to render special tokens.
    pub fn is_control(&self, id: u32) -> bool {
        self.attr(id) & (attr::CONTROL | attr::UNKNOWN) != 0
    }

    /// Sets llama.cpp's per-token `lstrip` / `rstrip` attributes of a special
    /// token: when it is matched in the text, ASCII white space before it
    /// (`lstrip`) or after it (`rstrip`) is dropped. llama.cpp sets these
    /// only for a few models by name (Phi-3: `rstrip` on all special tokens
    /// but `<unk>`, `<s>`, `<|endoftext|>`); no GGUF key carries them.
    pub fn set_special_strip(
        &mut self,
        id: u32,
        lstrip: bool,
        rstrip: bool,
    ) -> Result<(), TokenizerError> {
        let count = self.texts.len();
        let a = self
            .attrs
            .get_mut(idx(id))
            .ok_or(TokenizerError::TokenOutOfRange { id, count })?;
        *a &= !(attr::LSTRIP | attr::RSTRIP);
        if lstrip {
            *a |= attr::LSTRIP;
        }
        if rstrip {
            *a |= attr::RSTRIP;
        }
        Ok(())
    }
}

impl Tokenizer {
    /// Applies llama.cpp's token-attribute overrides keyed on the model name
    /// (`general.name`): for Phi-3 (`phi-3` / `phi3` in the lower-cased name)
    /// every special token and `</s>` get `rstrip`, except `<unk>`, `<s>` and
    /// `<|endoftext|>`. Other names change nothing.
    pub fn apply_model_name_quirks(&mut self, general_name: &str) {
        let name = general_name.to_ascii_lowercase();
        if !(name.contains("phi-3") || name.contains("phi3")) {
            return;
        }
        let mut rstrip: Vec<u32> = self.specials.clone();
        rstrip.extend(self.token_id("</s>"));
        for id in rstrip {
            if let Some(a) = self.attrs.get_mut(idx(id)) {
                *a |= attr::RSTRIP;
            }
        }
        for text in ["<unk>", "<s>", "<|endoftext|>"] {
            if let Some(a) = self
                .token_id(text)
                .and_then(|id| self.attrs.get_mut(idx(id)))
            {
                *a &= !attr::RSTRIP;
            }
        }
    }
}

/// Parses the merges into `(left id, right id) -> (rank, merged id)`.
fn build_merges(
    merges: &[String],
    token_to_id: &HashMap<Box<str>, u32>,
) -> Result<MergeMap, TokenizerError> {
    if merges.is_empty() {
        return Err(TokenizerError::NoMerges);
    }
    if merges.len() > MAX_MERGES {
        return Err(TokenizerError::TooManyMerges {
            count: merges.len(),
            max: MAX_MERGES,
        });
    }
    let mut map = MergeMap::with_capacity(merges.len());
    for (index, merge) in merges.iter().enumerate() {
        // llama.cpp splits at the first space after the first byte.
        let split = merge
            .as_bytes()
            .get(1..)
            .and_then(|rest| rest.iter().position(|&b| b == b' '))
            .map(|p| p + 1);
        let (Some(left), Some(right)) = (
            split.and_then(|p| merge.get(..p)),
            split.and_then(|p| merge.get(p + 1..)),
        ) else {
            return Err(TokenizerError::MalformedMerge {
                index,
                merge: merge.clone(),
            });
        };
        let lookup = |text: &str| {
            token_to_id
                .get(text)
                .copied()
                .ok_or_else(|| TokenizerError::MergeNotInVocab {
                    index,
                    merge: merge.clone(),
                    text: text.to_string(),
                })
        };
        let l = lookup(left)?;
        let r = lookup(right)?;
        let m = lookup(&format!("{left}{right}"))?;
        // The first occurrence of a pair keeps its rank, as in llama.cpp.
        map.entry((l, r)).or_insert((id_of(index), m));
    }
    Ok(map)
}

/// Marks tokens by text as llama.cpp does: end-of-generation tokens, the
/// auto-detected end-of-turn and fill-in-the-middle tokens (all made
/// control tokens), and a few model-specific overrides. Returns the EOG flag
/// per id and the end-of-turn token.
fn mark_special_texts(
    texts: &[Box<str>],
    token_to_id: &HashMap<Box<str>, u32>,
    attrs: &mut [u16],
    eos: Option<u32>,
    eot: Option<u32>,
) -> (Vec<bool>, Option<u32>) {
    let first_of = |list: &[&str]| {
        list.iter()
            .filter_map(|t| token_to_id.get(*t).copied())
            .min()
    };
    let promote = |attrs: &mut [u16], id: u32| {
        if let Some(a) = attrs.get_mut(idx(id)) {
            *a |= attr::CONTROL;
        }
    };
    let mut eog = vec![false; texts.len()];
    let set_eog = |eog: &mut [bool], id: Option<u32>, on: bool| {
        if let Some(slot) = id.and_then(|id| eog.get_mut(idx(id))) {
            *slot = on;
        }
    };
    let eot = eot.or_else(|| {
        let found = first_of(EOT_TEXTS);
        if let Some(id) = found {
            promote(attrs, id);
        }
        found
    });
    for (k, list) in FIM_TEXTS.iter().enumerate() {
        if let Some(id) = first_of(list) {
            promote(attrs, id);
            if k >= 3 {
                set_eog(&mut eog, Some(id), true);
            }
        }
    }
    for text in EOG_TEXTS {
        if let Some(&id) = token_to_id.get(*text) {
            set_eog(&mut eog, Some(id), true);
            promote(attrs, id);
        }
    }
    // gpt-oss: these are always rendered.
    for text in ["<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"] {
        if let Some(a) = token_to_id.get(text).and_then(|&id| attrs.get_mut(idx(id))) {
            *a = attr::USER_DEFINED;
        }
    }
    set_eog(&mut eog, eos, true);
    set_eog(&mut eog, eot, true);
    let eog_id = |eog: &[bool], text: &str| {
        token_to_id
            .get(text)
            .copied()
            .filter(|&id| eog.get(idx(id)).copied().unwrap_or(false))
    };
    // o200k_harmony / solar-open: "<|end|>" does not end generation there.
    let has_call = eog_id(&eog, "<|call|>").is_some() || eog_id(&eog, "<|calls|>").is_some();
    if let Some(end) = eog_id(&eog, "<|end|>")
        && has_call
        && (eog_id(&eog, "<|return|>").is_some() || eog_id(&eog, "<|flush|>").is_some())
    {
        set_eog(&mut eog, Some(end), false);
        if let Some(a) = attrs.get_mut(idx(end)) {
            *a = attr::USER_DEFINED;
        }
    }
    // gemma4 / plamo: "</s>" is a normal token there.
    if let Some(s) = eog_id(&eog, "</s>")
        && (eog_id(&eog, "<|tool_response>").is_some() || eog_id(&eog, "<|plamo:eos|>").is_some())
    {
        set_eog(&mut eog, Some(s), false);
        if let Some(a) = attrs.get_mut(idx(s)) {
            *a = attr::NORMAL;
        }
    }
    (eog, eot)
}

/// llama.cpp's `llama_decode_text`: GPT-2 alphabet back to bytes.
fn decode_gpt2_text(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    for c in text.chars() {
        match unicode::char_to_byte(c) {
            Some(b) => out.push(b),
            None => {
                out.extend_from_slice(b"[UNK_BYTE_0x");
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    out.extend_from_slice(format!("{b:02x}").as_bytes());
                }
                out.extend_from_slice(text.as_bytes());
                out.push(b']');
            }
        }
    }
    out
}

/// llama.cpp's `token_to_byte`: the hex digits at bytes 3..5 of `<0xXX>`.
fn byte_token_value(text: &str) -> u8 {
    let digits = text.as_bytes().get(3..text.len().min(5)).unwrap_or(&[]);
    let mut value = 0u8;
    for &d in digits {
        let Some(v) = char::from(d).to_digit(16) else {
            break;
        };
        value = value
            .wrapping_mul(16)
            .wrapping_add(u8::try_from(v).unwrap_or(0));
    }
    value
}

/// llama.cpp's `clean_up_tokenization_spaces` passes, in place.
fn clean_up_spaces(text: &mut Vec<u8>) {
    let at = |t: &[u8], i: usize| t.get(i).copied().unwrap_or(0);
    // Pass 1: " ?", " !", " .", " ," lose the space.
    let n = text.len();
    let mut total = usize::from(n > 0);
    for i in 1..n {
        let x = at(text, i);
        if at(text, i - 1) == b' ' && matches!(x, b'?' | b'!' | b'.' | b',') {
            total = total.saturating_sub(1);
        }
        if let Some(slot) = text.get_mut(total) {
            *slot = x;
        }
        total += 1;
    }
    text.truncate(total);
    // Pass 2: " ' " becomes "'".
    let n = text.len();
    let mut total = usize::from(n > 0);
    let mut i = 1;
    while i < n {
        let x = at(text, i);
        if x == b'\'' && i + 1 < n && at(text, i - 1) == b' ' && at(text, i + 1) == b' ' {
            total = total.saturating_sub(1);
            i += 1;
            if let Some(slot) = text.get_mut(i) {
                *slot = 0;
            }
        }
        if let Some(slot) = text.get_mut(total) {
            *slot = x;
        }
        total += 1;
        i += 1;
    }
    text.truncate(total);
    // Pass 3: " 's", " 'm", " 're", " 've" lose the space.
    let n = text.len();
    let mut total = usize::from(n > 0);
    for i in 1..n {
        let x = at(text, i);
        if at(text, i - 1) == b' ' && x == b'\'' && i + 1 < n {
            let x1 = at(text, i + 1);
            if matches!(x1, b's' | b'm') {
                total = total.saturating_sub(1);
            } else if i + 2 < n {
                let x2 = at(text, i + 2);
                if matches!((x1, x2), (b'r', b'e') | (b'v', b'e')) {
                    total = total.saturating_sub(1);
                }
            }
        }
        if let Some(slot) = text.get_mut(total) {
            *slot = x;
        }
        total += 1;
    }
    text.truncate(total);
}

/// Turns generated token ids into text as they arrive, holding back the
/// bytes of an incomplete UTF-8 character until the rest comes.
///
/// Pieces are those of [`Tokenizer::token_piece`]; no SPM leading-space
/// removal and no space clean-up are applied, since a stream usually
/// continues a prompt (llama.cpp's server streams the same way).
#[derive(Debug)]
pub struct StreamDecoder<'a> {
    tok: &'a Tokenizer,
    skip_special: bool,
    pending: Vec<u8>,
}

impl<'a> StreamDecoder<'a> {
    /// A decoder; with `skip_special` control tokens add no text.
    pub fn new(tok: &'a Tokenizer, skip_special: bool) -> StreamDecoder<'a> {
        StreamDecoder {
            tok,
            skip_special,
            pending: Vec::new(),
        }
    }

    /// Adds one token and returns the text that became complete (possibly
    /// empty). Invalid UTF-8 becomes U+FFFD.
    pub fn push(&mut self, id: u32) -> String {
        self.pending
            .extend_from_slice(self.tok.token_piece(id, !self.skip_special));
        let mut out = String::new();
        let mut pos = 0;
        while let Some(rest) = self.pending.get(pos..) {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    pos = self.pending.len();
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    out.push_str(
                        std::str::from_utf8(rest.get(..valid).unwrap_or(&[])).unwrap_or(""),
                    );
                    match e.error_len() {
                        Some(bad) => {
                            out.push('\u{FFFD}');
                            pos += valid + bad;
                        }
                        None => {
                            pos += valid;
                            break;
                        }
                    }
                }
            }
        }
        self.pending.drain(..pos.min(self.pending.len()));
        out
    }

    /// Returns whatever is held back (an incomplete character, as U+FFFD)
    /// and empties the decoder.
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny SentencePiece vocabulary: `<unk>`, `<s>`, `</s>`, the 256 byte
    /// tokens (ids 3..=258), then scored pieces.
    fn spm_tokenizer() -> Tokenizer {
        let mut tokens = vec!["<unk>".to_string(), "<s>".into(), "</s>".into()];
        let mut types = vec![2, 3, 3];
        let mut scores = vec![0.0, 0.0, 0.0];
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(6);
            scores.push(0.0);
        }
        for (text, score) in [
            ("▁", -1.0),
            ("h", -2.0),
            ("e", -2.0),
            ("l", -2.0),
            ("o", -2.0),
            ("ll", -1.0),
            ("lo", -1.2),
            ("he", -1.5),
            ("llo", -2.0),
            ("hell", -0.5),
            ("▁hell", -0.2),
        ] {
            tokens.push(text.into());
            types.push(1);
            scores.push(score);
        }
        Tokenizer::new(VocabSpec {
            kind: VocabKind::Spm,
            pre: "default".into(),
            tokens,
            token_types: types,
            scores,
            merges: Vec::new(),
            bos: Some(1),
            eos: Some(2),
            eot: None,
            unk: Some(0),
            pad: None,
            add_bos: true,
            add_eos: false,
            add_space_prefix: true,
        })
        .expect("valid SPM vocabulary")
    }

    fn ids(tok: &Tokenizer, texts: &[&str]) -> Vec<u32> {
        texts
            .iter()
            .map(|t| tok.token_id(t).expect("token exists"))
            .collect()
    }

    #[test]
    fn spm_merges_by_score() {
        let tok = spm_tokenizer();
        // "▁hello": ll (-1.0) first, then he (-1.5), hell (-0.5), ▁hell (-0.2);
        // "lo" and "llo" go stale.
        assert_eq!(
            tok.encode("hello", false, false),
            ids(&tok, &["▁hell", "o"])
        );
        // Equal scores: the leftmost "ll" wins.
        assert_eq!(
            tok.encode("lll", false, false),
            ids(&tok, &["▁", "ll", "l"])
        );
        // BOS from add_special.
        let mut want = vec![1];
        want.extend(ids(&tok, &["▁hell", "o"]));
        assert_eq!(tok.encode("hello", true, false), want);
    }

    #[test]
    fn spm_byte_fallback_and_specials() {
        let tok = spm_tokenizer();
        let byte = |b: u8| 3 + u32::from(b);
        // "i" and "é" are not pieces: byte tokens.
        assert_eq!(
            tok.encode("hi é", false, false),
            vec![
                tok.token_id("▁").unwrap_or(0),
                tok.token_id("h").unwrap_or(0),
                byte(b'i'),
                tok.token_id("▁").unwrap_or(0),
                byte(0xC3),
                byte(0xA9)
            ]
        );
        // With parse_special the text after "<s>" gets the space prefix again.
        let mut want = ids(&tok, &["▁", "h"]);
        want.push(byte(b'i'));
        want.push(1);
        want.extend(ids(&tok, &["▁hell", "o"]));
        assert_eq!(tok.encode("hi<s>hello", false, true), want);
        // Without it "<s>" is spelled out in bytes.
        let plain = tok.encode("hi<s>", false, false);
        assert_eq!(plain[2..], [byte(b'i'), byte(b'<'), byte(b's'), byte(b'>')]);
        assert_eq!(tok.encode("", true, false), vec![1]);
        assert_eq!(tok.encode("", false, false), Vec::<u32>::new());
    }

    #[test]
    fn spm_decode() {
        let tok = spm_tokenizer();
        let hello = tok.encode("hello é", true, false);
        // llama.cpp keeps the leading space when it drops a leading BOS...
        assert_eq!(tok.decode(&hello, true), " hello é");
        // ...and strips it otherwise.
        assert_eq!(tok.decode(&hello[1..], true), "hello é");
        assert_eq!(tok.decode(&hello, false), "<s> hello é");
        assert_eq!(tok.decode_token(3 + 0x41), b"A");
        assert_eq!(tok.decode_token(1), b"<s>");
        assert_eq!(tok.token_piece(1, false), b"");
        assert_eq!(tok.decode_token(99_999), b"");
        assert!(tok.is_eog(2) && !tok.is_eog(1));
    }

    #[test]
    fn stream_decoder_holds_back_partial_characters() {
        let tok = spm_tokenizer();
        let byte = |b: u8| 3 + u32::from(b);
        let mut stream = StreamDecoder::new(&tok, true);
        assert_eq!(stream.push(byte(0xE2)), "");
        assert_eq!(stream.push(byte(0x82)), "");
        assert_eq!(stream.push(byte(0xAC)), "€");
        assert_eq!(stream.push(1), "");
        assert_eq!(stream.push(byte(0xFF)), "\u{FFFD}");
        assert_eq!(stream.push(byte(b'a')), "a");
        assert_eq!(stream.push(byte(0xF0)), "");
        assert_eq!(stream.finish(), "\u{FFFD}");
        let mut stream = StreamDecoder::new(&tok, false);
        assert_eq!(stream.push(1), "<s>");
    }

    /// A tiny byte-level BPE vocabulary: the 256 alphabet characters, a few
    /// merges, a control token `<|c|>`, user-defined `<ud>`, and `<ab>` / `<abc>`.
    fn bpe_tokenizer(pre: &str) -> Tokenizer {
        let table = unicode::byte_to_char_table();
        let mut tokens: Vec<String> = table.iter().map(|c| c.to_string()).collect();
        let mut types = vec![1; 256];
        for (text, ty) in [
            ("he", 1),
            ("ll", 1),
            ("hell", 1),
            ("hello", 1),
            ("Ġw", 1),
            ("<|c|>", 3),
            ("<ud>", 4),
            ("<ab>", 3),
            ("<abc>", 3),
            ("<|im_end|>", 1),
        ] {
            tokens.push(text.into());
            types.push(ty);
        }
        Tokenizer::new(VocabSpec {
            kind: VocabKind::Bpe,
            pre: pre.into(),
            tokens,
            token_types: types,
            scores: Vec::new(),
            merges: ["h e", "l l", "he ll", "hell o", "Ġ w"]
                .map(String::from)
                .to_vec(),
            bos: None,
            eos: None,
            eot: None,
            unk: None,
            pad: None,
            add_bos: false,
            add_eos: false,
            add_space_prefix: false,
        })
        .expect("valid BPE vocabulary")
    }

    #[test]
    fn bpe_merges_and_partition() {
        let tok = bpe_tokenizer("gpt-2");
        let id = |t: &str| tok.token_id(t).expect("token exists");
        assert_eq!(
            tok.encode("hello wx", false, false),
            vec![id("hello"), id("Ġw"), id("x")]
        );
        // User-defined tokens are matched even without parse_special.
        assert_eq!(
            tok.encode("x<ud>y", false, false),
            vec![id("x"), id("<ud>"), id("y")]
        );
        // Control tokens only with parse_special.
        assert_eq!(
            tok.encode("x<|c|>", false, true),
            vec![id("x"), id("<|c|>")]
        );
        assert_eq!(tok.encode("x<|c|>", false, false).len(), 6);
        // Longest special first.
        assert_eq!(
            tok.encode("<abc><ab>", false, true),
            vec![id("<abc>"), id("<ab>")]
        );
        // "<|im_end|>" is promoted to an EOG control token by its text.
        assert!(tok.is_eog(id("<|im_end|>")) && tok.is_control(id("<|im_end|>")));
        assert_eq!(
            tok.encode("<|im_end|>", false, true),
            vec![id("<|im_end|>")]
        );
        assert_eq!(tok.eot(), Some(id("<|im_end|>")));
        assert_eq!(
            tok.decode(&tok.encode("hello <|c|> wörld", false, true), true),
            "hello  wörld"
        );
        assert_eq!(
            tok.decode(&tok.encode("hello <|c|> wörld", false, true), false),
            "hello <|c|> wörld"
        );
    }

    #[test]
    fn lstrip_rstrip() {
        let mut tok = bpe_tokenizer("smollm");
        let id = |tok: &Tokenizer, t: &str| tok.token_id(t).expect("token exists");
        let ud = id(&tok, "<ud>");
        tok.set_special_strip(ud, true, true).expect("in range");
        assert_eq!(
            tok.encode("x \n<ud>\t y", false, false),
            vec![id(&tok, "x"), ud, id(&tok, "y")]
        );
        assert!(tok.set_special_strip(1 << 30, true, true).is_err());
    }

    #[test]
    fn clean_spaces_passes() {
        let mut text = b"Hello , world ! It ' s a test . We 're here ' n ' there 's".to_vec();
        clean_up_spaces(&mut text);
        assert_eq!(
            String::from_utf8_lossy(&text),
            "Hello, world! It's a test. We're here'n'there's"
        );
    }

    #[test]
    fn validation() {
        let base = || VocabSpec {
            kind: VocabKind::Bpe,
            pre: "gpt-2".into(),
            tokens: vec!["a".into(), "b".into(), "ab".into()],
            token_types: vec![],
            scores: vec![],
            merges: vec!["a b".into()],
            bos: None,
            eos: None,
            eot: None,
            unk: None,
            pad: None,
            add_bos: false,
            add_eos: false,
            add_space_prefix: false,
        };
        assert!(Tokenizer::new(base()).is_ok());
        let err = |f: &dyn Fn(&mut VocabSpec)| {
            let mut spec = base();
            f(&mut spec);
            Tokenizer::new(spec).err()
        };
        assert_eq!(err(&|s| s.tokens.clear()), Some(TokenizerError::EmptyVocab));
        assert!(matches!(
            err(&|s| s.tokens[2] = "a".into()),
            Some(TokenizerError::DuplicateToken {
                first: 0,
                second: 2,
                ..
            })
        ));
        assert!(matches!(
            err(&|s| s.token_types = vec![1]),
            Some(TokenizerError::LengthMismatch { .. })
        ));
        assert!(matches!(
            err(&|s| s.scores = vec![0.0, f32::NAN, 0.0]),
            Some(TokenizerError::NanScore { id: 1 })
        ));
        assert!(matches!(
            err(&|s| s.bos = Some(3)),
            Some(TokenizerError::SpecialOutOfRange { name: "bos", .. })
        ));
        assert!(matches!(
            err(&|s| s.add_bos = true),
            Some(TokenizerError::MissingSpecial { .. })
        ));
        assert!(matches!(
            err(&|s| s.merges = vec!["ab".into()]),
            Some(TokenizerError::MalformedMerge { .. })
        ));
        assert!(matches!(
            err(&|s| s.merges = vec!["b a".into()]),
            Some(TokenizerError::MergeNotInVocab { .. })
        ));
        assert!(matches!(
            err(&|s| s.merges.clear()),
            Some(TokenizerError::NoMerges)
        ));
        assert!(matches!(
            err(&|s| s.pre = "klingon".into()),
            Some(TokenizerError::UnsupportedPreTokenizer(_))
        ));
        assert!(matches!(
            err(&|s| s.tokens[0] = "x".repeat(MAX_TOKEN_BYTES + 1)),
            Some(TokenizerError::TokenTooLong { .. })
        ));
        let msg = err(&|s| s.merges = vec!["b a".into()]).map(|e| e.to_string());
        assert_eq!(
            msg.as_deref(),
            Some("merge 0 (\"b a\") refers to \"ba\", which is not a token")
        );
    }
}
