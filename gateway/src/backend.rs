//! Where the gateway's jobs run: a [`Backend`] takes a compiled job and returns its outputs,
//! handing streamed buffers (the tokens so far) to the caller while it runs. The market
//! backend lives with the node (`hashgrid_node::gateway::MarketBackend`); [`LocalBackend`]
//! runs on this machine's adapter.

use std::collections::BTreeMap;

use futures::future::BoxFuture;
use hashgrid_executor::{ExecError, Executor, StreamSink, StreamUpdate};
use hashgrid_infer::Target;
use hashgrid_protocol::JobSpec;
use tokio::sync::mpsc;

/// A job to run.
pub struct BackendJob {
    /// The job.
    pub spec: JobSpec,
    /// Its input blobs by id, shared (a model's weights are not copied per request).
    pub inputs: hashgrid_infer::Inputs,
    /// Longest run in seconds.
    pub max_seconds: u32,
    /// The model's weights among the inputs (a market bid names it).
    pub model: hashgrid_protocol::ModelManifest,
    /// How runs compare if the backend verifies the job by re-execution (its mode is the
    /// backend's; see [`hashgrid_infer::CompiledJob::compare`]).
    pub compare: hashgrid_protocol::Verification,
}

/// Streamed buffers, whole, by name, as of one check.
pub type Streamed = Vec<(String, Vec<u8>)>;

/// Where and for what a job ran through the market.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MarketInfo {
    /// The buyer's job id.
    pub job: String,
    /// The provider's public key.
    pub provider: String,
    /// What the request cost, in msat: the receipt's charge, plus the accepted re-runs when
    /// the job was verified.
    pub charge_msat: u64,
    /// The countersigned receipt's id.
    pub receipt_id: String,
}

/// A finished job's outputs (verified against a receipt when they came through the market).
#[derive(Debug, Clone)]
pub struct BackendOutput {
    /// Output buffers by name.
    pub outputs: BTreeMap<String, Vec<u8>>,
    /// The market's side of it; `None` for a local run.
    pub market: Option<MarketInfo>,
}

/// Why a job did not produce outputs, in classes the HTTP layer maps to status codes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// The job is invalid (400).
    #[error("{0}")]
    Invalid(String),
    /// No provider can take it within the price and requirements (503).
    #[error("{0}")]
    Unavailable(String),
    /// The backend is at capacity; try again later (429).
    #[error("{0}")]
    Busy(String),
    /// The job ran and failed, or every provider tried failed (502).
    #[error("{0}")]
    Failed(String),
}

/// Runs jobs for the gateway. Dropping the returned future cancels the job (a client that
/// went away stops paying for tokens nobody reads).
pub trait Backend: Send + Sync + 'static {
    /// `"local"` or `"market"`: shown in responses.
    fn name(&self) -> &'static str;

    /// The adapter kind to shape the next job's kernels for ([`Target::Cpu`] unless the
    /// backend knows, or can tell, where its jobs run). Asked for every request: a market's
    /// cheapest provider can change between two.
    fn target(&self) -> BoxFuture<'static, Target> {
        Box::pin(std::future::ready(Target::Cpu))
    }

    /// Runs `job`; while it runs, each new check of its streamed buffers goes to `stream`
    /// (with `try_send`: every update carries the whole buffers, so a dropped one loses
    /// nothing).
    fn run(
        &self,
        job: BackendJob,
        stream: Option<mpsc::Sender<Streamed>>,
    ) -> BoxFuture<'static, Result<BackendOutput, BackendError>>;
}

/// Runs jobs on this machine's adapter (`hashgrid serve --local`): no market, no receipts.
pub struct LocalBackend {
    exec: Executor,
    /// `None`: the adapter's kind.
    target: Option<Target>,
}

impl LocalBackend {
    /// Runs on `exec`.
    pub fn new(exec: Executor) -> LocalBackend {
        LocalBackend { exec, target: None }
    }

    /// Shapes language models' kernels for `target` instead of the adapter's kind.
    pub fn kernels(mut self, target: Target) -> LocalBackend {
        self.target = Some(target);
        self
    }

    /// The executor (to shut it down before the process exits).
    pub fn executor(&self) -> &Executor {
        &self.exec
    }
}

impl Backend for LocalBackend {
    fn name(&self) -> &'static str {
        "local"
    }

    fn target(&self) -> BoxFuture<'static, Target> {
        let t = self
            .target
            .unwrap_or_else(|| Target::for_device(self.exec.profile().device_type));
        Box::pin(std::future::ready(t))
    }

    fn run(
        &self,
        job: BackendJob,
        stream: Option<mpsc::Sender<Streamed>>,
    ) -> BoxFuture<'static, Result<BackendOutput, BackendError>> {
        let exec = self.exec.clone();
        Box::pin(async move {
            let sink = stream.map(|tx| {
                Box::new(move |u: StreamUpdate| {
                    if tx.is_closed() {
                        // Nobody reads: end the loop at this check.
                        return false;
                    }
                    let _ = tx.try_send(u.buffers.into_iter().map(|b| (b.name, b.bytes)).collect());
                    true
                }) as Box<StreamSink>
            });
            let out = exec
                .run_streaming("gateway", job.spec, job.inputs, sink)
                .await
                .map_err(|e| match e {
                    ExecError::QueueFull(_) => BackendError::Busy(e.to_string()),
                    ExecError::Spec(_)
                    | ExecError::Limit(_)
                    | ExecError::Parse { .. }
                    | ExecError::Shader { .. }
                    | ExecError::Binding { .. }
                    | ExecError::Input { .. } => BackendError::Invalid(e.to_string()),
                    e => BackendError::Failed(e.to_string()),
                })?;
            Ok(BackendOutput {
                outputs: out.outputs.into_iter().map(|o| (o.name, o.bytes)).collect(),
                market: None,
            })
        })
    }
}
