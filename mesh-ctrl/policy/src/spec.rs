//! The YAML form of the ferrymesh.io/v1alpha1 policies (Istio's field names), and its
//! validation into the domain types. Every error names the field by its path under `spec`.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{
    Action, AuthorizationPolicy, Condition, ConditionKey, IpBlock, MtlsMode, Operation, PeerAuthentication, Rule,
    Source, TargetKind, TargetRef,
};

/// A field that failed validation.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("field {field}: {message}")]
pub struct SpecError {
    /// Path of the field, e.g. `spec.rules[0].from[0].source.ipBlocks[1]`.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

pub(crate) fn err(field: impl Into<String>, message: impl Into<String>) -> SpecError {
    SpecError { field: field.into(), message: message.into() }
}

/// `selector`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Selector {
    /// Labels a workload must carry.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

/// `targetRefs[]`: what a policy is attached to.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TargetRefSpec {
    /// `""` (core) for a Service, `gateway.networking.k8s.io` for a Gateway.
    #[serde(default)]
    pub group: String,
    /// `Service` or `Gateway`.
    pub kind: String,
    /// Its name, in the policy's namespace.
    pub name: String,
}

/// `spec` of an AuthorizationPolicy.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    /// Workloads it applies to.
    pub selector: Option<Selector>,
    /// The Service or waypoint Gateway it is attached to (its waypoint enforces it); excludes
    /// `selector`.
    pub target_refs: Option<Vec<TargetRefSpec>>,
    /// One target (Istio's older singular form).
    pub target_ref: Option<TargetRefSpec>,
    /// ALLOW (default) or DENY.
    pub action: Option<String>,
    /// Rules.
    pub rules: Option<Vec<RuleSpec>>,
}

/// `spec.rules[]`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
pub struct RuleSpec {
    /// Sources.
    pub from: Option<Vec<FromSpec>>,
    /// Operations.
    pub to: Option<Vec<ToSpec>>,
    /// Conditions.
    pub when: Option<Vec<ConditionSpec>>,
}

/// `spec.rules[].from[]`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
pub struct FromSpec {
    /// The source.
    #[serde(default)]
    pub source: SourceSpec,
}

/// `spec.rules[].from[].source`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SourceSpec {
    pub principals: Option<Vec<String>>,
    pub not_principals: Option<Vec<String>>,
    pub request_principals: Option<Vec<String>>,
    pub not_request_principals: Option<Vec<String>>,
    pub namespaces: Option<Vec<String>>,
    pub not_namespaces: Option<Vec<String>>,
    pub ip_blocks: Option<Vec<String>>,
    pub not_ip_blocks: Option<Vec<String>>,
    pub remote_ip_blocks: Option<Vec<String>>,
    pub not_remote_ip_blocks: Option<Vec<String>>,
}

/// `spec.rules[].to[]`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
pub struct ToSpec {
    /// The operation.
    #[serde(default)]
    pub operation: OperationSpec,
}

/// `spec.rules[].to[].operation`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OperationSpec {
    pub ports: Option<Vec<String>>,
    pub not_ports: Option<Vec<String>>,
    pub hosts: Option<Vec<String>>,
    pub not_hosts: Option<Vec<String>>,
    pub methods: Option<Vec<String>>,
    pub not_methods: Option<Vec<String>>,
    pub paths: Option<Vec<String>>,
    pub not_paths: Option<Vec<String>>,
}

/// `spec.rules[].when[]`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConditionSpec {
    pub key: String,
    pub values: Option<Vec<String>>,
    pub not_values: Option<Vec<String>>,
}

/// `spec` of a PeerAuthentication.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthenticationSpec {
    /// Workloads it applies to.
    pub selector: Option<Selector>,
    /// The mode.
    pub mtls: Option<MtlsSpec>,
    /// Per-port modes (not supported yet; rejected so nothing is half-applied).
    pub port_level_mtls: Option<BTreeMap<String, MtlsSpec>>,
}

/// `spec.mtls`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
pub struct MtlsSpec {
    /// UNSET, PERMISSIVE, STRICT or DISABLE.
    pub mode: Option<String>,
}

fn list(v: &Option<Vec<String>>) -> Vec<String> {
    v.clone().unwrap_or_default()
}

fn blocks(v: &Option<Vec<String>>, path: &str) -> Result<Vec<IpBlock>, SpecError> {
    list(v)
        .iter()
        .enumerate()
        .map(|(i, b)| {
            IpBlock::parse(b)
                .ok_or_else(|| err(format!("{path}[{i}]"), format!("{b:?} is not an IP address or CIDR block")))
        })
        .collect()
}

fn ports(v: &Option<Vec<String>>, path: &str) -> Result<Vec<u16>, SpecError> {
    list(v)
        .iter()
        .enumerate()
        .map(|(i, p)| {
            p.parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| err(format!("{path}[{i}]"), format!("{p:?} is not a port number (1-65535)")))
        })
        .collect()
}

/// L7-only fields that are set, as paths.
fn l7(path: &str, fields: &[(&str, &Option<Vec<String>>)]) -> Vec<String> {
    fields
        .iter()
        .filter(|(_, v)| v.as_ref().is_some_and(|v| !v.is_empty()))
        .map(|(n, _)| format!("{path}.{n}"))
        .collect()
}

impl AuthorizationPolicySpec {
    /// Validates into a policy `namespace/name`.
    pub fn validate(&self, namespace: &str, name: &str) -> Result<AuthorizationPolicy, SpecError> {
        let action = match self.action.as_deref().unwrap_or("ALLOW") {
            "ALLOW" => Action::Allow,
            "DENY" => Action::Deny,
            other => return Err(err("spec.action", format!("{other} is not supported (ALLOW or DENY)"))),
        };
        let target_refs = self.target_refs()?;
        if !target_refs.is_empty() && self.selector.is_some() {
            return Err(err("spec.selector", "a policy has either a selector or targetRefs, not both"));
        }
        let mut rules = Vec::new();
        for (r, rule) in self.rules.iter().flatten().enumerate() {
            let path = format!("spec.rules[{r}]");
            let mut out = Rule::default();
            for (f, from) in rule.from.iter().flatten().enumerate() {
                let p = format!("rules[{r}].from[{f}].source");
                let s = &from.source;
                let mut ip_blocks = blocks(&s.ip_blocks, &format!("spec.{p}.ipBlocks"))?;
                ip_blocks.extend(blocks(&s.remote_ip_blocks, &format!("spec.{p}.remoteIpBlocks"))?);
                let mut not_ip_blocks = blocks(&s.not_ip_blocks, &format!("spec.{p}.notIpBlocks"))?;
                not_ip_blocks.extend(blocks(&s.not_remote_ip_blocks, &format!("spec.{p}.notRemoteIpBlocks"))?);
                out.l7_fields.extend(l7(
                    &p,
                    &[
                        ("requestPrincipals", &s.request_principals),
                        ("notRequestPrincipals", &s.not_request_principals),
                    ],
                ));
                out.from.push(Source {
                    principals: list(&s.principals),
                    not_principals: list(&s.not_principals),
                    namespaces: list(&s.namespaces),
                    not_namespaces: list(&s.not_namespaces),
                    ip_blocks,
                    not_ip_blocks,
                    request_principals: list(&s.request_principals),
                    not_request_principals: list(&s.not_request_principals),
                });
            }
            for (t, to) in rule.to.iter().flatten().enumerate() {
                let p = format!("rules[{r}].to[{t}].operation");
                let o = &to.operation;
                out.l7_fields.extend(l7(
                    &p,
                    &[
                        ("hosts", &o.hosts),
                        ("notHosts", &o.not_hosts),
                        ("methods", &o.methods),
                        ("notMethods", &o.not_methods),
                        ("paths", &o.paths),
                        ("notPaths", &o.not_paths),
                    ],
                ));
                out.to.push(Operation {
                    ports: ports(&o.ports, &format!("spec.{p}.ports"))?,
                    not_ports: ports(&o.not_ports, &format!("spec.{p}.notPorts"))?,
                    hosts: list(&o.hosts),
                    not_hosts: list(&o.not_hosts),
                    methods: list(&o.methods),
                    not_methods: list(&o.not_methods),
                    paths: list(&o.paths),
                    not_paths: list(&o.not_paths),
                });
            }
            for (w, cond) in rule.when.iter().flatten().enumerate() {
                let p = format!("{path}.when[{w}]");
                if cond.values.as_ref().is_none_or(Vec::is_empty) && cond.not_values.as_ref().is_none_or(Vec::is_empty)
                {
                    return Err(err(format!("{p}.values"), "a condition needs values or notValues"));
                }
                let Some(key) = ConditionKey::parse(&cond.key) else {
                    let evaluated_family =
                        cond.key.starts_with("request.auth.") || cond.key.starts_with("request.headers");
                    if !evaluated_family && (cond.key.starts_with("request.") || cond.key.starts_with("experimental."))
                    {
                        let unsupported = format!("rules[{r}].when[{w}] ({})", cond.key);
                        out.l7_fields.push(unsupported.clone());
                        out.unsupported_fields.push(unsupported);
                        continue;
                    }
                    return Err(err(
                        format!("{p}.key"),
                        format!(
                            "{} is not supported (source.ip, remote.ip, source.namespace, source.principal, destination.ip, destination.port, request.headers[NAME], request.auth.principal, request.auth.audiences, request.auth.presenter, request.auth.claims[NAME], or another L7 request.* key)",
                            cond.key
                        ),
                    ));
                };
                if key.is_l7() {
                    out.l7_fields.push(format!("rules[{r}].when[{w}] ({})", cond.key));
                }
                let values = list(&cond.values).into_iter().chain(list(&cond.not_values));
                for v in values {
                    let ok = match key {
                        ConditionKey::SourceIp | ConditionKey::DestinationIp => IpBlock::parse(&v).is_some(),
                        ConditionKey::DestinationPort => v.parse::<u16>().is_ok(),
                        _ => true,
                    };
                    if !ok {
                        return Err(err(format!("{p}.values"), format!("{v:?} is not valid for {}", cond.key)));
                    }
                }
                out.when.push(Condition { key, values: list(&cond.values), not_values: list(&cond.not_values) });
            }
            rules.push(out);
        }
        Ok(AuthorizationPolicy {
            namespace: namespace.to_string(),
            name: name.to_string(),
            selector: self.selector.as_ref().map(|s| s.match_labels.clone()),
            action,
            rules,
            target_refs,
        })
    }

    /// `targetRefs` (and the singular `targetRef`), validated.
    fn target_refs(&self) -> Result<Vec<TargetRef>, SpecError> {
        target_refs(&self.target_refs, &self.target_ref)
    }
}

/// `targetRefs` (and the singular `targetRef`) of a policy, validated: a Service or a Gateway of
/// the policy's namespace.
pub(crate) fn target_refs(
    plural: &Option<Vec<TargetRefSpec>>,
    singular: &Option<TargetRefSpec>,
) -> Result<Vec<TargetRef>, SpecError> {
    let plural = plural.iter().flatten().enumerate().map(|(i, t)| (format!("spec.targetRefs[{i}]"), t));
    let singular = singular.iter().map(|t| ("spec.targetRef".to_string(), t));
    plural
        .chain(singular)
        .map(|(path, t)| {
            let kind = match (t.group.as_str(), t.kind.as_str()) {
                ("" | "core", "Service") => TargetKind::Service,
                ("gateway.networking.k8s.io", "Gateway") => TargetKind::Gateway,
                (group, kind) => {
                    return Err(err(
                        format!("{path}.kind"),
                        format!(
                            "{group:?}/{kind} cannot be a target: name a Service (group \"\") or a Gateway (group gateway.networking.k8s.io)"
                        ),
                    ))
                }
            };
            if t.name.is_empty() {
                return Err(err(format!("{path}.name"), "missing"));
            }
            Ok(TargetRef { kind, name: t.name.clone() })
        })
        .collect()
}

impl PeerAuthenticationSpec {
    /// Validates into a PeerAuthentication `namespace/name`.
    pub fn validate(&self, namespace: &str, name: &str) -> Result<PeerAuthentication, SpecError> {
        if self.port_level_mtls.as_ref().is_some_and(|p| !p.is_empty()) {
            return Err(err("spec.portLevelMtls", "per-port modes are not supported yet; use a workload selector"));
        }
        let mode = match self.mtls.as_ref().and_then(|m| m.mode.as_deref()).unwrap_or("UNSET") {
            "UNSET" => MtlsMode::Unset,
            "PERMISSIVE" => MtlsMode::Permissive,
            "STRICT" => MtlsMode::Strict,
            "DISABLE" => MtlsMode::Disable,
            other => {
                return Err(err(
                    "spec.mtls.mode",
                    format!("{other} is not a mode (UNSET, PERMISSIVE, STRICT, DISABLE)"),
                ))
            }
        };
        Ok(PeerAuthentication {
            namespace: namespace.to_string(),
            name: name.to_string(),
            selector: self.selector.as_ref().map(|s| s.match_labels.clone()),
            mode,
        })
    }
}
