//! Connecting to an agent's admin socket.

use std::path::{Path, PathBuf};

use ferrymesh_api::admin::agent_admin_client::AgentAdminClient;
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

/// Why meshctl could not talk to an agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The socket is not there or refuses connections.
    #[error("cannot reach the agent at {path}: {reason} (is mesh-agent running with --admin-socket {path}?)")]
    Unreachable {
        /// Socket path.
        path: String,
        /// What the OS said.
        reason: String,
    },
    /// The agent answered with an error.
    #[error("the agent refused the request: {0}")]
    Rpc(#[from] tonic::Status),
}

/// A client of the agent at `path`.
pub async fn connect(path: &Path) -> Result<AgentAdminClient<Channel>, AgentError> {
    let unreachable = |reason: String| AgentError::Unreachable { path: path.display().to_string(), reason };
    // Fail fast with the OS's own words when the socket is missing or dead.
    tokio::net::UnixStream::connect(path).await.map_err(|e| unreachable(e.to_string()))?;
    let socket: PathBuf = path.to_path_buf();
    let channel = Endpoint::from_static("http://agent.local")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(socket).await?)) }
        }))
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    Ok(AgentAdminClient::new(channel))
}
