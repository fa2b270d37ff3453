//! A data dir written by the release before store schema versions (`tests/fixtures/datadir-v0`)
//! opens with this build: migrated to the current schema, every record readable, the provider's
//! receipt chain intact, and a node runs on it. So does one of schema 2
//! (`tests/fixtures/datadir-v2`, the release before verification), its agreements and the
//! buyer's experience of its provider kept.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use hashgrid_node::jobs::{JobState, audit_receipts, read_jobs, read_result};
use hashgrid_node::store::{SCHEMA_VERSION, Store};
use hashgrid_protocol::PublicKey;
use hashgrid_tests::{test_builder, test_network};

fn fixture(which: &str) -> PathBuf {
    fixture_of("datadir-v0", which)
}

fn fixture_of(release: &str, which: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(release)
        .join(which)
}

/// Copies a fixture data dir (opening a store writes to it).
fn copy(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
            // git keeps no permissions: a data dir's key file is 0600, and nodes refuse others.
            if e.file_name() == "identity.key" {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).unwrap();
            }
        }
    }
}

fn key(hex: &str) -> PublicKey {
    hex.parse().unwrap()
}

#[test]
fn a_buyers_data_dir_from_the_previous_release_opens_and_reads() {
    let dir = tempfile::tempdir().unwrap();
    copy(&fixture("buyer"), dir.path());
    let store = Store::open(&dir.path().join("store")).unwrap();
    assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
    let jobs = read_jobs(&store).unwrap();
    assert_eq!(jobs.len(), 2);
    let provider = key("e87a631453029b9cac06ec9096f30d92a03734f11f09c3d78f1a71b506142707");
    for job in &jobs {
        assert_eq!(job.state, JobState::Done, "{:?}", job.attempts);
        assert_eq!(job.provider, Some(provider));
        assert!(job.agreement.is_none(), "schema 1 kept no agreement");
        let receipt = job.receipt.clone().unwrap();
        let r = receipt.verify(&test_network()).unwrap();
        let result = read_result(&store, &job.id).unwrap().unwrap();
        hashgrid_protocol::check_outputs(&r, &result.outputs).unwrap();
    }
    drop(store);
    // Opening it again finds it current (nothing to migrate).
    let store = Store::open(&dir.path().join("store")).unwrap();
    assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
    assert_eq!(read_jobs(&store).unwrap().len(), 2);
}

#[test]
fn a_providers_data_dir_from_the_previous_release_keeps_its_chain_and_orders() {
    let dir = tempfile::tempdir().unwrap();
    copy(&fixture("provider"), dir.path());
    let store = Store::open(&dir.path().join("store")).unwrap();
    assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
    let provider = key("e87a631453029b9cac06ec9096f30d92a03734f11f09c3d78f1a71b506142707");
    let chain = audit_receipts(&store, provider, &test_network()).unwrap();
    assert_eq!((chain.receipts, chain.countersigned), (2, 2));
    assert_eq!(chain.countersigned_msat, chain.total_charged_msat);
    assert_eq!(store.own_orders().unwrap().len(), 1, "its ask");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_starts_on_a_data_dir_from_the_previous_release() {
    let dir = tempfile::tempdir().unwrap();
    copy(&fixture("buyer"), dir.path());
    let node = test_builder(&[])
        .data_dir(dir.path())
        .start()
        .await
        .unwrap();
    assert_eq!(
        node.public_key(),
        key("9c4f692daa5f314ba4635b786c17f004071873c33960b8276c496030eb1f3e34"),
        "the identity key is kept"
    );
    let jobs = node.jobs().list().unwrap();
    assert_eq!(jobs.len(), 2);
    assert!(jobs.iter().all(|j| j.state == JobState::Done));
    node.shutdown().await;
}

#[test]
fn a_buyers_data_dir_of_schema_2_keeps_its_agreements_and_its_experience() {
    let dir = tempfile::tempdir().unwrap();
    copy(&fixture_of("datadir-v2", "buyer"), dir.path());
    let store = Store::open(&dir.path().join("store")).unwrap();
    assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
    let jobs = read_jobs(&store).unwrap();
    assert_eq!(jobs.len(), 2);
    for job in &jobs {
        assert_eq!(job.state, JobState::Done, "{:?}", job.attempts);
        assert!(job.agreement.is_some(), "schema 2 kept the agreement");
        assert!(job.verification.is_none());
        let r = job
            .receipt
            .clone()
            .unwrap()
            .verify(&test_network())
            .unwrap();
        let result = read_result(&store, &job.id).unwrap().unwrap();
        hashgrid_protocol::check_outputs(&r, &result.outputs).unwrap();
    }
    let seen = hashgrid_node::jobs::read_experience(&store).unwrap();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let (provider, e) = &seen[0];
    assert_eq!(Some(*provider), jobs[0].provider);
    assert_eq!((e.completed, e.failed, e.lied), (2, 0, 0));
    assert_eq!((e.checks_passed, e.reported), (0, 0));
    assert!(e.completed_ms > 0);
    drop(store);
    let store = Store::open(&dir.path().join("store")).unwrap();
    assert_eq!(hashgrid_node::jobs::read_experience(&store).unwrap(), seen);
}

#[test]
fn a_providers_data_dir_of_schema_2_keeps_its_chain() {
    let dir = tempfile::tempdir().unwrap();
    copy(&fixture_of("datadir-v2", "provider"), dir.path());
    let store = Store::open(&dir.path().join("store")).unwrap();
    assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
    let key = hashgrid_protocol::Keypair::load(&dir.path().join("identity.key")).unwrap();
    let chain = audit_receipts(&store, key.public(), &test_network()).unwrap();
    assert_eq!((chain.receipts, chain.countersigned), (2, 2));
    assert_eq!(store.own_orders().unwrap().len(), 1, "its ask");
}
