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

/// Why `object` is refused for its size: its JSON form is over [`ferrymesh_api::MAX_OBJECT_BYTES`]
/// (counted, never built, and no further than the limit).
pub fn oversize(object: &impl serde::Serialize) -> Option<String> {
    /// Counts bytes written, failing past the limit so a huge object costs no more than it.
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            if self.0 > ferrymesh_api::MAX_OBJECT_BYTES {
                return Err(std::io::Error::other("over the limit"));
            }
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    serde_json::to_writer(&mut count, object).is_err().then(|| {
        format!(
            "the object is over {} KiB as JSON, the most mesh-ctrl takes of one object; split it (a policy's rules, a route's rules) or trim it",
            ferrymesh_api::MAX_OBJECT_BYTES >> 10
        )
    })
}

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
