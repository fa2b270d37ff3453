//! A buyer remembers how each provider treated it: a provider whose outputs did not verify
//! ranks after providers in good standing at the same price, lightly loaded or not, and the
//! memory survives the buyer's restart.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use hashgrid_node::NodeHandle;
use hashgrid_node::jobs::{JobState, Lie};
use hashgrid_tests::{addr_of, copy_submission, start_provider, test_builder, wait_for_asks};

const LIMIT: Duration = Duration::from_secs(60);

async fn job(b: &NodeHandle) -> hashgrid_node::JobRecord {
    let id = b.jobs().submit(copy_submission(64 << 10)).await.unwrap();
    let rec = tokio::time::timeout(LIMIT, b.jobs().wait(&id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rec.state, JobState::Done, "{:?}", rec.attempts);
    rec
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_lied_ranks_last_at_its_price_across_a_restart() {
    hashgrid_tests::init_tracing();
    let liar = start_provider(&[], 100, 8, Some(Lie::WrongOutput))
        .await
        .unwrap();
    let boot = [addr_of(&liar).await.unwrap()];
    let honest = start_provider(&boot, 100, 8, None).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let start_buyer = || {
        test_builder(&boot)
            .region("us-east")
            .data_dir(dir.path())
            .start()
    };
    let b = start_buyer().await.unwrap();
    wait_for_asks(&b, 2).await.unwrap();
    // Equal prices: the random tie-break and the load spread send some job to the liar
    // sooner or later; the job then completes on the honest site.
    let mut tried_liar = false;
    for _ in 0..8 {
        let rec = job(&b).await;
        if rec.attempts.iter().any(|a| a.provider == liar.public_key()) {
            tried_liar = true;
            break;
        }
    }
    assert!(tried_liar, "no job went to the liar in 8 tries");
    let experience = |b: &NodeHandle, p: &NodeHandle| {
        b.jobs()
            .experience()
            .into_iter()
            .find(|(k, _)| *k == p.public_key())
            .map(|(_, e)| e)
            .unwrap()
    };
    let l = experience(&b, &liar);
    assert_eq!((l.lied, l.completed), (1, 0));
    assert!(l.score() < 0);
    assert!(experience(&b, &honest).completed >= 1);

    // A restart forgets recent load and who is down, not the experience: every job goes to
    // the honest site first, although it carries all the load.
    b.shutdown().await;
    let b = start_buyer().await.unwrap();
    wait_for_asks(&b, 2).await.unwrap();
    assert_eq!(experience(&b, &liar).lied, 1);
    for _ in 0..4 {
        let rec = job(&b).await;
        assert_eq!(rec.attempts.len(), 1, "{:?}", rec.attempts);
        assert_eq!(rec.provider, Some(honest.public_key()));
    }
    b.shutdown().await;
    liar.shutdown().await;
    honest.shutdown().await;
}
