//! The gateway's Prometheus metrics: requests by route and status, time to the response head
//! by route, time to first token, tokens, and spend. Labels have bounded values (the routes
//! this gateway serves, status codes).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::text::encode_registry;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

type Labels = Vec<(&'static str, String)>;

fn latency_buckets() -> impl Iterator<Item = f64> {
    // 5 ms to about 160 s.
    exponential_buckets(0.005, 2.0, 16)
}

/// The gateway's counters and histograms.
pub struct GatewayMetrics {
    registry: Registry,
    requests: Family<Labels, Counter>,
    latency: Family<Labels, Histogram>,
    ttft: Histogram,
    tokens: Family<Labels, Counter>,
    spent: Counter,
    // For the dashboard.
    total: AtomicU64,
    failed: AtomicU64,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
}

impl std::fmt::Debug for GatewayMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayMetrics").finish_non_exhaustive()
    }
}

/// What the dashboard shows of a gateway.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct GatewayTotals {
    /// Requests answered.
    pub requests: u64,
    /// Requests answered with an error status.
    pub failed: u64,
    /// Msat charged for this gateway's requests.
    pub spent_msat: u64,
    /// Prompt tokens read.
    pub prompt_tokens: u64,
    /// Tokens generated.
    pub completion_tokens: u64,
}

impl Default for GatewayMetrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let r = registry.sub_registry_with_prefix("hashgrid_gateway");
        let requests = Family::<Labels, Counter>::default();
        r.register(
            "requests",
            "Requests answered, by route and status code",
            requests.clone(),
        );
        let latency =
            Family::<Labels, Histogram>::new_with_constructor(|| Histogram::new(latency_buckets()));
        r.register_with_unit(
            "response",
            "Time from request to response head, by route (for streamed answers: to the first event)",
            Unit::Seconds,
            latency.clone(),
        );
        let ttft = Histogram::new(latency_buckets());
        r.register_with_unit(
            "time_to_first_token",
            "Time from a generation request to its first text",
            Unit::Seconds,
            ttft.clone(),
        );
        let tokens = Family::<Labels, Counter>::default();
        r.register(
            "tokens",
            "Tokens, by kind (prompt, completion)",
            tokens.clone(),
        );
        let spent = Counter::default();
        r.register_with_unit(
            "spent",
            "Msat charged for this gateway's requests (receipts verified)",
            Unit::Other("msat".into()),
            spent.clone(),
        );
        GatewayMetrics {
            registry,
            requests,
            latency,
            ttft,
            tokens,
            spent,
            total: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            completion_tokens: AtomicU64::new(0),
        }
    }
}

impl GatewayMetrics {
    /// A request to `route` answered `status` after `secs`.
    pub(crate) fn request(&self, route: &str, status: u16, secs: f64) {
        self.requests
            .get_or_create(&vec![
                ("route", route.to_string()),
                ("status", status.to_string()),
            ])
            .inc();
        self.latency
            .get_or_create(&vec![("route", route.to_string())])
            .observe(secs);
        self.total.fetch_add(1, Ordering::Relaxed);
        if status >= 400 {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A generation's first text came `secs` after the request.
    pub(crate) fn first_token(&self, secs: f64) {
        self.ttft.observe(secs);
    }

    /// A request read `prompt` tokens and generated `completion`.
    pub(crate) fn tokens(&self, prompt: u64, completion: u64) {
        self.tokens
            .get_or_create(&vec![("kind", "prompt".into())])
            .inc_by(prompt);
        self.tokens
            .get_or_create(&vec![("kind", "completion".into())])
            .inc_by(completion);
        self.prompt_tokens.fetch_add(prompt, Ordering::Relaxed);
        self.completion_tokens
            .fetch_add(completion, Ordering::Relaxed);
    }

    /// A request was charged `msat`.
    pub(crate) fn spent(&self, msat: u64) {
        self.spent.inc_by(msat);
    }

    /// Appends the metrics in the OpenMetrics text format, without `# EOF`.
    pub fn encode_into(&self, out: &mut String) {
        let _ = encode_registry(out, &self.registry);
    }

    /// The running totals.
    pub fn totals(&self) -> GatewayTotals {
        GatewayTotals {
            requests: self.total.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            spent_msat: self.spent.get(),
            prompt_tokens: self.prompt_tokens.load(Ordering::Relaxed),
            completion_tokens: self.completion_tokens.load(Ordering::Relaxed),
        }
    }
}

/// The middleware that counts every request by its route (the matched pattern, never the raw
/// path, so ids in paths add no series) and status.
pub(crate) async fn track(
    State(m): State<std::sync::Arc<crate::Inner>>,
    req: Request,
    next: Next,
) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let start = Instant::now();
    let resp = next.run(req).await;
    m.metrics.request(
        &route,
        resp.status().as_u16(),
        start.elapsed().as_secs_f64(),
    );
    resp
}
