//! Trace export with OpenTelemetry: on when the standard `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, off otherwise at no cost. The exporter
//! speaks OTLP over HTTP/protobuf and reads the other standard variables itself
//! (`OTEL_EXPORTER_OTLP_HEADERS`, `…_TIMEOUT`, `…_COMPRESSION`; `OTEL_SERVICE_NAME` and
//! `OTEL_RESOURCE_ATTRIBUTES` name the service; `OTEL_BSP_*` tune the batches). W3C trace
//! context (`traceparent`) is the propagation format.

use anyhow::Context as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;

/// The tracer provider when export is configured; `None` when it is not.
pub fn provider() -> anyhow::Result<Option<SdkTracerProvider>> {
    let set = |name: &str| std::env::var(name).is_ok_and(|value| !value.trim().is_empty());
    if !set("OTEL_EXPORTER_OTLP_ENDPOINT") && !set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
        return Ok(None);
    }
    for protocol in [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ] {
        if let Ok(value) = std::env::var(protocol)
            && !value.trim().is_empty()
            && value.trim() != "http/protobuf"
        {
            anyhow::bail!(
                "{protocol}={value}: this build exports traces over http/protobuf only (point it at the collector's HTTP port, usually 4318)"
            );
        }
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
        .context("setting up the OTLP trace exporter")?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if !set("OTEL_SERVICE_NAME") {
        resource = resource.with_service_name("tasker");
    }
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    Ok(Some(
        SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.build())
            .build(),
    ))
}

/// Which spans are exported: `TASKER_TRACE` (the `TASKER_LOG` syntax). By default everything
/// at info level and above but the database statements' spans, which cost about as much
/// again as all the others (a span per statement); `TASKER_TRACE=info,sqlx=warn` adds them.
pub fn filter() -> tracing_subscriber::EnvFilter {
    tracing_subscriber::EnvFilter::try_from_env("TASKER_TRACE")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn,sea_orm=warn"))
}

/// The `tracing` layer that turns spans into exported ones. Spans carry their own fields
/// only: source locations, threads and busy/idle times would cost work at every poll of
/// every statement for little an operator reads.
pub fn layer<S>(
    provider: &SdkTracerProvider,
) -> tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::Tracer>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("tasker"))
        .with_location(false)
        .with_threads(false)
        .with_tracked_inactivity(false)
}
