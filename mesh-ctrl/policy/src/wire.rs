//! Conversion between the policy domain types and their protobuf form in the config stream.
//! Converting from the wire validates again, so an agent never holds a policy it cannot read.

use ferrymesh_api::config as proto;

use crate::authn::{Jwks, JwtHeaderSpec, JwtRuleSpec, RequestAuthentication, RequestAuthenticationSpec};
use crate::spec::TargetRefSpec;
use crate::{
    Action, AuthorizationPolicy, Condition, ConditionKey, IpBlock, MtlsMode, Operation, PeerAuthentication, Rule,
    Source, TargetKind, TargetRef,
};

/// A policy from the wire that does not convert.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("policy {policy}: {message}")]
pub struct WireError {
    /// `namespace/name`.
    pub policy: String,
    /// What is wrong.
    pub message: String,
}

fn block_text(b: &IpBlock) -> String {
    format!("{}/{}", b.addr, b.prefix)
}

impl From<&AuthorizationPolicy> for proto::AuthorizationPolicy {
    fn from(p: &AuthorizationPolicy) -> Self {
        proto::AuthorizationPolicy {
            namespace: p.namespace.clone(),
            name: p.name.clone(),
            has_selector: p.selector.is_some(),
            selector: p.selector.clone().unwrap_or_default().into_iter().collect(),
            action: match p.action {
                Action::Allow => proto::authorization_policy::Action::Allow,
                Action::Deny => proto::authorization_policy::Action::Deny,
            } as i32,
            rules: p
                .rules
                .iter()
                .map(|r| proto::Rule {
                    from: r
                        .from
                        .iter()
                        .map(|s| proto::Source {
                            principals: s.principals.clone(),
                            not_principals: s.not_principals.clone(),
                            namespaces: s.namespaces.clone(),
                            not_namespaces: s.not_namespaces.clone(),
                            ip_blocks: s.ip_blocks.iter().map(block_text).collect(),
                            not_ip_blocks: s.not_ip_blocks.iter().map(block_text).collect(),
                            request_principals: s.request_principals.clone(),
                            not_request_principals: s.not_request_principals.clone(),
                        })
                        .collect(),
                    to: r
                        .to
                        .iter()
                        .map(|o| proto::Operation {
                            ports: o.ports.iter().map(u16::to_string).collect(),
                            not_ports: o.not_ports.iter().map(u16::to_string).collect(),
                            hosts: o.hosts.clone(),
                            not_hosts: o.not_hosts.clone(),
                            methods: o.methods.clone(),
                            not_methods: o.not_methods.clone(),
                            paths: o.paths.clone(),
                            not_paths: o.not_paths.clone(),
                        })
                        .collect(),
                    when: r
                        .when
                        .iter()
                        .map(|c| proto::Condition {
                            key: c.key.name(),
                            values: c.values.clone(),
                            not_values: c.not_values.clone(),
                        })
                        .collect(),
                    l7_fields: r.l7_fields.clone(),
                    unsupported_fields: r.unsupported_fields.clone(),
                })
                .collect(),
            target_refs: p
                .target_refs
                .iter()
                .map(|t| proto::TargetRef { kind: t.kind.as_str().into(), name: t.name.clone() })
                .collect(),
        }
    }
}

impl TryFrom<proto::AuthorizationPolicy> for AuthorizationPolicy {
    type Error = WireError;

    fn try_from(p: proto::AuthorizationPolicy) -> Result<Self, Self::Error> {
        let key = format!("{}/{}", p.namespace, p.name);
        let bad = |message: String| WireError { policy: key.clone(), message };
        let blocks = |v: &[String]| -> Result<Vec<IpBlock>, WireError> {
            v.iter().map(|b| IpBlock::parse(b).ok_or_else(|| bad(format!("bad IP block {b:?}")))).collect()
        };
        let ports = |v: &[String]| -> Result<Vec<u16>, WireError> {
            v.iter().map(|x| x.parse().map_err(|_| bad(format!("bad port {x:?}")))).collect()
        };
        let action = match proto::authorization_policy::Action::try_from(p.action) {
            Ok(proto::authorization_policy::Action::Allow) => Action::Allow,
            Ok(proto::authorization_policy::Action::Deny) => Action::Deny,
            Err(_) => return Err(bad(format!("unknown action {}", p.action))),
        };
        let mut rules = Vec::new();
        for r in p.rules {
            let mut from = Vec::new();
            for s in r.from {
                from.push(Source {
                    ip_blocks: blocks(&s.ip_blocks)?,
                    not_ip_blocks: blocks(&s.not_ip_blocks)?,
                    principals: s.principals,
                    not_principals: s.not_principals,
                    namespaces: s.namespaces,
                    not_namespaces: s.not_namespaces,
                    request_principals: s.request_principals,
                    not_request_principals: s.not_request_principals,
                });
            }
            let mut to = Vec::new();
            for o in r.to {
                to.push(Operation {
                    ports: ports(&o.ports)?,
                    not_ports: ports(&o.not_ports)?,
                    hosts: o.hosts,
                    not_hosts: o.not_hosts,
                    methods: o.methods,
                    not_methods: o.not_methods,
                    paths: o.paths,
                    not_paths: o.not_paths,
                });
            }
            let mut when = Vec::new();
            for c in r.when {
                let key = ConditionKey::parse(&c.key).ok_or_else(|| bad(format!("unknown condition key {}", c.key)))?;
                when.push(Condition { key, values: c.values, not_values: c.not_values });
            }
            rules.push(Rule { from, to, when, l7_fields: r.l7_fields, unsupported_fields: r.unsupported_fields });
        }
        let mut target_refs = Vec::new();
        for t in p.target_refs {
            let kind = match t.kind.as_str() {
                "Service" => TargetKind::Service,
                "Gateway" => TargetKind::Gateway,
                other => return Err(bad(format!("unknown targetRef kind {other}"))),
            };
            target_refs.push(TargetRef { kind, name: t.name });
        }
        Ok(AuthorizationPolicy {
            namespace: p.namespace,
            name: p.name,
            selector: p.has_selector.then(|| p.selector.into_iter().collect()),
            action,
            rules,
            target_refs,
        })
    }
}

impl From<&PeerAuthentication> for proto::PeerAuthentication {
    fn from(p: &PeerAuthentication) -> Self {
        use proto::peer_authentication::Mode;
        proto::PeerAuthentication {
            namespace: p.namespace.clone(),
            name: p.name.clone(),
            has_selector: p.selector.is_some(),
            selector: p.selector.clone().unwrap_or_default().into_iter().collect(),
            mode: match p.mode {
                MtlsMode::Unset => Mode::Unset,
                MtlsMode::Permissive => Mode::Permissive,
                MtlsMode::Strict => Mode::Strict,
                MtlsMode::Disable => Mode::Disable,
            } as i32,
        }
    }
}

impl TryFrom<proto::PeerAuthentication> for PeerAuthentication {
    type Error = WireError;

    fn try_from(p: proto::PeerAuthentication) -> Result<Self, Self::Error> {
        use proto::peer_authentication::Mode;
        let mode = match Mode::try_from(p.mode) {
            Ok(Mode::Unset) => MtlsMode::Unset,
            Ok(Mode::Permissive) => MtlsMode::Permissive,
            Ok(Mode::Strict) => MtlsMode::Strict,
            Ok(Mode::Disable) => MtlsMode::Disable,
            Err(_) => {
                return Err(WireError {
                    policy: format!("{}/{}", p.namespace, p.name),
                    message: format!("unknown mode {}", p.mode),
                })
            }
        };
        Ok(PeerAuthentication {
            namespace: p.namespace,
            name: p.name,
            selector: p.has_selector.then(|| p.selector.into_iter().collect()),
            mode,
        })
    }
}

impl From<&RequestAuthentication> for proto::RequestAuthentication {
    fn from(p: &RequestAuthentication) -> Self {
        proto::RequestAuthentication {
            namespace: p.namespace.clone(),
            name: p.name.clone(),
            target_refs: p
                .target_refs
                .iter()
                .map(|t| proto::TargetRef { kind: t.kind.as_str().into(), name: t.name.clone() })
                .collect(),
            jwt_rules: p
                .rules
                .iter()
                .map(|r| {
                    let (jwks_uri, jwks) = match &r.jwks {
                        Jwks::Uri(uri) => (uri.clone(), String::new()),
                        Jwks::Inline(text) => (String::new(), text.clone()),
                    };
                    proto::JwtRule {
                        issuer: r.issuer.clone(),
                        audiences: r.audiences.clone(),
                        jwks_uri,
                        jwks,
                        from_headers: r
                            .from_headers
                            .iter()
                            .map(|h| proto::JwtHeader { name: h.name.clone(), prefix: h.prefix.clone() })
                            .collect(),
                        from_params: r.from_params.clone(),
                        forward_original_token: r.forward_original_token,
                        output_payload_to_header: r.output_payload_to_header.clone().unwrap_or_default(),
                    }
                })
                .collect(),
        }
    }
}

impl TryFrom<proto::RequestAuthentication> for RequestAuthentication {
    type Error = WireError;

    /// Through its spec form, validated again as mesh-ctrl validated it.
    fn try_from(p: proto::RequestAuthentication) -> Result<Self, Self::Error> {
        let text = |s: String| Some(s).filter(|s| !s.is_empty());
        let spec = RequestAuthenticationSpec {
            selector: None,
            target_ref: None,
            target_refs: Some(
                p.target_refs
                    .into_iter()
                    .map(|t| TargetRefSpec {
                        group: if t.kind == "Gateway" { "gateway.networking.k8s.io".into() } else { String::new() },
                        kind: t.kind,
                        name: t.name,
                    })
                    .collect(),
            ),
            jwt_rules: p
                .jwt_rules
                .into_iter()
                .map(|r| JwtRuleSpec {
                    issuer: r.issuer,
                    audiences: r.audiences,
                    jwks_uri: text(r.jwks_uri),
                    jwks: text(r.jwks),
                    from_headers: r
                        .from_headers
                        .into_iter()
                        .map(|h| JwtHeaderSpec { name: h.name, prefix: h.prefix })
                        .collect(),
                    from_params: r.from_params,
                    forward_original_token: r.forward_original_token,
                    output_payload_to_header: text(r.output_payload_to_header),
                })
                .collect(),
        };
        spec.validate(&p.namespace, &p.name)
            .map_err(|e| WireError { policy: format!("{}/{}", p.namespace, p.name), message: e.to_string() })
    }
}
