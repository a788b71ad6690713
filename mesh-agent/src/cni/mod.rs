//! The agent's side of the CNI plugin (`ferrymesh-cni`): a unix socket (`--cni-socket`) the
//! plugin asks, during a pod's sandbox setup, to hold the pod closed until it is enrolled.
//!
//! One request per connection, one JSON line each way:
//!
//! ```text
//! plugin -> agent  {"op":"add"|"del","namespace":..,"name":..,"uid":..,"netns":<path>}
//! agent -> plugin  {"held":true|false}  or  {"error":"...","retry":true|false}
//! ```
//!
//! The enroller decides (it owns the pods' eBPF state): see [`crate::enroll::Enroller`].
//! [`install`] puts the plugin on the node. The messages, and the plugin's side, are
//! [`ferrymesh_api::cni`]'s.

pub mod install;

use std::io;
use std::path::{Path, PathBuf};

pub use ferrymesh_api::cni::{Answer, Request};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot, watch};

/// How long a plugin may take to send its request.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// A request with where its answer goes (to the enroller).
pub type Asked = (Request, oneshot::Sender<Answer>);

/// Serves the plugin at `path` until `shutdown`, passing each request to the enroller through
/// `asks`; removes the socket when it stops.
pub async fn serve(path: PathBuf, asks: mpsc::Sender<Asked>, mut shutdown: watch::Receiver<bool>) -> io::Result<()> {
    let listener = bind(&path)?;
    let result = loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => break Err(e),
            },
            _ = shutdown.changed() => break Ok(()),
        };
        let asks = asks.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(stream, asks).await {
                tracing::warn!("CNI request failed: {e}");
            }
        });
    };
    let _ = std::fs::remove_file(&path);
    result
}

fn bind(path: &Path) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(path)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {}: {e}", path.display())))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

async fn answer(stream: tokio::net::UnixStream, asks: mpsc::Sender<Asked>) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    tokio::time::timeout(REQUEST_TIMEOUT, BufReader::new(read).read_line(&mut line))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no request"))??;
    let answer = match serde_json::from_str::<Request>(&line) {
        Ok(request) if request.op == "add" || request.op == "del" => {
            let (tx, rx) = oneshot::channel();
            match asks.send((request, tx)).await {
                Ok(()) => rx.await.unwrap_or_else(|_| stopping()),
                Err(_) => stopping(),
            }
        }
        Ok(request) => Answer::Failed { error: format!("unknown op {:?}", request.op), retry: false },
        Err(e) => Answer::Failed { error: format!("malformed request: {e}"), retry: false },
    };
    let mut text = serde_json::to_string(&answer).map_err(io::Error::other)?;
    text.push('\n');
    write.write_all(text.as_bytes()).await
}

fn stopping() -> Answer {
    Answer::Failed { error: "the agent is stopping".into(), retry: true }
}
