//! The config client: streams the model (workloads, services, policies) from mesh-ctrl into the
//! state store, reconnecting with capped exponential backoff. While mesh-ctrl is away the store
//! keeps the last good config, so enrolled pods and proxying are unaffected.

use std::sync::Arc;
use std::time::Duration;

use ferrymesh_api::config::{config_client::ConfigClient, WatchRequest};
use tonic::transport::Endpoint;

use crate::state::State;

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Why a config stream ended.
#[derive(Debug, thiserror::Error)]
pub enum ConfigClientError {
    /// `--ctrl` is not a valid URI.
    #[error("invalid --ctrl address: {0}")]
    Address(String),
    /// mesh-ctrl could not be reached.
    #[error("cannot reach mesh-ctrl: {0} (is it running, and is port 15012 reachable from this node?)")]
    Connect(String),
    /// The stream failed.
    #[error("config stream from mesh-ctrl failed: {0}")]
    Stream(#[from] tonic::Status),
}

/// Streams config from `ctrl` into `state` forever.
pub async fn run(ctrl: String, node: String, state: Arc<State>) {
    let mut backoff = BACKOFF_MIN;
    let mut last_error = String::new();
    loop {
        match stream_once(&ctrl, &node, &state).await {
            Ok(()) => {
                backoff = BACKOFF_MIN;
                tracing::warn!(%ctrl, "mesh-ctrl closed the config stream; keeping the last good config");
            }
            Err(e) => {
                let message = e.to_string();
                if message != last_error {
                    tracing::warn!(%ctrl, "{message}; keeping the last good config and retrying");
                    last_error = message;
                }
            }
        }
        if state.ctrl_status().0 {
            backoff = BACKOFF_MIN;
        }
        state.set_ctrl_connected(false);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

async fn stream_once(ctrl: &str, node: &str, state: &State) -> Result<(), ConfigClientError> {
    let channel = Endpoint::from_shared(ctrl.to_string())
        .map_err(|e| ConfigClientError::Address(error_chain(&e)))?
        .connect_timeout(Duration::from_secs(2))
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| ConfigClientError::Connect(error_chain(&e)))?;
    let mut stream = ConfigClient::new(channel).watch(WatchRequest { node: node.to_string() }).await?.into_inner();
    while let Some(update) = stream.message().await? {
        state.set_ctrl_connected(true);
        let version = update.version;
        let (snapshot, workloads, services) = (update.snapshot, update.upserted.len(), update.services.len());
        let started = std::time::Instant::now();
        match state.apply(update) {
            Ok(()) => {
                let took_ms = started.elapsed().as_secs_f64() * 1000.0;
                tracing::info!(version, snapshot, workloads, services, took_ms, "config applied");
            }
            Err(e) => tracing::warn!(version, "rejected config update: {e}; keeping the last good config"),
        }
    }
    Ok(())
}

/// `error: cause: cause...`, since tonic's transport errors say only "transport error" at the top.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unreachable_ctrl_and_bad_address_are_told_apart() {
        let state = State::default();
        let e = stream_once("http://127.0.0.1:1", "n1", &state).await.unwrap_err();
        let text = e.to_string();
        assert!(text.starts_with("cannot reach mesh-ctrl: transport error: "), "{text}");
        assert!(text.contains("Connection refused"), "{text}");
        let e = stream_once("not a uri", "n1", &state).await.unwrap_err();
        assert!(e.to_string().starts_with("invalid --ctrl address:"), "{e}");
        assert!(!state.ctrl_status().0);
    }
}
