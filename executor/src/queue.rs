//! The fair job queue: round-robin across buyers, FIFO within a buyer, bounded in total.

use std::collections::{HashMap, VecDeque};

/// Jobs waiting to run, grouped by buyer.
pub(crate) struct FairQueue<T> {
    per_buyer: HashMap<String, VecDeque<T>>,
    /// Buyers with waiting jobs, in the order they are served next.
    turn: VecDeque<String>,
    len: usize,
    depth: usize,
}

impl<T> FairQueue<T> {
    /// An empty queue that holds at most `depth` jobs.
    pub(crate) fn new(depth: usize) -> Self {
        FairQueue {
            per_buyer: HashMap::new(),
            turn: VecDeque::new(),
            len: 0,
            depth,
        }
    }

    /// Adds a job for `buyer`; gives it back when the queue is full.
    pub(crate) fn push(&mut self, buyer: &str, job: T) -> Result<(), T> {
        if self.len >= self.depth {
            return Err(job);
        }
        let q = self.per_buyer.entry(buyer.to_string()).or_default();
        if q.is_empty() {
            self.turn.push_back(buyer.to_string());
        }
        q.push_back(job);
        self.len += 1;
        Ok(())
    }

    /// The next job: the oldest job of the buyer whose turn it is.
    pub(crate) fn pop(&mut self) -> Option<T> {
        let buyer = self.turn.pop_front()?;
        let q = self.per_buyer.get_mut(&buyer)?;
        let job = q.pop_front()?;
        if q.is_empty() {
            self.per_buyer.remove(&buyer);
        } else {
            self.turn.push_back(buyer);
        }
        self.len -= 1;
        Some(job)
    }

    /// Jobs waiting.
    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_across_buyers() {
        let mut q = FairQueue::new(10);
        for i in 0..4 {
            q.push("a", ("a", i)).unwrap();
        }
        q.push("b", ("b", 0)).unwrap();
        q.push("c", ("c", 0)).unwrap();
        let order: Vec<_> = std::iter::from_fn(|| q.pop()).collect();
        assert_eq!(
            order,
            vec![("a", 0), ("b", 0), ("c", 0), ("a", 1), ("a", 2), ("a", 3)]
        );
    }

    #[test]
    fn bounded() {
        let mut q = FairQueue::new(2);
        q.push("a", 1).unwrap();
        q.push("b", 2).unwrap();
        assert_eq!(q.push("c", 3), Err(3));
        assert_eq!(q.len(), 2);
    }
}
