//! A node restarted with the same data dir keeps its PeerId and re-announces the asks it still
//! offers (not the cancelled ones), reconnecting to the peers it remembers; a taken port gives
//! a clear error.

use std::time::Duration;

use hashgrid_node::StartError;
use hashgrid_tests::{
    addr_of, ask_spec, gpu, start_provider_with, test_builder, wait_for_asks, wait_for_book,
};

/// Bound on every wait in this test.
const LIMIT: Duration = Duration::from_secs(5);

/// Short TTL so the stopped provider's asks leave the other book before it comes back.
const TTL: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_node_keeps_identity_and_reannounces_its_asks() -> anyhow::Result<()> {
    hashgrid_tests::init_tracing();
    let dir = tempfile::tempdir()?;
    let other = test_builder(&[]).start().await?;
    let other_addr = addr_of(&other).await?;
    let provider = |bootstrap: &[hashgrid_node::Multiaddr]| {
        test_builder(bootstrap)
            .data_dir(dir.path())
            .gpu_profiles(vec![gpu("restart-gpu")])
            .order_ttl(TTL)
    };

    let first = provider(std::slice::from_ref(&other_addr)).start().await?;
    let peer_id = first.peer_id();
    let kept = first.market().post_ask(ask_spec("restart-gpu", 10)).await?;
    let dropped = first.market().post_ask(ask_spec("restart-gpu", 20)).await?;
    first.market().cancel(dropped.order_id).await?;
    wait_for_book(&other, LIMIT, "the kept ask", |b| {
        b.has_ask(&kept) && !b.has_ask(&dropped)
    })
    .await?;
    first.shutdown().await;
    // While the provider is down its ask expires from the other book.
    wait_for_book(&other, LIMIT, "the ask to expire", |b| !b.has_ask(&kept)).await?;

    // No bootstrap peer this time: the node dials the peers it remembers in its store.
    let second = provider(&[]).start().await?;
    assert_eq!(
        second.peer_id(),
        peer_id,
        "the PeerId must survive a restart"
    );
    wait_for_book(&other, LIMIT, "the ask to come back", |b| b.has_ask(&kept)).await?;
    // The cancelled ask stays cancelled.
    assert!(!other.market().book().await?.has_ask(&dropped));
    assert!(second.market().book().await?.has_ask(&kept));

    second.shutdown().await;
    other.shutdown().await;
    Ok(())
}

/// A node restarted without bootstrap peers whose first dials of the peers it remembers fail
/// (they were down too) dials them again until one answers, instead of staying alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_remembered_peers_were_down_dials_them_again() -> anyhow::Result<()> {
    hashgrid_tests::init_tracing();
    let dir = tempfile::tempdir()?;
    // The other site keeps its key and its port across its own restart.
    let key = hashgrid_protocol::Keypair::generate()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let listen: hashgrid_node::Multiaddr = format!("/ip4/127.0.0.1/tcp/{port}").parse()?;
    let other = || {
        hashgrid_node::Node::builder()
            .network(hashgrid_tests::test_network())
            .mdns(false)
            .heartbeat(hashgrid_tests::TEST_HEARTBEAT)
            .keypair(key.clone())
            .listen(listen.clone())
    };
    let first_other = other().start().await?;
    let boot = addr_of(&first_other).await?;
    let site = test_builder(std::slice::from_ref(&boot))
        .data_dir(dir.path())
        .start()
        .await?;
    // Connected, and the other's addresses in the site's store (from its identify info).
    let start = std::time::Instant::now();
    while !site
        .peers()
        .known()
        .await?
        .iter()
        .any(|(p, _)| *p == first_other.peer_id())
    {
        anyhow::ensure!(
            start.elapsed() < LIMIT,
            "the site never stored the other's address"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Both go down; the site comes back first, with no bootstrap peer: its dial of the peer
    // it remembers finds nobody listening.
    site.shutdown().await;
    first_other.shutdown().await;
    let site = test_builder(&[]).data_dir(dir.path()).start().await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(site.peers().connected().await?.is_empty());
    // The other site comes back on its old address; the site finds it by itself.
    let second_other = other().start().await?;
    hashgrid_tests::wait_for_peers(&site, 1, 4 * LIMIT).await?;
    site.shutdown().await;
    second_other.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn taken_port_is_a_clear_error() -> anyhow::Result<()> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let err = hashgrid_node::Node::builder()
        .network(hashgrid_tests::test_network())
        .mdns(false)
        .listen(format!("/ip4/127.0.0.1/tcp/{port}").parse()?)
        .start()
        .await
        .expect_err("the port is taken");
    assert!(matches!(err, StartError::AddrInUse { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("already in use") && msg.contains("--listen"),
        "{msg}"
    );
    Ok(())
}

/// A node whose bootstrap peer is down when it starts (restarting, or its first handshake
/// failed) dials it again, backing off, and joins the network when the peer is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_started_before_its_bootstrap_peer_joins_when_the_peer_comes_up() {
    // Outside the ephemeral range: in the 1.5 s before the site binds it, an outbound
    // connection of another test could otherwise take it (the crash check saw that once).
    let port = hashgrid_testnet::sites::free_port().unwrap();
    let addr: hashgrid_node::Multiaddr = format!("/ip4/127.0.0.1/tcp/{port}").parse().unwrap();
    let buyer = test_builder(std::slice::from_ref(&addr))
        .region("us-east")
        .start()
        .await
        .unwrap();
    // Its first dial finds nothing listening.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(buyer.peers().connected().await.unwrap().is_empty());
    // The site comes up on that address, knowing nobody: only the buyer's dial can join them.
    let site = start_provider_with(&[], 100, 8, None, |b| b.listen(addr.clone()))
        .await
        .unwrap();
    wait_for_asks(&buyer, 1).await.unwrap();
    buyer.shutdown().await;
    site.shutdown().await;
}
