//! The CA files in a directory (`--ca-dir`, local mode): read at start, or a root generated
//! there on first start, and read again every `--ca-reload-interval` ([`Reloader`]) so a change
//! (a root rotation) is put in force without a restart.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::{apply_reload, Ca, CaError, CaFiles, CA_FILES};

fn write_file(path: &Path, contents: &str, mode: u32) -> Result<(), CaError> {
    let file = OpenOptions::new().write(true).create_new(true).mode(mode).open(path);
    file.and_then(|mut f| f.write_all(contents.as_bytes()))
        .map_err(|source| CaError::File { path: path.to_path_buf(), source })
}

/// The CA files present in `dir`.
pub fn read_dir_files(dir: &Path) -> Result<CaFiles, CaError> {
    let mut files = CaFiles::new();
    for name in CA_FILES {
        let path = dir.join(name);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                files.insert(name.to_string(), text);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(CaError::File { path, source }),
        }
    }
    Ok(files)
}

impl Ca {
    /// Loads the CA from `dir`, generating a root there on first start (no CA file at all).
    /// Leaves live `ttl`.
    pub fn load_or_create(dir: &Path, trust_domain: &str, ttl: Duration) -> Result<Self, CaError> {
        std::fs::create_dir_all(dir).map_err(|source| CaError::File { path: dir.to_path_buf(), source })?;
        if read_dir_files(dir)?.is_empty() {
            let (cert_pem, key_pem) = Self::generate_root(trust_domain)?;
            // Key first and create_new: a crash never leaves a certificate without its key,
            // and an existing key is never overwritten.
            write_file(&dir.join("root-key.pem"), &key_pem, 0o600)?;
            write_file(&dir.join("root-cert.pem"), &cert_pem, 0o644)?;
            tracing::info!(dir = %dir.display(), "generated a new mesh root CA");
        }
        Self::from_files(&read_dir_files(dir)?, &|name| dir.join(name), ttl)
    }
}

/// Reads the CA files of `--ca-dir` again and makes the CA they hold now, when they changed.
#[derive(Debug)]
pub struct Reloader {
    dir: PathBuf,
    ttl: Duration,
    seen: CaFiles,
}

impl Reloader {
    /// A reloader of `dir`, whose files as they are now are those of the CA in force.
    pub fn new(dir: &Path, ttl: Duration) -> Self {
        Self { dir: dir.to_path_buf(), ttl, seen: read_dir_files(dir).unwrap_or_default() }
    }

    /// None when the files are as last seen; otherwise the CA they make now, or why they make
    /// none (a file half written is seen again, whole, at the next poll).
    pub fn poll(&mut self) -> Option<Result<Ca, CaError>> {
        let files = match read_dir_files(&self.dir) {
            Ok(files) => files,
            Err(e) => return Some(Err(e)),
        };
        if files == self.seen {
            return None;
        }
        self.seen = files;
        Some(Ca::from_files(&self.seen, &|name| self.dir.join(name), self.ttl))
    }
}

/// Polls `--ca-dir` every `interval` and applies changes to `current`, forever.
pub async fn keep_reloading_dir(mut reloader: Reloader, interval: Duration, current: watch::Sender<Arc<Ca>>) {
    let origin = reloader.dir.display().to_string();
    loop {
        tokio::time::sleep(interval).await;
        if let Some(reloaded) = reloader.poll() {
            apply_reload(&current, reloaded, &origin);
        }
    }
}
