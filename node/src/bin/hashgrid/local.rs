//! The commands that read the local store, with no network: `jobs`, `status`, `result`,
//! `receipts`, `providers`.

use std::path::Path;

use hashgrid_node::jobs::{JobRecord, JobState};
use hashgrid_node::store::Store;
use hashgrid_protocol::check_outputs;

use crate::client::Client;
use crate::market::{print_done, print_verification, save_result, verification_json};
use crate::{CliError, Global};

/// Finds a job by id or unique id prefix.
fn find_job(store: &Store, prefix: &str) -> Result<JobRecord, CliError> {
    let all =
        hashgrid_node::jobs::read_jobs(store).map_err(|e| CliError::other(e.to_string(), ""))?;
    let p = prefix.to_ascii_lowercase();
    let matches: Vec<JobRecord> = all
        .into_iter()
        .filter(|r| r.id.to_string().starts_with(&p))
        .collect();
    match matches.len() {
        1 => Ok(matches.into_iter().next().unwrap_or_else(|| unreachable!())),
        0 => Err(CliError::bad_input(
            format!("no job {prefix} in this data dir"),
            "list them with hashgrid jobs",
        )),
        n => Err(CliError::bad_input(
            format!("{n} jobs start with {prefix}"),
            "give more of the id",
        )),
    }
}

fn record_json(r: &JobRecord) -> serde_json::Value {
    let receipt = r
        .receipt
        .as_ref()
        .and_then(|c| c.signed.decode_unverified().ok());
    let (state, kind, reason) = match &r.state {
        JobState::Failed { kind, reason } => {
            ("failed", Some(format!("{kind:?}")), Some(reason.clone()))
        }
        s => (s.name(), None, None),
    };
    serde_json::json!({
        "job": r.id.to_string(),
        "name": r.name,
        "spec_id": r.spec_id.to_string(),
        "state": state,
        "failure": kind,
        "reason": reason,
        "provider": r.provider.map(|p| p.to_string()),
        "submitted_at": r.submitted_at.0,
        "finished_at": r.finished_at.map(|t| t.0),
        "charge_msat": receipt.as_ref().map(|x| x.charge.0),
        "receipt_id": r.receipt.as_ref().map(|c| c.id().to_string()),
        "attempts": r.attempts.iter().map(|a| serde_json::json!({
            "provider": a.provider.to_string(),
            "agreement": a.agreement.map(|x| x.to_string()),
            "outcome": a.outcome,
        })).collect::<Vec<_>>(),
        "verification": verification_json(r),
    })
}

pub(crate) fn jobs(g: &Global) -> Result<(), CliError> {
    let c = Client::resolve(g)?;
    let store = c.open_store()?;
    let all =
        hashgrid_node::jobs::read_jobs(&store).map_err(|e| CliError::other(e.to_string(), ""))?;
    if g.json {
        println!(
            "{}",
            serde_json::Value::Array(all.iter().map(record_json).collect())
        );
        return Ok(());
    }
    if all.is_empty() {
        println!("no jobs yet: hashgrid submit JOB.toml");
        return Ok(());
    }
    println!(
        "{:<14} {:<16} {:<10} {:<10} {:>12}",
        "JOB", "NAME", "STATE", "PROVIDER", "CHARGE msat"
    );
    for r in &all {
        let v = record_json(r);
        println!(
            "{:<14} {:<16} {:<10} {:<10} {:>12}",
            &r.id.to_string()[..12],
            r.name.chars().take(16).collect::<String>(),
            v["state"].as_str().unwrap_or(""),
            r.provider.map(|p| p.short()).unwrap_or_else(|| "-".into()),
            v["charge_msat"]
                .as_u64()
                .map_or("-".into(), |m| m.to_string()),
        );
    }
    Ok(())
}

pub(crate) fn status(g: &Global, job: &str) -> Result<(), CliError> {
    let c = Client::resolve(g)?;
    let store = c.open_store()?;
    let r = find_job(&store, job)?;
    let v = record_json(&r);
    if g.json {
        println!("{v}");
        return Ok(());
    }
    println!("job        {}", r.id);
    println!("name       {}", r.name);
    println!("spec       {}", r.spec_id);
    println!("state      {}", v["state"].as_str().unwrap_or(""));
    if let JobState::Failed { kind, reason } = &r.state {
        println!("failure    {kind:?}: {reason}");
    }
    if let Some(p) = r.provider {
        println!("provider   {p}");
    }
    if let Some(m) = v["charge_msat"].as_u64() {
        println!("charge     {m} msat");
    }
    for (i, a) in r.attempts.iter().enumerate() {
        println!("attempt {}  {} {}", i + 1, a.provider.short(), a.outcome);
    }
    if let Some(v) = &r.verification {
        print_verification(v);
    }
    Ok(())
}

pub(crate) fn result(g: &Global, job: &str, out: &Path) -> Result<(), CliError> {
    let c = Client::resolve(g)?;
    let store = c.open_store()?;
    let r = find_job(&store, job)?;
    let Some(res) = hashgrid_node::jobs::read_result(&store, &r.id)
        .map_err(|e| CliError::other(e.to_string(), ""))?
    else {
        return Err(CliError::bad_input(
            format!("job {} is not done ({})", r.id, record_json(&r)["state"]),
            "see hashgrid status JOB",
        ));
    };
    let saved = save_result(&c, &res.record, &res.outputs, Some(out))?;
    print_done(g, &res.record, &res.outputs, &saved, None);
    Ok(())
}

pub(crate) fn receipts(g: &Global, verify: bool) -> Result<(), CliError> {
    let c = Client::resolve(g)?;
    let store = c.open_store()?;
    let all =
        hashgrid_node::jobs::read_jobs(&store).map_err(|e| CliError::other(e.to_string(), ""))?;
    let mut rows = Vec::new();
    let mut bad = 0usize;
    for r in all.iter().filter(|r| r.receipt.is_some()) {
        let Some(cs) = &r.receipt else { continue };
        let check = if verify {
            match cs.verify(&c.network) {
                Ok(receipt) => {
                    let outs = hashgrid_node::jobs::read_result(&store, &r.id)
                        .ok()
                        .flatten()
                        .map(|x| x.outputs)
                        .unwrap_or_default();
                    match check_outputs(&receipt, &outs) {
                        Ok(()) => Some(Ok(())),
                        Err(e) => Some(Err(e.to_string())),
                    }
                }
                Err(e) => Some(Err(e.to_string())),
            }
        } else {
            None
        };
        if matches!(check, Some(Err(_))) {
            bad += 1;
        }
        let body = cs.signed.decode_unverified().ok();
        rows.push((r, cs.id(), body, check));
    }
    if g.json {
        let v: Vec<_> = rows
            .iter()
            .map(|(r, id, body, check)| {
                serde_json::json!({
                    "job": r.id.to_string(),
                    "receipt_id": id.to_string(),
                    "provider": body.as_ref().map(|b| b.provider.to_string()),
                    "chain_seq": body.as_ref().map(|b| b.chain_seq),
                    "charge_msat": body.as_ref().map(|b| b.charge.0),
                    "verified": check.as_ref().map(|c| c.is_ok()),
                    "error": check.as_ref().and_then(|c| c.clone().err()),
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(v));
    } else if rows.is_empty() {
        println!("no receipts yet");
    } else {
        println!(
            "{:<14} {:<14} {:<10} {:>6} {:>12}  CHECK",
            "JOB", "RECEIPT", "PROVIDER", "CHAIN", "CHARGE msat"
        );
        for (r, id, body, check) in &rows {
            println!(
                "{:<14} {:<14} {:<10} {:>6} {:>12}  {}",
                &r.id.to_string()[..12],
                &id.to_string()[..12],
                body.as_ref().map_or("?".into(), |b| b.provider.short()),
                body.as_ref()
                    .map_or("?".into(), |b| b.chain_seq.to_string()),
                body.as_ref().map_or("?".into(), |b| b.charge.0.to_string()),
                match check {
                    None => "-".to_string(),
                    Some(Ok(())) => "✓ signatures and outputs".to_string(),
                    Some(Err(e)) => format!("✗ {e}"),
                }
            );
        }
    }
    if bad > 0 {
        return Err(CliError::verify(
            format!("{bad} receipts do not verify"),
            "do not pay for them; report the provider",
        ));
    }
    Ok(())
}

/// `hashgrid providers`.
pub(crate) fn providers(g: &Global) -> Result<(), CliError> {
    let c = Client::resolve(g)?;
    let store = c.open_store()?;
    let store_err = |e: hashgrid_node::store::StoreError| CliError::other(e.to_string(), "");
    let seen = hashgrid_node::jobs::read_experience(&store).map_err(store_err)?;
    let jobs = hashgrid_node::jobs::read_jobs(&store).map_err(store_err)?;
    let mut spent: std::collections::HashMap<hashgrid_protocol::PublicKey, u64> =
        std::collections::HashMap::new();
    for r in &jobs {
        match &r.verification {
            Some(v) => {
                for run in v.runs.iter().filter(|x| x.countersigned.is_some()) {
                    *spent.entry(run.provider).or_default() += run.charge.0;
                }
            }
            None => {
                if let (Some(p), Some(cs)) = (r.provider, &r.receipt)
                    && let Ok(body) = cs.signed.decode_unverified()
                {
                    *spent.entry(p).or_default() += body.charge.0;
                }
            }
        }
    }
    let rows: Vec<serde_json::Value> = seen
        .iter()
        .map(|(p, e)| {
            serde_json::json!({
                "provider": p.to_string(),
                "completed": e.completed,
                "failed": e.failed,
                "disputed": e.lied,
                "spot_checks_passed": e.checks_passed,
                "reported_by_others": e.reported,
                "mean_ms_to_receipt": e.mean_ms(),
                "spent_msat": spent.get(p).copied().unwrap_or(0),
                "score": e.score(),
                "standing": if e.score() < 0 { "bad" } else { "good" },
            })
        })
        .collect();
    if g.json {
        println!("{}", serde_json::Value::Array(rows));
        return Ok(());
    }
    if rows.is_empty() {
        println!("no provider has run a job for this buyer yet");
        return Ok(());
    }
    println!(
        "{:<14} {:>9} {:>6} {:>8} {:>7} {:>8} {:>9} {:>12} {:>6}  STANDING",
        "PROVIDER",
        "COMPLETED",
        "FAILED",
        "DISPUTED",
        "CHECKED",
        "REPORTED",
        "MEAN ms",
        "SPENT msat",
        "SCORE"
    );
    for ((p, e), v) in seen.iter().zip(&rows) {
        println!(
            "{:<14} {:>9} {:>6} {:>8} {:>7} {:>8} {:>9} {:>12} {:>6}  {}",
            &p.to_string()[..12],
            e.completed,
            e.failed,
            e.lied,
            e.checks_passed,
            e.reported,
            e.mean_ms().map_or_else(|| "-".into(), |m| m.to_string()),
            v["spent_msat"].as_u64().unwrap_or(0),
            e.score(),
            v["standing"].as_str().unwrap_or("")
        );
    }
    println!(
        "(score = completed - forfeited - 4 x failed - 16 x disputed - 8 x reported, a caught lie forfeiting every point earned; a provider in bad standing is matched after those in good standing at its price; CHECKED: jobs another provider's re-execution confirmed)"
    );
    Ok(())
}
