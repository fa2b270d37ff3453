//! Swarm events and the direct protocols' requests and responses.

use hashgrid_protocol::Ask;
use libp2p::gossipsub::{self};
use libp2p::request_response;
use libp2p::swarm::SwarmEvent;
use libp2p::{identify, kad, mdns};
use tokio::sync::mpsc;
use tracing::{Instrument, debug, info, warn};

use crate::event::NodeEvent;
use crate::jobs::blobs::chunk_of;
use crate::jobs::service::{ProviderRequest, Response};
use crate::network::{BehaviourEvent, MAX_SYNC_MESSAGES, SyncRequest, SyncResponse};
use crate::store::OwnOrder;
use hashgrid_protocol::exchange::{
    BlobReply, BlobRequest, JobMessage, JobReply, NegotiateReply, Propose, SettleReply,
    SettleRequest,
};

use super::addr::with_peer;
use super::command::{Net, split_event};
use super::state::NodeLoop;

impl NodeLoop {
    pub(super) fn on_swarm_event(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        {
            use libp2p::metrics::Recorder;
            let m = self.metrics.libp2p();
            match &ev {
                SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(e)) => m.record(e),
                SwarmEvent::Behaviour(BehaviourEvent::Identify(e)) => m.record(e),
                SwarmEvent::Behaviour(BehaviourEvent::Kad(e)) => m.record(e),
                SwarmEvent::Behaviour(BehaviourEvent::Ping(e)) => m.record(e),
                _ => {}
            }
            m.record(&ev);
        }
        match ev {
            SwarmEvent::NewListenAddr { address, .. } if !self.listen_addrs.contains(&address) => {
                info!(addr = %with_peer(&address, self.peer_id), "listening");
                self.listen_addrs.push(address.clone());
                self.emit(NodeEvent::Listening(with_peer(&address, self.peer_id)));
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listen_addrs.retain(|a| *a != address);
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                num_established,
                endpoint,
                ..
            } => {
                if num_established.get() == 1 {
                    debug!(peer = %peer_id, addr = %endpoint.get_remote_address(), "connected");
                    self.emit(NodeEvent::PeerConnected(peer_id));
                }
                // An address this node dialled and reached is one to dial again after a
                // restart, whether or not the peer's identify info arrives before it goes.
                if let libp2p::core::ConnectedPoint::Dialer { address, .. } = &endpoint {
                    let addr: libp2p::Multiaddr = address
                        .iter()
                        .filter(|p| !matches!(p, libp2p::multiaddr::Protocol::P2p(_)))
                        .collect();
                    if let Err(e) = self.store.add_peer_addr(&peer_id, &addr) {
                        warn!(error = %e, "cannot store a peer address");
                    }
                }
                if self.synced.insert(peer_id) {
                    self.swarm.behaviour_mut().sync.send_request(
                        &peer_id,
                        SyncRequest {
                            max: MAX_SYNC_MESSAGES as u32,
                        },
                    );
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                self.synced.remove(&peer_id);
                self.bad_sync.remove(&peer_id);
                debug!(peer = %peer_id, "disconnected");
                self.emit(NodeEvent::PeerDisconnected(peer_id));
            }
            SwarmEvent::Behaviour(ev) => self.on_behaviour_event(ev),
            _ => {}
        }
    }

    pub(super) fn on_behaviour_event(&mut self, ev: BehaviourEvent) {
        match ev {
            BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            }) => self.on_gossip(propagation_source, message_id, message),
            BehaviourEvent::Sync(request_response::Event::Message { peer, message, .. }) => {
                match message {
                    request_response::Message::Request {
                        request, channel, ..
                    } => {
                        let max = (request.max as usize).min(MAX_SYNC_MESSAGES);
                        #[allow(unused_mut)]
                        let mut messages = self.book.signed_messages(max);
                        #[cfg(feature = "testing")]
                        messages.extend(self.serve_in_sync.iter().cloned());
                        let resp = SyncResponse {
                            messages: crate::network::sync::fit(messages),
                        };
                        // Err: the peer went away; nothing to do.
                        let _ = self.swarm.behaviour_mut().sync.send_response(channel, resp);
                    }
                    request_response::Message::Response { response, .. } => {
                        self.on_sync_response(peer, response)
                    }
                }
            }
            // A peer subscribed: messages queued for lack of subscribers can go out now
            // rather than at the next retry tick.
            BehaviourEvent::Gossipsub(gossipsub::Event::Subscribed { .. })
                if !self.unpublished.is_empty() =>
            {
                self.retry_publish();
            }
            BehaviourEvent::Negotiate(ev) => self.on_negotiate_event(ev),
            BehaviourEvent::Job(ev) => self.on_job_event(ev),
            BehaviourEvent::Blob(ev) => self.on_blob_event(ev),
            BehaviourEvent::Settle(ev) => self.on_settle_event(ev),
            BehaviourEvent::Sync(request_response::Event::OutboundFailure {
                peer, error, ..
            }) => {
                debug!(%peer, %error, "book sync request failed");
            }
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
                if info.protocols.contains(&crate::network::KAD_PROTOCOL) {
                    for a in &info.listen_addrs {
                        self.swarm
                            .behaviour_mut()
                            .kad
                            .add_address(&peer_id, a.clone());
                    }
                }
                if let Err(e) = self.store.put_peer_addrs(&peer_id, &info.listen_addrs) {
                    warn!(error = %e, "cannot store peer addresses");
                }
            }
            BehaviourEvent::Mdns(mdns::Event::Discovered(found)) => {
                for (peer, addr) in found {
                    if peer == self.peer_id {
                        continue;
                    }
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&peer, addr.clone());
                    if !self.swarm.is_connected(&peer) {
                        let _ = self.swarm.dial(addr);
                    }
                }
            }
            BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                result: kad::QueryResult::GetClosestPeers(Ok(ok)),
                ..
            }) => {
                debug!(found = ok.peers.len(), "random walk done");
            }
            _ => {}
        }
    }
}

/// Handlers of the direct job protocols.
impl NodeLoop {
    pub(super) fn own_ask(&self, order_id: u64) -> Option<Ask> {
        match self.own.get(&order_id) {
            Some(OwnOrder::Ask(a)) => Some(Ask {
                region: self.settings.region.clone(),
                ..a.clone()
            }),
            _ => None,
        }
    }

    pub(super) fn on_negotiate_event(
        &mut self,
        ev: request_response::Event<Propose, NegotiateReply>,
    ) {
        let Some((peer, request, channel)) =
            split_event(&mut self.pending_negotiate, ev, "proposal")
        else {
            return;
        };
        let ask = self.own_ask(request.ask.order_id);
        self.hand_to_provider(ProviderRequest::Propose {
            peer,
            request: Box::new(request),
            ask,
            channel,
        });
    }

    pub(super) fn on_job_event(&mut self, ev: request_response::Event<JobMessage, JobReply>) {
        let Some((peer, request, channel)) = split_event(&mut self.pending_job, ev, "job request")
        else {
            return;
        };
        self.hand_to_provider(ProviderRequest::Job {
            peer,
            request,
            channel,
        });
    }

    pub(super) fn on_blob_event(&mut self, ev: request_response::Event<BlobRequest, BlobReply>) {
        let Some((peer, request, channel)) =
            split_event(&mut self.pending_blob, ev, "blob request")
        else {
            return;
        };
        // An input this node serves as a buyer is in memory: answered here. Anything else is
        // an output of the provider's (read from its store): the provider service answers.
        match self.served.get(&request.id) {
            Some(bytes) if self.served_to.allows(&request.id, &peer) => {
                let reply = chunk_of(bytes, &request);
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .blob
                    .send_response(channel, reply);
            }
            _ => self.hand_to_provider(ProviderRequest::Blob {
                peer,
                request,
                channel,
            }),
        }
    }

    /// Hands a request to the provider service, or refuses it at once when the service's
    /// queue is full or it has stopped: the swarm task never waits for it.
    fn hand_to_provider(&mut self, req: ProviderRequest) {
        let Some(tx) = &self.provider else {
            self.metrics.refused(req.protocol(), "stopping");
            self.respond(req.refuse("the node is stopping"));
            return;
        };
        match tx.try_send(req) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(req)) => {
                debug!("provider queue full; refusing a request");
                self.metrics.refused(req.protocol(), "provider_busy");
                self.respond(req.refuse("the provider is busy; try again"));
            }
            Err(mpsc::error::TrySendError::Closed(req)) => {
                self.metrics.refused(req.protocol(), "stopping");
                self.respond(req.refuse("the node is stopping"));
            }
        }
    }

    /// Sends the provider service's answer.
    pub(super) fn respond(&mut self, r: Response) {
        // Err: the peer went away; it polls again or re-matches.
        let b = self.swarm.behaviour_mut();
        let _ = match r {
            Response::Negotiate(c, reply) => b.negotiate.send_response(c, reply).map_err(|_| ()),
            Response::Job(c, reply) => b.job.send_response(c, reply).map_err(|_| ()),
            Response::Blob(c, reply) => b.blob.send_response(c, reply).map_err(|_| ()),
            Response::Settle(c, reply) => b.settle.send_response(c, reply).map_err(|_| ()),
        };
    }
}

impl NodeLoop {
    pub(super) fn on_settle_event(
        &mut self,
        ev: request_response::Event<SettleRequest, SettleReply>,
    ) {
        let Some((peer, request, channel)) =
            split_event(&mut self.pending_settle, ev, "settle request")
        else {
            return;
        };
        let Some(tx) = self.cmd_weak.upgrade() else {
            return;
        };
        // Answered on the blocking pool (it reads and appends flushed ledger records), and
        // sent back through the responses queue.
        let (s, responses) = (self.settlement.clone(), self.responses_tx.clone());
        tokio::task::spawn_blocking(move || {
            let reply = s.on_request(peer, request, &Net { tx });
            let _ = responses.blocking_send(Response::Settle(channel, reply));
        });
    }

    /// Starts a settlement pass unless one is still running.
    pub(super) fn spawn_settle_pass(&mut self) {
        if self.settle_task.as_ref().is_some_and(|t| !t.is_finished()) {
            return;
        }
        let Some(tx) = self.cmd_weak.upgrade() else {
            return;
        };
        let s = self.settlement.clone();
        self.settle_task = Some(tokio::spawn(
            async move { s.pass(&Net { tx }).await }.in_current_span(),
        ));
    }
}
