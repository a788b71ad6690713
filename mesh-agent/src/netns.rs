//! Network-namespace plumbing: one dedicated thread that enters pod network namespaces to
//! create sockets (and netlink connections) there, plus the socket option std and socket2
//! lack. A socket belongs to the netns it was created in and keeps working from any thread,
//! so only creation happens here. This is the only module of the agent with `unsafe`.
//!
//! Nothing here may run a job without first entering the netns the job names: the thread is
//! left in whatever netns it entered last (and a job into that one enters nothing).

use std::fs::File;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::Path;
use std::sync::{mpsc, Arc};

use nix::sched::CloneFlags;
use tokio::sync::oneshot;

/// A job of the netns thread, given the netns the thread is in (if it entered one).
type Job = Box<dyn FnOnce(&mut Option<Netns>) + Send>;

/// An open handle on a network namespace (a `/proc/<pid>/ns/net` or bind-mounted netns file).
#[derive(Debug, Clone)]
pub struct Netns {
    file: Arc<File>,
}

impl Netns {
    /// Opens the netns at `path`.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = File::open(path)
            .map_err(|e| io::Error::new(e.kind(), format!("cannot open network namespace {}: {e}", path.display())))?;
        Ok(Self { file: Arc::new(file) })
    }
}

impl Netns {
    /// Device and inode of the namespace: two handles name one namespace when they are equal.
    pub fn id(&self) -> io::Result<(u64, u64)> {
        use std::os::unix::fs::MetadataExt;
        let meta = self.file.metadata()?;
        Ok((meta.dev(), meta.ino()))
    }
}

/// Whether an interface of the calling thread's network namespace holds `ip`: a pod's netns
/// holds the pod's IP, the node's and another pod's do not.
pub fn holds_address(ip: IpAddr) -> io::Result<bool> {
    let addresses = nix::ifaddrs::getifaddrs().map_err(io::Error::from)?;
    Ok(addresses.filter_map(|a| a.address).any(|address| {
        address.as_sockaddr_in().is_some_and(|a| IpAddr::V4(a.ip()) == ip)
            || address.as_sockaddr_in6().is_some_and(|a| IpAddr::V6(a.ip()) == ip)
    }))
}

impl AsFd for Netns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// Runs closures inside given network namespaces on one dedicated thread.
#[derive(Debug, Clone)]
pub struct NetnsRunner {
    jobs: mpsc::Sender<Job>,
}

impl NetnsRunner {
    /// Starts the thread. It ends when the last runner handle is dropped.
    pub fn start() -> io::Result<Self> {
        let (jobs, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new().name("netns".into()).spawn(move || {
            let mut entered = None;
            for job in rx {
                job(&mut entered);
            }
        })?;
        Ok(Self { jobs })
    }

    /// Runs `f` inside `netns` and returns its result.
    pub async fn run<R, F>(&self, netns: &Netns, f: F) -> io::Result<R>
    where
        R: Send + 'static,
        F: FnOnce() -> io::Result<R> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let netns = netns.clone();
        let job: Job = Box::new(move |entered| {
            let _ = tx.send(enter(entered, netns).and_then(|()| f()));
        });
        self.jobs.send(job).map_err(|_| io::Error::other("netns thread is gone"))?;
        rx.await.map_err(|_| io::Error::other("netns job was dropped"))?
    }
}

/// Moves the netns thread into `netns`, unless it is there already: the thread was left in
/// `entered` (the same handle: each pod's netns is opened once, when it is enrolled), so a run
/// of connections into one pod makes one `setns`, not one each. A failed `setns` leaves the
/// thread where it was, but it is then taken as nowhere, so the next job enters its own.
fn enter(entered: &mut Option<Netns>, netns: Netns) -> io::Result<()> {
    if entered.as_ref().is_some_and(|at| Arc::ptr_eq(&at.file, &netns.file)) {
        return Ok(());
    }
    *entered = None;
    nix::sched::setns(netns.as_fd(), CloneFlags::CLONE_NEWNET)
        .map_err(|e| io::Error::other(format!("setns into the pod network namespace failed: {e}")))?;
    *entered = Some(netns);
    Ok(())
}

/// `SO_NETNS_COOKIE` (Linux 5.14+), not yet in libc for every target.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The cookie of the calling thread's network namespace (of a socket created for the purpose:
/// no address or device is needed).
pub fn current_cookie() -> io::Result<u64> {
    netns_cookie(&socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::DGRAM, None)?)
}

/// The cookie of the network namespace `socket` lives in: the key eBPF programs see for it.
pub fn netns_cookie(socket: &impl AsRawFd) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`, a valid, aligned u64 that
    // outlives the call; the fd is borrowed from a live socket.
    let rc = unsafe {
        libc::getsockopt(socket.as_raw_fd(), libc::SOL_SOCKET, SO_NETNS_COOKIE, (&raw mut cookie).cast(), &mut len)
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("getsockopt(SO_NETNS_COOKIE): {e} (needs Linux 5.14+)")));
    }
    Ok(cookie)
}

/// The cookie of `socket`: the key eBPF programs see it by (`bpf_get_socket_cookie`).
pub fn socket_cookie(socket: &impl AsRawFd) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`, a valid, aligned u64 that
    // outlives the call; the fd is borrowed from a live socket.
    let rc = unsafe {
        libc::getsockopt(socket.as_raw_fd(), libc::SOL_SOCKET, libc::SO_COOKIE, (&raw mut cookie).cast(), &mut len)
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("getsockopt(SO_COOKIE): {e}")));
    }
    Ok(cookie)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netns_cookie_of_a_socket_is_stable_and_nonzero() {
        let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let cookie = netns_cookie(&a).unwrap();
        assert_ne!(cookie, 0);
        assert_eq!(cookie, netns_cookie(&b).unwrap(), "same netns, same cookie");
    }

    #[tokio::test]
    async fn runner_runs_jobs_in_the_named_netns() {
        let runner = NetnsRunner::start().unwrap();
        let own = Netns::open(Path::new("/proc/self/ns/net")).unwrap();
        let here = netns_cookie(&std::net::UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
        let cookie_in = |netns: &Netns| {
            let (runner, netns) = (runner.clone(), netns.clone());
            async move { runner.run(&netns, || netns_cookie(&std::net::UdpSocket::bind("127.0.0.1:0")?)).await }
        };
        assert_eq!(cookie_in(&own).await.unwrap(), here);
        // A second netns, made by a thread of its own (it lives on in the handle): jobs that
        // alternate between the two each run in theirs, and jobs in a row in one run there.
        let other = std::thread::spawn(|| {
            nix::sched::unshare(CloneFlags::CLONE_NEWNET).expect("unshare (needs root)");
            Netns::open(Path::new("/proc/thread-self/ns/net")).unwrap()
        })
        .join()
        .unwrap();
        let there = cookie_in(&other).await.unwrap();
        assert_ne!(there, here);
        for (netns, cookie) in [(&other, there), (&own, here), (&own, here), (&other, there), (&own, here)] {
            assert_eq!(cookie_in(netns).await.unwrap(), cookie);
        }
        let missing = Netns::open(Path::new("/nonexistent/netns")).unwrap_err();
        assert!(missing.to_string().contains("/nonexistent/netns"), "{missing}");
    }
}
