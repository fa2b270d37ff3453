//! A buyer's job record as stored (`JobTree::Jobs`): its state, the providers tried, and the
//! countersigned receipt and agreement. Changing a stored field needs a store migration
//! (`crate::store::SCHEMA_VERSION`).

use hashgrid_protocol::{ContentId, Countersigned, PublicKey, Receipt, Timestamp};
use serde::{Deserialize, Serialize};

/// Why a job failed, for callers that act on it (the CLI maps these to exit codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailKind {
    /// The job or its inputs are invalid.
    Invalid,
    /// No ask in the book meets the requirements within the price (or every provider
    /// refused).
    NoMatch,
    /// Providers agreed but failed (disconnected, lost the job, timed out, errored).
    ProviderFailed,
    /// A provider's receipt or outputs did not verify.
    Verification,
    /// This node stopped or restarted before the job finished.
    Interrupted,
}

/// Where a submitted job is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobState {
    /// Looking for a provider.
    Matching,
    /// A provider signed an agreement; the buyer countersigned it.
    Agreed,
    /// Handing the job and its inputs to the provider.
    Uploading,
    /// Accepted by the provider, waiting for the GPU.
    Queued,
    /// Running on the provider's GPU.
    Running,
    /// Receiving and verifying outputs.
    Downloading,
    /// Done: outputs verified, receipt countersigned and stored.
    Done,
    /// Failed.
    Failed {
        /// The class of failure.
        kind: FailKind,
        /// What happened, and what to do next.
        reason: String,
    },
}

impl JobState {
    /// A lowercase name: `matching`, `agreed`, `uploading`, `queued`, `running`,
    /// `downloading`, `done` or `failed`.
    pub fn name(&self) -> &'static str {
        match self {
            JobState::Matching => "matching",
            JobState::Agreed => "agreed",
            JobState::Uploading => "uploading",
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Downloading => "downloading",
            JobState::Done => "done",
            JobState::Failed { .. } => "failed",
        }
    }

    /// Whether the job has finished (done or failed).
    pub fn is_terminal(&self) -> bool {
        matches!(self, JobState::Done | JobState::Failed { .. })
    }
}

/// One try of a job on one provider.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    /// The provider.
    pub provider: PublicKey,
    /// The agreement, when one was signed.
    pub agreement: Option<ContentId>,
    /// What happened.
    pub outcome: String,
}

/// A submitted job as the buyer's store keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    /// The job id (named by the receipt).
    pub id: ContentId,
    /// The job's name.
    pub name: String,
    /// The spec's id.
    pub spec_id: ContentId,
    /// When it was submitted.
    pub submitted_at: Timestamp,
    /// Where it is.
    pub state: JobState,
    /// The provider running (or that ran) it.
    pub provider: Option<PublicKey>,
    /// Providers tried, in order.
    pub attempts: Vec<Attempt>,
    /// The countersigned receipt, once done.
    pub receipt: Option<Countersigned<Receipt>>,
    /// When it finished.
    pub finished_at: Option<Timestamp>,
    /// The agreement the receipt ran under, countersigned by this buyer, once done: receipt
    /// files carry it, so anyone can check the charge offline. `None` for jobs stored before
    /// store schema 2.
    pub agreement: Option<Countersigned<hashgrid_protocol::Agreement>>,
}
