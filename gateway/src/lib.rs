//! hashgrid-gateway: an OpenAI-compatible HTTP API whose answers are hashgrid jobs.
//!
//! Software that speaks the OpenAI API (the official SDKs, LangChain, Open WebUI, n8n) points
//! its base URL at a [`Gateway`] and gets chat completions, completions and embeddings from
//! the models the gateway serves. Each request compiles ([`hashgrid_infer`]) to an ordinary
//! job and runs on a [`Backend`]: through the market (the node's `MarketBackend`, one job per
//! request, paid per receipt) or on this machine's adapter ([`LocalBackend`]).
//!
//! Routes: `GET /v1/models`, `GET /v1/models/{id}`, `POST /v1/chat/completions`,
//! `POST /v1/completions` (both with `stream: true` as server-sent events),
//! `POST /v1/embeddings`, and `GET /health`. Errors use OpenAI's shape and status codes (400,
//! 401, 402, 404, 413, 429, 502, 503). Responses carry the market's side as a `hashgrid`
//! object and `x-hashgrid-*` headers (provider, charge in msat, receipt id, job id).
//!
//! ```no_run
//! # async fn demo(exec: hashgrid_executor::Executor) -> std::io::Result<()> {
//! use std::sync::Arc;
//! use hashgrid_gateway::{Gateway, GatewayConfig, LocalBackend, models};
//! let models = models::load_all(&["SmolLM2-135M-Instruct.Q4_1.gguf".into()]).unwrap();
//! let gw = Gateway::new(Arc::new(LocalBackend::new(exec)), models, GatewayConfig::default())
//!     .map_err(std::io::Error::other)?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! gw.serve(listener, std::future::pending()).await
//! # }
//! ```

pub mod access;
pub mod backend;
mod http;
pub mod metrics;
pub mod models;
pub mod openai;
mod text;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

pub use access::{Access, SpendFileError};
pub use backend::{
    Backend, BackendError, BackendJob, BackendOutput, LocalBackend, MarketInfo, Streamed,
};
pub use models::{Model, ModelEntry};
use serde::{Deserialize, Serialize};

/// Tokens generated when a request does not say (`max_tokens`).
pub const DEFAULT_MAX_TOKENS: u32 = 256;
/// Longest a job may run, in seconds, when the config does not say.
pub const DEFAULT_MAX_SECONDS: u32 = 120;
/// Largest request body: 4 MiB (a long conversation, or a batch of texts to embed).
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
/// Most texts in one embeddings request.
pub const MAX_EMBED_INPUTS: usize = 256;

/// How a gateway behaves. Every field has a default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// Tokens generated when a request does not say ([`DEFAULT_MAX_TOKENS`]).
    pub default_max_tokens: u32,
    /// Longest a job may run, in seconds ([`DEFAULT_MAX_SECONDS`]); also what the market's
    /// agreement caps the charge by.
    pub max_seconds: u32,
    /// API keys; empty: no authentication (fine on 127.0.0.1, not on a LAN).
    pub api_keys: Vec<String>,
    /// Most msat one API key may spend per UTC day.
    pub key_cap_msat_per_day: Option<u64>,
    /// Most msat the whole gateway may spend per UTC day.
    pub cap_msat_per_day: Option<u64>,
    /// Where today's spending is kept so that a restart does not reset the caps (`None`:
    /// in memory only).
    pub spend_file: Option<std::path::PathBuf>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            default_max_tokens: DEFAULT_MAX_TOKENS,
            max_seconds: DEFAULT_MAX_SECONDS,
            api_keys: Vec::new(),
            key_cap_msat_per_day: None,
            cap_msat_per_day: None,
            spend_file: None,
        }
    }
}

pub(crate) struct Inner {
    pub(crate) backend: Arc<dyn Backend>,
    pub(crate) models: BTreeMap<String, ModelEntry>,
    pub(crate) access: Access,
    pub(crate) config: GatewayConfig,
    pub(crate) requests: AtomicU64,
    pub(crate) metrics: metrics::GatewayMetrics,
}

/// An OpenAI-compatible gateway over a [`Backend`]. Cheap to clone.
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

impl Gateway {
    /// A gateway serving `models` (by id) on `backend`; fails only when the config's spend
    /// file exists and cannot be read.
    pub fn new(
        backend: Arc<dyn Backend>,
        models: BTreeMap<String, ModelEntry>,
        config: GatewayConfig,
    ) -> Result<Gateway, access::SpendFileError> {
        let access = match &config.spend_file {
            Some(path) => Access::open(
                &config.api_keys,
                config.key_cap_msat_per_day,
                config.cap_msat_per_day,
                path,
            )?,
            None => Access::new(
                &config.api_keys,
                config.key_cap_msat_per_day,
                config.cap_msat_per_day,
            ),
        };
        Ok(Gateway {
            inner: Arc::new(Inner {
                backend,
                models,
                access,
                config,
                requests: AtomicU64::new(0),
                metrics: metrics::GatewayMetrics::default(),
            }),
        })
    }

    /// The HTTP routes, to serve or to nest in a larger app.
    pub fn router(&self) -> axum::Router {
        http::router(self.inner.clone())
    }

    /// Serves on `listener` until `shutdown` resolves (requests in flight finish first).
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown)
            .await
    }

    /// The model ids served.
    pub fn model_ids(&self) -> Vec<String> {
        self.inner.models.keys().cloned().collect()
    }

    /// The gateway's Prometheus metrics.
    pub fn metrics(&self) -> &metrics::GatewayMetrics {
        &self.inner.metrics
    }

    /// msat spent through this gateway today (UTC).
    pub fn spent_today(&self) -> u64 {
        self.inner.access.spent_today()
    }
}
