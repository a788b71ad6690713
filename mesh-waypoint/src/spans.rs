//! Distributed tracing at the waypoint: W3C Trace Context in, a span per request, W3C Trace
//! Context out, spans exported over OTLP/gRPC (`opentelemetry.proto.collector.trace.v1.
//! TraceService/Export`) to the collector given by `--tracing-collector`.
//!
//! - A request's `traceparent` (version 00, or a later version read as 00; an invalid one is
//!   ignored, as the spec says) makes the waypoint's span its child, in its trace; without one
//!   the span starts a trace. `tracestate` goes on unchanged.
//! - Sampling is parent-based, as Envoy does it: a sampled parent's trace is sampled, an
//!   unsampled parent's is not; a new trace is sampled with `--tracing-sampling` percent
//!   (Istio's default, 1).
//! - Upstream the request carries `traceparent` with the waypoint's span as parent and the
//!   decision in its flags, so the application's spans are the waypoint span's children.
//! - Spans leave in batches (every second, or 512 at once) from a bounded queue; a full queue
//!   or a failed export drops spans (counted in `ferrymesh_spans_dropped_total`), never holds
//!   up a request.
//!
//! Without a collector nothing is traced and `traceparent` passes through untouched.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferrymesh_api::otlp::{collector, common, resource, trace};
use http::{HeaderMap, HeaderValue};
use tokio::sync::mpsc;

use crate::record::Record;

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

/// The waypoint's span of one request.
#[derive(Clone, Debug)]
pub struct RequestSpan {
    /// Its trace.
    pub trace_id: [u8; 16],
    /// Its own id.
    pub span_id: [u8; 8],
    /// The caller's span, when the request came with a `traceparent`.
    pub parent_id: Option<[u8; 8]>,
    /// Whether it is recorded and exported.
    pub sampled: bool,
    /// The request's `tracestate`, as it came.
    pub trace_state: String,
    start: SystemTime,
}

impl RequestSpan {
    /// The `traceparent` the request carries upstream: this span as the parent.
    pub fn traceparent(&self) -> HeaderValue {
        let text = TraceParent { trace_id: self.trace_id, parent_id: self.span_id, sampled: self.sampled }.to_header();
        HeaderValue::try_from(text).expect("hex is a header value")
    }
}

/// Where the waypoint's spans go.
#[derive(Debug)]
pub struct Tracer {
    /// The queue to the exporting task; None without a collector.
    queue: Option<mpsc::Sender<trace::Span>>,
    /// Percent of new traces sampled.
    sampling: f64,
}

impl Tracer {
    /// A tracer exporting to `collector` (`http://host:port`, OTLP/gRPC), sampling `sampling`
    /// percent of new traces, its spans from service `service` (Istio names a waypoint's spans'
    /// service `<name>.<namespace>`); without a collector, one that traces nothing.
    pub fn new(collector: Option<&str>, sampling: f64, service: String, namespace: String) -> anyhow::Result<Self> {
        anyhow::ensure!((0.0..=100.0).contains(&sampling), "--tracing-sampling {sampling} is not a percent (0 to 100)");
        let Some(collector) = collector else { return Ok(Self { queue: None, sampling }) };
        let endpoint = tonic::transport::Endpoint::from_shared(collector.to_string())
            .map_err(|e| anyhow::anyhow!("--tracing-collector {collector}: {e}"))?
            .timeout(EXPORT_TIMEOUT)
            .connect_timeout(EXPORT_TIMEOUT);
        let client = collector::trace_service_client::TraceServiceClient::new(endpoint.connect_lazy());
        let (tx, rx) = mpsc::channel(QUEUE);
        let resource = resource::Resource {
            attributes: vec![attribute("service.name", service), attribute("k8s.namespace.name", namespace)],
            dropped_attributes_count: 0,
        };
        tokio::spawn(export(client, rx, resource));
        Ok(Self { queue: Some(tx), sampling })
    }

    /// The span of a request with `headers`; None when nothing is traced (no collector).
    pub fn start(&self, headers: &HeaderMap) -> Option<RequestSpan> {
        self.queue.as_ref()?;
        let parent = headers.get("traceparent").and_then(|v| v.to_str().ok()).and_then(TraceParent::parse);
        let (trace_id, parent_id, sampled) = match parent {
            Some(p) => (p.trace_id, Some(p.parent_id), p.sampled),
            None => (rand::random(), None, rand::random::<f64>() * 100.0 < self.sampling),
        };
        let trace_state = match parent {
            Some(_) => headers.get("tracestate").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string(),
            None => String::new(),
        };
        let span_id = loop {
            let id: [u8; 8] = rand::random();
            if id != [0; 8] {
                break id;
            }
        };
        Some(RequestSpan { trace_id, span_id, parent_id, sampled, trace_state, start: SystemTime::now() })
    }

    /// Ends `record`'s span (if sampled), with what the record says of the request.
    pub fn finish(&self, record: &Record) {
        let (Some(queue), Some(span)) = (&self.queue, &record.span) else { return };
        if !span.sampled {
            return;
        }
        let nanos = |t: SystemTime| t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        let failed = record.status >= 500 || record.status == 0;
        let mut attributes = vec![
            attribute("http.method", record.method.clone()),
            attribute("http.url", format!("http://{}{}", record.authority, record.path)),
            attribute("http.protocol", record.protocol.to_string()),
            attribute("http.status_code", i64::from(record.status)),
            attribute("response_flags", record.response_flags.to_string()),
            attribute("upstream_cluster", record.backend.clone()),
            attribute("upstream_address", record.upstream.clone()),
            attribute("peer.address", record.source_addr.clone()),
            attribute("source.principal", record.source_identity.clone()),
        ];
        if !record.request_principal.is_empty() {
            attributes.push(attribute("request.auth.principal", record.request_principal.clone()));
        }
        if !record.route.is_empty() {
            attributes.push(attribute("route", record.route.clone()));
        }
        let out = trace::Span {
            trace_id: span.trace_id.to_vec(),
            span_id: span.span_id.to_vec(),
            trace_state: span.trace_state.clone(),
            parent_span_id: span.parent_id.map(|p| p.to_vec()).unwrap_or_default(),
            flags: 0x100 | u32::from(span.parent_id.is_some()) << 9 | 1,
            // Istio's operation name: the Service's host and port.
            name: span_name(record),
            kind: trace::span::SpanKind::Server as i32,
            start_time_unix_nano: nanos(span.start),
            end_time_unix_nano: nanos(SystemTime::now()),
            attributes,
            dropped_attributes_count: 0,
            status: Some(trace::Status {
                message: if failed { record.reason.clone() } else { String::new() },
                code: if failed { trace::status::StatusCode::Error } else { trace::status::StatusCode::Unset } as i32,
            }),
        };
        if queue.try_send(out).is_err() {
            metrics::counter!("ferrymesh_spans_dropped_total", "reason" => "queue_full").increment(1);
        }
    }
}

/// `<service>.<namespace>.svc.cluster.local:<port>/*`, Istio's operation name, or the workload's
/// for a request addressed to a pod.
fn span_name(record: &Record) -> String {
    let addressed = if record.service.is_empty() { &record.workload } else { &record.service };
    match addressed.split_once('/') {
        Some((ns, name)) => format!("{name}.{ns}.svc.cluster.local:{}/*", record.port),
        None => format!("{}:{}/*", record.authority, record.port),
    }
}

fn attribute(key: &str, value: impl Into<AttributeValue>) -> common::KeyValue {
    let value = match value.into() {
        AttributeValue::Text(s) => common::any_value::Value::StringValue(s),
        AttributeValue::Int(i) => common::any_value::Value::IntValue(i),
    };
    common::KeyValue { key: key.into(), value: Some(common::AnyValue { value: Some(value) }) }
}

/// A span attribute's value.
enum AttributeValue {
    Text(String),
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

    #[tokio::test]
    async fn sampling_follows_the_parent_and_the_percent_for_new_traces() {
        // A collector that is never reached: only the decisions are looked at.
        let tracer = |percent| Tracer::new(Some("http://127.0.0.1:9"), percent, "w.ns".into(), "ns".into()).unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse().unwrap());
        headers.insert("tracestate", "vendor=1".parse().unwrap());
        let never = tracer(0.0);
        let span = never.start(&headers).unwrap();
        assert!(span.sampled, "a sampled parent's trace is sampled whatever the percent");
        assert_eq!(span.parent_id, Some(*b"\x00\xf0\x67\xaa\x0b\xa9\x02\xb7"));
        assert_eq!(span.trace_state, "vendor=1");
        let upstream = TraceParent::parse(span.traceparent().to_str().unwrap()).unwrap();
        assert_eq!((upstream.trace_id, upstream.parent_id, upstream.sampled), (span.trace_id, span.span_id, true));
        headers.insert("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00".parse().unwrap());
        assert!(!tracer(100.0).start(&headers).unwrap().sampled, "an unsampled parent's trace is not");
        let fresh = HeaderMap::new();
        assert!((0..100).all(|_| !never.start(&fresh).unwrap().sampled));
        let always = tracer(100.0);
        let roots: Vec<RequestSpan> = (0..100).map(|_| always.start(&fresh).unwrap()).collect();
        assert!(roots.iter().all(|s| s.sampled && s.parent_id.is_none()));
        let half = tracer(50.0);
        let sampled = (0..2000).filter(|_| half.start(&fresh).unwrap().sampled).count();
        assert!((800..1200).contains(&sampled), "{sampled} of 2000 at 50%");
        assert!(Tracer::new(None, 1.0, String::new(), String::new()).unwrap().start(&headers).is_none());
        assert!(Tracer::new(None, 101.0, String::new(), String::new()).is_err());
    }
}
