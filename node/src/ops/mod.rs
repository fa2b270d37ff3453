//! Operating a site: Prometheus metrics ([`metrics`]) and the HTTP server that exposes them
//! with the live dashboard ([`server`]).

pub mod activity;
pub mod metrics;
pub mod server;

pub use metrics::{GaugeReadings, LightningReadings, Metrics, NodeIdentity, Totals};
