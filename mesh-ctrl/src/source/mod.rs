//! Config sources. Each source turns its input into a [`crate::model::Model`] and publishes it:
//! the local directory ([`local`]) and the Kubernetes API ([`kube`]), both through the one
//! translation of Kubernetes objects ([`translate`]).

pub mod kube;
pub mod local;
pub mod status;
pub mod translate;

use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

pub use local::{ConfigError, DirSource};

use crate::snapshot::Publisher;

/// How long to wait after a change event for the burst of events an editor makes to settle.
const DEBOUNCE: Duration = Duration::from_millis(20);
/// Re-read the directory this often even without events (a change missed by inotify, such as
/// one on a network filesystem, still lands).
const RESYNC: Duration = Duration::from_secs(5);

/// Loads the directory, publishes it, and keeps doing so on every change until the process
/// ends. Errors are logged once each time the set of errors changes.
pub async fn watch_dir(mut source: DirSource, publisher: Publisher) -> notify::Result<()> {
    let (tx, mut rx) = mpsc::channel(1);
    let mut watcher = notify::recommended_watcher(move |_event| {
        // A full channel already holds a pending reload.
        let _ = tx.try_send(());
    })?;
    watcher.watch(source.dir(), RecursiveMode::NonRecursive)?;
    let mut last = (0, Vec::new());
    loop {
        let started = std::time::Instant::now();
        let (model, errors) = source.reload();
        let version = publisher.publish(&model);
        let took_ms = started.elapsed().as_secs_f64() * 1000.0;
        let messages: Vec<String> = errors.iter().map(ToString::to_string).collect();
        metrics::gauge!("ferrymesh_ctrl_rejected_config_objects").set(messages.len() as f64);
        if (version, &messages) != (last.0, &last.1) {
            if messages != last.1 {
                for message in &messages {
                    tracing::warn!("rejected config: {message}");
                }
            }
            tracing::info!(
                version,
                pods = model.pods.len(),
                services = model.services.len(),
                rejected = messages.len(),
                took_ms,
                "config loaded"
            );
            last = (version, messages);
        }
        tokio::select! {
            _ = rx.recv() => tokio::time::sleep(DEBOUNCE).await,
            _ = tokio::time::sleep(RESYNC) => {}
        }
        while rx.try_recv().is_ok() {}
    }
}
