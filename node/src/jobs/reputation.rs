//! What this node, as a buyer, has seen of each provider it ran jobs with: jobs completed,
//! jobs the provider failed (dropped, timed out, refused after agreeing), and jobs whose
//! receipt or outputs did not verify. Kept in memory for ranking and written through to the
//! store (tree `reputation`, flushed with the job's outcome), so it survives restarts.
//!
//! The score the market engine ranks by ([`hashgrid_market::Reputation`]) is
//! `completed − forfeited − 4 · failed − 16 · lied − 8 · reported`: a provider has to complete
//! four jobs to make up for one it failed; a lie this buyer caught first forfeits every point
//! the provider had earned (its unchecked results are suspect too) and then costs sixteen; a
//! report from another buyer (fraud evidence that checked) costs eight. A negative score puts
//! a provider after every provider in good standing at the same price (see
//! `OrderBook::candidates_fair`).

use std::collections::HashMap;
use std::sync::Mutex;

use hashgrid_protocol::PublicKey;
use tracing::warn;

use crate::store::{Store, StoreError, StoreSlot};

/// Most providers remembered: past it, the one with the fewest jobs is forgotten.
pub const MAX_REMEMBERED_PROVIDERS: usize = 100_000;

pub use super::record::Experience;

/// How one job with a provider ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Completed; `checked` when another provider's run confirmed its outputs.
    Completed {
        ms: u64,
        checked: bool,
    },
    Failed,
    /// Its receipt or outputs did not verify, or a majority contradicted them.
    Lied,
    /// Another buyer's fraud evidence against it checked.
    Reported,
}

/// Most `(reporter, accused)` pairs of fraud evidence remembered; past it the set starts
/// again (evidence is gossiped once, so a repeat after that is rare and costs one report).
pub const MAX_REPORTS_REMEMBERED: usize = 100_000;

/// Every provider's [`Experience`], shared by the buyer's job tasks and the ranking.
#[derive(Debug, Default)]
pub struct Reputations {
    map: Mutex<HashMap<PublicKey, Experience>>,
    /// Evidence already counted, by reporter and accused: one report per buyer and provider,
    /// so one buyer cannot sink a provider by reporting it over and over.
    reports: Mutex<std::collections::HashSet<(PublicKey, PublicKey)>>,
}

impl Reputations {
    /// Loads what the store remembers (an unreadable record is skipped with a warning).
    pub(crate) fn load(store: &Store) -> Result<Reputations, StoreError> {
        let mut map = HashMap::new();
        for (k, v) in store.reputations()? {
            match (
                <[u8; 32]>::try_from(k.as_ref()).map(PublicKey),
                postcard::from_bytes::<Experience>(&v),
            ) {
                (Ok(p), Ok(e)) => {
                    map.insert(p, e);
                }
                _ => warn!("skipping an unreadable reputation record"),
            }
        }
        Ok(Reputations {
            map: Mutex::new(map),
            reports: Mutex::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PublicKey, Experience>> {
        match self.map.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        }
    }

    /// Records a job's outcome with `provider` and writes it through (not flushed: the job's
    /// outcome flush makes it durable).
    pub(crate) fn record(&self, store: &StoreSlot, provider: PublicKey, outcome: Outcome) {
        let (e, forgotten) = {
            let mut m = self.lock();
            let e = m.entry(provider).or_default();
            match outcome {
                Outcome::Completed { ms, checked } => {
                    e.completed = e.completed.saturating_add(1);
                    e.completed_ms = e.completed_ms.saturating_add(ms);
                    if checked {
                        e.checks_passed = e.checks_passed.saturating_add(1);
                    }
                }
                Outcome::Failed => e.failed = e.failed.saturating_add(1),
                Outcome::Lied => {
                    // Earned trust is gone: forfeit the positive part of the score first.
                    let credit = u64::try_from(e.score().max(0)).unwrap_or(0);
                    e.forfeited = e.forfeited.saturating_add(credit);
                    e.lied = e.lied.saturating_add(1);
                }
                Outcome::Reported => e.reported = e.reported.saturating_add(1),
            }
            let e = *e;
            let mut forgotten = None;
            if m.len() > MAX_REMEMBERED_PROVIDERS {
                let least = m
                    .iter()
                    .filter(|(p, _)| **p != provider)
                    .min_by_key(|(p, x)| {
                        let seen = x.completed + x.failed + x.lied + x.reported;
                        (seen, **p)
                    })
                    .map(|(p, _)| *p);
                if let Some(p) = least {
                    m.remove(&p);
                    forgotten = Some(p);
                }
            }
            (e, forgotten)
        };
        let res = store.with(|s| {
            s.put_reputation(&provider, &e)?;
            if let Some(p) = forgotten {
                s.remove_reputation(&p)?;
            }
            Ok(())
        });
        if let Err(Some(err)) = res {
            warn!(error = %err, "cannot store a provider's reputation");
        }
    }

    /// Counts checked fraud evidence from `reporter` against `accused`, once per pair.
    /// Returns whether it counted.
    pub(crate) fn reported(
        &self,
        store: &StoreSlot,
        reporter: PublicKey,
        accused: PublicKey,
    ) -> bool {
        {
            let mut seen = match self.reports.lock() {
                Ok(s) => s,
                Err(p) => p.into_inner(),
            };
            if seen.len() >= MAX_REPORTS_REMEMBERED {
                seen.clear();
            }
            if !seen.insert((reporter, accused)) {
                return false;
            }
        }
        self.record(store, accused, Outcome::Reported);
        true
    }

    /// This node's experience of `provider`.
    pub fn get(&self, provider: &PublicKey) -> Option<Experience> {
        self.lock().get(provider).copied()
    }

    /// Every provider's experience, by key.
    pub fn all(&self) -> Vec<(PublicKey, Experience)> {
        let mut v: Vec<_> = self.lock().iter().map(|(p, e)| (*p, *e)).collect();
        v.sort_by_key(|(p, _)| *p);
        v
    }
}

impl hashgrid_market::Reputation for Reputations {
    fn score(&self, owner: &PublicKey) -> i64 {
        self.lock().get(owner).map_or(0, Experience::score)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use hashgrid_market::Reputation as _;

    #[test]
    fn outcomes_score_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let a = hashgrid_protocol::Keypair::from_secret_bytes([1; 32]).public();
        let b = hashgrid_protocol::Keypair::from_secret_bytes([2; 32]).public();
        {
            let store = Store::open(dir.path()).unwrap();
            let slot = StoreSlot::new(store.clone());
            let r = Reputations::load(&store).unwrap();
            for _ in 0..5 {
                r.record(
                    &slot,
                    a,
                    Outcome::Completed {
                        ms: 100,
                        checked: false,
                    },
                );
            }
            r.record(&slot, a, Outcome::Failed);
            r.record(
                &slot,
                b,
                Outcome::Completed {
                    ms: 50,
                    checked: true,
                },
            );
            r.record(&slot, b, Outcome::Lied);
            assert_eq!(r.score(&a), 1);
            // The one point b had earned is forfeited by its lie.
            assert_eq!(r.score(&b), -16);
            // However much a provider had earned, a caught lie leaves it at -16.
            let c = hashgrid_protocol::Keypair::from_secret_bytes([4; 32]).public();
            for _ in 0..40 {
                r.record(
                    &slot,
                    c,
                    Outcome::Completed {
                        ms: 1,
                        checked: false,
                    },
                );
            }
            r.record(&slot, c, Outcome::Lied);
            assert_eq!(r.score(&c), -16);
            r.record(&slot, c, Outcome::Reported);
            assert_eq!(r.score(&c), -24);
            assert_eq!(r.get(&a).unwrap().mean_ms(), Some(100));
            store.flush().unwrap();
            slot.close();
        }
        let store = Store::open(dir.path()).unwrap();
        let r = Reputations::load(&store).unwrap();
        assert_eq!((r.score(&a), r.score(&b)), (1, -16));
        assert_eq!(r.all().len(), 3);
        let nobody = hashgrid_protocol::Keypair::from_secret_bytes([3; 32]).public();
        assert_eq!(r.score(&nobody), 0);
    }
}
