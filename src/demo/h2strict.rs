//! Makes the fake's HTTP/2 server answer a stream beyond its advertised
//! SETTINGS_MAX_CONCURRENT_STREAMS as Go's server (kube-apiserver) does.
//!
//! hyper/h2 refuse such a stream with RST_STREAM REFUSED_STREAM, which a
//! client may retry silently. Go answers with REFUSED_STREAM only while its
//! SETTINGS are unacknowledged and with PROTOCOL_ERROR afterwards, a failure
//! the client sees. This wrapper sits between hyper and TLS, watches the
//! client's frames for the SETTINGS acknowledgement and rewrites the error
//! code of outgoing REFUSED_STREAM resets once it arrived, counting each.
//!
//! Like Go's server it also lingers after closing its side: it keeps
//! reading (and discarding) until the client closes or a second passes, so
//! the final GOAWAY reaches the client instead of being lost to a TCP reset
//! caused by unread client frames.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

use super::fake::FakeState;
use crate::proxy::h2frames::{Event, Scanner};

const FRAME_SETTINGS: u8 = 4;
const FRAME_RST_STREAM: u8 = 3;
const FLAG_ACK: u8 = 1;
const REFUSED_STREAM: u8 = 7;
const PROTOCOL_ERROR: u8 = 1;
/// Go's goAwayTimeout: how long a closing connection keeps reading.
const LINGER: std::time::Duration = std::time::Duration::from_secs(1);

/// The fake's connection IO: a pass-through unless the connection speaks h2.
pub struct GoStrict<T> {
    inner: T,
    h2: bool,
    state: Arc<FakeState>,
    read: Scanner,
    write: Scanner,
    settings_acked: bool,
    /// Set once our side is shut down: reading until the client leaves.
    linger: Option<Pin<Box<Sleep>>>,
}

impl<T> GoStrict<T> {
    pub fn new(inner: T, h2: bool, state: Arc<FakeState>) -> Self {
        GoStrict {
            inner,
            h2,
            state,
            read: Scanner::after_preface(),
            write: Scanner::default(),
            settings_acked: false,
            linger: None,
        }
    }

    fn scan_read(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if let Event::Head(t, flags) = self.read.feed(b) {
                if t == FRAME_SETTINGS && flags & FLAG_ACK != 0 {
                    self.settings_acked = true;
                }
            }
        }
    }

    fn scan_write(&mut self, out: &mut [u8]) -> usize {
        rewrite(&mut self.write, self.settings_acked, out)
    }
}

/// Rewrites REFUSED_STREAM to PROTOCOL_ERROR in `out` when `acked`;
/// returns how many refusals it saw (rewritten or not).
fn rewrite(w: &mut Scanner, acked: bool, out: &mut [u8]) -> usize {
    let mut refused = 0;
    for b in out.iter_mut() {
        if let Event::Payload(3) = w.feed(*b) {
            if w.frame_type() == FRAME_RST_STREAM && *b == REFUSED_STREAM {
                refused += 1;
                if acked {
                    *b = PROTOCOL_ERROR;
                }
            }
        }
    }
    refused
}

impl<T: AsyncRead + Unpin> AsyncRead for GoStrict<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if self.h2 {
            let fresh = buf.filled()[before..].to_vec();
            self.scan_read(&fresh);
        }
        r
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for GoStrict<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if !self.h2 {
            return Pin::new(&mut self.inner).poll_write(cx, buf);
        }
        let saved = self.write;
        let mut out = buf.to_vec();
        self.scan_write(&mut out);
        let r = Pin::new(&mut self.inner).poll_write(cx, &out);
        // Only what was written counts: rescan exactly that prefix.
        self.write = saved;
        if let Poll::Ready(Ok(n)) = r {
            let rewritten = self.scan_write(&mut out[..n].to_vec());
            self.state.over_limit.fetch_add(rewritten, Relaxed);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.h2 {
            return Pin::new(&mut self.inner).poll_shutdown(cx);
        }
        if self.linger.is_none() {
            std::task::ready!(Pin::new(&mut self.inner).poll_shutdown(cx))?;
            self.linger = Some(Box::pin(tokio::time::sleep(LINGER)));
        }
        let mut scratch = [0u8; 4096];
        loop {
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut self.inner).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if !buf.filled().is_empty() => continue,
                Poll::Ready(_) => return Poll::Ready(Ok(())),
                Poll::Pending => break,
            }
        }
        match self.linger.as_mut().map(|l| l.as_mut().poll(cx)) {
            Some(Poll::Pending) => Poll::Pending,
            _ => Poll::Ready(Ok(())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::h2frames::PREFACE_LEN;

    fn frame(t: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let n = payload.len();
        let mut v = vec![
            (n >> 16) as u8,
            (n >> 8) as u8,
            n as u8,
            t,
            flags,
            0,
            0,
            0,
            1,
        ];
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn refused_stream_becomes_protocol_error_only_after_settings_ack() {
        let mut bytes = frame(0, 0, b"hello");
        bytes.extend(frame(FRAME_RST_STREAM, 0, &[0, 0, 0, REFUSED_STREAM]));
        // Before the acknowledgement: counted, untouched.
        let mut copy = bytes.clone();
        let mut w = Scanner::default();
        assert_eq!(rewrite(&mut w, false, &mut copy), 1);
        assert_eq!(copy, bytes);
        assert!(w.at_boundary(), "back at a frame boundary");
        // After it: the code becomes PROTOCOL_ERROR, split writes included.
        let mut w = Scanner::default();
        let (a, b) = copy.split_at_mut(17);
        assert_eq!(rewrite(&mut w, true, a) + rewrite(&mut w, true, b), 1);
        assert_eq!(*copy.last().unwrap(), PROTOCOL_ERROR);
        let mut r = Scanner::after_preface();
        let mut acked = false;
        let mut input = vec![b'P'; PREFACE_LEN];
        input.extend(frame(FRAME_SETTINGS, FLAG_ACK, &[]));
        for b in input {
            if let Event::Head(t, f) = r.feed(b) {
                acked |= t == FRAME_SETTINGS && f & FLAG_ACK != 0;
            }
        }
        assert!(acked);
    }
}
