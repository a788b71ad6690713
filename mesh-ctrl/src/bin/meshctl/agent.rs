//! Finding and connecting to agents' admin sockets.

use std::path::{Path, PathBuf};

use ferrymesh_api::admin::agent_admin_client::AgentAdminClient;
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

/// Default admin socket of the agent on this node.
const DEFAULT_SOCKET: &str = "/var/run/ferrymesh/agent.sock";

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
    #[error("the agent at {path} refused the request: {message}")]
    Rpc {
        /// Socket path.
        path: String,
        /// What it said.
        message: String,
    },
    /// `--agents-dir` cannot be read or holds no socket.
    #[error("--agents-dir {path}: {reason}")]
    Dir {
        /// The directory.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

impl AgentError {
    /// An RPC error of the agent at `path`.
    pub fn rpc(path: &Path, status: tonic::Status) -> Self {
        Self::Rpc { path: path.display().to_string(), message: status.message().to_string() }
    }
}

impl From<AgentError> for String {
    fn from(e: AgentError) -> Self {
        e.to_string()
    }
}

/// The agents to ask: every `--agent`, then every `*.sock` in `--agents-dir` (sorted), else
/// the default socket.
pub fn targets(agents: &[PathBuf], dir: Option<&Path>) -> Result<Vec<PathBuf>, AgentError> {
    let mut all = agents.to_vec();
    if let Some(dir) = dir {
        let error = |reason: String| AgentError::Dir { path: dir.display().to_string(), reason };
        let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| error(e.to_string()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "sock"))
            .collect();
        if found.is_empty() {
            return Err(error("no agent socket (*.sock) in it".into()));
        }
        found.sort();
        all.extend(found);
    }
    if all.is_empty() {
        all.push(PathBuf::from(DEFAULT_SOCKET));
    }
    Ok(all)
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
    // The config dump is as large as the config the agent holds.
    Ok(AgentAdminClient::new(channel).max_decoding_message_size(ferrymesh_api::MAX_CONFIG_MESSAGE))
}
