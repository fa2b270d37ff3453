//! Verification by re-execution between real nodes: a provider that corrupts one output in
//! two (with valid signatures) is caught by `spot:0.2`, is not paid for the bad result, loses
//! its share of the jobs, and a buyer that never dealt with it avoids it from the gossiped
//! evidence alone; honest providers are never accused, also when their float outputs differ
//! in the last bit (compared within a tolerance), and without a tolerance a disagreement that
//! no majority settles accuses nobody.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use hashgrid_node::jobs::record::VerifyOutcome;
use hashgrid_node::jobs::{FailKind, IntoSharedInputs, JobState, Lie, Submission};
use hashgrid_node::{JobRecord, NodeHandle};
use hashgrid_protocol::{JobLimits, PublicKey, Tolerance, Verification, VerifyMode};
use hashgrid_tests::{addr_of, copy_submission, start_provider, test_builder, wait_for_asks};

const LIMIT: Duration = Duration::from_secs(120);

async fn run(b: &NodeHandle, mut sub: Submission, verify: &Verification) -> JobRecord {
    sub.options.verify = verify.clone();
    let id = b.jobs().submit(sub).await.unwrap();
    tokio::time::timeout(LIMIT, b.jobs().wait(&id))
        .await
        .unwrap()
        .unwrap()
}

fn experience(b: &NodeHandle, p: &PublicKey) -> hashgrid_node::jobs::reputation::Experience {
    b.jobs()
        .experience()
        .into_iter()
        .find(|(k, _)| k == p)
        .map(|(_, e)| e)
        .unwrap_or_default()
}

/// The providers whose receipts `rec` countersigned, with the charges.
fn paid(rec: &JobRecord) -> Vec<(PublicKey, u64)> {
    match &rec.verification {
        Some(v) => v
            .runs
            .iter()
            .filter(|r| r.countersigned.is_some())
            .map(|r| (r.provider, r.charge.0))
            .collect(),
        None => rec
            .receipt
            .iter()
            .map(|cs| {
                let r = cs.signed.decode_unverified().unwrap();
                (r.provider, r.charge.0)
            })
            .collect(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cheating_provider_is_caught_unpaid_and_avoided_by_buyers_that_got_the_evidence() {
    hashgrid_tests::init_tracing();
    let liar = start_provider(&[], 100, 8, Some(Lie::Cheat { one_in: 2 }))
        .await
        .unwrap();
    let boot = [addr_of(&liar).await.unwrap()];
    let mut honest = Vec::new();
    for _ in 0..3 {
        honest.push(start_provider(&boot, 100, 8, None).await.unwrap());
    }
    let a = test_builder(&boot).region("us-east").start().await.unwrap();
    let b = test_builder(&boot).region("us-east").start().await.unwrap();
    wait_for_asks(&a, 4).await.unwrap();
    wait_for_asks(&b, 4).await.unwrap();
    let spot = Verification {
        mode: "spot:0.2".parse().unwrap(),
        ..Verification::default()
    };
    let lp = liar.public_key();

    // Buyer A runs jobs with spot:0.2 until a check catches the liar.
    let expected = copy_submission(4096);
    let want_out: Vec<u8> = expected.inputs.values().next().unwrap().to_vec();
    let mut records = Vec::new();
    let mut caught = None;
    let mut undetected = 0;
    for i in 0..300 {
        let rec = run(&a, copy_submission(4096), &spot).await;
        assert_eq!(rec.state, JobState::Done, "job {i}: {:?}", rec.attempts);
        let v = rec.verification.as_ref().unwrap();
        assert_eq!(v.mode, VerifyMode::Spot { permille: 200 });
        let out = a.jobs().result(&rec.id).unwrap().unwrap().outputs;
        // The accepted output is wrong only when an unchecked job went to the liar.
        if out.values().next().unwrap() != &want_out {
            assert_eq!(rec.provider, Some(lp));
            assert_eq!(v.outcome, VerifyOutcome::NotDrawn);
            undetected += 1;
        }
        if let VerifyOutcome::Overruled { accused } = &v.outcome {
            assert_eq!(accused, &vec![lp], "only the liar is ever accused");
            caught = Some(rec.clone());
        }
        records.push(rec);
        if caught.is_some() {
            break;
        }
    }
    let caught = caught.expect("300 jobs with spot:0.2 never caught the liar");
    let v = caught.verification.as_ref().unwrap();
    // The majority is two honest providers; the liar's run is disputed, not countersigned.
    assert_eq!(v.runs.len(), 3, "{v:?}");
    let bad = v.runs.iter().find(|r| r.provider == lp).unwrap();
    assert!(bad.countersigned.is_none() && bad.mismatch.is_some());
    assert!(
        v.runs
            .iter()
            .filter(|r| r.provider != lp)
            .all(|r| r.countersigned.is_some() && r.mismatch.is_none())
    );
    assert!(v.evidence.is_some(), "exact outputs: evidence is gossiped");
    assert_ne!(caught.provider, Some(lp));
    assert_eq!(
        a.jobs()
            .result(&caught.id)
            .unwrap()
            .unwrap()
            .outputs
            .values()
            .next()
            .unwrap(),
        &want_out
    );
    let l = experience(&a, &lp);
    assert_eq!(l.lied, 1);
    assert!(l.score() < 0);
    for h in &honest {
        let e = experience(&a, &h.public_key());
        assert_eq!((e.lied, e.failed, e.reported), (0, 0, 0), "honest accused");
    }
    eprintln!(
        "caught after {} jobs ({undetected} corrupt results accepted unchecked before)",
        records.len()
    );

    // Buyer B never dealt with the liar: the evidence alone lowers its standing there.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while experience(&b, &lp).reported == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "buyer B never counted the evidence"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Operators see it: A sent one piece of evidence and overruled one run, B counted it.
    let metric = |text: &str, series: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0)
    };
    let (mut ma, mut mb) = (String::new(), String::new());
    a.ops().render_metrics(&mut ma).await.unwrap();
    b.ops().render_metrics(&mut mb).await.unwrap();
    assert_eq!(
        metric(&ma, "hashgrid_fraud_evidence_total{event=\"sent\"}"),
        1,
        "{ma}"
    );
    assert_eq!(
        metric(
            &ma,
            "hashgrid_buyer_verifications_total{outcome=\"overruled\"}"
        ),
        1
    );
    assert_eq!(
        metric(&mb, "hashgrid_fraud_evidence_total{event=\"counted\"}"),
        1,
        "{mb}"
    );
    let seen_by_b = experience(&b, &lp);
    assert_eq!((seen_by_b.reported, seen_by_b.completed), (1, 0));
    assert!(seen_by_b.score() < 0);
    for h in &honest {
        assert_eq!(experience(&b, &h.public_key()).reported, 0);
    }

    // From now on neither buyer places a job with the liar while honest providers are free.
    let none = Verification::default();
    for buyer in [&a, &b] {
        for _ in 0..6 {
            let rec = run(buyer, copy_submission(4096), &none).await;
            assert_eq!(rec.state, JobState::Done);
            assert!(
                rec.attempts.iter().all(|t| t.provider != lp),
                "{:?}",
                rec.attempts
            );
            records.push(rec);
        }
    }

    // Paid exactly for what was countersigned: the liar's disputed run owes it nothing.
    let owed: u64 = records
        .iter()
        .flat_map(paid)
        .filter(|(p, _)| *p == lp)
        .map(|(_, c)| c)
        .sum();
    let positions = a.settlement().positions();
    assert_eq!(
        positions.get(&lp).map_or(0, |p| p.owed_to_it.0),
        owed,
        "A owes the liar exactly its countersigned charges"
    );
    let books = liar.settlement().positions();
    let claim = books.get(&a.public_key()).map_or(0, |p| {
        let e = p.as_buyer;
        e.accrued.0 + e.invoiced.0 + e.paid.0 + e.confirmed.0 + e.settled.0
    });
    assert_eq!(
        claim, owed,
        "the liar's ledger claims only countersigned runs"
    );
    assert!(bad.charge.0 > 0);

    for n in [a, b, liar].into_iter().chain(honest) {
        n.shutdown().await;
    }
}

fn saxpy() -> Submission {
    let path = hashgrid_examples::kernels_dir().join("saxpy/job.toml");
    let job = hashgrid_protocol::load_job_file(&path, &JobLimits::default()).unwrap();
    Submission {
        spec: job.spec,
        inputs: job.inputs.into_shared(),
        options: Default::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn float_outputs_that_differ_in_the_last_bit_agree_within_a_tolerance_and_accuse_nobody() {
    hashgrid_tests::init_tracing();
    let plain = start_provider(&[], 100, 8, None).await.unwrap();
    let boot = [addr_of(&plain).await.unwrap()];
    // Honest, but its floats round differently (the lowest bit of every f32 flipped).
    let other = start_provider(&boot, 100, 8, Some(Lie::Rounding))
        .await
        .unwrap();
    let b = test_builder(&boot).region("us-east").start().await.unwrap();
    wait_for_asks(&b, 2).await.unwrap();
    let tolerant = Verification {
        mode: VerifyMode::Replicate { k: 2 },
        tolerances: [(
            "out".to_string(),
            Tolerance {
                rtol: 1e-6,
                atol: 1e-6,
            },
        )]
        .into(),
        tokens: None,
    };
    for _ in 0..3 {
        let rec = run(&b, saxpy(), &tolerant).await;
        assert_eq!(rec.state, JobState::Done, "{:?}", rec.attempts);
        let v = rec.verification.unwrap();
        assert_eq!(v.outcome, VerifyOutcome::Agreed);
        assert_eq!(v.runs.len(), 2);
        assert!(v.runs.iter().all(|r| r.countersigned.is_some()));
        // The buyer paid both runs; the second is what the assurance cost.
        assert!(v.extra_msat > 0);
        assert_eq!(v.extra_msat, v.runs[1].charge.0);
    }
    // Compared exactly, the two disagree and no third provider can decide: nothing is
    // accepted, nobody is accused.
    let exact = Verification {
        mode: VerifyMode::Replicate { k: 2 },
        ..Verification::default()
    };
    let rec = run(&b, saxpy(), &exact).await;
    match &rec.state {
        JobState::Failed { kind, reason } => {
            assert_eq!(*kind, FailKind::Verification);
            assert!(reason.contains("no majority"), "{reason}");
        }
        s => panic!("{s:?}"),
    }
    let v = rec.verification.unwrap();
    assert_eq!(v.outcome, VerifyOutcome::NoMajority);
    assert!(v.runs.iter().all(|r| r.countersigned.is_none()));
    for p in [&plain, &other] {
        let e = experience(&b, &p.public_key());
        assert_eq!((e.lied, e.reported), (0, 0));
        assert_eq!(e.checks_passed, 3);
    }
    for n in [b, plain, other] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_run_of_checked_jobs_on_honest_providers_accuses_nobody() {
    hashgrid_tests::init_tracing();
    let first = start_provider(&[], 100, 8, None).await.unwrap();
    let boot = [addr_of(&first).await.unwrap()];
    let mut providers = vec![first];
    for _ in 0..2 {
        providers.push(start_provider(&boot, 100, 8, None).await.unwrap());
    }
    let b = test_builder(&boot).region("us-east").start().await.unwrap();
    wait_for_asks(&b, 3).await.unwrap();
    let spot = Verification {
        mode: VerifyMode::Spot { permille: 500 },
        ..Verification::default()
    };
    let replicate = Verification {
        mode: VerifyMode::Replicate { k: 3 },
        tolerances: [(
            "out".to_string(),
            Tolerance {
                rtol: 1e-6,
                atol: 0.0,
            },
        )]
        .into(),
        tokens: None,
    };
    let mut checked = 0;
    for i in 0..90 {
        let (sub, v) = if i % 3 == 0 {
            (saxpy(), &replicate)
        } else {
            (copy_submission(4096 + 4 * (i % 7)), &spot)
        };
        let rec = run(&b, sub, v).await;
        assert_eq!(rec.state, JobState::Done, "job {i}: {:?}", rec.attempts);
        let outcome = rec.verification.unwrap().outcome;
        assert!(
            matches!(outcome, VerifyOutcome::Agreed | VerifyOutcome::NotDrawn),
            "job {i}: {outcome:?}"
        );
        if outcome == VerifyOutcome::Agreed {
            checked += 1;
        }
    }
    assert!(checked >= 30, "only {checked} jobs were checked");
    for p in &providers {
        let e = experience(&b, &p.public_key());
        assert_eq!((e.lied, e.failed, e.reported), (0, 0, 0));
        assert!(e.checks_passed > 0);
    }
    b.shutdown().await;
    for p in providers {
        p.shutdown().await;
    }
}
