//! HTTP/2 bodies both ways, shared by the client and the upstream side: a
//! peer's DATA and trailers as an http `Body` (flow-control window given back
//! as data is taken), and a `Body` copied onto a stream within its window.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tracing::debug;

/// Errors of bodies and requests, whichever library raised them.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Most data queued per HTTP/2 stream for sending, toward clients and
/// backends alike.
pub const MAX_SEND_BUF: usize = 64 * 1024;

/// A body from a peer over either protocol: a client's request or a
/// backend's response. HTTP/2 data gives its flow-control window back as it
/// is taken, then trailers follow.
pub enum PeerBody {
    H1(Incoming),
    H2(h2::RecvStream),
}

impl Body for PeerBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            PeerBody::H1(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            PeerBody::H2(r) => {
                // No `is_end_stream` first: each call into the stream takes
                // its connection's lock, and an ended stream's data is None.
                match std::task::ready!(r.poll_data(cx)) {
                    Some(Ok(d)) => {
                        let _ = r.flow_control().release_capacity(d.len());
                        return Poll::Ready(Some(Ok(Frame::data(d))));
                    }
                    Some(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
                    None => {}
                }
                r.poll_trailers(cx).map(|t| {
                    t.transpose()
                        .map(|t| t.map(Frame::trailers).map_err(Into::into))
                })
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            PeerBody::H1(b) => b.is_end_stream(),
            PeerBody::H2(r) => r.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            PeerBody::H1(b) => b.size_hint(),
            PeerBody::H2(_) => SizeHint::default(),
        }
    }
}

/// Copies a body onto its HTTP/2 stream within the stream's send window.
/// The last data frame carries END_STREAM when the body says it is the last;
/// a broken body, or a stream the peer reset, ends it with RST_STREAM
/// `reset` (a reset from the peer drops the body at once).
///
/// A chunk goes to h2's queue once the stream has any send capacity: h2
/// queues what does not fit yet (its send buffer is bounded, and
/// `poll_capacity` waits for it to drain). Claiming one byte rather than
/// the chunk's length keeps a stream that cannot send from pinning the
/// connection's window. A body's first chunk goes at once: nothing of the
/// stream is queued yet, and waiting would only keep the same bytes here
/// instead of there; the wait before the next chunk still holds a slow
/// reader's stream to one queued chunk (skipping it for the first: ~550
/// instructions per request fewer).
///
/// Written by hand rather than as an `async fn`: every open stream (each
/// watch, for as long as it lasts) holds this state, and the compiler's
/// version of it took ~500 bytes more.
pub fn pipe<B>(body: B, tx: h2::SendStream<Bytes>, reset: h2::Reason) -> Pipe<B> {
    Pipe {
        body,
        tx,
        reset,
        first: true,
        held: None,
    }
}

/// The future [`pipe`] returns.
pub struct Pipe<B> {
    body: B,
    tx: h2::SendStream<Bytes>,
    reset: h2::Reason,
    /// No data frame of the body has come yet.
    first: bool,
    /// A chunk, and whether it ends the body, waiting for send capacity.
    held: Option<(Bytes, bool)>,
}

impl<B> Future for Pipe<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        match std::task::ready!(this.step(cx)) {
            Ok(()) => Poll::Ready(()),
            Err(e) => {
                debug!(error = %e, "an HTTP/2 body ended early");
                this.tx.send_reset(this.reset);
                Poll::Ready(())
            }
        }
    }
}

impl<B> Pipe<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    /// Sends the held chunk, if any, once the stream has any send capacity:
    /// true when it ended the body.
    fn poll_held(&mut self, cx: &mut Context<'_>) -> Poll<Result<bool, BoxError>> {
        let Some((data, eos)) = self.held.take() else {
            return Poll::Ready(Ok(false));
        };
        self.tx.reserve_capacity(1);
        while self.tx.capacity() == 0 {
            match self.tx.poll_capacity(cx) {
                Poll::Pending => {
                    self.held = Some((data, eos));
                    return Poll::Pending;
                }
                Poll::Ready(Some(n)) => {
                    n?;
                }
                Poll::Ready(None) => return Poll::Ready(Err("the stream closed".into())),
            }
        }
        self.tx.send_data(data, eos)?;
        Poll::Ready(Ok(eos))
    }

    /// Moves the body on until it ends, breaks, or has to wait.
    fn step(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        loop {
            if std::task::ready!(self.poll_held(cx))? {
                return Poll::Ready(Ok(()));
            }
            let frame = match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Ready(f) => f,
                Poll::Pending => {
                    return match self.tx.poll_reset(cx) {
                        Poll::Ready(r) => {
                            Poll::Ready(Err(format!("the peer reset the stream: {r:?}").into()))
                        }
                        Poll::Pending => Poll::Pending,
                    };
                }
            };
            let Some(frame) = frame else {
                self.tx.send_data(Bytes::new(), true)?;
                return Poll::Ready(Ok(()));
            };
            match frame.map_err(Into::into)?.into_data() {
                Ok(data) => {
                    let eos = self.body.is_end_stream();
                    let first = std::mem::take(&mut self.first);
                    if data.is_empty() || first {
                        if !data.is_empty() || eos {
                            self.tx.send_data(data, eos)?;
                        }
                        if eos {
                            return Poll::Ready(Ok(()));
                        }
                    } else {
                        self.held = Some((data, eos));
                    }
                }
                Err(f) => {
                    if let Ok(t) = f.into_trailers() {
                        self.tx.send_trailers(t)?;
                        return Poll::Ready(Ok(()));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every open stream (each watch, for as long as it lasts) holds one:
    /// the body, the stream handle and at most one chunk. The `async fn`
    /// it replaced held ~500 bytes more (docs/performance.md, round 17).
    #[test]
    fn a_pipe_holds_little_beside_its_body() {
        let own = std::mem::size_of::<Pipe<http_body_util::Empty<Bytes>>>();
        assert!(own <= 96, "a pipe holds {own} bytes besides its body");
    }
}
