//! fm-peer: the test peer that runs inside topology pods.
//!
//! `serve` listens on three ports, on IPv4 and on IPv6 (`[::]`, IPv6 only): an HTTP responder
//! whose body names the client address the server saw, a sink that answers "<bytes> <sha256>"
//! after the client half-closes, and an echo. `send` streams a deterministic payload to a sink
//! and checks the answer; `ping` holds one connection to an echo and checks every round trip.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use serde_json::Value;
use sha2::{Digest, Sha256};

#[derive(Debug, Parser)]
#[command(about = "ferrymesh test peer")]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Serve HTTP, sink and echo; prints "ready" once listening.
    Serve {
        #[arg(long, default_value_t = 8080)]
        http: u16,
        #[arg(long, default_value_t = 9000)]
        sink: u16,
        #[arg(long, default_value_t = 9001)]
        echo: u16,
    },
    /// Send `bytes` of payload to a sink, half-close, and check its answer. Prints JSON.
    Send {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        bytes: u64,
        /// Payload is this text repeated instead of pseudo-random bytes (for wire captures).
        #[arg(long)]
        marker: Option<String>,
        /// Pace the payload at this many bytes per second (a long-lived stream), instead of as
        /// fast as the connection takes it.
        #[arg(long)]
        rate: Option<u64>,
    },
    /// Request/response latency on one connection to an echo: `count` round trips of `size`
    /// bytes back to back. Prints JSON with p50/p90/p99 in microseconds.
    Rr {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 10000)]
        count: u32,
        #[arg(long, default_value_t = 1)]
        size: usize,
    },
    /// `count` sequential HTTP requests, one connection each, `interval_ms` apart; prints JSON
    /// with the number that succeeded and failed and the client addresses the servers saw
    /// (with `--progress`, also a line `ok` or `failed: <why>` as each one ends).
    Hits {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        count: u32,
        #[arg(long, default_value_t = 0)]
        interval_ms: u64,
        #[arg(long)]
        progress: bool,
    },
    /// Open `count` connections to an echo, one round trip each, print `held N` and keep them
    /// open, idle, until killed.
    Hold {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        count: u32,
    },
    /// The cost of one process hop on this machine: `count` round trips of `size` bytes
    /// between two threads, over TCP on 127.0.0.1 and over a Unix socket pair, back to back.
    /// A round trip is two hops (each a wake-up and a send and a receive); over Unix sockets
    /// a hop has no TCP stack, the least an agent pass in a separate process can cost. Prints
    /// JSON with each one's p50 and p99 in microseconds. Run it in a netns nothing captures.
    Hops {
        #[arg(long, default_value_t = 20000)]
        count: u32,
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Also over loopback TCP with sockmap redirection (`tcp_sockmap`), loading this eBPF
        /// object (mesh-ebpf's `hop-redirect`); needs root.
        #[arg(long)]
        sockmap: Option<PathBuf>,
    },
    /// Hold one connection to an echo and do `count` round trips, one every `interval_ms`.
    Ping {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        count: u32,
        #[arg(long, default_value_t = 100)]
        interval_ms: u64,
    },
}

fn main() {
    let args = Args::parse();
    let result = match args.cmd {
        Cmd::Serve { http, sink, echo } => serve(http, sink, echo),
        Cmd::Send { to, bytes, marker, rate } => send(to, bytes, marker.as_deref(), rate),
        Cmd::Ping { to, count, interval_ms } => ping(to, count, Duration::from_millis(interval_ms)),
        Cmd::Rr { to, count, size } => rr(to, count, size),
        Cmd::Hops { count, size, sockmap } => hops(count, size, sockmap.as_deref()),
        Cmd::Hits { to, count, interval_ms, progress } => hits(to, count, Duration::from_millis(interval_ms), progress),
        Cmd::Hold { to, count } => hold(to, count),
    };
    if let Err(e) = result {
        eprintln!("fm-peer: {e}");
        std::process::exit(1);
    }
}

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// A listener on `[::]:port` for IPv6 only (the IPv4 listener on the same port keeps IPv4
/// clients' addresses as IPv4).
fn listen_v6(port: u16) -> Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV6, Type::STREAM, None)?;
    socket.set_only_v6(true)?;
    socket.set_reuse_address(true)?;
    socket.bind(&SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)).into())?;
    socket.listen(128)?;
    Ok(socket.into())
}

fn serve(http: u16, sink: u16, echo: u16) -> Result<()> {
    let listeners = [
        (TcpListener::bind(("0.0.0.0", http))?, serve_http as fn(TcpStream, SocketAddr) -> Result<()>),
        (listen_v6(http)?, serve_http),
        (TcpListener::bind(("0.0.0.0", sink))?, serve_sink),
        (listen_v6(sink)?, serve_sink),
        (TcpListener::bind(("0.0.0.0", echo))?, serve_echo),
        (listen_v6(echo)?, serve_echo),
    ];
    println!("ready");
    std::io::stdout().flush()?;
    let mut threads = Vec::new();
    for (listener, handler) in listeners {
        threads.push(std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let peer = stream.peer_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
                std::thread::spawn(move || {
                    if let Err(e) = handler(stream, peer) {
                        eprintln!("connection from {peer}: {e}");
                    }
                });
            }
        }));
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

fn serve_http(stream: TcpStream, peer: SocketAddr) -> Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
    }
    let body = format!("client {peer}\n");
    // One write, as an HTTP server sends a small answer: `write!` on the socket would send each
    // formatted piece as its own segment, and Nagle would hold the later ones for an ACK.
    let answer = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
    (&stream).write_all(answer.as_bytes())?;
    Ok(())
}

fn serve_sink(mut stream: TcpStream, _peer: SocketAddr) -> Result<()> {
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    writeln!(stream, "{total} {}", hex(&hasher.finalize()))?;
    stream.shutdown(Shutdown::Write)?;
    Ok(())
}

fn serve_echo(mut stream: TcpStream, _peer: SocketAddr) -> Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        stream.write_all(&buf[..n])?;
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Deterministic, incompressible-looking payload: chunk `i` is a xorshift stream seeded by `i`.
fn fill(chunk: &mut [u8], index: u64) {
    let mut x = index.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for word in chunk.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        word.copy_from_slice(&x.to_le_bytes()[..word.len()]);
    }
}

fn send(to: SocketAddr, bytes: u64, marker: Option<&str>, rate: Option<u64>) -> Result<()> {
    let started = Instant::now();
    let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(10))?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut hasher = Sha256::new();
    // Paced: 16 KiB writes, each no earlier than its share of the rate allows.
    let mut buf = vec![0u8; if rate.is_some() { 16 * 1024 } else { 64 * 1024 }];
    let mut sent = 0u64;
    let mut index = 0;
    while sent < bytes {
        if let Some(rate) = rate {
            let due = started + Duration::from_secs_f64(sent as f64 / rate.max(1) as f64);
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
        }
        let n = (bytes - sent).min(buf.len() as u64) as usize;
        match marker {
            Some(m) => buf[..n].iter_mut().zip(m.bytes().cycle()).for_each(|(b, m)| *b = m),
            None => fill(&mut buf[..n], index),
        }
        stream.write_all(&buf[..n])?;
        hasher.update(&buf[..n]);
        sent += n as u64;
        index += 1;
    }
    stream.shutdown(Shutdown::Write)?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let want = format!("{bytes} {}", hex(&hasher.finalize()));
    let matched = answer.trim() == want;
    println!(
        "{}",
        serde_json::json!({"bytes": bytes, "sent_sha256": want, "answer": answer.trim(), "match": matched, "seconds": started.elapsed().as_secs_f64()})
    );
    if !matched {
        return Err(format!("sink answered {:?}, expected {want:?}", answer.trim()).into());
    }
    Ok(())
}

fn ping(to: SocketAddr, count: u32, interval: Duration) -> Result<()> {
    let stream = TcpStream::connect_timeout(&to, Duration::from_secs(10))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    // peer_addr() is getpeername(): under capture it must still name `to`, not the agent.
    println!("connected {} -> {}", stream.local_addr()?, stream.peer_addr()?);
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    for i in 0..count {
        let msg = format!("ping {i}\n");
        writer.write_all(msg.as_bytes())?;
        let mut line = String::new();
        reader.read_line(&mut line).map_err(|e| format!("round trip {i}: {e}"))?;
        if line != msg {
            return Err(format!("round trip {i}: sent {msg:?}, got {line:?}").into());
        }
        if i == 0 {
            println!("first round trip ok");
        }
        std::thread::sleep(interval);
    }
    println!("ok {count} round trips");
    Ok(())
}

/// `count` round trips of `size` bytes over `stream` to an echo, back to back: each one's time
/// in microseconds, sorted.
fn round_trips(stream: &mut (impl Read + Write), count: u32, size: usize) -> Result<Vec<f64>> {
    let out = vec![0x5au8; size];
    let mut back = vec![0u8; size];
    let mut micros = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let start = Instant::now();
        stream.write_all(&out)?;
        stream.read_exact(&mut back)?;
        micros.push(start.elapsed().as_secs_f64() * 1e6);
    }
    micros.sort_by(f64::total_cmp);
    Ok(micros)
}

/// The `q` quantile of sorted `micros`.
fn quantile(micros: &[f64], q: f64) -> f64 {
    micros[((micros.len() as f64 - 1.0) * q) as usize]
}

fn rr(to: SocketAddr, count: u32, size: usize) -> Result<()> {
    let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(10))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let micros = round_trips(&mut stream, count, size)?;
    let at = |q| quantile(&micros, q);
    println!(
        "{}",
        serde_json::json!({"count": count, "size": size, "p50_us": at(0.5), "p90_us": at(0.9), "p99_us": at(0.99)})
    );
    Ok(())
}

/// Round trips of `size` bytes over `client` to a thread echoing on `server`: p50 and p99 in
/// microseconds.
fn ping_pong<S: Read + Write + Send + 'static>(mut client: S, mut server: S, count: u32, size: usize) -> Result<Value> {
    let echo = std::thread::spawn(move || {
        let mut buf = vec![0u8; size];
        while server.read_exact(&mut buf).is_ok() && server.write_all(&buf).is_ok() {}
    });
    let micros = round_trips(&mut client, count, size)?;
    drop(client);
    echo.join().map_err(|_| "the echo thread panicked")?;
    Ok(serde_json::json!({"p50_us": quantile(&micros, 0.5), "p99_us": quantile(&micros, 0.99)}))
}

/// The two ends of a new TCP connection on 127.0.0.1, without Nagle, each with a read timeout.
fn loopback_pair() -> Result<(TcpStream, TcpStream)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let client = TcpStream::connect(listener.local_addr()?)?;
    let (server, _) = listener.accept()?;
    for stream in [&client, &server] {
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    }
    Ok((client, server))
}

fn hops(count: u32, size: usize, sockmap: Option<&Path>) -> Result<()> {
    let (client, server) = loopback_pair()?;
    let tcp = ping_pong(client, server, count, size)?;
    let (client, server) = std::os::unix::net::UnixStream::pair()?;
    for stream in [&client, &server] {
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    }
    let unix = ping_pong(client, server, count, size)?;
    let mut out = serde_json::json!({"count": count, "size": size, "tcp_loopback": tcp, "unix": unix});
    if let Some(object) = sockmap {
        out["tcp_sockmap"] = sockmap_ping_pong(object, count, size)?;
    }
    println!("{out}");
    Ok(())
}

/// [`ping_pong`] over a loopback TCP connection whose two ends are in the `HOP_PEERS` sockhash
/// of the eBPF `object` (mesh-ebpf's `hop-redirect`), whose sk_msg program moves each end's
/// sends straight into the other end's receive queue. Only these two sockets are in the map;
/// the program and the map live as long as this process.
fn sockmap_ping_pong(object: &Path, count: u32, size: usize) -> Result<Value> {
    let mut ebpf = aya::Ebpf::load_file(object)?;
    let map = ebpf.take_map("HOP_PEERS").ok_or("the object has no HOP_PEERS map")?;
    let mut peers: aya::maps::SockHash<_, u32> = map.try_into()?;
    let program: &mut aya::programs::SkMsg =
        ebpf.program_mut("fm_hop_redirect").ok_or("the object has no fm_hop_redirect program")?.try_into()?;
    program.load()?;
    program.attach(peers.fd())?;
    let (client, server) = loopback_pair()?;
    for stream in [&client, &server] {
        peers.insert(u32::from(stream.local_addr()?.port()), stream.as_raw_fd(), 0)?;
    }
    let figures = ping_pong(client, server, count, size)?;
    // Every message went the redirected way, or the figures are loopback TCP's.
    let redirected: aya::maps::PerCpuArray<_, u64> =
        ebpf.map("HOP_REDIRECTED").ok_or("the object has no HOP_REDIRECTED map")?.try_into()?;
    let redirected: u64 = redirected.get(&0, 0)?.iter().sum();
    if redirected < 2 * u64::from(count) {
        return Err(format!("sockmap redirected {redirected} of the {} messages", 2 * count).into());
    }
    Ok(figures)
}

fn hit(to: SocketAddr) -> Result<String> {
    let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    // One write, as HTTP clients send a request's head (see `serve_http`).
    stream.write_all(format!("GET / HTTP/1.1\r\nHost: {to}\r\nConnection: close\r\n\r\n").as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    if !response.starts_with("HTTP/1.1 200") {
        return Err(format!("unexpected response {:?}", response.lines().next()).into());
    }
    let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
    Ok(body.trim().trim_start_matches("client ").to_string())
}

fn hold(to: SocketAddr, count: u32) -> Result<()> {
    let mut held = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(10))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.write_all(b"x")?;
        let mut back = [0u8; 1];
        stream.read_exact(&mut back)?;
        held.push(stream);
    }
    println!("held {}", held.len());
    std::io::stdout().flush()?;
    loop {
        std::thread::park();
    }
}

fn hits(to: SocketAddr, count: u32, interval: Duration, progress: bool) -> Result<()> {
    let (mut ok, mut errors) = (0, Vec::new());
    let mut seen_as = std::collections::BTreeSet::new();
    for i in 0..count {
        if i > 0 {
            std::thread::sleep(interval);
        }
        match hit(to) {
            Ok(client) => {
                ok += 1;
                // The server names the client as `ip:port` or `[ip6]:port`; the IP is kept.
                seen_as.insert(client.parse::<SocketAddr>().map(|a| a.ip().to_string()).unwrap_or(client));
                if progress {
                    println!("ok");
                }
            }
            Err(e) => {
                if progress {
                    println!("failed: {e}");
                }
                errors.push(e.to_string());
            }
        }
        std::io::stdout().flush()?;
    }
    println!("{}", serde_json::json!({"ok": ok, "failed": errors.len(), "errors": errors, "client_ips": seen_as}));
    Ok(())
}
