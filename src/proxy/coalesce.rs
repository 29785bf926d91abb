//! A write side that gathers what is written between two flushes and hands
//! it to the stream below in one piece: h2's writer passes every DATA frame
//! larger than 256 bytes as a write of its own, and under TLS each
//! write is a record and a `writev`. Gathered, the responses of many streams
//! leave in one record train and one system call per flush. A flush waits
//! until the runtime has looked for I/O once more (as an event loop sends
//! after handling every ready socket), and again while each such turn brings
//! more (at most 12 turns or 64 KiB), so responses that arrive on other
//! upstream connections in the meantime leave in the same write. Under
//! h2load -c16 -m32 this took apilb from ~65k to ~83k req/s; an idle
//! connection still sends after one turn. The turn cap trades CPU per
//! request against idle time: responses held longer cost less to send but
//! starve the client, whose next requests then come in bursts that leave
//! apilb idle between them (round 12: at 32 turns apilb's core was 88-91 %
//! busy and often settled near 62k req/s; at 12, 97-99 % busy and about
//! 10 % faster on average; 4 or 8 turns cost more CPU per request).

use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes gathered before a write goes through without waiting for the flush.
/// A gather takes a buffer of this size at its first byte and frees it once
/// drained: it never grows (each step of which copies what was gathered,
/// round 14: 1.9 % of L7 instructions under h2load -c16 -m32), and idle
/// connections (thousands of watches) hold none.
const GATHER: usize = 64 * 1024;
/// Runtime turns a flush may wait for while each brings more bytes.
const MAX_TURNS: u8 = 12;

type Yield = Pin<Box<dyn Future<Output = ()> + Send + Sync>>;

pub struct Coalesced<T> {
    inner: T,
    buf: Vec<u8>,
    /// Bytes of `buf` already written below.
    sent: usize,
    /// A flush waiting for the runtime's next turn.
    turn: Option<Yield>,
    /// Bytes gathered when the pending turn began, and turns waited so far.
    mark: usize,
    turns: u8,
}

impl<T> Coalesced<T> {
    pub fn new(inner: T) -> Self {
        Coalesced {
            inner,
            buf: Vec::new(),
            sent: 0,
            turn: None,
            mark: 0,
            turns: 0,
        }
    }
}

impl<T: AsyncWrite + Unpin> Coalesced<T> {
    /// Writes every gathered byte below.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.buf.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.sent = 0;
        self.buf = Vec::new();
        Poll::Ready(Ok(()))
    }
}

impl<T> Coalesced<T> {
    /// Waits for the runtime's next turn (after it looked for I/O), and
    /// again while each turn brought more to send (responses arriving from
    /// other upstream connections), up to [`MAX_TURNS`] or [`GATHER`]
    /// bytes. An idle connection waits one turn: nothing else comes.
    fn poll_turns(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            match self.turn.as_mut() {
                None => {
                    self.mark = self.buf.len();
                    self.turns = 1;
                }
                Some(t) => {
                    ready!(t.as_mut().poll(cx));
                    let grew = self.buf.len() > self.mark;
                    if !grew || self.turns >= MAX_TURNS || self.buf.len() >= GATHER {
                        self.turn = None;
                        return Poll::Ready(());
                    }
                    self.mark = self.buf.len();
                    self.turns += 1;
                }
            }
            self.turn = Some(Box::pin(tokio::task::yield_now()));
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Coalesced<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesced<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(b)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.buf.len() >= GATHER {
            ready!(this.poll_drain(cx))?;
        }
        if this.buf.capacity() == 0 {
            this.buf.reserve_exact(GATHER);
        }
        let room = GATHER - this.buf.len();
        let mut taken = 0;
        for b in bufs {
            let n = b.len().min(room - taken);
            this.buf.extend_from_slice(&b[..n]);
            taken += n;
            if taken == room {
                break;
            }
        }
        Poll::Ready(Ok(taken))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.sent < self.buf.len() {
            ready!(self.poll_turns(cx));
        }
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn writes_reach_the_peer_in_one_piece_at_flush() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut w = Coalesced::new(a);
        for i in 0..50u8 {
            w.write_all(&[i; 1000]).await.unwrap();
        }
        assert_eq!(w.buf.capacity(), GATHER, "grown once, to a full gather");
        // Nothing has gone below before the flush.
        let mut probe = [0u8; 1];
        let early =
            tokio::time::timeout(std::time::Duration::from_millis(50), b.read(&mut probe)).await;
        assert!(early.is_err(), "bytes left before the flush");
        w.flush().await.unwrap();
        let mut got = vec![0u8; 50_000];
        b.read_exact(&mut got).await.unwrap();
        assert!(got
            .chunks(1000)
            .enumerate()
            .all(|(i, c)| c.iter().all(|x| *x == i as u8)));
        assert_eq!(w.buf.capacity(), 0, "a drained buffer is freed");

        // A small gather takes a full-size buffer too, and gives it back.
        w.write_all(&[7; 100]).await.unwrap();
        assert_eq!(w.buf.capacity(), GATHER, "a gather's buffer is never grown");
        w.flush().await.unwrap();
        assert_eq!(w.buf.capacity(), 0, "an idle connection holds no buffer");
        b.read_exact(&mut got[..100]).await.unwrap();
        assert!(got[..100].iter().all(|x| *x == 7));
    }

    /// Polls a flush on `w`, writing `chunk` bytes before each poll (a
    /// connection whose responses keep arriving); returns the polls made.
    async fn busy_flush(w: &mut Coalesced<tokio::io::DuplexStream>, chunk: usize) -> usize {
        let mut polls = 0;
        std::future::poll_fn(|cx| {
            polls += 1;
            let n = w.buf.len();
            w.buf.extend(std::iter::repeat_n(b'x', chunk));
            assert_eq!(w.buf.len(), n + chunk);
            Pin::new(&mut *w).poll_flush(cx)
        })
        .await
        .unwrap();
        polls
    }

    #[tokio::test]
    async fn a_flush_waits_one_turn_when_idle_and_gathers_while_bytes_keep_coming() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut w = Coalesced::new(a);
        w.write_all(&[1; 1000]).await.unwrap();
        w.flush().await.unwrap();
        assert_eq!(w.turns, 1, "an idle connection waits one turn");
        let mut got = vec![0u8; 1000];
        b.read_exact(&mut got).await.unwrap();

        // 100 bytes every turn: gathered for MAX_TURNS turns, then sent.
        let polls = busy_flush(&mut w, 100).await;
        assert_eq!(w.turns, MAX_TURNS);
        assert_eq!(polls, MAX_TURNS as usize + 1);
        let mut got = vec![0u8; polls * 100];
        b.read_exact(&mut got).await.unwrap();

        // 8 KiB every turn: sent once GATHER bytes are waiting.
        let polls = busy_flush(&mut w, 8 * 1024).await;
        assert_eq!(polls * 8 * 1024, GATHER);
        assert!(w.turns < MAX_TURNS);
    }
}
