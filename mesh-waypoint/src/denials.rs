//! The endpoints' own DENY policies, applied to the original client. The agent of an endpoint
//! behind the waypoint sees the waypoint as the client: a DENY of the endpoint's that names its
//! clients (principals, namespaces, ipBlocks) would never match there, and fail open for every
//! client that goes through a waypoint. So the waypoint applies those rules itself, with the
//! client's proven identity and address ([`ferrymesh_policy::PolicySet::denied_at_waypoint`]):
//! a request never goes to an endpoint that denies its client, and with no endpoint left it is
//! answered 403 naming the policy. Istio leaves this gap open; ferrymesh closes it.

use std::net::IpAddr;

use ferrymesh_dataplane::state::Workload;
use ferrymesh_policy::{Decision, Request};

use crate::listener::{Downstream, Waypoint};
use crate::upstream::To;

/// What the endpoints of a request's destination say of its client.
#[derive(Debug, Default)]
pub struct Denials {
    /// Endpoints whose own DENY policies refuse the client: no attempt goes to them.
    pub endpoints: Vec<IpAddr>,
    /// Set when every ready endpoint refuses the client: one of their decisions.
    pub all: Option<Decision>,
}

/// The denials of `to`'s ready endpoints (on their ports for the request's port) for `down`'s
/// client.
pub fn of(waypoint: &Waypoint, down: &Downstream, to: &To) -> Denials {
    let policies = waypoint.state.policies();
    let denies = |workload: &Workload, ip: IpAddr, port: u16| {
        if !workload.captured {
            return None;
        }
        let labels = &workload.labels;
        let w = ferrymesh_policy::Workload { namespace: &workload.namespace, labels };
        let request = Request {
            source_ip: down.addr.ip(),
            source: down.spiffe_id.as_ref(),
            destination_ip: ip,
            destination_port: port,
        };
        policies.denied_at_waypoint(&w, &request)
    };
    let mut denials = Denials::default();
    let mut ready = 0;
    let mut last = None;
    let mut judge = |ip: IpAddr, port: u16| {
        ready += 1;
        if let Some(decision) = waypoint.state.workload_by_ip(ip).and_then(|w| denies(&w, ip, port)) {
            denials.endpoints.push(ip);
            last = Some(decision);
        }
    };
    match to {
        To::Service(service, port) => {
            for e in service.endpoints.iter().filter(|e| e.ready) {
                if let Some(target) = e.target_ports.get(port) {
                    judge(e.ip, *target);
                }
            }
        }
        To::Endpoint(endpoint) => judge(endpoint.ip(), endpoint.port()),
    }
    if ready > 0 && denials.endpoints.len() == ready {
        denials.all = last;
    }
    denials
}
