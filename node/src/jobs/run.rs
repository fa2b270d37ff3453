//! A provider's job task: gathers the inputs (cache or buyer), runs the job on the executor
//! with its streamed buffers sent on, and reports back to the node's task over [`Internal`].

use std::collections::BTreeMap;
use std::sync::Arc;

use hashgrid_protocol::exchange::{InlineBlob, JobPhase};
use hashgrid_protocol::{ContentId, JobSpec, ModelManifest, Timestamp};
use libp2p::PeerId;
use tokio::sync::mpsc;

use super::cache::InputCache;
use crate::executor::{ExecError, Executor, JobOutput, StreamUpdate};
use crate::node::command::Net;

use super::blobs::fetch_blob;

/// Messages from job tasks to the node's task.
#[derive(Debug)]
pub(crate) enum Internal {
    Phase(ContentId, JobPhase),
    /// Inputs ready: what came from the buyer and what from the cache.
    Inputs(ContentId, InputStats),
    /// A streaming loop's check read its buffers back (sent with `try_send`: each update
    /// carries the whole buffers, so a dropped one loses nothing).
    Stream(ContentId, StreamUpdate),
    Finished {
        agreement: ContentId,
        started_at: Timestamp,
        finished_at: Timestamp,
        result: Result<JobOutput, String>,
    },
}

/// Where a job's input blobs came from (inline inputs not counted).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct InputStats {
    pub(crate) fetched_blobs: u64,
    pub(crate) fetched_bytes: u64,
    pub(crate) cached_blobs: u64,
    pub(crate) cached_bytes: u64,
}

impl Internal {
    /// The job it is about.
    pub(crate) fn agreement(&self) -> ContentId {
        match self {
            Internal::Phase(a, _) | Internal::Inputs(a, _) | Internal::Stream(a, _) => *a,
            Internal::Finished { agreement, .. } => *agreement,
        }
    }
}

pub(crate) struct RunTask {
    pub(crate) cache: Arc<InputCache>,
    pub(crate) exec: Executor,
    pub(crate) net: Net,
    pub(crate) internal: mpsc::Sender<Internal>,
    pub(crate) agreement: ContentId,
    pub(crate) buyer: PeerId,
    pub(crate) spec: JobSpec,
    pub(crate) inline: Vec<InlineBlob>,
    /// The manifest of the model among the inputs (checked against the spec).
    pub(crate) model: Option<ModelManifest>,
}

impl RunTask {
    pub(crate) async fn run(self) {
        let agreement = self.agreement;
        let internal = self.internal.clone();
        let started_at = Timestamp::now();
        let result = self.execute().await;
        let finished_at = Timestamp::now();
        let msg = Internal::Finished {
            agreement,
            started_at: result.as_ref().map_or(started_at, |(s, _)| *s),
            finished_at,
            result: result.map(|(_, o)| o),
        };
        // Err: the node stopped; the job is failed at the next start.
        let _ = internal.send(msg).await;
    }

    async fn execute(self) -> Result<(Timestamp, JobOutput), String> {
        let mut inputs: crate::executor::SharedInputs = BTreeMap::new();
        for b in self.inline {
            let got = ContentId::of(&b.bytes.0);
            if got != b.id {
                return Err(format!("inline input hashes to {got}, not {}", b.id));
            }
            inputs.insert(b.id, Arc::new(b.bytes.0));
        }
        let missing: Vec<(ContentId, u64)> = self
            .spec
            .buffers
            .iter()
            .filter_map(|b| match b.init {
                hashgrid_protocol::BufferInit::Blob(id) if !inputs.contains_key(&id) => {
                    Some((id, b.size))
                }
                _ => None,
            })
            .collect();
        let mut stats = InputStats::default();
        if !missing.is_empty() {
            let _ = self
                .internal
                .send(Internal::Phase(self.agreement, JobPhase::Fetching))
                .await;
            for (id, size) in missing {
                if inputs.contains_key(&id) {
                    continue;
                }
                let cache = self.cache.clone();
                let hit = tokio::task::spawn_blocking(move || cache.get(&id))
                    .await
                    .ok()
                    .flatten()
                    .filter(|b| b.len() as u64 == size);
                if let Some(bytes) = hit {
                    stats.cached_blobs += 1;
                    stats.cached_bytes += size;
                    inputs.insert(id, bytes);
                    continue;
                }
                let bytes = Arc::new(
                    fetch_blob(&self.net, self.buyer, id, size)
                        .await
                        .map_err(|e| format!("input {id}: {e}"))?,
                );
                stats.fetched_blobs += 1;
                stats.fetched_bytes += size;
                // `fetch_blob` checked the hash; caching runs beside the job.
                if bytes.len() >= super::cache::MIN_CACHED_BYTES {
                    let (cache, shared) = (self.cache.clone(), bytes.clone());
                    tokio::task::spawn_blocking(move || cache.put(id, shared));
                }
                inputs.insert(id, bytes);
            }
        }
        if let Some(m) = self.model {
            // Every input is here (and being cached): from the next capacity ad on, the model
            // is listed instead of its blobs.
            let cache = self.cache.clone();
            tokio::task::spawn_blocking(move || cache.learn_model(m));
        }
        let _ = self
            .internal
            .send(Internal::Inputs(self.agreement, stats))
            .await;
        let _ = self
            .internal
            .send(Internal::Phase(self.agreement, JobPhase::Running))
            .await;
        let started = Timestamp::now();
        let buyer = self.buyer.to_string();
        let sink = super::network_streams(&self.spec).is_some().then(|| {
            let internal = self.internal.clone();
            let agreement = self.agreement;
            Box::new(move |u: StreamUpdate| {
                let _ = internal.try_send(Internal::Stream(agreement, u));
                true
            }) as Box<crate::executor::StreamSink>
        });
        let out = self
            .exec
            .run_shared(&buyer, self.spec, inputs, sink)
            .await
            .map_err(|e: ExecError| e.to_string())?;
        Ok((started, out))
    }
}
