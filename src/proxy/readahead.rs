//! A read side that takes what the socket holds in one system call: rustls
//! reads into its own buffer at most 4 KiB past what it already holds, so an
//! upstream connection bringing a train of 16 KiB records cost one `recvfrom`
//! per 4–7 KiB (h2load -c16 -m32 behind nghttpd: 83 % of upstream reads
//! filled rustls's buffer, ~5.8 KiB each). Below TLS on upstream
//! connections, this reads up to 64 KiB at once and hands rustls its pieces
//! from memory. Writes pass through.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes one read from the stream below may bring.
const AHEAD: usize = 64 * 1024;

pub struct ReadAhead<T> {
    inner: T,
    /// Bytes read but not yet handed on are `buf[pos..]`. Allocated for a
    /// read and freed once handed on and the stream below has no more, so an
    /// idle connection holds no buffer.
    buf: Vec<u8>,
    pos: usize,
}

impl<T> ReadAhead<T> {
    pub fn new(inner: T) -> Self {
        ReadAhead {
            inner,
            buf: Vec::new(),
            pos: 0,
        }
    }

    /// Bytes read from below and not yet handed on.
    #[cfg(test)]
    fn held(&self) -> usize {
        self.buf.len() - self.pos
    }
}

impl<T: AsyncRead + Unpin> ReadAhead<T> {
    /// Refills `buf` from below; `Ok(false)` at the end of the stream.
    fn fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        self.buf.clear();
        self.pos = 0;
        self.buf.reserve_exact(AHEAD);
        let mut rb = ReadBuf::uninit(&mut self.buf.spare_capacity_mut()[..AHEAD]);
        match Pin::new(&mut self.inner).poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) => {
                let n = rb.filled().len();
                // SAFETY: `poll_read` initialised the first `n` bytes of the
                // spare capacity (ReadBuf's contract).
                unsafe { self.buf.set_len(n) };
                if n == 0 {
                    self.buf = Vec::new();
                }
                Poll::Ready(Ok(n > 0))
            }
            other => {
                // Nothing to hand on: an idle connection keeps no buffer.
                self.buf = Vec::new();
                other.map_ok(|()| false)
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadAhead<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.pos == this.buf.len() {
            // A reader that asks for as much as a fill brings reads directly.
            if out.remaining() >= AHEAD {
                this.buf = Vec::new();
                this.pos = 0;
                return Pin::new(&mut this.inner).poll_read(cx, out);
            }
            if !ready!(this.fill(cx))? {
                return Poll::Ready(Ok(()));
            }
        }
        let n = out.remaining().min(this.buf.len() - this.pos);
        out.put_slice(&this.buf[this.pos..this.pos + n]);
        this.pos += n;
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ReadAhead<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Counts the reads that reach the stream below.
    struct Counted<T> {
        inner: T,
        reads: usize,
    }

    impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            self.reads += 1;
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    #[tokio::test]
    async fn small_reads_are_served_from_one_read_below() {
        let (mut tx, rx) = tokio::io::duplex(256 * 1024);
        let data: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8).collect();
        tx.write_all(&data).await.unwrap();
        let mut r = ReadAhead::new(Counted {
            inner: rx,
            reads: 0,
        });
        let mut got = Vec::new();
        let mut piece = [0u8; 4096];
        while got.len() < data.len() {
            let n = r.read(&mut piece).await.unwrap();
            assert!(n > 0);
            got.extend_from_slice(&piece[..n]);
        }
        assert_eq!(got, data);
        // Ten 4 KiB reads above, one below.
        assert_eq!(r.inner.reads, 1);
        assert_eq!(r.held(), 0);
        // The end of the stream reads as the end, and the buffer is gone.
        drop(tx);
        assert_eq!(r.read(&mut piece).await.unwrap(), 0);
        assert_eq!(r.buf.capacity(), 0);
    }

    #[tokio::test]
    async fn a_reader_asking_for_a_whole_fill_reads_directly() {
        let (mut tx, rx) = tokio::io::duplex(256 * 1024);
        tx.write_all(&[7u8; 1000]).await.unwrap();
        let mut r = ReadAhead::new(rx);
        let mut big = vec![0u8; AHEAD];
        assert_eq!(r.read(&mut big).await.unwrap(), 1000);
        assert_eq!(r.buf.capacity(), 0);
        assert!(big[..1000].iter().all(|&b| b == 7));
    }

    #[tokio::test]
    async fn an_idle_connection_holds_no_buffer() {
        let (mut tx, rx) = tokio::io::duplex(1024);
        let mut r = ReadAhead::new(rx);
        tx.write_all(b"hello").await.unwrap();
        let mut piece = [0u8; 3];
        assert_eq!(r.read(&mut piece).await.unwrap(), 3);
        assert_eq!(r.held(), 2);
        assert_eq!(r.read(&mut piece).await.unwrap(), 2);
        // Nothing more below: the next read waits, and frees the buffer.
        assert!(r.read(&mut piece).now_or_never().is_none());
        assert_eq!(r.buf.capacity(), 0);
        // Writes pass through.
        r.write_all(b"back").await.unwrap();
        let mut four = [0u8; 4];
        tx.read_exact(&mut four).await.unwrap();
        assert_eq!(&four, b"back");
    }
}
