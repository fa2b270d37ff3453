//! The site daemon (`hashgrid-node run`): start a node from a [`SiteConfig`], offer the asks
//! its pricing policy gives, serve its metrics and dashboard when asked, reload its pricing
//! policy when told (SIGHUP), and run until a shutdown signal.

use std::future::Future;

use tracing::{info, warn};

use crate::config::{ConfigError, SiteConfig};
use crate::error::{NodeError, StartError};
use crate::executor::{ExecError, Executor, bench};

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
    /// The settlement settings are invalid or the chain backend cannot be opened.
    #[error("settlement: {0}")]
    Settle(#[from] crate::wallet::WalletError),
    /// A model in `[models] preload` cannot be read.
    #[error("[models] preload: {path}: {message}")]
    Preload {
        /// The file or directory.
        path: std::path::PathBuf,
        /// What is wrong.
        message: String,
    },
    /// No GPU could be opened or benchmarked (the message says how to install lavapipe; or run
    /// with `--no-gpu` for a relay-only node).
    #[error("{0} (or pass --no-gpu to run a relay-only node)")]
    Gpu(#[from] ExecError),
    /// The metrics or dashboard server cannot listen, or its token cannot be read.
    #[error("{what} on {addr}: {source}")]
    Ops {
        /// `metrics` or `dashboard`.
        what: &'static str,
        /// Its address.
        addr: std::net::SocketAddr,
        /// The error.
        source: std::io::Error,
    },
}

/// How the daemon re-reads its configuration when told to (SIGHUP): typically the config
/// file, with the command line's overrides applied again.
pub type Reload = Box<dyn Fn() -> Result<SiteConfig, ConfigError> + Send + Sync>;

/// A model's weight blobs in the compiler's order.
type ModelBlobs = Vec<(hashgrid_protocol::ContentId, Vec<u8>)>;

/// The weight blobs of each model, laid out as the buyers' compiler lays them out (so their
/// ids, and the model's id, are the ones jobs name): GGUF files and sentence-transformers
/// directories.
fn preload_blobs(paths: &[std::path::PathBuf]) -> Result<Vec<ModelBlobs>, SiteError> {
    let mut out = Vec::new();
    for p in paths {
        let bad = |message: String| SiteError::Preload {
            path: p.clone(),
            message,
        };
        if p.is_dir() {
            let m = hashgrid_infer::bert::BertModel::open(p).map_err(|e| bad(e.to_string()))?;
            let w = hashgrid_infer::bert::BertWeights::load(&m).map_err(|e| bad(e.to_string()))?;
            out.push(w.blobs().map(|(_, id, b)| (*id, b.to_vec())).collect());
        } else {
            let m = hashgrid_infer::LlamaModel::open(p).map_err(|e| bad(e.to_string()))?;
            let w = hashgrid_infer::ModelWeights::load(&m).map_err(|e| bad(e.to_string()))?;
            // The weights were read for this alone: unwrapping their Arc copies nothing.
            out.push(
                w.blobs
                    .into_iter()
                    .map(|b| {
                        let bytes =
                            std::sync::Arc::try_unwrap(b.bytes).unwrap_or_else(|a| (*a).clone());
                        (b.id, bytes)
                    })
                    .collect(),
            );
        }
    }
    Ok(out)
}

/// Opens this machine's best GPU adapter and benchmarks it (cached per adapter in the data dir).
async fn detect_gpu(config: &SiteConfig) -> Result<Executor, SiteError> {
    let exec_config = config.executor.exec_config();
    let exec = tokio::task::spawn_blocking(move || Executor::start(exec_config))
        .await
        .map_err(|e| ExecError::NoAdapter(format!(" (adapter probe failed: {e})")))??;
    let dir = crate::DataDir::new(
        config
            .data_dir
            .clone()
            .unwrap_or_else(crate::DataDir::default_root),
    );
    let b = bench::cached(&exec, &dir.bench_cache_path()).await?;
    exec.set_benchmark(b);
    Ok(exec)
}

/// Starts the node, offers the configured asks (keeping unchanged ones from the last run),
/// logs its addresses, and runs until `shutdown` completes; then shuts down in order.
pub async fn run_site(
    config: SiteConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), SiteError> {
    run_site_with(config, None, shutdown).await
}

/// [`run_site`], and on SIGHUP (Unix) re-reads the configuration with `reload` and applies its
/// pricing policy and `max_job_seconds`: the changed asks are replaced and gossiped, running
/// jobs go on under the agreements they were made with. Settings that need a restart are
/// reported and left as they run; a config that does not load or check changes nothing.
pub async fn run_site_with(
    config: SiteConfig,
    reload: Option<Reload>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), SiteError> {
    // Installed first: a SIGHUP during the start must not kill the daemon (the default
    // action); it is taken as a reload once the node runs.
    #[cfg(unix)]
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut config = config;
    config.check()?;
    let ops = bind_ops(&config).await?;
    // The executor runs the jobs this site sells.
    let executor = if config.gpus.is_empty() && config.detect_gpu {
        let exec = detect_gpu(&config).await?;
        let p = exec.profile();
        info!(adapter = %p.name, backend = ?p.backend, matmul_mflops = p.bench.matmul_mflops, copy_mbps = p.bench.copy_mbps, "GPU detected");
        config.detected = vec![p];
        Some(exec)
    } else if !config.gpus.is_empty() && config.detect_gpu {
        // Declared [[gpus]] are advertised as written; jobs still run on this machine's GPU.
        let exec_config = config.executor.exec_config();
        let exec = tokio::task::spawn_blocking(move || Executor::start(exec_config))
            .await
            .map_err(|e| ExecError::NoAdapter(format!(" (adapter probe failed: {e})")))??;
        Some(exec)
    } else {
        if !config.gpus.is_empty() {
            tracing::warn!(
                "advertising [[gpus]] with --no-gpu: no GPU runs jobs here, so every proposal is rejected"
            );
        }
        None
    };
    // Settlement: mainnet without the opt-in, a missing backend or a bad descriptor stop the
    // start here, before anything is announced.
    // Lightning mode: the embedded Lightning node starts first (its seed and channels live in
    // DATA_DIR/lightning) and stops with the node.
    let root = config
        .data_dir
        .clone()
        .unwrap_or_else(crate::DataDir::default_root);
    let section = config.settle.clone();
    let ln = tokio::task::spawn_blocking(move || section.start_lightning(&root))
        .await
        .map_err(|e| {
            SiteError::Settle(crate::wallet::WalletError::Config(format!(
                "lightning start: {e}"
            )))
        })??;
    if let Some(l) = &ln {
        use hashgrid_lightning::LightningBackend;
        info!(
            node_id = %l.node_id(),
            listen = %l.listen_addr().map_or_else(|| "none".to_string(), |a| a.to_string()),
            "lightning node started"
        );
    }
    let settle = config.settle.to_config_with_lightning(
        None,
        None,
        ln.map(|l| l as std::sync::Arc<dyn hashgrid_lightning::LightningBackend>),
    )?;
    if let crate::settle::SettleMode::Onchain(o) = &settle.mode {
        if o.payout_descriptor.is_none() {
            return Err(SiteError::Settle(crate::wallet::WalletError::Config(
                "[settle] mode = \"onchain\" needs payout_descriptor = \"tr(xpub…/0/*)\" (where buyers pay)".into(),
            )));
        }
        info!(bitcoin = %o.network, chain = %o.chain.describe(), "settling on chain");
    }
    let mut builder = config.builder().settle(settle);
    // Emulated latency for a testnet of regions on one machine (`hashgrid-testnet
    // --link-delay-ms`); unset in production.
    if let Some(text) = std::env::var_os(crate::network::delay::LINK_DELAYS_ENV) {
        let delays =
            crate::network::delay::LinkDelays::parse(&text.to_string_lossy()).map_err(|e| {
                ConfigError::Invalid(format!("{}: {e}", crate::network::delay::LINK_DELAYS_ENV))
            })?;
        if !delays.is_empty() {
            warn!(links = ?delays, "emulating link latency on dialled connections ({})", crate::network::delay::LINK_DELAYS_ENV);
        }
        builder = builder.link_delays(delays);
    }
    if let Some(exec) = &executor {
        builder = builder.executor(exec.clone());
        if !config.models.preload.is_empty() {
            let paths = config.models.preload.clone();
            let models = tokio::task::spawn_blocking(move || preload_blobs(&paths))
                .await
                .map_err(|e| SiteError::Preload {
                    path: Default::default(),
                    message: e.to_string(),
                })??;
            let blobs: usize = models.iter().map(Vec::len).sum();
            let bytes: usize = models.iter().flatten().map(|(_, b)| b.len()).sum();
            info!(
                models = models.len(),
                blobs, bytes, "models preloaded into the input cache"
            );
            for m in models {
                builder = builder.preload_model(m);
            }
        }
    }
    let node = builder.start().await?;
    info!(peer_id = %node.peer_id(), network = %config.network, region = %config.region, "node started");
    for addr in node.peers().listen_addrs().await? {
        info!(%addr, "listening");
    }
    let asks = node.market().set_asks(&config.asks()).await?;
    for (spec, order) in config.asks().iter().zip(&asks) {
        info!(order = order.order_id, gpu = %spec.gpu.name, units = spec.units, price_msat = spec.price.0, "offering");
    }
    if asks.is_empty() {
        info!(
            "no GPU to sell (--no-gpu or detect_gpu = false): relaying gossip and keeping the book only"
        );
    }
    let (stop_ops, ops_stopped) = tokio::sync::watch::channel(false);
    serve_ops(ops, &config, &node, &ops_stopped);
    tokio::pin!(shutdown);
    loop {
        let hup = async {
            #[cfg(unix)]
            if let Some(h) = hangup.as_mut() {
                h.recv().await;
                return;
            }
            std::future::pending::<()>().await
        };
        tokio::select! {
            () = &mut shutdown => break,
            () = hup => match &reload {
                Some(r) => reload_policy(r, &mut config, &node).await,
                None => info!("SIGHUP: no config file to reload"),
            },
        }
    }
    info!("shutting down");
    let _ = stop_ops.send(true);
    node.shutdown().await;
    // Release the GPU before the process exits (see `Executor::shutdown`).
    if let Some(exec) = executor {
        let _ = tokio::task::spawn_blocking(move || exec.shutdown()).await;
    }
    Ok(())
}

/// The metrics and dashboard listeners, bound before anything else starts (a taken port stops
/// the daemon before it opens the GPU or announces anything).
struct OpsListeners {
    metrics: Option<tokio::net::TcpListener>,
    dashboard: Option<(tokio::net::TcpListener, Option<String>)>,
}

/// Binds the servers the config asks for; the dashboard's token is read or created here.
async fn bind_ops(config: &SiteConfig) -> Result<OpsListeners, SiteError> {
    use crate::ops::server;
    let bind = |what: &'static str, addr: std::net::SocketAddr| async move {
        tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| SiteError::Ops { what, addr, source })
    };
    let metrics = match config.metrics.listen {
        Some(addr) => Some(bind("metrics", addr).await?),
        None => None,
    };
    let dashboard = match config.dashboard.listen {
        Some(addr) => {
            let token = match (&config.dashboard.token, server::is_loopback(&addr)) {
                (Some(t), _) => Some(t.clone()),
                (None, true) => None,
                (None, false) => {
                    let dir = config
                        .data_dir
                        .clone()
                        .unwrap_or_else(crate::DataDir::default_root);
                    let t =
                        server::load_or_create_token(&dir).map_err(|source| SiteError::Ops {
                            what: "dashboard token",
                            addr,
                            source,
                        })?;
                    info!(path = %dir.join("dashboard-token").display(), "the dashboard wants the token in this file: open it as /?token=TOKEN");
                    Some(t)
                }
            };
            Some((bind("dashboard", addr).await?, token))
        }
        None => None,
    };
    Ok(OpsListeners { metrics, dashboard })
}

/// Serves the bound metrics and dashboard servers until `stopped` turns true.
fn serve_ops(
    ops: OpsListeners,
    config: &SiteConfig,
    node: &crate::NodeHandle,
    stopped: &tokio::sync::watch::Receiver<bool>,
) {
    use crate::ops::server;
    let until = |rx: tokio::sync::watch::Receiver<bool>| async move {
        let mut rx = rx;
        let _ = rx.wait_for(|s| *s).await;
    };
    let site = server::SiteInfo {
        gpus: config.gpu_profiles(),
        extra: None,
    };
    if let Some(l) = ops.metrics {
        if let Ok(a) = l.local_addr() {
            info!(url = %format!("http://{a}/metrics"), "metrics");
        }
        let (node, site, stop) = (node.clone(), site.clone(), until(stopped.clone()));
        tokio::spawn(async move {
            if let Err(e) = server::serve_metrics(l, Some(node), site, stop).await {
                tracing::warn!(error = %e, "metrics server stopped");
            }
        });
    }
    if let Some((l, token)) = ops.dashboard {
        let (node, stop) = (node.clone(), until(stopped.clone()));
        tokio::spawn(async move {
            let _ = server::serve_dashboard(l, node, site, token, stop).await;
        });
    }
}

/// SIGHUP: re-reads the config and applies its pricing policy (see [`run_site_with`]).
async fn reload_policy(reload: &Reload, running: &mut SiteConfig, node: &crate::NodeHandle) {
    let mut new = match reload().and_then(|c| c.check().map(|()| c)) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "SIGHUP: the config does not load; the running policy stays");
            return;
        }
    };
    new.detected = running.detected.clone();
    let restart = new.needs_restart(running);
    if !restart.is_empty() {
        tracing::warn!(settings = ?restart, "SIGHUP: these settings change only at a restart; they stay as they run");
    }
    running.pricing = new.pricing;
    running.max_job_seconds = new.max_job_seconds;
    let wanted = running.asks();
    match node.market().set_asks(&wanted).await {
        Ok(orders) => {
            for (spec, order) in wanted.iter().zip(&orders) {
                info!(order = order.order_id, gpu = %spec.gpu.name, price_msat = spec.price.0, "SIGHUP: offering");
            }
        }
        Err(e) => tracing::warn!(error = %e, "SIGHUP: the new asks were not posted"),
    }
}
