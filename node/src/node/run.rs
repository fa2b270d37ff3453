//! The swarm task's loop: events, commands and timers, and its shutdown.

use futures::StreamExt;
use hashgrid_protocol::Timestamp;
use libp2p::PeerId;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::event::NodeEvent;
use crate::network::{HEARTBEAT_INITIAL_DELAY, MAX_SYNC_MESSAGES, SyncRequest};

use super::addr::{dial_addr, dial_known};
use super::command::Command;
use super::lag::LAG_PROBE_EVERY;
use super::settings::{
    ANTI_ENTROPY_FAST, ANTI_ENTROPY_FAST_FOR, ANTI_ENTROPY_INTERVAL, EARLY_REANNOUNCE_HEARTBEATS,
    PUBLISH_RETRY_INTERVAL, WARM_ANNOUNCE_EVERY,
};
use super::state::{NodeLoop, REDIAL_MAX, Redial};

impl NodeLoop {
    pub(super) fn emit(&self, ev: NodeEvent) {
        // Err only means nobody is subscribed.
        let _ = self.events.send(ev);
    }

    pub(super) async fn run(mut self, mut cmd_rx: mpsc::Receiver<Command>) {
        let reannounce_every = self.settings.order_ttl / 3;
        // A changed warm list is announced at most this often (the cache write happens beside
        // the job; a check a few seconds later sees it).
        let mut warm_check = tokio::time::interval(WARM_ANNOUNCE_EVERY);
        warm_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut reannounce = tokio::time::interval_at(
            tokio::time::Instant::now() + reannounce_every,
            reannounce_every,
        );
        let mut sweep = tokio::time::interval(self.settings.sweep_interval);
        let mut retry = tokio::time::interval(PUBLISH_RETRY_INTERVAL);
        let mut walk = tokio::time::interval(self.settings.kad_walk_interval);
        let mut entropy = tokio::time::interval_at(
            tokio::time::Instant::now() + ANTI_ENTROPY_FAST,
            ANTI_ENTROPY_FAST,
        );
        let mut entropy_slow = false;
        let every = self.settlement.interval();
        let mut settle_tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        let settle_due = self.settlement.due_signal();
        for t in [
            &mut settle_tick,
            &mut reannounce,
            &mut sweep,
            &mut retry,
            &mut walk,
            &mut entropy,
        ] {
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
        // Early re-announcements (see the module docs): after the first meshes have formed.
        let hb = self.settings.heartbeat;
        let started = tokio::time::Instant::now();
        let mut early: std::collections::VecDeque<tokio::time::Instant> =
            EARLY_REANNOUNCE_HEARTBEATS
                .iter()
                .map(|n| started + hb * *n + HEARTBEAT_INITIAL_DELAY)
                .collect();
        let mut lag_probe = tokio::time::interval(LAG_PROBE_EVERY);
        lag_probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let shutdown_reply = loop {
            tokio::select! {
                due = lag_probe.tick() => self.lag.record(due.elapsed()),
                ev = self.swarm.select_next_some() => self.on_swarm_event(ev),
                cmd = cmd_rx.recv() => match cmd {
                    None => break None,
                    Some(Command::Shutdown(reply)) => break Some(reply),
                    Some(cmd) => self.on_command(cmd),
                },
                Some(r) = self.responses.recv() => self.respond(r),
                _ = warm_check.tick(), if self.settings.executor.is_some() => {
                    // New weights in the cache, or a model learned from a dispatch: say so
                    // before the next periodic ad (only if the ad changes).
                    if self.warm_ids() != self.warm_announced
                        && let Err(e) = self.announce_capacity()
                    {
                        warn!(error = %e, "cannot announce capacity");
                    }
                }
                _ = reannounce.tick() => self.announce_all(),
                _ = entropy.tick() => {
                    self.redial();
                    self.fill_peers();
                    self.pull_random_peer();
                    if !entropy_slow && started.elapsed() >= ANTI_ENTROPY_FAST_FOR {
                        entropy_slow = true;
                        entropy = tokio::time::interval_at(
                            tokio::time::Instant::now() + ANTI_ENTROPY_INTERVAL,
                            ANTI_ENTROPY_INTERVAL,
                        );
                        entropy.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    }
                }
                _ = tokio::time::sleep_until(early.front().copied().unwrap_or(started)), if !early.is_empty() => {
                    early.pop_front();
                    self.announce_all();
                }
                _ = sweep.tick() => self.sweep(),
                _ = settle_tick.tick() => self.spawn_settle_pass(),
                () = settle_due.notified() => self.spawn_settle_pass(),
                _ = retry.tick(), if !self.unpublished.is_empty() => self.retry_publish(),
                _ = walk.tick() => {
                    self.swarm.behaviour_mut().kad.get_closest_peers(PeerId::random());
                }
            }
        };
        // 1. Stop accepting commands; answer the queued ones. A settlement pass in flight
        // stops at its next await (every state it wrote was flushed as it went).
        if let Some(t) = self.settle_task.take() {
            t.abort();
        }
        cmd_rx.close();
        while let Ok(cmd) = cmd_rx.try_recv() {
            if let Command::Shutdown(r) = cmd {
                let _ = r.send(());
            }
            // Other replies are dropped: their callers see NodeError::Stopped.
        }
        // 2. Nothing more is published: the loop and its timers are gone.
        // 3. Stop the provider service: its queue closes, it flushes its store writes and
        //    drops its handle on the store; answers it still sends go nowhere.
        self.provider = None;
        self.responses.close();
        if let Some(done) = self.provider_done.take() {
            let _ = done.await;
        }
        // 4. Flush the store.
        if let Err(e) = self.store.flush() {
            warn!(error = %e, "store flush at shutdown failed");
        }
        // 5. Close the swarm (listeners and connections).
        let NodeLoop {
            swarm,
            store,
            slot,
            settlement,
            lag: self_lag,
            ..
        } = self;
        drop(swarm);
        settlement.close();
        if let Some(slot) = slot {
            slot.close();
        }
        drop(store);
        let lag = self_lag.snapshot();
        info!(
            samples = lag.samples,
            longest_ms = lag.max.as_millis() as u64,
            p99_ms = lag.p99.as_millis() as u64,
            "node stopped (swarm task stalls)"
        );
        // 6. Answer the shutdown call.
        if let Some(r) = shutdown_reply {
            let _ = r.send(());
        }
    }

    /// Pulls the book of one random connected peer (anti-entropy).
    /// While fewer than the target peers are connected, dials sites this node knows from
    /// their capacity ads (random ones, not connected, not marked down, not already being
    /// dialled), up to the shortfall. Runs with the anti-entropy timer: every 500 ms at start,
    /// every 30 s after.
    pub(super) fn fill_peers(&mut self) {
        let target = self.settings.target_peers;
        let connected = self.swarm.connected_peers().count();
        let pending = self
            .swarm
            .network_info()
            .connection_counters()
            .num_pending_outgoing() as usize;
        if connected + pending >= target {
            return;
        }
        let mut known: Vec<(PeerId, Vec<libp2p::Multiaddr>)> = self
            .book
            .capacity_ads()
            .filter(|ad| ad.provider != self.public && !self.is_down(&ad.provider))
            .filter_map(|ad| {
                let peer = crate::jobs::peer_of(&ad.provider)?;
                let addrs: Vec<libp2p::Multiaddr> =
                    ad.addrs.iter().filter_map(|a| a.parse().ok()).collect();
                (!self.swarm.is_connected(&peer) && !addrs.is_empty()).then_some((peer, addrs))
            })
            .collect();
        // A random few: every node filling from the same book must not pick the same sites.
        let mut seed = Timestamp::now().0
            ^ u64::from_le_bytes(self.public.0[..8].try_into().unwrap_or([0; 8]));
        for i in (1..known.len()).rev() {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let j = usize::try_from((seed >> 33) % (i as u64 + 1)).unwrap_or(0);
            known.swap(i, j);
        }
        for (peer, addrs) in known.into_iter().take(target - connected - pending) {
            let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(peer)
                .addresses(addrs)
                .condition(libp2p::swarm::dial_opts::PeerCondition::DisconnectedAndNotDialing)
                .build();
            if let Err(e) = self.swarm.dial(opts) {
                debug!(%peer, error = %e, "could not dial a site from its ad");
            }
        }
    }

    /// Dials the bootstrap peers and the peers met before (from the store) again if this node
    /// has no peer (see [`Redial`]).
    pub(super) fn redial(&mut self) {
        let now = tokio::time::Instant::now();
        if self.swarm.connected_peers().next().is_some() {
            self.redial = Redial::default();
            return;
        }
        let dialling = self
            .swarm
            .network_info()
            .connection_counters()
            .num_pending_outgoing()
            > 0;
        if dialling || now < self.redial.next {
            return;
        }
        let known = self.store.known_peers().unwrap_or_else(|e| {
            warn!(error = %e, "cannot read the peers met before");
            Vec::new()
        });
        let own = *self.swarm.local_peer_id();
        if self.settings.bootstrap.is_empty() && known.iter().all(|(p, _)| *p == own) {
            return;
        }
        debug!(after = ?self.redial.backoff, "no peers: dialling the bootstrap and known peers again");
        self.redial.backoff = (self.redial.backoff * 2).min(REDIAL_MAX);
        self.redial.next = now + self.redial.backoff;
        for addr in self.settings.bootstrap.clone() {
            dial_addr(&mut self.swarm, addr);
        }
        dial_known(&mut self.swarm, own, known);
    }

    pub(super) fn pull_random_peer(&mut self) {
        let peers: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
        if peers.is_empty() {
            return;
        }
        let pick = usize::try_from(Timestamp::now().0 % peers.len() as u64).unwrap_or(0);
        let peer = peers[pick];
        self.swarm.behaviour_mut().sync.send_request(
            &peer,
            SyncRequest {
                max: MAX_SYNC_MESSAGES as u32,
            },
        );
    }
}
