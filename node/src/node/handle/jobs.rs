//! [`JobsHandle`]: a buyer's jobs through the market.

use hashgrid_protocol::{ContentId, PublicKey, Timestamp};
use tokio::sync::broadcast;
use tracing::Instrument;

use crate::error::NodeError;
use crate::event::{DurableEvent, NodeEvent};
use crate::jobs::buyer::{BuyerCtx, BuyerJob};
use crate::jobs::{JobOptions, JobRecord, JobResult, JobState, Submission};
use crate::store::JobTree;

use super::NodeHandle;

/// A node's buyer jobs: submit to the market, follow, read, cancel ([`JobsHandle::list`]).
#[derive(Clone, Copy)]
pub struct JobsHandle<'a> {
    pub(super) node: &'a NodeHandle,
}

impl<'a> JobsHandle<'a> {
    /// Submits a job to the market and returns its id at once; the job runs in the
    /// background (follow it with [`NodeHandle::events`] or [`JobsHandle::wait`]). The job
    /// is checked first ([`crate::executor::check_offline`]): invalid WGSL, bindings, limits
    /// or inputs fail here, before any network traffic.
    pub async fn submit(&self, sub: Submission) -> Result<ContentId, NodeError> {
        crate::executor::check_offline(&sub.spec, Some(&sub.inputs))
            .map_err(|e| NodeError::InvalidJob(e.to_string()))?;
        check_options(&sub.options)?;
        check_verification(&sub)?;
        let now = Timestamp::now();
        let spec_id = sub.spec.id();
        let mut seed = Vec::with_capacity(80);
        seed.extend_from_slice(&self.node.inner.public.0);
        seed.extend_from_slice(spec_id.as_bytes());
        seed.extend_from_slice(&now.0.to_be_bytes());
        seed.extend_from_slice(&self.node.store(|s| s.next_order_id())?.to_be_bytes());
        let id = ContentId::of(&seed);
        let record = JobRecord {
            id,
            name: sub.spec.name.clone(),
            spec_id,
            submitted_at: now,
            state: JobState::Matching,
            provider: None,
            attempts: Vec::new(),
            receipt: None,
            finished_at: None,
            agreement: None,
            verification: None,
        };
        self.node.store(|s| {
            s.put(JobTree::BuyerJobs, id.as_bytes(), &record)?;
            s.flush()
        })?;
        let ctx = BuyerCtx {
            net: self.node.net(),
            key: self.node.inner.key.clone(),
            network: self.node.inner.network.clone(),
            store: self.node.inner.store.clone(),
            events: self.node.inner.events.clone(),
            settlement: self.node.inner.settlement.clone(),
            placements: self.node.inner.placements.clone(),
            reputation: self.node.inner.reputation.clone(),
            metrics: self.node.inner.metrics.clone(),
        };
        let task = tokio::spawn(BuyerJob::new(ctx, sub, record).run().in_current_span());
        if let Ok(mut tasks) = self.node.inner.tasks.lock() {
            tasks.retain(|_, t| !t.is_finished());
            tasks.insert(id, task.abort_handle());
        }
        Ok(id)
    }

    /// A submitted job's record, from the store.
    pub fn get(&self, id: &ContentId) -> Result<Option<JobRecord>, NodeError> {
        self.node.store(|s| crate::jobs::read_job(s, id))
    }

    /// Every job this node submitted, oldest first.
    pub fn list(&self) -> Result<Vec<JobRecord>, NodeError> {
        self.node.store(crate::jobs::read_jobs)
    }

    /// A finished job's verified outputs and record; `None` while it runs or if it failed
    /// (see [`JobsHandle::get`] for its state).
    pub fn result(&self, id: &ContentId) -> Result<Option<JobResult>, NodeError> {
        self.node.store(|s| crate::jobs::read_result(s, id))
    }

    /// Cancels a submitted job that has not finished: its task stops and the job is recorded
    /// as failed ([`crate::jobs::FailKind::Interrupted`]). A provider already running it may
    /// finish and sign a receipt, which is never countersigned (nothing is owed for it).
    pub fn cancel(&self, id: &ContentId) -> Result<(), NodeError> {
        if let Ok(mut tasks) = self.node.inner.tasks.lock()
            && let Some(t) = tasks.remove(id)
        {
            t.abort();
        }
        let Some(mut rec) = self.get(id)? else {
            return Err(NodeError::UnknownJob(*id));
        };
        if rec.state.is_terminal() {
            return Ok(());
        }
        rec.state = JobState::Failed {
            kind: crate::jobs::FailKind::Interrupted,
            reason: "cancelled".into(),
        };
        rec.finished_at = Some(Timestamp::now());
        self.node.inner.metrics.buyer_job("cancelled");
        self.node.store(|s| {
            s.put(JobTree::BuyerJobs, id.as_bytes(), &rec)?;
            s.push_event(&DurableEvent::JobEnded {
                job: *id,
                state: rec.state.clone(),
                provider: rec.provider,
            })?;
            s.flush()
        })?;
        let _ = self
            .node
            .inner
            .events
            .send(NodeEvent::Job(crate::jobs::JobUpdate {
                job: *id,
                state: rec.state,
                provider: rec.provider,
            }));
        Ok(())
    }

    /// Waits until a submitted job finishes and returns its final record.
    pub async fn wait(&self, id: &ContentId) -> Result<JobRecord, NodeError> {
        let mut events = self.node.events();
        loop {
            match self.get(id)? {
                Some(r) if r.state.is_terminal() => return Ok(r),
                Some(_) => {}
                None => return Err(NodeError::UnknownJob(*id)),
            }
            loop {
                match events.recv().await {
                    Ok(NodeEvent::Job(u)) if u.job == *id && u.state.is_terminal() => break,
                    Ok(_) => {}
                    // Lagged: re-read the store.
                    Err(broadcast::error::RecvError::Lagged(_)) => break,
                    Err(broadcast::error::RecvError::Closed) => return Err(NodeError::Stopped),
                }
            }
        }
    }

    /// What this node, as a buyer, has seen of each provider it ran jobs with (completed,
    /// failed, lied; the score its jobs are ranked by), by key.
    pub fn experience(&self) -> Vec<(PublicKey, crate::jobs::reputation::Experience)> {
        self.node.inner.reputation.all()
    }
}

/// The verification mode is in range and every tolerance names a float output of the spec.
fn check_verification(sub: &Submission) -> Result<(), NodeError> {
    let v = &sub.options.verify;
    v.mode
        .validate()
        .map_err(|e| NodeError::InvalidJob(e.to_string()))?;
    for (name, t) in &v.tolerances {
        let Some(b) = sub
            .spec
            .buffers
            .iter()
            .find(|b| b.output && b.name == *name)
        else {
            return Err(NodeError::InvalidJob(format!(
                "a tolerance names `{name}`, which is not an output of the job"
            )));
        };
        if b.size % 4 != 0 {
            return Err(NodeError::InvalidJob(format!(
                "output `{name}` is compared as f32 but is {} bytes (not a multiple of 4)",
                b.size
            )));
        }
        t.validate()
            .map_err(|e| NodeError::InvalidJob(format!("tolerance of `{name}`: {e}")))?;
    }
    if let Some(t) = &v.tokens {
        for name in [&t.tokens, &t.status, &t.margins] {
            if !sub.spec.buffers.iter().any(|b| b.output && b.name == *name) {
                return Err(NodeError::InvalidJob(format!(
                    "the token comparison names `{name}`, which is not an output of the job"
                )));
            }
        }
        if !(t.max_tie.is_finite() && t.max_tie >= 0.0) {
            return Err(NodeError::InvalidJob(
                "the token comparison's near-tie bound must be a finite number ≥ 0".into(),
            ));
        }
    }
    Ok(())
}

fn check_options(o: &JobOptions) -> Result<(), NodeError> {
    if o.units == 0 || o.max_seconds == 0 {
        return Err(NodeError::InvalidJob(
            "units and max_seconds must be at least 1".into(),
        ));
    }
    Ok(())
}
