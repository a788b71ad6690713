//! Moving bytes over a CONNECT stream: copying between a TCP connection and the stream (the
//! node agent's relay), and [`H2Stream`], the stream as `AsyncRead`/`AsyncWrite` for code that
//! speaks a protocol over it (hyper serving or sending HTTP on a CONNECT stream).

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use super::h2_io;
use super::queue::SendQueue;

/// Most bytes read from a TCP socket at once into HBONE (taken only when bytes are there):
/// larger reads mean fewer syscalls, HTTP/2 frames and TLS writes per megabyte (256 KiB moved
/// about 14% more cross-node than 64 KiB).
pub const RELAY_BUFFER: usize = 256 * 1024;

/// Copies TCP bytes into an HTTP/2 stream, honouring flow control; EOF ends the stream.
/// An idle connection holds no buffer: one is taken when bytes are there, and handed to h2.
/// Only what h2 may send now is read: bytes the peer's window holds back stay in the socket
/// (the app's send buffer, which stops the app), not with the agent. On a server connection
/// the bytes also take room in its `queue` first: what h2 holds for a peer that stops reading
/// its socket is bounded for the whole connection, whatever the windows it advertises.
pub async fn tcp_to_h2(
    from: &mut OwnedReadHalf,
    to: &mut SendStream<Bytes>,
    count: &mut u64,
    queue: Option<&SendQueue>,
) -> io::Result<()> {
    let id = to.stream_id().as_u32();
    loop {
        // Bytes (or the end) are there before any capacity is asked for: `readable()` may
        // report a socket readable that is not (a new one starts out so), and a stream the
        // peer has already ended would fail here for a client that has nothing more to say.
        if from.peek(&mut [0; 1]).await? == 0 {
            return to.send_data(Bytes::new(), true).map_err(h2_io);
        }
        to.reserve_capacity(RELAY_BUFFER);
        let granted = match poll_fn(|cx| to.poll_capacity(cx)).await {
            Some(granted) => granted.map_err(h2_io)?,
            None => return Err(io::Error::new(io::ErrorKind::BrokenPipe, "HBONE stream closed by the peer")),
        };
        if granted == 0 {
            // Capacity was assigned and taken back; ask again.
            tokio::task::yield_now().await;
            continue;
        }
        let room = match queue {
            Some(queue) => queue
                .take(id, granted)
                .await
                .ok_or_else(|| io::Error::new(io::ErrorKind::BrokenPipe, "HBONE stream reset"))?,
            None => granted,
        };
        let mut buf = BytesMut::with_capacity(room);
        let read = from.try_read_buf(&mut (&mut buf).limit(room));
        let sent = match read {
            Ok(n) if n > 0 => to.send_data(buf.freeze(), false).map_err(h2_io).map(|()| n),
            _ => Ok(0),
        };
        // Capacity and room the bytes sent did not use go back to the connection's other
        // streams.
        to.reserve_capacity(0);
        if let Some(queue) = queue {
            queue.give_back(id, room - sent.as_ref().map_or(0, |n| *n));
        }
        match read {
            Ok(0) => return to.send_data(Bytes::new(), true).map_err(h2_io),
            Ok(_) => *count += sent? as u64,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Most bytes, and DATA frames, [`h2_to_tcp`] writes to the app in one vectored write: the
/// frames already received go out together (a peer's 256 KiB read arrives as four 64 KiB
/// frames, [`super::MAX_FRAME`]).
const GATHER_BYTES: usize = 1024 * 1024;
const GATHER_FRAMES: usize = 64;

/// Copies an HTTP/2 stream into TCP, releasing flow-control capacity for what was written;
/// the stream's end half-closes the TCP side.
pub async fn h2_to_tcp(from: &mut RecvStream, to: &mut OwnedWriteHalf, count: &mut u64) -> io::Result<()> {
    let mut chunks: Vec<Bytes> = Vec::with_capacity(GATHER_FRAMES);
    loop {
        let (mut gathered, mut ended, mut failed) = (0, false, None);
        match from.data().await {
            Some(Ok(chunk)) => {
                gathered += chunk.len();
                chunks.push(chunk);
            }
            Some(Err(e)) => return Err(h2_io(e)),
            None => break,
        }
        while gathered < GATHER_BYTES && chunks.len() < GATHER_FRAMES {
            let next = poll_fn(|cx| Poll::Ready(from.poll_data(cx))).await;
            match next {
                Poll::Ready(Some(Ok(chunk))) => {
                    gathered += chunk.len();
                    chunks.push(chunk);
                }
                Poll::Ready(Some(Err(e))) => {
                    failed = Some(h2_io(e));
                    break;
                }
                Poll::Ready(None) => {
                    ended = true;
                    break;
                }
                Poll::Pending => break,
            }
        }
        write_all_chunks(to, &mut chunks).await?;
        *count += gathered as u64;
        let _ = from.flow_control().release_capacity(gathered);
        if let Some(e) = failed {
            return Err(e);
        }
        if ended {
            break;
        }
    }
    to.shutdown().await
}

/// Writes every byte of `chunks` (emptied) with vectored writes.
async fn write_all_chunks(to: &mut OwnedWriteHalf, chunks: &mut Vec<Bytes>) -> io::Result<()> {
    let mut first = 0;
    loop {
        while first < chunks.len() && chunks[first].is_empty() {
            first += 1;
        }
        if first == chunks.len() {
            break;
        }
        let slices: Vec<io::IoSlice<'_>> = chunks[first..].iter().map(|c| io::IoSlice::new(c)).collect();
        let mut written = to.write_vectored(&slices).await?;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while written > 0 {
            let len = chunks[first].len();
            if written >= len {
                written -= len;
                first += 1;
            } else {
                chunks[first].advance(written);
                written = 0;
            }
        }
    }
    chunks.clear();
    Ok(())
}

/// A CONNECT stream (either side) as a byte stream: reads take the stream's DATA frames and
/// give back the flow-control capacity of what they took; writes wait for capacity and send DATA; shutdown ends
/// the stream (END_STREAM), the peer's end is EOF.
#[derive(Debug)]
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// What a read did not take of the last DATA frame.
    pending: Bytes,
    /// A server connection's send queue, and the room this stream has taken there and not yet
    /// used.
    queue: Option<(Arc<SendQueue>, usize)>,
}

impl H2Stream {
    /// The stream whose halves are `send` and `recv`.
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self { send, recv, pending: Bytes::new(), queue: None }
    }

    /// A stream of a server connection: what it writes takes room in the connection's `queue`
    /// first (see [`tcp_to_h2`]).
    pub fn queued(send: SendStream<Bytes>, recv: RecvStream, queue: Arc<SendQueue>) -> Self {
        queue.open(send.stream_id().as_u32());
        Self { send, recv, pending: Bytes::new(), queue: Some((queue, 0)) }
    }

    /// Ends the stream both ways at once with RST_STREAM `reason` (the peer's agent resets its
    /// client's TCP connection), rather than an orderly end.
    pub fn reset(mut self, reason: h2::Reason) {
        self.send.send_reset(reason);
    }
}

impl Drop for H2Stream {
    fn drop(&mut self) {
        if let Some((queue, room)) = &self.queue {
            let id = self.send.stream_id().as_u32();
            queue.give_back(id, *room);
            // What it queued is written, or dropped with a reset the queue sees go out.
            queue.close(id);
        }
    }
}

impl AsyncRead for H2Stream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        while self.pending.is_empty() {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(chunk)) => self.pending = chunk,
                Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = self.pending.len().min(buf.remaining());
        buf.put_slice(&self.pending[..n]);
        self.pending.advance(n);
        // Window given back only for what the reader took: bytes it leaves unread stay in the
        // peer's window, so a reader that stops stops the peer.
        let _ = self.recv.flow_control().release_capacity(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        // Room first, kept across polls: h2's capacity is only reported as it grows.
        let id = self.send.stream_id().as_u32();
        let mut most = data.len();
        if let Some((queue, room)) = &mut self.queue {
            if *room == 0 {
                *room = ready!(queue.poll_take(cx, id, data.len()))
                    .ok_or_else(|| io::Error::new(io::ErrorKind::BrokenPipe, "HBONE stream reset"))?;
            }
            most = most.min(*room);
        }
        self.send.reserve_capacity(most);
        let granted = match ready!(self.send.poll_capacity(cx)) {
            Some(granted) => granted.map_err(h2_io)?,
            None => return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "HBONE stream closed"))),
        };
        if granted == 0 {
            // Capacity was assigned and taken back; ask again on the next poll.
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let n = granted.min(most);
        self.send.send_data(Bytes::copy_from_slice(&data[..n]), false).map_err(h2_io)?;
        if let Some((_, room)) = &mut self.queue {
            *room -= n;
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // h2 sends what it was given as soon as the connection task runs.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.send.send_data(Bytes::new(), true).map_err(h2_io))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn gathered_chunks_reach_a_slow_reader_whole_and_in_order() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, server) = tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        let (_, mut to) = client.unwrap().into_split();
        let (mut reader, _) = server.unwrap();
        // Chunks of odd sizes (an empty one among them), several MB in all: far more than the
        // sockets hold, so writes come back short and are resumed mid-chunk.
        let chunks: Vec<Bytes> = (0..64u32)
            .map(|i| (0..(i * 7919 % 200_000) as usize).map(|j| (j as u32 ^ i) as u8).collect::<Vec<u8>>().into())
            .collect();
        let expected: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
        let reading = tokio::spawn(async move {
            let (mut got, mut buf) = (Vec::new(), [0u8; 1000]);
            while let Ok(n @ 1..) = reader.read(&mut buf).await {
                got.extend_from_slice(&buf[..n]);
            }
            got
        });
        let mut gathered = chunks;
        write_all_chunks(&mut to, &mut gathered).await.unwrap();
        assert!(gathered.is_empty());
        to.shutdown().await.unwrap();
        drop(to);
        let got = reading.await.unwrap();
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "the bytes arrived in another order");
    }
}
