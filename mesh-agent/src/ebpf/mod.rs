//! The eBPF data path: loads the embedded object, attaches the node-wide programs at the
//! cgroup-v2 root and the per-pod `sk_lookup`, and is the only writer of the eBPF maps.
//!
//! Every map and link is pinned under the agent's bpf directory (`--bpf-dir`, default
//! `/sys/fs/bpf/ferrymesh`), so the data path outlives the agent:
//!
//! ```text
//! maps/<MAP>        every map, by name
//! links/<program>   the node-wide cgroup links
//! netns/<cookie>    the sk_lookup link of each enrolled pod netns
//! ```
//!
//! With no agent running, enrolled pods stay captured and, with no agent listener to take
//! their connections, closed. A starting agent adopts what it finds: it reuses the pinned maps
//! (refusing any whose layout differs from its own, see [`check_layout`]) and swaps its own
//! programs into the pinned links with BPF_LINK_UPDATE, so no hook is ever without a program.
//! Only [`uninstall`] and unenrolling a pod remove pins.

pub mod probe;
mod sys;

use std::collections::HashSet;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aya::maps::{HashMap, MapData, MapInfo, PerCpuArray, SockHash};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{CgroupAttachMode, CgroupSock, CgroupSockAddr, ProgramError, SkLookup, SockOps};
use aya::{Ebpf, EbpfLoader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use mesh_common::{
    ip_words, ipv6_from_words, map_names, map_sizes, AppDialKey, Counter, OrigDst, PortKey, AF_INET, AF_INET6,
};

/// The compiled eBPF object, embedded at build time.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh-ebpf.o"));

/// Errors of the data path, written for the operator.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// The object could not be parsed or its maps created.
    #[error("cannot load the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    /// A program is missing from the object (a build mismatch).
    #[error("eBPF program {0} is missing from the embedded object; rebuild with `cargo xtask build`")]
    MissingProgram(&'static str),
    /// A map is missing or has the wrong type.
    #[error("eBPF map {name}: {source}")]
    Map {
        /// Map name.
        name: &'static str,
        /// What went wrong.
        source: aya::maps::MapError,
    },
    /// Loading (verifying) or attaching a program failed; load errors carry the verifier log.
    #[error("eBPF program {name}: {source}")]
    Program {
        /// Program name.
        name: &'static str,
        /// What went wrong, with the verifier log for load errors.
        source: ProgramError,
    },
    /// A link could not be inspected.
    #[error("eBPF link of {name}: {source}")]
    Link {
        /// Program name.
        name: &'static str,
        /// What went wrong.
        source: aya::programs::links::LinkError,
    },
    /// The cgroup-v2 root could not be opened.
    #[error("cannot open the cgroup v2 root {path}: {source}")]
    Cgroup {
        /// Path of the cgroup root.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// A pin could not be created, opened, adopted or removed.
    #[error("pinned eBPF object {path}: {source}")]
    Pin {
        /// Path of the pin (or of its directory).
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// The bpf directory is not on a bpf filesystem.
    #[error(
        "--bpf-dir {0} is not on a bpf filesystem: mount one there (`mount -t bpf bpf /sys/fs/bpf`; in Kubernetes, mount the host's /sys/fs/bpf)"
    )]
    NotBpffs(PathBuf),
    /// A pinned map was made by an agent with another map layout.
    #[error(
        "pinned map {path} has {field} {pinned}, this agent's layout needs {wanted}: it was left by an incompatible ferrymesh version; roll back, or run `mesh-agent --uninstall` (enrolled pods are open until an agent attaches again) and start this one"
    )]
    Layout {
        /// Path of the pinned map.
        path: PathBuf,
        /// The differing field of the map definition.
        field: &'static str,
        /// Its value in the pinned map.
        pinned: u32,
        /// Its value in this agent's object.
        wanted: u32,
    },
}

type Result<T> = std::result::Result<T, DatapathError>;

/// A program attached node-wide, with the (pinned) link that keeps it attached.
#[derive(Debug)]
pub struct Attached {
    /// Program name in the object.
    pub name: &'static str,
    /// Kernel program id.
    pub prog_id: u32,
    /// Human-readable attach point.
    pub attach: String,
    /// Kernel link id.
    pub link_id: u32,
    /// The link was pinned by an earlier agent and adopted by this one.
    pub adopted: bool,
    _link: FdLink,
}

/// A per-pod `sk_lookup` attachment, pinned: dropping it leaves the pod captured (and closed
/// while no agent serves it); [`Datapath::release_netns`] releases the pod.
#[derive(Debug)]
pub struct SkLookupAttachment {
    /// Kernel link id.
    pub link_id: u32,
    /// Cookie of the netns it is attached to.
    pub netns_cookie: u64,
    /// The link was pinned by an earlier agent and adopted by this one.
    pub adopted: bool,
    pin: PathBuf,
    _link: FdLink,
}

/// What an agent found pinned by an earlier one when it started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Adopted {
    /// Maps reused, by name.
    pub maps: Vec<String>,
    /// Node-wide links whose program was swapped for this agent's.
    pub links: usize,
}

impl Adopted {
    /// Whether anything was adopted.
    pub fn any(&self) -> bool {
        !self.maps.is_empty() || self.links > 0
    }
}

/// Whether `path` (which must exist) is on a bpf filesystem.
fn on_bpffs(path: &Path) -> std::io::Result<bool> {
    Ok(nix::sys::statfs::statfs(path)?.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
}

/// The layout of the bpf directory.
#[derive(Debug, Clone)]
struct Pins {
    dir: PathBuf,
    maps: PathBuf,
    links: PathBuf,
    netns: PathBuf,
}

impl Pins {
    fn under(dir: &Path) -> Self {
        Self { dir: dir.to_path_buf(), maps: dir.join("maps"), links: dir.join("links"), netns: dir.join("netns") }
    }

    /// Creates the directories, refusing (before it creates anything) a `dir` that is not on a
    /// bpf filesystem: the nearest existing directory of its path must be on one.
    fn create(dir: &Path) -> Result<Self> {
        let existing = dir.ancestors().find(|d| d.exists()).unwrap_or(dir);
        let on_bpffs = on_bpffs(existing).map_err(|source| DatapathError::Pin { path: existing.into(), source })?;
        if !on_bpffs {
            return Err(DatapathError::NotBpffs(dir.to_path_buf()));
        }
        let pins = Self::under(dir);
        for sub in [&pins.maps, &pins.links, &pins.netns] {
            std::fs::create_dir_all(sub).map_err(|source| DatapathError::Pin { path: sub.clone(), source })?;
        }
        Ok(pins)
    }

    fn sk_lookup(&self, netns_cookie: u64) -> PathBuf {
        self.netns.join(netns_cookie.to_string())
    }
}

/// Cgroup sock_addr programs: (name in the object, attach type label).
const SOCK_ADDR_PROGRAMS: [(&str, &str); 4] = [
    ("fm_connect4", "connect4"),
    ("fm_connect6", "connect6"),
    ("fm_peer4", "getpeername4"),
    ("fm_peer6", "getpeername6"),
];
const SOCK_OPS_PROGRAM: &str = "fm_orig_dst";
const SOCK_RELEASE_PROGRAM: &str = "fm_release";
const SK_LOOKUP_PROGRAM: &str = "fm_steer_in";

/// The loaded object, its maps and its node-wide attachments.
pub struct Datapath {
    ebpf: Ebpf,
    enrolled: HashMap<MapData, u64, u32>,
    captures: HashMap<MapData, u64, u64>,
    capture_share: u32,
    orig_by_port: HashMap<MapData, PortKey, OrigDst>,
    inbound_listeners: SockHash<MapData, [u32; 4]>,
    app_dials: HashMap<MapData, AppDialKey, u8>,
    agent_dials: HashMap<MapData, u64, u8>,
    stats: Arc<MapStats>,
    attached: Vec<Attached>,
    sk_lookup_prog_id: u32,
    pins: Pins,
    adopted: Adopted,
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath").field("attached", &self.attached).finish_non_exhaustive()
    }
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(DatapathError::Map { name, source: aya::maps::MapError::InvalidName { name: name.into() } })?;
    T::try_from(map).map_err(|source| DatapathError::Map { name, source })
}

fn program_error(name: &'static str) -> impl Fn(ProgramError) -> DatapathError {
    move |source| DatapathError::Program { name, source }
}

fn link_id(name: &'static str, link: &FdLink) -> Result<u32> {
    link.info().map(|info| info.id()).map_err(|source| DatapathError::Link { name, source })
}

/// Program `name` of the object, as type `T`, loaded into the kernel (verified).
fn loaded<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
    T: LoadProgram + 'a,
{
    let prog: &mut T =
        ebpf.program_mut(name).ok_or(DatapathError::MissingProgram(name))?.try_into().map_err(program_error(name))?;
    prog.load_program().map_err(program_error(name))?;
    Ok(prog)
}

/// `load()` of the program types used here (aya has no common trait for it).
trait LoadProgram {
    fn load_program(&mut self) -> std::result::Result<(), ProgramError>;
}

impl LoadProgram for CgroupSockAddr {
    fn load_program(&mut self) -> std::result::Result<(), ProgramError> {
        self.load()
    }
}

impl LoadProgram for CgroupSock {
    fn load_program(&mut self) -> std::result::Result<(), ProgramError> {
        self.load()
    }
}

impl LoadProgram for SockOps {
    fn load_program(&mut self) -> std::result::Result<(), ProgramError> {
        self.load()
    }
}

impl LoadProgram for SkLookup {
    fn load_program(&mut self) -> std::result::Result<(), ProgramError> {
        self.load()
    }
}

/// The node-wide program types, attached at the cgroup root through a bpf link.
trait CgroupProgram: LoadProgram {
    fn attach_link(
        &mut self,
        cgroup: &File,
    ) -> std::result::Result<std::result::Result<FdLink, aya::programs::links::LinkError>, ProgramError>;
    fn program_fd(&self) -> std::result::Result<BorrowedFd<'_>, ProgramError>;
    fn program_id(&self) -> std::result::Result<u32, ProgramError>;
}

macro_rules! cgroup_program {
    ($($program:ty),*) => {$(
        impl CgroupProgram for $program {
            fn attach_link(
                &mut self,
                cgroup: &File,
            ) -> std::result::Result<std::result::Result<FdLink, aya::programs::links::LinkError>, ProgramError> {
                let id = self.attach(cgroup, CgroupAttachMode::Single)?;
                Ok(self.take_link(id)?.try_into())
            }
            fn program_fd(&self) -> std::result::Result<BorrowedFd<'_>, ProgramError> {
                Ok(self.fd()?.as_fd())
            }
            fn program_id(&self) -> std::result::Result<u32, ProgramError> {
                Ok(self.info()?.id())
            }
        }
    )*};
}

cgroup_program!(CgroupSockAddr, CgroupSock, SockOps);

/// Loads program `name` and attaches it at `cgroup`, pinning the link at `path`, or adopts the
/// link pinned there: (program id, link, adopted).
fn attach_pinned<'a, T>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
    path: &Path,
    cgroup: &File,
) -> Result<(u32, FdLink, bool)>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
    T: CgroupProgram + 'a,
{
    let prog: &mut T = loaded(ebpf, name)?;
    let adopted = path.exists();
    let link = if adopted {
        adopt_link(name, path, prog.program_fd().map_err(program_error(name))?)?
    } else {
        pin_link(name, path, prog.attach_link(cgroup).map_err(program_error(name))?)?
    };
    Ok((prog.program_id().map_err(program_error(name))?, link, adopted))
}

/// The pinned link at `path`, now running `program` (BPF_LINK_UPDATE).
fn adopt_link(name: &'static str, path: &Path, program: BorrowedFd<'_>) -> Result<FdLink> {
    let pin_error = |source| DatapathError::Pin { path: path.to_path_buf(), source };
    let fd = sys::obj_get(path).map_err(pin_error)?;
    sys::link_update(fd.as_fd(), program).map_err(pin_error)?;
    PinnedLink::from_pin(path).map(FdLink::from).map_err(|source| DatapathError::Link { name, source })
}

/// Pins a link just created at `path`.
fn pin_link(
    name: &'static str,
    path: &Path,
    link: std::result::Result<FdLink, aya::programs::links::LinkError>,
) -> Result<FdLink> {
    let link = link.map_err(|source| DatapathError::Link { name, source })?;
    let pinned = link.pin(path).map_err(|e| DatapathError::Pin { path: path.to_path_buf(), source: pin_io(e) })?;
    Ok(pinned.into())
}

fn pin_io(error: aya::pin::PinError) -> std::io::Error {
    match error {
        aya::pin::PinError::SyscallError(e) => e.io_error,
        other => std::io::Error::other(other.to_string()),
    }
}

/// Checks every map pinned in `maps_dir` against this agent's definition of it (type, key and
/// value size, capacity, flags) and returns the names of those found: aya would reuse a pinned
/// map whatever its layout, and programs reading a map of another layout read garbage.
pub fn check_layout(maps_dir: &Path) -> Result<Vec<String>> {
    let object = aya_obj::Object::parse(OBJECT).map_err(|e| DatapathError::Load(e.into()))?;
    let mut found = Vec::new();
    let mut names: Vec<&String> = object.maps.keys().collect();
    names.sort();
    for name in names {
        let map = &object.maps[name];
        let path = maps_dir.join(name);
        if map.pinning() != aya_obj::maps::PinningType::ByName || !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path)
            .map_err(|e| DatapathError::Pin { path: path.clone(), source: std::io::Error::other(e.to_string()) })?;
        let pinned_type = info.map_type().map_or(u32::MAX, |t| t as u32);
        for (field, pinned, wanted) in [
            ("map type", pinned_type, map.map_type()),
            ("key size", info.key_size(), map.key_size()),
            ("value size", info.value_size(), map.value_size()),
            ("max entries", info.max_entries(), map.max_entries()),
            ("flags", info.map_flags(), map.map_flags()),
        ] {
            if pinned != wanted {
                return Err(DatapathError::Layout { path, field, pinned, wanted });
            }
        }
        found.push(name.clone());
    }
    Ok(found)
}

/// Removes every pinned object under `bpf_dir` (links first, so the hooks go before the
/// maps) and the directory itself; returns how many objects were removed. A running agent
/// keeps its node-wide links attached until it exits: stop it first. A `bpf_dir` that is not on
/// a bpf filesystem is refused (nothing under it is a pin); a missing one is nothing to do.
pub fn uninstall(bpf_dir: &Path) -> std::io::Result<usize> {
    match on_bpffs(bpf_dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(std::io::Error::new(e.kind(), format!("{}: {e}", bpf_dir.display()))),
        Ok(false) => {
            let message = format!("{} is not on a bpf filesystem: nothing was removed", bpf_dir.display());
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, message));
        }
        Ok(true) => {}
    }
    let pins = Pins::under(bpf_dir);
    let mut removed = 0;
    for sub in [&pins.netns, &pins.links, &pins.maps] {
        let entries = match std::fs::read_dir(sub) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(std::io::Error::new(e.kind(), format!("{}: {e}", sub.display()))),
        };
        for entry in entries {
            let path = entry?.path();
            std::fs::remove_file(&path)
                .map_err(|e| std::io::Error::new(e.kind(), format!("cannot unpin {}: {e}", path.display())))?;
            removed += 1;
        }
        std::fs::remove_dir(sub)
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot remove {}: {e}", sub.display())))?;
    }
    match std::fs::remove_dir(bpf_dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(std::io::Error::new(e.kind(), format!("cannot remove {}: {e}", bpf_dir.display())))
        }
        _ => Ok(removed),
    }
}

impl Datapath {
    /// Loads every program (reporting the verifier log of any that fails) with the maps pinned
    /// under `bpf_dir` (created there when absent), and attaches the node-wide ones at
    /// `cgroup_root`, adopting the links an earlier agent pinned. Each pod this agent captures
    /// may have `capture_share` captured sockets at once.
    pub fn load_and_attach(cgroup_root: &Path, bpf_dir: &Path, capture_share: u32) -> Result<Self> {
        let pins = Pins::create(bpf_dir)?;
        let adopted_maps = check_layout(&pins.maps)?;
        let mut ebpf = EbpfLoader::new().default_map_pin_directory(&pins.maps).load(OBJECT)?;
        let cgroup = File::open(cgroup_root)
            .map_err(|source| DatapathError::Cgroup { path: cgroup_root.to_path_buf(), source })?;
        let at = |hook: &str| format!("cgroup {} ({hook})", cgroup_root.display());
        let mut attached = Vec::new();
        let node_wide = SOCK_ADDR_PROGRAMS
            .into_iter()
            .chain([(SOCK_OPS_PROGRAM, "sock_ops"), (SOCK_RELEASE_PROGRAM, "sock_release")]);
        for (name, hook) in node_wide {
            let path = pins.links.join(name);
            let (prog_id, link, adopted) = match name {
                SOCK_OPS_PROGRAM => attach_pinned::<SockOps>(&mut ebpf, name, &path, &cgroup)?,
                SOCK_RELEASE_PROGRAM => attach_pinned::<CgroupSock>(&mut ebpf, name, &path, &cgroup)?,
                _ => attach_pinned::<CgroupSockAddr>(&mut ebpf, name, &path, &cgroup)?,
            };
            attached.push(Attached {
                name,
                prog_id,
                attach: at(hook),
                link_id: link_id(name, &link)?,
                adopted,
                _link: link,
            });
        }
        let prog: &mut SkLookup = loaded(&mut ebpf, SK_LOOKUP_PROGRAM)?;
        let sk_lookup_prog_id = prog.info().map_err(program_error(SK_LOOKUP_PROGRAM))?.id();
        let stats = Arc::new(MapStats::open(&ebpf)?);
        let adopted = Adopted { maps: adopted_maps, links: attached.iter().filter(|a| a.adopted).count() };
        Ok(Self {
            stats,
            enrolled: take_map(&mut ebpf, map_names::ENROLLED)?,
            captures: take_map(&mut ebpf, map_names::CAPTURES)?,
            capture_share,
            orig_by_port: take_map(&mut ebpf, map_names::ORIG_BY_PORT)?,
            inbound_listeners: take_map(&mut ebpf, map_names::INBOUND_LISTENERS)?,
            app_dials: take_map(&mut ebpf, map_names::APP_DIALS)?,
            agent_dials: take_map(&mut ebpf, map_names::AGENT_DIALS)?,
            ebpf,
            attached,
            sk_lookup_prog_id,
            pins,
            adopted,
        })
    }

    /// What this agent adopted from an earlier one when it started.
    pub fn adopted(&self) -> &Adopted {
        &self.adopted
    }

    /// The directory the maps and links are pinned under.
    pub fn bpf_dir(&self) -> &Path {
        &self.pins.dir
    }

    /// Node-wide attachments.
    pub fn attached(&self) -> &[Attached] {
        &self.attached
    }

    /// Kernel id and name of the per-pod sk_lookup program.
    pub fn sk_lookup_program(&self) -> (&'static str, u32) {
        (SK_LOOKUP_PROGRAM, self.sk_lookup_prog_id)
    }

    /// Captures the network namespace `netns` (cookie `netns_cookie`): sk_lookup attached to
    /// it and pinned (or the link an earlier agent pinned for it adopted), then its cookie in
    /// ENROLLED with its capture share (its count, kept by the programs, is left as it is). On
    /// failure a link this call attached is detached again; an adopted one stays, so a netns an
    /// earlier agent captured stays captured, and closed.
    pub fn capture_netns(&mut self, netns: impl AsFd, netns_cookie: u64) -> Result<SkLookupAttachment> {
        let link = self.attach_sk_lookup(netns, netns_cookie)?;
        let enrolled = self.enrolled.insert(netns_cookie, self.capture_share, 0);
        if let Err(source) = enrolled {
            if !link.adopted {
                self.release_netns(link);
            }
            return Err(DatapathError::Map { name: map_names::ENROLLED, source });
        }
        Ok(link)
    }

    /// Releases a captured network namespace: its cookie out of ENROLLED (connect() calls go
    /// through again) and CAPTURES, its sk_lookup link unpinned (the link goes with its last
    /// descriptor).
    pub fn release_netns(&mut self, attachment: SkLookupAttachment) {
        self.forget_netns(attachment.netns_cookie);
        if let Err(e) = std::fs::remove_file(&attachment.pin) {
            tracing::warn!(pin = %attachment.pin.display(), "cannot unpin the sk_lookup link: {e}");
        }
    }

    /// Registers the pod's inbound listener for sk_lookup steering of traffic to `pod_ip`.
    pub fn add_inbound_listener(
        &mut self,
        pod_ip: std::net::IpAddr,
        listener: &impl std::os::fd::AsRawFd,
    ) -> Result<()> {
        self.inbound_listeners
            .insert(ip_words(pod_ip), listener.as_raw_fd(), 0)
            .map_err(|source| DatapathError::Map { name: map_names::INBOUND_LISTENERS, source })
    }

    /// Removes the pod's inbound listener; a missing entry is fine.
    pub fn remove_inbound_listener(&mut self, pod_ip: std::net::IpAddr) {
        let _ = self.inbound_listeners.remove(&ip_words(pod_ip));
    }

    /// Attaches sk_lookup to the network namespace `netns` (cookie `netns_cookie`) and pins
    /// the link, or adopts the link an earlier agent pinned for it.
    fn attach_sk_lookup(&mut self, netns: impl AsFd, netns_cookie: u64) -> Result<SkLookupAttachment> {
        let name = SK_LOOKUP_PROGRAM;
        let prog: &mut SkLookup = self
            .ebpf
            .program_mut(name)
            .ok_or(DatapathError::MissingProgram(name))?
            .try_into()
            .map_err(program_error(name))?;
        let pin = self.pins.sk_lookup(netns_cookie);
        let adopted = pin.exists();
        let link = if adopted {
            adopt_link(name, &pin, prog.fd().map_err(program_error(name))?.as_fd())?
        } else {
            let id = prog.attach(netns).map_err(program_error(name))?;
            pin_link(name, &pin, Ok(prog.take_link(id).map_err(program_error(name))?.into()))?
        };
        Ok(SkLookupAttachment { link_id: link_id(name, &link)?, netns_cookie, adopted, pin, _link: link })
    }

    /// Releases every pod netns an earlier agent captured that is not in `keep` (cookies of the
    /// pods enrolled now): its sk_lookup pin and its ENROLLED entry. Returns the cookies
    /// released.
    pub fn release_other_pods(&mut self, keep: &HashSet<u64>) -> Vec<u64> {
        let mut released = Vec::new();
        let pinned: Vec<(u64, PathBuf)> = std::fs::read_dir(&self.pins.netns)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
            .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path())))
            .collect();
        for (cookie, pin) in pinned {
            if !keep.contains(&cookie) {
                let _ = std::fs::remove_file(pin);
                released.push(cookie);
            }
        }
        let enrolled: Vec<u64> = self.enrolled.keys().filter_map(|k| k.ok()).collect();
        for cookie in enrolled {
            if !keep.contains(&cookie) && !released.contains(&cookie) {
                released.push(cookie);
            }
        }
        let counted: Vec<u64> = self.captures.keys().filter_map(|k| k.ok()).collect();
        for cookie in counted.into_iter().chain(released.clone()) {
            if !keep.contains(&cookie) {
                self.forget_netns(cookie);
            }
        }
        released
    }

    /// A netns's entries in ENROLLED and CAPTURES removed; missing ones are fine.
    fn forget_netns(&mut self, netns_cookie: u64) {
        let _ = self.enrolled.remove(&netns_cookie);
        let _ = self.captures.remove(&netns_cookie);
    }

    /// Takes the original destination of a captured connection, accepted from `peer`
    /// (`127.0.0.1:<port>`, or `[::1]:<port>` for a native IPv6 destination) in the netns with
    /// `netns_cookie`.
    pub fn take_orig_dst(&mut self, netns_cookie: u64, peer: SocketAddr) -> Option<SocketAddr> {
        let family = if peer.is_ipv6() { AF_INET6 } else { AF_INET };
        let key = PortKey { netns_cookie, port: u32::from(peer.port()), family: u32::from(family) };
        let orig = self.orig_by_port.get(&key, 0).ok()?;
        let _ = self.orig_by_port.remove(&key);
        let ip: IpAddr = match orig.family {
            AF_INET6 => ipv6_from_words(orig.ip6).into(),
            _ => Ipv4Addr::from(u32::from_be(orig.ip4)).into(),
        };
        Some(SocketAddr::new(ip, orig.port))
    }

    /// Tells sk_lookup to leave the SYN of the agent's dial `key` alone.
    pub fn register_app_dial(&mut self, key: AppDialKey) -> Result<()> {
        self.app_dials.insert(key, 1, 0).map_err(|source| DatapathError::Map { name: map_names::APP_DIALS, source })
    }

    /// Forgets an app dial once its SYN has been answered (or the dial failed).
    pub fn unregister_app_dial(&mut self, key: &AppDialKey) {
        let _ = self.app_dials.remove(key);
    }

    /// Tells connect4/6 that the marked socket of cookie `cookie`, about to connect from a pod's
    /// netns, is the agent's own (they forget it as it connects).
    pub fn register_agent_dial(&mut self, cookie: u64) -> Result<()> {
        self.agent_dials
            .insert(cookie, 1, 0)
            .map_err(|source| DatapathError::Map { name: map_names::AGENT_DIALS, source })
    }

    /// Forgets a dial whose connect() never ran (it failed before).
    pub fn unregister_agent_dial(&mut self, cookie: u64) {
        let _ = self.agent_dials.remove(&cookie);
    }

    /// Read-only handles on the maps, for status and metrics.
    pub fn stats(&self) -> Arc<MapStats> {
        self.stats.clone()
    }
}

/// A second descriptor of map `name` of `ebpf`, as the map type it has.
fn second_handle(ebpf: &Ebpf, name: &'static str) -> Result<aya::maps::Map> {
    let invalid = || DatapathError::Map { name, source: aya::maps::MapError::InvalidName { name: name.into() } };
    let map = ebpf.map(name).ok_or_else(invalid)?;
    let (aya::maps::Map::HashMap(data) | aya::maps::Map::LruHashMap(data) | aya::maps::Map::PerCpuArray(data)) = map
    else {
        return Err(invalid());
    };
    let fd = data.fd().as_fd().try_clone_to_owned().map_err(|io_error| DatapathError::Map {
        name,
        source: aya::maps::MapError::SyscallError(aya::sys::SyscallError { call: "dup", io_error }),
    })?;
    let data = MapData::from_fd(fd).map_err(|source| DatapathError::Map { name, source })?;
    Ok(match map {
        aya::maps::Map::PerCpuArray(_) => aya::maps::Map::PerCpuArray(data),
        _ => aya::maps::Map::HashMap(data),
    })
}

fn stats_map<T>(ebpf: &Ebpf, name: &'static str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    T::try_from(second_handle(ebpf, name)?).map_err(|source| DatapathError::Map { name, source })
}

/// Read-only handles on the maps (second descriptors of the same kernel maps), for status and
/// metrics: reading them never takes the data path's lock. Counting entries walks the keys, a
/// syscall per entry, so callers do it off the async runtime and not often.
pub struct MapStats {
    enrolled: HashMap<MapData, u64, u32>,
    captures: HashMap<MapData, u64, u64>,
    orig_by_cookie: HashMap<MapData, u64, OrigDst>,
    orig_by_port: HashMap<MapData, PortKey, OrigDst>,
    app_dials: HashMap<MapData, AppDialKey, u8>,
    agent_dials: HashMap<MapData, u64, u8>,
    counters: PerCpuArray<MapData, u64>,
}

impl std::fmt::Debug for MapStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MapStats").finish_non_exhaustive()
    }
}

impl MapStats {
    fn open(ebpf: &Ebpf) -> Result<Self> {
        Ok(Self {
            enrolled: stats_map(ebpf, map_names::ENROLLED)?,
            captures: stats_map(ebpf, map_names::CAPTURES)?,
            orig_by_cookie: stats_map(ebpf, map_names::ORIG_BY_COOKIE)?,
            orig_by_port: stats_map(ebpf, map_names::ORIG_BY_PORT)?,
            app_dials: stats_map(ebpf, map_names::APP_DIALS)?,
            agent_dials: stats_map(ebpf, map_names::AGENT_DIALS)?,
            counters: stats_map(ebpf, map_names::COUNTERS)?,
        })
    }

    /// How full each map is: (name, entries, capacity).
    pub fn map_fill(&self) -> Vec<(&'static str, u64, u64)> {
        vec![
            (map_names::ENROLLED, self.enrolled.keys().count() as u64, u64::from(map_sizes::ENROLLED)),
            (map_names::CAPTURES, self.captures.keys().count() as u64, u64::from(map_sizes::CAPTURES)),
            (map_names::ORIG_BY_COOKIE, self.orig_by_cookie.keys().count() as u64, u64::from(map_sizes::ORIG)),
            (map_names::ORIG_BY_PORT, self.orig_by_port.keys().count() as u64, u64::from(map_sizes::ORIG)),
            (map_names::APP_DIALS, self.app_dials.keys().count() as u64, u64::from(map_sizes::APP_DIALS)),
            (map_names::AGENT_DIALS, self.agent_dials.keys().count() as u64, u64::from(map_sizes::AGENT_DIALS)),
        ]
    }

    /// Current value of every eBPF counter, summed over CPUs.
    pub fn counters(&self) -> Vec<(Counter, u64)> {
        Counter::ALL
            .iter()
            .map(|&c| {
                let total = self.counters.get(&(c as u32), 0).map(|v| v.iter().sum()).unwrap_or(0);
                (c, total)
            })
            .collect()
    }
}
