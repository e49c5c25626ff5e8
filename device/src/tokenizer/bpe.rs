//! The BPE merge loop, shared by byte-level and SentencePiece BPE: repeatedly merge
//! the adjacent pair of lowest rank, leftmost on ties, until no pair has a merge.
//!
//! This is the order of Hugging Face `tokenizers` (`Word::merge_all`: a heap keyed by
//! rank, then position) and of llama.cpp's SentencePiece tokenizer (a heap keyed by
//! score, then position; scores become ranks in [`super::Tokenizer::new`]). Short
//! pieces use a plain scan, long ones a heap over a linked list of symbols; both give
//! the same result.

use alloc::collections::BinaryHeap;
use alloc::vec::Vec;
use core::cmp::Reverse;

/// What merging a pair gives: its priority (lower first) and the merged token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Merge {
    /// Priority; equal ranks are taken leftmost first.
    pub rank: u32,
    /// The merged token.
    pub id: u32,
}

/// No merge / no symbol.
const NONE: u32 = u32::MAX;

/// Up to this many symbols, the quadratic scan beats the heap.
const SMALL: usize = 48;

/// A symbol of the heap path: a token id in a doubly linked list (`id == NONE`: merged away).
#[derive(Clone, Copy, Debug)]
struct Sym {
    id: u32,
    prev: u32,
    next: u32,
}

/// A candidate merge of the heap path: (rank, left position, merged id, left id,
/// right id); the smallest pops first.
type Candidate = Reverse<(u32, u32, u32, u32, u32)>;

/// Scratch buffers for [`Merger::run`], reused across pieces.
#[derive(Clone, Debug, Default)]
pub struct Merger {
    /// The symbols to merge (token ids), filled by the caller.
    pub syms: Vec<u32>,
    merges: Vec<Merge>,
    list: Vec<Sym>,
    heap: BinaryHeap<Candidate>,
}

impl Merger {
    /// Merges [`Merger::syms`] with `lookup` (the merge of a pair, if any) and appends
    /// the resulting ids to `out`.
    pub fn run(&mut self, lookup: impl Fn(u32, u32) -> Option<Merge>, out: &mut Vec<u32>) {
        if self.syms.len() <= SMALL {
            self.run_small(lookup, out);
        } else {
            self.run_heap(lookup, out);
        }
    }

    fn run_small(&mut self, lookup: impl Fn(u32, u32) -> Option<Merge>, out: &mut Vec<u32>) {
        let none = Merge { rank: NONE, id: 0 };
        let get = |a: u32, b: u32| lookup(a, b).unwrap_or(none);
        let (syms, merges) = (&mut self.syms, &mut self.merges);
        merges.clear();
        merges.extend(syms.windows(2).map(|w| get(w[0], w[1])));
        loop {
            // The first pair of lowest rank.
            let mut best = 0;
            for (i, m) in merges.iter().enumerate() {
                if m.rank < merges[best].rank {
                    best = i;
                }
            }
            match merges.get(best) {
                Some(m) if m.rank != NONE => {
                    syms[best] = m.id;
                    syms.remove(best + 1);
                    merges.remove(best);
                    if best > 0 {
                        merges[best - 1] = get(syms[best - 1], syms[best]);
                    }
                    if best + 1 < syms.len() {
                        merges[best] = get(syms[best], syms[best + 1]);
                    }
                }
                _ => break,
            }
        }
        out.extend_from_slice(syms);
    }

    fn run_heap(&mut self, lookup: impl Fn(u32, u32) -> Option<Merge>, out: &mut Vec<u32>) {
        let n = self.syms.len();
        if n == 0 {
            return;
        }
        let (list, heap) = (&mut self.list, &mut self.heap);
        list.clear();
        heap.clear();
        list.extend(self.syms.iter().enumerate().map(|(i, &id)| Sym {
            id,
            prev: if i == 0 { NONE } else { i as u32 - 1 },
            next: if i + 1 == n { NONE } else { i as u32 + 1 },
        }));
        let push = |heap: &mut BinaryHeap<Candidate>, pos: u32, l: u32, r: u32| {
            if let Some(m) = lookup(l, r) {
                heap.push(Reverse((m.rank, pos, m.id, l, r)));
            }
        };
        for i in 0..n.saturating_sub(1) {
            push(heap, i as u32, list[i].id, list[i + 1].id);
        }
        while let Some(Reverse((_, pos, id, l, r))) = heap.pop() {
            let p = pos as usize;
            let next = list[p].next;
            // Stale: the left symbol was merged (its id changed) or the right one was.
            if list[p].id != l || next == NONE || list[next as usize].id != r {
                continue;
            }
            let after = list[next as usize].next;
            list[p].id = id;
            list[p].next = after;
            list[next as usize].id = NONE;
            if after != NONE {
                list[after as usize].prev = pos;
                push(heap, pos, id, list[after as usize].id);
            }
            let prev = list[p].prev;
            if prev != NONE {
                push(heap, prev, list[prev as usize].id, id);
            }
        }
        // The first symbol is never merged away (merges fold the right into the left).
        let mut i = 0;
        while i != NONE {
            out.push(list[i as usize].id);
            i = list[i as usize].next;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    /// Merges of a toy vocabulary over small ids: (a, b) → rank, a * 10 + b.
    fn toy(a: u32, b: u32) -> Option<Merge> {
        let rank = match (a, b) {
            (1, 1) => 0,
            (2, 3) => 1,
            (11, 2) => 2,
            (3, 4) => 1,
            _ => return None,
        };
        Some(Merge {
            rank,
            id: a * 10 + b,
        })
    }

    fn both(syms: &[u32]) -> Vec<u32> {
        let mut m = Merger::default();
        let (mut small, mut heap) = (vec![], vec![]);
        m.syms = syms.to_vec();
        m.run_small(toy, &mut small);
        m.syms = syms.to_vec();
        m.run_heap(toy, &mut heap);
        assert_eq!(small, heap, "{syms:?}");
        small
    }

    #[test]
    fn lowest_rank_then_leftmost() {
        assert_eq!(both(&[1, 1, 1]), [11, 1]);
        assert_eq!(both(&[1, 1, 2, 3]), [11, 23]);
        assert_eq!(both(&[1, 1, 2, 5]), [112, 5]);
        // (2,3) and (3,4) tie on rank 1: the leftmost wins.
        assert_eq!(both(&[2, 3, 4]), [23, 4]);
        assert_eq!(both(&[]), [0u32; 0]);
        assert_eq!(both(&[5]), [5]);
    }

    #[test]
    fn heap_and_scan_agree_on_long_inputs() {
        let mut x = 12345u32;
        for len in [0, 1, 2, 47, 48, 49, 100, 1000] {
            let syms: Vec<u32> = (0..len)
                .map(|_| {
                    x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    1 + (x >> 16) % 4
                })
                .collect();
            both(&syms);
        }
    }
}
