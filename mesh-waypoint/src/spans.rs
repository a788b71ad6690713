//! Tracing at the waypoint ([`ferrymesh_dataplane::spans`] holds the W3C and OTLP parts): a
//! server span per request, the child of the request's `traceparent`; a request without one is
//! the child of its tunnel's (the source agent's span of the connection, from the HBONE
//! CONNECT) when that is sampled, else the root of a new trace; `tracestate` goes on unchanged. Upstream the request carries `traceparent` with the
//! waypoint's span as parent and the sampling decision in its flags, so the application's
//! spans are the waypoint span's children. Without a collector nothing is traced and
//! `traceparent` passes through untouched.

use ferrymesh_api::otlp::trace;
use ferrymesh_dataplane::spans::{attribute, SpanContext, TraceParent, Tracer};
use http::{HeaderMap, HeaderValue};

use crate::record::Record;

/// The waypoint's span of one request.
#[derive(Clone, Debug)]
pub struct RequestSpan {
    /// Where it is in its trace.
    pub context: SpanContext,
    /// The request's `tracestate`, as it came.
    pub trace_state: String,
}

impl RequestSpan {
    /// The span of a request with `headers` on a tunnel whose CONNECT carried `tunnel` (its
    /// `traceparent`); None when nothing is traced (no collector).
    pub fn start(tracer: &Tracer, headers: &HeaderMap, tunnel: Option<TraceParent>) -> Option<Self> {
        let own = TraceParent::of(headers);
        let context = tracer.start(own.or(tunnel.filter(|t| t.sampled)))?;
        let trace_state = match own {
            Some(_) => headers.get("tracestate").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string(),
            None => String::new(),
        };
        Some(Self { context, trace_state })
    }

    /// The `traceparent` the request carries upstream: this span as the parent.
    pub fn traceparent(&self) -> HeaderValue {
        HeaderValue::try_from(self.context.traceparent()).expect("hex is a header value")
    }
}

/// Ends `record`'s span (if sampled), with what the record says of the request.
pub fn finish(tracer: &Tracer, record: &Record) {
    let Some(span) = &record.span else { return };
    if !span.context.sampled {
        return;
    }
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
    let mut out = span.context.to_span(span_name(record), trace::span::SpanKind::Server, attributes);
    out.trace_state.clone_from(&span.trace_state);
    out.status = Some(trace::Status {
        message: if failed { record.reason.clone() } else { String::new() },
        code: if failed { trace::status::StatusCode::Error } else { trace::status::StatusCode::Unset } as i32,
    });
    tracer.export(out);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sampling_follows_the_parent_and_the_percent_for_new_traces() {
        // A collector that is never reached: only the decisions are looked at.
        let tracer = |percent| Tracer::new(Some("http://127.0.0.1:9"), percent, vec![]).unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse().unwrap());
        headers.insert("tracestate", "vendor=1".parse().unwrap());
        let never = tracer(0.0);
        let span = RequestSpan::start(&never, &headers, None).unwrap();
        assert!(span.context.sampled, "a sampled parent's trace is sampled whatever the percent");
        assert_eq!(span.context.parent_id, Some(*b"\x00\xf0\x67\xaa\x0b\xa9\x02\xb7"));
        assert_eq!(span.trace_state, "vendor=1");
        let upstream = TraceParent::parse(span.traceparent().to_str().unwrap()).unwrap();
        assert_eq!(
            (upstream.trace_id, upstream.parent_id, upstream.sampled),
            (span.context.trace_id, span.context.span_id, true)
        );
        headers.insert("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00".parse().unwrap());
        assert!(
            !RequestSpan::start(&tracer(100.0), &headers, None).unwrap().context.sampled,
            "an unsampled parent's trace is not"
        );
        let fresh = HeaderMap::new();
        assert!((0..100).all(|_| !RequestSpan::start(&never, &fresh, None).unwrap().context.sampled));
        let always = tracer(100.0);
        let roots: Vec<RequestSpan> = (0..100).map(|_| RequestSpan::start(&always, &fresh, None).unwrap()).collect();
        assert!(roots.iter().all(|s| s.context.sampled && s.context.parent_id.is_none()));
        let half = tracer(50.0);
        let sampled = (0..2000).filter(|_| RequestSpan::start(&half, &fresh, None).unwrap().context.sampled).count();
        assert!((800..1200).contains(&sampled), "{sampled} of 2000 at 50%");
        assert!(RequestSpan::start(&Tracer::new(None, 1.0, vec![]).unwrap(), &headers, None).is_none());
        // Without a traceparent of its own, a request is the child of its tunnel's span when
        // that is sampled.
        let tunnel = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let child = RequestSpan::start(&never, &fresh, TraceParent::parse(tunnel)).unwrap();
        assert_eq!(child.context.parent_id, Some(TraceParent::parse(tunnel).unwrap().parent_id));
        assert!(child.context.sampled);
        let unsampled = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
        let root = RequestSpan::start(&always, &fresh, TraceParent::parse(unsampled)).unwrap();
        assert!(root.context.parent_id.is_none() && root.context.sampled, "the waypoint's own decision");
        let own = RequestSpan::start(&never, &headers, TraceParent::parse(tunnel)).unwrap();
        assert_eq!(
            own.context.trace_id,
            TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap().trace_id,
            "the request's own traceparent first"
        );
        assert!(Tracer::new(None, 101.0, vec![]).is_err());
    }
}
