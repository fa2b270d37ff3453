//! Discovery beyond the bootstrap peer (Kademlia random walk among DHT servers; sites' capacity
//! ads for every node) and the node's lifecycle: the last dropped handle stops it.

use std::time::{Duration, Instant};

use hashgrid_node::NodeEvent;
use hashgrid_tests::{addr_of, gpu, test_builder, wait_for_peers};

/// Bound on every wait.
const LIMIT: Duration = Duration::from_secs(10);

/// A fast random walk so discovery shows up within the test's bound.
const WALK: Duration = Duration::from_millis(300);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kademlia_finds_peers_beyond_the_bootstrap_node() -> anyhow::Result<()> {
    // Nodes that serve the DHT (seeds), and no capacity ads: the DHT alone finds the peers.
    let seed = test_builder(&[])
        .kad_walk_interval(WALK)
        .dht_server(true)
        .start()
        .await?;
    let seed_addr = addr_of(&seed).await?;
    let mut others = Vec::new();
    for _ in 0..4 {
        others.push(
            test_builder(std::slice::from_ref(&seed_addr))
                .kad_walk_interval(WALK)
                .dht_server(true)
                .start()
                .await?,
        );
    }
    // Every node was only told about the seed, yet each one connects to all four others.
    for n in &others {
        wait_for_peers(n, 4, LIMIT).await?;
    }
    for n in others.iter().chain([&seed]) {
        n.shutdown().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sites_keep_their_target_of_peers_from_capacity_ads() -> anyhow::Result<()> {
    // Default nodes (DHT clients), each told only the seed: they find each other through the
    // capacity ads that reach them by gossip, and dial until they have their target of peers.
    let seed = test_builder(&[]).start().await?;
    let seed_addr = addr_of(&seed).await?;
    let mut sites = Vec::new();
    for i in 0..5 {
        sites.push(
            test_builder(std::slice::from_ref(&seed_addr))
                .gpu_profiles(vec![gpu(&format!("gpu-{i}"))])
                .target_peers(3)
                .start()
                .await?,
        );
    }
    for s in &sites {
        wait_for_peers(s, 3, LIMIT).await?;
    }
    // A target is a floor for dialling, not a cap: nobody dialled more than it needed, and
    // the seed, dialled by all, took every inbound connection.
    assert!(seed.peers().connected().await?.len() >= 5);
    for n in sites.iter().chain([&seed]) {
        n.shutdown().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_last_handle_stops_the_node() -> anyhow::Result<()> {
    let a = test_builder(&[]).start().await?;
    let b = test_builder(&[addr_of(&a).await?]).start().await?;
    wait_for_peers(&a, 1, LIMIT).await?;
    let b_id = b.peer_id();
    let mut events = a.events();
    let b2 = b.clone();
    drop(b);
    // One handle left: still running.
    assert!(b2.peers().connected().await.is_ok());
    drop(b2);
    let deadline = Instant::now() + LIMIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, events.recv()).await {
            Ok(Ok(NodeEvent::PeerDisconnected(p))) if p == b_id => break,
            Ok(Ok(_)) => {}
            other => anyhow::bail!("node b did not stop: {other:?}"),
        }
    }
    assert!(a.peers().connected().await?.is_empty());
    a.shutdown().await;
    // Shutting down twice is harmless.
    a.shutdown().await;
    Ok(())
}
