//! The store's unit tests: counters and the sequence lease, peers, schema versions and
//! migrations.

use super::*;

#[test]
fn counters_and_peers_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let peer = PeerId::random();
    {
        let s = Store::open(&path).unwrap();
        assert_eq!(s.next_seq(10).unwrap(), 10);
        assert_eq!(s.next_seq(0).unwrap(), 11);
        assert_eq!(s.next_order_id().unwrap(), 1);
        s.put_peer_addrs(&peer, &["/ip4/127.0.0.1/tcp/1".parse().unwrap()])
            .unwrap();
        s.flush().unwrap();
    }
    let s = Store::open(&path).unwrap();
    // Numbering resumes above the leased ceiling: never a number handed out before.
    assert_eq!(s.next_seq(0).unwrap(), 10 + SEQ_LEASE + 1);
    assert_eq!(s.next_order_id().unwrap(), 2);
    assert_eq!(s.known_peers().unwrap()[0].0, peer);
}

#[test]
fn a_reached_address_is_added_once_and_within_the_bound() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(&dir.path().join("store")).unwrap();
    let peer = PeerId::random();
    let a: Multiaddr = "/ip4/127.0.0.1/tcp/1".parse().unwrap();
    s.add_peer_addr(&peer, &a).unwrap();
    s.add_peer_addr(&peer, &a).unwrap();
    assert_eq!(s.known_peers().unwrap(), vec![(peer, vec![a.clone()])]);
    for port in 2..20 {
        let b: Multiaddr = format!("/ip4/127.0.0.1/tcp/{port}").parse().unwrap();
        s.add_peer_addr(&peer, &b).unwrap();
    }
    let known = s.known_peers().unwrap();
    assert_eq!(known[0].1.len(), MAX_ADDRS_PER_PEER);
    assert_eq!(known[0].1[0], a);
}

#[test]
fn a_new_store_records_its_schema_and_a_newer_one_is_refused_untouched() {
    assert_eq!(MIGRATIONS.len() as u32, SCHEMA_VERSION);
    assert!(
        MIGRATIONS
            .iter()
            .enumerate()
            .all(|(i, m)| m.from == i as u32)
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    {
        let s = Store::open(&path).unwrap();
        assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
        assert_eq!(s.next_order_id().unwrap(), 1);
        // A later release wrote version 99.
        s.meta.insert(KEY_SCHEMA, &99u32.to_be_bytes()).unwrap();
        s.flush().unwrap();
    }
    let err = Store::open(&path).unwrap_err();
    assert!(
        matches!(err, StoreError::NewerSchema { found: 99, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("newer hashgrid"), "{err}");
    // Untouched: the version and the records are still there. (sled may hold its lock
    // for a moment after the refused store was dropped.)
    let deadline = std::time::Instant::now() + STORE_LOCK_WAIT;
    let db = loop {
        match sled::open(&path) {
            Ok(db) => break db,
            Err(e) if std::time::Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(e) => panic!("reopening: {e}"),
        }
    };
    let meta = db.open_tree(TREE_META).unwrap();
    assert_eq!(
        meta.get(KEY_SCHEMA).unwrap().unwrap().as_ref(),
        &99u32.to_be_bytes()
    );
    assert!(meta.get(KEY_LAST_ORDER_ID).unwrap().is_some());
}

#[test]
fn sequence_numbers_are_unique_across_threads_and_rise_past_the_lease() {
    let s = Store::temporary().unwrap();
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let s = s.clone();
            std::thread::spawn(move || {
                (0..500)
                    .map(|_| s.next_seq(0).unwrap())
                    .collect::<Vec<u64>>()
            })
        })
        .collect();
    let mut all: Vec<u64> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), 2000, "no number handed out twice");
    // A clock past the ceiling moves both on.
    let later = s.next_seq(5 * SEQ_LEASE).unwrap();
    assert_eq!(later, 5 * SEQ_LEASE);
    assert_eq!(s.next_seq(0).unwrap(), later + 1);
}

#[test]
fn a_store_with_records_but_no_version_is_version_0_and_is_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    {
        // What the release before versions left: records, no version.
        let db = sled::open(&path).unwrap();
        db.open_tree(TREE_META)
            .unwrap()
            .insert(KEY_LAST_SEQ, &7u64.to_be_bytes())
            .unwrap();
        db.flush().unwrap();
    }
    let s = Store::open(&path).unwrap();
    assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
    assert_eq!(s.next_seq(0).unwrap(), 8, "its records are kept");
}

#[test]
fn the_lease_is_extended_ahead_of_need_and_never_reused_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let last;
    {
        let s = Store::open(&path).unwrap();
        let first = s.next_seq(1_000).unwrap();
        assert_eq!(first, 1_000);
        // Fresh: a whole lease is left.
        assert!(!s.seq_lease_low(1_000));
        assert!(!s.extend_seq_lease(1_000).unwrap());
        // The clock moved on past half the lease: extend it (off the hot path).
        let later = 1_000 + SEQ_LEASE / 2 + 1;
        assert!(s.seq_lease_low(later));
        assert!(s.extend_seq_lease(later).unwrap());
        assert!(!s.seq_lease_low(later));
        // Numbers up to the new ceiling come from memory.
        last = s.next_seq(later).unwrap();
        assert_eq!(last, later);
    }
    // After a restart (the extension was flushed) numbering resumes above the extended
    // ceiling: nothing handed out before comes back.
    let s = Store::open(&path).unwrap();
    let next = s.next_seq(0).unwrap();
    assert!(next > last);
    assert_eq!(next, 1_000 + SEQ_LEASE / 2 + 1 + SEQ_LEASE + 1);
}
