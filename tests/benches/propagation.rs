//! Gossip propagation on loopback: the time from `post_ask` until the ask is in 95% of the
//! nodes' books, for networks of 10 and 40 nodes in one process.
//!
//! `cargo bench -p hashgrid-tests --bench propagation -- [--json] [--nodes N]... [--runs R]`
//!
//! Arrival is measured with each node's `OrderAdded` event (pushed by the node the moment the
//! ask enters its book), not by polling. Nodes use the production gossipsub settings (1 s
//! heartbeat); node i bootstraps to node 0 and to node i-1 so the graph is connected but not
//! a star, and Kademlia adds more links.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hashgrid_node::{Node, NodeEvent, NodeHandle, OrderKind};
use hashgrid_tests::{addr_of, ask_spec, test_network, wait_for_peers};

/// Settling time after all nodes are connected, so gossipsub meshes have formed (a few
/// heartbeats) before the first measurement.
const WARM_UP: Duration = Duration::from_secs(3);

/// A run whose ask has not reached 95% of the nodes within this is reported as failed.
const RUN_TIMEOUT: Duration = Duration::from_secs(10);

/// Pause between runs so one run's re-announcements do not overlap the next.
const BETWEEN_RUNS: Duration = Duration::from_millis(300);

async fn start_net(n: usize) -> anyhow::Result<Vec<NodeHandle>> {
    let mut nodes: Vec<NodeHandle> = Vec::new();
    let mut addrs: Vec<hashgrid_node::Multiaddr> = Vec::new();
    for i in 0..n {
        let mut b = Node::builder()
            .network(test_network())
            .listen("/ip4/127.0.0.1/tcp/0".parse()?)
            .mdns(false);
        if i > 0 {
            b = b.bootstrap(addrs[0].clone());
        }
        if i > 1 {
            b = b.bootstrap(addrs[i - 1].clone());
        }
        let node = b.start().await?;
        addrs.push(addr_of(&node).await?);
        nodes.push(node);
    }
    for node in &nodes {
        wait_for_peers(node, 1, Duration::from_secs(10)).await?;
    }
    tokio::time::sleep(WARM_UP).await;
    Ok(nodes)
}

/// One run: node `provider` posts an ask; returns the 95th-percentile arrival time.
async fn run_once(nodes: &[NodeHandle], provider: usize, price: u64) -> anyhow::Result<Duration> {
    let owner = nodes[provider].public_key();
    let mut waiters = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        if i == provider {
            continue;
        }
        let mut events = node.events();
        waiters.push(tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(NodeEvent::OrderAdded {
                        kind: OrderKind::Ask,
                        order,
                    }) if order.owner == owner => return Some(Instant::now()),
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(_) => return None,
                }
            }
        }));
    }
    let start = Instant::now();
    let order = nodes[provider]
        .market()
        .post_ask(ask_spec("bench-gpu", price))
        .await?;
    let mut arrivals = vec![Duration::ZERO]; // the provider's own book
    for w in waiters {
        let at = tokio::time::timeout(RUN_TIMEOUT, w).await;
        if let Ok(Ok(Some(t))) = at {
            arrivals.push(t.duration_since(start));
        }
    }
    nodes[provider].market().cancel(order.order_id).await?;
    arrivals.sort();
    let need = (nodes.len() * 95).div_ceil(100);
    if arrivals.len() < need {
        bail!(
            "ask reached only {} of {} nodes",
            arrivals.len(),
            nodes.len()
        );
    }
    Ok(arrivals[need - 1])
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut json = false;
    let mut sizes = Vec::new();
    let mut runs = 7usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--json" => json = true,
            "--nodes" => sizes.push(args.next().context("--nodes N")?.parse()?),
            "--runs" => runs = args.next().context("--runs R")?.parse()?,
            "--bench" => {} // passed by `cargo bench`
            other => bail!("unknown argument {other}; use --json, --nodes N, --runs R"),
        }
    }
    if sizes.is_empty() {
        sizes = vec![10, 40];
    }
    let mut results = Vec::new();
    for &n in &sizes {
        let nodes = start_net(n).await?;
        let mut p95 = Vec::new();
        for r in 0..runs {
            let t = run_once(&nodes, (r * 7 + 1) % n, 100 + r as u64).await?;
            p95.push(t.as_secs_f64() * 1000.0);
            tokio::time::sleep(BETWEEN_RUNS).await;
        }
        for node in &nodes {
            node.shutdown().await;
        }
        let med = median(&mut p95.clone());
        if !json {
            println!("{n} nodes: 95% of books after median {med:.1} ms (runs: {p95:.1?})");
        }
        results.push((n, p95, med));
    }
    if json {
        let out: Vec<String> = results
            .iter()
            .map(|(n, p95, med)| {
                let runs: Vec<String> = p95.iter().map(|v| format!("{v:.2}")).collect();
                format!(
                    "{{\"nodes\":{n},\"runs_p95_ms\":[{}],\"median_p95_ms\":{med:.2}}}",
                    runs.join(",")
                )
            })
            .collect();
        println!(
            "{{\"benchmark\":\"propagation\",\"results\":[{}]}}",
            out.join(",")
        );
    }
    Ok(())
}
