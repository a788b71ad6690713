//! Offline validation of `manifests/` (each overlay as `kubectl kustomize` renders it) and of
//! the waypoint `meshctl waypoint generate` prints (no API server can run here): every object
//! against the
//! Kubernetes schema (k8s-openapi types, unknown fields rejected), RBAC against what mesh-ctrl
//! really watches and calls, the DaemonSet's token against what TokenReview checks, names that
//! refer to each other, and container flags against the binaries' own `--help`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use ferrymesh_testbed::kube_fake::kustomize;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{Container, Namespace, PodSpec, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use mesh_ctrl::schema::strict;
use serde::Deserialize;
use serde_yaml::Value;

/// A file of the base, as written.
fn manifest(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../manifests/base").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The overlays the README and manifests/README.md offer.
const OVERLAYS: [&str; 2] = ["kind", "production"];

/// The objects of one manifest file, each checked against its Kubernetes type.
#[derive(Default)]
struct Objects {
    namespaces: Vec<Namespace>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    cluster_role_bindings: Vec<ClusterRoleBinding>,
    roles: Vec<Role>,
    role_bindings: Vec<RoleBinding>,
    deployments: Vec<Deployment>,
    daemon_sets: Vec<DaemonSet>,
    services: Vec<Service>,
    crds: Vec<CustomResourceDefinition>,
    gateways: Vec<gateway_api::gateways::Gateway>,
    disruption_budgets: Vec<PodDisruptionBudget>,
}

/// Parses and validates every document of `text`; the first error names document, object and
/// field.
fn validate(text: &str) -> Result<Objects, String> {
    let mut objects = Objects::default();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let doc = Value::deserialize(doc).map_err(|e| format!("document {i}: invalid YAML: {e}"))?;
        if doc.is_null() {
            continue;
        }
        let api_version = doc["apiVersion"].as_str().unwrap_or_default().to_string();
        let kind = doc["kind"].as_str().unwrap_or_default().to_string();
        let name = doc["metadata"]["name"].as_str().unwrap_or_default().to_string();
        let named = |(field, message): (Option<String>, String)| {
            format!("document {i} ({kind} {name}): field {}: {message}", field.unwrap_or_else(|| ".".into()))
        };
        match (api_version.as_str(), kind.as_str()) {
            ("v1", "Namespace") => objects.namespaces.push(strict(doc).map_err(named)?),
            ("v1", "ServiceAccount") => objects.service_accounts.push(strict(doc).map_err(named)?),
            ("v1", "Service") => objects.services.push(strict(doc).map_err(named)?),
            ("rbac.authorization.k8s.io/v1", "ClusterRole") => objects.cluster_roles.push(strict(doc).map_err(named)?),
            ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                objects.cluster_role_bindings.push(strict(doc).map_err(named)?)
            }
            ("rbac.authorization.k8s.io/v1", "Role") => objects.roles.push(strict(doc).map_err(named)?),
            ("rbac.authorization.k8s.io/v1", "RoleBinding") => objects.role_bindings.push(strict(doc).map_err(named)?),
            ("apps/v1", "Deployment") => objects.deployments.push(strict(doc).map_err(named)?),
            ("apps/v1", "DaemonSet") => objects.daemon_sets.push(strict(doc).map_err(named)?),
            ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => objects.crds.push(strict(doc).map_err(named)?),
            ("gateway.networking.k8s.io/v1", "Gateway") => {
                // kube's derived custom resource types imply apiVersion and kind, not hold them.
                let mut doc = doc;
                let map = doc.as_mapping_mut().expect("a document with a kind is a mapping");
                map.remove("apiVersion");
                map.remove("kind");
                objects.gateways.push(strict(doc).map_err(named)?)
            }
            ("policy/v1", "PodDisruptionBudget") => objects.disruption_budgets.push(strict(doc).map_err(named)?),
            _ => return Err(format!("document {i}: {api_version} {kind} is not a kind this test knows")),
        }
    }
    Ok(objects)
}

fn grants(rules: &[PolicyRule], group: &str, resource: &str, verb: &str, name: Option<&str>) -> bool {
    rules.iter().any(|r| {
        r.api_groups.iter().flatten().any(|g| g == group)
            && r.resources.iter().flatten().any(|x| x == resource)
            && r.verbs.iter().any(|v| v == verb || v == "*")
            && match (&r.resource_names, name) {
                (None, _) => true,
                (Some(names), Some(n)) => names.iter().any(|x| x == n),
                (Some(_), None) => false,
            }
    })
}

fn pod_spec(template: &k8s_openapi::api::core::v1::PodTemplateSpec) -> &PodSpec {
    template.spec.as_ref().expect("a pod template has a spec")
}

/// `--flag=value` arguments of a container, as flag -> value.
fn flags(container: &Container) -> BTreeMap<String, String> {
    container
        .args
        .iter()
        .flatten()
        .map(|a| {
            let (flag, value) = a.split_once('=').unwrap_or((a, ""));
            (flag.to_string(), value.to_string())
        })
        .collect()
}

/// The pod presents its projected token as TokenReview checks it (audience `ferrymesh`) at the
/// container's `--token-file`.
fn assert_projected_token(spec: &PodSpec, container: &Container) {
    let token_volume = spec.volumes.iter().flatten().find(|v| v.projected.is_some()).expect("a projected token");
    let sources = token_volume.projected.as_ref().unwrap().sources.iter().flatten();
    let token = sources.clone().find_map(|s| s.service_account_token.as_ref()).expect("a serviceAccountToken source");
    assert_eq!(token.audience.as_deref(), Some(mesh_ctrl::ca::token_review::AUDIENCE));
    let mount = container.volume_mounts.iter().flatten().find(|m| m.name == token_volume.name).unwrap();
    assert_eq!(flags(container)["--token-file"], format!("{}/{}", mount.mount_path, token.path));
}

/// The pod mounts the root ConfigMap mesh-ctrl publishes whole (no subPath: a rotated root
/// reaches it) at the container's `--ca-root`.
fn assert_root_mounted(spec: &PodSpec, container: &Container) {
    let root_volume = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.config_map.as_ref().is_some_and(|c| c.name == mesh_ctrl::ca::secret::ROOT_CONFIGMAP))
        .expect("the root ConfigMap as a volume");
    let root_mount = container.volume_mounts.iter().flatten().find(|m| m.name == root_volume.name).unwrap();
    assert!(root_mount.sub_path.is_none(), "no subPath: ConfigMap updates reach the pod");
    let root_file = format!("{}/{}", root_mount.mount_path, mesh_ctrl::ca::secret::ROOT_CONFIGMAP_KEY);
    assert_eq!(flags(container)["--ca-root"], root_file);
}

/// Every flag the manifest passes to `binary` is one its `--help` lists.
fn assert_flags_exist(binary: &str, container: &Container) {
    let help = Command::new(ferrymesh_testbed::mesh::bin(binary)).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in flags(container).keys() {
        assert!(
            help.contains(&format!("{flag} "))
                || help.contains(&format!("{flag}\n"))
                || help.contains(&format!("{flag} <")),
            "{binary} has no flag {flag}"
        );
    }
}

#[test]
fn the_manifests_are_valid_kubernetes_and_consistent_with_the_code() {
    for overlay in OVERLAYS {
        let objects = validate(&kustomize(overlay)).unwrap_or_else(|e| panic!("overlay {overlay}: {e}"));
        assert_consistent(&objects);
    }
}

/// Every container of the DaemonSet and the Deployment, init containers included.
fn containers(objects: &Objects) -> Vec<&Container> {
    let specs = objects
        .deployments
        .iter()
        .map(|d| pod_spec(&d.spec.as_ref().unwrap().template))
        .chain(objects.daemon_sets.iter().map(|d| pod_spec(&d.spec.as_ref().unwrap().template)));
    specs.flat_map(|s| s.containers.iter().chain(s.init_containers.iter().flatten())).collect()
}

/// The kind overlay runs the images `cargo xtask image` builds (its default registry, this
/// version), loaded into the nodes and never pulled; production pulls them from a registry,
/// pinned by digest. Neither names Docker Hub.
#[test]
fn the_overlays_take_their_images_from_where_they_say() {
    let kind = validate(&kustomize("kind")).unwrap();
    let version = env!("CARGO_PKG_VERSION");
    for c in containers(&kind) {
        let image = c.image.as_deref().unwrap();
        let name = image.strip_prefix("localhost/ferrymesh/").and_then(|i| i.strip_suffix(&format!(":{version}")));
        assert!(matches!(name, Some("mesh-ctrl" | "mesh-agent")), "kind: {} runs {image}", c.name);
        assert_eq!(c.image_pull_policy.as_deref(), Some("Never"), "kind: {}", c.name);
    }
    let production = validate(&kustomize("production")).unwrap();
    for c in containers(&production) {
        let image = c.image.as_deref().unwrap();
        let (name, digest) = image.split_once("@sha256:").unwrap_or_else(|| panic!("{image} has no digest"));
        assert!(digest.len() == 64 && digest.chars().all(|d| d.is_ascii_hexdigit()), "{image}");
        let registry = name.split('/').next().unwrap();
        assert!(registry.contains('.') && registry != "localhost", "production: {} pulls {image}", c.name);
        assert_eq!(c.image_pull_policy, None, "production: {} keeps the default (IfNotPresent for a digest)", c.name);
    }
    // Both the Deployment and the DaemonSet, with the init container: nothing was missed.
    assert_eq!((containers(&kind).len(), containers(&production).len()), (3, 3));
    // And the waypoint image `meshctl waypoint generate` defaults to is the kind overlay's kind.
    let generated =
        validate(&String::from_utf8(meshctl(&["waypoint", "generate", "-n", "shop"]).stdout).unwrap()).unwrap();
    let waypoint = generated.deployments[0].spec.as_ref().unwrap();
    assert_eq!(
        pod_spec(&waypoint.template).containers[0].image.as_deref(),
        Some(&*format!("localhost/ferrymesh/mesh-waypoint:{version}"))
    );
}

/// mesh-ctrl runs two replicas spread over nodes, and a drain keeps one.
#[test]
fn mesh_ctrl_is_replicated_and_guarded_by_a_disruption_budget() {
    let objects = validate(&kustomize("kind")).unwrap();
    let ctrl = objects.deployments[0].spec.as_ref().unwrap();
    assert_eq!(ctrl.replicas, Some(2));
    let spread = pod_spec(&ctrl.template).topology_spread_constraints.as_deref().unwrap_or_default();
    assert!(spread.iter().any(|s| s.topology_key == "kubernetes.io/hostname" && s.max_skew == 1), "{spread:?}");
    let budget =
        objects.disruption_budgets.iter().find(|b| b.metadata.name.as_deref() == Some("ferrymesh-ctrl")).unwrap();
    let budget = budget.spec.as_ref().unwrap();
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    assert_eq!(budget.min_available, Some(IntOrString::Int(1)));
    assert!(selects(budget.selector.as_ref().unwrap(), &ctrl.template));
}

/// The consistency of one rendering of the manifests with the code.
fn assert_consistent(objects: &Objects) {
    assert_eq!(objects.namespaces[0].metadata.name.as_deref(), Some("ferrymesh-system"));
    assert_eq!(objects.crds.len(), 5, "the CRDs come with every overlay");

    // mesh-ctrl's RBAC covers exactly what the code does with the API.
    let ctrl = &objects.deployments[0];
    let ctrl_spec = pod_spec(&ctrl.spec.as_ref().unwrap().template);
    let ctrl_sa = ctrl_spec.service_account_name.as_deref().unwrap();
    let binding = objects
        .cluster_role_bindings
        .iter()
        .find(|b| b.subjects.iter().flatten().any(|s| s.kind == "ServiceAccount" && s.name == ctrl_sa))
        .expect("a ClusterRoleBinding for mesh-ctrl's service account");
    let role = objects
        .cluster_roles
        .iter()
        .find(|r| r.metadata.name.as_deref() == Some(binding.role_ref.name.as_str()))
        .expect("the bound ClusterRole");
    let rules = role.rules.as_deref().unwrap_or_default();
    for (group, resource) in mesh_ctrl::source::kube::watched_resources() {
        for verb in ["list", "watch"] {
            assert!(grants(rules, &group, &resource, verb, None), "mesh-ctrl may not {verb} {group}/{resource}");
        }
    }
    for (group, resource) in mesh_ctrl::source::kube::written_status() {
        assert!(grants(rules, &group, &resource, "patch", None), "mesh-ctrl may not patch {group}/{resource}");
    }
    assert!(grants(rules, "authentication.k8s.io", "tokenreviews", "create", None));
    // The root ConfigMap, in ferrymesh-system and in waypoints' namespaces.
    let root_cm = Some(mesh_ctrl::ca::secret::ROOT_CONFIGMAP);
    assert!(grants(rules, "", "configmaps", "patch", root_cm), "mesh-ctrl applies the root ConfigMap");
    assert!(grants(rules, "", "configmaps", "create", None));
    assert!(!grants(rules, "", "configmaps", "patch", Some("kube-root-ca.crt")), "and no other ConfigMap");
    let ns_binding = objects
        .role_bindings
        .iter()
        .find(|b| b.subjects.iter().flatten().any(|s| s.name == ctrl_sa))
        .expect("a RoleBinding for mesh-ctrl in its namespace");
    let ns_role = objects.roles.iter().find(|r| r.metadata.name.as_deref() == Some(ns_binding.role_ref.name.as_str()));
    let ns_rules = ns_role.expect("the bound Role").rules.as_deref().unwrap_or_default();
    assert!(grants(ns_rules, "", "secrets", "get", Some(mesh_ctrl::ca::secret::CA_SECRET)));
    assert!(grants(ns_rules, "", "secrets", "create", None));
    assert!(!grants(ns_rules, "", "secrets", "get", Some("some-other-secret")), "mesh-ctrl reads its CA Secret only");
    assert!(objects.service_accounts.iter().any(|s| s.metadata.name.as_deref() == Some(ctrl_sa)));

    // The agent DaemonSet presents the token TokenReview expects, as the service account
    // mesh-ctrl accepts.
    let agent = &objects.daemon_sets[0];
    let agent_spec = pod_spec(&agent.spec.as_ref().unwrap().template);
    let agent_sa = agent_spec.service_account_name.as_deref().unwrap();
    assert!(objects.service_accounts.iter().any(|s| s.metadata.name.as_deref() == Some(agent_sa)));
    let ctrl_flags = flags(&ctrl_spec.containers[0]);
    assert_eq!(ctrl_flags["--agent-service-account"], agent_sa);
    assert!(ctrl_flags.contains_key("--kubernetes"));
    assert_eq!(agent_spec.host_network, Some(true), "15008 and capture are node-level");
    assert_eq!(agent_spec.host_pid, Some(true), "netns discovery reads /proc/<pid>/cgroup of pods");
    let container = &agent_spec.containers[0];
    // Not privileged: the capabilities the code needs, which an e2e test
    // (`an_agent_serves_with_only_the_daemonsets_capabilities_and_a_read_only_proc_sys`) runs it with.
    let security = container.security_context.as_ref().expect("agent securityContext");
    assert_ne!(security.privileged, Some(true), "the agent is not privileged");
    let caps = security.capabilities.as_ref().expect("capabilities");
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
    let added: Vec<&str> = caps.add.iter().flatten().map(String::as_str).collect();
    assert_eq!(added, ["BPF", "PERFMON", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"]);
    let sysctl_mount = container.volume_mounts.iter().flatten().find(|m| m.name == "proc-sys-net").expect("sysctls");
    let agent_flags = flags(container);
    assert_eq!(agent_flags["--proc-sys-net"], sysctl_mount.mount_path);
    assert_ne!(sysctl_mount.read_only, Some(true));
    assert_projected_token(agent_spec, container);
    let cgroup = container.volume_mounts.iter().flatten().any(|m| m.mount_path == "/sys/fs/cgroup");
    assert!(cgroup, "the agent attaches at the node's cgroup2 root");
    // It pins under the node's bpf filesystem, and upgrades with a surge: the new agent takes
    // over beside the old one, which drains within the termination grace period.
    let bpffs = container.volume_mounts.iter().flatten().find(|m| m.mount_path == "/sys/fs/bpf").expect("bpffs mount");
    assert_eq!(bpffs.mount_propagation.as_deref(), Some("HostToContainer"));
    assert!(agent_flags["--bpf-dir"].starts_with("/sys/fs/bpf/"), "{agent_flags:?}");
    let run = container.volume_mounts.iter().flatten().find(|m| m.name == "run").expect("run mount");
    assert!(agent_flags["--handover-socket"].starts_with(&format!("{}/", run.mount_path)), "shared by both agents");
    // The CNI plugin is chained into the node's configuration, and reaches the agent through the
    // host's run directory (the plugin runs on the host, invoked by the runtime).
    let run_volume = agent_spec.volumes.iter().flatten().find(|v| v.name == "run").expect("run volume");
    let run_host = run_volume.host_path.as_ref().expect("run is a host directory").path.clone();
    assert!(agent_flags["--cni-socket"].starts_with(&format!("{}/", run.mount_path)), "{agent_flags:?}");
    assert_eq!(run.mount_path, run_host, "the plugin finds the socket at the same path on the host");
    let install = agent_spec.init_containers.iter().flatten().find(|c| c.name == "install-cni").expect("install-cni");
    let install_flags = flags(install);
    assert!(install_flags.contains_key("--install-cni"), "{install_flags:?}");
    assert_eq!(install_flags["--cni-socket"], agent_flags["--cni-socket"], "the plugin is told the agent's socket");
    // The running agent keeps it chained, in the same host directories.
    assert!(agent_flags.contains_key("--watch-cni"), "{agent_flags:?}");
    for (flag, host) in [("--cni-bin-dir", "/opt/cni/bin"), ("--cni-conf-dir", "/etc/cni/net.d")] {
        for (c, c_flags) in [(install, &install_flags), (container, &agent_flags)] {
            let mount = c.volume_mounts.iter().flatten().find(|m| m.mount_path == c_flags[flag]).expect(flag);
            let volume = agent_spec.volumes.iter().flatten().find(|v| v.name == mount.name).expect("its volume");
            assert_eq!(volume.host_path.as_ref().map(|h| h.path.as_str()), Some(host), "{}: {flag}", c.name);
        }
    }
    let rolling = agent.spec.as_ref().unwrap().update_strategy.as_ref().unwrap().rolling_update.as_ref().unwrap();
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    assert_eq!(
        (&rolling.max_surge, &rolling.max_unavailable),
        (&Some(IntOrString::Int(1)), &Some(IntOrString::Int(0)))
    );
    // Hardening (#18): probes, ports, limits, worker threads from the CPU limit, Linux nodes only,
    // never captured itself, its namespace's Pod Security level; mesh-ctrl under RuntimeDefault.
    let probe = container.readiness_probe.as_ref().and_then(|p| p.http_get.as_ref()).expect("agent readiness");
    assert_eq!(probe.path.as_deref(), Some("/healthz/ready"));
    assert_eq!(probe.port, IntOrString::Int(15021));
    let ports: Vec<i32> = container.ports.iter().flatten().map(|p| p.container_port).collect();
    assert_eq!(ports, [15020, 15021], "metrics and readiness are declared");
    let limits = container.resources.as_ref().and_then(|r| r.limits.as_ref()).expect("agent limits");
    assert!(limits.contains_key("cpu") && limits.contains_key("memory"), "{limits:?}");
    let threads = container.env.iter().flatten().find(|e| e.name == "FERRYMESH_WORKER_THREADS").expect("threads");
    let field = threads.value_from.as_ref().and_then(|v| v.resource_field_ref.as_ref()).expect("from a resource");
    assert_eq!(field.resource, "limits.cpu");
    let selector = agent_spec.node_selector.as_ref().expect("a node selector");
    assert_eq!(selector.get("kubernetes.io/os").map(String::as_str), Some("linux"));
    let pod_labels = agent.spec.as_ref().unwrap().template.metadata.as_ref().and_then(|m| m.labels.clone());
    assert_eq!(pod_labels.unwrap_or_default().get("ferrymesh.io/dataplane-mode").map(String::as_str), Some("none"));
    let namespace =
        objects.namespaces.iter().find(|n| n.metadata.name.as_deref() == agent.metadata.namespace.as_deref());
    let ns_labels = namespace.expect("the agent's namespace").metadata.labels.clone().unwrap_or_default();
    assert_eq!(ns_labels.get("pod-security.kubernetes.io/enforce").map(String::as_str), Some("privileged"));
    let ctrl_security = ctrl_spec.security_context.as_ref().and_then(|s| s.seccomp_profile.as_ref());
    assert_eq!(ctrl_security.map(|p| p.type_.as_str()), Some("RuntimeDefault"));
    assert!(ctrl_spec.containers[0].liveness_probe.is_some() && ctrl_spec.containers[0].readiness_probe.is_some());
    let grace = humantime::parse_duration(&agent_flags["--drain-grace"]).unwrap();
    assert!(
        agent_spec.termination_grace_period_seconds.unwrap() as u64 > grace.as_secs(),
        "the kubelet waits for the drain"
    );

    // The agent reaches mesh-ctrl through its Service.
    let service = &objects.services[0];
    let svc_name = service.metadata.name.as_deref().unwrap();
    let svc_ns = service.metadata.namespace.as_deref().unwrap();
    let svc_spec = service.spec.as_ref().unwrap();
    let port = svc_spec.ports.as_ref().unwrap()[0].port;
    assert_eq!(agent_flags["--ctrl"], format!("https://{svc_name}.{svc_ns}.svc:{port}"));
    // ... verifying it against the root mesh-ctrl publishes, mounted whole (no subPath: a
    // rotated root reaches the agent).
    assert!(
        mesh_ctrl::tls::SERVICE_NAMES.contains(&format!("{svc_name}.{svc_ns}.svc").as_str()),
        "mesh-ctrl's serving certificate names the Service agents dial"
    );
    assert_root_mounted(agent_spec, container);
    let ctrl_labels = ctrl.spec.as_ref().unwrap().template.metadata.as_ref().unwrap().labels.clone().unwrap();
    assert!(svc_spec.selector.as_ref().unwrap().iter().all(|(k, v)| ctrl_labels.get(k) == Some(v)));
    assert!(ctrl_flags["--listen"].ends_with(&format!(":{port}")));

    // Selectors select their own templates.
    let d = ctrl.spec.as_ref().unwrap();
    assert!(selects(&d.selector, &d.template));
    let ds = agent.spec.as_ref().unwrap();
    assert!(selects(&ds.selector, &ds.template));

    // Every flag exists in the binary it is given to.
    assert_flags_exist("mesh-ctrl", &ctrl_spec.containers[0]);
    assert_flags_exist("mesh-agent", container);
}

#[test]
fn the_crd_manifest_is_valid_kubernetes() {
    let objects = validate(&manifest("crds.yaml")).unwrap();
    let names: Vec<&str> = objects.crds.iter().filter_map(|c| c.metadata.name.as_deref()).collect();
    assert_eq!(
        names,
        [
            "authorizationpolicies.ferrymesh.io",
            "peerauthentications.ferrymesh.io",
            "trafficpolicies.ferrymesh.io",
            "destinationrules.ferrymesh.io",
            "requestauthentications.ferrymesh.io"
        ]
    );
}

/// The validation is not a rubber stamp: a misspelt field or a wrong type in the real manifest
/// each fail, named. (A missing required scalar is not caught here: k8s-openapi fills it with
/// its default; the consistency checks above cover the fields that matter to ferrymesh.)
#[test]
fn a_broken_manifest_is_rejected_with_the_field_named() {
    let good = manifest("ferrymesh.yaml");
    let cases = [
        (
            "      hostPID: true",
            "      hostPid: true",
            "document 10 (DaemonSet ferrymesh-agent): field spec.template.spec.hostPid",
        ),
        ("  replicas: 2", "  replicas: two", "document 7 (Deployment ferrymesh-ctrl): field spec.replicas"),
        ("  verbs: [create]", "  verbs: create", "document 3 (ClusterRole ferrymesh-ctrl): field rules[3].verbs"),
    ];
    for (from, to, want) in cases {
        assert!(good.contains(from), "{from:?} is in the manifest");
        let broken = good.replacen(from, to, 1);
        let e = validate(&broken).err().unwrap_or_else(|| panic!("{to:?} was accepted"));
        assert!(e.starts_with(want), "{e}");
    }
}

/// The label selector selects the template's pods.
fn selects(
    selector: &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
    template: &k8s_openapi::api::core::v1::PodTemplateSpec,
) -> bool {
    let labels = template.metadata.as_ref().and_then(|m| m.labels.clone()).unwrap_or_default();
    selector.match_labels.iter().flatten().all(|(k, v)| labels.get(k) == Some(v))
}

fn meshctl(args: &[&str]) -> std::process::Output {
    Command::new(ferrymesh_testbed::mesh::bin("meshctl")).args(args).output().unwrap()
}

/// `meshctl waypoint generate` prints a waypoint mesh-ctrl recognizes, whose pods obtain its
/// identity and reach mesh-ctrl the way the code and the agent's manifest do.
#[test]
fn a_generated_waypoint_is_valid_kubernetes_and_consistent_with_the_code() {
    use mesh_ctrl::model::{WaypointFor, GATEWAY_NAME_LABEL};
    use mesh_ctrl::source::translate::{waypoint_from, ObjectKey};

    let rls = "http://ratelimit.infra.svc:8081";
    let out = meshctl(&[
        "waypoint",
        "generate",
        "-n",
        "shop",
        "--for",
        "all",
        "--replicas",
        "2",
        "--rate-limit-service",
        rls,
        "--tracing-collector",
        "http://otel-collector.infra.svc:4317",
        "wp",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let objects = validate(&String::from_utf8(out.stdout).unwrap()).unwrap();

    // A waypoint of the mesh, taking the traffic asked for.
    let key = ObjectKey { kind: "Gateway".into(), namespace: "shop".into(), name: "wp".into() };
    let waypoint = waypoint_from(objects.gateways[0].clone(), &key).unwrap().expect("a ferrymesh waypoint");
    assert_eq!(waypoint.traffic, WaypointFor::All);

    // Its pods run as the Gateway's service account and carry the label agents find them by.
    assert_eq!(objects.service_accounts[0].metadata.name.as_deref(), Some("wp"));
    let deployment = objects.deployments[0].spec.as_ref().unwrap();
    assert_eq!(deployment.replicas, Some(2));
    assert!(selects(&deployment.selector, &deployment.template));
    let labels = deployment.template.metadata.as_ref().unwrap().labels.clone().unwrap();
    assert_eq!(labels.get(GATEWAY_NAME_LABEL).map(String::as_str), Some("wp"));
    let spec = pod_spec(&deployment.template);
    assert_eq!(spec.service_account_name.as_deref(), Some("wp"));
    let container = &spec.containers[0];
    let security = container.security_context.as_ref().unwrap();
    assert_eq!(security.privileged, None, "a waypoint needs no privilege");
    assert_eq!(security.capabilities.as_ref().unwrap().drop, Some(vec!["ALL".to_string()]));
    let budget = objects.disruption_budgets[0].spec.as_ref().unwrap();
    let template_pods = &deployment.template;
    assert!(selects(budget.selector.as_ref().unwrap(), template_pods), "the budget covers the waypoint's pods");

    // Its own projected token, as TokenReview checks it, at --token-file.
    let waypoint_flags = flags(container);
    assert_eq!((waypoint_flags["--namespace"].as_str(), waypoint_flags["--name"].as_str()), ("shop", "wp"));
    assert_eq!(waypoint_flags["--rate-limit-service"], rls, "global rate limits are counted there");
    assert_eq!(waypoint_flags["--tracing-collector"], "http://otel-collector.infra.svc:4317", "spans go there");
    assert_projected_token(spec, container);
    // The root ConfigMap mesh-ctrl keeps in the waypoint's namespace.
    assert_root_mounted(spec, container);
    // mesh-ctrl at the address the agents dial.
    let system = validate(&manifest("ferrymesh.yaml")).unwrap();
    let agent_flags = flags(&pod_spec(&system.daemon_sets[0].spec.as_ref().unwrap().template).containers[0]);
    assert_eq!(waypoint_flags["--ctrl"], agent_flags["--ctrl"]);
    // Every flag and environment variable is one mesh-waypoint reads.
    assert_flags_exist("mesh-waypoint", container);
    let help = Command::new(ferrymesh_testbed::mesh::bin("mesh-waypoint")).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for env in container.env.iter().flatten() {
        assert!(help.contains(&format!("[env: {}=", env.name)), "mesh-waypoint reads no {}", env.name);
    }
    // The readiness probe is the HBONE port, which opens once config and certificate are there.
    let probe = container.readiness_probe.as_ref().unwrap().tcp_socket.as_ref().unwrap();
    assert_eq!(probe.port, k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(15008));

    // One replica: no budget. Bad input: a one-line error, nothing printed.
    let one = meshctl(&["waypoint", "generate", "-n", "shop"]);
    let one = validate(&String::from_utf8(one.stdout).unwrap()).unwrap();
    assert!(one.disruption_budgets.is_empty());
    assert_eq!(one.gateways[0].metadata.name.as_deref(), Some("waypoint"));
    for (args, error) in [
        (&["waypoint", "generate", "-n", "shop", "--replicas", "0"][..], "--replicas <REPLICAS>"),
        (&["waypoint", "generate", "-n", "shop", "--for", "none"][..], "--for <TRAFFIC>"),
        (&["waypoint", "generate"][..], "--namespace <NAMESPACE>"),
    ] {
        let out = meshctl(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(out.stdout.is_empty());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.starts_with("meshctl: ") && stderr.contains(error) && stderr.lines().count() == 1, "{stderr}");
    }
}
