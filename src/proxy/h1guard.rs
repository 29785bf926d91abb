//! Checks every HTTP/1 request head before hyper sees it and refuses the
//! shapes used for request smuggling or header floods: Content-Length together
//! with Transfer-Encoding, differing Content-Lengths, any Transfer-Encoding but
//! `chunked`, and heads over the size limit (400 or 431, then close).
//!
//! It follows body framing (Content-Length, chunked) so that every request of
//! a keep-alive connection is checked, not only the first. Head bytes are held
//! back until the head is complete and valid; body bytes pass straight on.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::metrics::{reject, FrontendMetrics};

/// Longest chunk-size line accepted (with extensions).
const MAX_CHUNK_LINE: usize = 4096;
/// Most header lines in one request.
const MAX_HEADERS: usize = 128;

#[derive(Debug)]
enum Framing {
    /// Collecting a request head.
    Head,
    /// `n` body bytes left (Content-Length).
    Body(u64),
    /// Reading a chunk-size line (its length so far).
    ChunkSize(usize, Vec<u8>),
    /// `n` bytes of chunk data left, then CRLF.
    ChunkData(u64),
    /// The CRLF after chunk data (bytes of it left).
    ChunkEnd(u8),
    /// Trailer lines after the last chunk; `line` is the current line's length.
    Trailers { line: usize, total: usize },
    /// After an upgrade request: the bytes are no longer HTTP.
    Passthrough,
}

/// A refusal: status line and reason.
struct Refusal(u16, &'static str, String);

pub struct H1Guard<S> {
    inner: S,
    framing: Framing,
    /// The request head being collected.
    head: Vec<u8>,
    /// Checked bytes not yet handed to hyper.
    out: Vec<u8>,
    out_pos: usize,
    /// A refusal being written to the client, and how much of it is out.
    refusal: Option<(Vec<u8>, usize)>,
    /// Whether the request being read asked for an upgrade.
    upgrade: bool,
    max_head: usize,
    metrics: FrontendMetrics,
    scratch: Box<[u8]>,
}

impl<S> H1Guard<S> {
    pub fn new(inner: S, max_head: usize, metrics: FrontendMetrics) -> Self {
        H1Guard {
            inner,
            framing: Framing::Head,
            head: Vec::new(),
            out: Vec::new(),
            out_pos: 0,
            refusal: None,
            upgrade: false,
            max_head,
            metrics,
            scratch: vec![0u8; 16 * 1024].into_boxed_slice(),
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Consumes input, moving checked bytes to `out`.
    fn feed(&mut self, mut data: &[u8]) -> Result<(), Refusal> {
        while !data.is_empty() {
            match &mut self.framing {
                Framing::Passthrough => {
                    self.out.extend_from_slice(data);
                    return Ok(());
                }
                Framing::Head => {
                    let prev = self.head.len();
                    self.head.extend_from_slice(data);
                    let from = prev.saturating_sub(3);
                    let Some(end) = find_head_end(&self.head[from..]).map(|e| e + from) else {
                        if self.head.len() > self.max_head {
                            return Err(too_large(self.max_head));
                        }
                        return Ok(());
                    };
                    if end > self.max_head {
                        return Err(too_large(self.max_head));
                    }
                    data = &data[end - prev..];
                    self.head.truncate(end);
                    let next = self.check_head()?;
                    self.out.extend_from_slice(&self.head);
                    self.head.clear();
                    self.framing = next;
                    self.after_message_if_done();
                }
                Framing::Body(n) => {
                    let k = (*n).min(data.len() as u64) as usize;
                    self.out.extend_from_slice(&data[..k]);
                    *n -= k as u64;
                    data = &data[k..];
                    self.after_message_if_done();
                }
                Framing::ChunkSize(len, line) => {
                    let nl = data.iter().position(|&b| b == b'\n');
                    let take = nl.map_or(data.len(), |p| p + 1);
                    *len += take;
                    if *len > MAX_CHUNK_LINE {
                        return Err(bad("chunk size line too long"));
                    }
                    line.extend_from_slice(&data[..take]);
                    self.out.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    if nl.is_some() {
                        let size =
                            parse_chunk_size(line).ok_or_else(|| bad("invalid chunk size"))?;
                        self.framing = if size == 0 {
                            Framing::Trailers { line: 0, total: 0 }
                        } else {
                            Framing::ChunkData(size)
                        };
                    }
                }
                Framing::ChunkData(n) => {
                    let k = (*n).min(data.len() as u64) as usize;
                    self.out.extend_from_slice(&data[..k]);
                    *n -= k as u64;
                    data = &data[k..];
                    if *n == 0 {
                        self.framing = Framing::ChunkEnd(2);
                    }
                }
                Framing::ChunkEnd(left) => {
                    let k = (*left as usize).min(data.len());
                    self.out.extend_from_slice(&data[..k]);
                    *left -= k as u8;
                    data = &data[k..];
                    if *left == 0 {
                        self.framing = Framing::ChunkSize(0, Vec::new());
                    }
                }
                Framing::Trailers { line, total } => {
                    let nl = data.iter().position(|&b| b == b'\n');
                    let take = nl.map_or(data.len(), |p| p + 1);
                    *total += take;
                    if *total > self.max_head {
                        return Err(too_large(self.max_head));
                    }
                    self.out.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    match nl {
                        // An empty line ("\r\n" or "\n") ends the message.
                        Some(p) if *line + p <= 1 => {
                            self.framing = Framing::Head;
                            self.after_message_if_done();
                        }
                        Some(_) => *line = 0,
                        None => *line += take,
                    }
                }
            }
        }
        Ok(())
    }

    /// At the end of a message: the next one is a head, or opaque after an upgrade.
    fn after_message_if_done(&mut self) {
        let done = matches!(self.framing, Framing::Body(0) | Framing::Head);
        if done {
            self.framing = if self.upgrade {
                Framing::Passthrough
            } else {
                Framing::Head
            };
        }
    }

    /// Checks the collected head; returns how its body is framed.
    fn check_head(&mut self) -> Result<Framing, Refusal> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&self.head) {
            Ok(httparse::Status::Complete(_)) => {}
            Ok(httparse::Status::Partial) => return Err(bad("incomplete request head")),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(Refusal(
                    431,
                    "Request Header Fields Too Large",
                    format!("more than {MAX_HEADERS} header lines"),
                ))
            }
            Err(e) => return Err(bad(&format!("malformed request: {e}"))),
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
        if te_seen && req.version == Some(0) {
            return Err(bad("Transfer-Encoding in an HTTP/1.0 request"));
        }
        self.upgrade = upgrade;
        Ok(if te_seen {
            Framing::ChunkSize(0, Vec::new())
        } else {
            match content_length {
                Some(n) if n > 0 => Framing::Body(n),
                _ => Framing::Head,
            }
        })
    }

    fn refuse(&mut self, r: Refusal) {
        let Refusal(code, text, why) = r;
        self.metrics.rejected(reject::BAD_REQUEST);
        tracing::debug!(code, reason = %why, "refused a malformed HTTP/1 request");
        let body = format!("{why}\n");
        let resp = format!(
            "HTTP/1.1 {code} {text}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        self.refusal = Some((resp.into_bytes(), 0));
    }
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

fn find_head_end(b: &[u8]) -> Option<usize> {
    b.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

fn parse_chunk_size(line: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(line).ok()?;
    let s = s.trim_end_matches(['\r', '\n']);
    let hex = s.split(';').next()?.trim();
    if hex.is_empty() || hex.len() > 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
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
            if let Some((resp, pos)) = &mut me.refusal {
                // Checked bytes went first; now the refusal, then EOF so
                // hyper closes (it reads a new head only after answering).
                while *pos < resp.len() {
                    match Pin::new(&mut me.inner).poll_write(cx, &resp[*pos..]) {
                        Poll::Ready(Ok(0)) => return Poll::Ready(Ok(())),
                        Poll::Ready(Ok(n)) => *pos += n,
                        Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
                        Poll::Pending => return Poll::Pending,
                    }
                }
                let _ = Pin::new(&mut me.inner).poll_flush(cx);
                return Poll::Ready(Ok(()));
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

impl<S: AsyncWrite + Unpin> AsyncWrite for H1Guard<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
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
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt};

    /// Feeds `input` through a guard; returns what hyper would read and what
    /// the client would receive.
    async fn run(input: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let (mut client, server) = duplex(1 << 20);
        client.write_all(input).await.unwrap();
        client.shutdown().await.unwrap();
        let m = crate::metrics::Metrics::new().frontend("t");
        let mut g = H1Guard::new(server, 1024, m);
        let mut seen = Vec::new();
        g.read_to_end(&mut seen).await.unwrap();
        drop(g);
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        (seen, back)
    }

    #[tokio::test]
    async fn clean_keepalive_requests_pass_whole() {
        let input = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhelloGET /b HTTP/1.1\r\nHost: x\r\n\r\nPOST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-T: 1\r\n\r\nGET /d HTTP/1.1\r\nHost: x\r\n\r\n";
        let (seen, back) = run(input).await;
        assert_eq!(seen, input);
        assert!(back.is_empty());
    }

    #[tokio::test]
    async fn smuggling_shapes_are_refused_before_hyper_sees_them() {
        for (req, code) in [
            (&b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"[..], "400"),
            (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde", "400"),
            (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", "400"),
            (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", "400"),
            (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", "400"),
        ] {
            let (seen, back) = run(req).await;
            assert!(seen.is_empty(), "hyper must see nothing of {:?}", String::from_utf8_lossy(req));
            assert!(String::from_utf8_lossy(&back).starts_with(&format!("HTTP/1.1 {code}")), "{}", String::from_utf8_lossy(&back));
        }
        let big = format!(
            "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
            "a".repeat(2000)
        );
        let (seen, back) = run(big.as_bytes()).await;
        assert!(seen.is_empty());
        assert!(String::from_utf8_lossy(&back).starts_with("HTTP/1.1 431"));
    }

    #[tokio::test]
    async fn a_bad_second_request_is_caught_after_a_good_first() {
        let input = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabcPOST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let (seen, back) = run(input).await;
        assert_eq!(
            seen,
            b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
        );
        assert!(String::from_utf8_lossy(&back).starts_with("HTTP/1.1 400"));
    }

    #[tokio::test]
    async fn upgrades_switch_to_passthrough() {
        let input = b"GET /exec HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n\r\n\x00\x01binary Content-Length: 1\r\nTransfer-Encoding: x\r\n\r\n";
        let (seen, back) = run(input).await;
        assert_eq!(seen, input);
        assert!(back.is_empty());
    }
}
