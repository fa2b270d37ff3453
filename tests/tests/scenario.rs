//! Ten nodes on loopback, six of them providers: asks reach every book, a cancel and an
//! expiry remove them everywhere, and a node that joins late gets the whole book.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use hashgrid_node::{BidSpec, NodeHandle};
use hashgrid_protocol::{Msat, OrderRef, Requirements};
use hashgrid_tests::{addr_of, ask_spec, gpu, test_builder, wait_for_book, wait_for_peers};

/// The bound: every provider's ask is in every node's book within 5 s.
const PROPAGATION_LIMIT: Duration = Duration::from_secs(5);

/// TTL of the one provider whose ask must expire after it vanishes.
const SHORT_TTL: Duration = Duration::from_secs(3);

const NODES: usize = 10;
const PROVIDERS: usize = 6;

fn asks_of(book: &hashgrid_node::BookSnapshot) -> BTreeSet<OrderRef> {
    book.asks.iter().map(|a| a.order_ref()).collect()
}

/// Waits until `pred` holds on every node's book, all within one [`PROPAGATION_LIMIT`]
/// counted from `since`; returns how long after `since` the last node got there.
async fn all_books(
    nodes: &[NodeHandle],
    since: Instant,
    what: &str,
    pred: impl Fn(&BTreeSet<OrderRef>) -> bool + Copy,
) -> anyhow::Result<Duration> {
    let start = since;
    for n in nodes {
        let left = PROPAGATION_LIMIT.saturating_sub(start.elapsed());
        wait_for_book(n, left, what, |b| pred(&asks_of(b))).await?;
    }
    Ok(start.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_nodes_share_a_signed_expiring_book() -> anyhow::Result<()> {
    hashgrid_tests::init_tracing();
    // Node 0 is the seed; node i bootstraps to node 0 and node i-1.
    let mut nodes: Vec<NodeHandle> = Vec::new();
    let mut addrs: Vec<hashgrid_node::Multiaddr> = Vec::new();
    for i in 0..NODES {
        let mut boot = Vec::new();
        if i > 0 {
            boot.push(addrs[0].clone());
        }
        if i > 1 {
            boot.push(addrs[i - 1].clone());
        }
        let mut b = test_builder(&boot).region(if i % 2 == 0 { "us-east" } else { "eu-north" });
        if i < PROVIDERS {
            b = b.gpu_profiles(vec![gpu(&format!("gpu-{i}"))]).units(4);
        }
        if i == PROVIDERS - 1 {
            b = b.order_ttl(SHORT_TTL);
        }
        let node = b.start().await?;
        addrs.push(addr_of(&node).await?);
        nodes.push(node);
    }
    for n in &nodes {
        wait_for_peers(n, 1, PROPAGATION_LIMIT).await?;
    }

    // Every provider posts one ask; all six are in all ten books within 5 s.
    let mut asks = Vec::new();
    let posted = Instant::now();
    for (i, p) in nodes.iter().take(PROVIDERS).enumerate() {
        asks.push(
            p.market()
                .post_ask(ask_spec(&format!("gpu-{i}"), 100 + i as u64))
                .await?,
        );
    }
    let want: BTreeSet<OrderRef> = asks.iter().copied().collect();
    let t = all_books(&nodes, posted, "all six asks", |have| want.is_subset(have)).await?;
    println!("six asks in all ten books after {t:?}");
    // Capacity ads travel too.
    for n in &nodes {
        wait_for_book(n, PROPAGATION_LIMIT, "six capacity ads", |b| {
            b.capacity.len() == PROVIDERS
        })
        .await?;
    }

    // A buyer's bid travels the same way.
    let bid = nodes[NODES - 1]
        .market()
        .post_bid(BidSpec {
            units: 2,
            requirements: Requirements {
                min_memory_bytes: 16 << 30,
                regions: vec!["us-east".into()],
                ..Requirements::default()
            },
            max_price: Msat(150),
            max_seconds: 600,
            model: None,
        })
        .await?;
    for n in &nodes {
        wait_for_book(n, PROPAGATION_LIMIT, "the bid", |b| b.has_bid(&bid)).await?;
    }

    // A cancelled ask disappears from every book.
    nodes[0].market().cancel(asks[0].order_id).await?;
    let cancelled = asks[0];
    all_books(&nodes, Instant::now(), "cancelled ask gone", |have| {
        !have.contains(&cancelled)
    })
    .await?;
    assert!(
        nodes[0].market().cancel(asks[0].order_id).await.is_err(),
        "cancelling twice must fail"
    );

    // The short-TTL provider vanishes: its ask expires from every other book.
    let vanished = asks[PROVIDERS - 1];
    nodes[PROVIDERS - 1].shutdown().await;
    let rest: Vec<NodeHandle> = nodes
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != PROVIDERS - 1)
        .map(|(_, n)| n.clone())
        .collect();
    // Still there right after the shutdown (it has not expired yet)...
    assert!(asks_of(&rest[0].market().book().await?).contains(&vanished));
    // ...and gone within its TTL plus the sweep.
    all_books(&rest, Instant::now(), "expired ask gone", |have| {
        !have.contains(&vanished)
    })
    .await?;

    // A node that joins late gets the whole book from its first peer.
    let expected = asks_of(&rest[1].market().book().await?);
    assert_eq!(expected.len(), PROVIDERS - 2);
    let late = test_builder(&[addrs[3].clone()]).start().await?;
    let t = wait_for_book(
        &late,
        PROPAGATION_LIMIT,
        "whole book on the late node",
        |b| asks_of(b) == expected && b.capacity.len() == PROVIDERS - 1,
    )
    .await?;
    println!("late joiner had the whole book after {t:?}");

    late.shutdown().await;
    for n in &rest {
        n.shutdown().await;
    }
    // A stopped node answers with an error, not a hang.
    assert!(nodes[0].market().book().await.is_err());
    Ok(())
}
