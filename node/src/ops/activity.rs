//! What the dashboard shows of a site's jobs: the last [`RECENT_JOBS`] jobs it agreed to run,
//! each with its latest state, and a once-a-second history of the site's figures for the last
//! [`HISTORY_POINTS`] seconds. Both are bounded rings in memory (the store keeps the records;
//! this is only the view).

use std::collections::VecDeque;
use std::sync::Mutex;

use hashgrid_protocol::{ContentId, PublicKey, Timestamp};
use serde::Serialize;

/// Jobs kept for the dashboard.
pub const RECENT_JOBS: usize = 100;

/// Seconds of history kept for the dashboard's charts.
pub const HISTORY_POINTS: usize = 600;

/// One job as the dashboard lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JobActivity {
    /// The agreement's id.
    pub agreement: String,
    /// The buyer's key (short form).
    pub buyer: String,
    /// `agreed`, `accepted`, `running`, `done`, `countersigned`, `failed`,
    /// `disputed`.
    pub state: &'static str,
    /// When the agreement was signed, in ms since the epoch.
    pub agreed_at_ms: u64,
    /// When the job ended, if it has.
    pub ended_at_ms: Option<u64>,
    /// The receipt's charge, once signed.
    pub charge_msat: Option<u64>,
    /// Input bytes fetched from the buyer and taken from the cache.
    pub fetched_bytes: u64,
    /// See `fetched_bytes`.
    pub cached_bytes: u64,
    /// Why it failed or was disputed.
    pub failure: Option<String>,
}

/// One second of the site's figures.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct HistoryPoint {
    /// When, in ms since the epoch.
    pub t_ms: u64,
    /// GPU units busy.
    pub units_busy: u64,
    /// GPU units sold.
    pub units_total: u64,
    /// Jobs done so far.
    pub jobs_done: u64,
    /// Msat earned so far (countersigned).
    pub earned_msat: u64,
    /// GPU seconds of finished jobs so far.
    pub gpu_busy_seconds: f64,
    /// Connected peers.
    pub peers: u64,
}

/// A change to one job (see [`Activity::update`]).
#[derive(Debug, Clone, Default)]
pub struct JobChange {
    /// The new state (empty: unchanged).
    pub state: &'static str,
    /// The buyer, when the job is new.
    pub buyer: Option<PublicKey>,
    /// The charge, when the receipt was signed.
    pub charge_msat: Option<u64>,
    /// Input bytes: fetched, cached.
    pub inputs: Option<(u64, u64)>,
    /// Why it failed.
    pub failure: Option<String>,
}

/// The dashboard's rings (see the module docs).
#[derive(Debug, Default)]
pub struct Activity {
    jobs: Mutex<VecDeque<JobActivity>>,
    history: Mutex<VecDeque<HistoryPoint>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Activity {
    /// Records a change to the job under `agreement` (a job not yet listed is added, the
    /// oldest dropped beyond [`RECENT_JOBS`]).
    pub fn update(&self, agreement: &ContentId, c: JobChange) {
        let id = agreement.to_string();
        let now = Timestamp::now().0;
        let mut jobs = lock(&self.jobs);
        let i = match jobs.iter().position(|j| j.agreement == id) {
            Some(i) => i,
            None => {
                if jobs.len() >= RECENT_JOBS {
                    jobs.pop_front();
                }
                jobs.push_back(JobActivity {
                    agreement: id,
                    buyer: c.buyer.map(|b| b.short()).unwrap_or_default(),
                    state: c.state,
                    agreed_at_ms: now,
                    ended_at_ms: None,
                    charge_msat: None,
                    fetched_bytes: 0,
                    cached_bytes: 0,
                    failure: None,
                });
                jobs.len() - 1
            }
        };
        let j = &mut jobs[i];
        // A countersignature follows `done`; nothing moves a job back from an end state.
        let ended = matches!(j.state, "done" | "countersigned" | "failed" | "disputed");
        if !c.state.is_empty()
            && (!ended || matches!(c.state, "countersigned" | "disputed" | "failed"))
        {
            j.state = c.state;
        }
        if matches!(c.state, "done" | "failed") && j.ended_at_ms.is_none() {
            j.ended_at_ms = Some(now);
        }
        if let Some(b) = c.buyer {
            j.buyer = b.short();
        }
        if c.charge_msat.is_some() {
            j.charge_msat = c.charge_msat;
        }
        if let Some((f, k)) = c.inputs {
            j.fetched_bytes = f;
            j.cached_bytes = k;
        }
        if c.failure.is_some() {
            j.failure = c.failure;
        }
    }

    /// The jobs listed, newest first.
    pub fn jobs(&self) -> Vec<JobActivity> {
        lock(&self.jobs).iter().rev().cloned().collect()
    }

    /// Appends one history point (the oldest dropped beyond [`HISTORY_POINTS`]).
    pub fn sample(&self, p: HistoryPoint) {
        let mut h = lock(&self.history);
        if h.len() >= HISTORY_POINTS {
            h.pop_front();
        }
        h.push_back(p);
    }

    /// The history, oldest first.
    pub fn history(&self) -> Vec<HistoryPoint> {
        lock(&self.history).iter().copied().collect()
    }
}
