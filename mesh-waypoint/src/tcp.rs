//! A connection the waypoint relays at L4, not as HTTP: one to a Service port declared opaque
//! (`appProtocol: tcp`, a `tcp-` port name, ...; mesh-ctrl resolves it) or whose first bytes are
//! not HTTP ([`crate::listener`] tells). The policies attached to the Service or the waypoint
//! decide at L4 (`PolicySet::authorize_connection`), then the endpoints' own DENY policies for
//! the original client ([`crate::denials`]); an allowed connection goes to one endpoint
//! picked for it (another tried when one cannot be reached), over HBONE with the waypoint's
//! identity, and is copied both ways until either side ends. A refused one is reset. Each
//! connection is one record (protocol `TCP`, with its byte counts).

use std::net::SocketAddr;

use ferrymesh_dataplane::hbone::stream::H2Stream;

use crate::listener::{Destination, Downstream, Waypoint};
use crate::record::Record;
use crate::upstream::{To, UpstreamError};

/// Relays `stream`, from `down`, at L4.
pub async fn relay(waypoint: &Waypoint, down: &Downstream, mut stream: H2Stream) {
    let mut record = Record::connection(&waypoint.key, down);
    let decision = waypoint.state.policies().authorize_connection(&down.policy_target(waypoint), &down.connection());
    record.policy.clone_from(&decision.policy);
    if !decision.allowed {
        record.response_flags = "DENY";
        record.reason = format!("denied: {}", decision.policy);
        stream.reset(h2::Reason::REFUSED_STREAM);
        return waypoint.log.write_with(|| record.to_line());
    }
    let to = match &down.dest {
        Destination::Service(service, _) => {
            record.backend = format!("{}/{}:{}", service.namespace, service.name, down.port);
            To::Service(service.clone(), down.port)
        }
        Destination::Workload(workload) => To::Endpoint(SocketAddr::new(workload.ip, down.port)),
    };
    // The endpoints' own DENY policies, for the original client (see crate::denials).
    let denials = crate::denials::of(waypoint, down, &to);
    if let Some(denied) = denials.all {
        record.policy.clone_from(&denied.policy);
        record.response_flags = "DENY";
        record.reason = format!("denied: {}", denied.policy);
        stream.reset(h2::Reason::REFUSED_STREAM);
        return waypoint.log.write_with(|| record.to_line());
    }
    match waypoint.upstream.connect(&to, down.client_namespace(), &denials.endpoints).await {
        Ok((mut upstream, endpoint, _active)) => {
            record.upstream = endpoint.to_string();
            match tokio::io::copy_bidirectional(&mut stream, &mut upstream).await {
                Ok(bytes) => record.bytes = Some(bytes),
                Err(e) => {
                    record.response_flags = "UC";
                    record.reason = format!("the relayed connection failed: {e}");
                }
            }
        }
        Err(e) => {
            record.response_flags = match &e {
                UpstreamError::NoEndpoint { .. } => "UH",
                _ => "UF",
            };
            record.reason = e.to_string();
            stream.reset(h2::Reason::CONNECT_ERROR);
        }
    }
    waypoint.log.write_with(|| record.to_line());
}
