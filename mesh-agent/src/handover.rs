//! Hitless restart: a new agent takes every pod's listeners from the running one, so no new
//! connection is ever refused, and the old one then stops accepting and drains.
//!
//! The running agent listens on a unix seqpacket socket (`--handover-socket`). An agent that
//! starts and finds someone listening there takes over:
//!
//! ```text
//! new -> old   (connects)
//! old -> new   pod <uid> <netns cookie>     + SCM_RIGHTS: the 15001, 15006, 15008 listeners
//!                                            of IPv4, then (a dual-stack pod) of IPv6
//!              ... one message per enrolled pod
//!              end
//! new          enrolls every pod on the listeners it got (the same sockets: the kernel's
//!              queues are shared, both agents accept until the old one stops)
//! new -> old   taken <uid> <uid> ...
//! old          stops accepting, sends its HBONE clients a graceful GOAWAY, closes its admin,
//!              metrics and readiness endpoints
//! old -> new   released
//! new          serves the admin, metrics and readiness endpoints; the old agent drains
//! ```
//!
//! If the new agent goes away before `taken`, the old one carries on as before.

use std::collections::HashMap;
use std::io::{self, IoSlice, IoSliceMut};
use std::net::TcpListener;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::socket::{
    self, AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr,
};
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, oneshot};

use crate::enroll::{Listeners, PodListeners};

/// How long the new agent may take from `end` to `taken` (it waits for certificates), and the
/// old one from `taken` to `released`.
const STEP_TIMEOUT: Duration = Duration::from_secs(120);
const MAX_MESSAGE: usize = 4096;

/// A pod's listeners as the enroller offers them: duplicates of its listener sockets.
#[derive(Debug)]
pub struct Offer {
    /// The pod's UID.
    pub uid: String,
    /// Its netns cookie.
    pub cookie: u64,
    /// 15001, 15006, 15008 of IPv4, then of IPv6 when the pod has them.
    pub listeners: Vec<OwnedFd>,
}

/// What the running agent's handover server asks the enroller for.
pub type OfferRequest = oneshot::Sender<Vec<Offer>>;

fn seqpacket() -> io::Result<OwnedFd> {
    Ok(socket::socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None)?)
}

fn send(fd: &OwnedFd, text: &str, fds: &[RawFd]) -> io::Result<()> {
    let iov = [IoSlice::new(text.as_bytes())];
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
    socket::sendmsg::<()>(fd.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None)?;
    Ok(())
}

fn recv(fd: &OwnedFd) -> io::Result<(String, Vec<OwnedFd>)> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut iov = [IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([RawFd; 6]);
    let msg = socket::recvmsg::<()>(fd.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)?;
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(received) = cmsg {
            // SAFETY: SCM_RIGHTS gave this process new descriptors that nothing else owns.
            fds.extend(received.into_iter().map(|raw| unsafe { OwnedFd::from_raw_fd(raw) }));
        }
    }
    let len = msg.bytes;
    if len == 0 {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the other agent closed the handover socket"));
    }
    let text = String::from_utf8_lossy(&buf[..len]).into_owned();
    Ok((text, fds))
}

fn set_timeout(fd: &OwnedFd, timeout: Duration) -> io::Result<()> {
    let tv = nix::sys::time::TimeVal::new(timeout.as_secs() as _, 0);
    socket::setsockopt(fd, socket::sockopt::ReceiveTimeout, &tv)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The new agent's side.

/// A takeover under way: the listeners handed over, and the connection to the old agent.
#[derive(Debug)]
pub struct Takeover {
    socket: OwnedFd,
    /// The listeners of each pod, by UID.
    pub pods: HashMap<String, PodListeners>,
}

/// Connects to the running agent at `path` and receives every pod's listeners; `None` when no
/// agent listens there.
pub fn take(path: &Path) -> io::Result<Option<Takeover>> {
    let socket = seqpacket()?;
    let addr = UnixAddr::new(path).map_err(io::Error::from)?;
    match socket::connect(socket.as_raw_fd(), &addr) {
        Ok(()) => {}
        Err(nix::errno::Errno::ENOENT | nix::errno::Errno::ECONNREFUSED) => return Ok(None),
        Err(e) => {
            return Err(io::Error::new(io::Error::from(e).kind(), format!("cannot connect to {}: {e}", path.display())))
        }
    }
    set_timeout(&socket, STEP_TIMEOUT)?;
    let mut pods = HashMap::new();
    loop {
        let (text, fds) = recv(&socket)?;
        let words: Vec<&str> = text.split_whitespace().collect();
        match words.as_slice() {
            ["end"] => break,
            ["pod", uid, cookie] => {
                let cookie = cookie.parse().map_err(|_| io::Error::other(format!("bad handover message {text:?}")))?;
                if fds.len() != 3 && fds.len() != 6 {
                    let got = fds.len();
                    return Err(io::Error::other(format!(
                        "handover message {text:?} came with {got} listeners, not 3 or 6"
                    )));
                }
                let mut fds = fds.into_iter().map(TcpListener::from);
                let mut family = || -> Option<Listeners> {
                    Some(Listeners { outbound: fds.next()?, inbound: fds.next()?, hbone: fds.next()? })
                };
                let v4 = family().expect("three listeners");
                let listeners = PodListeners { v4, v6: family(), cookie };
                pods.insert(uid.to_string(), listeners);
            }
            _ => return Err(io::Error::other(format!("unexpected handover message {text:?}"))),
        }
    }
    Ok(Some(Takeover { socket, pods }))
}

impl Takeover {
    /// Tells the old agent which pods this one serves now and waits until it has stopped
    /// accepting and closed its endpoints.
    pub fn finish(self, taken: &[String]) -> io::Result<()> {
        send(&self.socket, &format!("taken {}", taken.join(" ")), &[])?;
        match recv(&self.socket)?.0.trim() {
            "released" => Ok(()),
            other => Err(io::Error::other(format!("unexpected handover message {other:?}"))),
        }
    }
}

// ---------------------------------------------------------------------------------------
// The running agent's side.

/// The running agent's handover socket; dropping it removes the socket file.
#[derive(Debug)]
pub struct Server {
    socket: AsyncFd<OwnedFd>,
    path: PathBuf,
}

impl Server {
    /// Listens at `path` (replacing a socket file a dead agent left).
    pub fn bind(path: &Path) -> io::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let socket = socket::socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )?;
        let addr = UnixAddr::new(path).map_err(io::Error::from)?;
        socket::bind(socket.as_raw_fd(), &addr).map_err(|e| {
            io::Error::new(io::Error::from(e).kind(), format!("cannot listen on {}: {e}", path.display()))
        })?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        socket::listen(&socket, Backlog::new(1).map_err(io::Error::from)?)?;
        // SAFETY: an OwnedFd's descriptor stays open, and the same, for as long as it is owned.
        let socket = unsafe { AsyncFd::register(socket) }.map_err(|e| io::Error::other(e.to_string()))?;
        Ok(Self { socket, path: path.to_path_buf() })
    }

    /// Serves successors one at a time until one takes over: each gets the listeners the
    /// enroller offers (asked through `offers`). Returns the connection to the successor that
    /// took over, for [`Successor::released`].
    pub async fn serve(&self, offers: mpsc::Sender<OfferRequest>) -> io::Result<Successor> {
        loop {
            let mut ready = self.socket.readable().await?;
            let conn = match socket::accept(self.socket.get_ref().as_raw_fd()) {
                Ok(conn) => conn,
                Err(nix::errno::Errno::EAGAIN) => {
                    ready.clear_ready();
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            // SAFETY: accept(2) returned a new descriptor that nothing else owns (blocking:
            // the exchange runs on a blocking thread, with timeouts).
            let conn = unsafe { OwnedFd::from_raw_fd(conn) };
            let (tx, rx) = oneshot::channel();
            offers.send(tx).await.map_err(|_| io::Error::other("the enroller is gone"))?;
            let offered = rx.await.map_err(|_| io::Error::other("the enroller is gone"))?;
            let handed =
                tokio::task::spawn_blocking(move || hand_over(conn, offered)).await.map_err(io::Error::other)?;
            match handed {
                Ok(successor) => return Ok(successor),
                Err(e) => tracing::warn!("a successor did not take over, carrying on: {e}"),
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Sends every offer, then waits for `taken`.
fn hand_over(conn: OwnedFd, offers: Vec<Offer>) -> io::Result<Successor> {
    set_timeout(&conn, STEP_TIMEOUT)?;
    let pods = offers.len();
    for offer in &offers {
        let fds: Vec<RawFd> = offer.listeners.iter().map(|fd| fd.as_fd().as_raw_fd()).collect();
        send(&conn, &format!("pod {} {}", offer.uid, offer.cookie), &fds)?;
    }
    send(&conn, "end", &[])?;
    let (text, _) = recv(&conn)?;
    let taken: Vec<String> = match text.split_whitespace().collect::<Vec<_>>().split_first() {
        Some((&"taken", uids)) => uids.iter().map(|u| u.to_string()).collect(),
        _ => return Err(io::Error::other(format!("unexpected handover message {text:?}"))),
    };
    tracing::info!(offered = pods, taken = taken.len(), "a successor took over this node's pods");
    Ok(Successor { conn })
}

/// The agent that took over, waiting for this one to release its endpoints.
#[derive(Debug)]
pub struct Successor {
    conn: OwnedFd,
}

impl Successor {
    /// Tells the successor this agent no longer accepts nor serves its endpoints.
    pub fn released(self) -> io::Result<()> {
        send(&self.conn, "released", &[])
    }
}
