//! Wallet tests on the in-process test chain, run three times: with the chain as the wallets'
//! backend directly, through the Esplora client against an Esplora API served from the same
//! chain, and through the bitcoind client against Bitcoin Core's JSON-RPC served from it.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use hashgrid_node::wallet::bitcoin::{Address, ScriptBuf};
use hashgrid_node::wallet::esplora_server::EsploraServer;
use hashgrid_node::wallet::rpc_server::BitcoindRpcServer;
use hashgrid_node::wallet::{
    BtcNetwork, ChainConfig, ChainSource, TestChain, Wallet, WalletError, WalletKeys,
    chain::Esplora,
};

#[derive(Clone, Copy)]
enum Backend {
    TestChain,
    Esplora,
    Bitcoind,
}

struct Env {
    chain: Arc<TestChain>,
    backend: Arc<dyn ChainSource>,
    _servers: (Option<EsploraServer>, Option<BitcoindRpcServer>),
    _dir: tempfile::TempDir,
    db: sled::Db,
}

fn env(kind: Backend) -> Env {
    let chain = TestChain::new();
    let dir = tempfile::tempdir().unwrap();
    let (backend, servers): (Arc<dyn ChainSource>, _) = match kind {
        Backend::TestChain => (chain.clone(), (None, None)),
        Backend::Esplora => {
            let server = EsploraServer::start(chain.clone()).unwrap();
            let backend = Arc::new(Esplora::new(&server.url()).unwrap());
            (backend, (Some(server), None))
        }
        Backend::Bitcoind => {
            // As `[settle]` configures it: a URL and bitcoind's cookie file.
            let server = BitcoindRpcServer::start(chain.clone(), "__cookie__", "s3cr3t").unwrap();
            let cookie = dir.path().join(".cookie");
            server.write_cookie(&cookie).unwrap();
            let cfg = ChainConfig::Bitcoind {
                url: server.url(),
                cookie: Some(cookie),
                user: None,
                password: None,
            };
            (Arc::from(cfg.open().unwrap()), (None, Some(server)))
        }
    };
    let db = sled::open(dir.path().join("db")).unwrap();
    Env {
        chain,
        backend,
        _servers: servers,
        _dir: dir,
        db,
    }
}

fn buyer(env: &Env, name: &str) -> (Wallet, WalletKeys) {
    let keys = WalletKeys::generate(BtcNetwork::Regtest).unwrap();
    let w = Wallet::open(
        env.db.open_tree(name).unwrap(),
        &keys.external,
        Some(&keys.internal),
        BtcNetwork::Regtest,
    )
    .unwrap();
    (w, keys)
}

fn watch(env: &Env, name: &str) -> (Wallet, String) {
    let keys = WalletKeys::generate(BtcNetwork::Regtest).unwrap();
    let public = keys.public_external().unwrap();
    assert!(public.contains("tpub"), "{public}");
    let w = Wallet::open(
        env.db.open_tree(name).unwrap(),
        &public,
        None,
        BtcNetwork::Regtest,
    )
    .unwrap();
    (w, public)
}

/// Mines 101 blocks to a fresh address of `w`: one mature 50 BTC coinbase.
fn fund(env: &Env, w: &mut Wallet) -> Address {
    let (_, addr) = w.reveal_address().unwrap();
    env.chain.mine(1, &addr.script_pubkey());
    env.chain.mine(100, &ScriptBuf::new_op_return([1u8; 4]));
    w.sync(&*env.backend).unwrap();
    addr
}

fn pays_and_confirms(kind: Backend) {
    let env = env(kind);
    let (mut b, _) = buyer(&env, "buyer");
    let (mut p, _) = watch(&env, "provider");
    fund(&env, &mut b);
    assert_eq!(b.balance().confirmed, 50 * 100_000_000);

    let (_, to) = p.reveal_address().unwrap();
    let tx = b.pay(&to, 123_456, 2).unwrap();
    env.backend.broadcast(&tx).unwrap();
    p.sync(&*env.backend).unwrap();
    let seen = p.received_at(&to.script_pubkey());
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].amount_sat, 123_456);
    assert_eq!(seen[0].confirmations, 0);

    env.chain.mine(3, &ScriptBuf::new_op_return([2u8; 4]));
    p.sync(&*env.backend).unwrap();
    b.sync(&*env.backend).unwrap();
    assert_eq!(p.received_at(&to.script_pubkey())[0].confirmations, 3);
    assert_eq!(p.balance().confirmed, 123_456);
    // The buyer paid the amount and a fee; the fee went to the miner.
    let fee = 50 * 100_000_000 - 123_456 - b.balance().confirmed;
    assert!(fee > 0 && fee < 2_000, "fee {fee}");
}

fn tampered_signature_is_refused(kind: Backend) {
    let env = env(kind);
    let (mut b, _) = buyer(&env, "buyer");
    let (mut p, _) = watch(&env, "provider");
    fund(&env, &mut b);
    let (_, to) = p.reveal_address().unwrap();
    let mut tx = b.pay(&to, 50_000, 2).unwrap();
    // Flip one bit of the taproot key-path signature.
    let mut stack: Vec<Vec<u8>> = tx.input[0].witness.iter().map(|w| w.to_vec()).collect();
    stack[0][10] ^= 1;
    tx.input[0].witness = stack.into();
    let e = env.backend.broadcast(&tx).unwrap_err();
    assert!(e.to_string().contains("script"), "{e}");
    // Also a redirected output: the signature no longer covers the transaction.
    let mut tx2 = b.pay(&to, 50_000, 2).unwrap();
    tx2.output[0].value += hashgrid_node::wallet::bitcoin::Amount::from_sat(1);
    assert!(env.backend.broadcast(&tx2).is_err());
    assert!(env.chain.mempool().is_empty());
    p.sync(&*env.backend).unwrap();
    assert!(p.received_at(&to.script_pubkey()).is_empty());
}

fn reorg_removes_payment(kind: Backend) {
    let env = env(kind);
    let (mut b, keys) = buyer(&env, "buyer");
    let (mut p, _) = watch(&env, "provider");
    fund(&env, &mut b);
    let mut twin = Wallet::open(
        env.db.open_tree("twin").unwrap(),
        &keys.external,
        Some(&keys.internal),
        BtcNetwork::Regtest,
    )
    .unwrap();
    twin.sync(&*env.backend).unwrap();
    let (_, twin_back) = twin.reveal_address().unwrap();
    let (_, to) = p.reveal_address().unwrap();
    let pay = b.pay(&to, 70_000, 2).unwrap();
    env.backend.broadcast(&pay).unwrap();
    env.chain.mine(1, &ScriptBuf::new_op_return([3u8; 4]));
    p.sync(&*env.backend).unwrap();
    assert_eq!(p.received_at(&to.script_pubkey())[0].confirmations, 1);

    // A double spend of the same coin back to the buyer wins in a one-block reorg: built by a
    // second wallet over the same keys that never saw the first payment.
    let conflict = twin.pay(&twin_back, 60_000, 5).unwrap();
    assert_eq!(
        conflict.input[0].previous_output,
        pay.input[0].previous_output
    );
    assert!(
        env.backend.broadcast(&conflict).is_err(),
        "a conflict is refused while the payment stands"
    );
    env.chain
        .reorg(
            1,
            &[pay.compute_txid()],
            std::slice::from_ref(&conflict),
            &ScriptBuf::new_op_return([4u8; 4]),
        )
        .unwrap();
    assert!(
        env.chain
            .transaction(&conflict.compute_txid())
            .unwrap()
            .block
            .is_some()
    );
    p.sync(&*env.backend).unwrap();
    assert!(
        p.received_at(&to.script_pubkey()).is_empty(),
        "{:?}",
        p.received_at(&to.script_pubkey())
    );
    assert_eq!(p.balance().confirmed, 0);
}

fn restart_keeps_wallet(kind: Backend) {
    let env = env(kind);
    let keys = WalletKeys::generate(BtcNetwork::Regtest).unwrap();
    let open = || {
        Wallet::open(
            env.db.open_tree("w").unwrap(),
            &keys.external,
            Some(&keys.internal),
            BtcNetwork::Regtest,
        )
        .unwrap()
    };
    let mut w = open();
    fund(&env, &mut w);
    let (i, a) = w.reveal_address().unwrap();
    let balance = w.balance();
    drop(w);
    let mut w = open();
    assert_eq!(w.balance(), balance);
    let (j, b) = w.reveal_address().unwrap();
    assert_eq!(
        j,
        i + 1,
        "an address handed out before the restart is not handed out again"
    );
    assert_ne!(a, b);
    // Another descriptor over the same store is refused.
    let other = WalletKeys::generate(BtcNetwork::Regtest).unwrap();
    let e = Wallet::open(
        env.db.open_tree("w").unwrap(),
        &other.external,
        Some(&other.internal),
        BtcNetwork::Regtest,
    )
    .unwrap_err();
    assert!(matches!(e, WalletError::Mismatch(_)), "{e}");
}

fn insufficient_funds(kind: Backend) {
    let env = env(kind);
    let (mut b, _) = buyer(&env, "buyer");
    b.sync(&*env.backend).unwrap();
    let (mut p, _) = watch(&env, "provider");
    let (_, to) = p.reveal_address().unwrap();
    let e = b.pay(&to, 1_000, 1).unwrap_err();
    assert!(matches!(e, WalletError::InsufficientFunds { .. }), "{e}");
    // A watch-only wallet cannot pay.
    fund(&env, &mut p);
    let e = p.pay(&to, 1_000, 1).unwrap_err();
    assert!(e.to_string().contains("watch-only"), "{e}");
}

macro_rules! each_backend {
    ($($name:ident),*) => {
        mod test_chain { $( #[test] fn $name() { super::$name(super::Backend::TestChain) } )* }
        mod esplora { $( #[test] fn $name() { super::$name(super::Backend::Esplora) } )* }
        mod bitcoind { $( #[test] fn $name() { super::$name(super::Backend::Bitcoind) } )* }
    };
}
each_backend!(
    pays_and_confirms,
    tampered_signature_is_refused,
    reorg_removes_payment,
    restart_keeps_wallet,
    insufficient_funds
);
