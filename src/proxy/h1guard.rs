//! Checks every HTTP/1 request of a connection before hyper sees it, for the
//! shapes hyper itself lets through (measured against hyper 1.x):
//! Content-Length together with Transfer-Encoding (hyper answers it as
//! chunked) and any Transfer-Encoding but a single `chunked` (hyper takes
//! `gzip, chunked` and `chunked, chunked`), and a `#` fragment in the target
//! (hyper drops it silently; HAProxy refuses it). It also refuses what it
//! cannot frame for itself: invalid or differing Content-Length, chunk-size lines
//! that are not plain hex (`+5`, `0x5`), bare LF in the chunked framing, and
//! heads over the size limit (431). Hyper refuses those too; framing them the
//! same way is what keeps the two from ever disagreeing on where the next
//! request begins. A head ends where httparse (hyper's parser) says it does,
//! bare-LF heads included.
//!
//! It also watches the responses hyper writes, so that:
//! - after an `Upgrade` (or CONNECT) request it holds further input until the
//!   response is known: a 101 (2xx for CONNECT) turns the connection into an
//!   opaque tunnel, anything else resumes checking the next request;
//! - a refused request is answered after every earlier pipelined response,
//!   never in front of them (and the earlier requests are not cut off).
//!
//! A framing error inside a request body (a bad chunk size) reaches hyper as a
//! read error of that body; the L7 service answers it 400 as a client error.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::metrics::{reject, FrontendMetrics};

/// Longest chunk-size line accepted (with extensions).
const MAX_CHUNK_LINE: usize = 4096;
/// Most header lines in one request.
const MAX_HEADERS: usize = 128;
/// Most header lines in a response head hyper writes (it copies the backend's).
const MAX_RESPONSE_HEADERS: usize = 512;
/// Largest response head followed; beyond it the tracker stops (fails open).
const MAX_RESPONSE_HEAD: usize = 1024 * 1024;

/// Where a stream of HTTP/1 messages is.
#[derive(Debug, PartialEq, Eq)]
enum Framing {
    /// Collecting a message head.
    Head,
    /// `n` body bytes left (Content-Length).
    Body(u64),
    /// Reading a chunk-size line (the bytes so far).
    ChunkSize(Vec<u8>),
    /// `n` bytes of chunk data left, then CRLF.
    ChunkData(u64),
    /// The CRLF after chunk data: how much of it was seen.
    ChunkEnd(u8),
    /// Trailer lines after the last chunk: the current line's bytes, and the total.
    Trailers { line: Vec<u8>, total: usize },
    /// A response whose body ends when the connection does.
    UntilClose,
    /// After a successful upgrade: the bytes are no longer HTTP.
    Passthrough,
}

/// What a released request means for its response.
#[derive(Debug, Clone, Copy)]
struct Sent {
    head: bool,
    upgrade: bool,
    connect: bool,
}

/// A refusal: status line and reason.
#[derive(Debug)]
struct Refusal(u16, &'static str, String);

pub struct H1Guard<S> {
    inner: S,
    /// Request side.
    req: Framing,
    head: Vec<u8>,
    /// Checked bytes not yet handed to hyper.
    out: Vec<u8>,
    out_pos: usize,
    /// Input read but not yet checked (held while an upgrade's answer is unknown).
    stash: Vec<u8>,
    /// The request being read (its head was checked).
    current: Option<Sent>,
    /// An upgrade request was released and its response is not yet known.
    awaiting_upgrade: bool,
    /// A refusal waiting for the earlier responses, then being written.
    refusal: Option<Refusal>,
    sending: Option<(Vec<u8>, usize)>,
    /// A framing error inside a body, reported to hyper as a read error.
    body_error: Option<String>,
    /// Response side: requests released whose response has not ended.
    sent: VecDeque<Sent>,
    resp: Framing,
    resp_head: Vec<u8>,
    /// The response stream could not be followed: stop waiting on it.
    resp_lost: bool,
    /// The task's waker while reading waits on a response.
    waiting: Option<Waker>,
    max_head: usize,
    metrics: FrontendMetrics,
    scratch: Box<[u8]>,
}

impl<S> H1Guard<S> {
    pub fn new(inner: S, max_head: usize, metrics: FrontendMetrics) -> Self {
        H1Guard {
            inner,
            req: Framing::Head,
            head: Vec::new(),
            out: Vec::new(),
            out_pos: 0,
            stash: Vec::new(),
            current: None,
            awaiting_upgrade: false,
            refusal: None,
            sending: None,
            body_error: None,
            sent: VecDeque::new(),
            resp: Framing::Head,
            resp_head: Vec::new(),
            resp_lost: false,
            waiting: None,
            max_head,
            metrics,
            scratch: vec![0u8; 16 * 1024].into_boxed_slice(),
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Consumes input, moving checked bytes to `out`; input that arrives
    /// while an upgrade's answer is pending goes to `stash`.
    fn feed(&mut self, mut data: &[u8]) -> Result<(), Refusal> {
        while !data.is_empty() {
            if self.awaiting_upgrade {
                self.stash.extend_from_slice(data);
                return Ok(());
            }
            match self.req {
                Framing::Passthrough => {
                    self.out.extend_from_slice(data);
                    return Ok(());
                }
                Framing::Head => {
                    let used = self.feed_head(data)?;
                    data = &data[used..];
                }
                _ => {
                    let used = body_step(&mut self.req, data, self.max_head).map_err(|why| {
                        self.body_error = Some(why.clone());
                        bad(&why)
                    })?;
                    self.out.extend_from_slice(&data[..used]);
                    data = &data[used..];
                    if self.req == Framing::Head {
                        self.message_done();
                    }
                }
            }
        }
        Ok(())
    }

    /// Collects head bytes; returns how many of `data` it used.
    fn feed_head(&mut self, data: &[u8]) -> Result<usize, Refusal> {
        let prev = self.head.len();
        self.head.extend_from_slice(data);
        let from = prev.saturating_sub(3);
        let end = if has_blank_line(&self.head[from..]) {
            self.check_head()?
        } else {
            None
        };
        let Some(end) = end else {
            if self.head.len() > self.max_head {
                return Err(too_large(self.max_head));
            }
            return Ok(data.len());
        };
        if end > self.max_head {
            return Err(too_large(self.max_head));
        }
        self.head.truncate(end);
        self.out.extend_from_slice(&self.head);
        self.head.clear();
        if self.req == Framing::Head {
            self.message_done();
        }
        Ok(end - prev)
    }

    /// A request message ended: its head was released to hyper.
    fn message_done(&mut self) {
        if let Some(s) = self.current.take() {
            self.sent.push_back(s);
            if s.upgrade {
                if self.resp_lost {
                    // Without the responses to follow, assume the upgrade.
                    self.req = Framing::Passthrough;
                } else {
                    self.awaiting_upgrade = true;
                }
            }
        }
    }

    /// Checks the collected head; `Ok(None)` while it is incomplete, else
    /// its length (and the body framing is set).
    fn check_head(&mut self) -> Result<Option<usize>, Refusal> {
        let Some(h) = inspect(&self.head)? else {
            return Ok(None);
        };
        self.current = Some(Sent {
            head: h.method == "HEAD",
            upgrade: h.upgrade,
            connect: h.method == "CONNECT",
        });
        self.req = h.body;
        Ok(Some(h.len))
    }

    /// Follows the response bytes hyper wrote.
    fn observe(&mut self, mut data: &[u8]) {
        while !data.is_empty() && !self.resp_lost {
            match self.resp {
                Framing::Passthrough | Framing::UntilClose => return,
                Framing::Head => {
                    let prev = self.resp_head.len();
                    self.resp_head.extend_from_slice(data);
                    match self.response_head() {
                        Ok(Some(end)) => {
                            data = &data[end - prev..];
                            self.resp_head.clear();
                        }
                        Ok(None) => return,
                        Err(()) => self.resp_lost = true,
                    }
                }
                _ => match body_step(&mut self.resp, data, MAX_RESPONSE_HEAD) {
                    Ok(used) => {
                        data = &data[used..];
                        if self.resp == Framing::Head {
                            self.sent.pop_front();
                        }
                    }
                    Err(_) => self.resp_lost = true,
                },
            }
        }
        if self.resp_lost {
            self.awaiting_upgrade = false;
        }
    }

    /// Parses a response head; `Ok(None)` while incomplete.
    fn response_head(&mut self) -> Result<Option<usize>, ()> {
        if self.resp_head.len() > MAX_RESPONSE_HEAD {
            return Err(());
        }
        if !has_blank_line(&self.resp_head) {
            return Ok(None);
        }
        let mut headers = vec![httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
        let mut r = httparse::Response::new(&mut headers);
        let end = match r.parse(&self.resp_head) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(_) => return Err(()),
        };
        let code = r.code.ok_or(())?;
        let sent = *self.sent.front().ok_or(())?;
        if (100..200).contains(&code) && code != 101 {
            return Ok(Some(end)); // interim (100 Continue): the final one follows
        }
        let tunnel = sent.upgrade && (code == 101 || (sent.connect && (200..300).contains(&code)));
        if sent.upgrade {
            self.awaiting_upgrade = false;
            if tunnel {
                self.req = Framing::Passthrough;
                self.resp = Framing::Passthrough;
                self.sent.clear();
                return Ok(Some(end));
            }
        }
        let header = |name: &str| {
            r.headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .and_then(|h| std::str::from_utf8(h.value).ok())
        };
        self.resp = if sent.head || code == 204 || code == 304 {
            Framing::Head
        } else if header("transfer-encoding").is_some() {
            Framing::ChunkSize(Vec::new())
        } else if let Some(cl) = header("content-length") {
            match cl.trim().parse::<u64>().map_err(|_| ())? {
                0 => Framing::Head,
                n => Framing::Body(n),
            }
        } else {
            Framing::UntilClose
        };
        if self.resp == Framing::Head {
            self.sent.pop_front();
        }
        Ok(Some(end))
    }

    /// Whether a refusal may go out: every earlier response has ended.
    fn earlier_answered(&self) -> bool {
        self.sent.is_empty() || self.resp_lost
    }

    fn refusal_bytes(&self, r: &Refusal) -> Vec<u8> {
        let Refusal(code, text, why) = r;
        let body = format!("{why}\n");
        format!(
            "HTTP/1.1 {code} {text}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }

    /// Counts a client framing error; a refused head is answered (after the
    /// earlier responses), a body error ends the body hyper is reading.
    fn refuse(&mut self, r: Refusal) {
        self.metrics.rejected(reject::BAD_REQUEST);
        tracing::debug!(code = r.0, reason = %r.2, "refused a malformed HTTP/1 request");
        if self.body_error.is_none() {
            self.refusal = Some(r);
        }
    }
}

/// A request head as the guard read it.
#[derive(Debug)]
pub struct CheckedHead {
    /// Bytes of the head, up to and including its empty line.
    pub len: usize,
    pub method: String,
    /// The request target as written.
    pub target: String,
    /// Header lines in order: name as written, raw value.
    pub headers: Vec<(String, Vec<u8>)>,
    upgrade: bool,
    body: Framing,
}

/// What the guard makes of the bytes at the start of a request.
#[derive(Debug)]
pub enum Verdict {
    /// No complete head yet.
    Partial,
    /// Refused with this status (400 or 431).
    Refused(u16),
    Accepted(CheckedHead),
}

/// Checks one request head at the start of `buf` (no size limit applied):
/// the pure core of the guard, public for property tests.
pub fn inspect_head(buf: &[u8]) -> Verdict {
    match inspect(buf) {
        Ok(None) => Verdict::Partial,
        Ok(Some(h)) => Verdict::Accepted(h),
        Err(Refusal(code, ..)) => Verdict::Refused(code),
    }
}

fn inspect(buf: &[u8]) -> Result<Option<CheckedHead>, Refusal> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Refusal(
                431,
                "Request Header Fields Too Large",
                format!("more than {MAX_HEADERS} header lines"),
            ))
        }
        Err(e) => return Err(bad(&format!("malformed request: {e}"))),
    };
    let target = req.path.unwrap_or_default();
    if target.contains('#') {
        // Not part of a request target (RFC 9112 3.2); hyper would drop it
        // silently, so the request logged would not be the one sent.
        return Err(bad("a fragment (#) in the request target"));
    }
    let mut content_length: Option<u64> = None;
    let mut te_seen = false;
    let mut upgrade = req.method == Some("CONNECT");
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let v = std::str::from_utf8(h.value)
                .ok()
                .map(str::trim)
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| bad("invalid Content-Length"))?;
            if content_length.is_some_and(|c| c != v) {
                return Err(bad("differing Content-Length headers"));
            }
            content_length = Some(v);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            let chunked = std::str::from_utf8(h.value)
                .map(|v| v.trim().eq_ignore_ascii_case("chunked"))
                .unwrap_or(false);
            if te_seen || !chunked {
                return Err(bad(
                    "unsupported Transfer-Encoding (only one, \"chunked\", is accepted)",
                ));
            }
            te_seen = true;
        } else if h.name.eq_ignore_ascii_case("upgrade") {
            upgrade = true;
        }
    }
    if te_seen && content_length.is_some() {
        return Err(bad("both Content-Length and Transfer-Encoding"));
    }
    let body = if te_seen {
        Framing::ChunkSize(Vec::new())
    } else {
        match content_length {
            Some(n) if n > 0 => Framing::Body(n),
            _ => Framing::Head,
        }
    };
    Ok(Some(CheckedHead {
        len,
        method: req.method.unwrap_or_default().to_string(),
        target: target.to_string(),
        headers: req
            .headers
            .iter()
            .map(|h| (h.name.to_string(), h.value.to_vec()))
            .collect(),
        upgrade,
        body,
    }))
}

/// Whether `b` holds an empty line (CRLF CRLF, or bare-LF forms httparse takes).
fn has_blank_line(b: &[u8]) -> bool {
    b.windows(2).any(|w| w == b"\n\n") || b.windows(3).any(|w| w == b"\n\r\n")
}

fn bad(why: &str) -> Refusal {
    Refusal(400, "Bad Request", why.to_string())
}

fn too_large(max: usize) -> Refusal {
    Refusal(
        431,
        "Request Header Fields Too Large",
        format!("request header larger than {max} bytes"),
    )
}

/// Advances body framing over `data`; returns how many bytes belong to the
/// message. Sets `*f` to `Head` when the message ends.
fn body_step(f: &mut Framing, data: &[u8], max_trailers: usize) -> Result<usize, String> {
    let mut used = 0;
    while used < data.len() && *f != Framing::Head {
        let rest = &data[used..];
        match f {
            Framing::Body(n) | Framing::ChunkData(n) => {
                let k = (*n).min(rest.len() as u64);
                *n -= k;
                used += k as usize;
                if *n == 0 {
                    *f = match f {
                        Framing::Body(_) => Framing::Head,
                        _ => Framing::ChunkEnd(0),
                    };
                }
            }
            Framing::ChunkEnd(seen) => {
                let want = [b'\r', b'\n'][*seen as usize];
                if rest[0] != want {
                    return Err("chunk data not followed by CRLF".into());
                }
                used += 1;
                *seen += 1;
                if *seen == 2 {
                    *f = Framing::ChunkSize(Vec::new());
                }
            }
            Framing::ChunkSize(line) => {
                let (take, done) = line_part(rest);
                line.extend_from_slice(&rest[..take]);
                used += take;
                if line.len() > MAX_CHUNK_LINE {
                    return Err("chunk size line too long".into());
                }
                if done {
                    *f = match parse_chunk_size(line) {
                        Some(0) => Framing::Trailers {
                            line: Vec::new(),
                            total: 0,
                        },
                        Some(n) => Framing::ChunkData(n),
                        None => return Err("invalid chunk size".into()),
                    };
                }
            }
            Framing::Trailers { line, total } => {
                let (take, done) = line_part(rest);
                line.extend_from_slice(&rest[..take]);
                used += take;
                *total += take;
                if *total > max_trailers {
                    return Err("trailers too large".into());
                }
                if done {
                    if !line.ends_with(b"\r\n") {
                        return Err("bare LF in trailers".into());
                    }
                    if line.len() == 2 {
                        *f = Framing::Head;
                    } else {
                        line.clear();
                    }
                }
            }
            Framing::Head | Framing::UntilClose | Framing::Passthrough => break,
        }
    }
    Ok(used)
}

/// How much of `b` belongs to the current line, and whether it ends there.
fn line_part(b: &[u8]) -> (usize, bool) {
    match b.iter().position(|&c| c == b'\n') {
        Some(p) => (p + 1, true),
        None => (b.len(), false),
    }
}

/// A chunk-size line: 1-16 hex digits, optional spaces or tabs, optional
/// `;extensions`, CRLF. Nothing else (no sign, no `0x`, no bare LF).
fn parse_chunk_size(line: &[u8]) -> Option<u64> {
    let line = line.strip_suffix(b"\r\n")?;
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 {
        return None;
    }
    let rest = &line[digits..];
    let ws = rest
        .iter()
        .take_while(|&&b| b == b' ' || b == b'\t')
        .count();
    let rest = &rest[ws..];
    if !rest.is_empty() && (rest[0] != b';' || rest.iter().any(|&b| b < 0x20 && b != b'\t')) {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(&line[..digits]).ok()?, 16).ok()
}

impl<S: AsyncRead + AsyncWrite + Unpin> H1Guard<S> {
    /// Writes the pending refusal once every earlier response has ended;
    /// then reads end (hyper closes).
    fn poll_refusal(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.sending.is_none() {
            if !self.earlier_answered() {
                self.waiting = Some(cx.waker().clone());
                return Poll::Pending;
            }
            let r = self.refusal.as_ref().expect("a refusal is pending");
            self.sending = Some((self.refusal_bytes(r), 0));
        }
        let (resp, pos) = self.sending.as_mut().expect("set above");
        while *pos < resp.len() {
            match Pin::new(&mut self.inner).poll_write(cx, &resp[*pos..]) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(n)) => *pos += n,
                Poll::Pending => return Poll::Pending,
            }
        }
        let _ = Pin::new(&mut self.inner).poll_flush(cx);
        Poll::Ready(Ok(()))
    }

    fn after_write(&mut self, written: &[u8]) {
        if self.resp != Framing::Passthrough {
            self.observe(written);
        }
        if let Some(w) = self.waiting.take() {
            w.wake();
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for H1Guard<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        loop {
            if me.out_pos < me.out.len() {
                let n = (me.out.len() - me.out_pos).min(buf.remaining());
                buf.put_slice(&me.out[me.out_pos..me.out_pos + n]);
                me.out_pos += n;
                if me.out_pos == me.out.len() {
                    me.out.clear();
                    me.out_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if let Some(why) = &me.body_error {
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, why.clone())));
            }
            if me.refusal.is_some() {
                return me.poll_refusal(cx);
            }
            if me.awaiting_upgrade {
                me.waiting = Some(cx.waker().clone());
                return Poll::Pending;
            }
            if !me.stash.is_empty() {
                let data = std::mem::take(&mut me.stash);
                if let Err(r) = me.feed(&data) {
                    me.refuse(r);
                }
                continue;
            }
            let mut rb = ReadBuf::new(&mut me.scratch);
            match Pin::new(&mut me.inner).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    if n == 0 {
                        return Poll::Ready(Ok(())); // EOF
                    }
                    let data = me.scratch[..n].to_vec();
                    if let Err(r) = me.feed(&data) {
                        me.refuse(r);
                    }
                }
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for H1Guard<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        let r = Pin::new(&mut me.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            me.after_write(&buf[..n]);
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        let r = Pin::new(&mut me.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(mut n)) = r {
            for b in bufs {
                if n == 0 {
                    break;
                }
                let k = n.min(b.len());
                me.after_write(&b[..k]);
                n -= k;
            }
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper::body::Incoming;
    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt};

    /// Serves `input` with hyper behind a guard (head limit 1024); returns
    /// what the client receives. Each response body is "METHOD URI BODY".
    async fn serve(input: &[u8]) -> String {
        let (mut client, server) = duplex(1 << 20);
        let m = crate::metrics::Metrics::new().frontend("t");
        let g = H1Guard::new(server, 1024, m);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(|req: hyper::Request<Incoming>| async move {
                let line = format!("{} {}", req.method(), req.uri());
                let text = match req.into_body().collect().await {
                    Ok(b) => format!("{line} {:?}", b.to_bytes()),
                    Err(_) => format!("{line} body-error"),
                };
                Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(Bytes::from(
                    text,
                ))))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .half_close(true)
                .serve_connection(hyper_util::rt::TokioIo::new(g), svc)
                .with_upgrades()
                .await;
        });
        client.write_all(input).await.unwrap();
        client.shutdown().await.unwrap();
        let mut back = Vec::new();
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            client.read_to_end(&mut back),
        )
        .await
        .expect("the connection ends")
        .unwrap();
        String::from_utf8_lossy(&back).into_owned()
    }

    fn statuses(text: &str) -> Vec<&str> {
        text.match_indices("HTTP/1.1 ")
            .map(|(i, _)| &text[i + 9..i + 12])
            .collect()
    }

    #[tokio::test]
    async fn clean_keepalive_requests_pass_whole() {
        let input = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhelloGET /b HTTP/1.1\r\nHost: x\r\n\r\nPOST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5 ;ext=1\r\nhello\r\n0\r\nX-T: 1\r\n\r\nGET /d HTTP/1.1\r\nHost: x\r\n\r\n";
        let back = serve(input).await;
        assert_eq!(statuses(&back), ["200", "200", "200", "200"], "{back}");
        for want in [
            "POST /a b\"hello\"",
            "GET /b b\"\"",
            "POST /c b\"hello\"",
            "GET /d",
        ] {
            assert!(back.contains(want), "{want}: {back}");
        }
    }

    /// The shapes hyper 1.x accepts by itself, refused before it sees them.
    #[tokio::test]
    async fn shapes_hyper_accepts_are_refused() {
        for req in [
            &b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ] {
            let back = serve(req).await;
            assert_eq!(statuses(&back), ["400"], "{}: {back}", String::from_utf8_lossy(req));
            assert!(!back.contains("POST /"), "hyper must not see it: {back}");
        }
        let big = format!(
            "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
            "a".repeat(2000)
        );
        assert_eq!(statuses(&serve(big.as_bytes()).await), ["431"]);
        // hyper would serve this as `GET /`, the fragment dropped.
        let back = serve(b"GET /#x HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert_eq!(statuses(&back), ["400"], "{back}");
        assert!(!back.contains("GET /"), "hyper must not see it: {back}");
    }

    /// Point 11: a second request behind a bare-LF head is checked too, and
    /// the refusal comes after the first answer.
    #[tokio::test]
    async fn a_bare_lf_head_carries_nothing_past_the_check() {
        let back = serve(b"GET /a HTTP/1.1\nHost: x\n\nPOST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n").await;
        assert_eq!(statuses(&back), ["200", "400"], "{back}");
        assert!(
            back.contains("GET /a") && !back.contains("POST /b"),
            "{back}"
        );
    }

    /// Point 11: an upgrade the server declines leaves the connection HTTP,
    /// and the next request is checked.
    #[tokio::test]
    async fn a_declined_upgrade_keeps_checking() {
        let back = serve(b"GET /exec HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n\r\nPOST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n").await;
        assert_eq!(statuses(&back), ["200", "400"], "{back}");
        assert!(!back.contains("POST /b"), "{back}");
    }

    /// Point 11: a bad chunk size fails the body (the service answers it),
    /// it never frames differently from hyper.
    #[tokio::test]
    async fn bad_chunk_sizes_fail_the_body() {
        for size in ["+5", "0x5", " 5", "5\n", "-5"] {
            let req = format!("POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{size}\r\nhello\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n");
            let back = serve(req.as_bytes()).await;
            assert!(back.contains("POST /c body-error"), "{size:?}: {back}");
            assert!(!back.contains("/smuggled"), "{size:?}: {back}");
        }
    }

    #[test]
    fn chunk_size_lines() {
        for (line, want) in [
            (&b"5\r\n"[..], Some(5)),
            (b"1F;name=v\r\n", Some(31)),
            (b"a \t;x\r\n", Some(10)),
            (b"+5\r\n", None),
            (b"0x5\r\n", None),
            (b"5\n", None),
            (b"5 x\r\n", None),
            (b"11111111111111111\r\n", None),
        ] {
            assert_eq!(
                parse_chunk_size(line),
                want,
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
    }
}
