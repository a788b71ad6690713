//! The eBPF data path: loads the embedded object, attaches the node-wide programs at the
//! cgroup-v2 root and the per-pod `sk_lookup`, and is the only writer of the eBPF maps.
//!
//! Every attachment is a bpf link held as a file descriptor by this process and never pinned:
//! when the agent exits, by SIGTERM or SIGKILL, the kernel detaches everything.

pub mod probe;

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aya::maps::{HashMap, MapData, PerCpuArray, SockHash};
use aya::programs::{links::FdLink, CgroupAttachMode, CgroupSockAddr, ProgramError, SkLookup, SockOps};
use aya::{Ebpf, EbpfLoader};
use mesh_common::{map_names, map_sizes, AppDialKey, Counter, OrigDst, PortKey};

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
}

type Result<T> = std::result::Result<T, DatapathError>;

/// A program attached node-wide, with the link that keeps it attached.
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
    _link: FdLink,
}

/// A per-pod `sk_lookup` attachment; dropping it detaches the program from the pod netns.
#[derive(Debug)]
pub struct SkLookupAttachment {
    /// Kernel link id.
    pub link_id: u32,
    _link: FdLink,
}

/// Cgroup sock_addr programs: (name in the object, attach type label).
const SOCK_ADDR_PROGRAMS: [(&str, &str); 4] = [
    ("fm_connect4", "connect4"),
    ("fm_connect6", "connect6"),
    ("fm_peer4", "getpeername4"),
    ("fm_peer6", "getpeername6"),
];
const SOCK_OPS_PROGRAM: &str = "fm_orig_dst";
const SK_LOOKUP_PROGRAM: &str = "fm_steer_in";

/// The loaded object, its maps and its node-wide attachments.
pub struct Datapath {
    ebpf: Ebpf,
    enrolled: HashMap<MapData, u64, u32>,
    orig_by_port: HashMap<MapData, PortKey, OrigDst>,
    inbound_listeners: SockHash<MapData, u32>,
    app_dials: HashMap<MapData, AppDialKey, u8>,
    stats: Arc<MapStats>,
    attached: Vec<Attached>,
    sk_lookup_prog_id: u32,
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

impl Attached {
    fn new(
        name: &'static str,
        prog_id: u32,
        attach: String,
        link: std::result::Result<FdLink, aya::programs::links::LinkError>,
    ) -> Result<Self> {
        let link = link.map_err(|source| DatapathError::Link { name, source })?;
        Ok(Self { name, prog_id, attach, link_id: link_id(name, &link)?, _link: link })
    }
}

impl Datapath {
    /// Loads every program (reporting the verifier log of any that fails) and attaches the
    /// node-wide ones at `cgroup_root`.
    pub fn load_and_attach(cgroup_root: &Path) -> Result<Self> {
        let mut ebpf = EbpfLoader::new().load(OBJECT)?;
        let cgroup = File::open(cgroup_root)
            .map_err(|source| DatapathError::Cgroup { path: cgroup_root.to_path_buf(), source })?;
        let at = |hook: &str| format!("cgroup {} ({hook})", cgroup_root.display());
        let mut attached = Vec::new();
        for (name, hook) in SOCK_ADDR_PROGRAMS {
            let prog: &mut CgroupSockAddr = loaded(&mut ebpf, name)?;
            let id = prog.attach(&cgroup, CgroupAttachMode::Single).map_err(program_error(name))?;
            let link = prog.take_link(id).map_err(program_error(name))?.try_into();
            attached.push(Attached::new(name, prog.info().map_err(program_error(name))?.id(), at(hook), link)?);
        }
        let name = SOCK_OPS_PROGRAM;
        let prog: &mut SockOps = loaded(&mut ebpf, name)?;
        let id = prog.attach(&cgroup, CgroupAttachMode::Single).map_err(program_error(name))?;
        let link = prog.take_link(id).map_err(program_error(name))?.try_into();
        attached.push(Attached::new(name, prog.info().map_err(program_error(name))?.id(), at("sock_ops"), link)?);
        let prog: &mut SkLookup = loaded(&mut ebpf, SK_LOOKUP_PROGRAM)?;
        let sk_lookup_prog_id = prog.info().map_err(program_error(SK_LOOKUP_PROGRAM))?.id();
        let stats = Arc::new(MapStats::open(&ebpf)?);
        Ok(Self {
            stats,
            enrolled: take_map(&mut ebpf, map_names::ENROLLED)?,
            orig_by_port: take_map(&mut ebpf, map_names::ORIG_BY_PORT)?,
            inbound_listeners: take_map(&mut ebpf, map_names::INBOUND_LISTENERS)?,
            app_dials: take_map(&mut ebpf, map_names::APP_DIALS)?,
            ebpf,
            attached,
            sk_lookup_prog_id,
        })
    }

    /// Node-wide attachments.
    pub fn attached(&self) -> &[Attached] {
        &self.attached
    }

    /// Kernel id and name of the per-pod sk_lookup program.
    pub fn sk_lookup_program(&self) -> (&'static str, u32) {
        (SK_LOOKUP_PROGRAM, self.sk_lookup_prog_id)
    }

    /// Starts capturing connect() calls of the netns with `cookie`.
    pub fn enroll_netns(&mut self, cookie: u64) -> Result<()> {
        self.enrolled.insert(cookie, 1, 0).map_err(|source| DatapathError::Map { name: map_names::ENROLLED, source })
    }

    /// Stops capturing the netns with `cookie`; a cookie that is not enrolled is fine.
    pub fn unenroll_netns(&mut self, cookie: u64) {
        let _ = self.enrolled.remove(&cookie);
    }

    /// Registers the pod's inbound listener for sk_lookup steering of traffic to `pod_ip`.
    pub fn add_inbound_listener(
        &mut self,
        pod_ip: std::net::Ipv4Addr,
        listener: &impl std::os::fd::AsRawFd,
    ) -> Result<()> {
        self.inbound_listeners
            .insert(u32::from(pod_ip).to_be(), listener.as_raw_fd(), 0)
            .map_err(|source| DatapathError::Map { name: map_names::INBOUND_LISTENERS, source })
    }

    /// Removes the pod's inbound listener; a missing entry is fine.
    pub fn remove_inbound_listener(&mut self, pod_ip: std::net::Ipv4Addr) {
        let _ = self.inbound_listeners.remove(&u32::from(pod_ip).to_be());
    }

    /// Attaches sk_lookup to the network namespace `netns`.
    pub fn attach_sk_lookup(&mut self, netns: impl AsFd) -> Result<SkLookupAttachment> {
        let name = SK_LOOKUP_PROGRAM;
        let prog: &mut SkLookup = self
            .ebpf
            .program_mut(name)
            .ok_or(DatapathError::MissingProgram(name))?
            .try_into()
            .map_err(program_error(name))?;
        let id = prog.attach(netns).map_err(program_error(name))?;
        let link: FdLink = prog.take_link(id).map_err(program_error(name))?.into();
        Ok(SkLookupAttachment { link_id: link_id(name, &link)?, _link: link })
    }

    /// Takes the original destination of a captured connection, accepted from
    /// `127.0.0.1:<port>` in the netns with `netns_cookie`.
    pub fn take_orig_dst(&mut self, netns_cookie: u64, port: u16) -> Option<OrigDst> {
        let key = PortKey { netns_cookie, port: u32::from(port), pad: 0 };
        let orig = self.orig_by_port.get(&key, 0).ok()?;
        let _ = self.orig_by_port.remove(&key);
        Some(orig)
    }

    /// Tells sk_lookup to leave the SYN of the agent's dial `key` alone.
    pub fn register_app_dial(&mut self, key: AppDialKey) -> Result<()> {
        self.app_dials.insert(key, 1, 0).map_err(|source| DatapathError::Map { name: map_names::APP_DIALS, source })
    }

    /// Forgets an app dial once its SYN has been answered (or the dial failed).
    pub fn unregister_app_dial(&mut self, key: &AppDialKey) {
        let _ = self.app_dials.remove(key);
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
    orig_by_cookie: HashMap<MapData, u64, OrigDst>,
    orig_by_port: HashMap<MapData, PortKey, OrigDst>,
    app_dials: HashMap<MapData, AppDialKey, u8>,
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
            orig_by_cookie: stats_map(ebpf, map_names::ORIG_BY_COOKIE)?,
            orig_by_port: stats_map(ebpf, map_names::ORIG_BY_PORT)?,
            app_dials: stats_map(ebpf, map_names::APP_DIALS)?,
            counters: stats_map(ebpf, map_names::COUNTERS)?,
        })
    }

    /// How full each map is: (name, entries, capacity).
    pub fn map_fill(&self) -> Vec<(&'static str, u64, u64)> {
        vec![
            (map_names::ENROLLED, self.enrolled.keys().count() as u64, u64::from(map_sizes::ENROLLED)),
            (map_names::ORIG_BY_COOKIE, self.orig_by_cookie.keys().count() as u64, u64::from(map_sizes::ORIG)),
            (map_names::ORIG_BY_PORT, self.orig_by_port.keys().count() as u64, u64::from(map_sizes::ORIG)),
            (map_names::APP_DIALS, self.app_dials.keys().count() as u64, u64::from(map_sizes::APP_DIALS)),
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
