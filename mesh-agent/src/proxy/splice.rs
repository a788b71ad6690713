//! TCP-to-TCP relaying inside the kernel: each direction moves bytes from one socket into a
//! pipe and from the pipe into the other socket with splice(2), so the payload is never copied
//! into the agent (the pipe holds references to the socket buffers' pages). Used by every
//! relay whose both ends are plain TCP sockets: captured connections to unmeshed destinations,
//! inbound plaintext, and pod-to-pod connections on one node. HBONE (TLS) needs the bytes in
//! user space and does not come here.
//!
//! A direction holds a pipe only while bytes flow: an idle connection holds none, so ten
//! thousand idle connections cost no pipes. Pipes come from, and go back to, a small pool.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::Mutex;

use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Capacity asked for each pipe: bytes moved per splice call.
const PIPE_SIZE: i32 = 1024 * 1024;
/// Idle pipes kept for reuse.
const POOL_CAP: usize = 64;

static POOL: Mutex<Vec<Pipe>> = Mutex::new(Vec::new());

/// A non-blocking pipe: bytes go in at `write`, out at `read`.
#[derive(Debug)]
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Bytes the kernel lets the pipe hold.
    capacity: usize,
}

impl Pipe {
    /// A pipe from the pool, or a new one.
    fn take() -> io::Result<Self> {
        if let Some(pipe) = POOL.lock().expect("pipe pool lock").pop() {
            return Ok(pipe);
        }
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        // Larger pipes mean fewer splice calls per megabyte; the default (64 KiB) remains
        // when the kernel refuses (fs.pipe-max-size).
        let capacity = fcntl(&write, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE))
            .or_else(|_| fcntl(&write, FcntlArg::F_GETPIPE_SZ))
            .map(|n| n as usize)
            .unwrap_or(64 * 1024);
        Ok(Self { read, write, capacity })
    }

    /// Returns an empty pipe to the pool (closes it when the pool is full).
    fn give_back(self) {
        let mut pool = POOL.lock().expect("pipe pool lock");
        if pool.len() < POOL_CAP {
            pool.push(self);
        }
    }
}

const FLAGS: SpliceFFlags = SpliceFFlags::SPLICE_F_NONBLOCK.union(SpliceFFlags::SPLICE_F_MOVE);

/// Moves bytes from `from` to `to` until `from` reaches EOF, then half-closes `to`. Adds the
/// bytes delivered to `to` to `count` as they go (the count is right even when this fails).
async fn direction(from: &TcpStream, to: &TcpStream, count: &mut u64) -> io::Result<()> {
    loop {
        from.readable().await?;
        let pipe = Pipe::take()?;
        // Move what is there, burst after burst, until the source has nothing right now.
        let more = loop {
            let moved = from.try_io(Interest::READABLE, || {
                splice(from, None, &pipe.write, None, pipe.capacity, FLAGS).map_err(io::Error::from)
            });
            let mut in_pipe = match moved {
                Ok(0) => break false,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break true,
                // The pipe may hold bytes: it is closed, not pooled.
                Err(e) => return Err(e),
            };
            while in_pipe > 0 {
                to.writable().await?;
                let sent = to.try_io(Interest::WRITABLE, || {
                    splice(&pipe.read, None, to, None, in_pipe, FLAGS).map_err(io::Error::from)
                });
                match sent {
                    Ok(n) => {
                        in_pipe -= n;
                        *count += n as u64;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
        };
        pipe.give_back();
        if !more {
            return SockRef::from(to).shutdown(std::net::Shutdown::Write);
        }
    }
}

/// Relays both directions between `a` and `b` until both have ended (EOF passed on as a
/// half-close) or one fails, counting bytes a -> b and b -> a as they are delivered.
pub(super) async fn relay(a: &TcpStream, b: &TcpStream, a_to_b: &mut u64, b_to_a: &mut u64) -> io::Result<()> {
    futures::future::try_join(direction(a, b, a_to_b), direction(b, a, b_to_a)).await.map(drop)
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// A connected pair of loopback TCP sockets.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (client.unwrap(), accepted.unwrap().0)
    }

    #[tokio::test]
    async fn relays_both_ways_with_half_close_and_counts_bytes() {
        // client <-> (near .. far) relay <-> server
        let (mut client, near) = pair().await;
        let (far, mut server) = pair().await;
        let relay = tokio::spawn(async move {
            let (mut up, mut down) = (0, 0);
            let result = relay(&near, &far, &mut up, &mut down).await;
            (up, down, result)
        });
        let upload: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let download: Vec<u8> = (0..1_500_000u32).map(|i| (i * 13 % 241) as u8).collect();
        let expected = upload.clone();
        let reply = download.clone();
        let server_side = tokio::spawn(async move {
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            // The client's half-close arrived; the server still answers.
            server.write_all(&reply).await.unwrap();
            server.shutdown().await.unwrap();
            got
        });
        client.write_all(&upload).await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert!(server_side.await.unwrap() == expected, "the server got the upload intact");
        assert!(got == download, "the client got the download intact");
        let (up, down, result) = relay.await.unwrap();
        result.unwrap();
        assert_eq!((up, down), (upload.len() as u64, download.len() as u64));
        // Idle again: the pipes went back to the pool.
        assert!(!POOL.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_reset_peer_ends_the_relay_with_an_error() {
        let (client, near) = pair().await;
        let (far, server) = pair().await;
        let relay = tokio::spawn(async move { relay(&near, &far, &mut 0, &mut 0).await });
        SockRef::from(&server).set_linger(Some(std::time::Duration::ZERO)).unwrap();
        drop(server);
        let result = relay.await.unwrap();
        assert!(result.is_err(), "a reset is a failure, not a clean end: {result:?}");
        drop(client);
    }
}
