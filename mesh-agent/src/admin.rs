//! The admin API: gRPC over a unix socket (default /var/run/ferrymesh/agent.sock) serving
//! flows (recent and live), status and the config the agent holds to `meshctl`. Read-only: it
//! never changes the data path.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ferrymesh_api::admin::{self as proto, agent_admin_server};
use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};

use crate::ebpf::{Datapath, MapStats};
use crate::enroll::EnrolledSummary;
use crate::flows::FlowTable;
use crate::identity::IdentityManager;
use crate::state::State;

/// Implementation of `ferrymesh.admin.v1.AgentAdmin`.
#[derive(Debug, Clone)]
pub struct AdminService {
    /// Node this agent serves.
    pub node: String,
    /// Control-plane status.
    pub state: Arc<State>,
    /// Recent flows.
    pub flows: Arc<FlowTable>,
    /// Attached programs.
    pub datapath: Arc<Mutex<Datapath>>,
    /// eBPF counters and map fill.
    pub map_stats: Arc<MapStats>,
    /// Enrolled pods as the enroller publishes them.
    pub enrolled: watch::Receiver<Vec<EnrolledSummary>>,
    /// Certificates held.
    pub identities: Arc<IdentityManager>,
}

type FlowStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<proto::Flow, Status>> + Send>>;

#[tonic::async_trait]
impl agent_admin_server::AgentAdmin for AdminService {
    type WatchFlowsStream = FlowStream;

    async fn watch_flows(&self, _: Request<proto::WatchFlowsRequest>) -> Result<Response<FlowStream>, Status> {
        use tokio_stream::StreamExt;
        // A follower that lags behind skips the flows it missed rather than failing.
        let live = tokio_stream::wrappers::BroadcastStream::new(self.flows.subscribe())
            .filter_map(|flow| flow.ok().map(|f| Ok(proto::Flow::from(&f))));
        Ok(Response::new(Box::pin(live)))
    }

    async fn get_config(&self, _: Request<proto::GetConfigRequest>) -> Result<Response<proto::ConfigDump>, Status> {
        let (_, version) = self.state.ctrl_status();
        Ok(Response::new(proto::ConfigDump {
            version,
            trust_domain: self.state.trust_domain().borrow().clone(),
            certificates: self.identities.enabled(),
            objects: Some(self.state.dump().to_snapshot()),
            node: self.node.clone(),
        }))
    }

    async fn list_flows(
        &self,
        _: Request<proto::ListFlowsRequest>,
    ) -> Result<Response<proto::ListFlowsResponse>, Status> {
        let flows = self.flows.snapshot().iter().map(proto::Flow::from).collect();
        Ok(Response::new(proto::ListFlowsResponse { flows }))
    }

    async fn status(&self, _: Request<proto::StatusRequest>) -> Result<Response<proto::StatusResponse>, Status> {
        let (ctrl_connected, config_version) = self.state.ctrl_status();
        let enrolled: Vec<EnrolledSummary> = self.enrolled.borrow().clone();
        let (programs, bpf_dir, adopted) = {
            let datapath = self.datapath.lock().expect("datapath lock");
            let mut programs: Vec<proto::Program> = datapath
                .attached()
                .iter()
                .map(|a| proto::Program {
                    name: a.name.into(),
                    id: a.prog_id,
                    attach: a.attach.clone(),
                    link_ids: vec![a.link_id],
                })
                .collect();
            let (name, id) = datapath.sk_lookup_program();
            programs.push(proto::Program {
                name: name.into(),
                id,
                attach: format!("netns of {} enrolled pods (sk_lookup)", enrolled.len()),
                link_ids: enrolled.iter().map(|e| e.sk_lookup_link_id).collect(),
            });
            (programs, datapath.bpf_dir().display().to_string(), datapath.adopted().clone())
        };
        let counters = self
            .map_stats
            .counters()
            .into_iter()
            .map(|(c, value)| proto::Counter { name: c.name().into(), value })
            .collect();
        let enrolled = enrolled
            .into_iter()
            .map(|e| proto::EnrolledPod {
                namespace: e.namespace,
                name: e.name,
                ip: e.ip.to_string(),
                other_ips: e.other_ips.iter().map(ToString::to_string).collect(),
                netns_cookie: e.netns_cookie,
                sk_lookup_link_id: e.sk_lookup_link_id,
                adopted: e.adopted,
            })
            .collect();
        let unix_ms =
            |t: std::time::SystemTime| t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        let certs = self
            .identities
            .all()
            .iter()
            .map(|c| proto::Cert {
                identity: c.spiffe_id.to_string(),
                serial: c.serial.clone(),
                not_after_unix_ms: unix_ms(c.not_after),
                rotate_at_unix_ms: unix_ms(c.rotate_at),
                issuer_sha256: c.issuer_sha256.clone(),
            })
            .collect();
        let trust = self.state.trust().borrow().clone();
        let trust_roots = trust
            .as_ref()
            .map(|t| {
                t.info
                    .iter()
                    .map(|r| proto::TrustRoot {
                        subject: r.subject.clone(),
                        sha256: r.sha256.clone(),
                        not_after_unix_ms: unix_ms(r.not_after),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let issuer_sha256 = trust.map(|t| t.issuer_sha256.clone()).unwrap_or_default();
        // Counting walks every key: off the async threads.
        let stats = self.map_stats.clone();
        let maps = tokio::task::spawn_blocking(move || stats.map_fill())
            .await
            .map_err(|e| Status::internal(format!("map fill: {e}")))?
            .into_iter()
            .map(|(name, entries, max_entries)| proto::MapFill { name: name.into(), entries, max_entries })
            .collect();
        Ok(Response::new(proto::StatusResponse {
            maps,
            certs,
            node: self.node.clone(),
            ctrl_connected,
            config_version,
            enrolled,
            programs,
            counters,
            trust_roots,
            issuer_sha256,
            bpf_dir,
            adopted_maps: adopted.maps,
            adopted_links: adopted.links as u32,
        }))
    }
}

/// Serves `service` on the unix socket at `path` until `shutdown` fires, then removes it. The
/// socket is the owner's only (0600), or also `group`'s (0660) when one is given.
pub async fn serve(
    path: PathBuf,
    group: Option<String>,
    service: AdminService,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let listener = bind(&path, group.as_deref())?;
    let result = tonic::transport::Server::builder()
        .add_service(agent_admin_server::AgentAdminServer::new(service))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async move {
            let _ = shutdown.changed().await;
        })
        .await;
    let _ = std::fs::remove_file(&path);
    result.map_err(std::io::Error::other)
}

fn bind(path: &Path, group: Option<&str>) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // A socket file left by a killed agent would make bind fail.
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {}: {e}", path.display())))?;
    use std::os::unix::fs::PermissionsExt;
    let mode = match group {
        None => 0o600,
        Some(name) => {
            let etc_group = std::fs::read_to_string(ETC_GROUP).unwrap_or_default();
            let gid = group_id(name, &etc_group).ok_or_else(|| {
                std::io::Error::other(format!("--admin-group {name}: no such group in {ETC_GROUP} (a GID works too)"))
            })?;
            std::os::unix::fs::chown(path, None, Some(gid))?;
            0o660
        }
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(listener)
}

const ETC_GROUP: &str = "/etc/group";

/// The GID `--admin-group` names: a number, or a group of `etc_group` (the text of /etc/group).
/// The file is read here, not through glibc's NSS: the agent is linked statically, and an NSS
/// module other than `files` (systemd's, sssd's) is loaded with dlopen, which crashes a static
/// process.
fn group_id(spec: &str, etc_group: &str) -> Option<u32> {
    if let Ok(gid) = spec.parse() {
        return Some(gid);
    }
    etc_group.lines().find_map(|line| {
        let mut fields = line.split(':');
        if fields.next()? != spec {
            return None;
        }
        fields.nth(1)?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    use super::*;

    #[tokio::test]
    async fn the_admin_socket_is_the_owners_or_its_groups_only() {
        let dir = std::env::temp_dir().join(format!("ferrymesh-admin-test-{}", std::process::id()));
        let path = dir.join("agent.sock");
        let _listener = bind(&path, None).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        // A group of /etc/group other than the process's own, so the chown shows.
        let own = nix::unistd::getgid().as_raw();
        let etc_group = std::fs::read_to_string(ETC_GROUP).unwrap();
        let (name, gid) = etc_group
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                Some((f.first()?.to_string(), f.get(2)?.parse::<u32>().ok()?))
            })
            .find(|(_, gid)| *gid != own)
            .expect("/etc/group has a group other than the process's");
        let _listener = bind(&path, Some(&name)).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!((meta.permissions().mode() & 0o777, meta.gid()), (0o660, gid), "--admin-group {name}");
        let _listener = bind(&path, Some(&own.to_string())).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().gid(), own, "--admin-group {own}");
        let e = bind(&path, Some("no-such-group-ferrymesh")).unwrap_err();
        assert!(e.to_string().contains("--admin-group no-such-group-ferrymesh: no such group in /etc/group"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn admin_group_names_a_gid_or_a_group_of_etc_group() {
        let etc_group = "root:x:0:\nadm:x:4:syslog,alice\n# a comment\n+nis\nmesh:*:1500:\nbroken:x:notanumber:\n";
        for (spec, gid) in [
            ("root", Some(0)),
            ("adm", Some(4)),
            ("mesh", Some(1500)),
            ("1500", Some(1500)),
            ("42", Some(42)),
            ("broken", None),
            ("x", None),
            ("ad", None),
            ("", None),
            ("+nis", None),
        ] {
            assert_eq!(group_id(spec, etc_group), gid, "{spec:?}");
        }
    }
}
