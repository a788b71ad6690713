//! cargo xtask: every step from a fresh machine to a tested build.
//!
//! - `setup`: Debian packages, rust-src for the eBPF toolchain, bpf-linker linked against that
//!   toolchain's own libLLVM. Idempotent and quick when already done.
//! - `build`: the eBPF object (nightly, bpfel-unknown-none, BTF), then every binary and test
//!   (release), linked statically for the host's triple (see [`build`]), with links to the
//!   binaries in target/release/.
//! - `test`: setup, build, fmt check, clippy -D warnings (userspace and eBPF), all tests.
//! - `demo [--hold]`: setup, build, then a live mesh on a local topology with traffic and flows.
//! - `bench [--quick]`: setup, build, then fm-bench (results and, for a full run, docs/BENCHMARKS.md).
//! - `fuzz [--time S]`: setup, then every cargo fuzz target for S seconds (default 60) from its
//!   committed corpus (see [`fuzz`]); `test` runs each for 20.
//! - `image [--registry R] [--check] [--pin-production]`: OCI images of the daemons (see
//!   [`image`]) in target/images/; `--check` (run by `test`) builds them twice and checks they
//!   are the same bytes, read back as both formats, import into containerd, and run in an
//!   empty chroot; `--pin-production` writes their digests into the production overlay.
//! - `clean-netns`: removes what a killed test, demo or bench run of this project left (its
//!   processes, namespaces, cgroups and scratch directories); `test`, `demo` and `bench` do
//!   it first.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{ensure, Context, Result};

mod fuzz;
mod image;

/// Debian packages the tests and the demo use.
/// (nghttp2-client is h2load, the HTTP/2 client of the waypoint tests.)
const PACKAGES: &[&str] = &[
    "iproute2",
    "iputils-ping",
    "util-linux",
    "procps",
    "curl",
    "iperf3",
    "tcpdump",
    "bpftool",
    "ca-certificates",
    "nghttp2-client",
    // The benchmark's neutral tools (Debian's policy-rc.d, where present, keeps nginx's service
    // from starting on install; the bench runs its own nginx in the pods).
    "sockperf",
    "wrk",
    "nginx-light",
    // The image checks: skopeo reads both archive formats, containerd's ctr imports them as
    // `kind load image-archive` does.
    "skopeo",
    "containerd",
    // strip, for the images' binaries.
    "binutils",
];
const BPF_TARGET: &str = "bpfel-unknown-none";
const BPF_LINKER_VERSION: &str = "^0.13";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let started = Instant::now();
    // A flag a step does not take (`--help` included) prints the usage and runs nothing.
    let only = |allowed: &[&str]| {
        if args[1..].iter().any(|a| !allowed.contains(&a.as_str())) {
            usage(if args.iter().any(|a| a == "--help" || a == "-h") { 0 } else { 2 });
        }
    };
    match args.first().map(String::as_str) {
        Some("setup") => {
            only(&[]);
            setup().map(drop)?
        }
        Some("build") => {
            only(&[]);
            build(&setup()?)?
        }
        Some("test") => {
            only(&[]);
            test()?
        }
        Some("demo") => {
            only(&["--hold"]);
            demo(args.iter().any(|a| a == "--hold"))?
        }
        Some("bench") => {
            only(&["--quick"]);
            bench(args.iter().any(|a| a == "--quick"))?
        }
        Some("fuzz") => {
            let help = args[1..].iter().any(|a| a == "--help" || a == "-h");
            let seconds =
                fuzz::seconds(&args[1..]).filter(|_| !help).unwrap_or_else(|| usage(if help { 0 } else { 2 }));
            fuzz::run(&setup()?, seconds)?
        }
        Some("image") => {
            let args = image::ImageArgs::parse(&args[1..])?;
            build(&setup()?)?;
            image::images(&args)?
        }
        Some("clean-netns") => {
            only(&[]);
            clean_stale()?
        }
        Some("--help" | "-h") => usage(0),
        _ => usage(2),
    }
    eprintln!("xtask: done in {:.0?}", started.elapsed());
    Ok(())
}

/// Prints how to call xtask and exits with `code`.
fn usage(code: i32) -> ! {
    eprintln!(
        "usage: cargo xtask <setup|build|test|demo [--hold]|bench [--quick]|fuzz [--time S]|\
         image [--registry R] [--check] [--pin-production]|clean-netns>"
    );
    std::process::exit(code);
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root().join("target"))
}

fn step(what: &str) {
    eprintln!("\x1b[1mxtask: {what}\x1b[0m");
}

/// A command run from the workspace root, with the outer cargo's toolchain pins removed so a
/// nested `cargo +toolchain` means what it says, and without the variables `cargo run` sets
/// for xtask itself: build scripts (ring's) watch CARGO_PKG_NAME and friends, so a nested
/// build that saw them would be rebuilt from ring up by the next `cargo build` from a shell.
fn cmd(program: impl AsRef<OsStr>) -> Command {
    let mut c = Command::new(program);
    c.current_dir(root());
    for var in ["RUSTUP_TOOLCHAIN", "RUSTC", "RUSTDOC", "RUSTC_WRAPPER", "RUSTC_WORKSPACE_WRAPPER", "CARGO"] {
        c.env_remove(var);
    }
    for (var, _) in std::env::vars_os() {
        let name = var.to_string_lossy();
        let set_by_cargo_run = name.starts_with("CARGO_PKG_")
            || name.starts_with("CARGO_MANIFEST_")
            || ["CARGO_CRATE_NAME", "CARGO_BIN_NAME", "CARGO_PRIMARY_PACKAGE", "CARGO_RUSTC_CURRENT_DIR"]
                .contains(&name.as_ref());
        if set_by_cargo_run {
            c.env_remove(&var);
        }
    }
    c
}

fn run(c: &mut Command) -> Result<()> {
    let status = c.status().with_context(|| format!("cannot run {c:?}"))?;
    ensure!(status.success(), "{c:?} failed: {status}");
    Ok(())
}

fn output(c: &mut Command) -> Result<String> {
    let out = c.output().with_context(|| format!("cannot run {c:?}"))?;
    ensure!(out.status.success(), "{c:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn is_root() -> bool {
    output(Command::new("id").arg("-u")).map(|s| s.trim() == "0").unwrap_or(false)
}

/// The toolchain of the nightly features: it builds the eBPF crate (and bpf-linker links it) and
/// the fuzz targets (sanitizers).
#[derive(Debug)]
pub struct Nightly {
    /// `+nightly`, or `+stable` with RUSTC_BOOTSTRAP=1 where no nightly is installed.
    pub name: String,
    pub bootstrap: bool,
    bpf_linker: PathBuf,
}

fn setup() -> Result<Nightly> {
    step("setup: Debian packages");
    setup_packages()?;
    step("setup: eBPF toolchain");
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))?;
    let (name, bootstrap) = if toolchains.lines().any(|l| l.starts_with("nightly")) {
        ("nightly".to_string(), false)
    } else {
        eprintln!("xtask: no nightly toolchain; building eBPF with stable and RUSTC_BOOTSTRAP=1");
        ("stable".to_string(), true)
    };
    let installed = output(Command::new("rustup").args(["component", "list", "--installed", "--toolchain", &name]))?;
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", &name]))?;
    }
    let bpf_linker = setup_bpf_linker(&name)?;
    Ok(Nightly { name, bootstrap, bpf_linker })
}

/// The manifest checks render the Kustomize overlays with kubectl's built-in kustomize, which
/// takes `patches:` from kubectl 1.21 on (Debian's kubernetes-client is 1.20, so it is not
/// installed from there; these machines have a current kubectl).
fn check_kubectl() -> Result<()> {
    let kubectl = output(Command::new("kubectl").args(["version", "--client"]));
    let kustomize =
        kubectl.as_deref().ok().and_then(|v| v.lines().find_map(|l| l.strip_prefix("Kustomize Version: v")));
    ensure!(
        kustomize.and_then(|v| v.split('.').next()?.parse::<u32>().ok()).is_some_and(|major| major >= 4),
        "kubectl >= 1.21 (with kustomize >= 4) is needed to render manifests/overlays: {}",
        kubectl.as_deref().map_or_else(|e| e.to_string(), |v| format!("found {}", v.trim().replace('\n', ", ")))
    );
    Ok(())
}

fn setup_packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            let status = Command::new("dpkg-query").args(["-W", "-f=${Status}", p]).output();
            !status.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    ensure!(
        is_root(),
        "missing Debian packages {missing:?}; run as root or install them: apt-get install {}",
        missing.join(" ")
    );
    eprintln!("xtask: installing {missing:?}");
    run(Command::new("apt-get").args(["update", "-q"]))?;
    // Packages with a service (nginx) must not start it on this machine: the tests start their
    // own, in their namespaces. Debian's policy-rc.d says so, for the install only.
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let ours = !policy.exists();
    if ours {
        std::fs::write(
            policy,
            "#!/bin/sh\n# cargo xtask setup: no service starts while it installs packages\nexit 101\n",
        )?;
        std::fs::set_permissions(policy, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    }
    let installed = run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"));
    if ours {
        std::fs::remove_file(policy)?;
    }
    installed
}

/// bpf-linker must load the libLLVM of the toolchain that emits the eBPF bitcode. It lives in a
/// prefix of the project's own, outside the work tree so fresh clones reuse it.
fn setup_bpf_linker(toolchain: &str) -> Result<PathBuf> {
    let verbose = output(Command::new("rustc").arg(format!("+{toolchain}")).arg("-vV"))?;
    let llvm =
        verbose.lines().find_map(|l| l.strip_prefix("LLVM version: ")).context("rustc -vV shows no LLVM version")?;
    let major = llvm.split('.').next().unwrap_or_default();
    let sysroot = output(Command::new("rustc").arg(format!("+{toolchain}")).args(["--print", "sysroot"]))?;
    let lib = Path::new(sysroot.trim()).join("lib");
    let libllvm = std::fs::read_dir(&lib)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("libLLVM.so.")))
        .with_context(|| format!("no libLLVM.so.* in {}", lib.display()))?;
    let tools =
        std::env::var_os("FERRYMESH_TOOLS_DIR").map(PathBuf::from).unwrap_or_else(|| home().join(".cache/ferrymesh"));
    let prefix = tools.join(format!("bpf-linker-{toolchain}"));
    let bin = prefix.join("bin/bpf-linker");
    let stamp = prefix.join("stamp");
    // The build links against lib/libLLVM.so; the binary then asks for the library by its
    // soname (the file name) through a RUNPATH of lib/, so both names point at it.
    let llvm_prefix = prefix.join("llvm");
    std::fs::create_dir_all(llvm_prefix.join("lib"))?;
    let soname = libllvm.file_name().context("libLLVM file name")?;
    for name in [OsStr::new("libLLVM.so"), soname] {
        let link = llvm_prefix.join("lib").join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&libllvm, &link)?;
    }
    let want = format!("{}\n{}\n", libllvm.display(), verbose.trim());
    let current = std::fs::read_to_string(&stamp).unwrap_or_default();
    if current == want && Command::new(&bin).arg("--version").output().is_ok_and(|o| o.status.success()) {
        return Ok(bin);
    }
    eprintln!("xtask: building bpf-linker against {} (LLVM {llvm}); takes about 2 minutes once", libllvm.display());
    run(cmd("cargo")
        .args(["install", "bpf-linker", "--force", "--version", BPF_LINKER_VERSION, "--no-default-features"])
        .args(["--features", &format!("llvm-{major}")])
        .arg("--root")
        .arg(&prefix)
        .env("LLVM_PREFIX", &llvm_prefix))?;
    std::fs::write(&stamp, want)?;
    Ok(bin)
}

/// `cargo +toolchain` set up for the eBPF target.
fn ebpf_cargo(tc: &Nightly, subcommand: &str) -> Command {
    let mut c = cmd("cargo");
    c.arg(format!("+{}", tc.name))
        .arg(subcommand)
        .args(["-Z", "build-std=core", "--target", BPF_TARGET, "--release", "-p", "mesh-ebpf"])
        .env("CARGO_TARGET_BPFEL_UNKNOWN_NONE_LINKER", &tc.bpf_linker)
        .env("CARGO_TARGET_BPFEL_UNKNOWN_NONE_RUSTFLAGS", "-C debuginfo=2 -C link-arg=--btf");
    if tc.bootstrap {
        c.env("RUSTC_BOOTSTRAP", "1");
    }
    c
}

fn ebpf_object() -> PathBuf {
    target_dir().join(BPF_TARGET).join("release/mesh-ebpf")
}

fn build_ebpf(tc: &Nightly) -> Result<()> {
    step("build: eBPF programs");
    run(&mut ebpf_cargo(tc, "build"))
}

/// `$HOME`, or /root (these commands run as root).
fn home() -> PathBuf {
    PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
}

/// The host's target triple (`rustc -vV`), asked once per run.
fn host_triple() -> Result<&'static str> {
    static TRIPLE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    if let Some(triple) = TRIPLE.get() {
        return Ok(triple);
    }
    let verbose = output(Command::new("rustc").arg("-vV"))?;
    let triple = verbose.lines().find_map(|l| l.strip_prefix("host: ")).context("rustc -vV names no host")?;
    Ok(TRIPLE.get_or_init(|| triple.to_string()))
}

/// Where the build puts the binaries: target/<host triple>/release.
fn release_dir() -> Result<PathBuf> {
    Ok(target_dir().join(host_triple()?).join("release"))
}

/// `cargo <subcommand> --release --target <host>` with the flags of the build: what `build`
/// and `test` compile is what the images ship.
///
/// - `+crt-static`: glibc linked in, so a binary runs alone in an image's empty root. The flag
///   is for the target only (with `--target`, build scripts and proc macros do not get it; a
///   proc macro cannot be linked statically), which is why the host's triple is named.
/// - The checkout's and cargo's directories are remapped out of the binaries, so their bytes
///   do not depend on where the checkout is.
/// - Symbols stay, for profiles; the images strip them (see [`image`]).
fn host_cargo(subcommand: &str) -> Result<Command> {
    let triple = host_triple()?;
    let cargo_home = std::env::var_os("CARGO_HOME").map(PathBuf::from).unwrap_or_else(|| home().join(".cargo"));
    let flags = format!(
        "-C target-feature=+crt-static --remap-path-prefix={}=/ferrymesh --remap-path-prefix={}=/cargo",
        root().display(),
        cargo_home.display()
    );
    let mut c = cmd("cargo");
    c.args([subcommand, "--release", "--target", triple])
        .env(format!("CARGO_TARGET_{}_RUSTFLAGS", triple.to_uppercase().replace('-', "_")), flags)
        .env("FERRYMESH_EBPF_OBJ", ebpf_object());
    Ok(c)
}

/// The binaries and the tests, once, for the host's triple (see [`host_cargo`]). One build
/// serves the tests and the images: a second one with the images' flags would compile every
/// dependency again.
fn build(tc: &Nightly) -> Result<()> {
    build_ebpf(tc)?;
    step("build: binaries and tests (release, static)");
    // The test targets are built with the binaries so that both see one feature set:
    // dev-dependencies enable features of shared crates (tokio and what sits on it), and a
    // build of the binaries alone would be rebuilt from tokio up by the next `cargo test`.
    // The images take these same binaries.
    run(host_cargo("build")?.args(["--workspace", "--exclude", "mesh-ebpf", "--bins", "--tests"]))?;
    link_binaries()
}

/// Links target/release/<binary> to each binary of target/<triple>/release, where the README's
/// commands find them. Symbolic links, so a later build is seen through them.
fn link_binaries() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = release_dir()?;
    let links = target_dir().join("release");
    std::fs::create_dir_all(&links)?;
    let triple = host_triple()?;
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        let Some(name) = path.file_name() else { continue };
        let is_binary = std::fs::metadata(&path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
        if !is_binary {
            continue;
        }
        let link = links.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(Path::new("..").join(triple).join("release").join(name), &link)
            .with_context(|| format!("cannot link {}", link.display()))?;
    }
    Ok(())
}

fn test() -> Result<()> {
    ensure!(is_root(), "cargo xtask test needs root: the end-to-end tests create network namespaces and load eBPF");
    let tc = setup()?;
    check_kubectl()?;
    build(&tc)?;
    step("test: remove what an earlier killed run left");
    clean_stale()?;
    step("test: rustfmt");
    run(cmd("cargo").args(["fmt", "--all", "--", "--check"]))?;
    run(cmd("cargo").args(["fmt", "--manifest-path", "fuzz/Cargo.toml", "--", "--check"]))?;
    step("test: clippy (userspace)");
    run(cmd("cargo")
        .args(["clippy", "--release", "--workspace", "--exclude", "mesh-ebpf", "--all-targets", "--", "-D", "warnings"])
        .env("FERRYMESH_EBPF_OBJ", ebpf_object()))?;
    step("test: clippy (eBPF)");
    run(ebpf_cargo(&tc, "clippy").args(["--", "-D", "warnings"]))?;
    step("test: unit and end-to-end tests");
    run(host_cargo("test")?.args(["--workspace", "--exclude", "mesh-ebpf", "--no-fail-fast"]))?;
    step("test: fuzz targets");
    fuzz::run(&tc, fuzz::SECONDS_IN_TEST)?;
    step("test: images");
    image::images(&image::ImageArgs {
        registry: image::DEFAULT_REGISTRY.to_string(),
        check: true,
        pin_production: false,
    })
}

fn demo(hold: bool) -> Result<()> {
    ensure!(is_root(), "cargo xtask demo needs root: it creates network namespaces and loads eBPF");
    build(&setup()?)?;
    clean_stale()?;
    step("demo");
    let mut c = cmd(release_dir()?.join("fm-demo"));
    if hold {
        c.arg("--hold");
    }
    run(&mut c)
}

/// The benchmark harness (fm-bench): results in target/bench/results.json; a full run also
/// rewrites docs/BENCHMARKS.md.
fn bench(quick: bool) -> Result<()> {
    ensure!(is_root(), "cargo xtask bench needs root: it creates network namespaces and loads eBPF");
    build(&setup()?)?;
    clean_stale()?;
    step(if quick { "bench (quick)" } else { "bench" });
    let mut c = cmd(release_dir()?.join("fm-bench"));
    c.arg("--out").arg(target_dir().join("bench/results.json"));
    if quick {
        c.arg("--quick");
    } else {
        c.arg("--report").arg(root().join("docs/BENCHMARKS.md"));
    }
    run(&mut c)
}

/// The topology id (`fm<pid>x<n>`) that `name` starts with, when the test process `<pid>` that
/// made it is gone: what an earlier run of this project left behind when it was killed.
fn stale_topology(name: &str) -> Option<&str> {
    let rest = name.strip_prefix("fm")?;
    let (pid, tail) = rest.split_once('x')?;
    let n_len = tail.chars().take_while(char::is_ascii_digit).count();
    let valid = !pid.is_empty() && pid.chars().all(|c| c.is_ascii_digit()) && n_len > 0;
    (valid && !Path::new("/proc").join(pid).exists()).then(|| &name[..2 + pid.len() + 1 + n_len])
}

fn kill(pid: &str) {
    let _ = Command::new("kill").args(["-KILL", pid]).stderr(std::process::Stdio::null()).status();
}

/// Removes what an earlier, killed run of the tests, demo or bench left: its processes (found
/// by the topology's scratch directory in their command line, or inside its namespaces), its
/// cgroups, namespaces and scratch directories. Only names of this project's harness whose
/// test process is gone are touched (`fm<pid>x<n>-*` namespaces, `ferrymesh-fm<pid>x<n>`
/// cgroups and directories, bpf filesystems mounted inside those directories).
fn clean_stale() -> Result<()> {
    // Processes of a stale topology: agents, mesh-ctrl and peers name its scratch directory.
    for entry in std::fs::read_dir("/proc")?.filter_map(|e| e.ok()) {
        let pid = entry.file_name().to_string_lossy().into_owned();
        if !pid.chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let stale =
            cmdline.split(['/', ' ']).filter_map(|w| w.strip_prefix("ferrymesh-")).any(|w| stale_topology(w).is_some());
        if stale {
            eprintln!("xtask: killing process {pid} of an earlier run: {}", cmdline.trim());
            kill(&pid);
        }
    }
    let list = output(Command::new("ip").args(["netns", "list"]))?;
    let stale_ns: Vec<&str> =
        list.lines().filter_map(|l| l.split_whitespace().next()).filter(|n| stale_topology(n).is_some()).collect();
    for name in &stale_ns {
        for pid in output(Command::new("ip").args(["netns", "pids", name])).unwrap_or_default().split_whitespace() {
            eprintln!("xtask: killing process {pid} in stale netns {name}");
            kill(pid);
        }
    }
    if let Some(root) = cgroup2_root() {
        for entry in std::fs::read_dir(&root)?.filter_map(|e| e.ok()) {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.strip_prefix("ferrymesh-").is_some_and(|id| stale_topology(id).is_some()) {
                eprintln!("xtask: removing stale cgroup {}", entry.path().display());
                remove_cgroup_tree(&entry.path());
            }
        }
    }
    for name in stale_ns {
        eprintln!("xtask: removing stale netns {name}");
        run(Command::new("ip").args(["netns", "delete", name]))?;
    }
    // A topology's bpf filesystem (its agents' pins) is mounted inside its scratch directory:
    // unmounting it releases every pinned map and link.
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    for target in mounts.lines().filter_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 2 && f[2] == "bpf").then(|| f[1].to_string())
    }) {
        let stale = Path::new(&target).components().any(|c| {
            c.as_os_str()
                .to_str()
                .and_then(|n| n.strip_prefix("ferrymesh-"))
                .is_some_and(|id| stale_topology(id) == Some(id))
        });
        if stale {
            eprintln!("xtask: unmounting the stale bpf filesystem {target}");
            run(Command::new("umount").arg(&target))?;
        }
    }
    for entry in std::fs::read_dir(std::env::temp_dir())?.filter_map(|e| e.ok()) {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.strip_prefix("ferrymesh-").is_some_and(|id| stale_topology(id) == Some(id)) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    Ok(())
}

/// The cgroup2 mount point, from /proc/mounts.
fn cgroup2_root() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 2 && f[2] == "cgroup2").then(|| PathBuf::from(f[1]))
    })
}

/// Kills the processes of a cgroup tree and removes it, deepest first.
fn remove_cgroup_tree(dir: &Path) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().filter_map(|e| e.ok()) {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_cgroup_tree(&entry.path());
        }
    }
    for _ in 0..100 {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        procs.split_whitespace().for_each(kill);
        if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::stale_topology;

    #[test]
    fn only_names_of_dead_test_processes_are_stale() {
        let dead = 2_000_000_000u32; // above any pid_max
        assert_eq!(stale_topology(&format!("fm{dead}x3-p0")), Some(format!("fm{dead}x3").as_str()));
        assert_eq!(stale_topology(&format!("fm{dead}x12")), Some(format!("fm{dead}x12").as_str()));
        let alive = std::process::id();
        assert_eq!(stale_topology(&format!("fm{alive}x0-fab")), None, "a live run is left alone");
        for other in ["fmx1", "fm12", "fm12x", "fmabcx1", "cni-1234", "fm12xy"] {
            assert_eq!(stale_topology(other), None, "{other}");
        }
    }
}
