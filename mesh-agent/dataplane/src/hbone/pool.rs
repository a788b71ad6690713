//! Pooled HBONE client connections: one HTTP/2 connection per (source identity and
//! certificate, source address, destination identity, destination IP) carrying up to
//! [`MAX_STREAMS`] streams, another one when all are full. A connection leaves the pool when it
//! ends or misses its PING; a renewed source certificate starts new connections and lets the
//! old ones drain.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use ferrymesh_spiffe::SpiffeId;

use super::budget::WindowGrant;
use super::MAX_STREAMS;

/// Key of a pooled HBONE connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// Source identity.
    pub src: SpiffeId,
    /// Serial of the source certificate: a renewed one opens new connections.
    pub src_serial: String,
    /// The address the connection leaves from (the source pod's), when the dialer names one:
    /// pods of one identity on one node never share a connection, since the destination takes
    /// the TCP peer's address as the client's (as ztunnel keys its pool on the source IP).
    pub src_ip: Option<IpAddr>,
    /// Destination identity.
    pub dst: SpiffeId,
    /// Destination IP.
    pub dst_ip: IpAddr,
}

/// Pooled connections with a generation each, so an ended connection only ever removes itself,
/// and the number of streams open on each.
type PoolMap = HashMap<PoolKey, Vec<Pooled>>;

#[derive(Debug, Clone)]
struct Pooled {
    generation: u64,
    sender: h2::client::SendRequest<Bytes>,
    open: Arc<AtomicU32>,
}

/// One stream's place on a pooled connection, given back when dropped (the stream ended).
#[derive(Debug)]
pub struct StreamSlot(Arc<AtomicU32>);

impl StreamSlot {
    /// Takes a place on a connection with `open` streams, if it has one free.
    fn take(open: &Arc<AtomicU32>) -> Option<Self> {
        open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < MAX_STREAMS).then_some(n + 1))
            .ok()
            .map(|_| Self(open.clone()))
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

static GENERATION: AtomicU64 = AtomicU64::new(0);

/// Interval of HTTP/2 PINGs on a pooled connection, and how long a PONG may take.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Pooled HTTP/2 connections to other pods' 15008.
#[derive(Debug, Default, Clone)]
pub struct Pool {
    connections: Arc<Mutex<PoolMap>>,
}

impl Pool {
    /// A ready sender on a pooled connection of `key` with a free stream, the stream's slot,
    /// and the connection's generation (to [`Pool::forget`] it).
    pub async fn ready(&self, key: &PoolKey) -> Option<(h2::client::SendRequest<Bytes>, StreamSlot, u64)> {
        let pooled: Vec<Pooled> = self.connections.lock().expect("pool lock").get(key).cloned().unwrap_or_default();
        for connection in pooled {
            if let Some(slot) = StreamSlot::take(&connection.open) {
                if let Ok(sender) = connection.sender.ready().await {
                    return Some((sender, slot, connection.generation));
                }
            }
        }
        None
    }

    /// Takes a connection out of the pool (its server is going away): no new stream goes to
    /// it; the streams open on it run on to their end.
    pub fn forget(&self, key: &PoolKey, generation: u64) {
        self.remove(key, generation);
    }

    /// Pools a new connection of `key` (its driver `connection` is spawned here, with its
    /// keepalive, and holds its window `grant` until it ends) and takes its first stream's slot.
    /// Connections of an older certificate of the same source and destination drain and are
    /// dropped from the pool.
    pub fn insert<T>(
        &self,
        key: PoolKey,
        sender: h2::client::SendRequest<Bytes>,
        mut connection: h2::client::Connection<T, Bytes>,
        grant: Option<WindowGrant>,
    ) -> StreamSlot
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let generation = GENERATION.fetch_add(1, Ordering::Relaxed);
        let ping_pong = connection.ping_pong().expect("ping_pong is taken once, right after the handshake");
        tokio::spawn(keepalive(ping_pong, self.clone(), key.clone(), generation));
        let (pool, pooled, dst_ip) = (self.clone(), key.clone(), key.dst_ip);
        tokio::spawn(async move {
            let _grant = grant;
            if let Err(e) = connection.await {
                tracing::debug!("HBONE connection to {dst_ip} ended: {e}");
            }
            // An ended connection leaves the pool at once rather than at its next use.
            pool.remove(&pooled, generation);
        });
        let mut pool = self.connections.lock().expect("pool lock");
        pool.retain(|k, _| {
            !(k.src == key.src && k.dst == key.dst && k.dst_ip == key.dst_ip && k.src_serial != key.src_serial)
        });
        let open = Arc::new(AtomicU32::new(0));
        let slot = StreamSlot::take(&open).expect("a new connection has room");
        pool.entry(key).or_default().push(Pooled { generation, sender, open });
        slot
    }

    fn remove(&self, key: &PoolKey, generation: u64) {
        let mut pool = self.connections.lock().expect("pool lock");
        if let Some(connections) = pool.get_mut(key) {
            connections.retain(|c| c.generation != generation);
            if connections.is_empty() {
                pool.remove(key);
            }
        }
    }
}

/// PINGs the connection every [`KEEPALIVE_INTERVAL`]; one without a PONG in time drops the
/// connection from the pool (new streams go to a new connection; open ones end with it).
async fn keepalive(mut ping_pong: h2::PingPong, pool: Pool, key: PoolKey, generation: u64) {
    loop {
        tokio::time::sleep(KEEPALIVE_INTERVAL).await;
        match tokio::time::timeout(KEEPALIVE_TIMEOUT, ping_pong.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => break,
            Err(_) => {
                tracing::warn!(dst = %key.dst_ip, "HBONE connection missed its PING; dropping it from the pool");
                break;
            }
        }
    }
    pool.remove(&key, generation);
}
