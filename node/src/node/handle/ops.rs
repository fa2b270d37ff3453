//! [`OpsHandle`], [`ProviderHandle`] and [`DurableHandle`]: operating a node, what it holds
//! as a provider, and its durable events.

use std::sync::Arc;

use hashgrid_protocol::ContentId;

use crate::error::NodeError;
use crate::event::DurableEvent;
use crate::store::Store;

use super::super::command::Command;
use super::NodeHandle;

/// Figures for operating the node: stats, metrics, the swarm task's stalls, inbound budgets ([`NodeHandle::ops`]).
#[derive(Clone, Copy)]
pub struct OpsHandle<'a> {
    pub(super) node: &'a NodeHandle,
}

impl<'a> OpsHandle<'a> {
    /// The book's and the connections' figures (O(providers + peers), not O(book): for
    /// dashboards and metrics).
    pub async fn stats(&self) -> Result<super::super::NodeStats, NodeError> {
        self.node.request(Command::Stats).await
    }

    /// The node's Prometheus metrics (counters; [`OpsHandle::render_metrics`] refreshes the
    /// gauges and renders them).
    pub fn metrics(&self) -> &'a Arc<crate::ops::Metrics> {
        &self.node.inner.metrics
    }

    /// Refreshes the gauges read at scrape time (book, peers, queue, store, cache, what is
    /// owed) and appends every metric in the OpenMetrics text format, without `# EOF`.
    pub async fn render_metrics(&self, out: &mut String) -> Result<(), NodeError> {
        let s = self.stats().await?;
        let (disk, mem) = self.node.inner.inputs.bytes();
        let mut owed_to_us = [0u64; 5];
        let mut owed_by_us = 0u64;
        for p in self.node.inner.settlement.positions().values() {
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
        let store_bytes = self.node.inner.store.with(Store::size_on_disk).unwrap_or(0);
        let m = &self.node.inner.metrics;
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
            models_held: self.node.inner.inputs.held_models().len() as u64,
            swarm_max_stall_us: u64::try_from(self.node.inner.lag.snapshot().max.as_micros())
                .unwrap_or(u64::MAX),
            owed_to_us_msat: owed_to_us,
            owed_by_us_msat: owed_by_us,
            lightning: self.node.inner.settlement.lightning_readings().await,
        });
        m.sync_inbound_refusals(self.node.inner.inbound.refused());
        m.encode_into(out);
        Ok(())
    }

    /// The budget for bytes of inbound requests being read: its use now, its peak and how
    /// many requests it refused.
    pub fn inbound_budget(&self) -> &'a crate::network::exchange::InboundBudget {
        &self.node.inner.inbound
    }

    /// How late the swarm task has polled so far: its longest stall and the distribution
    /// (sampled every [`LAG_PROBE_EVERY`](crate::node::LAG_PROBE_EVERY)).
    pub fn loop_lag(&self) -> super::super::LagSnapshot {
        self.node.inner.lag.snapshot()
    }
}

/// What this node holds as a provider ([`NodeHandle::provider`]).
#[derive(Clone, Copy)]
pub struct ProviderHandle<'a> {
    pub(super) node: &'a NodeHandle,
}

impl<'a> ProviderHandle<'a> {
    /// The input blobs (model weights) this provider holds in its cache, most recently used
    /// first: what its capacity ad lists as warm (less the blobs of the models it lists).
    pub fn warm_inputs(&self) -> Vec<ContentId> {
        self.node.inner.inputs.ids()
    }

    /// The ids of the models this provider holds in full, most recently used first: what its
    /// capacity ad lists as `models`.
    pub fn warm_models(&self) -> Vec<ContentId> {
        self.node
            .inner
            .inputs
            .held_models()
            .into_iter()
            .map(|(id, _)| id)
            .collect()
    }

    /// Bytes in this provider's input cache: on disk, in memory.
    pub fn input_cache_bytes(&self) -> (u64, u64) {
        self.node.inner.inputs.bytes()
    }
}

/// Durable events: money earned, owed or paid and jobs' ends, delivered at least once across restarts ([`NodeHandle::durable`]).
#[derive(Clone, Copy)]
pub struct DurableHandle<'a> {
    pub(super) node: &'a NodeHandle,
}

impl<'a> DurableHandle<'a> {
    /// The oldest event not yet acknowledged, with its id: money earned, owed or paid, a job's
    /// end ([`DurableEvent`]). It stays the oldest until [`handled`](Self::handled)
    /// acknowledges it, across restarts of the node (delivered at least once).
    pub fn next(&self) -> Result<Option<(u64, DurableEvent)>, NodeError> {
        self.node.store(|s| s.next_event())
    }

    /// Waits for the oldest event not yet acknowledged (see [`next`](Self::next)).
    pub async fn wait_next(&self) -> Result<(u64, DurableEvent), NodeError> {
        let pushed = self.node.store(|s| Ok(s.events_pushed()))?;
        loop {
            // Registered before looking, so a push in between is not missed.
            let notified = pushed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(e) = self.next()? {
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
    pub fn handled(&self, id: u64) -> Result<bool, NodeError> {
        self.node.store(|s| s.event_handled(id))
    }
}
