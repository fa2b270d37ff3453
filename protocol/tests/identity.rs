//! Key files and the libp2p PeerId of a node key.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use hashgrid_protocol::*;
use std::os::unix::fs::PermissionsExt;

#[test]
fn generated_key_file_is_0600_and_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub/dir/identity.key");
    let k1 = Keypair::load_or_generate(&path).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 32);
    let k2 = Keypair::load_or_generate(&path).unwrap();
    assert_eq!(k1.public(), k2.public());
    assert_eq!(k1.peer_id(), k2.peer_id());
    // A second generation in another file gives another key.
    let k3 = Keypair::load_or_generate(&dir.path().join("other.key")).unwrap();
    assert_ne!(k1.public(), k3.public());
}

#[test]
fn peer_id_agrees_with_libp2p() {
    for seed in 0..16u8 {
        let k = Keypair::from_secret_bytes([seed; 32]);
        let lp = k.to_libp2p();
        // libp2p derives the PeerId from its own keypair; ours must be the same.
        assert_eq!(lp.public().to_peer_id(), k.peer_id());
        assert_eq!(PublicKey::from_libp2p(&lp.public()), Some(k.public()));
        // A signature made through libp2p's keypair verifies with our public key, and vice
        // versa: the same key signs gossip and receipts.
        let msg = b"same identity";
        let sig: [u8; 64] = lp.sign(msg).unwrap().try_into().unwrap();
        assert!(k.public().verify_raw(msg, &Signature(sig)));
        let ours = k.sign_raw(msg);
        assert!(lp.public().verify(msg, &ours.0));
    }
}

#[test]
fn readable_key_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("identity.key");
    Keypair::load_or_generate(&path).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = Keypair::load(&path).unwrap_err();
    assert!(matches!(err, KeyFileError::Permissions { .. }));
    assert!(err.to_string().contains("chmod 600"), "{err}");
}

#[test]
fn wrong_length_key_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("identity.key");
    std::fs::write(&path, b"too short").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(matches!(
        Keypair::load_or_generate(&path),
        Err(KeyFileError::BadLength { len: 9, .. })
    ));
}

#[test]
fn invalid_public_key_bytes_do_not_panic() {
    // Not a point on the curve for a sizeable share of random byte strings.
    let mut invalid = 0;
    for i in 0..64u8 {
        let pk = PublicKey([i.wrapping_mul(37).wrapping_add(1); 32]);
        if pk.try_to_peer_id().is_err() {
            invalid += 1;
        }
        assert!(!pk.verify_raw(b"x", &Signature([0; 64])));
    }
    assert!(invalid > 0);
}
