//! [`NodeHandle`]: the cloneable facade over the swarm task.

use std::collections::HashMap;
use std::sync::Arc;

use hashgrid_protocol::{Ask, Keypair, Network, OrderRef, PublicKey, Timestamp};
#[cfg(feature = "testing")]
use hashgrid_protocol::{GossipMessage, Signed};
use libp2p::{Multiaddr, PeerId};
use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::Instrument;

use crate::error::NodeError;
use crate::event::{DurableEvent, NodeEvent};
use crate::jobs::{JobOptions, JobRecord, JobResult, JobState, Submission};
use crate::settle::{InInvoice, OutInvoice, Position, Settlement};
use crate::store::{JobTree, OwnOrder, Store, StoreError, StoreSlot};
use hashgrid_market::BookSnapshot;
use hashgrid_protocol::ContentId;
#[cfg(feature = "testing")]
use hashgrid_protocol::exchange::{
    BlobReply, BlobRequest, JobMessage, JobReply, NegotiateReply, Propose,
};

use crate::jobs::buyer::{BuyerCtx, BuyerJob};

#[cfg(feature = "testing")]
use super::command::RawTopic;
use super::command::{AskSpec, BidSpec, Command, Net};

pub(super) struct Inner {
    pub(super) peer_id: PeerId,
    pub(super) public: PublicKey,
    pub(super) key: Keypair,
    pub(super) network: Network,
    pub(super) store: StoreSlot,
    pub(super) tasks: std::sync::Mutex<HashMap<ContentId, tokio::task::AbortHandle>>,
    pub(super) settlement: Arc<Settlement>,
    pub(super) cmd: mpsc::Sender<Command>,
    pub(super) events: broadcast::Sender<NodeEvent>,
    /// Jobs this node placed with each provider lately (fair ranking).
    pub(super) placements: crate::jobs::Placements,
    /// This node's experience of each provider (ranking; persisted).
    pub(super) reputation: Arc<crate::jobs::reputation::Reputations>,
    /// The provider's input cache.
    pub(super) inputs: Arc<crate::jobs::cache::InputCache>,
    /// Bytes of inbound requests being read.
    pub(super) inbound: Arc<crate::network::exchange::InboundBudget>,
    /// The swarm task's stalls.
    pub(super) lag: Arc<super::lag::LoopLag>,
    /// The node's Prometheus metrics.
    pub(super) metrics: Arc<crate::ops::Metrics>,
}

/// A cheap, cloneable handle to a running node. When the last handle is dropped, the node
/// shuts down (see the module docs for the order).
#[derive(Clone)]
pub struct NodeHandle {
    pub(super) inner: Arc<Inner>,
}

impl std::fmt::Debug for NodeHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NodeHandle({})", self.inner.peer_id)
    }
}

impl NodeHandle {
    async fn request<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, NodeError> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .cmd
            .send(make(tx))
            .await
            .map_err(|_| NodeError::Stopped)?;
        rx.await.map_err(|_| NodeError::Stopped)
    }

    /// This node's libp2p `PeerId` (derived from its ed25519 key).
    pub fn peer_id(&self) -> PeerId {
        self.inner.peer_id
    }

    /// This node's public key (signs its orders and receipts).
    pub fn public_key(&self) -> PublicKey {
        self.inner.public
    }

    /// The addresses the node listens on, each ending in `/p2p/<PeerId>` (dialable as is).
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, NodeError> {
        self.request(Command::ListenAddrs).await
    }

    /// Signs, stores (flushed) and publishes an ask; returns its identity. The ask is
    /// re-announced until it is cancelled, also after a restart with the same data dir.
    pub async fn post_ask(&self, spec: AskSpec) -> Result<OrderRef, NodeError> {
        self.request(|r| Command::PostAsk(spec, r)).await?
    }

    /// Signs, stores (flushed) and publishes a bid; returns its identity.
    pub async fn post_bid(&self, spec: BidSpec) -> Result<OrderRef, NodeError> {
        self.request(|r| Command::PostBid(spec, r)).await?
    }

    /// Cancels one of this node's orders: forgets it (flushed), removes it from the book and
    /// publishes a signed `Cancel`.
    pub async fn cancel(&self, order_id: u64) -> Result<(), NodeError> {
        self.request(|r| Command::Cancel(order_id, r)).await?
    }

    /// This node's own live orders (as stored; the announced copies carry a fresh sequence
    /// number and expiry), ordered by order id.
    pub async fn own_orders(&self) -> Result<Vec<OwnOrder>, NodeError> {
        self.request(Command::OwnOrders).await
    }

    /// Makes this node's asks exactly `wanted`: keeps own asks equal to a wanted one (same
    /// GPU, units, price and longest job; they keep their order ids), cancels the others and
    /// posts what is missing. A restarted site with an unchanged config keeps its orders.
    pub async fn set_asks(&self, wanted: &[AskSpec]) -> Result<Vec<OrderRef>, NodeError> {
        let mut missing: Vec<AskSpec> = wanted.to_vec();
        let mut kept = Vec::new();
        for order in self.own_orders().await? {
            let OwnOrder::Ask(a) = order else { continue };
            let same = |s: &AskSpec| {
                s.gpu == a.gpu
                    && s.units == a.units
                    && s.price == a.price
                    && s.max_seconds == a.max_seconds
            };
            if let Some(i) = missing.iter().position(same) {
                missing.remove(i);
                kept.push(a.order_ref());
            } else {
                self.cancel(a.order_id).await?;
            }
        }
        for spec in missing {
            kept.push(self.post_ask(spec).await?);
        }
        Ok(kept)
    }

    /// A snapshot of this node's view of the book.
    pub async fn book(&self) -> Result<BookSnapshot, NodeError> {
        self.request(Command::Book).await
    }

    /// The book's and the connections' figures (O(providers + peers), not O(book): for
    /// dashboards and metrics).
    pub async fn stats(&self) -> Result<super::NodeStats, NodeError> {
        self.request(Command::Stats).await
    }

    /// The node's Prometheus metrics (counters; [`NodeHandle::render_metrics`] refreshes the
    /// gauges and renders them).
    pub fn metrics(&self) -> &Arc<crate::ops::Metrics> {
        &self.inner.metrics
    }

    /// Refreshes the gauges read at scrape time (book, peers, queue, store, cache, what is
    /// owed) and appends every metric in the OpenMetrics text format, without `# EOF`.
    pub async fn render_metrics(&self, out: &mut String) -> Result<(), NodeError> {
        let s = self.stats().await?;
        let (disk, mem) = self.inner.inputs.bytes();
        let mut owed_to_us = [0u64; 5];
        let mut owed_by_us = 0u64;
        for p in self.inner.settlement.positions().values() {
            let e = p.as_buyer;
            for (slot, v) in
                owed_to_us
                    .iter_mut()
                    .zip([e.accrued, e.invoiced, e.paid, e.confirmed, e.settled])
            {
                *slot = slot.saturating_add(v.0);
            }
            owed_by_us = owed_by_us.saturating_add(p.owed_to_it.0);
        }
        let store_bytes = self.inner.store.with(Store::size_on_disk).unwrap_or(0);
        let m = &self.inner.metrics;
        m.set_gauges(&crate::ops::GaugeReadings {
            book_asks: s.asks,
            book_bids: s.bids,
            book_providers: s.providers,
            peers: s.peers.len() as u64,
            gossip_peers: s.gossip_peers,
            provider_queue: s.provider_queue,
            store_bytes,
            cache_disk_bytes: disk,
            cache_mem_bytes: mem,
            models_held: self.inner.inputs.held_models().len() as u64,
            swarm_max_stall_us: u64::try_from(self.inner.lag.snapshot().max.as_micros())
                .unwrap_or(u64::MAX),
            owed_to_us_msat: owed_to_us,
            owed_by_us_msat: owed_by_us,
            lightning: self.inner.settlement.lightning_readings().await,
        });
        m.sync_inbound_refusals(self.inner.inbound.refused());
        m.encode_into(out);
        Ok(())
    }

    /// Peers with at least one open connection.
    pub async fn peers(&self) -> Result<Vec<PeerId>, NodeError> {
        self.request(Command::Peers).await
    }

    /// Peers known to be subscribed to this network's `orders` topic: those a publish reaches
    /// directly.
    pub async fn gossip_peers(&self) -> Result<Vec<PeerId>, NodeError> {
        self.request(Command::GossipPeers).await
    }

    /// The gossipsub score this node gives `peer` (`None` if it is not known to gossipsub).
    pub async fn peer_score(&self, peer: PeerId) -> Result<Option<f64>, NodeError> {
        self.request(|r| Command::PeerScore(peer, r)).await
    }

    /// Dials an address (with `/p2p/<PeerId>` it is also added to the DHT).
    pub async fn dial(&self, addr: Multiaddr) -> Result<(), NodeError> {
        self.request(|r| Command::Dial(addr, r)).await?
    }

    /// Subscribes to the node's events. A subscriber more than [`EVENT_QUEUE`](crate::node::EVENT_QUEUE) events behind
    /// loses the oldest ones.
    pub fn events(&self) -> broadcast::Receiver<NodeEvent> {
        self.inner.events.subscribe()
    }

    /// Publishes raw bytes on a topic, bypassing signing and validation. For bad-input tests
    /// only (cargo feature `testing`).
    #[cfg(feature = "testing")]
    pub async fn publish_raw(&self, topic: RawTopic, data: Vec<u8>) -> Result<(), NodeError> {
        self.request(|r| Command::PublishRaw(topic, data, r))
            .await?
    }

    /// Adds `messages`, unchecked, to every sync response this node serves (replacing earlier
    /// ones). For bad-input tests only (cargo feature `testing`).
    #[cfg(feature = "testing")]
    pub async fn serve_in_sync(&self, messages: Vec<GossipMessage>) -> Result<(), NodeError> {
        self.request(|r| Command::ServeInSync(messages, r)).await
    }

    /// Submits a job to the market and returns its id at once; the job runs in the
    /// background (follow it with [`NodeHandle::events`] or [`NodeHandle::wait`]). The job
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
        seed.extend_from_slice(&self.inner.public.0);
        seed.extend_from_slice(spec_id.as_bytes());
        seed.extend_from_slice(&now.0.to_be_bytes());
        seed.extend_from_slice(&self.store(|s| s.next_order_id())?.to_be_bytes());
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
        self.store(|s| {
            s.put(JobTree::BuyerJobs, id.as_bytes(), &record)?;
            s.flush()
        })?;
        let ctx = BuyerCtx {
            net: Net {
                tx: self.inner.cmd.clone(),
            },
            key: self.inner.key.clone(),
            network: self.inner.network.clone(),
            store: self.inner.store.clone(),
            events: self.inner.events.clone(),
            settlement: self.inner.settlement.clone(),
            placements: self.inner.placements.clone(),
            reputation: self.inner.reputation.clone(),
            metrics: self.inner.metrics.clone(),
        };
        let task = tokio::spawn(BuyerJob::new(ctx, sub, record).run().in_current_span());
        if let Ok(mut tasks) = self.inner.tasks.lock() {
            tasks.retain(|_, t| !t.is_finished());
            tasks.insert(id, task.abort_handle());
        }
        Ok(id)
    }

    fn store<T>(&self, f: impl FnOnce(&Store) -> Result<T, StoreError>) -> Result<T, NodeError> {
        self.inner.store.with(f).map_err(|e| match e {
            Some(e) => NodeError::Store(e),
            None => NodeError::Stopped,
        })
    }

    /// A submitted job's record, from the store.
    pub fn job(&self, id: &ContentId) -> Result<Option<JobRecord>, NodeError> {
        self.store(|s| crate::jobs::read_job(s, id))
    }

    /// Every job this node submitted, oldest first.
    pub fn jobs(&self) -> Result<Vec<JobRecord>, NodeError> {
        self.store(crate::jobs::read_jobs)
    }

    /// A finished job's verified outputs and record; `None` while it runs or if it failed
    /// (see [`NodeHandle::job`] for its state).
    pub fn result(&self, id: &ContentId) -> Result<Option<JobResult>, NodeError> {
        self.store(|s| crate::jobs::read_result(s, id))
    }

    /// Cancels a submitted job that has not finished: its task stops and the job is recorded
    /// as failed ([`crate::jobs::FailKind::Interrupted`]). A provider already running it may
    /// finish and sign a receipt, which is never countersigned (nothing is owed for it).
    pub fn cancel_job(&self, id: &ContentId) -> Result<(), NodeError> {
        if let Ok(mut tasks) = self.inner.tasks.lock()
            && let Some(t) = tasks.remove(id)
        {
            t.abort();
        }
        let Some(mut rec) = self.job(id)? else {
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
        self.inner.metrics.buyer_job("cancelled");
        self.store(|s| {
            s.put(JobTree::BuyerJobs, id.as_bytes(), &rec)?;
            s.push_event(&DurableEvent::JobEnded {
                job: *id,
                state: rec.state.clone(),
                provider: rec.provider,
            })?;
            s.flush()
        })?;
        let _ = self
            .inner
            .events
            .send(NodeEvent::Job(crate::jobs::JobUpdate {
                job: *id,
                state: rec.state,
                provider: rec.provider,
            }));
        Ok(())
    }

    /// What this node, as a buyer, has seen of each provider it ran jobs with (completed,
    /// failed, lied; the score its jobs are ranked by), by key.
    pub fn provider_experience(&self) -> Vec<(PublicKey, crate::jobs::reputation::Experience)> {
        self.inner.reputation.all()
    }

    /// The oldest event not yet acknowledged, with its id: money earned, owed or paid, a job's
    /// end ([`DurableEvent`]). It stays the oldest until [`event_handled`](Self::event_handled)
    /// acknowledges it, across restarts of the node (delivered at least once).
    pub fn next_event(&self) -> Result<Option<(u64, DurableEvent)>, NodeError> {
        self.store(|s| s.next_event())
    }

    /// Waits for the oldest event not yet acknowledged (see [`next_event`](Self::next_event)).
    pub async fn wait_next_event(&self) -> Result<(u64, DurableEvent), NodeError> {
        let pushed = self.store(|s| Ok(s.events_pushed()))?;
        loop {
            // Registered before looking, so a push in between is not missed.
            let notified = pushed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(e) = self.next_event()? {
                return Ok(e);
            }
            tokio::select! {
                () = notified => {}
                // The node may have stopped meanwhile: look again (an error then).
                () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            }
        }
    }

    /// Acknowledges the event `id` (it is removed, flushed); false if no such event was
    /// waiting (acknowledged already).
    pub fn event_handled(&self, id: u64) -> Result<bool, NodeError> {
        self.store(|s| s.event_handled(id))
    }

    /// The input blobs (model weights) this provider holds in its cache, most recently used
    /// first: what its capacity ad lists as warm (less the blobs of the models it lists).
    pub fn warm_inputs(&self) -> Vec<ContentId> {
        self.inner.inputs.ids()
    }

    /// The ids of the models this provider holds in full, most recently used first: what its
    /// capacity ad lists as `models`.
    pub fn warm_models(&self) -> Vec<ContentId> {
        self.inner
            .inputs
            .held_models()
            .into_iter()
            .map(|(id, _)| id)
            .collect()
    }

    /// Bytes in this provider's input cache: on disk, in memory.
    pub fn input_cache_bytes(&self) -> (u64, u64) {
        self.inner.inputs.bytes()
    }

    /// The budget for bytes of inbound requests being read: its use now, its peak and how
    /// many requests it refused.
    pub fn inbound_budget(&self) -> &crate::network::exchange::InboundBudget {
        &self.inner.inbound
    }

    /// How late the swarm task has polled so far: its longest stall and the distribution
    /// (sampled every [`LAG_PROBE_EVERY`](super::LAG_PROBE_EVERY)).
    pub fn loop_lag(&self) -> super::LagSnapshot {
        self.inner.lag.snapshot()
    }

    /// The live asks meeting `query`, sorted as asked (the market engine's `offers`).
    pub async fn offers(&self, query: hashgrid_market::OfferQuery) -> Result<Vec<Ask>, NodeError> {
        self.request(|r| Command::Offers(Box::new(query), r)).await
    }

    /// Waits until a submitted job finishes and returns its final record.
    pub async fn wait(&self, id: &ContentId) -> Result<JobRecord, NodeError> {
        let mut events = self.events();
        loop {
            match self.job(id)? {
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

    /// Sends a raw proposal to `peer` (bad-input tests only; cargo feature `testing`).
    #[cfg(feature = "testing")]
    pub async fn raw_propose(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        p: Propose,
    ) -> Result<NegotiateReply, NodeError> {
        self.net()
            .negotiate(peer, addrs, p)
            .await
            .map_err(NodeError::Request)
    }

    /// Sends a raw job request to `peer` (bad-input tests only; cargo feature `testing`).
    #[cfg(feature = "testing")]
    pub async fn raw_job(&self, peer: PeerId, m: JobMessage) -> Result<JobReply, NodeError> {
        self.net().job(peer, m).await.map_err(NodeError::Request)
    }

    /// Sends a raw blob request to `peer` (bad-input tests only; cargo feature `testing`).
    #[cfg(feature = "testing")]
    pub async fn raw_blob(&self, peer: PeerId, r: BlobRequest) -> Result<BlobReply, NodeError> {
        self.net().blob(peer, r).await.map_err(NodeError::Request)
    }

    /// Signs a message body with this node's key (bad-input tests only; cargo feature
    /// `testing`).
    #[cfg(feature = "testing")]
    pub fn sign<T: hashgrid_protocol::SignedMessage>(&self, body: &T) -> Signed<T> {
        Signed::sign(&self.inner.key, &self.inner.network, body)
    }

    /// Countersigns with this node's key (bad-input tests only; cargo feature `testing`).
    #[cfg(feature = "testing")]
    pub fn countersign<T: hashgrid_protocol::Countersignable>(
        &self,
        s: &Signed<T>,
    ) -> hashgrid_protocol::Countersigned<T> {
        s.countersign(&self.inner.key, &self.inner.network)
    }

    #[cfg(feature = "testing")]
    fn net(&self) -> Net {
        Net {
            tx: self.inner.cmd.clone(),
        }
    }

    /// Settlement positions per counterparty: what each owes this node as a buyer (by invoice
    /// state) and what this node owes it for its own purchases.
    pub fn positions(&self) -> std::collections::BTreeMap<PublicKey, Position> {
        self.inner.settlement.positions()
    }

    /// Invoices this node issued as a provider, with the ledger's record of each.
    pub fn invoices_issued(
        &self,
    ) -> Result<
        Vec<(
            OutInvoice,
            Option<hashgrid_market::settlement::InvoiceRecord>,
        )>,
        NodeError,
    > {
        let out: Vec<OutInvoice> = self.store(|s| s.all(JobTree::InvoicesOut))?;
        Ok(out
            .into_iter()
            .map(|o| {
                let rec = self.inner.settlement.invoice_record(&o.invoice.id());
                (o, rec)
            })
            .collect())
    }

    /// Invoices this node received as a buyer.
    pub fn invoices_received(&self) -> Result<Vec<InInvoice>, NodeError> {
        self.store(|s| s.all(JobTree::InvoicesIn))
    }

    /// Runs one settlement pass now (invoicing, chain checks, deliveries, payments) instead
    /// of waiting for the next interval.
    pub async fn settle_now(&self) {
        let net = Net {
            tx: self.inner.cmd.clone(),
        };
        self.inner.settlement.pass(&net).await;
    }

    /// This node's buyer wallet (on-chain mode with wallet keys).
    pub fn wallet(&self) -> Option<Arc<std::sync::Mutex<crate::wallet::Wallet>>> {
        self.inner.settlement.buyer_wallet()
    }

    /// The chain backend (on-chain mode).
    pub fn chain(&self) -> Option<Arc<dyn crate::wallet::ChainSource>> {
        self.inner.settlement.chain()
    }

    /// Shuts the node down in the documented order and waits until it has stopped. Other
    /// handles get [`NodeError::Stopped`] afterwards. Returns at once if it already stopped.
    pub async fn shutdown(&self) {
        let _ = self.request(Command::Shutdown).await;
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

pub(super) fn check_options(o: &JobOptions) -> Result<(), NodeError> {
    if o.units == 0 || o.max_seconds == 0 {
        return Err(NodeError::InvalidJob(
            "units and max_seconds must be at least 1".into(),
        ));
    }
    Ok(())
}
