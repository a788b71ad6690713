//! `meshctl explain SRC DST:PORT`: which policies apply to a connection from pod SRC to pod
//! DST on PORT, in evaluation order, and the verdict, computed by `ferrymesh-policy`'s
//! `PolicySet::explain`, the code path the destination agent enforces with, over the config
//! the agent holds. When DST is a Service bound to a waypoint, the request (`--method`,
//! `--path`, `--header`) is followed through the waypoint hop: the L7 policies attached there
//! (`PolicySet::explain_request`), the route rule and backends (`RouteTable`), and the decision of
//! each backend endpoint's agent for the waypoint's connection.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::Args;
use ferrymesh_api::config::Workload;
use ferrymesh_policy::{AuthorizationPolicy, PeerAuthentication, Placement, PolicySet, Request, Transport};
use ferrymesh_spiffe::SpiffeId;
use serde_json::json;

use super::config::{dump_all, Held};
use crate::Output;

/// Options of `meshctl explain`.
#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// Source pod, NAMESPACE/POD.
    pub src: String,
    /// Destination pod or Service and port, NAMESPACE/POD:PORT or NAMESPACE/SERVICE:PORT.
    pub dst: String,
    /// The request's method, at a waypoint (DST a Service bound to one).
    #[arg(long, default_value = "GET")]
    pub method: String,
    /// The request's path, with its query if any, at a waypoint.
    #[arg(long, default_value = "/")]
    pub path: String,
    /// A request header, NAME:VALUE, at a waypoint (repeatable).
    #[arg(long = "header", value_name = "NAME:VALUE")]
    pub headers: Vec<String>,
    /// The claims of the verified JWT the request carries, as JSON (`iss`, `sub`, `aud`, `azp`
    /// and any other), at a waypoint: what `requestPrincipals` and `request.auth.*` read.
    #[arg(long, value_name = "JSON")]
    pub jwt_claims: Option<String>,
    /// Output format (table or json).
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

fn split_pod(text: &str, what: &str) -> Result<(String, String), String> {
    match text.split_once('/') {
        Some((ns, pod)) if !ns.is_empty() && !pod.is_empty() && !pod.contains('/') => Ok((ns.into(), pod.into())),
        _ => Err(format!("{what} {text:?}: expected NAMESPACE/POD")),
    }
}

pub(super) fn find<'a>(
    workloads: &'a BTreeMap<String, Workload>,
    (ns, pod): &(String, String),
) -> Result<&'a Workload, String> {
    workloads.values().find(|w| w.namespace == *ns && w.name == *pod).ok_or_else(|| {
        let mut known: Vec<&str> = workloads.values().filter(|w| w.namespace == *ns).map(|w| w.name.as_str()).collect();
        known.sort();
        match known.len() {
            0 => format!("unknown pod {ns}/{pod}: the mesh has no pod in namespace {ns}"),
            _ => format!("unknown pod {ns}/{pod}: pods in {ns} are {}", known.join(", ")),
        }
    })
}

/// The policies the agent holds, as one set.
pub(super) fn policy_set(config: &Held) -> Result<PolicySet, String> {
    let convert = |e: ferrymesh_policy::wire::WireError| format!("the agent holds a policy that does not convert: {e}");
    let authz = config
        .objects
        .authorization_policies
        .values()
        .cloned()
        .map(AuthorizationPolicy::try_from)
        .collect::<Result<Vec<_>, _>>()
        .map_err(convert)?;
    let peer = config
        .objects
        .peer_authentications
        .values()
        .cloned()
        .map(PeerAuthentication::try_from)
        .collect::<Result<Vec<_>, _>>()
        .map_err(convert)?;
    Ok(PolicySet::new(authz, peer))
}

/// Explains `args` against the config the agents at `agents` hold: the first one's (the
/// source's, as a rule), and the destination's pod as its own node's agent holds it, which must
/// be among them when it is another node's (no other agent holds its labels).
pub async fn run(agents: &[PathBuf], args: ExplainArgs) -> Result<(), String> {
    let src_name = split_pod(&args.src, "SRC")?;
    let (dst_pod, port) =
        args.dst.rsplit_once(':').ok_or_else(|| format!("DST {:?}: expected NAMESPACE/POD:PORT", args.dst))?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("DST {:?}: {port:?} is not a port number (1-65535)", args.dst))?;
    let dst_name = split_pod(dst_pod, "DST")?;
    let config = dump_all(agents).await?;
    let src = find(&config.objects.workloads, &src_name)?;
    let service_key = format!("{}/{}", dst_name.0, dst_name.1);
    let is_pod = config.objects.workloads.values().any(|w| w.namespace == dst_name.0 && w.name == dst_name.1);
    if !is_pod && config.objects.services.contains_key(&service_key) {
        return super::explain_service::run(&config, src, &service_key, port, &args);
    }
    let dst = find(&config.objects.workloads, &dst_name)?;
    if dst.captured && !config.holds_in_full(&dst.node) {
        return Err(format!(
            "{}/{} runs on {}, whose agent decides its policies and alone holds its labels: ask it too (--agent with its socket, or --agents-dir)",
            dst.namespace, dst.name, dst.node
        ));
    }
    let policies = policy_set(&config)?;
    let td = &config.trust_domain;
    let src_identity = SpiffeId::new(td, &src.namespace, &src.service_account)
        .map_err(|e| format!("pod {}/{} has no valid identity: {e}", src.namespace, src.name))?;
    // Decided as the source's agent decides it (the config dump says whether it holds
    // certificates).
    let placement = Placement {
        src_captured: src.captured,
        dst_captured: dst.captured,
        same_node: src.node == dst.node,
        certificates: config.certificates,
    };
    let transport = Transport::for_placement(placement);
    let carried = match transport {
        _ if !dst.captured => {
            "not captured: the destination pod is not in the mesh, so no policy is enforced".to_string()
        }
        Transport::NodeLocal => format!("node-local: both pods are in the mesh on {}; its agent hands the connection over without TLS or network, knowing both identities", dst.node),
        Transport::Mtls => "mTLS (HBONE): both pods are in the mesh".to_string(),
        Transport::Plaintext if !src.captured => {
            "plaintext: the source pod is not in the mesh; the destination's agent sees no identity".to_string()
        }
        Transport::Plaintext => "plaintext: the agents hold no certificates (no --token-file), so the destination's agent sees no identity".to_string(),
    };
    let authenticated = transport.authenticated();
    let ip =
        |w: &Workload| w.ip.parse().map_err(|_| format!("pod {}/{} has no valid IP {:?}", w.namespace, w.name, w.ip));
    let labels = dst.labels.clone().into_iter().collect();
    let workload = ferrymesh_policy::Workload { namespace: &dst.namespace, labels: &labels };
    let request = Request {
        source_ip: ip(src)?,
        source: authenticated.then_some(&src_identity),
        destination_ip: ip(dst)?,
        destination_port: port,
    };
    let (verdict, steps) = if dst.captured {
        policies.explain(&workload, &request, transport)
    } else {
        let allowed = ferrymesh_policy::Verdict {
            allowed: true,
            policy: String::new(),
            reason: String::new(),
            hint: String::new(),
        };
        (allowed, Vec::new())
    };
    let word = if verdict.allowed { "allowed" } else { "denied" };
    match args.output {
        Output::Json => {
            let steps: Vec<_> = steps.iter().map(|s| json!({"what": s.what, "outcome": s.outcome})).collect();
            println!(
                "{}",
                json!({
                    "src": format!("{}/{}", src.namespace, src.name), "dst": format!("{}/{}", dst.namespace, dst.name),
                    "port": port, "mtls": transport == Transport::Mtls, "transport": transport.as_str(), "carried": carried, "verdict": word, "policy": verdict.policy,
                    "reason": verdict.reason, "hint": verdict.hint, "steps": steps,
                })
            );
        }
        _ => {
            let principal =
                if authenticated { format!(", principal {}", src_identity.principal()) } else { String::new() };
            println!("from:    {}/{} ({}{principal})", src.namespace, src.name, src.ip);
            println!("to:      {}/{}:{port} ({})", dst.namespace, dst.name, dst.ip);
            println!("carried: {carried}");
            println!("steps (in evaluation order):");
            for (i, s) in steps.iter().enumerate() {
                println!("  {}. {}: {}", i + 1, s.what, s.outcome);
            }
            match (verdict.allowed, verdict.policy.is_empty()) {
                (true, true) => println!("verdict: ALLOWED"),
                (true, false) => println!("verdict: ALLOWED by {}", verdict.policy),
                (false, _) => {
                    println!("verdict: DENIED ({})", verdict.reason);
                    println!("to fix:  {}", verdict.hint);
                }
            }
        }
    }
    Ok(())
}
