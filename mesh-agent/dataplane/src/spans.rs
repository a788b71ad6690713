//! Distributed tracing shared by the agents and the waypoint: W3C Trace Context
//! (`traceparent`), span contexts with parent-based sampling, and spans exported over
//! OTLP/gRPC (`opentelemetry.proto.collector.trace.v1.TraceService/Export`) to a collector.
//!
//! - A `traceparent` (version 00, or a later version read as 00; an invalid one is ignored,
//!   as the spec says) makes a span its child, in its trace, sampled as the parent is (Envoy's
//!   parent-based sampling); without one a span starts a trace, sampled with the configured
//!   percent (Istio's default, 1).
//! - Spans leave in batches (every second, or 512 at once) from a bounded queue; a full queue
//!   or a failed export drops spans (counted in `ferrymesh_spans_dropped_total`), never holds
//!   up a connection or a request.
//!
//! Without a collector nothing is traced.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferrymesh_api::otlp::{collector, common, resource, trace};
use tokio::sync::mpsc;

/// Spans waiting to leave, at most.
const QUEUE: usize = 4096;
/// Spans sent in one export, at most.
const BATCH: usize = 512;
/// How long a span waits for its batch.
const BATCH_EVERY: Duration = Duration::from_secs(1);
/// How long an export may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// A W3C `traceparent`: trace id, parent span id, sampled flag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceParent {
    /// The trace.
    pub trace_id: [u8; 16],
    /// The span that sent the request.
    pub parent_id: [u8; 8],
    /// Whether the trace is recorded (flag 01).
    pub sampled: bool,
}

impl TraceParent {
    /// Parses `00-<32 hex>-<16 hex>-<2 hex>` (a later version: its first four fields); None
    /// for anything else, version `ff`, or an all-zero id.
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim();
        let version = text.get(0..2)?;
        if version == "ff" || !version.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) {
            return None;
        }
        let fields = match version {
            "00" if text.len() == 55 => text,
            "00" => return None,
            _ if text.len() == 55 || text.as_bytes().get(55) == Some(&b'-') => text.get(..55)?,
            _ => return None,
        };
        let mut parts = fields.split('-');
        let (_, trace, parent, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let trace_id: [u8; 16] = hex(trace)?.try_into().ok()?;
        let parent_id: [u8; 8] = hex(parent)?.try_into().ok()?;
        let flags = *hex(flags)?.first()?;
        if trace_id == [0; 16] || parent_id == [0; 8] {
            return None;
        }
        Some(Self { trace_id, parent_id, sampled: flags & 1 == 1 })
    }

    /// The `traceparent` of `headers`, if it has a valid one.
    pub fn of(headers: &http::HeaderMap) -> Option<Self> {
        headers.get("traceparent").and_then(|v| v.to_str().ok()).and_then(Self::parse)
    }

    /// The header's text.
    pub fn to_header(self) -> String {
        format!("00-{}-{}-{:02x}", to_hex(&self.trace_id), to_hex(&self.parent_id), u8::from(self.sampled))
    }
}

/// Lowercase hex of an even length, as bytes.
fn hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok()).collect()
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Where a span is in its trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpanContext {
    /// Its trace.
    pub trace_id: [u8; 16],
    /// Its own id.
    pub span_id: [u8; 8],
    /// The span it is a child of, when it came with a `traceparent`.
    pub parent_id: Option<[u8; 8]>,
    /// Whether it is recorded and exported.
    pub sampled: bool,
    /// When it started.
    pub start: SystemTime,
}

impl SpanContext {
    /// A span starting now: a child of `parent` (in its trace, sampled as it is), or the root
    /// of a new trace, sampled as `sampled` says.
    pub fn start(parent: Option<TraceParent>, sampled: bool) -> Self {
        let span_id = loop {
            let id: [u8; 8] = rand::random();
            if id != [0; 8] {
                break id;
            }
        };
        let (trace_id, parent_id, sampled) = match parent {
            Some(p) => (p.trace_id, Some(p.parent_id), p.sampled),
            None => (rand::random::<u128>().max(1).to_be_bytes(), None, sampled),
        };
        Self { trace_id, span_id, parent_id, sampled, start: SystemTime::now() }
    }

    /// The `traceparent` of what this span sends on: itself as the parent.
    pub fn traceparent(&self) -> String {
        TraceParent { trace_id: self.trace_id, parent_id: self.span_id, sampled: self.sampled }.to_header()
    }

    /// The span, ended now, as OTLP has it (`flags`: sampled, and whether the parent is remote).
    pub fn to_span(&self, name: String, kind: trace::span::SpanKind, attributes: Vec<common::KeyValue>) -> trace::Span {
        let nanos = |t: SystemTime| t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        trace::Span {
            trace_id: self.trace_id.to_vec(),
            span_id: self.span_id.to_vec(),
            trace_state: String::new(),
            parent_span_id: self.parent_id.map(|p| p.to_vec()).unwrap_or_default(),
            flags: 0x100 | (u32::from(self.parent_id.is_some()) << 9) | u32::from(self.sampled),
            name,
            kind: kind as i32,
            start_time_unix_nano: nanos(self.start),
            end_time_unix_nano: nanos(SystemTime::now()),
            attributes,
            dropped_attributes_count: 0,
            status: None,
        }
    }
}

/// Where spans go: the collector, and how many new traces are sampled.
#[derive(Debug)]
pub struct Tracer {
    /// The queue to the exporting task; None without a collector.
    queue: Option<mpsc::Sender<trace::Span>>,
    /// Percent of new traces sampled.
    sampling: f64,
}

impl Tracer {
    /// A tracer exporting to `collector` (`http://host:port`, OTLP/gRPC), sampling `sampling`
    /// percent of new traces, its spans' resource described by `resource` (`service.name`...);
    /// without a collector, one that traces nothing. Must run inside a tokio runtime.
    pub fn new(collector: Option<&str>, sampling: f64, resource: Vec<(&str, String)>) -> anyhow::Result<Self> {
        anyhow::ensure!((0.0..=100.0).contains(&sampling), "--tracing-sampling {sampling} is not a percent (0 to 100)");
        let Some(collector) = collector else { return Ok(Self { queue: None, sampling }) };
        let endpoint = tonic::transport::Endpoint::from_shared(collector.to_string())
            .map_err(|e| anyhow::anyhow!("--tracing-collector {collector}: {e}"))?
            .timeout(EXPORT_TIMEOUT)
            .connect_timeout(EXPORT_TIMEOUT);
        let client = collector::trace_service_client::TraceServiceClient::new(endpoint.connect_lazy());
        let (tx, rx) = mpsc::channel(QUEUE);
        let resource = resource::Resource {
            attributes: resource.into_iter().map(|(k, v)| attribute(k, v)).collect(),
            dropped_attributes_count: 0,
        };
        tokio::spawn(export(client, rx, resource));
        Ok(Self { queue: Some(tx), sampling })
    }

    /// A span starting now, the child of `parent` (None: the root of a new trace, sampled at
    /// the configured percent); None when nothing is traced (no collector).
    pub fn start(&self, parent: Option<TraceParent>) -> Option<SpanContext> {
        self.queue.as_ref()?;
        Some(SpanContext::start(parent, rand::random::<f64>() * 100.0 < self.sampling))
    }

    /// Exports `span` (one that was sampled).
    pub fn export(&self, span: trace::Span) {
        let Some(queue) = &self.queue else { return };
        if queue.try_send(span).is_err() {
            metrics::counter!("ferrymesh_spans_dropped_total", "reason" => "queue_full").increment(1);
        }
    }
}

/// Describes the span metrics (for a process's Prometheus endpoint).
pub fn describe_metrics() {
    metrics::describe_counter!("ferrymesh_spans_exported_total", "Spans exported to the tracing collector (OTLP).");
    metrics::describe_counter!(
        "ferrymesh_spans_dropped_total",
        "Spans not exported, by reason (queue_full, export_failed)."
    );
}

/// A span attribute.
pub fn attribute(key: &str, value: impl Into<AttributeValue>) -> common::KeyValue {
    let value = match value.into() {
        AttributeValue::Text(s) => common::any_value::Value::StringValue(s),
        AttributeValue::Int(i) => common::any_value::Value::IntValue(i),
    };
    common::KeyValue { key: key.into(), value: Some(common::AnyValue { value: Some(value) }) }
}

/// A span attribute's value.
pub enum AttributeValue {
    /// A string.
    Text(String),
    /// An integer.
    Int(i64),
}

impl From<String> for AttributeValue {
    fn from(s: String) -> Self {
        AttributeValue::Text(s)
    }
}

impl From<i64> for AttributeValue {
    fn from(i: i64) -> Self {
        AttributeValue::Int(i)
    }
}

/// Sends the queued spans in batches until the tracer is gone.
async fn export(
    mut client: collector::trace_service_client::TraceServiceClient<tonic::transport::Channel>,
    mut queue: mpsc::Receiver<trace::Span>,
    resource: resource::Resource,
) {
    let scope =
        common::InstrumentationScope { name: "mesh-waypoint".into(), version: env!("CARGO_PKG_VERSION").into() };
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        // Wait for a first span, then gather for up to a second.
        match queue.recv().await {
            Some(span) => batch.push(span),
            None => return,
        }
        let deadline = tokio::time::Instant::now() + BATCH_EVERY;
        while batch.len() < BATCH {
            match tokio::time::timeout_at(deadline, queue.recv()).await {
                Ok(Some(span)) => batch.push(span),
                Ok(None) | Err(_) => break,
            }
        }
        let spans = std::mem::take(&mut batch);
        let count = spans.len() as u64;
        let request = collector::ExportTraceServiceRequest {
            resource_spans: vec![trace::ResourceSpans {
                resource: Some(resource.clone()),
                scope_spans: vec![trace::ScopeSpans { scope: Some(scope.clone()), spans, schema_url: String::new() }],
                schema_url: String::new(),
            }],
        };
        match client.export(request).await {
            Ok(_) => metrics::counter!("ferrymesh_spans_exported_total").increment(count),
            Err(status) => {
                tracing::warn!(error = %status, spans = count, "cannot export spans to the tracing collector");
                metrics::counter!("ferrymesh_spans_dropped_total", "reason" => "export_failed").increment(count);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_is_read_as_w3c_trace_context_says() {
        let p = TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(to_hex(&p.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(to_hex(&p.parent_id), "00f067aa0ba902b7");
        assert!(p.sampled);
        assert_eq!(p.to_header(), "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        assert!(!TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").unwrap().sampled);
        // A later version: its first fields, and what follows them ignored.
        let later = TraceParent::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future").unwrap();
        assert_eq!(later, p);
        for bad in [
            "",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_child_span_keeps_the_trace_and_the_decision() {
        let parent = TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        let child = SpanContext::start(Some(parent), false);
        assert_eq!((child.trace_id, child.parent_id, child.sampled), (parent.trace_id, Some(parent.parent_id), true));
        let sent = TraceParent::parse(&child.traceparent()).unwrap();
        assert_eq!((sent.trace_id, sent.parent_id, sent.sampled), (child.trace_id, child.span_id, true));
        let root = SpanContext::start(None, false);
        assert!(root.parent_id.is_none() && !root.sampled && root.trace_id != [0; 16]);
        assert_eq!(root.to_span("x".into(), trace::span::SpanKind::Client, vec![]).flags, 0x100);
        assert_eq!(child.to_span("x".into(), trace::span::SpanKind::Server, vec![]).flags, 0x301);
    }
}
