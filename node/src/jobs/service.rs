//! The provider as a service on its own thread.
//!
//! The swarm task owns the `Swarm` and answers nothing itself: an inbound proposal, job
//! message or request for an output blob leaves it as a [`ProviderRequest`] with its response
//! channel, and the answer comes back as a [`Response`] that the swarm task only sends. What
//! answering costs stays here: naga parsing a proposal's WGSL (up to 4 MiB), sled flushes
//! (fsync) when a job is accepted, fails or is countersigned, signing and storing receipts,
//! reading output blobs. The service runs on a thread of its own (driving its async loop with
//! the runtime's handle), so those blocking calls stall neither the swarm task nor a runtime
//! worker; job runs are still spawned on the runtime.
//!
//! Its inputs are bounded queues: the swarm task hands requests over with `try_send`, and a
//! full queue (a provider overwhelmed, or a flood) is answered at once with a refusal rather
//! than by waiting.

use std::time::Duration;

use hashgrid_protocol::Ask;
use hashgrid_protocol::exchange::{
    BlobReply, BlobRequest, JobMessage, JobReply, NegotiateReply, Propose, Reject, RejectReason,
    SettleReply,
};
use libp2p::PeerId;
use libp2p::request_response::ResponseChannel;
use tokio::sync::{mpsc, oneshot};
use tracing::{Instrument, debug, warn};

use super::provider::{Answer, Internal, Provider};
use crate::node::command::{Command, Net};

/// Requests queued for the provider service before the swarm task refuses more.
pub(crate) const PROVIDER_QUEUE: usize = 1024;

/// An inbound request for the provider, with the channel its answer goes to.
pub(crate) enum ProviderRequest {
    /// `/hashgrid/negotiate/1`, with this node's live ask the proposal names (if any).
    Propose {
        peer: PeerId,
        request: Box<Propose>,
        ask: Option<Ask>,
        channel: ResponseChannel<NegotiateReply>,
    },
    /// `/hashgrid/job/1`.
    Job {
        peer: PeerId,
        request: JobMessage,
        channel: ResponseChannel<JobReply>,
    },
    /// `/hashgrid/blob/1` for a blob this node does not serve as a buyer (an output).
    Blob {
        peer: PeerId,
        request: BlobRequest,
        channel: ResponseChannel<BlobReply>,
    },
}

impl ProviderRequest {
    /// The peer that sent it.
    pub(crate) fn peer(&self) -> PeerId {
        match self {
            ProviderRequest::Propose { peer, .. }
            | ProviderRequest::Job { peer, .. }
            | ProviderRequest::Blob { peer, .. } => *peer,
        }
    }

    /// The protocol it came on (a metrics label).
    pub(crate) fn protocol(&self) -> &'static str {
        match self {
            ProviderRequest::Propose { .. } => "negotiate",
            ProviderRequest::Job { .. } => "job",
            ProviderRequest::Blob { .. } => "blob",
        }
    }

    /// The answer when the service cannot take the request (its queue is full, or it stopped).
    pub(crate) fn refuse(self, why: &str) -> Response {
        match self {
            ProviderRequest::Propose { channel, .. } => Response::Negotiate(
                channel,
                NegotiateReply::Reject(Reject {
                    reason: RejectReason::NoCapacity,
                    detail: why.into(),
                }),
            ),
            ProviderRequest::Job { channel, .. } => {
                Response::Job(channel, JobReply::Refused(why.into()))
            }
            ProviderRequest::Blob { channel, .. } => Response::Blob(channel, BlobReply::NotFound),
        }
    }
}

/// An answer for the swarm task to send (from the provider service, or a settlement request
/// answered on the blocking pool).
pub(crate) enum Response {
    Negotiate(ResponseChannel<NegotiateReply>, NegotiateReply),
    Job(ResponseChannel<JobReply>, JobReply),
    Blob(ResponseChannel<BlobReply>, BlobReply),
    Settle(ResponseChannel<SettleReply>, SettleReply),
}

/// The service's ends of its queues.
pub(crate) struct Queues {
    pub(crate) requests: mpsc::Receiver<ProviderRequest>,
    pub(crate) internal: mpsc::Receiver<Internal>,
    pub(crate) responses: mpsc::Sender<Response>,
    /// The node's command queue, for the job tasks' requests to peers (weak: the service does
    /// not keep a stopped node alive).
    pub(crate) commands: mpsc::WeakSender<Command>,
}

/// Starts the service on its own thread; the returned receiver completes once it has stopped
/// (its request queue closed) and dropped everything it held, the store included.
pub(crate) fn spawn(
    provider: Provider,
    queues: Queues,
    tick: Duration,
    span: tracing::Span,
) -> std::io::Result<oneshot::Receiver<()>> {
    let (done_tx, done_rx) = oneshot::channel();
    let handle = tokio::runtime::Handle::current();
    std::thread::Builder::new()
        .name("hashgrid-provider".into())
        .spawn(move || {
            handle.block_on(run(provider, queues, tick).instrument(span));
            let _ = done_tx.send(());
        })?;
    Ok(done_rx)
}

async fn run(mut provider: Provider, mut q: Queues, tick: Duration) {
    let mut ticks = tokio::time::interval(tick);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let answers = tokio::select! {
            req = q.requests.recv() => match req {
                Some(req) => {
                    // A span per peer: what answering its request logs names it.
                    let span = tracing::info_span!("peer", peer = %req.peer());
                    span.in_scope(|| handle(&mut provider, req, &q.commands))
                }
                None => break,
            },
            Some(msg) = q.internal.recv() => {
                // A span per job: what its progress and receipt log names the agreement.
                let span = tracing::info_span!("job", agreement = %msg.agreement().short());
                span.in_scope(|| jobs(provider.on_internal(msg)))
            }
            _ = ticks.tick() => jobs(provider.tick()),
        };
        for a in answers {
            if q.responses.send(a).await.is_err() {
                // The swarm task is gone: the node is stopping.
                debug!("provider service: the swarm task stopped first");
                return;
            }
        }
    }
    if let Err(e) = provider.flush() {
        warn!(error = %e, "provider store flush at shutdown failed");
    }
}

fn jobs(answers: Vec<Answer>) -> Vec<Response> {
    answers
        .into_iter()
        .map(|(channel, reply)| Response::Job(channel, reply))
        .collect()
}

fn handle(
    provider: &mut Provider,
    req: ProviderRequest,
    commands: &mpsc::WeakSender<Command>,
) -> Vec<Response> {
    match req {
        ProviderRequest::Propose {
            peer,
            request,
            ask,
            channel,
        } => vec![Response::Negotiate(
            channel,
            provider.on_propose(peer, *request, ask),
        )],
        ProviderRequest::Blob {
            peer,
            request,
            channel,
        } => vec![Response::Blob(
            channel,
            provider
                .serve_blob(peer, &request)
                .unwrap_or(BlobReply::NotFound),
        )],
        ProviderRequest::Job {
            peer,
            request,
            channel,
        } => {
            let reply = match request {
                JobMessage::Dispatch(d) => match Net::upgrade(commands) {
                    Some(net) => provider.on_dispatch(peer, *d, &net),
                    None => JobReply::Refused("the node is stopping".into()),
                },
                JobMessage::Await { agreement, seen } => {
                    return jobs(
                        provider
                            .on_await(peer, agreement, seen, channel)
                            .into_iter()
                            .collect(),
                    );
                }
                JobMessage::Stream { agreement, seen } => {
                    return jobs(
                        provider
                            .on_stream(peer, agreement, seen, channel)
                            .into_iter()
                            .collect(),
                    );
                }
                JobMessage::Countersign(cs) => provider.on_countersign(peer, cs),
                JobMessage::Dispute { agreement, reason } => {
                    provider.on_dispute(peer, agreement, reason)
                }
                JobMessage::Release { agreement } => provider.on_release(peer, agreement),
            };
            vec![Response::Job(channel, reply)]
        }
    }
}
