//! A buyer following a running job's streamed buffers (the tokens a model has generated so
//! far) beside its progress poll.

use hashgrid_protocol::ContentId;
use hashgrid_protocol::PublicKey;
use hashgrid_protocol::exchange::{JobMessage, JobReply};
use libp2p::PeerId;
use std::time::Duration;
use tokio::sync::broadcast;
use tracing::{debug, warn};

use crate::event::NodeEvent;
use crate::node::command::Net;

/// Aborts a spawned task when dropped.
pub(super) struct AbortOnDrop(pub(super) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Follows a running job's streamed buffers with long polls and reports each new check as
/// [`NodeEvent::JobStream`], until the provider says the job is no longer running. A chunk
/// naming a buffer the job does not stream, or larger than that buffer, ends the stream (the
/// job itself goes on and is judged by its receipt).
pub(super) async fn poll_stream(
    net: Net,
    events: broadcast::Sender<NodeEvent>,
    peer: PeerId,
    agreement: ContentId,
    job: ContentId,
    provider: PublicKey,
    names: Vec<(String, u64)>,
) {
    let mut seen = 0u32;
    let mut errors = 0u32;
    loop {
        let chunk = match net.job(peer, JobMessage::Stream { agreement, seen }).await {
            Ok(JobReply::Stream(c)) => {
                errors = 0;
                c
            }
            Ok(other) => {
                debug!(?other, "the provider does not stream this job");
                return;
            }
            Err(e) => {
                errors += 1;
                if errors >= 3 {
                    debug!(error = %e, "stream poll failed");
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200 * u64::from(errors))).await;
                continue;
            }
        };
        if chunk.iterations > seen {
            let fits = chunk.buffers.iter().all(|b| {
                names
                    .iter()
                    .any(|(n, size)| *n == b.name && b.bytes.0.len() as u64 <= *size)
            });
            if !fits {
                warn!(provider = %provider.short(), "streamed buffers do not match the job; ignoring its stream");
                return;
            }
            seen = chunk.iterations;
            let _ = events.send(NodeEvent::JobStream(super::JobStream {
                job,
                provider,
                iterations: chunk.iterations,
                buffers: chunk
                    .buffers
                    .into_iter()
                    .map(|b| (b.name, b.bytes.0))
                    .collect(),
            }));
        }
        if chunk.finished {
            return;
        }
    }
}
