//! What an HBONE server connection has queued for its peer: the send half of the memory a peer
//! can make a process hold ([`super::budget`] is the receive half).
//!
//! h2 queues what a stream is given while the peer's windows have room, up to its send buffer
//! (400 KiB) a stream, whether or not the peer reads its socket: a peer that advertises large
//! windows, opens streams to apps that write, and stops reading would leave that much queued
//! for every stream it opened. [`SendQueue`] bounds it for the whole connection: a relay takes
//! room before it hands h2 bytes, and the room comes back as the connection writes their DATA
//! frames to the transport, or when the stream is reset (h2 then drops what it had queued).
//! [`Metered`], the connection's transport, reads the frame headers going out (DATA, and
//! RST_STREAM) and coming in (RST_STREAM): h2 does not say when it has written a stream's bytes.

use std::collections::HashMap;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes one HBONE server connection may have queued for its peer, over all its streams.
pub const CONNECTION_QUEUE: usize = 256 * 1024;

/// HTTP/2 frame types read here.
const DATA: u8 = 0x0;
const RST_STREAM: u8 = 0x3;
/// The client connection preface, which comes ahead of the client's first frame.
const CLIENT_PREFACE: usize = 24;
/// An HTTP/2 frame header: length (24 bits), type, flags, stream id (31 bits).
const FRAME_HEADER: usize = 9;

/// The bytes a connection's streams have handed h2 that it has not yet written.
#[derive(Debug)]
pub struct SendQueue {
    limit: usize,
    queued: Mutex<Queued>,
}

#[derive(Debug, Default)]
struct Queued {
    total: usize,
    streams: HashMap<u32, StreamQueue>,
    /// Streams waiting for room (at most one waker each).
    waiting: Vec<Waker>,
}

#[derive(Debug, Default)]
struct StreamQueue {
    bytes: usize,
    /// Its relay is done; it is forgotten once its bytes are written.
    closed: bool,
}

impl SendQueue {
    /// A queue of at most `limit` bytes.
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self { limit, queued: Mutex::default() })
    }

    /// Starts counting stream `id`, as its relay starts. The relay ends it with [`Self::close`]
    /// or [`Self::reset`]: a stream that never relays is never counted.
    pub fn open(&self, id: u32) {
        self.lock().streams.entry(id).or_default();
    }

    /// Room for up to `most` (at least one) bytes of stream `id`, waiting while the connection
    /// has its limit queued: the bytes taken, or None once the stream is reset (or was never
    /// opened).
    pub async fn take(&self, id: u32, most: usize) -> Option<usize> {
        poll_fn(|cx| self.poll_take(cx, id, most)).await
    }

    /// [`Self::take`] as a poll: Pending (woken when room comes back) while the connection has
    /// its limit queued.
    pub fn poll_take(&self, cx: &Context<'_>, id: u32, most: usize) -> Poll<Option<usize>> {
        let mut guard = self.lock();
        let queued = &mut *guard;
        let room = self.limit.saturating_sub(queued.total);
        let Some(stream) = queued.streams.get_mut(&id) else { return Poll::Ready(None) };
        if room > 0 {
            let taken = room.min(most.max(1));
            stream.bytes += taken;
            queued.total += taken;
            return Poll::Ready(Some(taken));
        }
        if !queued.waiting.iter().any(|w| w.will_wake(cx.waker())) {
            queued.waiting.push(cx.waker().clone());
        }
        Poll::Pending
    }

    /// Gives back `bytes` of room stream `id` took and did not hand h2.
    pub fn give_back(&self, id: u32, bytes: usize) {
        self.written(id, bytes);
    }

    /// Stream `id` ended in order: it is forgotten once h2 has written what it queued.
    pub fn close(&self, id: u32) {
        let mut queued = self.lock();
        if let Some(stream) = queued.streams.get_mut(&id) {
            if stream.bytes == 0 {
                queued.streams.remove(&id);
            } else {
                stream.closed = true;
            }
        }
    }

    /// Stream `id` was reset (either way): h2 dropped what it had queued, and it is forgotten.
    pub fn reset(&self, id: u32) {
        let mut queued = self.lock();
        if let Some(stream) = queued.streams.remove(&id) {
            queued.total -= stream.bytes;
            let waiting = std::mem::take(&mut queued.waiting);
            drop(queued);
            waiting.into_iter().for_each(Waker::wake);
        }
    }

    /// Bytes queued now, over all streams.
    pub fn queued(&self) -> usize {
        self.lock().total
    }

    /// `bytes` of stream `id`'s DATA went out to the transport.
    fn written(&self, id: u32, bytes: usize) {
        let mut guard = self.lock();
        let queued = &mut *guard;
        let Some(stream) = queued.streams.get_mut(&id) else { return };
        let written = bytes.min(stream.bytes);
        stream.bytes -= written;
        let forget = stream.closed && stream.bytes == 0;
        queued.total -= written;
        if forget {
            queued.streams.remove(&id);
        }
        let waiting = if written > 0 { std::mem::take(&mut queued.waiting) } else { Vec::new() };
        drop(guard);
        waiting.into_iter().for_each(Waker::wake);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queued> {
        self.queued.lock().expect("send queue lock")
    }
}

/// What a frame reader saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    /// A frame header: its type and stream.
    Header { kind: u8, stream: u32 },
    /// Payload bytes of the frame whose header came last.
    Payload { kind: u8, stream: u32, len: usize },
}

/// Reads HTTP/2 frame headers out of a byte stream that arrives in pieces.
#[derive(Debug, Default)]
struct Frames {
    /// Bytes still to skip (the client preface).
    skip: usize,
    header: [u8; FRAME_HEADER],
    filled: usize,
    /// Payload bytes left of the current frame.
    left: usize,
    kind: u8,
    stream: u32,
}

impl Frames {
    fn after(skip: usize) -> Self {
        Self { skip, ..Self::default() }
    }

    fn feed(&mut self, mut bytes: &[u8], mut seen: impl FnMut(Seen)) {
        let skipped = self.skip.min(bytes.len());
        self.skip -= skipped;
        bytes = &bytes[skipped..];
        while !bytes.is_empty() {
            if self.left > 0 {
                let len = self.left.min(bytes.len());
                seen(Seen::Payload { kind: self.kind, stream: self.stream, len });
                self.left -= len;
                bytes = &bytes[len..];
                continue;
            }
            let len = (FRAME_HEADER - self.filled).min(bytes.len());
            self.header[self.filled..self.filled + len].copy_from_slice(&bytes[..len]);
            self.filled += len;
            bytes = &bytes[len..];
            if self.filled == FRAME_HEADER {
                let h = self.header;
                self.filled = 0;
                self.left = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
                self.kind = h[3];
                self.stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
                seen(Seen::Header { kind: self.kind, stream: self.stream });
            }
        }
    }
}

/// A server connection's transport, telling its [`SendQueue`] what goes out and which streams
/// are reset.
#[derive(Debug)]
pub struct Metered<IO> {
    io: IO,
    queue: Arc<SendQueue>,
    reads: Frames,
    writes: Frames,
}

impl<IO> Metered<IO> {
    /// `io` of a server connection (the client's preface comes first), counted into `queue`.
    pub fn server(io: IO, queue: Arc<SendQueue>) -> Self {
        Self { io, queue, reads: Frames::after(CLIENT_PREFACE), writes: Frames::default() }
    }

    fn wrote(&mut self, bytes: &[u8]) {
        let queue = &self.queue;
        self.writes.feed(bytes, |seen| match seen {
            Seen::Payload { kind: DATA, stream, len } => queue.written(stream, len),
            Seen::Header { kind: RST_STREAM, stream } => queue.reset(stream),
            _ => {}
        });
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Metered<IO> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        let queue = &this.queue;
        this.reads.feed(&buf.filled()[before..], |seen| {
            if let Seen::Header { kind: RST_STREAM, stream } = seen {
                queue.reset(stream);
            }
        });
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Metered<IO> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let n = ready!(Pin::new(&mut this.io).poll_write(cx, data))?;
        this.wrote(&data[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let mut n = ready!(Pin::new(&mut this.io).poll_write_vectored(cx, bufs))?;
        let written = n;
        for buf in bufs {
            if n == 0 {
                break;
            }
            let len = n.min(buf.len());
            this.wrote(&buf[..len]);
            n -= len;
        }
        Poll::Ready(Ok(written))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrymesh_testbed::h2raw::{self, kind::SETTINGS, PREFACE};

    fn frame(kind: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        h2raw::frame(kind, 0, stream, payload)
    }

    #[test]
    fn frames_are_read_in_any_pieces_after_the_preface() {
        let mut stream = PREFACE.to_vec();
        stream.extend(frame(SETTINGS, 0, &[0; 6]));
        stream.extend(frame(DATA, 3, &[7; 10]));
        stream.extend(frame(RST_STREAM, 5, &[0, 0, 0, 8]));
        stream.extend(frame(DATA, 7, &[]));
        for piece in [1, 2, 5, 9, 13, stream.len()] {
            let mut frames = Frames::after(CLIENT_PREFACE);
            let (mut data, mut headers) = (HashMap::<u32, usize>::new(), Vec::new());
            for chunk in stream.chunks(piece) {
                frames.feed(chunk, |seen| match seen {
                    Seen::Header { kind, stream } => headers.push((kind, stream)),
                    Seen::Payload { kind: DATA, stream, len } => *data.entry(stream).or_default() += len,
                    Seen::Payload { .. } => {}
                });
            }
            assert_eq!(headers, [(SETTINGS, 0), (DATA, 3), (RST_STREAM, 5), (DATA, 7)], "pieces of {piece}");
            assert_eq!(data, HashMap::from([(3, 10)]), "pieces of {piece}");
        }
    }

    #[tokio::test]
    async fn room_comes_back_as_data_is_written_or_its_stream_is_reset() {
        let queue = SendQueue::new(100);
        queue.open(1);
        queue.open(3);
        assert_eq!(queue.take(1, 80).await, Some(80));
        assert_eq!(queue.take(3, 80).await, Some(20), "what is left of the limit");
        let waiting = tokio::spawn({
            let queue = queue.clone();
            async move { queue.take(3, 50).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "a full queue waits");
        // Stream 1's DATA goes out (in two frames), through the transport.
        let (client, mut server) = tokio::io::duplex(1024);
        let mut metered = Metered::server(client, queue.clone());
        let mut out = frame(DATA, 1, &[1; 30]);
        out.extend(frame(DATA, 1, &[1; 10]));
        tokio::io::AsyncWriteExt::write_all(&mut metered, &out).await.unwrap();
        assert_eq!(waiting.await.unwrap(), Some(40), "the room stream 1's 40 bytes gave back");
        assert_eq!(queue.queued(), 100);
        // The peer resets stream 1: h2 drops its other 40 bytes, and they are free again.
        let mut incoming = PREFACE.to_vec();
        incoming.extend(frame(RST_STREAM, 1, &[0, 0, 0, 8]));
        tokio::io::AsyncWriteExt::write_all(&mut server, &incoming).await.unwrap();
        let mut read = [0; 64];
        let n = tokio::io::AsyncReadExt::read(&mut metered, &mut read).await.unwrap();
        assert_eq!(n, incoming.len());
        assert_eq!(queue.queued(), 60);
        assert_eq!(queue.take(1, 10).await, None, "a reset stream takes no room");
        // Stream 3 ends in order: forgotten once its 60 bytes are out; its room given back.
        queue.close(3);
        queue.give_back(3, 10);
        tokio::io::AsyncWriteExt::write_all(&mut metered, &frame(DATA, 3, &[3; 50])).await.unwrap();
        assert_eq!(queue.queued(), 0);
        // A stream that relayed nothing is forgotten as it closes.
        queue.open(5);
        queue.close(5);
        assert!(queue.lock().streams.is_empty(), "{:?}", queue.lock().streams);
    }
}
