//! The gateway's market backend: each request is a job submitted through this node, matched in
//! the order book, run by a provider, and returned with a verified, countersigned receipt.
//! Tokens stream from the provider while it runs ([`NodeEvent::JobStream`]).

use std::path::PathBuf;

use futures::future::BoxFuture;
use hashgrid_gateway::{Backend, BackendError, BackendJob, BackendOutput, MarketInfo, Streamed};
use hashgrid_infer::Target;
use hashgrid_protocol::{ContentId, Network, ReceiptFile};
use tokio::sync::{broadcast, mpsc};
use tracing::warn;

use crate::NodeError;
use crate::event::NodeEvent;
use crate::jobs::{FailKind, JobOptions, JobState, Submission};
use crate::node::NodeHandle;

/// Runs the gateway's jobs through the market.
pub struct MarketBackend {
    node: NodeHandle,
    options: JobOptions,
    receipts: Option<(PathBuf, Network)>,
    /// `None`: the kind of device of the market's likeliest provider, per request.
    target: Option<Target>,
}

impl MarketBackend {
    /// Submits through `node` with `options` (price, requirements, attempts; the run time
    /// comes from each job).
    pub fn new(node: NodeHandle, options: JobOptions) -> MarketBackend {
        MarketBackend {
            node,
            options,
            receipts: None,
            target: None,
        }
    }

    /// Shapes language models' kernels for `target`. Unless set, each job's kernels are
    /// shaped for the kind of device of the cheapest ask that meets the backend's terms
    /// ([`crate::node::MarketHandle::likely_device`]; [`Target::Cpu`] while the book has
    /// none): a job is compiled before it is matched, so its shape follows the provider it
    /// will most likely go to. If that provider declines and another kind takes it, the
    /// results are the same, only slower.
    pub fn kernels(mut self, target: Target) -> MarketBackend {
        self.target = Some(target);
        self
    }

    /// Also writes each receipt as `<dir>/<job id>.json` (a [`ReceiptFile`] for `network`),
    /// where `hashgrid receipts` lists them.
    pub fn save_receipts(mut self, dir: PathBuf, network: Network) -> MarketBackend {
        self.receipts = Some((dir, network));
        self
    }

    /// The node it submits through.
    pub fn node(&self) -> &NodeHandle {
        &self.node
    }
}

/// Cancels the job unless disarmed: a dropped request stops paying for tokens nobody reads.
struct CancelOnDrop {
    node: NodeHandle,
    job: ContentId,
    armed: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.node.jobs().cancel(&self.job);
        }
    }
}

fn node_error(e: NodeError) -> BackendError {
    match e {
        NodeError::InvalidJob(m) => BackendError::Invalid(m),
        e => BackendError::Failed(e.to_string()),
    }
}

impl Backend for MarketBackend {
    fn name(&self) -> &'static str {
        "market"
    }

    fn target(&self) -> BoxFuture<'static, Target> {
        if let Some(t) = self.target {
            return Box::pin(std::future::ready(t));
        }
        let node = self.node.clone();
        let (requirements, max_price) = (self.options.requirements.clone(), self.options.max_price);
        Box::pin(async move {
            match node.market().likely_device(&requirements, max_price).await {
                Ok(Some(device)) => Target::for_device(device),
                Ok(None) => Target::Cpu,
                Err(e) => {
                    warn!(error = %e, "cannot read the book to shape a job's kernels");
                    Target::Cpu
                }
            }
        })
    }

    fn run(
        &self,
        job: BackendJob,
        stream: Option<mpsc::Sender<Streamed>>,
    ) -> BoxFuture<'static, Result<BackendOutput, BackendError>> {
        let node = self.node.clone();
        let options = JobOptions {
            max_seconds: job.max_seconds,
            model: Some(job.model),
            verify: hashgrid_protocol::Verification {
                mode: self.options.verify.mode,
                ..job.compare
            },
            ..self.options.clone()
        };
        let receipts = self.receipts.clone();
        Box::pin(async move {
            let mut events = node.events();
            let id = node
                .jobs()
                .submit(Submission {
                    spec: job.spec,
                    inputs: job.inputs,
                    options,
                })
                .await
                .map_err(node_error)?;
            let mut guard = CancelOnDrop {
                node: node.clone(),
                job: id,
                armed: true,
            };
            loop {
                match events.recv().await {
                    Ok(NodeEvent::JobStream(s)) if s.job == id => {
                        if let Some(tx) = &stream {
                            let _ = tx.try_send(s.buffers);
                        }
                    }
                    Ok(NodeEvent::Job(u)) if u.job == id && u.state.is_terminal() => break,
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        if node
                            .jobs()
                            .get(&id)
                            .map_err(node_error)?
                            .is_some_and(|r| r.state.is_terminal())
                        {
                            break;
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        return Err(BackendError::Failed("the node stopped".into()));
                    }
                }
            }
            guard.armed = false;
            let rec =
                node.jobs().get(&id).map_err(node_error)?.ok_or_else(|| {
                    BackendError::Failed("the job vanished from the store".into())
                })?;
            if let JobState::Failed { kind, reason } = &rec.state {
                let reason = reason.clone();
                return Err(match kind {
                    FailKind::Invalid => BackendError::Invalid(reason),
                    FailKind::NoMatch => BackendError::Unavailable(reason),
                    _ => BackendError::Failed(reason),
                });
            }
            let result = node
                .jobs()
                .result(&id)
                .map_err(node_error)?
                .ok_or_else(|| BackendError::Failed("the job's outputs are missing".into()))?;
            let cs = rec
                .receipt
                .clone()
                .ok_or_else(|| BackendError::Failed("the job has no receipt".into()))?;
            let receipt = cs
                .signed
                .decode_unverified()
                .map_err(|e| BackendError::Failed(format!("receipt: {e}")))?;
            if let Some((dir, network)) = receipts {
                let file = ReceiptFile {
                    network,
                    receipt: cs.clone(),
                    agreement: rec.agreement.clone(),
                };
                let path = dir.join(format!("{id}.json"));
                let written = std::fs::create_dir_all(&dir)
                    .and_then(|()| std::fs::write(&path, file.to_json()));
                if let Err(e) = written {
                    warn!(path = %path.display(), error = %e, "cannot write the receipt file");
                }
            }
            Ok(BackendOutput {
                outputs: result.outputs,
                market: Some(MarketInfo {
                    job: id.to_string(),
                    provider: receipt.provider.to_string(),
                    // With verification, the accepted re-runs are paid too.
                    charge_msat: receipt.charge.0
                        + rec.verification.as_ref().map_or(0, |v| v.extra_msat),
                    receipt_id: cs.id().to_string(),
                }),
            })
        })
    }
}

/// A gateway's figures on the node's metrics endpoint and dashboard.
impl crate::ops::server::OpsSource for hashgrid_gateway::Gateway {
    fn encode_metrics(&self, out: &mut String) {
        self.metrics().encode_into(out);
    }

    fn dashboard(&self) -> serde_json::Value {
        let t = self.metrics().totals();
        serde_json::json!({
            "requests": t.requests,
            "failed": t.failed,
            "spent_msat": t.spent_msat,
            "prompt_tokens": t.prompt_tokens,
            "completion_tokens": t.completion_tokens,
            "spent_today_msat": self.spent_today(),
            "models": self.model_ids(),
        })
    }
}
