//! The site daemon (`hashgrid-node run`): start a node from a [`SiteConfig`], offer the asks
//! its pricing policy gives, and run until a shutdown signal.

use std::future::Future;

use tracing::info;

use crate::config::{ConfigError, SiteConfig};
use crate::error::{NodeError, StartError};

/// Running the site daemon failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SiteError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The node did not start.
    #[error(transparent)]
    Start(#[from] StartError),
    /// The node failed while running.
    #[error(transparent)]
    Node(#[from] NodeError),
}

/// Starts the node, offers the configured asks (keeping unchanged ones from the last run),
/// logs its addresses, and runs until `shutdown` completes; then shuts down in order.
pub async fn run_site(
    config: SiteConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), SiteError> {
    config.check()?;
    let node = config.builder().start().await?;
    info!(peer_id = %node.peer_id(), network = %config.network, region = %config.region, "node started");
    for addr in node.listen_addrs().await? {
        info!(%addr, "listening");
    }
    let asks = node.set_asks(&config.asks()).await?;
    for (spec, order) in config.asks().iter().zip(&asks) {
        info!(order = order.order_id, gpu = %spec.gpu.name, units = spec.units, price_msat = spec.price.0, "offering");
    }
    if asks.is_empty() {
        info!("no [[gpus]] configured: relaying gossip and keeping the book only");
    }
    shutdown.await;
    info!("shutting down");
    node.shutdown().await;
    Ok(())
}
