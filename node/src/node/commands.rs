//! Commands from handles and job tasks: orders, candidates, requests to peers.

use hashgrid_protocol::{
    Ask, Bid, Cancel, GossipMessage, OrderRef, PublicKey, Signed, SignedMessage, Timestamp,
    VerifiedGossip,
};
use libp2p::multiaddr::Protocol;

use crate::error::NodeError;
use crate::store::OwnOrder;

use super::addr::with_peer;
#[cfg(feature = "testing")]
use super::command::RawTopic;
use super::command::{AfterFlush, AskSpec, BidSpec, Candidate, CandidateQuery, Command};
use super::settings::MAX_OWN_ORDERS;
use super::state::{NodeLoop, WarmInputs, ms, queue_key};

impl NodeLoop {
    /// The figures of [`super::NodeStats`].
    pub(super) fn stats(&self) -> super::NodeStats {
        let (asks, bids, providers) = self.book.counts();
        let mut regions = std::collections::BTreeMap::new();
        let mut region_of = std::collections::HashMap::new();
        for ad in self.book.capacity_ads() {
            *regions.entry(ad.region.clone()).or_insert(0u64) += 1;
            if let Some(p) = crate::jobs::peer_of(&ad.provider) {
                region_of.insert(p, ad.region.clone());
            }
        }
        let topic = self.orders_topic.hash();
        let gossip_peers = self
            .swarm
            .behaviour()
            .gossipsub
            .all_peers()
            .filter(|(_, topics)| topics.contains(&&topic))
            .count() as u64;
        let provider_queue = self
            .provider
            .as_ref()
            .map_or(0, |tx| (tx.max_capacity() - tx.capacity()) as u64);
        super::NodeStats {
            asks: asks as u64,
            bids: bids as u64,
            providers: providers as u64,
            regions,
            peers: self
                .swarm
                .connected_peers()
                .map(|p| (p.to_string(), region_of.get(p).cloned()))
                .collect(),
            gossip_peers,
            provider_queue,
        }
    }

    pub(super) fn is_down(&self, p: &PublicKey) -> bool {
        self.down
            .get(p)
            .is_some_and(|until| *until > tokio::time::Instant::now())
    }

    /// The asks that could take all of the query's bid, best first, without excluded or down
    /// providers, each with its provider's advertised addresses: price first, and among equal
    /// prices the market engine's fair ranking (free units, this buyer's recent load there,
    /// then the query's random tie-break), so equal-priced providers share the work.
    pub(super) fn candidates(&self, q: &CandidateQuery) -> Vec<Candidate> {
        let now = Timestamp::now().0;
        let load = |p: &PublicKey| q.load.get(p).copied().unwrap_or(0);
        let warm = WarmInputs {
            book: &self.book,
            inputs: &q.inputs,
            total: q.inputs.iter().map(|(_, n)| n).sum(),
            model: q.bid.model.map(|m| (m, q.model_blobs.as_slice())),
        };
        let fair = hashgrid_market::Fairness {
            rep: &*self.reputation,
            load: &load,
            seed: q.seed,
            warm: &warm,
        };
        let skip = |a: &Ask| q.excluded.contains(&a.provider) || self.is_down(&a.provider);
        self.book
            .orders()
            .candidates_fair_except(
                &q.bid,
                now,
                &fair,
                crate::jobs::MAX_PROPOSALS_PER_ATTEMPT,
                &skip,
            )
            .into_iter()
            .filter_map(|r| {
                let peer = crate::jobs::peer_of(&r.ask.provider)?;
                let ad = self.book.capacity(&r.ask.provider);
                let addrs = ad
                    .map(|ad| ad.addrs.iter().filter_map(|a| a.parse().ok()).collect())
                    .unwrap_or_default();
                let warm = ad
                    .map(|ad| warm.held_inputs(ad).map(|(id, _)| *id).collect())
                    .unwrap_or_default();
                Some(Candidate {
                    ask: r.ask,
                    peer,
                    addrs,
                    warm,
                })
            })
            .collect()
    }

    pub(super) fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Negotiate(peer, addrs, propose, r) => {
                if peer == self.peer_id {
                    let _ = r.send(Err("cannot trade with itself".into()));
                    return;
                }
                let id = self
                    .swarm
                    .behaviour_mut()
                    .negotiate
                    .send_request_with_addresses(&peer, *propose, addrs);
                self.pending_negotiate.insert(id, r);
            }
            Command::Job(peer, msg, r) => {
                let id = self.swarm.behaviour_mut().job.send_request(&peer, msg);
                self.pending_job.insert(id, r);
            }
            Command::Blob(peer, req, r) => {
                let id = self.swarm.behaviour_mut().blob.send_request(&peer, req);
                self.pending_blob.insert(id, r);
            }
            Command::Settle(peer, req, r) => {
                let id = self.swarm.behaviour_mut().settle.send_request(&peer, req);
                self.pending_settle.insert(id, r);
            }
            Command::Candidates(q, r) => {
                let _ = r.send(self.candidates(&q));
            }
            Command::Offers(q, r) => {
                let now = Timestamp::now().0;
                let offers = self.book.orders().offers(&q, now);
                let _ = r.send(offers.into_iter().map(|o| o.ask).collect());
            }
            Command::Publish(msg, r) => {
                self.publish(*msg);
                let _ = r.send(());
            }
            Command::MarkDown(p, r) => {
                let until = tokio::time::Instant::now() + self.settings.down_for;
                self.down.insert(p, until);
                let now = tokio::time::Instant::now();
                self.down.retain(|_, u| *u > now);
                let _ = r.send(());
            }
            Command::ServeBlobs(peer, blobs, r) => {
                for (id, bytes) in blobs {
                    self.served.insert(id, bytes);
                    self.served_to.add(id, peer);
                }
                let _ = r.send(());
            }
            Command::UnserveBlobs(peer, ids, r) => {
                for id in ids {
                    if self.served_to.release(&id, &peer) {
                        self.served.remove(&id);
                    }
                }
                let _ = r.send(());
            }
            Command::PostAsk(spec, r) => {
                let order = self.post_ask(spec);
                self.place(order, r);
            }
            Command::PostBid(spec, r) => {
                let order = self.post_bid(spec);
                self.place(order, r);
            }
            Command::Cancel(id, r) => match self.cancel(id) {
                Ok(()) => self.after_flush(AfterFlush::Cancelled(id, r)),
                Err(e) => {
                    let _ = r.send(Err(e));
                }
            },
            Command::Flushed(then, flushed) => self.flushed(*then, flushed),
            Command::Book(r) => {
                let _ = r.send(self.book.snapshot());
            }
            Command::Stats(r) => {
                let _ = r.send(self.stats());
            }
            Command::GossipPeers(r) => {
                let topic = self.orders_topic.hash();
                let peers = self
                    .swarm
                    .behaviour()
                    .gossipsub
                    .all_peers()
                    .filter(|(_, topics)| topics.contains(&&topic))
                    .map(|(p, _)| *p)
                    .collect();
                let _ = r.send(peers);
            }
            Command::OwnOrders(r) => {
                let mut orders: Vec<OwnOrder> = self.own.values().cloned().collect();
                orders.sort_by_key(OwnOrder::order_id);
                let _ = r.send(orders);
            }
            Command::Peers(r) => {
                let _ = r.send(self.swarm.connected_peers().copied().collect());
            }
            Command::KnownPeers(r) => {
                let _ = r.send(self.store.known_peers().map_err(NodeError::from));
            }
            Command::ListenAddrs(r) => {
                let addrs = self
                    .listen_addrs
                    .iter()
                    .map(|a| with_peer(a, self.peer_id))
                    .collect();
                let _ = r.send(addrs);
            }
            Command::PeerScore(p, r) => {
                let _ = r.send(self.swarm.behaviour().gossipsub.peer_score(&p));
            }
            Command::Dial(addr, r) => {
                if let Some(Protocol::P2p(peer)) = addr.iter().last() {
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&peer, addr.clone());
                }
                let res = self
                    .swarm
                    .dial(addr)
                    .map_err(|e| NodeError::Dial(e.to_string()));
                let _ = r.send(res);
            }
            #[cfg(feature = "testing")]
            Command::PublishRaw(topic, data, r) => {
                let t = match topic {
                    RawTopic::Capacity => self.capacity_topic.clone(),
                    RawTopic::Orders => self.orders_topic.clone(),
                };
                let res = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .publish(t, data)
                    .map(|_| ())
                    .map_err(|e| NodeError::Publish(e.to_string()));
                let _ = r.send(res);
            }
            #[cfg(feature = "testing")]
            Command::ServeInSync(msgs, r) => {
                self.serve_in_sync = msgs;
                let _ = r.send(());
            }
            Command::Shutdown(_) => {} // handled in `run`
        }
    }

    pub(super) fn now_and_expiry(&self) -> (Timestamp, Timestamp) {
        let now = Timestamp::now();
        (now, now.plus_ms(ms(self.settings.order_ttl)))
    }

    pub(super) fn check_room(&self) -> Result<(), NodeError> {
        if self.own.len() + self.placing >= MAX_OWN_ORDERS {
            return Err(NodeError::TooManyOrders(MAX_OWN_ORDERS));
        }
        Ok(())
    }

    /// The ask `spec` asks for, with its order id, stored (not yet flushed).
    pub(super) fn post_ask(&mut self, spec: AskSpec) -> Result<OwnOrder, NodeError> {
        self.check_room()?;
        let (now, expires_at) = self.now_and_expiry();
        let ask = Ask {
            provider: self.public,
            order_id: 0,
            seq: 0,
            units: spec.units,
            price: spec.price,
            gpu: spec.gpu,
            region: self.settings.region.clone(),
            max_seconds: spec.max_seconds,
            created_at: now,
            expires_at,
        };
        // Check the structure before spending an order id.
        self.check_order(&ask)?;
        self.store_new(|order_id| OwnOrder::Ask(Ask { order_id, ..ask }))
    }

    /// The bid `spec` asks for, with its order id, stored (not yet flushed).
    pub(super) fn post_bid(&mut self, spec: BidSpec) -> Result<OwnOrder, NodeError> {
        self.check_room()?;
        let (now, expires_at) = self.now_and_expiry();
        let bid = Bid {
            buyer: self.public,
            order_id: 0,
            seq: 0,
            units: spec.units,
            requirements: spec.requirements,
            max_price: spec.max_price,
            max_seconds: spec.max_seconds,
            created_at: now,
            expires_at,
            model: spec.model,
        };
        self.check_order(&bid)?;
        self.store_new(|order_id| OwnOrder::Bid(Bid { order_id, ..bid }))
    }

    /// Signs and verifies `body` as a probe: a structurally invalid order is refused before it
    /// spends an order id.
    fn check_order<T: SignedMessage>(&self, body: &T) -> Result<(), NodeError> {
        Signed::sign(&self.key, &self.network, body)
            .verify(&self.network)
            .map(|_| ())
            .map_err(|e| NodeError::InvalidOrder(e.to_string()))
    }

    /// Gives the order made by `make` the next order id and stores it (not yet flushed).
    fn store_new(&mut self, make: impl FnOnce(u64) -> OwnOrder) -> Result<OwnOrder, NodeError> {
        let order_id = self.store.next_order_id()?;
        let order = make(order_id);
        self.store.put_own_order(&order)?;
        Ok(order)
    }

    /// Keeps and announces a stored order once the store is flushed, then answers `reply`.
    fn place(
        &mut self,
        order: Result<OwnOrder, NodeError>,
        reply: tokio::sync::oneshot::Sender<Result<OrderRef, NodeError>>,
    ) {
        match order {
            Ok(order) => {
                self.placing += 1;
                self.after_flush(AfterFlush::Placed(Box::new(order), reply));
            }
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }

    /// Flushes the store on the blocking pool, then comes back with [`Command::Flushed`].
    fn after_flush(&self, then: AfterFlush) {
        let store = self.store.clone();
        let tx = self.cmd_weak.clone();
        tokio::spawn(async move {
            let flushed = match tokio::task::spawn_blocking(move || store.flush()).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(NodeError::Store(e)),
                Err(_) => Err(NodeError::Stopped),
            };
            // A node that stopped meanwhile drops `then`: its caller sees `Stopped`.
            if let Some(tx) = tx.upgrade() {
                let _ = tx.send(Command::Flushed(Box::new(then), flushed)).await;
            }
        });
    }

    /// An own-order change is on disk: announce it and answer the caller.
    fn flushed(&mut self, then: AfterFlush, flushed: Result<(), NodeError>) {
        match then {
            AfterFlush::Placed(order, reply) => {
                self.placing = self.placing.saturating_sub(1);
                if let Err(e) = flushed {
                    let _ = reply.send(Err(e));
                    return;
                }
                let order_id = order.order_id();
                self.own.insert(order_id, (*order).clone());
                let announced = self.announce_orders(&[*order]).map(|()| OrderRef {
                    owner: self.public,
                    order_id,
                });
                let _ = reply.send(announced);
            }
            AfterFlush::Cancelled(order_id, reply) => {
                let _ = reply.send(flushed.and_then(|()| self.publish_cancel(order_id)));
            }
        }
    }

    /// Forgets an own order (stored, not yet flushed) so that it is no longer re-announced;
    /// its cancel is published once the store is flushed ([`Self::publish_cancel`]).
    pub(super) fn cancel(&mut self, order_id: u64) -> Result<(), NodeError> {
        if !self.own.contains_key(&order_id) {
            return Err(NodeError::UnknownOrder(order_id));
        }
        self.store.remove_own_order(order_id)?;
        self.own.remove(&order_id);
        Ok(())
    }

    /// Signs, folds and publishes the cancel of an own order.
    fn publish_cancel(&mut self, order_id: u64) -> Result<(), NodeError> {
        let (now, expires_at) = self.now_and_expiry();
        let cancel = Cancel {
            owner: self.public,
            order_id,
            seq: self.store.next_seq(now.0)?,
            created_at: now,
            expires_at,
        };
        let signed = Signed::sign(&self.key, &self.network, &cancel);
        let msg = GossipMessage::Cancel(signed.clone());
        self.fold_own(msg.clone(), VerifiedGossip::Cancel(cancel));
        // A queued re-announcement of the cancelled order must not go out after the cancel.
        self.unpublished
            .retain(|m| queue_key(m) != (1, Some(order_id)));
        self.publish(msg);
        Ok(())
    }
}
