//! Logs and traces through `tracing`.
//!
//! Logs: text or JSON lines on stderr, filtered by `log.level` (overridden
//! by `RUST_LOG`); every JSON line carries the node id, so the lines of a
//! cluster can be merged and still told apart.
//!
//! Traces (README "Traces"): when `[trace] otlp_endpoint` names a
//! collector, an OpenTelemetry layer (tracing-opentelemetry) turns the
//! spans of the message path into OTLP spans, batched and exported over
//! gRPC: `stanza` for each stanza a client sends, `forward` for its
//! hand-over to another node, `deliver` for its delivery there. The W3C
//! trace context travels with the forwarded stanza (`Forwarded.traceparent`
//! in cluster.proto), so one message is one trace across the nodes.
//! Without an endpoint no OpenTelemetry layer is installed at all, and the
//! message path skips its spans on one branch ([`tracing_on`]).
//! Prometheus metrics are in [`crate::metrics`].

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator as _};
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing::Subscriber;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::Layer as _;

use crate::config::{Config, LogFormat, Trace};

/// Set once, when the OpenTelemetry layer is installed.
static TRACING: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported. The message path makes its spans only
/// then: off, a stanza costs this one load and branch.
#[inline]
pub fn tracing_on() -> bool {
    TRACING.load(Ordering::Relaxed)
}

/// What [`init`] set up; [`Telemetry::shutdown`] exports the spans still
/// batched (dropping it does too, on the way out of an error).
#[must_use = "spans still batched are lost unless it is shut down"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports what is batched and stops the exporter.
    pub async fn shutdown(mut self) {
        if let Some(p) = self.provider.take() {
            // The export blocks on the gRPC call, which the runtime drives.
            let _ = tokio::task::spawn_blocking(move || shutdown_provider(&p)).await;
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            // Without a runtime to drive the export, or with this thread
            // its only one, what is batched is dropped.
            if let Ok(tokio::runtime::RuntimeFlavor::MultiThread) =
                tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor())
            {
                tokio::task::block_in_place(|| shutdown_provider(&p))
            }
        }
    }
}

fn shutdown_provider(p: &SdkTracerProvider) {
    if let Err(e) = p.shutdown() {
        tracing::warn!(error = %e, "could not export the last spans to the OTLP collector");
    }
}

/// Installs the global subscriber for this node (`node_id` resolved).
/// Call it inside the Tokio runtime: the gRPC exporter's connection lives
/// there.
pub fn init(config: &Config) -> Telemetry {
    let built = build(config);
    let installed = built.dispatch.try_init().is_ok();
    match (built.error, installed && built.provider.is_some()) {
        (Some(e), _) => {
            tracing::error!(endpoint = %config.trace.otlp_endpoint, error = %e, "cannot set up the OTLP exporter; no traces")
        }
        (None, true) => {
            TRACING.store(true, Ordering::Relaxed);
            tracing::info!(
                endpoint = %config.trace.otlp_endpoint,
                sample_ratio = config.trace.sample_ratio,
                "exporting traces over OTLP"
            );
        }
        (None, false) => {}
    }
    Telemetry {
        provider: built.provider,
    }
}

struct Built {
    dispatch: tracing::Dispatch,
    provider: Option<SdkTracerProvider>,
    error: Option<opentelemetry_otlp::ExporterBuildError>,
}

/// The subscriber `config` asks for, not yet installed.
fn build(config: &Config) -> Built {
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_default_env()
            .or_else(|_| tracing_subscriber::EnvFilter::try_new(&config.log.level))
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
    };
    let node_id = config.node_id;
    if !config.trace.enabled() {
        // What the node always did: one fmt subscriber, one filter.
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter())
            .with_writer(std::io::stderr);
        let dispatch = match config.log.format {
            LogFormat::Json => builder
                .json()
                .event_format(WithNodeId::new(
                    tracing_subscriber::fmt::format().json(),
                    node_id,
                ))
                .finish()
                .into(),
            LogFormat::Text => builder.finish().into(),
        };
        return Built {
            dispatch,
            provider: None,
            error: None,
        };
    }

    let (provider, error) = match provider(&config.trace, node_id) {
        Ok(p) => (Some(p), None),
        Err(e) => (None, Some(e)),
    };
    // The log filter stays the log's: traces get the message path's spans
    // (and warnings inside them) whatever `log.level` says.
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("xmpp-node"))
            .with_location(false)
            .with_threads(false)
            .with_filter(tracing_subscriber::filter::filter_fn(|meta| {
                meta.target().starts_with("node::")
                    && if meta.is_span() {
                        *meta.level() <= tracing::Level::INFO
                    } else {
                        *meta.level() <= tracing::Level::WARN
                    }
            }))
    });
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match config.log.format {
        LogFormat::Json => fmt
            .json()
            .event_format(WithNodeId::new(
                tracing_subscriber::fmt::format().json(),
                node_id,
            ))
            .with_filter(filter())
            .boxed(),
        LogFormat::Text => fmt.with_filter(filter()).boxed(),
    };
    Built {
        dispatch: tracing_subscriber::registry().with(fmt).with(otel).into(),
        provider,
        error,
    }
}

fn provider(
    trace: &Trace,
    node_id: u64,
) -> Result<SdkTracerProvider, opentelemetry_otlp::ExporterBuildError> {
    use opentelemetry_otlp::WithExportConfig as _;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(trace.otlp_endpoint.clone())
        .build()?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(trace.service_name.clone())
        .with_attribute(opentelemetry::KeyValue::new(
            "service.instance.id",
            node_id.to_string(),
        ))
        .build();
    Ok(SdkTracerProvider::builder()
        .with_resource(resource)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            trace.sample_ratio,
        ))))
        .with_batch_exporter(exporter)
        .build())
}

/// The W3C `traceparent` of `span`, when it is part of a sampled trace:
/// what a forwarded stanza carries. Empty otherwise (no context travels
/// for a trace nobody keeps).
pub fn traceparent(span: &tracing::Span) -> String {
    let cx = span.context();
    if !cx.span().span_context().is_sampled() {
        return String::new();
    }
    let mut carrier = Carrier::default();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.traceparent
}

/// Makes `span`'s parent the remote span named by `traceparent` (from
/// another node); call it before the span is first entered.
pub fn set_remote_parent(span: &tracing::Span, traceparent: &str) {
    let carrier = Carrier {
        traceparent: traceparent.to_owned(),
    };
    let cx = TraceContextPropagator::new().extract(&carrier);
    let _ = span.set_parent(cx);
}

/// The one header a forwarded stanza carries (`tracestate` is not kept:
/// our spans set none).
#[derive(Default)]
struct Carrier {
    traceparent: String,
}

impl Injector for Carrier {
    fn set(&mut self, key: &str, value: String) {
        if key == "traceparent" {
            self.traceparent = value;
        }
    }
}

impl Extractor for Carrier {
    fn get(&self, key: &str) -> Option<&str> {
        (key == "traceparent").then_some(self.traceparent.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent"]
    }
}

/// A JSON event formatter whose lines start with `"node_id":N`.
struct WithNodeId<F> {
    inner: F,
    prefix: String,
}

impl<F> WithNodeId<F> {
    fn new(inner: F, node_id: u64) -> Self {
        WithNodeId {
            inner,
            prefix: format!("{{\"node_id\":{node_id},"),
        }
    }
}

impl<S, N, F> FormatEvent<S, N> for WithNodeId<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let mut line = String::with_capacity(256);
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        match line.strip_prefix('{') {
            Some(rest) => {
                writer.write_str(&self.prefix)?;
                writer.write_str(rest)
            }
            None => writer.write_str(&line),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_start_with_the_node_id() {
        let buf = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
        let sink = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .event_format(WithNodeId::new(
                tracing_subscriber::fmt::format().json(),
                42,
            ))
            .with_writer(move || Sink(sink.clone()))
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(node_id = 7, "one");
            tracing::warn!(text = "a \"quoted\" {brace}", "two");
        });
        let out = String::from_utf8(buf.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2, "{out}");
        for line in lines {
            let v: serde_json::Value = serde_json::from_str(line).expect(line);
            assert_eq!(v["node_id"], 42, "{line}");
            assert!(v["fields"]["message"].is_string(), "{line}");
        }
    }

    fn config(endpoint: &str) -> Config {
        let mut c = Config {
            node_id: 5,
            ..Config::default()
        };
        c.trace.otlp_endpoint = endpoint.into();
        c
    }

    #[test]
    fn without_an_endpoint_no_opentelemetry_layer_is_installed() {
        let built = build(&config(""));
        assert!(built.provider.is_none() && built.error.is_none());
        tracing::dispatcher::with_default(&built.dispatch, || {
            let span = tracing::info_span!("stanza");
            assert!(matches!(
                span.set_parent(opentelemetry::Context::new()),
                Err(tracing_opentelemetry::SetParentError::LayerNotFound)
            ));
            assert_eq!(traceparent(&span), "");
        });
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn with_an_endpoint_sampled_spans_carry_their_context() {
        // Nothing listens there: spans are made, their export fails later.
        let built = build(&config("http://127.0.0.1:9"));
        assert!(built.error.is_none(), "{:?}", built.error);
        let provider = built.provider.expect("a provider");
        tracing::dispatcher::with_default(&built.dispatch, || {
            let stanza = tracing::info_span!("stanza");
            let tp = traceparent(&stanza);
            assert!(tp.starts_with("00-") && tp.ends_with("-01"), "{tp}");
            // The receiving side: a span whose parent is the remote one.
            let deliver = tracing::info_span!("deliver");
            set_remote_parent(&deliver, &tp);
            let trace_id = &tp[3..35];
            assert_eq!(
                deliver
                    .context()
                    .span()
                    .span_context()
                    .trace_id()
                    .to_string(),
                trace_id
            );
            // Spans of other crates are not exported.
            let other = tracing::info_span!(target: "h2", "frame");
            assert_eq!(traceparent(&other), "");
        });
        let _ = tokio::task::spawn_blocking(move || {
            provider.shutdown_with_timeout(std::time::Duration::from_millis(100))
        })
        .await;
    }

    #[test]
    fn without_an_exporter_no_context_travels() {
        // No OpenTelemetry layer: a span has no trace, and nothing is
        // carried for it.
        assert!(!tracing_on());
        let span = tracing::info_span!("stanza");
        assert_eq!(traceparent(&span), "");
        assert_eq!(traceparent(&tracing::Span::none()), "");
    }

    #[test]
    fn traceparent_round_trips_through_the_carrier() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let cx = TraceContextPropagator::new().extract(&Carrier {
            traceparent: tp.into(),
        });
        let sc = cx.span().span_context().clone();
        assert!(sc.is_remote() && sc.is_sampled());
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        let mut out = Carrier::default();
        TraceContextPropagator::new().inject_context(&cx, &mut out);
        assert_eq!(out.traceparent, tp);
    }

    struct Sink(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}
