//! A byte-at-a-time HTTP/2 frame walker, and an IO wrapper that watches an
//! upstream HTTP/2 connection for what hyper does not report: GOAWAY (the
//! connection then takes no new streams at once) and whether every stream
//! still open when the connection ended was above GOAWAY's last-stream-id,
//! that is, never processed by the server and safe to send again.

use std::collections::BTreeSet;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The client connection preface ("PRI * HTTP/2.0...").
pub const PREFACE_LEN: usize = 24;
const FRAME_DATA: u8 = 0;
const FRAME_HEADERS: u8 = 1;
const FRAME_RST_STREAM: u8 = 3;
const FRAME_GOAWAY: u8 = 7;
const FLAG_END_STREAM: u8 = 1;

/// Walks a byte stream of HTTP/2 frames.
#[derive(Clone, Copy, Default)]
pub struct Scanner {
    /// Bytes still to skip before the first frame (the client preface).
    skip: usize,
    head: [u8; 9],
    head_len: usize,
    /// Payload bytes of the current frame already seen, and its length.
    pos: usize,
    len: usize,
}

pub enum Event {
    None,
    /// A complete frame header: type and flags.
    Head(u8, u8),
    /// Byte `pos` of the current frame's payload.
    Payload(usize),
}

impl Scanner {
    /// For the client-to-server direction, which starts with the preface.
    pub fn after_preface() -> Self {
        Scanner {
            skip: PREFACE_LEN,
            ..Scanner::default()
        }
    }

    pub fn at_boundary(&self) -> bool {
        self.skip == 0 && self.head_len == 0
    }

    /// Feeds one byte.
    pub fn feed(&mut self, byte: u8) -> Event {
        if self.skip > 0 {
            self.skip -= 1;
            return Event::None;
        }
        if self.head_len < 9 {
            self.head[self.head_len] = byte;
            self.head_len += 1;
            if self.head_len < 9 {
                return Event::None;
            }
            let (t, flags) = self.headed();
            return Event::Head(t, flags);
        }
        let p = self.pos;
        self.pos += 1;
        if self.pos == self.len {
            self.head_len = 0;
        }
        Event::Payload(p)
    }

    /// Takes a whole frame header in one step when one starts at `bytes`
    /// (at a frame boundary, nine bytes at hand): the usual case, where
    /// [`Scanner::feed`] would take nine. Returns its type and flags.
    pub fn head_from(&mut self, bytes: &[u8]) -> Option<(u8, u8)> {
        if !self.at_boundary() {
            return None;
        }
        self.head = bytes.get(..9)?.try_into().ok()?;
        self.head_len = 9;
        Some(self.headed())
    }

    /// The header is complete: the payload's length is known.
    fn headed(&mut self) -> (u8, u8) {
        self.len =
            (self.head[0] as usize) << 16 | (self.head[1] as usize) << 8 | self.head[2] as usize;
        self.pos = 0;
        if self.len == 0 {
            self.head_len = 0;
        }
        (self.head[3], self.head[4])
    }

    /// Payload bytes of the current frame not yet fed (0 between frames),
    /// or preface bytes still to skip.
    pub fn skippable(&self) -> usize {
        if self.skip > 0 {
            self.skip
        } else if self.head_len == 9 {
            self.len - self.pos
        } else {
            0
        }
    }

    /// Passes over `n` bytes (at most [`Scanner::skippable`]) without
    /// looking at them: a frame's payload is walked in one step, not byte by byte.
    pub fn skip(&mut self, n: usize) {
        if self.skip > 0 {
            self.skip -= n;
            return;
        }
        self.pos += n;
        if self.pos == self.len {
            self.head_len = 0;
        }
    }

    pub fn frame_type(&self) -> u8 {
        self.head[3]
    }

    pub fn stream_id(&self) -> u32 {
        u32::from_be_bytes([self.head[5], self.head[6], self.head[7], self.head[8]]) & 0x7fff_ffff
    }
}

/// What the watcher tells the pool about its connection.
#[derive(Default)]
pub struct GoawayState {
    /// The server sent GOAWAY: no new streams.
    pub draining: AtomicBool,
    /// The connection ended after GOAWAY with no stream at or below its
    /// last-stream-id still waiting for the server: every stream that
    /// failed with it was never processed.
    pub unprocessed_at_eof: AtomicBool,
}

/// An upstream HTTP/2 connection's IO, watched.
pub struct Watched<T> {
    inner: T,
    state: Arc<GoawayState>,
    read: Scanner,
    write: Scanner,
    /// Streams apilb opened that the server has not ended or reset.
    open: BTreeSet<u32>,
    goaway_id: [u8; 4],
    last_stream_id: Option<u32>,
}

impl<T> Watched<T> {
    pub fn new(inner: T, state: Arc<GoawayState>) -> Self {
        Watched {
            inner,
            state,
            read: Scanner::default(),
            write: Scanner::after_preface(),
            open: BTreeSet::new(),
            goaway_id: [0; 4],
            last_stream_id: None,
        }
    }

    fn scan_read(&mut self, mut bytes: &[u8]) {
        while let Some((&b, rest)) = bytes.split_first() {
            // Only a GOAWAY's first four payload bytes matter: skip the rest.
            let wanted = self.read.frame_type() == FRAME_GOAWAY && self.read.skippable() > 0 && {
                let pos = self.read.len - self.read.skippable();
                pos < 4
            };
            let n = self.read.skippable();
            if n > 0 && !wanted {
                let n = n.min(bytes.len());
                self.read.skip(n);
                bytes = &bytes[n..];
                continue;
            }
            if let Some((t, flags)) = self.read.head_from(bytes) {
                self.read_head(t, flags);
                bytes = &bytes[9..];
                continue;
            }
            bytes = rest;
            match self.read.feed(b) {
                Event::Head(t, flags) => self.read_head(t, flags),
                Event::Payload(p) if p < 4 && self.read.frame_type() == FRAME_GOAWAY => {
                    self.goaway_id[p] = b;
                    if p == 3 {
                        let id = u32::from_be_bytes(self.goaway_id) & 0x7fff_ffff;
                        self.last_stream_id = Some(self.last_stream_id.map_or(id, |l| l.min(id)));
                    }
                }
                _ => {}
            }
        }
    }

    /// A frame from the server begins.
    fn read_head(&mut self, t: u8, flags: u8) {
        let id = self.read.stream_id();
        let ends = (t == FRAME_DATA || t == FRAME_HEADERS) && flags & FLAG_END_STREAM != 0;
        if ends || t == FRAME_RST_STREAM {
            self.open.remove(&id);
        }
        if t == FRAME_GOAWAY {
            self.state.draining.store(true, Relaxed);
        }
    }

    /// A frame to the server begins.
    fn write_head(&mut self, t: u8) {
        let id = self.write.stream_id();
        match t {
            FRAME_HEADERS => {
                self.open.insert(id);
            }
            FRAME_RST_STREAM => {
                self.open.remove(&id);
            }
            _ => {}
        }
    }

    fn scan_write(&mut self, mut bytes: &[u8]) {
        while let Some((&b, rest)) = bytes.split_first() {
            let n = self.write.skippable().min(bytes.len());
            if n > 0 {
                self.write.skip(n);
                bytes = &bytes[n..];
                continue;
            }
            if let Some((t, _)) = self.write.head_from(bytes) {
                self.write_head(t);
                bytes = &bytes[9..];
                continue;
            }
            bytes = rest;
            if let Event::Head(t, _) = self.write.feed(b) {
                self.write_head(t);
            }
        }
    }

    /// The connection is ending: judge the streams still open.
    fn at_eof(&self) {
        if let Some(last) = self.last_stream_id {
            let processed_open = self.open.range(..=last).next().is_some();
            self.state
                .unprocessed_at_eof
                .store(!processed_open, Relaxed);
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        match &r {
            Poll::Ready(Ok(())) if buf.filled().len() == before && buf.remaining() > 0 => {
                self.at_eof()
            }
            Poll::Ready(Ok(())) => self.scan_read(&buf.filled()[before..]),
            Poll::Ready(Err(_)) => self.at_eof(),
            Poll::Pending => {}
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        match &r {
            Poll::Ready(Ok(n)) => self.scan_write(&buf[..*n]),
            Poll::Ready(Err(_)) => self.at_eof(),
            Poll::Pending => {}
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        if let Poll::Ready(Err(_)) = &r {
            self.at_eof();
        }
        r
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(t: u8, flags: u8, id: u32, payload: &[u8]) -> Vec<u8> {
        let n = payload.len();
        let mut v = vec![(n >> 16) as u8, (n >> 8) as u8, n as u8, t, flags];
        v.extend_from_slice(&id.to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn streams_above_goaway_last_stream_id_are_unprocessed_at_eof() {
        let state = Arc::new(GoawayState::default());
        let mut w = Watched::new((), state.clone());
        let mut out = vec![b'P'; PREFACE_LEN];
        for id in [1, 3, 5] {
            out.extend(frame(FRAME_HEADERS, 4, id, b"hpack"));
        }
        w.scan_write(&out);
        // Stream 1 ends; GOAWAY says the last processed is 3; 3 ends.
        let mut inp = frame(FRAME_HEADERS, 4 | FLAG_END_STREAM, 1, b"x");
        inp.extend(frame(FRAME_GOAWAY, 0, 0, &[0, 0, 0, 3, 0, 0, 0, 0]));
        w.scan_read(&inp[..7]);
        w.scan_read(&inp[7..]);
        assert!(state.draining.load(Relaxed));
        w.at_eof();
        assert!(
            !state.unprocessed_at_eof.load(Relaxed),
            "stream 3 was still open"
        );
        w.scan_read(&frame(FRAME_DATA, FLAG_END_STREAM, 3, b""));
        w.at_eof();
        assert!(
            state.unprocessed_at_eof.load(Relaxed),
            "only stream 5 is left"
        );
    }

    #[test]
    fn payloads_skipped_in_bulk_at_any_split() {
        let mut inp = frame(FRAME_DATA, 0, 1, &[7; 300]);
        inp.extend(frame(FRAME_HEADERS, 4 | FLAG_END_STREAM, 1, b"h"));
        inp.extend(frame(FRAME_GOAWAY, 0, 0, &[0, 0, 0, 9, 0, 0, 0, 0, 1, 2]));
        inp.extend(frame(FRAME_DATA, FLAG_END_STREAM, 3, &[1; 40]));
        for cut in 0..inp.len() {
            let state = Arc::new(GoawayState::default());
            let mut w = Watched::new((), state.clone());
            let mut out = vec![b'P'; PREFACE_LEN];
            out.extend(frame(FRAME_HEADERS, 4, 1, &[0; 100]));
            out.extend(frame(FRAME_HEADERS, 4, 3, b"x"));
            w.scan_write(&out[..cut.min(out.len())]);
            w.scan_write(&out[cut.min(out.len())..]);
            w.scan_read(&inp[..cut]);
            w.scan_read(&inp[cut..]);
            assert_eq!(w.last_stream_id, Some(9), "cut at {cut}");
            assert!(w.open.is_empty(), "cut at {cut}: {:?}", w.open);
            assert!(state.draining.load(Relaxed));
            assert!(w.read.at_boundary() && w.write.at_boundary());
        }
    }
}
