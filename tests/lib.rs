//! Workspace-level scenario tests live in `tests/tests/`, the propagation benchmark in
//! `tests/benches/`. This library is their shared harness: start real nodes in one process on
//! loopback and wait (with timeouts, never blind sleeps) for what a user would notice.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hashgrid_node::{AskSpec, BookSnapshot, Node, NodeBuilder, NodeHandle};
use hashgrid_protocol::{Backend, Benchmark, DeviceType, GpuLimits, GpuProfile, Msat, Network};

/// Logs to stderr when `RUST_LOG` is set (e.g. `RUST_LOG=hashgrid_node=debug`).
pub fn init_tracing() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    }
}

/// The private network all scenario tests run on.
pub fn test_network() -> Network {
    Network::new("scenario").expect("valid network name")
}

/// Gossipsub heartbeat for in-process tests: ten times the default so meshes form quickly.
pub const TEST_HEARTBEAT: Duration = Duration::from_millis(100);

/// Expiry sweep interval for tests: expired orders leave books within 200 ms.
pub const TEST_SWEEP: Duration = Duration::from_millis(200);

/// How often [`wait_for_book`] polls a node's book.
pub const POLL: Duration = Duration::from_millis(20);

/// A GPU profile for tests.
pub fn gpu(name: &str) -> GpuProfile {
    GpuProfile {
        name: name.into(),
        vendor: 0x10de,
        device: 0x2330,
        backend: Backend::Vulkan,
        device_type: DeviceType::DiscreteGpu,
        driver: "test".into(),
        memory_bytes: 80 << 30,
        limits: GpuLimits::default(),
        bench: Benchmark {
            matmul_mflops: 50_000_000,
            copy_mbps: 2_000_000,
        },
    }
}

/// An ask for one unit of `gpu(name)`.
pub fn ask_spec(name: &str, price: u64) -> AskSpec {
    AskSpec {
        gpu: gpu(name),
        units: 1,
        price: Msat(price),
        max_seconds: 3600,
    }
}

/// A builder for a loopback test node: test network, `/ip4/127.0.0.1/tcp/0`, no mDNS, fast
/// heartbeat and sweep, bootstrapping to `bootstrap`.
pub fn test_builder(bootstrap: &[hashgrid_node::Multiaddr]) -> NodeBuilder {
    let mut b = Node::builder()
        .network(test_network())
        .listen("/ip4/127.0.0.1/tcp/0".parse().expect("valid multiaddr"))
        .mdns(false)
        .heartbeat(TEST_HEARTBEAT)
        .sweep_interval(TEST_SWEEP);
    for a in bootstrap {
        b = b.bootstrap(a.clone());
    }
    b
}

/// The first listen address of `node` (with `/p2p/<PeerId>`).
pub async fn addr_of(node: &NodeHandle) -> anyhow::Result<hashgrid_node::Multiaddr> {
    node.peers()
        .listen_addrs()
        .await?
        .into_iter()
        .next()
        .context("node has no listen address")
}

/// Polls `node`'s book until `pred` holds; returns how long it took, or fails after `timeout`
/// with `what` and the last snapshot.
pub async fn wait_for_book(
    node: &NodeHandle,
    timeout: Duration,
    what: &str,
    mut pred: impl FnMut(&BookSnapshot) -> bool,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    loop {
        let book = node.market().book().await?;
        if pred(&book) {
            return Ok(start.elapsed());
        }
        if start.elapsed() > timeout {
            bail!(
                "timed out after {timeout:?} waiting for {what} on node {}: book has {} asks, {} bids, {} ads",
                node.peer_id(),
                book.asks.len(),
                book.bids.len(),
                book.capacity.len()
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Waits until `node` has at least `n` connected peers.
pub async fn wait_for_peers(node: &NodeHandle, n: usize, timeout: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        if node.peers().connected().await?.len() >= n {
            return Ok(());
        }
        if start.elapsed() > timeout {
            bail!(
                "node {} has fewer than {n} peers after {timeout:?}",
                node.peer_id()
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Starts a provider on loopback that runs jobs on this machine's adapter (lavapipe in CI),
/// advertising it with `memory_gib` of memory, and offers one unit at `price` msat per
/// GPU-second. `lie` makes it a dishonest provider.
pub async fn start_provider(
    bootstrap: &[hashgrid_node::Multiaddr],
    price: u64,
    memory_gib: u64,
    lie: Option<hashgrid_node::jobs::Lie>,
) -> anyhow::Result<NodeHandle> {
    start_provider_with(bootstrap, price, memory_gib, lie, |b| b).await
}

/// [`start_provider`] with more settings on the builder (data dir, settlement).
pub async fn start_provider_with(
    bootstrap: &[hashgrid_node::Multiaddr],
    price: u64,
    memory_gib: u64,
    lie: Option<hashgrid_node::jobs::Lie>,
    configure: impl FnOnce(NodeBuilder) -> NodeBuilder,
) -> anyhow::Result<NodeHandle> {
    use hashgrid_node::{ExecConfig, Executor};
    let exec = tokio::task::spawn_blocking(move || {
        Executor::start(ExecConfig {
            memory_bytes: Some(memory_gib << 30),
            max_concurrent: 1,
            ..ExecConfig::default()
        })
    })
    .await??;
    let profile = exec.profile();
    let mut b = test_builder(bootstrap)
        .region("us-east")
        .gpu_profiles(vec![profile.clone()])
        .units(1)
        .executor(exec);
    if let Some(l) = lie {
        b = b.lie(l);
    }
    let node = configure(b).start().await?;
    node.market()
        .post_ask(AskSpec {
            gpu: profile,
            units: 1,
            price: Msat(price),
            max_seconds: 600,
        })
        .await?;
    Ok(node)
}

/// A job that copies `bytes` of input to its output (`executor::bench::copy_job`), with default
/// market terms.
pub fn copy_submission(bytes: u64) -> hashgrid_node::jobs::Submission {
    use hashgrid_node::jobs::IntoSharedInputs;
    let (spec, inputs) = hashgrid_node::executor::bench::copy_job(bytes);
    hashgrid_node::jobs::Submission {
        spec,
        inputs: inputs.into_shared(),
        options: hashgrid_node::jobs::JobOptions::default(),
    }
}

/// Waits until `node`'s book holds at least `n` asks.
pub async fn wait_for_asks(node: &NodeHandle, n: usize) -> anyhow::Result<()> {
    wait_for_book(node, Duration::from_secs(10), &format!("{n} asks"), |b| {
        b.asks.len() >= n
    })
    .await
    .map(|_| ())
}
