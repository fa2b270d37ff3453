//! SentencePiece-style BPE over scores (llama.cpp's `llm_tokenizer_spm_session`).
//!
//! The text (spaces already escaped as `▁`) starts as one symbol per UTF-8
//! character. The adjacent pair whose concatenation is a token with the
//! highest score is merged, ties going to the leftmost pair, until no pair
//! forms a token. A remaining symbol that is not a token is written as byte
//! tokens (`<0xXX>`).

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

/// Sentinel for "no neighbour" in the symbol list.
const NONE: usize = usize::MAX;

/// One symbol: a byte range of the text.
#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    /// Byte length; 0 once merged into the left neighbour.
    len: usize,
    prev: usize,
    next: usize,
}

/// A candidate merge; the heap's maximum is the highest score, then the
/// smallest left index.
#[derive(Clone, Copy)]
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    size: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Bigram {
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

/// The vocabulary view the SPM merge needs.
pub(crate) struct SpmVocab<'a> {
    /// Token text to id.
    pub(crate) token_to_id: &'a HashMap<Box<str>, u32>,
    /// Score per token id.
    pub(crate) scores: &'a [f32],
    /// Token id for each byte value (byte fallback), if the vocabulary has one.
    pub(crate) byte_tokens: &'a [Option<u32>; 256],
}

fn try_add(
    vocab: &SpmVocab<'_>,
    text: &str,
    symbols: &[Symbol],
    heap: &mut BinaryHeap<Bigram>,
    left: usize,
    right: usize,
) {
    if left == NONE || right == NONE {
        return;
    }
    let (Some(l), Some(r)) = (symbols.get(left), symbols.get(right)) else {
        return;
    };
    let Some(piece) = text.get(l.start..r.start + r.len) else {
        return;
    };
    let Some(&id) = vocab.token_to_id.get(piece) else {
        return;
    };
    let score = usize::try_from(id)
        .ok()
        .and_then(|i| vocab.scores.get(i))
        .copied()
        .unwrap_or(0.0);
    heap.push(Bigram {
        score,
        left,
        right,
        size: piece.len(),
    });
}

/// Tokenizes `text` (already space-escaped) and appends the ids to `out`.
pub(crate) fn tokenize(vocab: &SpmVocab<'_>, text: &str, out: &mut Vec<u32>) {
    let mut symbols: Vec<Symbol> = Vec::with_capacity(text.len());
    for (i, (start, c)) in text.char_indices().enumerate() {
        let prev = if i == 0 { NONE } else { i - 1 };
        symbols.push(Symbol {
            start,
            len: c.len_utf8(),
            prev,
            next: i + 1,
        });
    }
    if let Some(last) = symbols.last_mut() {
        last.next = NONE;
    }
    let mut heap = BinaryHeap::new();
    for i in 1..symbols.len() {
        try_add(vocab, text, &symbols, &mut heap, i - 1, i);
    }
    while let Some(bigram) = heap.pop() {
        let (Some(&l), Some(&r)) = (symbols.get(bigram.left), symbols.get(bigram.right)) else {
            continue;
        };
        // Skip pairs where a side was merged meanwhile.
        if l.len == 0 || r.len == 0 || l.len + r.len != bigram.size {
            continue;
        }
        if let Some(ls) = symbols.get_mut(bigram.left) {
            ls.len += r.len;
            ls.next = r.next;
        }
        if let Some(rs) = symbols.get_mut(bigram.right) {
            rs.len = 0;
        }
        if let Some(ns) = symbols.get_mut(r.next) {
            ns.prev = bigram.left;
        }
        try_add(vocab, text, &symbols, &mut heap, l.prev, bigram.left);
        try_add(vocab, text, &symbols, &mut heap, bigram.left, r.next);
    }
    let mut i = if symbols.is_empty() { NONE } else { 0 };
    while let Some(sym) = symbols.get(i) {
        let piece = text.get(sym.start..sym.start + sym.len).unwrap_or("");
        if let Some(&id) = vocab.token_to_id.get(piece) {
            out.push(id);
        } else {
            out.extend(
                piece
                    .bytes()
                    .filter_map(|b| vocab.byte_tokens[usize::from(b)]),
            );
        }
        i = sym.next;
    }
}
