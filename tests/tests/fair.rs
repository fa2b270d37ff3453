//! Fair matching between real nodes (loopback, lavapipe in CI): a cheaper provider wins every
//! job it can take; among providers at the same price, jobs from several buyers spread over
//! all of them instead of all going to one.

#![allow(clippy::unwrap_used)]

use hashgrid_node::jobs::IntoSharedInputs;
use std::collections::HashMap;
use std::time::Duration;

use hashgrid_node::NodeHandle;
use hashgrid_node::jobs::{JobOptions, JobState, Submission};
use hashgrid_protocol::{JobLimits, PublicKey, Requirements, load_job_file};
use hashgrid_tests::{addr_of, start_provider, test_builder, wait_for_asks};

const JOB_LIMIT: Duration = Duration::from_secs(60);

fn saxpy(min_memory_gib: u64) -> Submission {
    let path = hashgrid_examples::kernels_dir().join("saxpy/job.toml");
    let job = load_job_file(&path, &JobLimits::default()).unwrap();
    Submission {
        spec: job.spec,
        inputs: job.inputs.into_shared(),
        options: JobOptions {
            requirements: Requirements {
                min_memory_bytes: min_memory_gib << 30,
                ..Requirements::default()
            },
            // Three buyers at once over three one-unit sites: a job can find every site busy
            // for a moment (a unit is free again only once its last job's receipt is done),
            // and then waits for one, as the CLI and the gateway do, instead of failing.
            wait_for_capacity: Duration::from_secs(20),
            ..JobOptions::default()
        },
    }
}

/// Runs `n` jobs one after another from `buyer` and returns who ran each.
async fn run_jobs(buyer: &NodeHandle, n: usize, min_memory_gib: u64) -> Vec<PublicKey> {
    let mut providers = Vec::new();
    for _ in 0..n {
        let id = buyer.jobs().submit(saxpy(min_memory_gib)).await.unwrap();
        let rec = tokio::time::timeout(JOB_LIMIT, buyer.jobs().wait(&id))
            .await
            .expect("the job finishes in time")
            .unwrap();
        assert_eq!(rec.state, JobState::Done, "{:?}", rec.attempts);
        providers.push(rec.provider.unwrap());
    }
    providers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn equal_prices_share_the_work_and_a_cheaper_provider_still_wins() {
    hashgrid_tests::init_tracing();
    // The cheapest site has 1 GiB; three sites at one higher price have 8 GiB.
    let cheap = start_provider(&[], 50, 1, None).await.unwrap();
    let boot = [addr_of(&cheap).await.unwrap()];
    let mut equal = Vec::new();
    for _ in 0..3 {
        equal.push(start_provider(&boot, 100, 8, None).await.unwrap());
    }
    let mut buyers = Vec::new();
    for _ in 0..3 {
        let b = test_builder(&boot).region("us-east").start().await.unwrap();
        wait_for_asks(&b, 4).await.unwrap();
        buyers.push(b);
    }

    // Jobs the cheap site can take all go to it: price comes first.
    for b in &buyers {
        let got = run_jobs(b, 2, 0).await;
        assert!(
            got.iter().all(|p| *p == cheap.public_key()),
            "a cheaper provider with room wins"
        );
    }

    // Jobs that need 4 GiB, from three buyers at once: the three equal sites share them.
    let (a, b, c) = tokio::join!(
        run_jobs(&buyers[0], 3, 4),
        run_jobs(&buyers[1], 3, 4),
        run_jobs(&buyers[2], 3, 4)
    );
    let per_buyer = [a, b, c];
    let mut per_provider: HashMap<PublicKey, usize> = HashMap::new();
    for (i, got) in per_buyer.iter().enumerate() {
        let distinct: std::collections::HashSet<_> = got.iter().collect();
        assert!(
            distinct.len() >= 2,
            "buyer {i} spreads its own jobs: {} distinct of 3",
            distinct.len()
        );
        for p in got {
            *per_provider.entry(*p).or_default() += 1;
        }
    }
    // Every equal site gets work and none takes most of it. A share of exactly three each is
    // not what fair spreading promises: a one-unit site is sometimes still busy with another
    // buyer's job when a buyer proposes (more often on a loaded machine), and the buyer then
    // takes its next candidate, so 4/4/1 is a fair outcome (seen twice in 600 CI-load runs);
    // without spreading, the buyers' jobs pile onto the oldest ask and the next free one.
    for site in &equal {
        let n = per_provider.get(&site.public_key()).copied().unwrap_or(0);
        assert!(
            (1..=4).contains(&n),
            "every equal-priced site gets work, none most of the 9 jobs: {n} ({per_provider:?})"
        );
    }
    assert!(!per_provider.contains_key(&cheap.public_key()));

    for n in buyers.into_iter().chain(equal).chain([cheap]) {
        n.shutdown().await;
    }
}
