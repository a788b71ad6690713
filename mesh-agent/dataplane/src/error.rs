//! Why a proxied connection did not end normally, as one enum: each variant gives the flow's
//! verdict, the `response_flags` label of the `ferrymesh_tcp_*` metrics, the operator-facing
//! reason (its `Display`, the flow's `reason`) and the hint that fixes it (the flow's `hint`).
//! A proxy records what happened by its variant; it never writes a verdict or a reason string
//! of its own. The reasons are a contract (tests, dashboards and runbooks match them): change
//! a message only on purpose.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ferrymesh_spiffe::SpiffeIdError;

use crate::flows::Verdict;
use crate::hbone::client::HboneError;
use crate::hbone::server::{BadConnect, Http2Closed};
use crate::identity::IdentityError;
use crate::limits::Refusal;

/// A policy's refusal of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    /// What the policy decided, for the flow's `reason` (`denied: shop/deny rule 0`).
    pub reason: String,
    /// For the flow's `policy`: the deciding policy and rule, or why none allowed.
    pub policy: String,
    /// What would allow it, for the flow's `hint`.
    pub hint: String,
}

/// Why a connection was refused, failed or was cut.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProxyError {
    /// A connection reached the outbound listener without having been captured.
    #[error("original destination unknown: the connection reached 15001 without being captured")]
    NotCaptured,
    /// A workload's namespace and service account make no SPIFFE ID.
    #[error("no identity for {workload}: {error}")]
    NoIdentity {
        /// `namespace/service account`.
        workload: String,
        /// Why the ID is invalid.
        error: SpiffeIdError,
    },
    /// The source's certificate could not be had.
    #[error("{0}")]
    Certificate(IdentityError),
    /// No trust bundle has arrived from mesh-ctrl.
    #[error("no trust bundle from mesh-ctrl yet")]
    NoTrustBundle,
    /// A plain TCP dial to the destination failed.
    #[error("connect to {target} failed: {error}")]
    Connect {
        /// The destination.
        target: SocketAddr,
        /// What the dial returned.
        error: Arc<io::Error>,
    },
    /// The HBONE tunnel to the destination's agent could not be opened (a 401 is its policy's
    /// refusal).
    #[error("{0}")]
    Tunnel(Arc<HboneError>),
    /// The client addressed a service port the service does not have.
    #[error("service {service} has no port {port}")]
    NoServicePort {
        /// `namespace/name`.
        service: String,
        /// The port.
        port: u16,
    },
    /// The service has no ready endpoint for the port in the family of the VIP connected to (a
    /// dual-stack Service's IPv6 VIP leads only to IPv6 endpoints).
    #[error("service {service} has no ready {family} endpoint for port {port}")]
    NoReadyEndpoint {
        /// `namespace/name`.
        service: String,
        /// The port.
        port: u16,
        /// `IPv4` or `IPv6`.
        family: &'static str,
    },
    /// The service or workload is bound to a waypoint that has no ready address (or does not
    /// exist): the connection is refused, never sent around the waypoint (fail closed).
    #[error("{kind} {name} is bound to waypoint {waypoint}, which has no ready address")]
    NoWaypoint {
        /// `service` or `workload`.
        kind: &'static str,
        /// `namespace/name`.
        name: String,
        /// `namespace/name` of its waypoint.
        waypoint: String,
    },
    /// One endpoint of a service failed; another is tried.
    #[error("endpoint attempt {attempt} of {attempts} failed: {error}")]
    EndpointAttempt {
        /// 1-based.
        attempt: usize,
        /// How many endpoints one connection may try.
        attempts: usize,
        /// Why this one failed.
        error: Box<ProxyError>,
    },
    /// Every endpoint tried failed.
    #[error("service {service}: no endpoint reachable after {tried} attempts, last: {last}")]
    NoEndpointReachable {
        /// `namespace/name`.
        service: String,
        /// Endpoints tried.
        tried: usize,
        /// Why the last one failed.
        last: Box<ProxyError>,
    },
    /// The destination's policy refused the connection.
    #[error("{}", .0.reason)]
    Denied(Denied),
    /// A policy change denied the connection while it was open.
    #[error("closed after a policy change: {}", .0.reason)]
    Revoked(Denied),
    /// A side failed or reset the connection while bytes were relayed.
    #[error("connection aborted: {0}")]
    Aborted(Arc<io::Error>),
    /// The inbound connection targets a port the mesh itself uses.
    #[error("port {0} is reserved for the mesh")]
    ReservedPort(u16),
    /// An inbound limit refused the connection or stream.
    #[error("{0}")]
    Limited(Refusal),
    /// The client did not finish its TLS handshake in time.
    #[error("TLS handshake did not finish within {0:?} (--hbone-handshake-timeout)")]
    HandshakeTimeout(Duration),
    /// The client's TLS handshake failed.
    #[error("TLS handshake failed: {0}")]
    Handshake(String),
    /// The client did not negotiate HTTP/2.
    #[error("the client did not negotiate ALPN h2")]
    NoAlpnH2,
    /// The HTTP/2 connection ended on a protocol error.
    #[error("{}", .0.reason)]
    Http2(Http2Closed),
    /// A stream's request is not a valid CONNECT; it was answered with the status.
    #[error("{status} {0}", status = .0.status().as_u16())]
    BadConnect(BadConnect),
    /// The app could not be dialled at the destination.
    #[error("connect to the app at {target} failed: {error}")]
    AppDial {
        /// The app's address.
        target: SocketAddr,
        /// What the dial returned.
        error: Arc<io::Error>,
    },
    /// The client left before its CONNECT was answered.
    #[error("the client went away before the CONNECT was answered")]
    ClientGone,
}

impl ProxyError {
    /// The flow verdict: a policy's refusal is `denied`, everything else an `error`.
    pub fn verdict(&self) -> Verdict {
        match self {
            ProxyError::Denied(_) | ProxyError::Revoked(_) => Verdict::Denied,
            ProxyError::Tunnel(e) if matches!(**e, HboneError::Refused(401)) => Verdict::Denied,
            ProxyError::EndpointAttempt { error, .. } => error.verdict(),
            _ => Verdict::Error,
        }
    }

    /// Whether the connection may be tried on another endpoint or waypoint address: not after a
    /// policy's refusal (it is the answer), nor once the destination may have received the
    /// client's bytes.
    pub fn retryable(&self) -> bool {
        match self {
            ProxyError::Tunnel(e) => self.verdict() != Verdict::Denied && e.retryable(),
            _ => self.verdict() != Verdict::Denied,
        }
    }

    /// The `response_flags` label of the connection's metrics (Istio's label; ztunnel's values):
    /// `DENY` for a policy's refusal, `CONNECT_FAILED` for any other failure.
    pub fn response_flags(&self) -> &'static str {
        match self.verdict() {
            Verdict::Denied => "DENY",
            _ => "CONNECT_FAILED",
        }
    }

    /// What an operator can do about it, when there is something to say beyond the reason.
    pub fn hint(&self) -> Option<String> {
        let hint = match self {
            ProxyError::NotCaptured => {
                "something connected to the agent's 15001 listener directly; only connections the eBPF \
                 hooks capture have a destination (check `meshctl status` shows the programs attached)"
                    .to_string()
            }
            ProxyError::NoIdentity { .. } => {
                "the namespace or service account name is not a valid SPIFFE path segment: rename it".into()
            }
            ProxyError::Certificate(_) | ProxyError::NoTrustBundle => {
                "the agent has no certificate or trust bundle from mesh-ctrl: `meshctl status` shows the \
                 mesh-ctrl link and the last certificate error"
                    .into()
            }
            ProxyError::Connect { target, .. } => format!(
                "nothing accepted the connection: check that something listens on {target} and that the \
                 pod can reach it"
            ),
            ProxyError::Tunnel(e) => return tunnel_hint(e),
            ProxyError::NoServicePort { .. } => "connect to one of the ports the Service declares".into(),
            ProxyError::NoReadyEndpoint { service, family, .. } => format!(
                "`meshctl services` shows {service}'s endpoints: check its selector matches ready pods with an \
                 {family} address"
            ),
            ProxyError::NoWaypoint { kind, name, waypoint } => format!(
                "deploy waypoint {waypoint} (a Gateway of class ferrymesh-waypoint and its ready pods), or \
                 label {kind} {name} ferrymesh.io/use-waypoint=none to send it directly"
            ),
            ProxyError::EndpointAttempt { error, .. } => return error.hint(),
            ProxyError::NoEndpointReachable { last, .. } => return last.hint(),
            ProxyError::Denied(d) | ProxyError::Revoked(d) => d.hint.clone(),
            ProxyError::Aborted(_) | ProxyError::ClientGone => return None,
            ProxyError::ReservedPort(_) => {
                "ports 15001, 15006, 15008, 15020 and 15021 belong to the mesh: serve the app on another port".into()
            }
            ProxyError::Limited(Refusal::OutboundPerPod(_) | Refusal::Outbound(_)) => {
                "the pod (or all pods of its node) holds as many outbound connections as the limit allows: a \
                 connection leak or flood in the app, or real load; for real load, raise the flag named on this \
                 node's agent"
                    .into()
            }
            ProxyError::Limited(_) => {
                "one peer (or all peers of this pod) holds as much as the limit allows: a flood, or real load; \
                 for real load, raise the flag named on the destination's agent"
                    .into()
            }
            ProxyError::HandshakeTimeout(_) => {
                "the client connected and did not finish TLS in time: a stalled or hostile peer, or a very slow \
                 network (then raise --hbone-handshake-timeout)"
                    .into()
            }
            ProxyError::Handshake(_) => {
                "the client is not a mesh peer with a certificate this mesh's CA signed (compare the trust \
                 bundles in `meshctl status` on both nodes)"
                    .into()
            }
            ProxyError::NoAlpnH2 | ProxyError::BadConnect(_) => {
                "the client is not an HBONE client: only mesh agents and waypoints speak to 15008".into()
            }
            ProxyError::Http2(closed) if closed.by_server => {
                "the client broke HTTP/2's rules (rapid resets, oversized headers, malformed frames): \
                 counted in ferrymesh_inbound_refused_total{limit=\"http2_protocol\"}"
                    .into()
            }
            ProxyError::Http2(_) => return None,
            ProxyError::AppDial { target, .. } => format!(
                "the app does not accept connections on {}: check it listens on the pod IP (not only \
                 127.0.0.1) and on that port",
                target.port()
            ),
        };
        Some(hint)
    }
}

/// What to do about a tunnel that could not be opened.
fn tunnel_hint(e: &HboneError) -> Option<String> {
    Some(match e {
        HboneError::Connect(ip, _) => {
            format!("the destination's agent did not accept on {ip}:15008: check it runs and 15008 is allowed")
        }
        HboneError::Tls(ip, _) => format!(
            "{ip} did not prove the expected identity with a certificate of this mesh: compare the trust \
             bundles in `meshctl status` on both nodes"
        ),
        HboneError::Http2(..) => return None,
        HboneError::Interrupted(ip, _) => format!(
            "the connection to {ip}:15008 broke while the tunnel opened; the client's first bytes may have \
             reached the app, so no other endpoint was tried: the client may retry"
        ),
        HboneError::Refused(401) => {
            "the destination's policy denied it: its agent's inbound flow (`meshctl flows`) and `meshctl \
             explain` name the policy"
                .into()
        }
        HboneError::Refused(_) => {
            "the destination's agent could not serve the tunnel: its inbound flow (`meshctl flows`) says why".into()
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn denied() -> Denied {
        Denied {
            reason: "denied: shop/deny-a rule 0".into(),
            policy: "shop/deny-a rule 0".into(),
            hint: "DENY shop/deny-a rule 0 matches: narrow or remove that rule to allow it".into(),
        }
    }

    fn refused(status: u16) -> ProxyError {
        ProxyError::Tunnel(Arc::new(HboneError::Refused(status)))
    }

    /// Every variant's verdict, metric flag and reason: the flow contract, in one table.
    #[test]
    fn each_error_gives_its_verdict_flag_and_reason() {
        let target: SocketAddr = "10.244.2.2:8080".parse().unwrap();
        let refused_conn = || Arc::new(io::Error::from(io::ErrorKind::ConnectionRefused));
        let cases: Vec<(ProxyError, Verdict, &str, &str)> = vec![
            (
                ProxyError::NotCaptured,
                Verdict::Error,
                "CONNECT_FAILED",
                "original destination unknown: the connection reached 15001 without being captured",
            ),
            (ProxyError::Denied(denied()), Verdict::Denied, "DENY", "denied: shop/deny-a rule 0"),
            (
                ProxyError::Revoked(denied()),
                Verdict::Denied,
                "DENY",
                "closed after a policy change: denied: shop/deny-a rule 0",
            ),
            (refused(401), Verdict::Denied, "DENY", "destination refused the tunnel: HTTP 401"),
            (refused(503), Verdict::Error, "CONNECT_FAILED", "destination refused the tunnel: HTTP 503"),
            (
                ProxyError::EndpointAttempt { attempt: 1, attempts: 3, error: Box::new(refused(503)) },
                Verdict::Error,
                "CONNECT_FAILED",
                "endpoint attempt 1 of 3 failed: destination refused the tunnel: HTTP 503",
            ),
            (
                ProxyError::NoEndpointReachable { service: "shop/web".into(), tried: 2, last: Box::new(refused(503)) },
                Verdict::Error,
                "CONNECT_FAILED",
                "service shop/web: no endpoint reachable after 2 attempts, last: destination refused the tunnel: HTTP 503",
            ),
            (
                ProxyError::NoReadyEndpoint { service: "shop/web".into(), port: 80, family: "IPv6" },
                Verdict::Error,
                "CONNECT_FAILED",
                "service shop/web has no ready IPv6 endpoint for port 80",
            ),
            (
                ProxyError::NoWaypoint {
                    kind: "service",
                    name: "shop/web".into(),
                    waypoint: "shop/shop-waypoint".into(),
                },
                Verdict::Error,
                "CONNECT_FAILED",
                "service shop/web is bound to waypoint shop/shop-waypoint, which has no ready address",
            ),
            (
                ProxyError::NoWaypoint {
                    kind: "workload",
                    name: "shop/web-1".into(),
                    waypoint: "shop/shop-waypoint".into(),
                },
                Verdict::Error,
                "CONNECT_FAILED",
                "workload shop/web-1 is bound to waypoint shop/shop-waypoint, which has no ready address",
            ),
            (
                ProxyError::BadConnect(BadConnect::ReservedPort(15006)),
                Verdict::Error,
                "CONNECT_FAILED",
                "503 port 15006 is reserved for the mesh",
            ),
            (
                ProxyError::BadConnect(BadConnect::Authority(Some("shop-c:8080".into()))),
                Verdict::Error,
                "CONNECT_FAILED",
                "400 CONNECT authority Some(\"shop-c:8080\") is not ip:port",
            ),
            (
                ProxyError::Limited(Refusal::SourceConnections(512, [10, 244, 1, 2].into())),
                Verdict::Error,
                "CONNECT_FAILED",
                "refused: 512 connections already open from 10.244.1.2 (--max-connections-per-source)",
            ),
            (
                ProxyError::HandshakeTimeout(Duration::from_secs(2)),
                Verdict::Error,
                "CONNECT_FAILED",
                "TLS handshake did not finish within 2s (--hbone-handshake-timeout)",
            ),
            (
                ProxyError::AppDial { target, error: refused_conn() },
                Verdict::Error,
                "CONNECT_FAILED",
                "connect to the app at 10.244.2.2:8080 failed: connection refused",
            ),
            (
                ProxyError::Connect { target, error: refused_conn() },
                Verdict::Error,
                "CONNECT_FAILED",
                "connect to 10.244.2.2:8080 failed: connection refused",
            ),
        ];
        for (error, verdict, flags, reason) in cases {
            assert_eq!((error.verdict(), error.response_flags(), error.to_string().as_str()), (verdict, flags, reason));
        }
    }

    /// Only a failure that proves the client's bytes reached no app may be tried elsewhere.
    #[test]
    fn only_failures_before_any_delivery_are_retried() {
        let interrupted =
            |reason| ProxyError::Tunnel(Arc::new(HboneError::Interrupted([10, 244, 2, 2].into(), reason)));
        let broken = interrupted(h2::Error::from(h2::Reason::INTERNAL_ERROR));
        assert_eq!((broken.verdict(), broken.retryable()), (Verdict::Error, false));
        assert_eq!(
            broken.to_string(),
            "HTTP/2 to 10.244.2.2 failed after the client's first bytes were sent: \
             protocol error: unexpected internal error encountered"
        );
        assert!(broken.hint().unwrap().contains("no other endpoint was tried"), "{:?}", broken.hint());
        assert!(refused(503).retryable());
        assert!(!refused(401).retryable());
        assert!(!ProxyError::Denied(denied()).retryable());
        let dial =
            ProxyError::Connect { target: "10.244.2.2:80".parse().unwrap(), error: Arc::new(io::Error::other("x")) };
        assert!(dial.retryable());
    }

    /// A refusal says what fixes it; the hint of a wrapped error is the wrapped one's.
    #[test]
    fn refusals_carry_the_hint_that_fixes_them() {
        assert_eq!(ProxyError::Denied(denied()).hint(), Some(denied().hint));
        assert!(refused(401).hint().unwrap().contains("meshctl explain"));
        let attempt = ProxyError::EndpointAttempt { attempt: 1, attempts: 3, error: Box::new(refused(401)) };
        assert_eq!(attempt.hint(), refused(401).hint());
        let app = ProxyError::AppDial {
            target: "10.244.2.2:9090".parse().unwrap(),
            error: Arc::new(io::Error::from(io::ErrorKind::ConnectionRefused)),
        };
        assert!(app.hint().unwrap().contains("on 9090"), "{:?}", app.hint());
        let by_server = Http2Closed { by_server: true, reason: "HTTP/2 connection closed by the server".into() };
        assert!(ProxyError::Http2(by_server).hint().unwrap().contains("http2_protocol"));
        let by_client = Http2Closed { by_server: false, reason: "HTTP/2 connection closed by the client".into() };
        assert_eq!(ProxyError::Http2(by_client).hint(), None, "a client leaving is nothing to fix");
    }
}
