//! Writes a fixture of this release's data dirs (see `tests/fixtures/*/README.md`): run with
//! `--ignored` and `HASHGRID_FIXTURE_OUT` naming a new directory, before changing the store.

#![allow(clippy::unwrap_used)]

use hashgrid_node::jobs::IntoSharedInputs;
use hashgrid_node::jobs::{JobOptions, JobState, Submission};
use hashgrid_protocol::{JobLimits, load_job_file};
use hashgrid_tests::{addr_of, start_provider_with, test_builder, wait_for_asks};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "writes a fixture; run by hand before a store change"]
async fn make_fixture() {
    let root = std::path::PathBuf::from(std::env::var("HASHGRID_FIXTURE_OUT").unwrap());
    assert!(
        !root.exists(),
        "HASHGRID_FIXTURE_OUT must name a new directory"
    );
    let (pd, bd) = (root.join("provider"), root.join("buyer"));
    let p = start_provider_with(&[], 100, 8, None, |b| b.data_dir(&pd))
        .await
        .unwrap();
    let boot = [addr_of(&p).await.unwrap()];
    let b = test_builder(&boot)
        .region("us-east")
        .data_dir(&bd)
        .start()
        .await
        .unwrap();
    wait_for_asks(&b, 1).await.unwrap();
    let path = hashgrid_examples::kernels_dir().join("saxpy/job.toml");
    let job = load_job_file(&path, &JobLimits::default()).unwrap();
    for _ in 0..2 {
        let id = b
            .jobs()
            .submit(Submission {
                spec: job.spec.clone(),
                inputs: job.inputs.clone().into_shared(),
                options: JobOptions::default(),
            })
            .await
            .unwrap();
        let rec = tokio::time::timeout(Duration::from_secs(60), b.jobs().wait(&id))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(rec.state, JobState::Done);
        println!("job {id} provider {:?}", rec.provider);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    println!("buyer {} provider {}", b.public_key(), p.public_key());
    b.shutdown().await;
    p.shutdown().await;
}
