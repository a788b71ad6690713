//! Authorization with Istio's semantics: AuthorizationPolicy (ALLOW/DENY) and
//! PeerAuthentication (mTLS mode). This crate owns the decision functions the agent enforces
//! at L4 (and `meshctl explain` shows) and the waypoint enforces per request ([`l7`]); it never
//! does I/O.
//!
//! Semantics, as in Istio ambient's ztunnel:
//! - a policy applies to a workload in its namespace whose labels match `selector.matchLabels`
//!   (no selector: every workload there); a policy in the root namespace `ferrymesh-system`
//!   applies mesh-wide;
//! - any matching DENY rule denies; else, if no ALLOW policy applies, the connection is allowed;
//!   else an ALLOW rule must match;
//! - a policy without rules matches nothing (an ALLOW without rules denies everything); a
//!   rule without from/to/when matches everything;
//! - an ALLOW rule that uses an L7-only field matches nothing at L4 (fail closed); a DENY rule
//!   ignores its L7-only fields, which makes it broader;
//! - a policy with `targetRefs` (a Service, or a waypoint's Gateway) is enforced by the waypoint
//!   for requests to that Service, never by the agents (see [`l7`]).

pub mod authn;
pub mod l7;
pub mod path;
pub mod spec;
pub mod wire;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use ferrymesh_spiffe::SpiffeId;

/// Namespace whose policies apply to the whole mesh.
pub const ROOT_NAMESPACE: &str = "ferrymesh-system";

/// What a matching policy does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Connections must match one ALLOW rule (when any ALLOW policy applies).
    Allow,
    /// A matching rule denies.
    Deny,
}

/// An IP address or CIDR block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpBlock {
    /// Network address.
    pub addr: IpAddr,
    /// Prefix length.
    pub prefix: u8,
}

impl IpBlock {
    /// Parses `10.0.0.1` or `10.0.0.0/8` (IPv4 or IPv6).
    pub fn parse(text: &str) -> Option<Self> {
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a.parse().ok()?, p.parse().ok()?),
            None => {
                let addr: IpAddr = text.parse().ok()?;
                (addr, if addr.is_ipv4() { 32 } else { 128 })
            }
        };
        let max = if matches!(addr, IpAddr::V4(_)) { 32 } else { 128 };
        (prefix <= max).then_some(Self { addr, prefix })
    }

    /// Whether `ip` is in the block.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// `rules[].from[].source`. Empty lists are unset.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Source {
    /// Peer principals (`<trust domain>/ns/<ns>/sa/<sa>`), with `*`, `prefix*`, `*suffix`.
    pub principals: Vec<String>,
    /// Negated principals.
    pub not_principals: Vec<String>,
    /// Namespaces of the peer identity.
    pub namespaces: Vec<String>,
    /// Negated namespaces.
    pub not_namespaces: Vec<String>,
    /// Source IP blocks.
    pub ip_blocks: Vec<IpBlock>,
    /// Negated source IP blocks.
    pub not_ip_blocks: Vec<IpBlock>,
    /// Request principals (`<iss>/<sub>` of a verified JWT), with `*`, `prefix*`, `*suffix`:
    /// L7, only a waypoint evaluates them.
    pub request_principals: Vec<String>,
    /// Negated request principals (L7).
    pub not_request_principals: Vec<String>,
}

/// `rules[].to[].operation`. Empty lists are unset. Hosts, methods and paths are L7: only a
/// waypoint evaluates them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Operation {
    /// Destination ports.
    pub ports: Vec<u16>,
    /// Negated destination ports.
    pub not_ports: Vec<u16>,
    /// `Host`/`:authority` patterns (case-insensitive, with or without the port).
    pub hosts: Vec<String>,
    /// Negated hosts.
    pub not_hosts: Vec<String>,
    /// Methods (exact).
    pub methods: Vec<String>,
    /// Negated methods.
    pub not_methods: Vec<String>,
    /// Path patterns (exact, `prefix*`, `*suffix`, `*`), matched on the path without its query.
    pub paths: Vec<String>,
    /// Negated paths.
    pub not_paths: Vec<String>,
}

/// Attribute a `when` condition reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConditionKey {
    /// `source.ip` (IPs or CIDRs).
    SourceIp,
    /// `source.namespace` (of the peer identity).
    SourceNamespace,
    /// `source.principal`.
    SourcePrincipal,
    /// `destination.ip` (IPs or CIDRs).
    DestinationIp,
    /// `destination.port`.
    DestinationPort,
    /// `request.headers[<name>]` (L7; the name lowercased).
    RequestHeader(String),
    /// `request.auth.principal`: `<iss>/<sub>` of the request's verified JWT (L7).
    RequestPrincipal,
    /// `request.auth.audiences`: its `aud` (L7).
    RequestAudiences,
    /// `request.auth.presenter`: its `azp` (L7).
    RequestPresenter,
    /// `request.auth.claims[a][b]...`: a claim of its payload, by its path (L7).
    RequestClaim(Vec<String>),
}

impl ConditionKey {
    /// Parses an Istio condition key this crate evaluates (at L4, or at L7 for request headers).
    pub fn parse(key: &str) -> Option<Self> {
        if let Some(name) = key.strip_prefix("request.headers[").and_then(|k| k.strip_suffix(']')) {
            return (!name.is_empty()).then(|| Self::RequestHeader(name.to_ascii_lowercase()));
        }
        if let Some(path) = key.strip_prefix("request.auth.claims[").and_then(|k| k.strip_suffix(']')) {
            let path: Vec<String> = path.split("][").map(str::to_string).collect();
            return path.iter().all(|p| !p.is_empty() && !p.contains(['[', ']'])).then_some(Self::RequestClaim(path));
        }
        Some(match key {
            "source.ip" | "remote.ip" => Self::SourceIp,
            "source.namespace" => Self::SourceNamespace,
            "source.principal" => Self::SourcePrincipal,
            "destination.ip" => Self::DestinationIp,
            "destination.port" => Self::DestinationPort,
            "request.auth.principal" => Self::RequestPrincipal,
            "request.auth.audiences" => Self::RequestAudiences,
            "request.auth.presenter" => Self::RequestPresenter,
            _ => return None,
        })
    }

    /// The key as Istio writes it.
    pub fn name(&self) -> String {
        match self {
            ConditionKey::SourceIp => "source.ip".into(),
            ConditionKey::SourceNamespace => "source.namespace".into(),
            ConditionKey::SourcePrincipal => "source.principal".into(),
            ConditionKey::DestinationIp => "destination.ip".into(),
            ConditionKey::DestinationPort => "destination.port".into(),
            ConditionKey::RequestHeader(name) => format!("request.headers[{name}]"),
            ConditionKey::RequestPrincipal => "request.auth.principal".into(),
            ConditionKey::RequestAudiences => "request.auth.audiences".into(),
            ConditionKey::RequestPresenter => "request.auth.presenter".into(),
            ConditionKey::RequestClaim(path) => format!("request.auth.claims[{}]", path.join("][")),
        }
    }

    /// Whether only a waypoint can evaluate it.
    pub fn is_l7(&self) -> bool {
        matches!(
            self,
            ConditionKey::RequestHeader(_)
                | ConditionKey::RequestPrincipal
                | ConditionKey::RequestAudiences
                | ConditionKey::RequestPresenter
                | ConditionKey::RequestClaim(_)
        )
    }
}

/// `rules[].when[]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Condition {
    /// What is tested.
    pub key: ConditionKey,
    /// One must match (when set).
    pub values: Vec<String>,
    /// None may match.
    pub not_values: Vec<String>,
}

/// One rule of a policy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rule {
    /// Any one must match (when set).
    pub from: Vec<Source>,
    /// Any one must match (when set).
    pub to: Vec<Operation>,
    /// All must match.
    pub when: Vec<Condition>,
    /// L7-only fields of the rule (paths), which L4 cannot evaluate.
    pub l7_fields: Vec<String>,
    /// Fields no layer evaluates (`request.*` condition keys other than headers and
    /// `request.auth.*`, `experimental.*`): an ALLOW rule with one matches nothing, a DENY rule
    /// ignores them.
    pub unsupported_fields: Vec<String>,
}

/// An AuthorizationPolicy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthorizationPolicy {
    /// Namespace (the root namespace makes it mesh-wide).
    pub namespace: String,
    /// Name.
    pub name: String,
    /// `selector.matchLabels`; None selects every workload in scope.
    pub selector: Option<BTreeMap<String, String>>,
    /// ALLOW or DENY.
    pub action: Action,
    /// Rules; a policy matches when any rule does.
    pub rules: Vec<Rule>,
    /// What the policy is attached to instead of selected workloads (a waypoint enforces it).
    pub target_refs: Vec<TargetRef>,
}

/// `targetRefs[]` of a policy: a Service or a waypoint's Gateway of the policy's namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetRef {
    /// `Service` or `Gateway`.
    pub kind: TargetKind,
    /// Its name.
    pub name: String,
}

/// What a `targetRef` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetKind {
    /// A Service: requests to it, at its waypoint.
    Service,
    /// A waypoint's Gateway: every request it serves.
    Gateway,
}

impl TargetKind {
    /// The Kubernetes kind.
    pub fn as_str(self) -> &'static str {
        match self {
            TargetKind::Service => "Service",
            TargetKind::Gateway => "Gateway",
        }
    }
}

/// PeerAuthentication `mtls.mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MtlsMode {
    /// Inherit from the enclosing scope.
    Unset,
    /// Plaintext and mTLS both accepted (the default).
    Permissive,
    /// Only mTLS (HBONE) accepted.
    Strict,
    /// Treated as PERMISSIVE: ferrymesh never turns mTLS off between meshed pods.
    Disable,
}

impl std::fmt::Display for MtlsMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MtlsMode::Unset => "UNSET",
            MtlsMode::Permissive => "PERMISSIVE",
            MtlsMode::Strict => "STRICT",
            MtlsMode::Disable => "DISABLE",
        })
    }
}

/// A PeerAuthentication.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerAuthentication {
    /// Namespace (the root namespace makes it mesh-wide).
    pub namespace: String,
    /// Name.
    pub name: String,
    /// `selector.matchLabels`; None: namespace-wide (or mesh-wide in the root namespace).
    pub selector: Option<BTreeMap<String, String>>,
    /// Mode.
    pub mode: MtlsMode,
}

/// The workload a decision is about.
#[derive(Clone, Copy, Debug)]
pub struct Workload<'a> {
    /// Namespace.
    pub namespace: &'a str,
    /// Labels.
    pub labels: &'a BTreeMap<String, String>,
}

/// The connection a decision is about.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// Client IP.
    pub source_ip: IpAddr,
    /// Peer identity proven by mTLS (or known to the agent, node-local), None for plaintext.
    /// Policies match its principal, `<trust domain>/ns/<ns>/sa/<sa>`.
    pub source: Option<&'a SpiffeId>,
    /// Destination IP.
    pub destination_ip: IpAddr,
    /// Destination port.
    pub destination_port: u16,
}

impl Request<'_> {
    fn source_principal(&self) -> Option<&str> {
        self.source.map(SpiffeId::principal)
    }

    fn source_namespace(&self) -> Option<&str> {
        self.source.map(SpiffeId::namespace)
    }
}

/// How a connection reached the destination, as far as PeerAuthentication is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    /// Plain TCP from anywhere: the peer proves nothing.
    Plaintext,
    /// HBONE: mutual TLS between two agents; the peer's identity is its certificate's.
    Mtls,
    /// Both pods on one node: the agent hands the connection over inside itself, without TLS
    /// and without leaving the node; it knows the source's identity from its own enrollment.
    NodeLocal,
}

/// Where the two ends of a connection are, as far as the transport between them goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    /// The source pod's agent captures it.
    pub src_captured: bool,
    /// The destination pod's agent captures it.
    pub dst_captured: bool,
    /// Both pods are on one node.
    pub same_node: bool,
    /// The source's agent holds workload certificates (it runs with a node token).
    pub certificates: bool,
}

impl Transport {
    /// How a connection between pods placed as `placement` is carried, as the source's agent decides it: between two
    /// captured pods by a node-local handover on one node, else over HBONE, when the source's
    /// agent has certificates; anything else as plain TCP. The agent and `meshctl explain`
    /// both decide with this.
    pub const fn for_placement(placement: Placement) -> Self {
        match placement {
            Placement { src_captured: true, dst_captured: true, certificates: true, same_node: true } => {
                Transport::NodeLocal
            }
            Placement { src_captured: true, dst_captured: true, certificates: true, same_node: false } => {
                Transport::Mtls
            }
            _ => Transport::Plaintext,
        }
    }

    /// Whether the peer's identity is proven (what STRICT requires).
    pub const fn authenticated(self) -> bool {
        !matches!(self, Transport::Plaintext)
    }

    /// Name in flows and explanations: `plaintext`, `mtls` or `node-local`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Transport::Plaintext => "plaintext",
            Transport::Mtls => "mtls",
            Transport::NodeLocal => "node-local",
        }
    }
}

/// The outcome of an authorization, with the policy and rule that decided it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Whether the connection may proceed.
    pub allowed: bool,
    /// `namespace/name rule N` of the deciding policy; empty when no policy applied; for a
    /// deny by default, `no ALLOW policy matched (considered: ...)`.
    pub policy: String,
    /// For a refusal, what would allow the connection (empty when allowed).
    pub hint: String,
}

/// The inbound verdict: [`Decision`] plus the reason a flow records for a refusal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// Whether the connection may proceed.
    pub allowed: bool,
    /// As [`Decision::policy`]; for a STRICT refusal, the PeerAuthentication's `namespace/name`.
    pub policy: String,
    /// Why it was refused (empty when allowed).
    pub reason: String,
    /// For a refusal, what would allow the connection (empty when allowed).
    pub hint: String,
}

/// One step of a decision: what was looked at and what it contributed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    /// `PeerAuthentication ns/name`, `DENY ns/name`, `ALLOW ns/name` or `ALLOW` (the default).
    pub what: String,
    /// What it contributed, e.g. `rule 0 matches: denied`.
    pub outcome: String,
}

/// Istio's string match: exact, `*` (any non-empty), `prefix*`, `*suffix`.
pub fn string_match(pattern: &str, value: &str) -> bool {
    if pattern == "*" {
        return !value.is_empty();
    }
    if let Some(prefix) = pattern.strip_suffix('*') {
        return value.starts_with(prefix);
    }
    if let Some(suffix) = pattern.strip_prefix('*') {
        return value.ends_with(suffix);
    }
    pattern == value
}

fn any_match(patterns: &[String], value: Option<&str>) -> bool {
    patterns.iter().any(|p| string_match(p, value.unwrap_or("")))
}

/// A set field matches when one pattern does; an unset (empty) field always matches.
fn field(patterns: &[String], value: Option<&str>) -> bool {
    patterns.is_empty() || any_match(patterns, value)
}

/// A negated field matches when no pattern does.
fn not_field(patterns: &[String], value: Option<&str>) -> bool {
    !any_match(patterns, value)
}

fn selects(selector: &Option<BTreeMap<String, String>>, labels: &BTreeMap<String, String>) -> bool {
    selector.as_ref().is_none_or(|s| s.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

impl Source {
    fn matches(&self, r: &Request<'_>) -> bool {
        field(&self.principals, r.source_principal())
            && not_field(&self.not_principals, r.source_principal())
            && (self.namespaces.is_empty() || any_match(&self.namespaces, r.source_namespace()))
            && (self.not_namespaces.is_empty() || not_field(&self.not_namespaces, r.source_namespace()))
            && (self.ip_blocks.is_empty() || self.ip_blocks.iter().any(|b| b.contains(r.source_ip)))
            && !self.not_ip_blocks.iter().any(|b| b.contains(r.source_ip))
    }
}

impl Operation {
    fn matches_l4(&self, r: &Request<'_>) -> bool {
        (self.ports.is_empty() || self.ports.contains(&r.destination_port))
            && !self.not_ports.contains(&r.destination_port)
    }
}

/// Whether `pattern` matches the L4 attribute `key` names (L7 keys match nothing here).
fn value_match(key: &ConditionKey, pattern: &str, r: &Request<'_>) -> bool {
    match key {
        ConditionKey::SourceIp => IpBlock::parse(pattern).is_some_and(|b| b.contains(r.source_ip)),
        ConditionKey::DestinationIp => IpBlock::parse(pattern).is_some_and(|b| b.contains(r.destination_ip)),
        ConditionKey::SourceNamespace => string_match(pattern, r.source_namespace().unwrap_or("")),
        ConditionKey::SourcePrincipal => string_match(pattern, r.source_principal().unwrap_or("")),
        ConditionKey::DestinationPort => pattern.parse() == Ok(r.destination_port),
        ConditionKey::RequestHeader(_)
        | ConditionKey::RequestPrincipal
        | ConditionKey::RequestAudiences
        | ConditionKey::RequestPresenter
        | ConditionKey::RequestClaim(_) => false,
    }
}

impl Condition {
    fn matches(&self, r: &Request<'_>) -> bool {
        (self.values.is_empty() || self.values.iter().any(|v| value_match(&self.key, v, r)))
            && !self.not_values.iter().any(|v| value_match(&self.key, v, r))
    }
}

impl Rule {
    /// Whether the rule names its clients (principals, namespaces or ipBlocks of a source, or a
    /// `when` on source.ip, source.principal or source.namespace): at a destination behind a
    /// waypoint such a rule is about the original client, whom only the waypoint sees. A rule
    /// that names no client (`notPrincipals: [<the waypoint>]` alone, or only ports) is about
    /// the hop the destination sees, and stays the destination's.
    fn names_clients(&self) -> bool {
        self.from.iter().any(|s| !s.principals.is_empty() || !s.namespaces.is_empty() || !s.ip_blocks.is_empty())
            || self.when.iter().any(|c| {
                !c.values.is_empty()
                    && matches!(
                        c.key,
                        ConditionKey::SourceIp | ConditionKey::SourcePrincipal | ConditionKey::SourceNamespace
                    )
            })
    }

    /// Whether the L4 part of the rule matches.
    fn matches_l4(&self, r: &Request<'_>) -> bool {
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(r)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches_l4(r)))
            && self.when.iter().filter(|c| !c.key.is_l7()).all(|c| c.matches(r))
    }
}

impl AuthorizationPolicy {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether the policy applies to `w` at L4 (a policy with targetRefs applies to no workload:
    /// a waypoint enforces it).
    pub fn applies_to(&self, w: &Workload<'_>) -> bool {
        self.target_refs.is_empty()
            && (self.namespace == w.namespace || self.namespace == ROOT_NAMESPACE)
            && selects(&self.selector, w.labels)
    }
}

/// The AuthorizationPolicies of one namespace, sorted by name, with an index from selector
/// labels to policies so that finding those that apply to a workload costs a few hash lookups
/// per workload label, not one selector test per policy of the namespace.
#[derive(Clone, Debug, Default, PartialEq)]
struct NamespacePolicies {
    /// Sorted by name: evaluation order.
    policies: Vec<AuthorizationPolicy>,
    /// Positions of the policies without a selector (or with an empty one): they apply to
    /// every workload in scope.
    unselective: Vec<usize>,
    /// label key -> label value -> positions of the policies whose selector requires that
    /// label (each policy is filed under its first selector label only).
    by_label: HashMap<String, HashMap<String, Vec<usize>>>,
}

impl NamespacePolicies {
    fn new(policies: Vec<AuthorizationPolicy>) -> Self {
        let mut unselective = Vec::new();
        let mut by_label: HashMap<String, HashMap<String, Vec<usize>>> = HashMap::new();
        // Policies attached by targetRefs are a waypoint's: indexed for no workload.
        for (i, p) in policies.iter().enumerate().filter(|(_, p)| p.target_refs.is_empty()) {
            match p.selector.as_ref().and_then(|s| s.iter().next()) {
                Some((k, v)) => by_label.entry(k.clone()).or_default().entry(v.clone()).or_default().push(i),
                None => unselective.push(i),
            }
        }
        Self { policies, unselective, by_label }
    }

    /// The policies that apply to `w`, in name order, appended to `out`.
    fn applicable<'s>(&'s self, w: &Workload<'_>, out: &mut Vec<&'s AuthorizationPolicy>) {
        let mut positions: Vec<usize> = self.unselective.clone();
        for (k, v) in w.labels {
            if let Some(filed) = self.by_label.get(k.as_str()).and_then(|values| values.get(v.as_str())) {
                positions.extend(filed.iter().copied().filter(|&i| selects(&self.policies[i].selector, w.labels)));
            }
        }
        positions.sort_unstable();
        out.extend(positions.into_iter().map(|i| &self.policies[i]));
    }
}

/// Every policy of the mesh, indexed for decisions.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PolicySet {
    authz_by_namespace: HashMap<String, NamespacePolicies>,
    peer_auth: Vec<PeerAuthentication>,
}

impl PolicySet {
    /// Indexes `authz` and `peer_auth`; order within a namespace is by name.
    pub fn new(mut authz: Vec<AuthorizationPolicy>, peer_auth: Vec<PeerAuthentication>) -> Self {
        authz.sort_by_key(AuthorizationPolicy::key);
        let mut grouped: HashMap<String, Vec<AuthorizationPolicy>> = HashMap::new();
        for p in authz {
            grouped.entry(p.namespace.clone()).or_default().push(p);
        }
        let authz_by_namespace = grouped.into_iter().map(|(ns, list)| (ns, NamespacePolicies::new(list))).collect();
        Self { authz_by_namespace, peer_auth }
    }

    /// Every AuthorizationPolicy, sorted by `namespace/name`.
    pub fn authorization_policies(&self) -> Vec<&AuthorizationPolicy> {
        let mut all: Vec<&AuthorizationPolicy> =
            self.authz_by_namespace.values().flat_map(|n| n.policies.iter()).collect();
        all.sort_by_key(|p| p.key());
        all
    }

    /// Every PeerAuthentication.
    pub fn peer_authentications(&self) -> &[PeerAuthentication] {
        &self.peer_auth
    }

    /// Policies that apply to `w`: the root namespace's first, then the workload's own, each
    /// in name order. Costs a lookup per workload label, whatever the number of policies.
    pub fn applicable<'s>(&'s self, w: &Workload<'_>) -> Vec<&'s AuthorizationPolicy> {
        let mut out = Vec::new();
        for ns in [ROOT_NAMESPACE, w.namespace] {
            if let Some(policies) = self.authz_by_namespace.get(ns) {
                policies.applicable(w, &mut out);
            }
            if w.namespace == ROOT_NAMESPACE {
                break;
            }
        }
        out
    }

    /// Decides whether `r` may reach workload `w` (authorization only; see [`Self::decide`]).
    pub fn authorize(&self, w: &Workload<'_>, r: &Request<'_>) -> Decision {
        self.authorize_traced(w, r, None)
    }

    /// The whole inbound decision the agent enforces: PeerAuthentication first (STRICT refuses
    /// plaintext), then authorization, for a connection that arrived by `transport`.
    pub fn decide(&self, w: &Workload<'_>, r: &Request<'_>, transport: Transport) -> Verdict {
        self.decide_traced(w, r, transport, None)
    }

    /// [`Self::decide`] with every step that led to the verdict, in evaluation order (for
    /// `meshctl explain`): the same code, recording as it goes.
    pub fn explain(&self, w: &Workload<'_>, r: &Request<'_>, transport: Transport) -> (Verdict, Vec<Step>) {
        let mut steps = Vec::new();
        let verdict = self.decide_traced(w, r, transport, Some(&mut steps));
        (verdict, steps)
    }

    fn decide_traced(
        &self,
        w: &Workload<'_>,
        r: &Request<'_>,
        transport: Transport,
        mut trace: Option<&mut Vec<Step>>,
    ) -> Verdict {
        let (mode, by) = self.mtls_mode(w);
        let strict_refusal = !transport.authenticated() && mode == MtlsMode::Strict;
        if let Some(steps) = trace.as_deref_mut() {
            let what = match &by {
                Some(by) => format!("PeerAuthentication {by}"),
                None => "PeerAuthentication (none applies)".to_string(),
            };
            let security = match transport {
                Transport::Plaintext => "plaintext",
                Transport::Mtls => "mTLS",
                Transport::NodeLocal => "node-local (identity known to the agent)",
            };
            let outcome = if strict_refusal {
                format!("mode {mode}; the connection is {security}: refused")
            } else {
                format!("mode {mode}; the connection is {security}: accepted")
            };
            steps.push(Step { what, outcome });
        }
        if strict_refusal {
            let by = by.unwrap_or_default();
            return Verdict {
                allowed: false,
                reason: format!("plaintext refused: PeerAuthentication {by} requires mTLS (STRICT)"),
                hint: format!(
                    "PeerAuthentication {by} accepts mTLS only: enroll the client's namespace \
                     (ferrymesh.io/dataplane-mode=enabled) or set {by} to PERMISSIVE"
                ),
                policy: by,
            };
        }
        let decision = self.authorize_traced(w, r, trace);
        let reason = if decision.allowed { String::new() } else { format!("denied: {}", decision.policy) };
        Verdict { allowed: decision.allowed, policy: decision.policy, reason, hint: decision.hint }
    }

    fn authorize_traced(&self, w: &Workload<'_>, r: &Request<'_>, trace: Option<&mut Vec<Step>>) -> Decision {
        decide_l4(&self.applicable(w), r, trace, "select this workload")
    }

    /// The DENY that `w`'s own policies hold for `r` when `r` is the original client of a
    /// request a waypoint carries to `w`, if one matches: the DENY rules of the policies that
    /// select `w` and name their clients ([`Rule::names_clients`]), evaluated at L4 with the
    /// original client's identity and address. The destination's agent sees the waypoint as the
    /// client and cannot apply them; the waypoint does, so a DENY never fails open through it.
    pub fn denied_at_waypoint(&self, w: &Workload<'_>, r: &Request<'_>) -> Option<Decision> {
        self.applicable(w).into_iter().filter(|p| p.action == Action::Deny).find_map(|p| {
            let i = p.rules.iter().position(|rule| rule.names_clients() && rule.matches_l4(r))?;
            Some(Decision {
                allowed: false,
                policy: format!("{}/{} rule {i}", p.namespace, p.name),
                hint: format!(
                    "DENY {} rule {i} matches the client (the destination's own policy, enforced by its waypoint): narrow or remove that rule to allow it",
                    p.key()
                ),
            })
        })
    }

    /// The effective mTLS mode of `w` and the PeerAuthentication (`namespace/name`) that set it:
    /// workload-specific over namespace-wide over mesh-wide; unset levels inherit; PERMISSIVE
    /// when nothing is set.
    pub fn mtls_mode(&self, w: &Workload<'_>) -> (MtlsMode, Option<String>) {
        let level = |p: &PeerAuthentication| -> Option<u8> {
            match (&p.selector, p.namespace.as_str()) {
                (Some(_), ns) if (ns == w.namespace || ns == ROOT_NAMESPACE) && selects(&p.selector, w.labels) => {
                    Some(0)
                }
                (None, ns) if ns == w.namespace && ns != ROOT_NAMESPACE => Some(1),
                (None, ROOT_NAMESPACE) => Some(2),
                _ => None,
            }
        };
        let mut best: Option<(u8, &PeerAuthentication)> = None;
        for p in self.peer_auth.iter().filter(|p| p.mode != MtlsMode::Unset) {
            if let Some(l) = level(p) {
                if best.is_none_or(|(b, bp)| l < b || (l == b && p.name < bp.name)) {
                    best = Some((l, p));
                }
            }
        }
        match best {
            Some((_, p)) => (p.mode, Some(format!("{}/{}", p.namespace, p.name))),
            None => (MtlsMode::Permissive, None),
        }
    }
}

#[cfg(test)]
mod tests;

/// The L4 decision of `policies` on connection `r` (the agent's for the policies selecting a
/// workload, the waypoint's for the ones attached to a Service or Gateway whose traffic it relays
/// as TCP): a DENY rule ignores its L7-only fields (broader, never narrower); an ALLOW rule with
/// L7-only fields matches no L4 traffic. `scope` says how the policies apply, for the hint.
fn decide_l4(
    policies: &[&AuthorizationPolicy],
    r: &Request<'_>,
    mut trace: Option<&mut Vec<Step>>,
    scope: &str,
) -> Decision {
    // Steps are built only when traced: decide() is on every connection's path.
    let mut step = |describe: &dyn Fn() -> (String, String)| {
        if let Some(steps) = trace.as_deref_mut() {
            let (what, outcome) = describe();
            steps.push(Step { what, outcome });
        }
    };
    for p in policies.iter().filter(|p| p.action == Action::Deny) {
        // A DENY rule ignores its L7-only fields: the deny becomes broader, never narrower.
        if let Some(i) = p.rules.iter().position(|rule| rule.matches_l4(r)) {
            step(&|| (format!("DENY {}", p.key()), format!("rule {i} matches: denied")));
            return Decision {
                allowed: false,
                policy: format!("{}/{} rule {i}", p.namespace, p.name),
                hint: format!("DENY {} rule {i} matches: narrow or remove that rule to allow it", p.key()),
            };
        }
        step(&|| (format!("DENY {}", p.key()), "no rule matches".into()));
    }
    let allows: Vec<&&AuthorizationPolicy> = policies.iter().filter(|p| p.action == Action::Allow).collect();
    if allows.is_empty() {
        step(&|| ("ALLOW".into(), "no ALLOW policy applies: allowed".into()));
        return Decision { allowed: true, policy: String::new(), hint: String::new() };
    }
    let mut l7_notes = Vec::new();
    for p in &allows {
        for (i, rule) in p.rules.iter().enumerate() {
            if !rule.l7_fields.is_empty() {
                let note =
                    format!("rule {i} uses L7-only fields ({}) and matches no L4 traffic", rule.l7_fields.join(", "));
                step(&|| (format!("ALLOW {}", p.key()), note.clone()));
                l7_notes.push(format!("{} {note}", p.key()));
            } else if rule.matches_l4(r) {
                step(&|| (format!("ALLOW {}", p.key()), format!("rule {i} matches: allowed")));
                let policy = format!("{}/{} rule {i}", p.namespace, p.name);
                return Decision { allowed: true, policy, hint: String::new() };
            }
        }
        step(&|| (format!("ALLOW {}", p.key()), "no rule matches".into()));
    }
    let considered: Vec<String> = allows.iter().map(|p| p.key()).collect();
    let mut policy = format!("no ALLOW policy matched (considered: {})", considered.join(", "));
    for note in l7_notes {
        policy.push_str("; ");
        policy.push_str(&note);
    }
    step(&|| ("ALLOW".into(), "ALLOW policies apply and none matched: denied".into()));
    let hint = format!(
        "ALLOW policies {scope} and none matches: add a rule to one of them ({}) that matches this \
             source and port",
        considered.join(", ")
    );
    Decision { allowed: false, policy, hint }
}
