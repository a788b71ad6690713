//! `cargo xtask image`: the OCI images of mesh-ctrl, mesh-agent and mesh-waypoint, built offline
//! without a container daemon.
//!
//! The binaries are the build's own, which the tests ran: `cargo xtask build` links every binary
//! statically (glibc with `+crt-static`), so an image is one layer of them, stripped of their
//! symbols, and nothing else. Each image is one tar that is at the same time:
//! - an OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/…`), with the image's name in
//!   `io.containerd.image.name` as `ctr images import` (and so `kind load image-archive`) reads it;
//! - a docker-archive (`manifest.json` with fully qualified `RepoTags`) as `docker load` reads it,
//!   pointing at the same blobs (the layout `docker save` itself writes since Docker 25).
//!
//! The bytes are reproducible: every tar entry has mtime 0, uid and gid 0, no user names and a
//! fixed mode, entries come in a fixed order, JSON keys are sorted, the layer is uncompressed,
//! and the build remaps the workspace and cargo paths out of the binaries.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// Where images are pushed from, unless `--registry` or `FERRYMESH_REGISTRY` says otherwise.
/// Fully qualified and local: nothing defaults to Docker Hub, and a kind node never tries to pull it.
pub const DEFAULT_REGISTRY: &str = "localhost/ferrymesh";

/// One image: its name (under the registry) and the binaries it ships, the first its entrypoint.
pub struct Image {
    pub name: &'static str,
    pub binaries: &'static [&'static str],
}

/// The images, each with meshctl so an operator can `kubectl exec` it (the agent's admin socket
/// is node-local).
pub const IMAGES: &[Image] = &[
    Image { name: "mesh-ctrl", binaries: &["mesh-ctrl", "meshctl"] },
    // The agent's init container installs the CNI plugin from beside the agent binary.
    Image { name: "mesh-agent", binaries: &["mesh-agent", "ferrymesh-cni", "meshctl"] },
    Image { name: "mesh-waypoint", binaries: &["mesh-waypoint", "meshctl"] },
];

/// Where the binaries are in an image (on the image's PATH).
pub const BIN_DIR: &str = "usr/local/bin";

/// An image tar written by [`write_image`].
pub struct Built {
    /// `registry/name:tag`.
    pub reference: String,
    /// `sha256:…` of the OCI manifest: the digest a registry shows once the OCI archive is pushed
    /// unchanged (e.g. `skopeo copy oci-archive:… docker://…`).
    pub digest: String,
    /// The tar.
    pub path: PathBuf,
}

fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// A tar of `entries` (path, contents or None for a directory, mode) in the given order,
/// with every varying header field fixed.
fn deterministic_tar(entries: &[(String, Option<&[u8]>, u32)]) -> Result<Vec<u8>> {
    let mut tar = tar::Builder::new(Vec::new());
    for (path, contents, mode) in entries {
        let mut header = tar::Header::new_ustar();
        header.set_path(path).with_context(|| format!("tar entry {path}"))?;
        header.set_mode(*mode);
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        match contents {
            Some(bytes) => {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_size(bytes.len() as u64);
                header.set_cksum();
                tar.append(&header, *bytes)?;
            }
            None => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_size(0);
                header.set_cksum();
                tar.append(&header, std::io::empty())?;
            }
        }
    }
    Ok(tar.into_inner()?)
}

/// The image's one layer: `usr/local/bin/` holding `binaries` (name, bytes), mode 0755.
pub fn layer(binaries: &[(&str, Vec<u8>)]) -> Result<Vec<u8>> {
    let mut entries: Vec<(String, Option<&[u8]>, u32)> = Vec::new();
    let mut dir = String::new();
    for part in BIN_DIR.split('/') {
        dir.push_str(part);
        dir.push('/');
        entries.push((dir.clone(), None, 0o755));
    }
    let mut sorted: Vec<&(&str, Vec<u8>)> = binaries.iter().collect();
    sorted.sort_by_key(|(name, _)| *name);
    for (name, bytes) in sorted {
        entries.push((format!("{BIN_DIR}/{name}"), Some(bytes.as_slice()), 0o755));
    }
    deterministic_tar(&entries)
}

/// The image tar for `reference` (`registry/name:tag`): `layer` with `entrypoint` (a path in
/// the image) as both an OCI layout and a docker-archive. Returns the tar and the manifest's
/// digest.
pub fn image_archive(reference: &str, arch: &str, layer: &[u8], entrypoint: &str) -> Result<(Vec<u8>, String)> {
    let (_, tag) = reference.rsplit_once(':').context("an image reference ends in :tag")?;
    let layer_hex = sha256_hex(layer);
    let config = json!({
        "architecture": arch,
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": {
            "Entrypoint": [entrypoint],
            "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"],
            "Labels": {
                "org.opencontainers.image.title": reference.rsplit('/').next().unwrap_or(reference),
                "org.opencontainers.image.version": tag,
            },
        },
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{layer_hex}")]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "cargo xtask image"}],
    });
    let config = serde_json::to_vec(&config)?;
    let config_hex = sha256_hex(&config);
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": format!("sha256:{config_hex}"),
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": format!("sha256:{layer_hex}"),
            "size": layer.len(),
        }],
    });
    let manifest = serde_json::to_vec(&manifest)?;
    let manifest_hex = sha256_hex(&manifest);
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{manifest_hex}"),
            "size": manifest.len(),
            "annotations": {
                "io.containerd.image.name": reference,
                "org.opencontainers.image.ref.name": tag,
            },
        }],
    });
    let docker_manifest = json!([{
        "Config": format!("blobs/sha256/{config_hex}"),
        "RepoTags": [reference],
        "Layers": [format!("blobs/sha256/{layer_hex}")],
    }]);
    let index = serde_json::to_vec(&index)?;
    let docker_manifest = serde_json::to_vec(&docker_manifest)?;
    let oci_layout = br#"{"imageLayoutVersion":"1.0.0"}"#;
    let mut blobs =
        vec![(config_hex.clone(), config.as_slice()), (layer_hex, layer), (manifest_hex.clone(), manifest.as_slice())];
    blobs.sort();
    blobs.dedup_by(|a, b| a.0 == b.0);
    let mut entries: Vec<(String, Option<&[u8]>, u32)> =
        vec![("blobs/".into(), None, 0o755), ("blobs/sha256/".into(), None, 0o755)];
    entries.extend(blobs.into_iter().map(|(hex, bytes)| (format!("blobs/sha256/{hex}"), Some(bytes), 0o644)));
    entries.push(("index.json".into(), Some(&index), 0o644));
    entries.push(("manifest.json".into(), Some(&docker_manifest), 0o644));
    entries.push(("oci-layout".into(), Some(oci_layout), 0o644));
    Ok((deterministic_tar(&entries)?, format!("sha256:{manifest_hex}")))
}

/// The docker architecture name of a Rust target triple.
pub fn docker_arch(triple: &str) -> Result<&'static str> {
    Ok(match triple.split('-').next().unwrap_or_default() {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => bail!("no image architecture for {other} (from {triple})"),
    })
}

/// Writes the image `image` of `binaries_dir`'s binaries to `out_dir/<name>.tar`.
pub fn write_image(
    image: &Image,
    binaries_dir: &Path,
    registry: &str,
    tag: &str,
    arch: &str,
    out_dir: &Path,
) -> Result<Built> {
    let binaries = image
        .binaries
        .iter()
        .map(|b| {
            let path = binaries_dir.join(b);
            Ok((*b, std::fs::read(&path).with_context(|| format!("{}", path.display()))?))
        })
        .collect::<Result<Vec<_>>>()?;
    let layer = layer(&binaries)?;
    let reference = format!("{}/{}:{tag}", registry.trim_end_matches('/'), image.name);
    let entrypoint = format!("/{BIN_DIR}/{}", image.binaries[0]);
    let (archive, digest) = image_archive(&reference, arch, &layer, &entrypoint)?;
    std::fs::create_dir_all(out_dir)?;
    let path = out_dir.join(format!("{}.tar", image.name));
    let partial = path.with_extension("tar.partial");
    std::fs::write(&partial, &archive)?;
    std::fs::rename(&partial, &path)?;
    Ok(Built { reference, digest, path })
}

/// What an image tar says about itself, read back the way `docker load` and `ctr import` would.
#[derive(Debug)]
pub struct Inspected {
    /// RepoTags of manifest.json.
    pub repo_tags: Vec<String>,
    /// `io.containerd.image.name` of index.json.
    pub containerd_name: String,
    /// The config's Entrypoint.
    pub entrypoint: Vec<String>,
    /// Paths and contents of the layer's regular files.
    pub files: Vec<(String, Vec<u8>)>,
}

/// Reads an image tar back, checking that every blob matches its digest and that both views
/// (docker-archive and OCI) name the same config and layers.
pub fn inspect(archive: &[u8]) -> Result<Inspected> {
    let mut members = std::collections::BTreeMap::new();
    for entry in tar::Archive::new(archive).entries()? {
        let mut entry = entry?;
        let path = entry.path()?.to_string_lossy().into_owned();
        let header = entry.header();
        ensure!(header.mtime()? == 0 && header.uid()? == 0 && header.gid()? == 0, "{path}: not normalized");
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes)?;
        members.insert(path, bytes);
    }
    let member = |path: &str| members.get(path).with_context(|| format!("no {path} in the archive"));
    let blob = |digest: &str| -> Result<&Vec<u8>> {
        let hex = digest.strip_prefix("sha256:").with_context(|| format!("digest {digest}"))?;
        let bytes = member(&format!("blobs/sha256/{hex}"))?;
        ensure!(sha256_hex(bytes) == hex, "blob {digest} does not match its digest");
        Ok(bytes)
    };
    ensure!(member("oci-layout")?.as_slice() == br#"{"imageLayoutVersion":"1.0.0"}"#, "oci-layout");
    let index: Value = serde_json::from_slice(member("index.json")?)?;
    let descriptor = &index["manifests"][0];
    let containerd_name =
        descriptor["annotations"]["io.containerd.image.name"].as_str().unwrap_or_default().to_string();
    let manifest: Value = serde_json::from_slice(blob(descriptor["digest"].as_str().unwrap_or_default())?)?;
    let docker: Value = serde_json::from_slice(member("manifest.json")?)?;
    let config_digest = manifest["config"]["digest"].as_str().unwrap_or_default();
    ensure!(docker[0]["Config"].as_str() == Some(&format!("blobs/sha256/{}", &config_digest[7..])), "Config differs");
    let config: Value = serde_json::from_slice(blob(config_digest)?)?;
    let layers = manifest["layers"].as_array().context("manifest layers")?;
    ensure!(layers.len() == 1 && docker[0]["Layers"].as_array().map(Vec::len) == Some(1), "one layer");
    let layer_digest = layers[0]["digest"].as_str().unwrap_or_default();
    ensure!(config["rootfs"]["diff_ids"][0].as_str() == Some(layer_digest), "diff_id is the layer's digest");
    ensure!(docker[0]["Layers"][0].as_str() == Some(&format!("blobs/sha256/{}", &layer_digest[7..])), "Layers differ");
    let mut files = Vec::new();
    for entry in tar::Archive::new(blob(layer_digest)?.as_slice()).entries()? {
        let mut entry = entry?;
        if entry.header().entry_type().is_file() {
            let path = entry.path()?.to_string_lossy().into_owned();
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes)?;
            files.push((path, bytes));
        }
    }
    let strings = |v: &Value| v.as_array().into_iter().flatten().filter_map(|s| s.as_str().map(String::from)).collect();
    Ok(Inspected {
        repo_tags: strings(&docker[0]["RepoTags"]),
        containerd_name,
        entrypoint: strings(&config["config"]["Entrypoint"]),
        files,
    })
}

/// `cargo xtask image` arguments.
pub struct ImageArgs {
    /// Registry prefix of the image names.
    pub registry: String,
    /// Build twice and check the images (run by `cargo xtask test`).
    pub check: bool,
    /// Write the images' digests into manifests/overlays/production.
    pub pin_production: bool,
}

impl ImageArgs {
    pub fn parse(args: &[String]) -> Result<ImageArgs> {
        let mut parsed = ImageArgs {
            registry: std::env::var("FERRYMESH_REGISTRY").unwrap_or_else(|_| DEFAULT_REGISTRY.to_string()),
            check: false,
            pin_production: false,
        };
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--registry" => parsed.registry = args.next().context("--registry needs a value")?.clone(),
                "--check" => parsed.check = true,
                "--pin-production" => parsed.pin_production = true,
                other => bail!("cargo xtask image: unknown argument {other:?}"),
            }
        }
        let registry = parsed.registry.trim_end_matches('/');
        ensure!(
            registry.split('/').next().is_some_and(|host| host.contains(['.', ':']) || host == "localhost"),
            "--registry {registry:?} is not fully qualified (e.g. localhost/ferrymesh or ghcr.io/you): \
             an unqualified name would mean Docker Hub"
        );
        parsed.registry = registry.to_string();
        Ok(parsed)
    }
}

/// The images' binaries, stripped of their symbols, in `dir`: the build's own (see
/// [`crate::build`]: static, paths remapped), which the tests ran. Errors never print a
/// backtrace, so the symbols would only weigh.
fn strip_binaries(dir: &Path) -> Result<()> {
    let built = crate::release_dir()?;
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let mut names: Vec<&str> = IMAGES.iter().flat_map(|i| i.binaries.iter().copied()).collect();
    names.sort_unstable();
    names.dedup();
    for name in names {
        crate::run(
            std::process::Command::new("strip").arg("--strip-all").arg("-o").arg(dir.join(name)).arg(built.join(name)),
        )?;
    }
    Ok(())
}

/// Writes every image into `out_dir`.
fn write_all(args: &ImageArgs, triple: &str, binaries: &Path, out_dir: &Path) -> Result<Vec<Built>> {
    let arch = docker_arch(triple)?;
    IMAGES.iter().map(|i| write_image(i, binaries, &args.registry, env!("CARGO_PKG_VERSION"), arch, out_dir)).collect()
}

/// `cargo xtask image`: the image tars of the build's binaries in target/images/.
pub fn images(args: &ImageArgs) -> Result<()> {
    crate::step("image: stripped binaries");
    let out_dir = crate::target_dir().join("images");
    let binaries = out_dir.join("bin");
    strip_binaries(&binaries)?;
    let triple = crate::host_triple()?;
    crate::step("image: archives");
    let built = write_all(args, triple, &binaries, &out_dir)?;
    for b in &built {
        eprintln!("xtask: {} {} ({})", b.path.display(), b.reference, b.digest);
    }
    if args.check {
        check(args, triple, &binaries, &built)?;
    }
    if args.pin_production {
        pin_production(&built, &args.registry)?;
    }
    Ok(())
}

/// The acceptance of the images, with real readers: built twice, the same bytes; each reads
/// back as both formats with its name and entrypoint, skopeo reads it as a docker-archive and as
/// an OCI archive, containerd's `ctr -n k8s.io images import` takes it, and every binary in it
/// runs (`--version`) in an empty chroot: nothing of the build machine is needed.
fn check(args: &ImageArgs, triple: &str, binaries: &Path, built: &[Built]) -> Result<()> {
    crate::step("image: check");
    let scratch = Scratch::new(crate::target_dir().join("images/check"))?;
    let again = write_all(args, triple, binaries, &scratch.0.join("again"))?;
    let version = env!("CARGO_PKG_VERSION");
    let containerd = Containerd::start(&scratch.0.join("containerd"))?;
    for (first, second) in built.iter().zip(&again) {
        let bytes = std::fs::read(&first.path)?;
        let (a, b) = (sha256_hex(&bytes), sha256_hex(&std::fs::read(&second.path)?));
        ensure!(a == b, "{}: two builds differ ({a} and {b})", first.reference);
        let image = IMAGES.iter().find(|i| first.path.ends_with(format!("{}.tar", i.name))).context("which image")?;
        let inspected = inspect(&bytes).with_context(|| first.path.display().to_string())?;
        ensure!(inspected.repo_tags == [first.reference.clone()], "RepoTags {:?}", inspected.repo_tags);
        ensure!(inspected.containerd_name == first.reference, "containerd name {}", inspected.containerd_name);
        let entrypoint = format!("/{BIN_DIR}/{}", image.binaries[0]);
        ensure!(inspected.entrypoint == [entrypoint.clone()], "{}: entrypoint {:?}", image.name, inspected.entrypoint);
        // Every binary, run alone in an empty root.
        let root = scratch.0.join(format!("chroot-{}", image.name));
        for binary in image.binaries {
            let path = format!("{BIN_DIR}/{binary}");
            let (_, bytes) = inspected
                .files
                .iter()
                .find(|(p, _)| *p == path)
                .with_context(|| format!("{path} in {}", image.name))?;
            let _ = std::fs::remove_dir_all(&root);
            std::fs::create_dir_all(&root)?;
            let file = root.join(binary);
            std::fs::write(&file, bytes)?;
            std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
            let mut run = std::process::Command::new("chroot");
            run.arg(&root).arg(format!("/{binary}"));
            let out = if *binary == "ferrymesh-cni" {
                // A CNI plugin answers VERSION (its flags are the runtime's environment).
                crate::output(run.env("CNI_COMMAND", "VERSION"))?
            } else {
                crate::output(run.arg("--version"))?
            };
            let expected = if *binary == "ferrymesh-cni" {
                "supportedVersions".to_string()
            } else {
                format!("{binary} {version}")
            };
            ensure!(out.contains(&expected), "{binary} in an empty chroot printed {out:?}, not {expected:?}");
            std::fs::remove_dir_all(&root)?;
        }
        // Real readers: skopeo, both ways, and containerd.
        for transport in ["docker-archive", "oci-archive"] {
            let config = crate::output(
                std::process::Command::new("skopeo")
                    .args(["inspect", "--config"])
                    .arg(format!("{transport}:{}", first.path.display())),
            )?;
            let config: Value = serde_json::from_str(&config)?;
            ensure!(config["config"]["Entrypoint"][0].as_str() == Some(&entrypoint), "skopeo {transport}: {config}");
        }
        let imported = containerd.import(&first.path)?;
        ensure!(
            imported.lines().any(|name| name.trim() == first.reference),
            "ctr images import: {} not in {imported:?}",
            first.reference
        );
        eprintln!(
            "xtask: {} checked: reproducible, both formats, ctr import, {:?} run alone",
            first.reference, image.binaries
        );
    }
    Ok(())
}

/// A directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(dir: PathBuf) -> Result<Scratch> {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A containerd of the check's own (its own root, state and socket, CRI off so it touches no
/// network), stopped and unmounted on drop.
struct Containerd {
    child: std::process::Child,
    dir: PathBuf,
    address: PathBuf,
}

impl Containerd {
    fn start(dir: &Path) -> Result<Containerd> {
        std::fs::create_dir_all(dir)?;
        let config = dir.join("config.toml");
        std::fs::write(&config, "version = 2\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n")?;
        let address = dir.join("containerd.sock");
        let log = std::fs::File::create(dir.join("containerd.log"))?;
        let child = std::process::Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .arg("--root")
            .arg(dir.join("root"))
            .arg("--state")
            .arg(dir.join("state"))
            .arg("--address")
            .arg(&address)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start containerd")?;
        let containerd = Containerd { child, dir: dir.to_path_buf(), address };
        for _ in 0..100 {
            if containerd.ctr().args(["version"]).output().is_ok_and(|o| o.status.success()) {
                return Ok(containerd);
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        bail!("containerd did not answer within 10 s; see {}", dir.join("containerd.log").display())
    }

    fn ctr(&self) -> std::process::Command {
        let mut ctr = std::process::Command::new("ctr");
        ctr.arg("--address").arg(&self.address).args(["--namespace", "k8s.io"]);
        ctr
    }

    /// Imports `archive` as `kind load image-archive` does, and lists the images then known.
    fn import(&self, archive: &Path) -> Result<String> {
        crate::output(self.ctr().args(["images", "import"]).arg(archive))?;
        crate::output(self.ctr().args(["images", "ls", "--quiet"]))
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Snapshots it mounted, deepest first, then its directory.
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
        let mut inside: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter(|m| Path::new(m).starts_with(&self.dir))
            .collect();
        inside.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for mount in inside {
            let _ = std::process::Command::new("umount").arg(mount).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The production overlay's kustomization.
fn production_kustomization() -> PathBuf {
    crate::root().join("manifests/overlays/production/kustomization.yaml")
}

/// Writes the images' registry and digests into the production overlay's `images:` entries
/// (each `- name: <default registry>/<image>` item's `newName:` and `digest:` lines); an image
/// the overlay does not list is printed, pinned, for the command that deploys it.
fn pin_production(built: &[Built], registry: &str) -> Result<()> {
    let path = production_kustomization();
    let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    for (image, b) in IMAGES.iter().zip(built) {
        let item = format!("- name: {DEFAULT_REGISTRY}/{}", image.name);
        let Some(at) = lines.iter().position(|l| l.trim() == item) else {
            // The waypoint's image is not in the overlay: `meshctl waypoint generate --image`
            // names it.
            eprintln!("xtask: {} is not in the overlay; pin it as {registry}/{}@{}", image.name, image.name, b.digest);
            continue;
        };
        let mut seen = (false, false);
        for line in lines.iter_mut().skip(at + 1).take_while(|l| !l.trim_start().starts_with("- ")) {
            let indent = &line[..line.len() - line.trim_start().len()].to_string();
            if line.trim_start().starts_with("newName:") {
                *line = format!("{indent}newName: {registry}/{}", image.name);
                seen.0 = true;
            } else if line.trim_start().starts_with("digest:") {
                *line = format!("{indent}digest: {}", b.digest);
                seen.1 = true;
            }
        }
        ensure!(seen == (true, true), "{}: {item:?} needs newName: and digest: lines", path.display());
    }
    std::fs::write(&path, lines.join("\n") + "\n")?;
    eprintln!("xtask: pinned {} to {registry} digests", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive() -> (Vec<u8>, String) {
        let layer = layer(&[("b", b"second".to_vec()), ("a", b"first".to_vec())]).unwrap();
        image_archive("localhost/ferrymesh/a:1.2.3", "amd64", &layer, "/usr/local/bin/a").unwrap()
    }

    #[test]
    fn an_image_is_the_same_bytes_every_time_and_reads_back_as_both_formats() {
        let (first, digest) = archive();
        let (second, again) = archive();
        assert_eq!(sha256_hex(&first), sha256_hex(&second));
        assert_eq!(digest, again);
        let image = inspect(&first).unwrap();
        assert_eq!(image.repo_tags, ["localhost/ferrymesh/a:1.2.3"]);
        assert_eq!(image.containerd_name, "localhost/ferrymesh/a:1.2.3");
        assert_eq!(image.entrypoint, ["/usr/local/bin/a"]);
        let files: Vec<(&str, &[u8])> = image.files.iter().map(|(p, b)| (p.as_str(), b.as_slice())).collect();
        assert_eq!(files, [("usr/local/bin/a", &b"first"[..]), ("usr/local/bin/b", &b"second"[..])]);
    }

    #[test]
    fn a_tampered_blob_is_caught() {
        let (mut bytes, _) = archive();
        // The layer's file contents sit inside a blob; flip one byte of "second".
        let at = bytes.windows(6).position(|w| w == b"second").unwrap();
        bytes[at] = b'S';
        let e = inspect(&bytes).unwrap_err().to_string();
        assert!(e.contains("does not match its digest"), "{e}");
    }

    #[test]
    fn architectures_are_named_as_registries_name_them() {
        assert_eq!(docker_arch("x86_64-unknown-linux-gnu").unwrap(), "amd64");
        assert_eq!(docker_arch("aarch64-unknown-linux-gnu").unwrap(), "arm64");
        assert!(docker_arch("riscv64gc-unknown-linux-gnu").is_err());
    }
}
