//! A buyer's job record as stored (`JobTree::Jobs`): its state, the providers tried, the
//! countersigned receipt and agreement, and what verification found; and the buyer's stored
//! experience of a provider ([`Experience`], the `reputation` tree). Changing a stored field
//! needs a store migration (`crate::store::SCHEMA_VERSION`).

use hashgrid_protocol::{
    ContentId, Countersigned, Msat, PublicKey, Receipt, Signed, Timestamp, VerifyMode,
};
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
    /// What re-execution found, for jobs submitted with a verification mode other than
    /// `none` (`None` for the others, and for jobs stored before store schema 3).
    pub verification: Option<VerificationReport>,
}

/// How a job's verification went: every provider that ran it and what the comparison found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerificationReport {
    /// The mode asked for.
    pub mode: VerifyMode,
    /// Providers the mode called for (a spot check that was not drawn: 1).
    pub wanted: u32,
    /// Every run whose receipt and outputs verified, in the order they finished; the first
    /// of the majority is the job's receipt.
    pub runs: Vec<VerifiedRun>,
    /// What the comparison found.
    pub outcome: VerifyOutcome,
    /// The charges of the countersigned runs beyond the job's receipt: what the assurance
    /// cost, in msat.
    pub extra_msat: u64,
    /// The id of the fraud evidence gossiped, if any.
    pub evidence: Option<ContentId>,
}

/// One provider's run of a verified job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifiedRun {
    /// The provider.
    pub provider: PublicKey,
    /// Its region, from its ask.
    pub region: String,
    /// The receipt it signed.
    pub receipt: Signed<Receipt>,
    /// The countersigned agreement it ran under.
    pub agreement: Countersigned<hashgrid_protocol::Agreement>,
    /// This buyer's countersignature, when the run was accepted (agreed with the majority).
    pub countersigned: Option<Countersigned<Receipt>>,
    /// How its outputs compared with the accepted outputs (`None`: accepted).
    pub mismatch: Option<String>,
    /// Its charge.
    pub charge: Msat,
}

/// What comparing a job's runs found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum VerifyOutcome {
    /// A spot check was not drawn for this job: one provider ran it, unchecked.
    NotDrawn,
    /// Every run agreed.
    Agreed,
    /// A majority agreed; the providers listed disagreed with it: their receipts were
    /// disputed (not countersigned, not paid).
    Overruled {
        /// The providers whose outputs the majority contradicted.
        accused: Vec<PublicKey>,
    },
    /// Fewer independent providers could be found than the mode wants; what ran agreed.
    Incomplete {
        /// Why.
        reason: String,
    },
    /// The runs disagreed and no majority could be formed: nothing was accepted.
    NoMajority,
}

impl VerifyOutcome {
    /// A lowercase name: `not-drawn`, `agreed`, `overruled`, `incomplete`, `no-majority`.
    pub fn name(&self) -> &'static str {
        match self {
            VerifyOutcome::NotDrawn => "not-drawn",
            VerifyOutcome::Agreed => "agreed",
            VerifyOutcome::Overruled { .. } => "overruled",
            VerifyOutcome::Incomplete { .. } => "incomplete",
            VerifyOutcome::NoMajority => "no-majority",
        }
    }
}

/// This node's experience of one provider.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Experience {
    /// Jobs it completed (receipt and outputs verified).
    pub completed: u64,
    /// Jobs it failed after agreeing to them.
    pub failed: u64,
    /// Jobs whose receipt or outputs did not verify (disputed).
    pub lied: u64,
    /// Milliseconds from agreement to verified receipt, summed over completed jobs.
    pub completed_ms: u64,
    /// Completed jobs whose outputs another provider's re-execution confirmed.
    pub checks_passed: u64,
    /// Other buyers whose fraud evidence against the provider checked (one per buyer).
    pub reported: u64,
    /// Credit forfeited by lies: the positive score the provider had earned when this buyer
    /// caught it lying. Past completions count for nothing once a provider is known to cheat
    /// (its unchecked results may have been wrong too).
    pub forfeited: u64,
}

impl Experience {
    /// The score the market ranks by:
    /// `completed − forfeited − 4 · failed − 16 · lied − 8 · reported`. A lie caught by this
    /// buyer first forfeits whatever positive score the provider had, so it always ends at
    /// −16 or below, and sixteen good jobs after it bring it back to zero.
    pub fn score(&self) -> i64 {
        let n = |x: u64| i64::try_from(x).unwrap_or(i64::MAX);
        n(self.completed)
            .saturating_sub(n(self.forfeited))
            .saturating_sub(n(self.failed).saturating_mul(4))
            .saturating_sub(n(self.lied).saturating_mul(16))
            .saturating_sub(n(self.reported).saturating_mul(8))
    }

    /// Mean milliseconds from agreement to verified receipt of completed jobs.
    pub fn mean_ms(&self) -> Option<u64> {
        self.completed_ms.checked_div(self.completed)
    }
}
