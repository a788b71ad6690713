//! The ferrymesh custom resources as kube types, from the one definition of their specs in
//! `ferrymesh-policy`: what the Kubernetes source watches, and the CRD manifests
//! (`manifests/base/crds.yaml`, kept in sync by a test).

use ferrymesh_policy::authn::RequestAuthenticationSpec;
use ferrymesh_policy::spec::{AuthorizationPolicySpec, PeerAuthenticationSpec};
use ferrymesh_route::destination::spec::DestinationRuleSpec;
use ferrymesh_route::traffic::spec::TrafficPolicySpec;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Spec of the `AuthorizationPolicy` custom resource (Istio's fields).
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[kube(group = "ferrymesh.io", version = "v1alpha1", kind = "AuthorizationPolicy", namespaced)]
#[kube(plural = "authorizationpolicies", root = "AuthorizationPolicyResource")]
pub struct AuthorizationPolicyResourceSpec {
    /// The policy.
    #[serde(flatten)]
    pub policy: AuthorizationPolicySpec,
}

/// Spec of the `PeerAuthentication` custom resource (Istio's fields).
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[kube(group = "ferrymesh.io", version = "v1alpha1", kind = "PeerAuthentication", namespaced)]
#[kube(plural = "peerauthentications", root = "PeerAuthenticationResource")]
pub struct PeerAuthenticationResourceSpec {
    /// The peer authentication.
    #[serde(flatten)]
    pub peer_authentication: PeerAuthenticationSpec,
}

/// Spec of the `TrafficPolicy` custom resource (faults with Istio's fields, attached by
/// Gateway API `targetRefs`).
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[kube(group = "ferrymesh.io", version = "v1alpha1", kind = "TrafficPolicy", namespaced)]
#[kube(plural = "trafficpolicies", root = "TrafficPolicyResource")]
pub struct TrafficPolicyResourceSpec {
    /// The policy.
    #[serde(flatten)]
    pub policy: TrafficPolicySpec,
}

/// Spec of the `DestinationRule` custom resource (Istio's fields).
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[kube(group = "ferrymesh.io", version = "v1alpha1", kind = "DestinationRule", namespaced)]
#[kube(plural = "destinationrules", root = "DestinationRuleResource")]
pub struct DestinationRuleResourceSpec {
    /// The rule.
    #[serde(flatten)]
    pub rule: DestinationRuleSpec,
}

/// Spec of the `RequestAuthentication` custom resource (Istio's fields, attached by
/// `targetRefs`).
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[kube(group = "ferrymesh.io", version = "v1alpha1", kind = "RequestAuthentication", namespaced)]
#[kube(plural = "requestauthentications", root = "RequestAuthenticationResource")]
pub struct RequestAuthenticationResourceSpec {
    /// The request authentication.
    #[serde(flatten)]
    pub request_authentication: RequestAuthenticationSpec,
}

/// The CRD manifests, as multi-document YAML.
pub fn manifests() -> String {
    use kube::CustomResourceExt;
    let crds = [
        AuthorizationPolicyResource::crd(),
        PeerAuthenticationResource::crd(),
        TrafficPolicyResource::crd(),
        DestinationRuleResource::crd(),
        RequestAuthenticationResource::crd(),
    ];
    let docs: Vec<String> = crds.iter().map(|c| serde_yaml::to_string(c).expect("CRD serializes")).collect();
    format!("# Generated from mesh-ctrl/src/crd.rs; `cargo test -p mesh-ctrl crd` checks it.\n{}", docs.join("---\n"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn crd_manifests_are_in_sync_with_the_types() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/base/crds.yaml");
        let want = super::manifests();
        if std::env::var_os("FERRYMESH_UPDATE_MANIFESTS").is_some() {
            std::fs::write(&path, &want).unwrap();
        }
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            have == want,
            "manifests/base/crds.yaml is stale: regenerate with FERRYMESH_UPDATE_MANIFESTS=1 cargo test -p mesh-ctrl crd"
        );
        assert!(
            want.contains("kind: CustomResourceDefinition")
                && want.contains("name: authorizationpolicies.ferrymesh.io")
        );
    }
}
