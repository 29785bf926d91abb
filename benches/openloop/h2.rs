//! The HTTP/2 client side of the open-loop generator, framed by hand: GETs
//! go out as HEADERS frames whose header block uses no dynamic table, and
//! responses are followed by frame type, flags and stream id alone (no
//! header decoding: `:status 200`, static-table entry 8, is the block's
//! first byte from nghttpd, HAProxy and h2 alike, and anything else is an
//! error). Every stream stays well inside the windows this client grants,
//! so the only limit on a connection is its streams in flight.

use std::collections::HashMap;
use std::io;

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The receive window this client grants, per stream and per connection.
const WINDOW: u32 = 1 << 30;

/// One connection's HTTP/2 state: the streams in flight and what they were
/// due, and the received DATA not yet given back to the connection window.
pub struct Session {
    block: Vec<u8>,
    next_id: u32,
    max_streams: usize,
    /// Stream id -> (due time, slice) of each request in flight.
    inflight: HashMap<u32, (u64, u64)>,
    /// DATA bytes received since the last connection WINDOW_UPDATE.
    unacked: u32,
}

impl Session {
    /// GET `path` at `authority` over `https`, at most `max_streams` at once.
    pub fn new(path: &str, authority: &str, max_streams: usize) -> Self {
        // :method GET (static 2), :scheme https (7), then :path (name 4) and
        // :authority (name 1) as literals without indexing.
        let mut block = vec![0x82, 0x87];
        for (name, value) in [(4u8, path), (1, authority)] {
            assert!(value.len() < 127, "header value too long for this encoder");
            block.extend([name, value.len() as u8]);
            block.extend_from_slice(value.as_bytes());
        }
        Session {
            block,
            next_id: 1,
            max_streams,
            inflight: HashMap::new(),
            unacked: 0,
        }
    }

    /// The client's preface: magic, SETTINGS (no push, large stream
    /// windows) and a large connection window.
    pub fn preface(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        let mut s = Vec::new();
        for (id, v) in [(0x2u16, 0u32), (0x4, WINDOW)] {
            s.extend(id.to_be_bytes());
            s.extend(v.to_be_bytes());
        }
        frame(out, SETTINGS, 0, 0, &s);
        frame(out, WINDOW_UPDATE, 0, 0, &(WINDOW - 65_535).to_be_bytes());
    }

    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    pub fn has_room(&self) -> bool {
        self.inflight.len() < self.max_streams
    }

    /// Appends a GET on a new stream, remembering what it was due.
    pub fn request(&mut self, due: (u64, u64), out: &mut Vec<u8>) {
        let id = self.next_id;
        self.next_id += 2;
        frame(out, HEADERS, END_HEADERS | END_STREAM, id, &self.block);
        self.inflight.insert(id, due);
    }

    /// Consumes the whole frames at the front of `buf`, appends what must
    /// be answered (SETTINGS and PING acknowledgements, window updates) to
    /// `out`, and calls `done` with the due of every stream that ended.
    pub fn receive(
        &mut self,
        buf: &mut Vec<u8>,
        out: &mut Vec<u8>,
        mut done: impl FnMut((u64, u64)),
    ) -> io::Result<()> {
        let mut at = 0;
        while buf.len() >= at + 9 {
            let h = &buf[at..at + 9];
            let len = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
            let (kind, flags) = (h[3], h[4]);
            let id = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
            if buf.len() < at + 9 + len {
                break;
            }
            let payload = &buf[at + 9..at + 9 + len];
            self.frame_in(kind, flags, id, payload, out, &mut done)?;
            at += 9 + len;
        }
        buf.drain(..at);
        Ok(())
    }

    fn frame_in(
        &mut self,
        kind: u8,
        flags: u8,
        id: u32,
        payload: &[u8],
        out: &mut Vec<u8>,
        done: &mut impl FnMut((u64, u64)),
    ) -> io::Result<()> {
        match kind {
            DATA => {
                self.unacked += payload.len() as u32;
                if self.unacked >= WINDOW / 2 {
                    frame(out, WINDOW_UPDATE, 0, 0, &self.unacked.to_be_bytes());
                    self.unacked = 0;
                }
            }
            HEADERS if !self.inflight.contains_key(&id) => {}
            HEADERS => check_status(flags, payload, id)?,
            SETTINGS if flags & ACK == 0 => frame(out, SETTINGS, ACK, 0, &[]),
            PING if flags & ACK == 0 => frame(out, PING, ACK, 0, payload),
            RST_STREAM => return Err(io::Error::other(format!("stream {id} was reset"))),
            GOAWAY => return Err(io::Error::other("the server sent GOAWAY")),
            // CONTINUATION, WINDOW_UPDATE, acknowledgements: nothing to do.
            _ => {}
        }
        if matches!(kind, DATA | HEADERS) && flags & END_STREAM != 0 {
            let due = self.inflight.remove(&id).ok_or_else(|| {
                io::Error::other(format!("stream {id} ended but was not in flight"))
            })?;
            done(due);
        }
        Ok(())
    }
}

/// A response's first HEADERS: the block must open with `:status 200`.
fn check_status(flags: u8, payload: &[u8], id: u32) -> io::Result<()> {
    let mut at = 0;
    if flags & PADDED != 0 {
        at += 1;
    }
    if flags & PRIORITY != 0 {
        at += 5;
    }
    match payload.get(at) {
        Some(0x88) => Ok(()),
        b => Err(io::Error::other(format!(
            "stream {id}: response is not 200 (header block starts {b:x?})"
        ))),
    }
}

fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, id: u32, payload: &[u8]) {
    out.extend(&(payload.len() as u32).to_be_bytes()[1..]);
    out.extend([kind, flags]);
    out.extend(id.to_be_bytes());
    out.extend_from_slice(payload);
}
