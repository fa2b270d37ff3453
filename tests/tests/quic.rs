//! Nodes that only speak QUIC find each other and share asks.

use std::time::Duration;

use hashgrid_node::Node;
use hashgrid_tests::{TEST_HEARTBEAT, ask_spec, test_network, wait_for_book};

/// Bound on every wait.
const LIMIT: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asks_travel_over_quic() -> anyhow::Result<()> {
    let quic = || {
        Node::builder()
            .network(test_network())
            .mdns(false)
            .heartbeat(TEST_HEARTBEAT)
            .listen(
                "/ip4/127.0.0.1/udp/0/quic-v1"
                    .parse()
                    .expect("valid multiaddr"),
            )
    };
    let a = quic().start().await?;
    let a_addr = a.peers().listen_addrs().await?.remove(0);
    assert!(a_addr.to_string().contains("/quic-v1/p2p/"), "{a_addr}");
    let b = quic().bootstrap(a_addr).start().await?;
    let ask = b.market().post_ask(ask_spec("quic-gpu", 5)).await?;
    wait_for_book(&a, LIMIT, "the ask over QUIC", |book| book.has_ask(&ask)).await?;
    b.shutdown().await;
    a.shutdown().await;
    Ok(())
}
