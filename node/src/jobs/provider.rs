//! The provider side of the job lifecycle, driven by the provider service on its own thread
//! (`super::service`): proposals, dispatches, long polls, receipts and countersignatures. Jobs run in spawned tasks (`super::run`) that
//! report back over [`Internal`] messages; blob transfers are in `super::blobs`.
//!
//! Over 800 lines on purpose: `Provider` is one state machine (reservations, active jobs,
//! parked polls, the receipt chain) and its methods share those tables; the tests of its
//! negotiation rules sit at the end.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use hashgrid_market::charge::{charge_us, max_charge};
use hashgrid_protocol::exchange::{
    BlobReply, BlobRequest, Dispatch, InlineBlob, JobPhase, JobReply, JobStatus, MAX_INLINE_BYTES,
    NegotiateReply, Propose, Reject, RejectReason, StreamChunk, StreamedBytes, inline_budget,
};
use hashgrid_protocol::{
    Agreement, Ask, Bytes, ContentId, Countersigned, Keypair, Network, OutputRecord, PublicKey,
    Receipt, Signed, Timestamp,
};
use libp2p::PeerId;
use libp2p::request_response::ResponseChannel;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc};
use tracing::{debug, info, warn};

use super::blobs::chunk_of;
use super::cache::InputCache;
pub(crate) use super::run::Internal;
use super::run::RunTask;
use super::{AGREEMENT_TTL_MS, ProviderEvent};
use crate::event::{DurableEvent, NodeEvent};
use crate::executor::{Executor, JobOutput};
use crate::network::AWAIT_HOLD;
use crate::node::command::Net;
use crate::ops::activity::JobChange;
use crate::store::{JobTree, Store, StoreError};

/// An accepted job as the provider's store keeps it (by agreement id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ProviderJobRecord {
    /// The agreement id.
    pub agreement_id: ContentId,
    /// The countersigned agreement.
    pub agreement: Countersigned<Agreement>,
    /// The buyer's job id.
    pub job_id: ContentId,
    /// Where the job is.
    pub phase: JobPhase,
    /// Position of its receipt in this provider's chain, once signed.
    pub receipt_seq: Option<u64>,
    /// Output blob ids (kept until the buyer countersigns).
    pub outputs: Vec<ContentId>,
    /// Why it failed, or the buyer's dispute.
    pub failure: Option<String>,
    /// Whether the buyer countersigned the receipt.
    pub countersigned: bool,
}

struct Reservation {
    units: u32,
    expires_at: Timestamp,
    /// Who may dispatch or release it.
    buyer: PublicKey,
}

struct Active {
    units: u32,
    agreement: Agreement,
    job_id: ContentId,
    inputs: Vec<ContentId>,
    phase: JobPhase,
    /// The latest streamed buffers (iterations 0: none yet).
    stream: StreamChunk,
    /// Whether the job names a model (its loop iterations are generated tokens).
    model: bool,
}

struct Waiter {
    channel: ResponseChannel<JobReply>,
    seen: JobPhase,
    deadline: Instant,
}

/// A parked [`JobMessage::Stream`](hashgrid_protocol::exchange::JobMessage::Stream) long poll.
struct StreamWaiter {
    channel: ResponseChannel<JobReply>,
    seen: u32,
    deadline: Instant,
}

/// What a provider runs jobs with: its executor (none: it sells nothing), its input cache, and
/// the metrics it reports to.
pub(crate) struct Runs {
    pub(crate) executor: Option<Executor>,
    pub(crate) inputs: Arc<InputCache>,
    pub(crate) metrics: Arc<crate::ops::Metrics>,
}

/// A reply to send on a parked or fresh job request channel.
pub(crate) type Answer = (ResponseChannel<JobReply>, JobReply);

pub(crate) struct Provider {
    executor: Option<Executor>,
    inputs: Arc<InputCache>,
    key: Keypair,
    network: Network,
    store: Store,
    events: broadcast::Sender<NodeEvent>,
    internal: mpsc::Sender<Internal>,
    units_total: u32,
    reservations: HashMap<ContentId, Reservation>,
    active: HashMap<ContentId, Active>,
    waiters: HashMap<ContentId, Vec<Waiter>>,
    stream_waiters: HashMap<ContentId, Vec<StreamWaiter>>,
    /// Output blobs not yet countersigned, and the peer allowed to fetch them.
    outputs_for: super::BlobHolders,
    next_seq: u64,
    prev: Option<ContentId>,
    /// Settlement: credit checks before agreements, accruals after countersignatures.
    pub(crate) settlement: Option<std::sync::Arc<crate::settle::Settlement>>,
    /// Counters and gauges for Prometheus.
    metrics: Arc<crate::ops::Metrics>,
    #[cfg(feature = "testing")]
    pub(crate) lie: Option<super::Lie>,
}

/// How a provider event changes the dashboard's list of jobs.
fn activity_change(ev: &ProviderEvent) -> Option<(&ContentId, JobChange)> {
    let state = |state| JobChange {
        state,
        ..Default::default()
    };
    Some(match ev {
        ProviderEvent::Agreed { agreement, buyer } => (
            agreement,
            JobChange {
                buyer: Some(*buyer),
                ..state("agreed")
            },
        ),
        ProviderEvent::Accepted { agreement } => (agreement, state("accepted")),
        ProviderEvent::InputsReady {
            agreement,
            fetched_bytes,
            cached_bytes,
        } => (
            agreement,
            JobChange {
                inputs: Some((*fetched_bytes, *cached_bytes)),
                ..Default::default()
            },
        ),
        ProviderEvent::Running { agreement } => (agreement, state("running")),
        ProviderEvent::Finished {
            agreement, charge, ..
        } => (
            agreement,
            JobChange {
                charge_msat: Some(charge.0),
                ..state("done")
            },
        ),
        ProviderEvent::Failed { agreement, reason } => (
            agreement,
            JobChange {
                failure: Some(reason.clone()),
                ..state("failed")
            },
        ),
        ProviderEvent::Countersigned { agreement, .. } => (agreement, state("countersigned")),
        ProviderEvent::Disputed { agreement, reason } => (
            agreement,
            JobChange {
                failure: Some(reason.clone()),
                ..state("disputed")
            },
        ),
        _ => return None,
    })
}

fn reject(reason: RejectReason, detail: impl Into<String>) -> NegotiateReply {
    NegotiateReply::Reject(Reject {
        reason,
        detail: detail.into(),
    })
}

impl Provider {
    /// Loads the receipt chain head and fails jobs a crash interrupted.
    pub(crate) fn new(
        runs: Runs,
        key: Keypair,
        network: Network,
        store: Store,
        events: broadcast::Sender<NodeEvent>,
        internal: mpsc::Sender<Internal>,
        units_total: u32,
    ) -> Result<Provider, StoreError> {
        let (next_seq, prev) = match store.last::<Signed<Receipt>>(JobTree::Receipts)? {
            Some(last) => {
                let r = last.decode_unverified().map_err(|e| StoreError::Corrupt {
                    tree: "receipts",
                    reason: e.to_string(),
                })?;
                (r.chain_seq + 1, Some(last.id()))
            }
            None => (0, None),
        };
        let mut outputs_for = super::BlobHolders::default();
        let mut failed = 0usize;
        for mut rec in store.all::<ProviderJobRecord>(JobTree::ProviderJobs)? {
            match rec.phase {
                JobPhase::Done => {
                    if !rec.countersigned {
                        let buyer = rec.agreement.signed.decode_unverified().map(|a| a.buyer);
                        if let Some(b) = buyer.ok().and_then(|b| super::peer_of(&b)) {
                            for o in &rec.outputs {
                                outputs_for.add(*o, b);
                            }
                        }
                    }
                }
                JobPhase::Failed | JobPhase::Unknown => {}
                JobPhase::Queued | JobPhase::Fetching | JobPhase::Running => {
                    rec.phase = JobPhase::Failed;
                    rec.failure = Some("the provider restarted while the job was running".into());
                    store.put(JobTree::ProviderJobs, rec.agreement_id.as_bytes(), &rec)?;
                    failed += 1;
                }
            }
        }
        if failed > 0 {
            store.flush()?;
            warn!(
                jobs = failed,
                "failed jobs interrupted by the last shutdown; their buyers re-match them"
            );
        }
        if next_seq > 0 {
            info!(receipts = next_seq, "receipt chain loaded");
        }
        Ok(Provider {
            executor: runs.executor,
            inputs: runs.inputs,
            key,
            network,
            store,
            events,
            internal,
            units_total,
            reservations: HashMap::new(),
            active: HashMap::new(),
            waiters: HashMap::new(),
            stream_waiters: HashMap::new(),
            outputs_for,
            next_seq,
            prev,
            settlement: None,
            metrics: runs.metrics,
            #[cfg(feature = "testing")]
            lie: None,
        })
        .inspect(Provider::publish_state)
    }

    fn emit(&self, ev: ProviderEvent) {
        if let Some((id, change)) = activity_change(&ev) {
            self.metrics.activity().update(id, change);
        }
        let _ = self.events.send(NodeEvent::Provider(ev));
        self.publish_state();
    }

    /// Sets the gauges of jobs by state and busy units (after every change, which every
    /// change reports through [`Provider::emit`]).
    fn publish_state(&self) {
        let mut counts = [
            ("reserved", self.reservations.len() as u64),
            ("accepted", 0),
            ("fetching", 0),
            ("running", 0),
        ];
        for a in self.active.values() {
            let i = match a.phase {
                JobPhase::Fetching => 2,
                JobPhase::Running => 3,
                _ => 1,
            };
            counts[i].1 += 1;
        }
        let total = u64::from(self.units_total);
        let busy = total - u64::from(self.free_units()).min(total);
        self.metrics.provider_state(&counts, busy, total);
    }

    fn free_units(&self) -> u32 {
        let used: u64 = self
            .reservations
            .values()
            .map(|r| u64::from(r.units))
            .chain(self.active.values().map(|a| u64::from(a.units)))
            .sum();
        u32::try_from(u64::from(self.units_total).saturating_sub(used)).unwrap_or(0)
    }

    /// Answers a proposal. `ask` is this node's live ask named by the proposal, if any.
    pub(crate) fn on_propose(
        &mut self,
        peer: PeerId,
        p: Propose,
        ask: Option<Ask>,
    ) -> NegotiateReply {
        let reply = self.negotiate(peer, &p, ask);
        match &reply {
            NegotiateReply::Reject(r) => {
                debug!(%peer, reason = ?r.reason, detail = %r.detail, "proposal rejected");
                self.metrics.proposal(Some(&r.reason));
                if let Ok(b) = p.bid.decode_unverified() {
                    self.emit(ProviderEvent::Rejected {
                        buyer: b.buyer,
                        reason: r.detail.clone(),
                    });
                }
            }
            NegotiateReply::Agreed(s) => {
                self.metrics.proposal(None);
                if let Ok(a) = s.decode_unverified() {
                    self.emit(ProviderEvent::Agreed {
                        agreement: s.id(),
                        buyer: a.buyer,
                    });
                }
            }
        }
        reply
    }

    fn negotiate(&mut self, peer: PeerId, p: &Propose, ask: Option<Ask>) -> NegotiateReply {
        let Some(exec) = &self.executor else {
            return reject(RejectReason::NotAProvider, "this node sells no GPU time");
        };
        let now = Timestamp::now();
        let bid = match p.bid.verify(&self.network) {
            Ok(b) => b,
            Err(e) => return reject(RejectReason::BadBid, format!("bid: {e}")),
        };
        if super::peer_of(&bid.buyer) != Some(peer) {
            return reject(
                RejectReason::BadBid,
                "the bid is not signed by the requesting peer",
            );
        }
        if bid.expires_at <= now {
            return reject(RejectReason::BadBid, "the bid has expired");
        }
        if let Some(s) = &self.settlement
            && let Err(denied) = s.check_credit(&bid.buyer)
        {
            return reject(RejectReason::CreditLimit, denied.to_string());
        }
        let Some(ask) = ask.filter(|a| a.order_ref() == p.ask) else {
            return reject(
                RejectReason::UnknownAsk,
                format!(
                    "order {} is not a live ask of this provider",
                    p.ask.order_id
                ),
            );
        };
        if p.price != ask.price || p.price > bid.max_price {
            return reject(
                RejectReason::Terms,
                format!(
                    "price {} must be the ask's {} and within the bid's {}",
                    p.price, ask.price, bid.max_price
                ),
            );
        }
        if p.units == 0 || p.units > ask.units || p.units > bid.units {
            return reject(
                RejectReason::Terms,
                format!("{} units: not within the ask and bid", p.units),
            );
        }
        if p.max_seconds == 0 || p.max_seconds > ask.max_seconds || p.max_seconds > bid.max_seconds
        {
            return reject(
                RejectReason::Terms,
                format!(
                    "{} s is not within the ask's {} s and the bid",
                    p.max_seconds, ask.max_seconds
                ),
            );
        }
        if !bid.requirements.accepts(&ask.gpu, &ask.region) {
            return reject(
                RejectReason::Terms,
                "the bid's requirements do not accept this GPU",
            );
        }
        let free = self.free_units();
        if p.units > free {
            return reject(
                RejectReason::NoCapacity,
                format!("{} units wanted, {free} free", p.units),
            );
        }
        if let Err(e) = exec.check_spec(&p.spec) {
            return reject(RejectReason::InvalidJob, e.to_string());
        }
        let Some(cap) = max_charge(p.price, p.units, p.max_seconds) else {
            return reject(RejectReason::Terms, "the maximum charge overflows");
        };
        let agreement = Agreement {
            buyer: bid.buyer,
            provider: self.key.public(),
            bid: bid.order_ref(),
            ask: p.ask,
            units: p.units,
            price: p.price,
            max_seconds: p.max_seconds,
            max_charge: cap,
            spec_id: p.spec.id(),
            nonce: p.nonce,
            created_at: now,
            expires_at: now.plus_ms(AGREEMENT_TTL_MS),
        };
        let signed = Signed::sign(&self.key, &self.network, &agreement);
        self.reservations.insert(
            signed.id(),
            Reservation {
                units: p.units,
                expires_at: agreement.expires_at,
                buyer: agreement.buyer,
            },
        );
        NegotiateReply::Agreed(signed)
    }

    /// Accepts a dispatch: checks it, persists the job (flushed) and starts it.
    pub(crate) fn on_dispatch(&mut self, peer: PeerId, d: Dispatch, cmd: &Net) -> JobReply {
        match self.dispatch(peer, d, cmd) {
            Ok(reply) => reply,
            Err(reason) => {
                debug!(%peer, %reason, "dispatch refused");
                JobReply::Refused(reason)
            }
        }
    }

    fn dispatch(&mut self, peer: PeerId, d: Dispatch, cmd: &Net) -> Result<JobReply, String> {
        let Some(exec) = self.executor.clone() else {
            return Err("this node sells no GPU time".into());
        };
        let agreement = d
            .agreement
            .verify(&self.network)
            .map_err(|e| format!("agreement: {e}"))?;
        let id = d.agreement.id();
        if agreement.provider != self.key.public() {
            return Err("the agreement is not with this provider".into());
        }
        if super::peer_of(&agreement.buyer) != Some(peer) {
            return Err("the agreement's buyer is not the requesting peer".into());
        }
        if self.active.contains_key(&id) || self.record(&id).ok().flatten().is_some() {
            // A repeated dispatch (the buyer did not see our answer): report the status.
            return Ok(JobReply::Status(self.status(&id)));
        }
        let Some(res) = self.reservations.get(&id) else {
            return Err("unknown or expired agreement; propose again".into());
        };
        if res.expires_at <= Timestamp::now() {
            return Err("the agreement expired before dispatch; propose again".into());
        }
        if d.spec.id() != agreement.spec_id {
            return Err("the spec is not the one agreed".into());
        }
        if let Some(m) = &d.model {
            m.check_against(&d.spec)
                .map_err(|e| format!("the model manifest: {e}"))?;
        }
        let inline_total: usize = d.inputs.iter().map(|b| b.bytes.0.len()).sum();
        if inline_total > MAX_INLINE_BYTES {
            return Err(format!(
                "{inline_total} inline bytes is over {MAX_INLINE_BYTES}"
            ));
        }
        let record = ProviderJobRecord {
            agreement_id: id,
            agreement: d.agreement.clone(),
            job_id: d.job_id,
            phase: JobPhase::Queued,
            receipt_seq: None,
            outputs: Vec::new(),
            failure: None,
            countersigned: false,
        };
        self.store
            .put(JobTree::ProviderJobs, id.as_bytes(), &record)
            .and_then(|()| self.store.flush())
            .map_err(|e| format!("provider store: {e}"))?;
        let units = res.units;
        self.reservations.remove(&id);
        self.active.insert(
            id,
            Active {
                units,
                agreement: agreement.clone(),
                job_id: d.job_id,
                inputs: d.spec.input_ids(),
                model: d.model.is_some(),
                phase: JobPhase::Queued,
                stream: StreamChunk {
                    iterations: 0,
                    buffers: Vec::new(),
                    finished: false,
                },
            },
        );
        self.emit(ProviderEvent::Accepted { agreement: id });
        let task = RunTask {
            exec,
            cache: self.inputs.clone(),
            net: cmd.clone(),
            internal: self.internal.clone(),
            agreement: id,
            buyer: peer,
            spec: d.spec,
            inline: d.inputs,
            model: d.model,
        };
        // A span per job: every line its run logs names the agreement and the buyer.
        let span = tracing::info_span!("job", agreement = %id.short(), buyer = %peer);
        tokio::spawn(tracing::Instrument::instrument(task.run(), span));
        Ok(JobReply::Status(JobStatus::Queued))
    }

    fn record(&self, id: &ContentId) -> Result<Option<ProviderJobRecord>, StoreError> {
        self.store.get(JobTree::ProviderJobs, id.as_bytes())
    }

    /// The status of a job, from memory or the store.
    pub(crate) fn status(&self, id: &ContentId) -> JobStatus {
        if let Some(a) = self.active.get(id) {
            return match a.phase {
                JobPhase::Fetching => JobStatus::Fetching,
                JobPhase::Running => JobStatus::Running,
                _ => JobStatus::Queued,
            };
        }
        let rec = match self.record(id) {
            Ok(Some(r)) => r,
            Ok(None) => return JobStatus::Unknown,
            Err(e) => {
                warn!(error = %e, "cannot read a job record");
                return JobStatus::Unknown;
            }
        };
        match rec.phase {
            JobPhase::Done => match self.done_status(&rec) {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %e, "cannot read a receipt");
                    JobStatus::Unknown
                }
            },
            JobPhase::Failed => JobStatus::Failed {
                reason: rec.failure.unwrap_or_else(|| "failed".into()),
            },
            _ => JobStatus::Unknown,
        }
    }

    fn done_status(&self, rec: &ProviderJobRecord) -> Result<JobStatus, StoreError> {
        let seq = rec.receipt_seq.unwrap_or(u64::MAX);
        let Some(receipt) = self
            .store
            .get::<Signed<Receipt>>(JobTree::Receipts, &seq.to_be_bytes())?
        else {
            return Ok(JobStatus::Unknown);
        };
        let mut outputs = Vec::new();
        let mut inline = 0usize;
        let budget = inline_budget(receipt.body_bytes().len());
        if !rec.countersigned {
            for id in &rec.outputs {
                if let Some(bytes) = self.store.blob(id)?
                    && inline + bytes.len() <= budget
                {
                    inline += bytes.len();
                    outputs.push(InlineBlob {
                        id: *id,
                        bytes: Bytes(bytes.to_vec()),
                    });
                }
            }
        }
        Ok(JobStatus::Done { receipt, outputs })
    }

    fn buyer_of(&self, id: &ContentId) -> Option<PublicKey> {
        if let Some(a) = self.active.get(id) {
            return Some(a.agreement.buyer);
        }
        let rec = self.record(id).ok().flatten()?;
        rec.agreement
            .signed
            .decode_unverified()
            .ok()
            .map(|a| a.buyer)
    }

    /// A long poll: answered now if the phase differs from `seen`, else parked.
    pub(crate) fn on_await(
        &mut self,
        peer: PeerId,
        id: ContentId,
        seen: JobPhase,
        channel: ResponseChannel<JobReply>,
    ) -> Option<Answer> {
        if self.buyer_of(&id).and_then(|b| super::peer_of(&b)) != Some(peer) {
            return Some((channel, JobReply::Status(JobStatus::Unknown)));
        }
        let status = self.status(&id);
        if status.phase() != seen || status.phase() == JobPhase::Unknown {
            return Some((channel, JobReply::Status(status)));
        }
        self.waiters.entry(id).or_default().push(Waiter {
            channel,
            seen,
            deadline: Instant::now() + AWAIT_HOLD,
        });
        None
    }

    /// The stream as of now: the latest chunk while the job is active, else finished.
    fn stream_chunk(&self, id: &ContentId) -> StreamChunk {
        match self.active.get(id) {
            Some(a) => a.stream.clone(),
            None => StreamChunk {
                iterations: 0,
                buffers: Vec::new(),
                finished: true,
            },
        }
    }

    /// A stream long poll: answered now if there is a check past `seen` or the job is not
    /// running, else parked until the next check (or [`AWAIT_HOLD`]).
    pub(crate) fn on_stream(
        &mut self,
        peer: PeerId,
        id: ContentId,
        seen: u32,
        channel: ResponseChannel<JobReply>,
    ) -> Option<Answer> {
        if self.buyer_of(&id).and_then(|b| super::peer_of(&b)) != Some(peer) {
            return Some((channel, JobReply::Refused("no such job of yours".into())));
        }
        let chunk = self.stream_chunk(&id);
        if chunk.finished || chunk.iterations > seen {
            return Some((channel, JobReply::Stream(chunk)));
        }
        let parked = self.stream_waiters.entry(id).or_default();
        if parked.len() >= MAX_STREAM_WAITERS {
            let chunk = self.stream_chunk(&id);
            return Some((channel, JobReply::Stream(chunk)));
        }
        parked.push(StreamWaiter {
            channel,
            seen,
            deadline: Instant::now() + AWAIT_HOLD,
        });
        None
    }

    /// Answers parked stream polls that the current chunk satisfies (all of them once
    /// the job is no longer active).
    fn wake_streams(&mut self, id: &ContentId) -> Vec<Answer> {
        let Some(ws) = self.stream_waiters.remove(id) else {
            return Vec::new();
        };
        let chunk = self.stream_chunk(id);
        let mut out = Vec::new();
        let mut keep = Vec::new();
        for w in ws {
            if chunk.finished || chunk.iterations > w.seen {
                out.push((w.channel, JobReply::Stream(chunk.clone())));
            } else {
                keep.push(w);
            }
        }
        if !keep.is_empty() {
            self.stream_waiters.insert(*id, keep);
        }
        out
    }

    fn wake(&mut self, id: &ContentId) -> Vec<Answer> {
        let mut streams = self.wake_streams(id);
        let Some(ws) = self.waiters.remove(id) else {
            return streams;
        };
        let status = self.status(id);
        let mut out = Vec::new();
        let mut keep = Vec::new();
        for w in ws {
            if status.phase() != w.seen {
                out.push((w.channel, JobReply::Status(status.clone())));
            } else {
                keep.push(w);
            }
        }
        if !keep.is_empty() {
            self.waiters.insert(*id, keep);
        }
        out.append(&mut streams);
        out
    }

    /// Answers long polls held past [`AWAIT_HOLD`] and releases expired reservations.
    pub(crate) fn tick(&mut self) -> Vec<Answer> {
        let now = Timestamp::now();
        self.reservations.retain(|_, r| r.expires_at > now);
        let instant = Instant::now();
        let due: Vec<ContentId> = self
            .waiters
            .iter()
            .filter(|(_, ws)| ws.iter().any(|w| w.deadline <= instant))
            .map(|(id, _)| *id)
            .collect();
        let mut out = Vec::new();
        for id in due {
            let status = self.status(&id);
            let Some(ws) = self.waiters.remove(&id) else {
                continue;
            };
            let (now_due, keep): (Vec<Waiter>, Vec<Waiter>) =
                ws.into_iter().partition(|w| w.deadline <= instant);
            for w in now_due {
                out.push((w.channel, JobReply::Status(status.clone())));
            }
            if !keep.is_empty() {
                self.waiters.insert(id, keep);
            }
        }
        let due: Vec<ContentId> = self
            .stream_waiters
            .iter()
            .filter(|(_, ws)| ws.iter().any(|w| w.deadline <= instant))
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            let chunk = self.stream_chunk(&id);
            let Some(ws) = self.stream_waiters.remove(&id) else {
                continue;
            };
            let (now_due, keep): (Vec<StreamWaiter>, Vec<StreamWaiter>) =
                ws.into_iter().partition(|w| w.deadline <= instant);
            for w in now_due {
                out.push((w.channel, JobReply::Stream(chunk.clone())));
            }
            if !keep.is_empty() {
                self.stream_waiters.insert(id, keep);
            }
        }
        out
    }

    /// A job task reported progress or its end.
    pub(crate) fn on_internal(&mut self, msg: Internal) -> Vec<Answer> {
        match msg {
            Internal::Phase(id, phase) => {
                if let Some(a) = self.active.get_mut(&id) {
                    a.phase = phase;
                    if phase == JobPhase::Running {
                        self.emit(ProviderEvent::Running { agreement: id });
                    }
                }
                self.wake(&id)
            }
            Internal::Inputs(agreement, s) => {
                let (fetched_bytes, cached_bytes) = (s.fetched_bytes, s.cached_bytes);
                info!(agreement = %agreement.short(), fetched_bytes, cached_bytes, "inputs ready");
                self.metrics
                    .inputs(s.cached_blobs, cached_bytes, s.fetched_blobs, fetched_bytes);
                self.emit(ProviderEvent::InputsReady {
                    agreement,
                    fetched_bytes,
                    cached_bytes,
                });
                Vec::new()
            }
            Internal::Stream(id, update) => {
                let Some(a) = self.active.get_mut(&id) else {
                    return Vec::new();
                };
                if update.iterations <= a.stream.iterations {
                    return Vec::new();
                }
                a.stream = StreamChunk {
                    iterations: update.iterations,
                    buffers: update
                        .buffers
                        .into_iter()
                        .map(|b| StreamedBytes {
                            name: b.name,
                            bytes: Bytes(b.bytes),
                        })
                        .collect(),
                    finished: false,
                };
                self.wake_streams(&id)
            }
            Internal::Finished {
                agreement,
                started_at,
                finished_at,
                result,
            } => {
                let Some(active) = self.active.remove(&agreement) else {
                    return Vec::new();
                };
                let outcome = match result {
                    Ok(out) => self.sign_receipt(agreement, &active, started_at, finished_at, out),
                    Err(e) => Err(e),
                };
                if let Err(reason) = outcome {
                    warn!(agreement = %agreement.short(), %reason, "job failed");
                    if let Err(e) = self.fail(agreement, &reason) {
                        warn!(error = %e, "cannot record a failed job");
                    }
                    self.metrics.provider_job_failed(false);
                    self.emit(ProviderEvent::Failed { agreement, reason });
                }
                self.wake(&agreement)
            }
        }
    }

    fn fail(&self, id: ContentId, reason: &str) -> Result<(), StoreError> {
        if let Some(mut rec) = self.record(&id)? {
            rec.phase = JobPhase::Failed;
            rec.failure = Some(reason.to_string());
            self.store.put(JobTree::ProviderJobs, id.as_bytes(), &rec)?;
            self.store.push_event(&DurableEvent::ProviderJobFailed {
                agreement: id,
                reason: reason.to_string(),
            })?;
            self.store.flush()?;
        }
        Ok(())
    }

    /// What a dishonest or quirky test provider does to its outputs before it hashes and
    /// signs them: the receipt is valid, only re-execution shows the difference.
    #[cfg(feature = "testing")]
    fn cheat(&self, mut out: JobOutput) -> JobOutput {
        let corrupt = match self.lie {
            Some(super::Lie::Cheat { one_in }) => {
                self.next_seq.is_multiple_of(u64::from(one_in.max(1)))
            }
            _ => false,
        };
        for o in &mut out.outputs {
            if corrupt {
                if let Some(x) = o.bytes.first_mut() {
                    *x ^= 0x5a;
                }
            } else if self.lie == Some(super::Lie::Rounding) {
                // The lowest mantissa bit of every f32: one ulp, as another adapter's
                // rounding might differ.
                for c in o.bytes.chunks_exact_mut(4) {
                    c[0] ^= 1;
                }
            } else {
                continue;
            }
            o.id = hashgrid_protocol::ContentId::of(&o.bytes);
        }
        out
    }

    /// Signs the receipt, chained to the previous one, and stores it with the outputs
    /// (flushed) before any status names it.
    fn sign_receipt(
        &mut self,
        id: ContentId,
        active: &Active,
        started_at: Timestamp,
        finished_at: Timestamp,
        out: JobOutput,
    ) -> Result<(), String> {
        let a = &active.agreement;
        // GPU time in whole µs, rounded up; never zero for a job that ran.
        let gpu_time_us = ((out.gpu_ms * 1000.0).ceil() as u64).max(1);
        #[allow(unused_mut)]
        let mut charge = charge_us(a.price, a.units, gpu_time_us, a.max_charge);
        let tokens: u64 = if active.model {
            out.iterations.iter().map(|i| u64::from(*i)).sum()
        } else {
            0
        };
        let resident = (u64::from(out.resident_hits), out.resident_bytes);
        #[cfg(feature = "testing")]
        let out = self.cheat(out);
        let records: Vec<OutputRecord> = out
            .outputs
            .iter()
            .map(|o| OutputRecord {
                name: o.name.clone(),
                id: o.id,
                bytes: o.bytes.len() as u64,
            })
            .collect();
        #[allow(unused_mut)]
        let mut blobs: Vec<(ContentId, Vec<u8>)> =
            out.outputs.into_iter().map(|o| (o.id, o.bytes)).collect();
        #[allow(unused_mut)]
        let mut signer = self.key.clone();
        #[cfg(feature = "testing")]
        match self.lie {
            Some(super::Lie::WrongOutput) => {
                if let Some((_, b)) = blobs.first_mut()
                    && let Some(x) = b.first_mut()
                {
                    *x ^= 0xff;
                }
            }
            Some(super::Lie::ForeignKey) => {
                signer = Keypair::generate().map_err(|e| e.to_string())?;
            }
            Some(super::Lie::Overcharge) => {
                charge = hashgrid_protocol::Msat(a.max_charge.0.saturating_add(1));
            }
            Some(super::Lie::Cheat { .. } | super::Lie::Rounding) | None => {}
        }
        let receipt = Receipt {
            job_id: active.job_id,
            agreement_id: id,
            buyer: a.buyer,
            provider: self.key.public(),
            spec_id: a.spec_id,
            inputs: active.inputs.clone(),
            outputs: records,
            adapter: self
                .executor
                .as_ref()
                .map(Executor::profile)
                .ok_or("no executor")?,
            started_at,
            finished_at,
            gpu_time_us,
            charge,
            chain_seq: self.next_seq,
            prev_receipt: self.prev,
        };
        let signed = Signed::sign(&signer, &self.network, &receipt);
        let store_err = |e: StoreError| format!("provider store: {e}");
        for (bid, bytes) in &blobs {
            self.store.put_blob(bid, bytes).map_err(store_err)?;
        }
        self.store
            .put(JobTree::Receipts, &receipt.chain_seq.to_be_bytes(), &signed)
            .map_err(store_err)?;
        let mut rec = self
            .record(&id)
            .map_err(store_err)?
            .ok_or("job record vanished")?;
        rec.phase = JobPhase::Done;
        rec.receipt_seq = Some(receipt.chain_seq);
        rec.outputs = blobs.iter().map(|(i, _)| *i).collect();
        self.store
            .put(JobTree::ProviderJobs, id.as_bytes(), &rec)
            .map_err(store_err)?;
        self.store
            .push_event(&DurableEvent::ReceiptSigned {
                agreement: id,
                receipt: signed.id(),
                chain_seq: receipt.chain_seq,
                buyer: a.buyer,
                charge: receipt.charge,
            })
            .map_err(store_err)?;
        self.store.flush().map_err(store_err)?;
        self.next_seq += 1;
        self.prev = Some(signed.id());
        for (bid, _) in &blobs {
            if let Some(p) = super::peer_of(&a.buyer) {
                self.outputs_for.add(*bid, p);
            }
        }
        info!(agreement = %id.short(), chain_seq = receipt.chain_seq, charge_msat = receipt.charge.0, gpu_us = gpu_time_us, "receipt signed");
        self.metrics
            .receipt_signed(receipt.charge.0, gpu_time_us, tokens, resident);
        self.emit(ProviderEvent::Finished {
            agreement: id,
            receipt: signed.id(),
            chain_seq: receipt.chain_seq,
            charge: receipt.charge,
        });
        Ok(())
    }

    /// The buyer countersigned a receipt: verify, store (flushed), then acknowledge.
    pub(crate) fn on_countersign(&mut self, peer: PeerId, cs: Countersigned<Receipt>) -> JobReply {
        let r = match cs.verify(&self.network) {
            Ok(r) => r,
            Err(e) => return JobReply::Refused(format!("countersigned receipt: {e}")),
        };
        if super::peer_of(&r.buyer) != Some(peer) {
            return JobReply::Refused("not countersigned by the requesting peer".into());
        }
        let mut rec = match self.record(&r.agreement_id) {
            Ok(Some(rec)) => rec,
            Ok(None) => return JobReply::Refused("unknown job".into()),
            Err(e) => return JobReply::Refused(format!("provider store: {e}")),
        };
        let ours = self
            .store
            .get::<Signed<Receipt>>(JobTree::Receipts, &r.chain_seq.to_be_bytes());
        if !matches!(&ours, Ok(Some(s)) if *s == cs.signed) {
            return JobReply::Refused("that is not the receipt this provider signed".into());
        }
        if rec.countersigned {
            return JobReply::Ack;
        }
        rec.countersigned = true;
        // The buyer has verified and stored the outputs; drop those no other job needs.
        let unused: Vec<ContentId> = rec
            .outputs
            .iter()
            .filter(|o| self.outputs_for.release(o, &peer))
            .copied()
            .collect();
        let res = (|| {
            self.store
                .put(JobTree::Countersigned, &r.chain_seq.to_be_bytes(), &cs)?;
            for o in &unused {
                self.store.remove_blob(o)?;
            }
            self.store
                .put(JobTree::ProviderJobs, r.agreement_id.as_bytes(), &rec)?;
            self.store.push_event(&DurableEvent::ReceiptCountersigned {
                agreement: r.agreement_id,
                receipt: cs.id(),
            })?;
            self.store.flush()
        })();
        if let Err(e) = res {
            return JobReply::Refused(format!("provider store: {e}"));
        }
        if let Some(s) = &self.settlement {
            s.accrue(&cs.signed);
        }
        self.metrics.countersigned(r.charge.0);
        self.emit(ProviderEvent::Countersigned {
            agreement: r.agreement_id,
            receipt: cs.id(),
        });
        JobReply::Ack
    }

    /// The buyer refused a receipt: recorded, reported, acknowledged.
    /// The buyer lets an undispatched agreement go: its units are free again at once rather
    /// than when the agreement expires.
    pub(crate) fn on_release(&mut self, peer: PeerId, id: ContentId) -> JobReply {
        match self.reservations.get(&id) {
            Some(r) if super::peer_of(&r.buyer) == Some(peer) => {
                self.reservations.remove(&id);
                debug!(agreement = %id.short(), "the buyer released an agreement");
                JobReply::Ack
            }
            _ => JobReply::Refused("no undispatched agreement of yours by that id".into()),
        }
    }

    pub(crate) fn on_dispute(&mut self, peer: PeerId, id: ContentId, reason: String) -> JobReply {
        if self.buyer_of(&id).and_then(|b| super::peer_of(&b)) != Some(peer) {
            return JobReply::Refused("unknown job".into());
        }
        let reason: String = reason.chars().take(1024).collect();
        warn!(agreement = %id.short(), %reason, "the buyer disputes a receipt");
        if let Ok(Some(mut rec)) = self.record(&id) {
            // Reported once: a buyer repeating its dispute adds no events.
            let first = rec.failure.is_none();
            if first {
                self.metrics.provider_job_failed(true);
            }
            rec.failure = Some(format!("disputed by the buyer: {reason}"));
            let _ = self
                .store
                .put(JobTree::ProviderJobs, id.as_bytes(), &rec)
                .and_then(|()| {
                    if first {
                        self.store.push_event(&DurableEvent::ReceiptDisputed {
                            agreement: id,
                            reason: reason.clone(),
                        })?;
                    }
                    self.store.flush()
                });
        }
        self.emit(ProviderEvent::Disputed {
            agreement: id,
            reason,
        });
        JobReply::Ack
    }

    /// Flushes the provider's store writes.
    pub(crate) fn flush(&self) -> Result<(), StoreError> {
        self.store.flush()
    }

    /// Serves a chunk of an output blob to the buyer it belongs to.
    pub(crate) fn serve_blob(&self, peer: PeerId, req: &BlobRequest) -> Option<BlobReply> {
        if !self.outputs_for.allows(&req.id, &peer) {
            return None;
        }
        let bytes = self.store.blob(&req.id).ok().flatten()?;
        Some(chunk_of(&bytes, req))
    }
}

/// Most stream long polls parked per job (a buyer needs one; more are answered at once).
const MAX_STREAM_WAITERS: usize = 4;

#[cfg(test)]
mod tests {
    use super::*;
    use hashgrid_protocol::{Msat, OrderRef};

    fn agreement(buyer: &Keypair, provider: &Keypair, nonce: u64) -> Agreement {
        let now = Timestamp::now();
        Agreement {
            buyer: buyer.public(),
            provider: provider.public(),
            bid: OrderRef {
                owner: buyer.public(),
                order_id: 1,
            },
            ask: OrderRef {
                owner: provider.public(),
                order_id: 1,
            },
            units: 1,
            price: Msat(100),
            max_seconds: 60,
            max_charge: Msat(6000),
            spec_id: ContentId::of(b"spec"),
            nonce,
            created_at: now,
            expires_at: now.plus_ms(60_000),
        }
    }

    /// A provider without an executor over `store`, and the receiver of its internal messages
    /// (kept alive by the caller).
    fn provider(
        pk: &Keypair,
        net: &Network,
        store: Store,
        units: u32,
    ) -> (Provider, mpsc::Receiver<Internal>) {
        let (events, _) = broadcast::channel(16);
        let (tx, rx) = mpsc::channel(4);
        let p = Provider::new(
            Runs {
                executor: None,
                inputs: Arc::new(InputCache::open(None, 0, 0)),
                metrics: crate::ops::Metrics::detached(),
            },
            pk.clone(),
            net.clone(),
            store,
            events,
            tx,
            units,
        )
        .unwrap();
        (p, rx)
    }

    /// A released agreement frees its units at once, and only its buyer can release it.
    #[test]
    fn only_the_buyer_releases_an_agreement_and_its_units_come_back() {
        let net = Network::test();
        let pk = Keypair::generate().unwrap();
        let (buyer, other) = (Keypair::generate().unwrap(), Keypair::generate().unwrap());
        let (mut p, _rx) = provider(&pk, &net, Store::temporary().unwrap(), 4);
        let a = agreement(&buyer, &pk, 7);
        let id = Signed::sign(&pk, &net, &a).id();
        p.reservations.insert(
            id,
            Reservation {
                units: 3,
                expires_at: a.expires_at,
                buyer: a.buyer,
            },
        );
        assert_eq!(p.free_units(), 1);
        let peer = |k: &Keypair| super::super::peer_of(&k.public()).unwrap();
        assert!(matches!(
            p.on_release(peer(&other), id),
            JobReply::Refused(_)
        ));
        assert_eq!(p.free_units(), 1, "another peer cannot release it");
        assert_eq!(p.on_release(peer(&buyer), id), JobReply::Ack);
        assert_eq!(p.free_units(), 4);
        assert!(matches!(
            p.on_release(peer(&buyer), id),
            JobReply::Refused(_)
        ));
    }

    /// Two buyers' jobs produced the same output blob; the first countersignature must not
    /// delete it while the second job still needs it.
    #[test]
    fn a_shared_output_survives_the_first_countersignature() {
        let net = Network::test();
        let store = Store::temporary().unwrap();
        let pk = Keypair::generate().unwrap();
        let (b1, b2) = (Keypair::generate().unwrap(), Keypair::generate().unwrap());
        let (mut p, _rx) = provider(&pk, &net, store.clone(), 1);
        let output = b"the same output".to_vec();
        let out_id = ContentId::of(&output);
        store.put_blob(&out_id, &output).unwrap();
        let mut signed_receipts = Vec::new();
        for (seq, buyer) in [&b1, &b2].into_iter().enumerate() {
            let a = Signed::sign(&pk, &net, &agreement(buyer, &pk, seq as u64));
            let receipt = Receipt {
                job_id: ContentId::of(&[seq as u8]),
                agreement_id: a.id(),
                buyer: buyer.public(),
                provider: pk.public(),
                spec_id: ContentId::of(b"spec"),
                inputs: Vec::new(),
                outputs: vec![OutputRecord {
                    name: "out".into(),
                    id: out_id,
                    bytes: output.len() as u64,
                }],
                adapter: hashgrid_protocol::GpuProfile {
                    name: "test".into(),
                    vendor: 0,
                    device: 0,
                    backend: hashgrid_protocol::Backend::Vulkan,
                    device_type: hashgrid_protocol::DeviceType::Cpu,
                    driver: String::new(),
                    memory_bytes: 1,
                    limits: Default::default(),
                    bench: Default::default(),
                },
                started_at: Timestamp::now(),
                finished_at: Timestamp::now(),
                gpu_time_us: 1,
                charge: Msat(1),
                chain_seq: seq as u64,
                prev_receipt: signed_receipts.last().map(|s: &Signed<Receipt>| s.id()),
            };
            let signed = Signed::sign(&pk, &net, &receipt);
            store
                .put(JobTree::Receipts, &(seq as u64).to_be_bytes(), &signed)
                .unwrap();
            let rec = ProviderJobRecord {
                agreement_id: a.id(),
                agreement: a.countersign(buyer, &net),
                job_id: receipt.job_id,
                phase: JobPhase::Done,
                receipt_seq: Some(seq as u64),
                outputs: vec![out_id],
                failure: None,
                countersigned: false,
            };
            store
                .put(JobTree::ProviderJobs, a.id().as_bytes(), &rec)
                .unwrap();
            p.outputs_for.add(out_id, buyer.public().to_peer_id());
            signed_receipts.push(signed);
        }
        let req = BlobRequest {
            id: out_id,
            offset: 0,
            len: 1024,
        };
        let (peer1, peer2) = (b1.public().to_peer_id(), b2.public().to_peer_id());
        let cs1 = signed_receipts[0].countersign(&b1, &net);
        assert_eq!(p.on_countersign(peer1, cs1), JobReply::Ack);
        assert!(
            store.blob(&out_id).unwrap().is_some(),
            "still needed by job 2"
        );
        assert!(p.serve_blob(peer1, &req).is_none(), "job 1 is settled");
        assert!(matches!(
            p.serve_blob(peer2, &req),
            Some(BlobReply::Chunk { .. })
        ));
        let cs2 = signed_receipts[1].countersign(&b2, &net);
        assert_eq!(p.on_countersign(peer2, cs2), JobReply::Ack);
        assert!(
            store.blob(&out_id).unwrap().is_none(),
            "no job needs it any more"
        );
    }
}
