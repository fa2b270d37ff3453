//! The operator's HTTP endpoints: `/metrics` for Prometheus ([`serve_metrics`]) and the live
//! dashboard ([`serve_dashboard`]: one HTML page with its script and styles compiled into the
//! binary, no CDN, reading `/api/state` once a second).
//!
//! The dashboard shows earnings, jobs and peers, so beyond loopback it wants a token: a
//! request carries it as `Authorization: Bearer TOKEN` or `?token=TOKEN` (the page passes on
//! the one in its own URL). `/metrics` has no token, as Prometheus expects; bind it to an
//! address only the scraper reaches.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hashgrid_protocol::GpuProfile;
use serde_json::{Value, json};
use tracing::{info, warn};

use super::activity::HistoryPoint;
use crate::NodeHandle;

/// The OpenMetrics content type Prometheus negotiates.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// More to show beside the node's own figures: a gateway's metrics and dashboard panel.
pub trait OpsSource: Send + Sync {
    /// Appends metrics in the OpenMetrics text format, without `# EOF`.
    fn encode_metrics(&self, out: &mut String);
    /// The dashboard's `gateway` section.
    fn dashboard(&self) -> Value;
}

/// What the dashboard says about the site beyond what the node knows.
#[derive(Clone, Default)]
pub struct SiteInfo {
    /// The GPUs this site sells.
    pub gpus: Vec<GpuProfile>,
    /// A gateway in the same process, if any.
    pub extra: Option<Arc<dyn OpsSource>>,
}

#[derive(Clone)]
struct Ops {
    node: Option<NodeHandle>,
    site: SiteInfo,
    token: Option<Arc<str>>,
}

/// Whether `addr` is only reachable from this machine.
pub fn is_loopback(addr: &SocketAddr) -> bool {
    addr.ip().is_loopback()
}

async fn render(ops: &Ops) -> Result<String, StatusCode> {
    let mut out = String::with_capacity(16 * 1024);
    if let Some(node) = &ops.node {
        node.ops()
            .render_metrics(&mut out)
            .await
            .map_err(|_| StatusCode::SERVICE_UNAVAILABLE)?;
    }
    if let Some(x) = &ops.site.extra {
        x.encode_metrics(&mut out);
    }
    super::metrics::finish(&mut out);
    Ok(out)
}

async fn metrics(State(ops): State<Ops>) -> Response {
    match render(&ops).await {
        Ok(body) => ([(header::CONTENT_TYPE, OPENMETRICS)], body).into_response(),
        Err(s) => (s, "the node has stopped\n").into_response(),
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown` completes: the node's metrics (when
/// there is a node) and the site's extra source's.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    node: Option<NodeHandle>,
    site: SiteInfo,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let ops = Ops {
        node,
        site,
        token: None,
    };
    let app = Router::new()
        .route("/metrics", get(metrics))
        .fallback(|| async { (StatusCode::NOT_FOUND, "this server serves /metrics\n") })
        .with_state(ops);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

const PAGE: &str = include_str!("dashboard.html");

#[derive(serde::Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

/// Compares without an early exit, so the time taken says nothing about the token.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn authorised(ops: &Ops, headers: &HeaderMap, q: &TokenQuery) -> bool {
    let Some(want) = &ops.token else { return true };
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    bearer
        .or(q.token.as_deref())
        .is_some_and(|got| same(got.as_bytes(), want.as_bytes()))
}

fn unauthorised() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"))],
        "this dashboard needs its token: open it as /?token=TOKEN (see the node's log or its data dir's dashboard-token)\n",
    )
        .into_response()
}

async fn page(State(ops): State<Ops>, headers: HeaderMap, Query(q): Query<TokenQuery>) -> Response {
    if !authorised(&ops, &headers, &q) {
        return unauthorised();
    }
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        PAGE,
    )
        .into_response()
}

async fn state(
    State(ops): State<Ops>,
    headers: HeaderMap,
    Query(q): Query<TokenQuery>,
) -> Response {
    if !authorised(&ops, &headers, &q) {
        return unauthorised();
    }
    match state_json(&ops).await {
        Ok(v) => (
            [(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))],
            axum::Json(v),
        )
            .into_response(),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "the node has stopped\n").into_response(),
    }
}

fn ask_json(a: &hashgrid_protocol::Ask) -> Value {
    json!({
        "provider": a.provider.short(),
        "order_id": a.order_id,
        "gpu": a.gpu.name,
        "units": a.units,
        "price_msat": a.price.0,
        "region": a.region,
        "expires_at_ms": a.expires_at.0,
    })
}

async fn state_json(ops: &Ops) -> Result<Value, crate::NodeError> {
    let Some(node) = &ops.node else {
        return Err(crate::NodeError::Stopped);
    };
    let stats = node.ops().stats().await?;
    let own = node.market().own_orders().await?;
    let cheapest = node
        .market()
        .offers(hashgrid_market::OfferQuery {
            limit: 10,
            ..Default::default()
        })
        .await?;
    let addrs: Vec<String> = node
        .peers()
        .listen_addrs()
        .await?
        .iter()
        .map(ToString::to_string)
        .collect();
    let m = node.ops().metrics();
    let own_asks: Vec<Value> = own
        .iter()
        .filter_map(|o| match o {
            crate::OwnOrder::Ask(a) => Some(ask_json(a)),
            crate::OwnOrder::Bid(_) => None,
        })
        .collect();
    let gpus: Vec<Value> = ops
        .site
        .gpus
        .iter()
        .map(|g| {
            json!({
                "name": g.name,
                "backend": format!("{:?}", g.backend),
                "device_type": format!("{:?}", g.device_type),
                "memory_bytes": g.memory_bytes,
                "matmul_mflops": g.bench.matmul_mflops,
            })
        })
        .collect();
    Ok(json!({
        "node": {
            "peer_id": node.peer_id().to_string(),
            "public_key": node.public_key().to_string(),
            "region": m.identity().region,
            "network": m.identity().network,
            "settlement": m.identity().settlement,
            "version": env!("CARGO_PKG_VERSION"),
            "addrs": addrs,
        },
        "gpus": gpus,
        "totals": m.totals(),
        "history": m.activity().history(),
        "jobs": m.activity().jobs(),
        "book": {
            "asks": stats.asks,
            "bids": stats.bids,
            "providers": stats.providers,
            "regions": stats.regions,
            "cheapest": cheapest.iter().map(ask_json).collect::<Vec<_>>(),
        },
        "own_asks": own_asks,
        "peers": stats.peers.iter().map(|(p, r)| json!({"peer_id": p, "region": r})).collect::<Vec<_>>(),
        "gateway": ops.site.extra.as_ref().map(|x| x.dashboard()),
    }))
}

/// Samples the node's figures once a second into the dashboard's history, until the node
/// stops.
async fn sample(node: NodeHandle) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        let Ok(stats) = node.ops().stats().await else {
            return;
        };
        let t = node.ops().metrics().totals();
        node.ops().metrics().activity().sample(HistoryPoint {
            t_ms: hashgrid_protocol::Timestamp::now().0,
            units_busy: t.units_busy,
            units_total: t.units_total,
            jobs_done: t.jobs_done,
            earned_msat: t.earned_msat,
            gpu_busy_seconds: t.gpu_busy_seconds,
            peers: stats.peers.len() as u64,
        });
    }
}

/// Serves the dashboard (`/`, `/api/state`, and `/metrics` as well) on `listener` until
/// `shutdown` completes. `token` is required when the listener is not on loopback.
pub async fn serve_dashboard(
    listener: tokio::net::TcpListener,
    node: NodeHandle,
    site: SiteInfo,
    token: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let addr = listener.local_addr()?;
    if token.is_none() && !is_loopback(&addr) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("the dashboard on {addr} is reachable from other machines: it needs a token"),
        ));
    }
    let sampler = tokio::spawn(sample(node.clone()));
    let ops = Ops {
        node: Some(node),
        site,
        token: token.map(Arc::from),
    };
    let app = Router::new()
        .route("/", get(page))
        .route("/api/state", get(state))
        .route("/metrics", get(metrics))
        .fallback(|| async { (StatusCode::NOT_FOUND, "no such page\n") })
        .with_state(ops);
    info!(url = %format!("http://{addr}/"), "dashboard");
    let r = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await;
    sampler.abort();
    if let Err(e) = &r {
        warn!(error = %e, "dashboard server stopped");
    }
    r
}

/// The dashboard's token for a data dir: `dashboard-token` in it, created (32 random bytes,
/// hex, mode 0600) on first use.
pub fn load_or_create_token(dir: &std::path::Path) -> std::io::Result<String> {
    let path = dir.join("dashboard-token");
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(std::io::Error::other)?;
    let token = hex::encode(bytes);
    std::fs::create_dir_all(dir)?;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    use std::io::Write;
    opts.open(&path)?.write_all(token.as_bytes())?;
    Ok(token)
}
