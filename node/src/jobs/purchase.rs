//! One job's purchase, from the buyer's side: [`BuyerJob::run`] makes the first run
//! ([`BuyerJob::find_run`] in `jobs::buyer`: match, propose, dispatch, verify the receipt and
//! outputs), then, when `JobOptions::verify` asks for it, runs the job again on independent
//! providers (others than those that ran it, another region first) and compares the runs
//! ([`compare_runs`]: exactly, floats within a tolerance, generated tokens up to the first
//! near-tie), and records the outcome.
//!
//! - All agree: every run is countersigned and paid; each provider's reputation records a
//!   spot check passed.
//! - They disagree: runs are added, up to two beyond the mode's count, until one group of
//!   agreeing runs is a strict majority of at least two. The majority is countersigned and
//!   paid; every other run is disputed (never countersigned, never paid), its provider's
//!   reputation records a lie, and for outputs compared exactly the buyer gossips signed
//!   [`FraudEvidence`]: the contradicted receipt and up to four of the majority's.
//! - No majority (or no third provider to decide): nothing is countersigned and the job fails
//!   with [`FailKind::Verification`]; nobody is accused.
//!
//! The spot-check draw uses the operating system's randomness, not anything a provider can
//! see: a provider cannot tell a checked job from another.

use std::collections::HashSet;

use hashgrid_protocol::exchange::JobMessage;
use hashgrid_protocol::{
    FraudEvidence, GossipMessage, Mismatch, PublicKey, Signed, Timestamp, Verification,
    compare_runs,
};
use tracing::{info, warn};

use hashgrid_protocol::{ContentId, VerifyMode};

use super::buyer::{BuyerJob, Matcher, Run};
use super::record::{VerificationReport, VerifiedRun, VerifyOutcome};
use super::reputation::Outcome;
use super::{FailKind, JobState, JobUpdate};
use crate::event::{DurableEvent, NodeEvent};
use crate::store::JobTree;

/// Runs beyond the mode's count that may be added to settle a disagreement.
const TIE_BREAKERS: usize = 2;

/// How long gossiped evidence is relayed.
const EVIDENCE_TTL_MS: u64 = 3_600_000;

impl BuyerJob {
    /// Runs the job to the end and records the outcome (flushed).
    pub(crate) async fn run(mut self) {
        let outcome = self.attempts().await;
        self.ctx
            .metrics
            .buyer_job(if outcome.is_ok() { "done" } else { "failed" });
        let state = match outcome {
            Ok(()) => JobState::Done,
            Err((kind, reason)) => {
                info!(job = %self.record.id.short(), ?kind, %reason, "job failed");
                JobState::Failed { kind, reason }
            }
        };
        let provider = self.record.provider;
        self.record.state = state.clone();
        self.record.finished_at = Some(Timestamp::now());
        let rec = &self.record;
        let res = self.ctx.store.with(|s| {
            s.put(JobTree::BuyerJobs, rec.id.as_bytes(), rec)?;
            s.push_event(&DurableEvent::JobEnded {
                job: rec.id,
                state: rec.state.clone(),
                provider: rec.provider,
            })?;
            s.flush()
        });
        if let Err(e) = res {
            warn!(error = ?e, "cannot store the job's outcome (the node stopped?)");
        }
        let _ = self.ctx.events.send(NodeEvent::Job(JobUpdate {
            job: self.record.id,
            state,
            provider,
        }));
    }

    /// The first run, then the verification the job asks for.
    async fn attempts(&mut self) -> Result<(), (FailKind, String)> {
        if let Some(m) = &self.sub.options.model {
            m.check_against(&self.sub.spec)
                .map_err(|e| (FailKind::Invalid, format!("the job's model manifest: {e}")))?;
        }
        // The model's blobs a provider that lists the model keeps (smaller ones travel inline).
        let model_blobs: Vec<ContentId> = self
            .sub
            .options
            .model
            .iter()
            .flat_map(|m| &m.blobs)
            .filter(|b| b.len >= super::cache::MIN_CACHED_BYTES as u64)
            .map(|b| b.id)
            .collect();
        let bid = self
            .bid(Timestamp::now())
            .map_err(|e| (FailKind::Invalid, e))?;
        let bid_body = bid
            .decode_unverified()
            .map_err(|e| (FailKind::Invalid, e.to_string()))?;
        // This buyer's random tie-break among equal asks, fresh for each job.
        let seed = hashgrid_market::tie_break(
            u64::from_le_bytes(self.record.id.0[..8].try_into().unwrap_or_default()),
            &self.ctx.key.public(),
        );
        let m = Matcher::new(bid, bid_body, model_blobs, seed);
        let first = self.find_run(&m, &HashSet::new(), None).await?;
        if self.sub.options.verify.mode == VerifyMode::None {
            return self.accept(&first, &[], None).await;
        }
        verify_runs(self, &m, first).await
    }
}

/// A uniform draw in `0..1000` from the operating system's randomness.
fn roll() -> u16 {
    let mut b = [0u8; 2];
    // Without randomness, check: the buyer asked for assurance.
    if getrandom::fill(&mut b).is_err() {
        return 0;
    }
    u16::from_le_bytes(b) % 1000
}

/// Groups `runs` by agreement with each group's first run; the groups in order of their
/// first run.
fn groups(runs: &[Run], v: &Verification) -> Vec<Vec<usize>> {
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for (i, r) in runs.iter().enumerate() {
        match groups
            .iter_mut()
            .find(|g| compare_runs(&runs[g[0]].outputs, &r.outputs, v).is_ok())
        {
            Some(g) => g.push(i),
            None => groups.push(vec![i]),
        }
    }
    groups
}

/// Runs `first`'s job again as the job's verification mode asks and settles the runs (see
/// the module docs).
pub(super) async fn verify_runs(
    job: &mut BuyerJob,
    m: &Matcher,
    first: Run,
) -> Result<(), (FailKind, String)> {
    let mode = job.sub.options.verify.mode;
    let tol = job.sub.options.verify.clone();
    let wanted = mode.providers(roll());
    let mut runs = vec![first];
    let mut target = wanted;
    // What the caller was shown streaming is the first run's; re-runs do not stream.
    job.stream = false;
    let mut short: Option<String> = None;
    loop {
        while runs.len() < target && short.is_none() {
            let used: HashSet<PublicKey> = runs.iter().map(|r| r.provider).collect();
            let region = runs[0].region.clone();
            match job.find_run(m, &used, Some(&region)).await {
                Ok(r) => runs.push(r),
                Err((FailKind::Interrupted, e)) => return Err((FailKind::Interrupted, e)),
                Err((_, e)) => {
                    info!(job = %job.record.id.short(), runs = runs.len(), reason = %e, "no further independent provider");
                    short = Some(e);
                }
            }
        }
        let g = groups(&runs, &tol);
        let biggest = g.iter().map(Vec::len).max().unwrap_or(0);
        let leaders = g.iter().filter(|x| x.len() == biggest).count();
        let majority = (biggest >= 2 && leaders == 1 && 2 * biggest > runs.len())
            .then(|| g.iter().find(|x| x.len() == biggest).cloned())
            .flatten();
        if g.len() == 1 {
            let outcome = match (&short, runs.len()) {
                (_, n) if n >= wanted && wanted == 1 => VerifyOutcome::NotDrawn,
                (_, n) if n >= wanted => VerifyOutcome::Agreed,
                (Some(reason), _) => VerifyOutcome::Incomplete {
                    reason: reason.clone(),
                },
                (None, _) => VerifyOutcome::Incomplete {
                    reason: "fewer runs than wanted".into(),
                },
            };
            let all: Vec<usize> = (0..runs.len()).collect();
            return settle(job, &runs, wanted, &all, outcome).await;
        }
        if let Some(winners) = majority {
            let accused = (0..runs.len())
                .filter(|i| !winners.contains(i))
                .map(|i| runs[i].provider)
                .collect();
            return settle(
                job,
                &runs,
                wanted,
                &winners,
                VerifyOutcome::Overruled { accused },
            )
            .await;
        }
        if short.is_none() && runs.len() < wanted + TIE_BREAKERS {
            target = runs.len() + 1;
            info!(job = %job.record.id.short(), runs = runs.len(), "runs disagree; asking another provider to decide");
            continue;
        }
        // No majority: accept nothing, accuse nobody.
        let report = report(job, &runs, wanted, &[], VerifyOutcome::NoMajority);
        job.ctx.metrics.verification(report.outcome.name());
        job.record.verification = Some(report);
        let detail: Vec<String> = runs
            .iter()
            .skip(1)
            .filter_map(|r| compare_runs(&runs[0].outputs, &r.outputs, &tol).err())
            .map(|e| e.to_string())
            .collect();
        // Tell each provider its receipt will not be countersigned (best effort), so that it
        // does not wait for a countersignature; its reputation here is untouched.
        for run in &runs {
            let msg = JobMessage::Dispute {
                agreement: run.agreement_id,
                reason: "verification: the providers' outputs disagree and no majority formed; nothing is accepted".into(),
            };
            let _ = job.ctx.net.job(run.peer, msg).await;
            job.note(
                run.provider,
                run.agreement_id,
                "not accepted: no majority".into(),
            );
        }
        return Err((
            FailKind::Verification,
            format!(
                "{} providers ran the job and no majority agrees ({}); nothing was countersigned",
                runs.len(),
                detail.join("; ")
            ),
        ));
    }
}

/// The report of `runs`, `accepted` being the indices of the runs accepted.
fn report(
    job: &BuyerJob,
    runs: &[Run],
    wanted: usize,
    accepted: &[usize],
    outcome: VerifyOutcome,
) -> VerificationReport {
    let tol = &job.sub.options.verify;
    let reference = accepted.first().map(|&i| &runs[i]);
    let extra: u64 = accepted
        .iter()
        .skip(1)
        .map(|&i| runs[i].body.charge.0)
        .sum();
    VerificationReport {
        mode: job.sub.options.verify.mode,
        wanted: u32::try_from(wanted).unwrap_or(u32::MAX),
        runs: runs
            .iter()
            .map(|r| VerifiedRun {
                provider: r.provider,
                region: r.region.clone(),
                receipt: r.receipt.clone(),
                agreement: r.agreement.clone(),
                countersigned: None,
                mismatch: reference.and_then(|x| {
                    compare_runs(&x.outputs, &r.outputs, tol)
                        .err()
                        .map(|e| e.to_string())
                }),
                charge: r.body.charge,
            })
            .collect(),
        outcome,
        extra_msat: extra,
        evidence: None,
    }
}

/// Accepts the runs `accepted` (the first one's receipt becomes the job's), disputes every
/// other run and gossips evidence against it where its outputs were compared exactly.
async fn settle(
    job: &mut BuyerJob,
    runs: &[Run],
    wanted: usize,
    accepted: &[usize],
    outcome: VerifyOutcome,
) -> Result<(), (FailKind, String)> {
    let tol = job.sub.options.verify.clone();
    let mut rep = report(job, runs, wanted, accepted, outcome);
    let primary = &runs[accepted[0]];
    let witnesses: Vec<&Run> = accepted.iter().map(|&i| &runs[i]).collect();
    for (i, run) in runs.iter().enumerate() {
        if accepted.contains(&i) {
            continue;
        }
        let mismatch: Option<Mismatch> = compare_runs(&primary.outputs, &run.outputs, &tol).err();
        let why = mismatch
            .as_ref()
            .map_or_else(|| "outputs differ".to_string(), ToString::to_string);
        warn!(job = %job.record.id.short(), provider = %run.provider.short(), majority = accepted.len(), %why, "a majority of providers contradicts this provider's outputs");
        job.ctx
            .reputation
            .record(&job.ctx.store, run.provider, Outcome::Lied);
        let msg = JobMessage::Dispute {
            agreement: run.agreement_id,
            reason: format!("contradicted by {} other providers: {why}", accepted.len()),
        };
        // Best effort: the provider may be gone.
        let _ = job.ctx.net.job(run.peer, msg).await;
        job.ctx.net.mark_down(run.provider).await;
        job.note(run.provider, run.agreement_id, format!("disputed: {why}"));
        if mismatch.is_some_and(|m| m.exact) && witnesses.len() >= 2 {
            match evidence(job, run, &witnesses) {
                Ok(signed) => {
                    rep.evidence = Some(signed.id());
                    info!(job = %job.record.id.short(), accused = %run.provider.short(), evidence = %signed.id().short(), "gossiping fraud evidence");
                    job.ctx.net.publish(GossipMessage::Evidence(signed)).await;
                    job.ctx.metrics.fraud_evidence("sent");
                }
                Err(e) => warn!(error = %e, "cannot make fraud evidence"),
            }
        }
    }
    let also: Vec<&Run> = witnesses[1..].to_vec();
    job.ctx.metrics.verification(rep.outcome.name());
    job.accept(primary, &also, Some(rep)).await
}

/// Signed evidence that `accused` contradicts `witnesses`, checked as a receiving node
/// would check it.
fn evidence(
    job: &BuyerJob,
    accused: &Run,
    witnesses: &[&Run],
) -> Result<Signed<FraudEvidence>, String> {
    let now = Timestamp::now();
    let ev = FraudEvidence {
        reporter: job.ctx.key.public(),
        accused: accused.receipt.clone(),
        witnesses: witnesses
            .iter()
            .take(hashgrid_protocol::verify::MAX_WITNESSES)
            .map(|w| w.receipt.clone())
            .collect(),
        created_at: now,
        expires_at: now.plus_ms(EVIDENCE_TTL_MS),
    };
    let signed = Signed::sign(&job.ctx.key, &job.ctx.network, &ev);
    let msg = GossipMessage::Evidence(signed.clone());
    msg.verify(&job.ctx.network, now)
        .map_err(|e| format!("the evidence would not check: {e}"))?;
    Ok(signed)
}
