//! Gossip: announcing own orders, folding verified messages into the book, book sync.

use hashgrid_protocol::{Ask, Bid, CapacityAd, GossipMessage, Signed, Timestamp, VerifiedGossip};
use libp2p::PeerId;
use libp2p::gossipsub::{self, IdentTopic, MessageAcceptance, TopicHash};
use tracing::{debug, info, warn};

use crate::error::NodeError;
use crate::event::NodeEvent;
use crate::network::validate::{TopicKind, Verdict};
use crate::network::{MAX_SYNC_MESSAGES, SyncResponse};
use crate::store::OwnOrder;
use hashgrid_market::{BookChange, BookReject, RemoveReason};

use super::addr::with_peer;
use super::settings::{MAX_UNPUBLISHED, RELAY_FRESH};
use super::state::{NodeLoop, Warm, queue_key};

impl NodeLoop {
    /// Re-signs `orders` with one fresh sequence number and expiry, folds and publishes them.
    pub(super) fn announce_orders(&mut self, orders: &[OwnOrder]) -> Result<(), NodeError> {
        if orders.is_empty() {
            return Ok(());
        }
        let (now, expires_at) = self.now_and_expiry();
        let seq = self.store.next_seq(now.0)?;
        for order in orders {
            let (msg, verified) = match order {
                OwnOrder::Ask(a) => {
                    let a = Ask {
                        seq,
                        created_at: now,
                        expires_at,
                        region: self.settings.region.clone(),
                        ..a.clone()
                    };
                    (
                        GossipMessage::Ask(Signed::sign(&self.key, &self.network, &a)),
                        VerifiedGossip::Ask(a),
                    )
                }
                OwnOrder::Bid(b) => {
                    let b = Bid {
                        seq,
                        created_at: now,
                        expires_at,
                        ..b.clone()
                    };
                    (
                        GossipMessage::Bid(Signed::sign(&self.key, &self.network, &b)),
                        VerifiedGossip::Bid(b),
                    )
                }
            };
            self.fold_own(msg.clone(), verified);
            self.publish(msg);
        }
        Ok(())
    }

    /// Announces the capacity ad (providers only) and every live own order.
    pub(super) fn announce_all(&mut self) {
        if !self.settings.gpus.is_empty()
            && let Err(e) = self.announce_capacity()
        {
            warn!(error = %e, "cannot announce capacity");
        }
        let orders: Vec<OwnOrder> = self.own.values().cloned().collect();
        if let Err(e) = self.announce_orders(&orders) {
            warn!(error = %e, "cannot re-announce orders");
        }
    }

    /// What the capacity ad lists as warm: the ids of the models held in full, then the ids
    /// of cached blobs that are not part of a listed model.
    pub(super) fn warm_ids(&self) -> Warm {
        let mut held = self.inputs.held_models();
        held.truncate(hashgrid_protocol::limits::MAX_MODELS_PER_AD);
        let mut blobs = self.inputs.ids();
        blobs.retain(|id| !held.iter().any(|(_, m)| m.contains(id)));
        blobs.truncate(hashgrid_protocol::limits::MAX_WARM_PER_AD);
        Warm {
            models: held.into_iter().map(|(id, _)| id).collect(),
            blobs,
        }
    }

    pub(super) fn announce_capacity(&mut self) -> Result<(), NodeError> {
        let (now, expires_at) = self.now_and_expiry();
        let addrs = self
            .listen_addrs
            .iter()
            .take(hashgrid_protocol::limits::MAX_ADDRS_PER_AD)
            .map(|a| with_peer(a, self.peer_id).to_string())
            .collect();
        let warm = self.warm_ids();
        self.warm_announced = warm.clone();
        let ad = CapacityAd {
            warm: warm.blobs,
            models: warm.models,
            provider: self.public,
            region: self.settings.region.clone(),
            gpus: self.settings.gpus.clone(),
            units_total: self.settings.units,
            units_free: self.settings.units,
            settlement: self.settings.settlement.clone(),
            addrs,
            seq: self.store.next_seq(now.0)?,
            created_at: now,
            expires_at,
        };
        let signed = Signed::sign(&self.key, &self.network, &ad);
        signed
            .verify(&self.network)
            .map_err(|e| NodeError::InvalidOrder(format!("capacity ad: {e}")))?;
        let msg = GossipMessage::Capacity(signed);
        self.fold_own(msg.clone(), VerifiedGossip::Capacity(ad));
        self.publish(msg);
        Ok(())
    }

    pub(super) fn topic_for(&self, msg: &GossipMessage) -> IdentTopic {
        match msg {
            GossipMessage::Capacity(_) => self.capacity_topic.clone(),
            _ => self.orders_topic.clone(),
        }
    }

    pub(super) fn publish(&mut self, msg: GossipMessage) {
        let topic = self.topic_for(&msg);
        match self
            .swarm
            .behaviour_mut()
            .gossipsub
            .publish(topic, msg.encode())
        {
            Ok(_) => {}
            Err(gossipsub::PublishError::Duplicate) => {}
            Err(e) => {
                debug!(error = %e, "publish failed; will retry");
                // A newer copy of the same order or ad supersedes a queued one: sending both
                // could deliver the older one last, which peers reject as a replay.
                let key = queue_key(&msg);
                self.unpublished.retain(|m| queue_key(m) != key);
                if self.unpublished.len() >= MAX_UNPUBLISHED {
                    self.unpublished.remove(0);
                }
                self.unpublished.push(msg);
            }
        }
    }

    pub(super) fn retry_publish(&mut self) {
        let now = Timestamp::now();
        let queued = std::mem::take(&mut self.unpublished);
        for msg in queued {
            // Messages that expired while waiting are not worth sending.
            if msg.verify(&self.network, now).is_ok() {
                self.publish(msg);
            }
        }
    }

    pub(super) fn fold_own(&mut self, msg: GossipMessage, verified: VerifiedGossip) {
        self.validator.record_own(&verified);
        let _ = self.fold(msg, verified);
    }

    /// Folds a verified message into the book and reports the change as an event.
    pub(super) fn fold(
        &mut self,
        msg: GossipMessage,
        verified: VerifiedGossip,
    ) -> Result<(), BookReject> {
        // Orders enter the book at the time they arrived here (their priority among equal
        // prices), never at the time their owner signed.
        let now = Timestamp::now();
        let change = match (msg, verified) {
            (GossipMessage::Ask(s), VerifiedGossip::Ask(a)) => self.book.insert_ask(s, a, now)?,
            (GossipMessage::Bid(s), VerifiedGossip::Bid(b)) => self.book.insert_bid(s, b, now)?,
            (GossipMessage::Cancel(s), VerifiedGossip::Cancel(c)) => self.book.cancel(s, c, now)?,
            (GossipMessage::Capacity(s), VerifiedGossip::Capacity(c)) => {
                self.book.insert_capacity(s, c)?
            }
            (GossipMessage::Evidence(_), VerifiedGossip::Evidence(ev)) => {
                self.on_evidence(&ev.0, &ev.1);
                return Ok(());
            }
            // `verify` returns the variant of the message it verified.
            _ => return Ok(()),
        };
        match change {
            BookChange::Added(kind, order) => self.emit(NodeEvent::OrderAdded { kind, order }),
            BookChange::Cancelled(kind, order) => self.emit(NodeEvent::OrderRemoved {
                kind,
                order,
                reason: RemoveReason::Cancelled,
            }),
            BookChange::Capacity(p) => self.emit(NodeEvent::CapacityUpdated(p)),
            BookChange::Replaced(..) | BookChange::CancelRecorded(_) => {}
        }
        Ok(())
    }

    /// Checked fraud evidence from another buyer: the accused provider's reputation here
    /// falls (once per reporter and provider), so this node's own jobs rank it after
    /// providers in good standing. Evidence against this node itself changes nothing here.
    fn on_evidence(
        &mut self,
        ev: &hashgrid_protocol::FraudEvidence,
        facts: &hashgrid_protocol::EvidenceFacts,
    ) {
        if facts.accused == self.public || ev.reporter == self.public {
            return;
        }
        let Some(slot) = &self.slot else { return };
        let counted = self.reputation.reported(slot, ev.reporter, facts.accused);
        self.metrics
            .fraud_evidence(if counted { "counted" } else { "repeated" });
        info!(
            accused = %facts.accused.short(),
            reporter = %ev.reporter.short(),
            job = %facts.job_id.short(),
            outputs = ?facts.outputs,
            counted,
            "fraud evidence checked"
        );
    }

    pub(super) fn sweep(&mut self) {
        // Keep the sequence lease ahead of need, flushed off this task, so that signing an
        // order or ad here never waits on the disk.
        let now = Timestamp::now().0;
        if self.store.seq_lease_low(now) {
            let store = self.store.clone();
            tokio::task::spawn_blocking(move || {
                if let Err(e) = store.extend_seq_lease(now) {
                    warn!(error = %e, "cannot extend the sequence lease");
                }
            });
        }
        for (kind, order) in self.book.expire(Timestamp::now()) {
            debug!(?kind, order = order.order_id, owner = %order.owner.short(), "order expired");
            self.emit(NodeEvent::OrderRemoved {
                kind,
                order,
                reason: RemoveReason::Expired,
            });
        }
    }

    pub(super) fn topic_kind(&self, hash: &TopicHash) -> TopicKind {
        if *hash == self.capacity_topic.hash() {
            TopicKind::Capacity
        } else if *hash == self.orders_topic.hash() {
            TopicKind::Orders
        } else {
            TopicKind::Unknown
        }
    }

    pub(super) fn on_gossip(
        &mut self,
        from: PeerId,
        id: gossipsub::MessageId,
        message: gossipsub::Message,
    ) {
        let topic = self.topic_kind(&message.topic);
        let verdict = self
            .validator
            .check_bytes(topic, &message.data, Timestamp::now(), true);
        let acceptance = match verdict {
            Verdict::Accept(accepted) => match self.fold(accepted.0, accepted.1) {
                Ok(()) => MessageAcceptance::Accept,
                Err(BookReject::Stale { .. } | BookReject::Cancelled { .. }) => {
                    self.reject(from, "stale copy of a replaced or cancelled order".into());
                    MessageAcceptance::Reject
                }
                Err(e) => {
                    debug!(%from, reason = %e, "gossip ignored");
                    MessageAcceptance::Ignore
                }
            },
            Verdict::Ignore(reason) => {
                debug!(%from, %reason, "gossip ignored");
                MessageAcceptance::Ignore
            }
            Verdict::Reject(reason) => {
                self.reject(from, reason);
                MessageAcceptance::Reject
            }
        };
        let topic = match topic {
            TopicKind::Capacity => "capacity",
            TopicKind::Orders => "orders",
            _ => "unknown",
        };
        let outcome = match acceptance {
            MessageAcceptance::Accept => "accept",
            MessageAcceptance::Ignore => "ignore",
            MessageAcceptance::Reject => "reject",
        };
        self.metrics.gossip(topic, outcome);
        self.swarm
            .behaviour_mut()
            .gossipsub
            .report_message_validation_result(&id, &from, acceptance);
    }

    /// Gossips a fresh message this node learnt by sync rather than by gossip (a site that
    /// just joined, whose first ask reached only the peers that pulled its book): gossip
    /// messages are anonymous and content-addressed, so any node may publish an author's
    /// signed envelope, and peers that have it already drop the copy as a duplicate. Not
    /// retried: it is a shortcut, the gossip mesh and anti-entropy get it there anyway.
    fn relay(&mut self, msg: GossipMessage) {
        let topic = self.topic_for(&msg);
        if let Err(e) = self
            .swarm
            .behaviour_mut()
            .gossipsub
            .publish(topic, msg.encode())
        {
            debug!(error = %e, "relay of a message learnt by sync not sent");
        }
    }

    pub(super) fn reject(&self, from: PeerId, reason: String) {
        info!(%from, %reason, "message rejected");
        self.emit(NodeEvent::MessageRejected { from, reason });
    }

    pub(super) fn on_sync_response(&mut self, from: PeerId, resp: SyncResponse) {
        let now = Timestamp::now();
        let total = resp.messages.len();
        let mut added = 0usize;
        for msg in resp.messages.into_iter().take(MAX_SYNC_MESSAGES) {
            // Anti-entropy pulls mostly bring what the book already holds: skip those before
            // the signature check.
            if self.book.holds(&msg) {
                continue;
            }
            match self.validator.check_message(msg, now, false) {
                Verdict::Accept(accepted) => {
                    let created = match &accepted.1 {
                        VerifiedGossip::Ask(a) => Some(a.created_at),
                        VerifiedGossip::Bid(b) => Some(b.created_at),
                        VerifiedGossip::Cancel(c) => Some(c.created_at),
                        VerifiedGossip::Capacity(c) => Some(c.created_at),
                        VerifiedGossip::Evidence(_) => None,
                    };
                    let fresh = created.is_some_and(|t| {
                        now.0.saturating_sub(t.0) <= RELAY_FRESH.as_millis() as u64
                    });
                    let relay = fresh.then(|| accepted.0.clone());
                    if self.fold(accepted.0, accepted.1).is_ok() {
                        added += 1;
                        if let Some(msg) = relay {
                            self.relay(msg);
                        }
                    }
                }
                Verdict::Ignore(_) => {}
                Verdict::Reject(reason) => {
                    self.reject(from, format!("sync response: {reason}"));
                    let n = self.bad_sync.entry(from).or_insert(0);
                    *n = n.saturating_add(1);
                    let score = -f64::from(*n).powi(2);
                    self.swarm
                        .behaviour_mut()
                        .gossipsub
                        .set_application_score(&from, score);
                }
            }
        }
        debug!(%from, total, added, "book sync");
    }
}
