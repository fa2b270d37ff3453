//! `hashgrid serve`: the OpenAI-compatible gateway, on the market (this buyer's node) or on
//! this machine's adapter (`--local`). Models load, and their files are checked, before the
//! network starts or the port opens.

use std::path::PathBuf;
use std::sync::Arc;

use hashgrid_gateway::{Backend, Gateway, GatewayConfig, LocalBackend, models};
use hashgrid_node::gateway::MarketBackend;
use hashgrid_node::jobs::JobOptions;
use hashgrid_protocol::{Msat, Requirements};

use crate::client::Client;
use crate::market::wait_for_book;
use crate::{CliError, Global};

/// What `serve` was asked.
pub(crate) struct ServeArgs {
    pub(crate) models: Vec<String>,
    pub(crate) listen: Option<String>,
    pub(crate) local: bool,
    pub(crate) max_price: Option<u64>,
    pub(crate) api_keys_file: Option<PathBuf>,
    pub(crate) metrics: Option<std::net::SocketAddr>,
    pub(crate) dashboard: Option<std::net::SocketAddr>,
    pub(crate) verify: Option<String>,
    /// The shape of language models' kernels (`None`: the backend's).
    pub(crate) kernels: Option<hashgrid_infer::Target>,
}

/// Most bytes of an API keys file.
const MAX_KEYS_FILE: u64 = 1024 * 1024;

fn read_keys(path: &std::path::Path) -> Result<Vec<String>, CliError> {
    let bad =
        |e: String| CliError::bad_input(format!("{}: {e}", path.display()), "one API key per line");
    let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    if meta.len() > MAX_KEYS_FILE {
        return Err(bad(format!("over {MAX_KEYS_FILE} bytes")));
    }
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let keys: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect();
    if keys.is_empty() {
        return Err(bad("no keys in the file".into()));
    }
    Ok(keys)
}

/// `hashgrid serve`.
pub(crate) async fn serve(g: &Global, a: ServeArgs) -> Result<(), CliError> {
    let client = Client::resolve(g)?;
    let section = client.config.serve.clone().unwrap_or_default();
    let specs = if a.models.is_empty() {
        section.models.clone()
    } else {
        a.models
    };
    if specs.is_empty() {
        return Err(CliError::bad_input(
            "no models to serve",
            "pass --model FILE.gguf (or an embedding model directory), or list models in the config's [serve] section",
        ));
    }
    let loaded = tokio::task::block_in_place(|| models::load_all(&specs)).map_err(|e| {
        CliError::bad_input(
            e.to_string(),
            "a model is a llama-family GGUF file or a sentence-transformers BERT directory",
        )
    })?;
    let mut keys = section.api_keys.clone();
    if let Some(f) = a.api_keys_file.as_ref().or(section.api_keys_file.as_ref()) {
        keys.extend(read_keys(f)?);
    }
    let config = GatewayConfig {
        default_max_tokens: section
            .default_max_tokens
            .unwrap_or(hashgrid_gateway::DEFAULT_MAX_TOKENS),
        max_seconds: section
            .max_seconds
            .unwrap_or(hashgrid_gateway::DEFAULT_MAX_SECONDS),
        api_keys: keys,
        key_cap_msat_per_day: section.key_cap_msat_per_day,
        cap_msat_per_day: section.cap_msat_per_day,
        // Today's spending survives a restart of the gateway.
        spend_file: Some(client.dir.root().join("gateway-spend.json")),
    };
    let listen = a
        .listen
        .or(section.listen.clone())
        .unwrap_or_else(|| "127.0.0.1:8080".into());
    let listener = tokio::net::TcpListener::bind(&listen).await.map_err(|e| {
        CliError::bad_input(
            format!("cannot listen on {listen}: {e}"),
            "pass another --listen ADDR:PORT (port 0 picks a free one)",
        )
    })?;
    let addr = listener
        .local_addr()
        .map_err(|e| CliError::other(e.to_string(), ""))?;

    let mut exec = None;
    let mut node = None;
    let backend: Arc<dyn Backend> = if a.local {
        let e = tokio::task::block_in_place(crate::generate::executor)?;
        exec = Some(e.clone());
        let mut b = LocalBackend::new(e);
        if let Some(t) = a.kernels {
            b = b.kernels(t);
        }
        Arc::new(b)
    } else {
        let n = client.start().await?;
        let asks = wait_for_book(&n).await;
        match asks {
            Ok(asks) if !g.quiet => eprintln!("book: {asks} asks from the network"),
            Ok(_) => {}
            Err(e) => eprintln!(
                "warning: {}; requests wait for providers ({})",
                e.message, e.hint
            ),
        }
        let options = JobOptions {
            units: 1,
            max_price: a.max_price.or(section.max_price).map(Msat),
            max_seconds: config.max_seconds,
            requirements: Requirements::default(),
            max_attempts: 3,
            // Requests queue for busy providers for as long as they may run.
            wait_for_capacity: std::time::Duration::from_secs(u64::from(config.max_seconds)),
            // Set per request: the model each request runs.
            model: None,
            // The mode; how runs compare comes with each request's job.
            verify: hashgrid_protocol::Verification {
                mode: client.verify_mode(a.verify.as_deref())?,
                ..Default::default()
            },
        };
        node = Some(n.clone());
        let mut b = MarketBackend::new(n, options)
            .save_receipts(client.dir.root().join("receipts"), client.network.clone());
        if let Some(t) = a.kernels {
            b = b.kernels(t);
        }
        Arc::new(b)
    };
    let gateway = Gateway::new(backend.clone(), loaded, config.clone()).map_err(|e| {
        CliError::bad_input(
            e.to_string(),
            "the file holds today's spending against the caps; fix or move it",
        )
    })?;
    eprintln!(
        "hashgrid serve: http://{addr}/v1 ({} backend; models: {}{})",
        backend.name(),
        gateway.model_ids().join(", "),
        if config.api_keys.is_empty() {
            ""
        } else {
            "; API keys required"
        }
    );
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let until = || {
        let mut rx = stopped.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let site = hashgrid_node::ops::server::SiteInfo {
        gpus: Vec::new(),
        extra: Some(Arc::new(gateway.clone())),
    };
    let bind = |what: &'static str, addr: std::net::SocketAddr| async move {
        tokio::net::TcpListener::bind(addr).await.map_err(|e| {
            CliError::bad_input(
                format!("cannot serve the {what} on {addr}: {e}"),
                "pass another address",
            )
        })
    };
    if let Some(addr) = a.metrics {
        let l = bind("metrics", addr).await?;
        eprintln!("metrics: http://{}/metrics", l.local_addr().unwrap_or(addr));
        tokio::spawn(hashgrid_node::ops::server::serve_metrics(
            l,
            node.clone(),
            site.clone(),
            until(),
        ));
    }
    if let Some(addr) = a.dashboard {
        let Some(n) = node.clone() else {
            return Err(CliError::bad_input(
                "--dashboard shows the market side: it needs the market backend",
                "drop --local, or use --metrics for the gateway's figures",
            ));
        };
        if !hashgrid_node::ops::server::is_loopback(&addr) {
            return Err(CliError::bad_input(
                format!("--dashboard {addr}: the gateway's dashboard is served on loopback only"),
                "pass 127.0.0.1:PORT and reach it through an SSH tunnel",
            ));
        }
        let l = bind("dashboard", addr).await?;
        eprintln!("dashboard: http://{}/", l.local_addr().unwrap_or(addr));
        tokio::spawn(hashgrid_node::ops::server::serve_dashboard(
            l,
            n,
            site.clone(),
            None,
            until(),
        ));
    }
    let served = gateway
        .serve(listener, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await;
    let _ = stop.send(true);
    if let Some(n) = node {
        n.shutdown().await;
    }
    if let Some(e) = exec {
        tokio::task::block_in_place(|| e.shutdown());
    }
    served.map_err(|e| CliError::other(format!("the HTTP server failed: {e}"), ""))
}
