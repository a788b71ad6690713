//! The admin API: gRPC over a unix socket (default /var/run/ferrymesh/agent.sock) serving
//! flows and status to `meshctl`. Read-only: it never changes the data path.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ferrymesh_api::admin::{self as proto, agent_admin_server};
use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};

use crate::ebpf::Datapath;
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
    /// Programs and counters.
    pub datapath: Arc<Mutex<Datapath>>,
    /// Enrolled pods as the enroller publishes them.
    pub enrolled: watch::Receiver<Vec<EnrolledSummary>>,
    /// Certificates held.
    pub identities: Arc<IdentityManager>,
}

#[tonic::async_trait]
impl agent_admin_server::AgentAdmin for AdminService {
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
        let (programs, counters) = {
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
            let counters = datapath
                .counters()
                .into_iter()
                .map(|(c, value)| proto::Counter { name: c.name().into(), value })
                .collect();
            (programs, counters)
        };
        let enrolled = enrolled
            .into_iter()
            .map(|e| proto::EnrolledPod {
                namespace: e.namespace,
                name: e.name,
                ip: e.ip.to_string(),
                netns_cookie: e.netns_cookie,
                sk_lookup_link_id: e.sk_lookup_link_id,
            })
            .collect();
        let unix_ms =
            |t: std::time::SystemTime| t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        let certs = self
            .identities
            .all()
            .iter()
            .map(|c| proto::Cert {
                identity: c.spiffe_id.clone(),
                serial: c.serial.clone(),
                not_after_unix_ms: unix_ms(c.not_after),
                rotate_at_unix_ms: unix_ms(c.rotate_at),
            })
            .collect();
        Ok(Response::new(proto::StatusResponse {
            certs,
            node: self.node.clone(),
            ctrl_connected,
            config_version,
            enrolled,
            programs,
            counters,
        }))
    }
}

/// Serves `service` on the unix socket at `path` until `shutdown` fires, then removes it.
pub async fn serve(path: PathBuf, service: AdminService, mut shutdown: watch::Receiver<bool>) -> std::io::Result<()> {
    let listener = bind(&path)?;
    let result = tonic::transport::Server::builder()
        .add_service(agent_admin_server::AgentAdminServer::new(service))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async move {
            let _ = shutdown.changed().await;
        })
        .await;
    let _ = std::fs::remove_file(&path);
    result.map_err(std::io::Error::other)
}

fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // A socket file left by a killed agent would make bind fail.
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    UnixListener::bind(path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {}: {e}", path.display())))
}
