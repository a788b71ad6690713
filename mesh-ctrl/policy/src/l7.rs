//! Authorization of one HTTP request at a waypoint, with Istio's semantics for policies
//! attached by `targetRefs`: the policies of the Service's namespace that name the Service, or
//! the waypoint's Gateway, apply; any matching DENY rule denies; else, when ALLOW policies
//! apply, one of their rules must match. Every field of a rule is evaluated here: the source
//! (the client's identity, as the HBONE peer proved it, and address, and the request principal
//! of its verified JWT), the operation (ports, hosts, methods, paths, and their negations) and
//! the conditions (L4 keys, `request.headers[...]` and `request.auth.*`). A field no layer
//! evaluates makes an ALLOW rule match nothing and is ignored by a DENY rule, as at L4.

use http::HeaderMap;

use crate::authn::RequestAuth;
use crate::{
    any_match, field, not_field, string_match, Action, AuthorizationPolicy, Condition, ConditionKey, Decision,
    Operation, PolicySet, Request, Rule, Source, Step, TargetKind, TargetRef,
};

/// What a request at a waypoint is addressed to.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// The namespace of the Service or workload addressed.
    pub namespace: &'a str,
    /// The Service's name; None for traffic addressed to a workload (only policies attached to
    /// the waypoint's Gateway apply to it).
    pub service: Option<&'a str>,
    /// `namespace/name` of the waypoint's Gateway.
    pub gateway: (&'a str, &'a str),
}

/// One HTTP request as policies see it.
#[derive(Debug)]
pub struct HttpRequest<'a> {
    /// The connection's part: client address and identity, Service VIP and port.
    pub l4: Request<'a>,
    /// `Host` / `:authority`.
    pub host: &'a str,
    /// Method.
    pub method: &'a str,
    /// Path, without the query.
    pub path: &'a str,
    /// Headers.
    pub headers: &'a HeaderMap,
    /// The request's verified JWT (`request.auth.*`), if it carried one.
    pub auth: Option<&'a RequestAuth>,
}

/// Whether a policy of `namespace` with `target_refs` is attached to `target` (its Service or
/// its waypoint's Gateway).
pub(crate) fn attached(namespace: &str, target_refs: &[TargetRef], target: &Target<'_>) -> bool {
    target_refs.iter().any(|t| match t.kind {
        TargetKind::Service => namespace == target.namespace && Some(t.name.as_str()) == target.service,
        TargetKind::Gateway => namespace == target.gateway.0 && t.name == target.gateway.1,
    })
}

impl AuthorizationPolicy {
    /// Whether the policy is attached to `target` (its Service or its waypoint's Gateway).
    pub fn targets(&self, target: &Target<'_>) -> bool {
        attached(&self.namespace, &self.target_refs, target)
    }
}

/// Istio host matching: case-insensitive, against the host with and without its port.
fn host_matches(patterns: &[String], host: &str) -> bool {
    let host = host.to_ascii_lowercase();
    let bare = host.rsplit_once(':').filter(|(_, port)| port.parse::<u16>().is_ok()).map(|(h, _)| h);
    patterns.iter().any(|p| {
        let p = p.to_ascii_lowercase();
        string_match(&p, &host) || bare.is_some_and(|b| string_match(&p, b))
    })
}

impl Operation {
    fn matches_l7(&self, r: &HttpRequest<'_>) -> bool {
        let port = r.l4.destination_port;
        (self.ports.is_empty() || self.ports.contains(&port))
            && !self.not_ports.contains(&port)
            && (self.hosts.is_empty() || host_matches(&self.hosts, r.host))
            && !host_matches(&self.not_hosts, r.host)
            && field(&self.methods, Some(r.method))
            && not_field(&self.not_methods, Some(r.method))
            && field(&self.paths, Some(r.path))
            && not_field(&self.not_paths, Some(r.path))
    }
}

impl Source {
    fn matches_l7(&self, r: &HttpRequest<'_>) -> bool {
        let principal = r.auth.map(|a| a.principal.as_str());
        self.matches(&r.l4)
            && field(&self.request_principals, principal)
            && not_field(&self.not_request_principals, principal)
    }
}

/// The values of claim `path` in `claims`: a string, each string of a list, or another value's
/// JSON text; none when it is absent.
fn claim_values(claims: &serde_json::Map<String, serde_json::Value>, path: &[String]) -> Vec<String> {
    let Some((first, rest)) = path.split_first() else { return Vec::new() };
    let mut value = claims.get(first);
    for name in rest {
        value = value.and_then(|v| v.get(name));
    }
    let text = |v: &serde_json::Value| v.as_str().map_or_else(|| v.to_string(), str::to_string);
    match value {
        None | Some(serde_json::Value::Null) => Vec::new(),
        Some(serde_json::Value::Array(items)) => items.iter().map(text).collect(),
        Some(other) => vec![text(other)],
    }
}

/// The values a `request.headers[name]` condition sees: every value of the header (bytes past
/// ASCII read as UTF-8, never as an absent header) and, when it is repeated, the values joined
/// with `,` as Envoy matches them. So a second value can neither dodge a DENY nor a `notValues`,
/// whichever value the backend reads; an ALLOW may match either (the client sets both anyway).
fn header_values(headers: &HeaderMap, name: &str) -> Vec<String> {
    let mut values: Vec<String> =
        headers.get_all(name).iter().map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()).collect();
    if values.len() > 1 {
        values.push(values.join(","));
    }
    values
}

impl Condition {
    fn matches_l7(&self, r: &HttpRequest<'_>) -> bool {
        // The attribute's values: a condition holds when one matches `values` and none matches
        // `notValues` (an absent attribute matches no value).
        let values: Vec<String> = match &self.key {
            ConditionKey::RequestHeader(name) => header_values(r.headers, name),
            ConditionKey::RequestPrincipal => r.auth.map(|a| a.principal.clone()).into_iter().collect(),
            ConditionKey::RequestAudiences => r.auth.map(|a| a.audiences.clone()).unwrap_or_default(),
            ConditionKey::RequestPresenter => r.auth.and_then(|a| a.presenter.clone()).into_iter().collect(),
            ConditionKey::RequestClaim(path) => r.auth.map(|a| claim_values(&a.claims, path)).unwrap_or_default(),
            _ => return self.matches(&r.l4),
        };
        let matches = |patterns: &[String]| values.iter().any(|v| any_match(patterns, Some(v)));
        (self.values.is_empty() || matches(&self.values)) && !matches(&self.not_values)
    }
}

impl Rule {
    fn matches_l7(&self, r: &HttpRequest<'_>) -> bool {
        (self.from.is_empty() || self.from.iter().any(|s| s.matches_l7(r)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches_l7(r)))
            && self.when.iter().all(|c| c.matches_l7(r))
    }
}

impl PolicySet {
    /// The policies attached to `target`, in name order.
    pub fn targeting<'s>(&'s self, target: &Target<'_>) -> Vec<&'s AuthorizationPolicy> {
        let mut out: Vec<&AuthorizationPolicy> = [target.namespace, target.gateway.0]
            .iter()
            .filter_map(|ns| self.authz_by_namespace.get(*ns))
            .flat_map(|n| n.policies.iter())
            .filter(|p| p.targets(target))
            .collect();
        out.sort_by_key(|p| p.key());
        out.dedup_by_key(|p| p.key());
        out
    }

    /// Decides whether connection `r` to `target` passes the waypoint when it relays it as
    /// opaque TCP (no request to look into): the attached policies decide at L4, as the agent's
    /// do (a DENY rule's HTTP fields are ignored, broadening it; an ALLOW rule with HTTP fields
    /// matches no TCP connection), so HTTP-only rules never let a TCP connection through.
    pub fn authorize_connection(&self, target: &Target<'_>, r: &crate::Request<'_>) -> Decision {
        crate::decide_l4(&self.targeting(target), r, None, "are attached to this Service or its waypoint")
    }

    /// Decides whether request `r` to `target` passes the waypoint.
    pub fn authorize_request(&self, target: &Target<'_>, r: &HttpRequest<'_>) -> Decision {
        self.authorize_request_traced(target, r, None)
    }

    /// [`Self::authorize_request`] with the steps that led to it (for `meshctl explain`).
    pub fn explain_request(&self, target: &Target<'_>, r: &HttpRequest<'_>) -> (Decision, Vec<Step>) {
        let mut steps = Vec::new();
        let decision = self.authorize_request_traced(target, r, Some(&mut steps));
        (decision, steps)
    }

    fn authorize_request_traced(
        &self,
        target: &Target<'_>,
        r: &HttpRequest<'_>,
        mut trace: Option<&mut Vec<Step>>,
    ) -> Decision {
        let mut step = |what: String, outcome: String| {
            if let Some(steps) = trace.as_deref_mut() {
                steps.push(Step { what, outcome });
            }
        };
        let attached = self.targeting(target);
        for p in attached.iter().filter(|p| p.action == Action::Deny) {
            // A DENY rule ignores the fields no layer evaluates: broader, never narrower.
            if let Some(i) = p.rules.iter().position(|rule| rule.matches_l7(r)) {
                step(format!("DENY {}", p.key()), format!("rule {i} matches: denied"));
                return Decision {
                    allowed: false,
                    policy: format!("{} rule {i}", p.key()),
                    hint: format!("DENY {} rule {i} matches: narrow or remove that rule to allow it", p.key()),
                };
            }
            step(format!("DENY {}", p.key()), "no rule matches".into());
        }
        let allows: Vec<&&AuthorizationPolicy> = attached.iter().filter(|p| p.action == Action::Allow).collect();
        if allows.is_empty() {
            step("ALLOW".into(), "no ALLOW policy is attached: allowed".into());
            return Decision { allowed: true, policy: String::new(), hint: String::new() };
        }
        for p in &allows {
            for (i, rule) in p.rules.iter().enumerate() {
                if !rule.unsupported_fields.is_empty() {
                    let fields = rule.unsupported_fields.join(", ");
                    step(
                        format!("ALLOW {}", p.key()),
                        format!("rule {i} uses fields the mesh does not evaluate ({fields})"),
                    );
                } else if rule.matches_l7(r) {
                    step(format!("ALLOW {}", p.key()), format!("rule {i} matches: allowed"));
                    return Decision { allowed: true, policy: format!("{} rule {i}", p.key()), hint: String::new() };
                }
            }
            step(format!("ALLOW {}", p.key()), "no rule matches".into());
        }
        let considered: Vec<String> = allows.iter().map(|p| p.key()).collect();
        step("ALLOW".into(), "ALLOW policies are attached and none matched: denied".into());
        Decision {
            allowed: false,
            policy: format!("no ALLOW policy matched (considered: {})", considered.join(", ")),
            hint: format!(
                "ALLOW policies are attached to this Service or its waypoint and none matches: add a rule to one \
                 of them ({}) that matches this request",
                considered.join(", ")
            ),
        }
    }
}
