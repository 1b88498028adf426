//! Logging through `tracing`: text or JSON lines on stderr, filtered by the
//! config's `log.level` (overridden by `RUST_LOG`). OTLP export arrives
//! with the operations issue; Prometheus metrics are in [`crate::metrics`].

use crate::config::{Log, LogFormat};

pub fn init(log: &Log) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&log.level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match log.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}
