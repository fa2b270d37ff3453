//! Events that matter (receipts signed and countersigned, jobs ended) are persisted with the
//! state change they report and delivered until acknowledged, across a restart.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use hashgrid_node::jobs::JobState;
use hashgrid_node::{DurableEvent, NodeHandle};
use hashgrid_tests::{addr_of, copy_submission, start_provider_with, test_builder, wait_for_asks};

const LIMIT: Duration = Duration::from_secs(60);

async fn next(node: &NodeHandle) -> (u64, DurableEvent) {
    tokio::time::timeout(LIMIT, node.durable().wait_next())
        .await
        .expect("an event in time")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_delivered_until_acknowledged_across_a_restart() {
    hashgrid_tests::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("provider");
    let with_dir = |d: std::path::PathBuf| move |b: hashgrid_node::NodeBuilder| b.data_dir(d);
    let p = start_provider_with(&[], 100, 8, None, with_dir(data.clone()))
        .await
        .unwrap();
    let boot = [addr_of(&p).await.unwrap()];
    let b = test_builder(&boot)
        .region("us-east")
        .data_dir(dir.path().join("buyer"))
        .start()
        .await
        .unwrap();
    wait_for_asks(&b, 1).await.unwrap();
    let mut jobs = Vec::new();
    for n in [64u64 << 10, 128 << 10] {
        let id = b.jobs().submit(copy_submission(n)).await.unwrap();
        let rec = tokio::time::timeout(LIMIT, b.jobs().wait(&id))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(rec.state, JobState::Done, "{:?}", rec.attempts);
        jobs.push(id);
    }
    // The buyer: one JobEnded per job, in order, each done by this provider.
    for job in &jobs {
        let (id, ev) = next(&b).await;
        assert_eq!(
            ev,
            DurableEvent::JobEnded {
                job: *job,
                state: JobState::Done,
                provider: Some(p.public_key()),
            }
        );
        assert!(b.durable().handled(id).unwrap());
        assert!(!b.durable().handled(id).unwrap(), "acknowledged twice");
    }
    assert_eq!(b.durable().next().unwrap(), None);
    // The provider: each receipt signed, then countersigned (a buyer's job is done once the
    // provider acknowledged its countersignature, so all four are in by now).
    let (id, ev) = next(&p).await;
    assert!(
        matches!(ev, DurableEvent::ReceiptSigned { chain_seq: 0, buyer, .. } if buyer == b.public_key()),
        "{ev:?}"
    );
    // Not acknowledged yet: it is still the next one.
    assert_eq!(p.durable().next().unwrap(), Some((id, ev)));
    assert!(p.durable().handled(id).unwrap());
    p.shutdown().await;
    let p = start_provider_with(&[], 100, 8, None, with_dir(data))
        .await
        .unwrap();
    // Three events were not acknowledged: they are still there, oldest first.
    let mut after = Vec::new();
    while let Some((id, ev)) = p.durable().next().unwrap() {
        after.push(ev);
        assert!(p.durable().handled(id).unwrap());
    }
    assert_eq!(after.len(), 3, "{after:?}");
    assert!(
        matches!(after[0], DurableEvent::ReceiptCountersigned { .. }),
        "{after:?}"
    );
    assert!(
        matches!(after[1], DurableEvent::ReceiptSigned { chain_seq: 1, .. }),
        "{after:?}"
    );
    assert!(
        matches!(after[2], DurableEvent::ReceiptCountersigned { .. }),
        "{after:?}"
    );
    assert_eq!(p.durable().next().unwrap(), None);
    b.shutdown().await;
    p.shutdown().await;
}
