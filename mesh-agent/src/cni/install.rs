//! Installing the CNI plugin on a node: `ferrymesh-cni` copied into the runtime's CNI binary
//! directory and chained, as the last plugin, into the node's network configuration (the first
//! `*.conflist` of the CNI configuration directory, as the runtime picks it). Both steps are
//! idempotent and atomic (write, then rename), so a runtime never reads half a file; uninstall
//! takes both out again.

use std::io;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

/// The plugin's binary name, and its `type` in a network configuration.
pub const PLUGIN: &str = "ferrymesh-cni";

/// Namespaces whose pods the plugin never asks the agent about, by default: the cluster's own
/// and the mesh's (mesh-ctrl must start before any agent holds a config).
pub const EXCLUDED_NAMESPACES: [&str; 2] = ["kube-system", "ferrymesh-system"];

/// Where the plugin is installed from and to.
#[derive(Debug, Clone)]
pub struct Install {
    /// The `ferrymesh-cni` binary to copy.
    pub binary: PathBuf,
    /// The runtime's CNI binary directory (`/opt/cni/bin`).
    pub bin_dir: PathBuf,
    /// The runtime's CNI configuration directory (`/etc/cni/net.d`).
    pub conf_dir: PathBuf,
    /// The agent's CNI socket, as the plugin reaches it.
    pub agent_socket: PathBuf,
}

/// The network configuration the runtime uses: the first `*.conflist` by name.
fn primary_conflist(conf_dir: &Path) -> io::Result<PathBuf> {
    let mut lists: Vec<PathBuf> = std::fs::read_dir(conf_dir)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot read {}: {e}", conf_dir.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "conflist"))
        .collect();
    lists.sort();
    lists.into_iter().next().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "no *.conflist in {}: the node's CNI plugin has not written its configuration yet",
                conf_dir.display()
            ),
        )
    })
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename.
fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension("ferrymesh-tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&tmp, path)
}

fn read_conflist(path: &Path) -> io::Result<Value> {
    let text = std::fs::read_to_string(path)?;
    let list: Value = serde_json::from_str(&text)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{} is not JSON: {e}", path.display())))?;
    if !list["plugins"].is_array() {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{}: no \"plugins\" list", path.display())));
    }
    Ok(list)
}

fn is_ours(plugin: &Value) -> bool {
    plugin["type"] == PLUGIN
}

/// Installs the plugin: copies the binary, and chains it last in the primary conflist (replacing
/// an entry of an earlier install). Returns the conflist it changed.
pub fn install(install: &Install) -> io::Result<PathBuf> {
    let binary = std::fs::read(&install.binary)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot read {}: {e}", install.binary.display())))?;
    std::fs::create_dir_all(&install.bin_dir)?;
    write_atomically(&install.bin_dir.join(PLUGIN), &binary, 0o755)?;
    let path = primary_conflist(&install.conf_dir)?;
    let mut list = read_conflist(&path)?;
    let plugins = list["plugins"].as_array_mut().expect("checked: a list");
    plugins.retain(|p| !is_ours(p));
    plugins.push(json!({
        "type": PLUGIN,
        "agent_socket": install.agent_socket,
        "exclude_namespaces": EXCLUDED_NAMESPACES,
    }));
    let text = serde_json::to_string_pretty(&list).map_err(io::Error::other)?;
    write_atomically(&path, text.as_bytes(), 0o644)?;
    Ok(path)
}

/// Whether the network configuration the runtime uses (the first `*.conflist`) chains the
/// plugin, wherever in the list (a later plugin chained after it is left alone).
pub fn is_chained(conf_dir: &Path) -> io::Result<bool> {
    let list = read_conflist(&primary_conflist(conf_dir)?)?;
    Ok(list["plugins"].as_array().expect("checked: a list").iter().any(is_ours))
}

/// Chains the plugin again ([`install`]) when the node's network configuration no longer has
/// it: the node's own CNI rewrote its conflist (an upgrade, a restart), or a new conflist now
/// sorts first. Returns the conflist it changed, or None when the plugin was chained.
pub fn rechain(install_to: &Install) -> io::Result<Option<PathBuf>> {
    if is_chained(&install_to.conf_dir)? {
        return Ok(None);
    }
    install(install_to).map(Some)
}

/// How often a running agent checks that the plugin is still chained (`--watch-cni`).
pub const RECHAIN_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

/// Keeps the plugin chained while the agent runs: every [`RECHAIN_INTERVAL`], [`rechain`].
/// Without it a node whose CNI rewrote its conflist would start new pods without the plugin,
/// so a mesh pod could run before the agent has enrolled it. A conflist that cannot be read is
/// logged and checked again (the node's CNI may be writing it).
pub async fn keep_chained(install_to: Install, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(RECHAIN_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let checking = install_to.clone();
        match tokio::task::spawn_blocking(move || rechain(&checking)).await {
            Ok(Ok(None)) => {}
            Ok(Ok(Some(conflist))) => tracing::warn!(
                conflist = %conflist.display(),
                "chained {PLUGIN} again: the node's network configuration had been rewritten without it"
            ),
            Ok(Err(e)) => tracing::warn!("cannot check that {PLUGIN} is chained: {e}"),
            Err(e) => tracing::warn!("the CNI chain check panicked: {e}"),
        }
    }
}

/// Takes the plugin out of every conflist of `conf_dir` and removes its binary from `bin_dir`;
/// missing directories are fine. Returns how many files it changed or removed.
pub fn uninstall(bin_dir: &Path, conf_dir: &Path) -> io::Result<usize> {
    let mut changed = 0;
    for entry in std::fs::read_dir(conf_dir).into_iter().flatten().filter_map(Result::ok) {
        let path = entry.path();
        if path.extension().is_none_or(|x| x != "conflist") {
            continue;
        }
        let Ok(mut list) = read_conflist(&path) else { continue };
        let plugins = list["plugins"].as_array_mut().expect("checked: a list");
        let before = plugins.len();
        plugins.retain(|p| !is_ours(p));
        if plugins.len() != before {
            let text = serde_json::to_string_pretty(&list).map_err(io::Error::other)?;
            write_atomically(&path, text.as_bytes(), 0o644)?;
            changed += 1;
        }
    }
    match std::fs::remove_file(bin_dir.join(PLUGIN)) {
        Ok(()) => changed += 1,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ferrymesh-cni-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("net.d")).unwrap();
        std::fs::create_dir_all(dir.join("bin")).unwrap();
        dir
    }

    /// Installing from `dir`'s `plugin` into its `bin` and `net.d`, for an agent at `socket`.
    fn install_from(dir: &Path, socket: &str) -> Install {
        Install {
            binary: dir.join("plugin"),
            bin_dir: dir.join("bin"),
            conf_dir: dir.join("net.d"),
            agent_socket: socket.into(),
        }
    }

    const KINDNET: &str = r#"{"cniVersion":"0.3.1","name":"kindnet","plugins":[{"type":"ptp","ipam":{"type":"host-local"}},{"type":"portmap","capabilities":{"portMappings":true}}]}"#;

    #[test]
    fn install_chains_the_plugin_last_once_and_uninstall_takes_it_out() {
        let dir = scratch("install");
        std::fs::write(dir.join("plugin"), b"#!binary").unwrap();
        std::fs::write(dir.join("net.d/10-kindnet.conflist"), KINDNET).unwrap();
        std::fs::write(dir.join("net.d/99-other.conflist"), KINDNET).unwrap();
        let install_to = install_from(&dir, "/var/run/ferrymesh/cni");
        for _ in 0..2 {
            assert_eq!(install(&install_to).unwrap(), dir.join("net.d/10-kindnet.conflist"));
        }
        assert_eq!(std::fs::read(dir.join("bin/ferrymesh-cni")).unwrap(), b"#!binary");
        let list: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("net.d/10-kindnet.conflist")).unwrap()).unwrap();
        let types: Vec<&str> =
            list["plugins"].as_array().unwrap().iter().map(|p| p["type"].as_str().unwrap()).collect();
        assert_eq!(types, ["ptp", "portmap", PLUGIN], "chained last, once, the others kept in order");
        assert_eq!(list["plugins"][2]["agent_socket"], "/var/run/ferrymesh/cni");
        assert_eq!(list["plugins"][2]["exclude_namespaces"], json!(["kube-system", "ferrymesh-system"]));
        assert_eq!(list["name"], "kindnet");
        let other = std::fs::read_to_string(dir.join("net.d/99-other.conflist")).unwrap();
        assert_eq!(other, KINDNET, "only the conflist the runtime uses is changed");

        assert_eq!(uninstall(&dir.join("bin"), &dir.join("net.d")).unwrap(), 2);
        let list: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("net.d/10-kindnet.conflist")).unwrap()).unwrap();
        assert_eq!(list, serde_json::from_str::<Value>(KINDNET).unwrap(), "back as it was");
        assert!(!dir.join("bin/ferrymesh-cni").exists());
        assert_eq!(uninstall(&dir.join("bin"), &dir.join("net.d")).unwrap(), 0, "twice changes nothing");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rechain_puts_the_plugin_back_only_when_a_rewrite_took_it_out() {
        let dir = scratch("rechain");
        std::fs::write(dir.join("plugin"), b"#!binary").unwrap();
        std::fs::write(dir.join("net.d/10-kindnet.conflist"), KINDNET).unwrap();
        let install_to = install_from(&dir, "/run/x");
        let conflist = dir.join("net.d/10-kindnet.conflist");
        assert!(!is_chained(&install_to.conf_dir).unwrap());
        assert_eq!(rechain(&install_to).unwrap(), Some(conflist.clone()), "not chained: chained");
        let chained = std::fs::read_to_string(&conflist).unwrap();
        assert_eq!(rechain(&install_to).unwrap(), None, "chained: nothing to do");
        // Another plugin chained after ours is left where it is, not fought over.
        let mut list: Value = serde_json::from_str(&chained).unwrap();
        list["plugins"].as_array_mut().unwrap().push(json!({"type": "bandwidth"}));
        let after_ours = serde_json::to_string(&list).unwrap();
        std::fs::write(&conflist, &after_ours).unwrap();
        assert_eq!(rechain(&install_to).unwrap(), None);
        assert_eq!(std::fs::read_to_string(&conflist).unwrap(), after_ours);
        // The node's CNI rewrites its conflist: the plugin goes back, last.
        std::fs::write(&conflist, KINDNET).unwrap();
        assert_eq!(rechain(&install_to).unwrap(), Some(conflist.clone()));
        assert_eq!(std::fs::read_to_string(&conflist).unwrap(), chained);
        // A conflist that now sorts first is the one the runtime uses: it is chained too.
        std::fs::write(dir.join("net.d/05-calico.conflist"), KINDNET).unwrap();
        assert_eq!(rechain(&install_to).unwrap(), Some(dir.join("net.d/05-calico.conflist")));
        // A broken one is an error, and is left as it is.
        std::fs::write(dir.join("net.d/01-x.conflist"), "{half").unwrap();
        assert!(rechain(&install_to).unwrap_err().to_string().contains("01-x.conflist is not JSON"));
        assert_eq!(std::fs::read_to_string(dir.join("net.d/01-x.conflist")).unwrap(), "{half");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn install_without_a_conflist_or_with_a_broken_one_says_so_and_changes_no_conflist() {
        let dir = scratch("broken");
        std::fs::write(dir.join("plugin"), b"#!binary").unwrap();
        let install_to = install_from(&dir, "/run/x");
        let e = install(&install_to).unwrap_err();
        assert!(e.to_string().contains("no *.conflist in"), "{e}");
        std::fs::write(dir.join("net.d/10-x.conflist"), "{not json").unwrap();
        let e = install(&install_to).unwrap_err();
        assert!(e.to_string().contains("10-x.conflist is not JSON"), "{e}");
        assert_eq!(std::fs::read_to_string(dir.join("net.d/10-x.conflist")).unwrap(), "{not json");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
