//! Byte-level BPE merging (llama.cpp's `llm_tokenizer_bpe_session`).
//!
//! A word is first written in GPT-2's byte alphabet, one symbol per byte.
//! Then the adjacent pair with the lowest merge rank is merged, ties going to
//! the leftmost pair, until no adjacent pair has a merge. Pairs are keyed by
//! token ids and kept in a binary heap over a linked list of symbols, so a
//! word of `n` bytes takes `O(n log n)`.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

/// Sentinel for "no neighbour" in the symbol list.
const NONE: usize = usize::MAX;

/// One symbol of the word being merged.
#[derive(Clone, Copy)]
struct Symbol {
    /// Token id of the symbol's text; `None` for a byte whose alphabet
    /// character is not in the vocabulary (it can take part in no merge).
    id: Option<u32>,
    prev: usize,
    next: usize,
    /// Merged into its left neighbour.
    dead: bool,
}

/// A candidate merge of two adjacent symbols.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Bigram {
    rank: u32,
    left: usize,
    right: usize,
    left_id: u32,
    right_id: u32,
}

/// The merge table: `(left id, right id) -> (rank, merged id)`.
pub(crate) type MergeMap = HashMap<(u32, u32), (u32, u32)>;

/// Reusable buffers for [`merge_word`].
#[derive(Default)]
pub(crate) struct BpeScratch {
    symbols: Vec<Symbol>,
    heap: BinaryHeap<Reverse<Bigram>>,
}

impl BpeScratch {
    fn try_add(&mut self, merges: &MergeMap, left: usize, right: usize) {
        if left == NONE || right == NONE {
            return;
        }
        let (Some(l), Some(r)) = (self.symbols.get(left), self.symbols.get(right)) else {
            return;
        };
        let (Some(left_id), Some(right_id)) = (l.id, r.id) else {
            return;
        };
        if let Some(&(rank, _)) = merges.get(&(left_id, right_id)) {
            self.heap.push(Reverse(Bigram {
                rank,
                left,
                right,
                left_id,
                right_id,
            }));
        }
    }
}

/// Merges one word given as the token ids of its bytes (`byte_ids[i]` for
/// byte `i` of the word) and appends the resulting token ids to `out`.
///
/// A symbol that has no token id (its byte's alphabet character is missing
/// from the vocabulary) is dropped, as llama.cpp does: its single-byte
/// fallback lookup cannot match a valid UTF-8 token text.
pub(crate) fn merge_word(
    merges: &MergeMap,
    byte_ids: impl Iterator<Item = Option<u32>>,
    scratch: &mut BpeScratch,
    out: &mut Vec<u32>,
) {
    scratch.symbols.clear();
    scratch.heap.clear();
    for (i, id) in byte_ids.enumerate() {
        let prev = if i == 0 { NONE } else { i - 1 };
        scratch.symbols.push(Symbol {
            id,
            prev,
            next: i + 1,
            dead: false,
        });
    }
    if let Some(last) = scratch.symbols.last_mut() {
        last.next = NONE;
    }
    for i in 1..scratch.symbols.len() {
        scratch.try_add(merges, i - 1, i);
    }
    while let Some(Reverse(bigram)) = scratch.heap.pop() {
        let (Some(&l), Some(&r)) = (
            scratch.symbols.get(bigram.left),
            scratch.symbols.get(bigram.right),
        ) else {
            continue;
        };
        // Skip outdated pairs: one side already merged or changed.
        if l.dead
            || r.dead
            || l.next != bigram.right
            || l.id != Some(bigram.left_id)
            || r.id != Some(bigram.right_id)
        {
            continue;
        }
        let Some(&(_, merged)) = merges.get(&(bigram.left_id, bigram.right_id)) else {
            continue;
        };
        if let Some(ls) = scratch.symbols.get_mut(bigram.left) {
            ls.id = Some(merged);
            ls.next = r.next;
        }
        if let Some(rs) = scratch.symbols.get_mut(bigram.right) {
            rs.dead = true;
        }
        if let Some(ns) = scratch.symbols.get_mut(r.next) {
            ns.prev = bigram.left;
        }
        scratch.try_add(merges, l.prev, bigram.left);
        scratch.try_add(merges, bigram.left, r.next);
    }
    out.extend(
        scratch
            .symbols
            .iter()
            .filter(|s| !s.dead)
            .filter_map(|s| s.id),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowest_rank_first_then_leftmost() {
        // ids: a=0 b=1 ab=2 bb=3 abb=4
        let mut merges = MergeMap::new();
        merges.insert((1, 1), (0, 3)); // b b -> bb (rank 0)
        merges.insert((0, 1), (1, 2)); // a b -> ab (rank 1)
        merges.insert((2, 1), (2, 4)); // ab b -> abb (rank 2)
        let mut scratch = BpeScratch::default();
        let mut out = Vec::new();
        // "abb": bb wins (rank 0) -> a, bb ; no (a, bb) merge.
        merge_word(
            &merges,
            [0, 1, 1].map(Some).into_iter(),
            &mut scratch,
            &mut out,
        );
        assert_eq!(out, [0, 3]);
        out.clear();
        // "abbb": the leftmost bb merges first -> a, bb, b.
        merge_word(
            &merges,
            [0, 1, 1, 1].map(Some).into_iter(),
            &mut scratch,
            &mut out,
        );
        assert_eq!(out, [0, 3, 1]);
        out.clear();
        // "ab" then "abb" via ab + b.
        merge_word(
            &merges,
            [0, 1].map(Some).into_iter(),
            &mut scratch,
            &mut out,
        );
        assert_eq!(out, [2]);
        out.clear();
        // unknown byte symbols are dropped and block merges across them.
        merge_word(
            &merges,
            [Some(0), None, Some(1)].into_iter(),
            &mut scratch,
            &mut out,
        );
        assert_eq!(out, [0, 1]);
    }
}
