//! The buyer side of the job lifecycle: one task per submitted job, talking to the node's task
//! through [`Net`] (see the module docs of [`super`] for the steps).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hashgrid_protocol::exchange::{
    Dispatch, InlineBlob, JobMessage, JobReply, JobStatus, NegotiateReply, Propose, RejectReason,
    inline_budget,
};
use hashgrid_protocol::{
    Agreement, Bid, Bytes, ContentId, Keypair, Msat, Network, PublicKey, Receipt, Signed,
    Timestamp, check_against_agreement, check_outputs,
};
use libp2p::PeerId;
use tokio::sync::broadcast;
use tracing::{debug, info, warn};

use super::blobs::fetch_blob;
use super::reputation::Outcome;
use super::stream::{AbortOnDrop, poll_stream};
use super::{
    Attempt, DEADLINE_GRACE, FailKind, HEDGE_AFTER, HEDGE_MAX, JobRecord, JobState, JobUpdate,
    MAX_PROPOSALS_PER_ATTEMPT, Submission,
};
use crate::event::NodeEvent;
use crate::node::command::{Candidate, Net};
use crate::node::settings::{DIAL_RETRIES, DIAL_RETRY_AFTER, UNREACHABLE};
use crate::store::{JobTree, StoreSlot};

/// What the buyer's task needs from its node.
#[derive(Clone)]
pub(crate) struct BuyerCtx {
    pub(crate) net: Net,
    pub(crate) key: Keypair,
    pub(crate) network: Network,
    pub(crate) store: StoreSlot,
    pub(crate) events: broadcast::Sender<NodeEvent>,
    pub(crate) settlement: std::sync::Arc<crate::settle::Settlement>,
    pub(crate) placements: super::Placements,
    pub(crate) reputation: std::sync::Arc<super::reputation::Reputations>,
    pub(crate) metrics: std::sync::Arc<crate::ops::Metrics>,
}

/// First wait when every provider is busy; doubled per round up to [`CAPACITY_BACKOFF_MAX`].
const CAPACITY_BACKOFF_START: Duration = Duration::from_millis(250);
/// Longest wait between rounds of asking busy providers again.
const CAPACITY_BACKOFF_MAX: Duration = Duration::from_secs(2);

enum Failure {
    /// The provider failed us: try another.
    Provider(String),
    /// The provider's receipt or outputs did not verify: dispute, try another.
    Lie(String),
}

/// What matching needs for every run of one job.
pub(super) struct Matcher {
    bid: Signed<Bid>,
    bid_body: Bid,
    model_blobs: Vec<ContentId>,
    seed: u64,
}

impl Matcher {
    /// The signed bid (and its body), the model blobs providers may hold, and the buyer's
    /// tie-break seed for this job.
    pub(super) fn new(
        bid: Signed<Bid>,
        bid_body: Bid,
        model_blobs: Vec<ContentId>,
        seed: u64,
    ) -> Matcher {
        Matcher {
            bid,
            bid_body,
            model_blobs,
            seed,
        }
    }
}

/// One provider's run of the job whose receipt and outputs verified, not yet countersigned.
pub(super) struct Run {
    pub(super) provider: PublicKey,
    pub(super) peer: PeerId,
    /// The provider's region, from its ask.
    pub(super) region: String,
    pub(super) agreement: hashgrid_protocol::Countersigned<Agreement>,
    pub(super) agreement_id: ContentId,
    pub(super) receipt: Signed<Receipt>,
    pub(super) body: Receipt,
    pub(super) outputs: BTreeMap<String, Vec<u8>>,
    /// Milliseconds from agreement to verified outputs.
    pub(super) ms: u64,
}

pub(crate) struct BuyerJob {
    pub(super) ctx: BuyerCtx,
    /// The submission, its inputs moved to `inputs`.
    pub(super) sub: Submission,
    /// The input blobs, shared with the blob server for each attempt rather than copied.
    inputs: BTreeMap<ContentId, Arc<Vec<u8>>>,
    pub(super) record: JobRecord,
    /// Proposals made so far (each takes the next nonce).
    proposed: u64,
    /// Whether runs stream their buffers to the caller: the first run only, so that a
    /// verifying re-run does not restart what a chat client is being shown.
    pub(super) stream: bool,
}

impl BuyerJob {
    pub(crate) fn new(ctx: BuyerCtx, mut sub: Submission, record: JobRecord) -> BuyerJob {
        let inputs = std::mem::take(&mut sub.inputs);
        BuyerJob {
            ctx,
            sub,
            inputs,
            record,
            proposed: 0,
            stream: true,
        }
    }

    pub(super) fn set(&mut self, state: JobState, provider: Option<PublicKey>) {
        self.record.state = state.clone();
        self.record.provider = provider;
        if state.is_terminal() {
            self.record.finished_at = Some(Timestamp::now());
        }
        // Intermediate states are not flushed: after a crash the job is failed as interrupted
        // either way. Terminal states are flushed by the caller.
        let rec = &self.record;
        if let Err(e) = self
            .ctx
            .store
            .with(|s| s.put(JobTree::BuyerJobs, rec.id.as_bytes(), rec))
        {
            warn!(error = ?e, "cannot store the job's state");
        }
        let _ = self.ctx.events.send(NodeEvent::Job(JobUpdate {
            job: self.record.id,
            state,
            provider,
        }));
    }

    pub(super) fn bid(&self, now: Timestamp) -> Result<Signed<Bid>, String> {
        let o = &self.sub.options;
        let bid = Bid {
            buyer: self.ctx.key.public(),
            order_id: self
                .ctx
                .store
                .with(|s| s.next_order_id())
                .map_err(|e| format!("store: {e:?}"))?,
            seq: now.0,
            units: o.units,
            requirements: o.requirements.clone(),
            max_price: o.max_price.unwrap_or(Msat(u64::MAX)),
            max_seconds: o.max_seconds,
            created_at: now,
            expires_at: now.plus_ms(hashgrid_protocol::limits::MAX_TTL_MS / 24),
            model: o.model.as_ref().map(|m| m.id()),
        };
        let signed = Signed::sign(&self.ctx.key, &self.ctx.network, &bid);
        signed
            .verify(&self.ctx.network)
            .map_err(|e| format!("invalid bid: {e}"))?;
        Ok(signed)
    }

    /// Matches, negotiates and runs the job on one provider not in `used` (preferring
    /// regions other than `avoid_region`), re-matching after failures, and returns the run
    /// once its receipt and outputs verified, not yet countersigned.
    pub(super) async fn find_run(
        &mut self,
        m: &Matcher,
        used: &HashSet<PublicKey>,
        avoid_region: Option<&str>,
    ) -> Result<Run, (FailKind, String)> {
        let max_attempts = self.sub.options.max_attempts.max(1);
        let mut excluded: HashSet<PublicKey> = used.clone();
        let mut failures = 0u32;
        let mut last: Option<(FailKind, String)> = None;
        let mut refusals: Vec<String> = Vec::new();
        // Providers that refused only because they were busy, and until when to wait for one.
        let mut busy: HashSet<PublicKey> = HashSet::new();
        // Providers whose dial failed, and how often each was tried again (only once nobody
        // else is left: a killed site's refused dial must not delay the next ask).
        let mut unreachable: HashMap<PublicKey, u32> = HashMap::new();
        let capacity_deadline = Instant::now() + self.sub.options.wait_for_capacity;
        let mut backoff = CAPACITY_BACKOFF_START;
        loop {
            if failures >= max_attempts {
                let (kind, reason) = last.unwrap_or((FailKind::ProviderFailed, String::new()));
                return Err((
                    kind,
                    format!("{failures} providers failed the job; the last: {reason}"),
                ));
            }
            self.set(JobState::Matching, None);
            let asked = Instant::now();
            let mut cands = self
                .ctx
                .net
                .candidates(crate::node::command::CandidateQuery {
                    bid: m.bid_body.clone(),
                    excluded: excluded.iter().copied().collect(),
                    load: self.ctx.placements.snapshot(),
                    seed: m.seed,
                    inputs: self
                        .inputs
                        .iter()
                        .map(|(id, b)| (*id, b.len() as u64))
                        .collect(),
                    model_blobs: m.model_blobs.clone(),
                })
                .await
                .map_err(|e| (FailKind::Interrupted, e))?;
            if let Some(region) = avoid_region {
                // Independence: another region first, in the book's order otherwise.
                cands.sort_by_key(|c| c.ask.region == region);
            }
            debug!(job = %self.record.id.short(), candidates = cands.len(), ms = asked.elapsed().as_millis() as u64, "candidates");
            if cands.is_empty()
                && last.is_none()
                && !busy.is_empty()
                && busy.len() == refusals.len()
                && Instant::now() + backoff <= capacity_deadline
            {
                // Everyone who could take it is busy: wait, then ask them again.
                debug!(job = %self.record.id.short(), providers = busy.len(), ?backoff, "providers busy; waiting for capacity");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(CAPACITY_BACKOFF_MAX);
                for p in busy.drain() {
                    excluded.remove(&p);
                }
                refusals.clear();
                continue;
            }
            let retry: Vec<PublicKey> = unreachable
                .iter()
                .filter(|(_, tries)| **tries < DIAL_RETRIES)
                .map(|(p, _)| *p)
                .collect();
            if cands.is_empty() && !retry.is_empty() {
                // A dial fails at once while another dial to the same peer is in flight, or
                // while a restarted provider's new address is on its way: try those again.
                let round = retry.iter().map(|p| unreachable[p]).max().unwrap_or(0) + 1;
                tokio::time::sleep(DIAL_RETRY_AFTER * round).await;
                for p in retry {
                    excluded.remove(&p);
                    if let Some(t) = unreachable.get_mut(&p) {
                        *t += 1;
                    }
                }
                continue;
            }
            if cands.is_empty() {
                return Err(match last {
                    Some((kind, reason)) => (
                        kind,
                        format!("no other provider to try after: {reason}"),
                    ),
                    None if refusals.is_empty() => (
                        FailKind::NoMatch,
                        "no ask in the book meets the requirements within the price; raise the price limit, relax the requirements, or wait for offers".into(),
                    ),
                    None => (
                        FailKind::NoMatch,
                        format!("every matching provider refused: {}", refusals.join("; ")),
                    ),
                });
            }
            // Candidates in the book's order, one at a time; one that has not answered
            // within `HEDGE_AFTER` (a site restarting, a handshake stuck behind a busy CPU)
            // gets company: the next candidate is proposed to as well. The first agreement
            // wins; agreements that come in after it are released.
            let mut queue: VecDeque<Candidate> =
                cands.into_iter().take(MAX_PROPOSALS_PER_ATTEMPT).collect();
            // Room for every proposal's one answer: a sender never waits.
            let (tx, mut rx) = tokio::sync::mpsc::channel(MAX_PROPOSALS_PER_ATTEMPT);
            let mut in_flight: Vec<PublicKey> = Vec::new();
            let mut hedge_due = false;
            let mut agreed = None;
            loop {
                if in_flight.is_empty() || in_flight.len() < HEDGE_MAX && hedge_due {
                    let Some(c) = queue.pop_front() else {
                        if in_flight.is_empty() {
                            break;
                        }
                        hedge_due = false;
                        continue;
                    };
                    self.proposed += 1;
                    let proposal = self.proposal(&c, &m.bid);
                    let ctx = self.ctx.clone();
                    let spec_id = self.record.spec_id;
                    let tx = tx.clone();
                    in_flight.push(c.ask.provider);
                    let job = self.record.id;
                    tokio::spawn(async move {
                        let sent = Instant::now();
                        let r = propose(&ctx, &c, proposal, spec_id).await;
                        debug!(job = %job.short(), provider = %c.ask.provider.short(), ms = sent.elapsed().as_millis() as u64, agreed = r.is_ok(), "proposal answered");
                        let _ = tx.send((c, r)).await;
                    });
                }
                let hedge = in_flight.len() < HEDGE_MAX && !queue.is_empty();
                tokio::select! {
                    got = rx.recv() => {
                        let Some((c, r)) = got else { break };
                        if let Some(i) = in_flight.iter().position(|p| *p == c.ask.provider) {
                            in_flight.swap_remove(i);
                        }
                        match r {
                            Ok(a) => {
                                agreed = Some((c, a));
                                break;
                            }
                            Err((is_busy, reason)) => {
                                debug!(provider = %c.ask.provider.short(), %reason, "proposal refused");
                                excluded.insert(c.ask.provider);
                                if reason.starts_with(UNREACHABLE) {
                                    unreachable.entry(c.ask.provider).or_insert(0);
                                }
                                if is_busy {
                                    busy.insert(c.ask.provider);
                                }
                                refusals.push(format!("{}: {reason}", c.ask.provider.short()));
                                self.record.attempts.push(Attempt {
                                    provider: c.ask.provider,
                                    agreement: None,
                                    outcome: format!("refused: {reason}"),
                                });
                                // A refusal frees its slot at once: the next candidate need
                                // not wait for the hedge timer.
                                hedge_due = true;
                            }
                        }
                    }
                    () = tokio::time::sleep(HEDGE_AFTER), if hedge => hedge_due = true,
                }
            }
            if !in_flight.is_empty() {
                // Proposals still out: release whatever agreements they bring back. Their
                // providers were slower than the winner: this job does not go back to them.
                let left = in_flight.len();
                excluded.extend(in_flight);
                let net = self.ctx.net.clone();
                tokio::spawn(async move {
                    for _ in 0..left {
                        let Some((c, r)) = rx.recv().await else {
                            return;
                        };
                        if let Ok(a) = r {
                            let msg = JobMessage::Release { agreement: a.id() };
                            if let Err(e) = net.job(c.peer, msg).await {
                                debug!(provider = %c.ask.provider.short(), %e, "could not release an agreement; it expires by itself");
                            }
                        }
                    }
                });
            }
            let Some((cand, signed)) = agreed else {
                continue;
            };
            let provider = cand.ask.provider;
            let peer = cand.peer;
            let agreement_id = signed.id();
            self.ctx.placements.record(provider);
            let started = Instant::now();
            let outcome = self.run_on(&cand, signed).await;
            let rep = |o| self.ctx.reputation.record(&self.ctx.store, provider, o);
            let (kind, reason) = match outcome {
                Ok(mut run) => {
                    run.ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                    self.note(provider, agreement_id, "verified".into());
                    return Ok(run);
                }
                Err(Failure::Provider(reason)) => {
                    rep(Outcome::Failed);
                    (FailKind::ProviderFailed, reason)
                }
                Err(Failure::Lie(reason)) => {
                    rep(Outcome::Lied);
                    let msg = JobMessage::Dispute {
                        agreement: agreement_id,
                        reason: reason.clone(),
                    };
                    // Best effort: the provider may be gone.
                    let _ = self.ctx.net.job(peer, msg).await;
                    (FailKind::Verification, reason)
                }
            };
            warn!(job = %self.record.id.short(), provider = %provider.short(), %reason, "provider failed; re-matching");
            self.note(provider, agreement_id, reason.clone());
            failures += 1;
            excluded.insert(provider);
            self.ctx.net.mark_down(provider).await;
            last = Some((kind, reason));
        }
    }

    pub(super) fn note(&mut self, provider: PublicKey, agreement: ContentId, outcome: String) {
        if let Some(a) = self
            .record
            .attempts
            .iter_mut()
            .rev()
            .find(|a| a.agreement == Some(agreement))
        {
            a.outcome = outcome;
        } else {
            self.record.attempts.push(Attempt {
                provider,
                agreement: Some(agreement),
                outcome,
            });
        }
    }

    /// The proposal to `c` for this job (a fresh nonce for each proposal of the job).
    fn proposal(&self, c: &Candidate, bid: &Signed<Bid>) -> Propose {
        let nonce = u64::from_le_bytes(*self.record.id.as_bytes().first_chunk().unwrap_or(&[0; 8]))
            ^ self.proposed;
        Propose {
            bid: bid.clone(),
            ask: c.ask.order_ref(),
            units: self.sub.options.units,
            price: c.ask.price,
            max_seconds: self.sub.options.max_seconds,
            spec: self.sub.spec.clone(),
            nonce,
        }
    }

    /// Runs the job under the agreement `signed` with `c`: dispatch, wait, fetch and verify
    /// the outputs against the receipt. Nothing is countersigned yet.
    async fn run_on(&mut self, c: &Candidate, signed: Signed<Agreement>) -> Result<Run, Failure> {
        let provider = c.ask.provider;
        let peer = c.peer;
        let agreement = signed
            .decode_unverified()
            .map_err(|e| Failure::Provider(e.to_string()))?;
        let agreement_id = signed.id();
        let countersigned = signed.countersign(&self.ctx.key, &self.ctx.network);
        self.record.attempts.push(Attempt {
            provider,
            agreement: Some(agreement_id),
            outcome: "agreed".into(),
        });
        self.set(JobState::Agreed, Some(provider));

        // Small inputs inline, the rest served to this provider over /hashgrid/blob/1.
        let mut inline = Vec::new();
        let mut served = Vec::new();
        let manifest_len = self
            .sub
            .options
            .model
            .as_ref()
            .map_or(0, |m| hashgrid_protocol::codec::encode(m).len());
        let mut budget = inline_budget(self.sub.spec.encode().len() + manifest_len);
        for (id, bytes) in &self.inputs {
            if c.warm.contains(id) {
                served.push((*id, bytes.clone()));
            } else if bytes.len() <= budget {
                budget -= bytes.len();
                inline.push(InlineBlob {
                    id: *id,
                    bytes: Bytes(bytes.as_ref().clone()),
                });
            } else {
                served.push((*id, bytes.clone()));
            }
        }
        let served_ids: Vec<ContentId> = served.iter().map(|(i, _)| *i).collect();
        if !served.is_empty() {
            self.ctx.net.serve_blobs(peer, served).await;
        }
        // Unserved when the attempt ends, also if the job is cancelled (its task aborted).
        let _served = self.ctx.net.unserve_on_drop(peer, served_ids);
        let countersigned_agreement = countersigned.clone();
        let result = self
            .dispatch_and_wait(peer, &agreement, agreement_id, countersigned, inline)
            .await;
        let (receipt, inline_outputs) = result?;
        self.set(JobState::Downloading, Some(provider));
        let (body, outputs) = self
            .verify(peer, &agreement, agreement_id, &receipt, inline_outputs)
            .await?;
        Ok(Run {
            provider,
            peer,
            region: c.ask.region.clone(),
            agreement: countersigned_agreement,
            agreement_id,
            receipt,
            body,
            outputs,
            ms: 0,
        })
    }

    /// Accepts `primary` (and `also`, runs that agreed with it): stores the primary's outputs
    /// and the record with its countersigned receipt and the verification report (flushed),
    /// then countersigns every accepted receipt and tells each provider. Runs that a
    /// comparison confirmed count as spot checks passed.
    pub(super) async fn accept(
        &mut self,
        primary: &Run,
        also: &[&Run],
        mut report: Option<super::record::VerificationReport>,
    ) -> Result<(), (FailKind, String)> {
        let accepted: Vec<&Run> = std::iter::once(primary)
            .chain(also.iter().copied())
            .collect();
        let signed: Vec<_> = accepted
            .iter()
            .map(|r| r.receipt.countersign(&self.ctx.key, &self.ctx.network))
            .collect();
        if let Some(rep) = &mut report {
            for (run, cs) in accepted.iter().zip(&signed) {
                if let Some(v) = rep
                    .runs
                    .iter_mut()
                    .find(|v| v.agreement.signed.id() == run.agreement_id)
                {
                    v.countersigned = Some(cs.clone());
                }
            }
        }
        // Still `Downloading` until the provider has the countersignature; a restart finds
        // the receipt and completes the record.
        self.record.provider = Some(primary.provider);
        self.record.receipt = Some(signed[0].clone());
        self.record.agreement = Some(primary.agreement.clone());
        self.record.verification = report;
        let rec = &self.record;
        let res = self.ctx.store.with(|store| {
            for o in &primary.body.outputs {
                if let Some(bytes) = primary.outputs.get(&o.name) {
                    store.put_blob(&o.id, bytes)?;
                }
            }
            store.put(JobTree::BuyerJobs, rec.id.as_bytes(), rec)?;
            store.flush()
        });
        if let Err(e) = res {
            self.record.receipt = None;
            self.record.agreement = None;
            let why = e.map_or("the node stopped".to_string(), |e| e.to_string());
            return Err((FailKind::Interrupted, format!("buyer store: {why}")));
        }
        let checked = accepted.len() > 1;
        for (run, cs) in accepted.iter().zip(signed) {
            self.ctx.settlement.purchased(&run.body);
            match self
                .ctx
                .net
                .job(run.peer, JobMessage::Countersign(cs))
                .await
            {
                Ok(JobReply::Ack) => {}
                other => {
                    // The receipt is ours either way; the provider can ask again (settlement).
                    debug!(?other, "provider did not acknowledge the countersignature");
                }
            }
            let outcome = Outcome::Completed {
                ms: run.ms,
                checked,
            };
            self.ctx
                .reputation
                .record(&self.ctx.store, run.provider, outcome);
            self.note(run.provider, run.agreement_id, "done".into());
            info!(job = %self.record.id.short(), provider = %run.provider.short(), charge_msat = run.body.charge.0, "job done, receipt countersigned");
            self.ctx.metrics.spent(run.body.charge.0);
        }
        Ok(())
    }

    async fn dispatch_and_wait(
        &mut self,
        peer: PeerId,
        agreement: &Agreement,
        agreement_id: ContentId,
        countersigned: hashgrid_protocol::Countersigned<Agreement>,
        inline: Vec<InlineBlob>,
    ) -> Result<(Signed<Receipt>, Vec<InlineBlob>), Failure> {
        let provider = agreement.provider;
        self.set(JobState::Uploading, Some(provider));
        let dispatch = Dispatch {
            job_id: self.record.id,
            agreement: countersigned,
            spec: self.sub.spec.clone(),
            inputs: inline,
            model: self.sub.options.model.clone(),
        };
        let deadline =
            Instant::now() + Duration::from_secs(u64::from(agreement.max_seconds)) + DEADLINE_GRACE;
        let mut reply = self
            .ctx
            .net
            .job(peer, JobMessage::Dispatch(Box::new(dispatch)))
            .await
            .map_err(|e| Failure::Provider(format!("dispatch: {e}")))?;
        let mut errors = 0u32;
        // Streamed buffers are polled beside the status; the poller ends with the attempt.
        let streams = super::network_streams(&self.sub.spec).filter(|_| self.stream);
        let _stream = streams.map(|names| {
            AbortOnDrop(tokio::spawn(poll_stream(
                self.ctx.net.clone(),
                self.ctx.events.clone(),
                peer,
                agreement_id,
                self.record.id,
                provider,
                names,
            )))
        });
        loop {
            let status = match reply {
                JobReply::Status(s) => s,
                JobReply::Refused(r) => return Err(Failure::Provider(format!("refused: {r}"))),
                JobReply::Ack | JobReply::Stream(_) => {
                    return Err(Failure::Provider("unexpected reply".into()));
                }
            };
            let seen = status.phase();
            match status {
                JobStatus::Queued => self.set(JobState::Queued, Some(provider)),
                JobStatus::Fetching => self.set(JobState::Uploading, Some(provider)),
                JobStatus::Running => self.set(JobState::Running, Some(provider)),
                JobStatus::Done { receipt, outputs } => return Ok((receipt, outputs)),
                JobStatus::Failed { reason } => {
                    return Err(Failure::Provider(format!("the job failed: {reason}")));
                }
                JobStatus::Unknown => {
                    return Err(Failure::Provider(
                        "the provider lost the job (it restarted)".into(),
                    ));
                }
            }
            loop {
                if Instant::now() > deadline {
                    return Err(Failure::Provider(format!(
                        "no result within the agreed {} s",
                        agreement.max_seconds
                    )));
                }
                let msg = JobMessage::Await {
                    agreement: agreement_id,
                    seen,
                };
                match self.ctx.net.job(peer, msg).await {
                    Ok(r) => {
                        reply = r;
                        errors = 0;
                        break;
                    }
                    Err(e) => {
                        errors += 1;
                        if errors >= 3 {
                            return Err(Failure::Provider(format!("provider unreachable: {e}")));
                        }
                        tokio::time::sleep(Duration::from_millis(200 * u64::from(errors))).await;
                    }
                }
            }
        }
    }

    /// Checks the receipt against the agreement and the outputs against the receipt.
    async fn verify(
        &self,
        peer: PeerId,
        agreement: &Agreement,
        agreement_id: ContentId,
        receipt: &Signed<Receipt>,
        inline: Vec<InlineBlob>,
    ) -> Result<(Receipt, BTreeMap<String, Vec<u8>>), Failure> {
        let lie = |s: String| Failure::Lie(s);
        let r = receipt
            .verify(&self.ctx.network)
            .map_err(|e| lie(format!("receipt signature: {e}")))?;
        if r.job_id != self.record.id {
            return Err(lie("the receipt names another job".into()));
        }
        check_against_agreement(&r, agreement_id, agreement).map_err(|e| lie(e.to_string()))?;
        if r.inputs != self.sub.spec.input_ids() {
            return Err(lie("the receipt's inputs are not the job's".into()));
        }
        let expected: Vec<(&str, u64)> = self
            .sub
            .spec
            .buffers
            .iter()
            .filter(|b| b.output)
            .map(|b| (b.name.as_str(), b.size))
            .collect();
        let named: Vec<(&str, u64)> = r
            .outputs
            .iter()
            .map(|o| (o.name.as_str(), o.bytes))
            .collect();
        if named != expected {
            return Err(lie(format!(
                "the receipt's outputs {named:?} are not the job's outputs {expected:?}"
            )));
        }
        let mut by_id: BTreeMap<ContentId, Vec<u8>> =
            inline.into_iter().map(|b| (b.id, b.bytes.0)).collect();
        let mut outputs = BTreeMap::new();
        for o in &r.outputs {
            let bytes = match by_id.remove(&o.id) {
                Some(b) => b,
                None => fetch_blob(&self.ctx.net, peer, o.id, o.bytes)
                    .await
                    .map_err(|e| lie(format!("output `{}`: {e}", o.name)))?,
            };
            outputs.insert(o.name.clone(), bytes);
        }
        check_outputs(&r, &outputs).map_err(|e| lie(e.to_string()))?;
        Ok((r, outputs))
    }
}

/// Sends `propose` to `c`; a refusal says whether the provider was only busy (no free units).
async fn propose(
    ctx: &BuyerCtx,
    c: &Candidate,
    propose: Propose,
    spec_id: ContentId,
) -> Result<Signed<Agreement>, (bool, String)> {
    let want = (
        propose.ask,
        propose.units,
        propose.price,
        propose.max_seconds,
        propose.nonce,
    );
    match ctx
        .net
        .negotiate(c.peer, c.addrs.clone(), propose)
        .await
        .map_err(|e| (false, e))?
    {
        NegotiateReply::Reject(r) => Err((
            r.reason == RejectReason::NoCapacity,
            format!("{:?}: {}", r.reason, r.detail),
        )),
        NegotiateReply::Agreed(signed) => {
            let a = signed
                .verify(&ctx.network)
                .map_err(|e| (false, format!("agreement does not verify: {e}")))?;
            let ok = a.provider == c.ask.provider
                && a.buyer == ctx.key.public()
                && (a.ask, a.units, a.price, a.max_seconds, a.nonce) == want
                && a.spec_id == spec_id
                && hashgrid_market::max_charge(a.price, a.units, a.max_seconds)
                    == Some(a.max_charge);
            if !ok {
                return Err((
                    false,
                    "the agreement's terms differ from the proposal".into(),
                ));
            }
            Ok(signed)
        }
    }
}
