//! HTTP/2 bodies both ways, shared by the client and the upstream side: a
//! peer's DATA and trailers as an http `Body` (flow-control window given back
//! as data is taken), and a `Body` copied onto a stream within its window.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::BodyExt;
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
pub async fn pipe<B>(mut body: B, mut tx: h2::SendStream<Bytes>, reset: h2::Reason)
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let r: Result<(), BoxError> = async {
        let mut first = true;
        loop {
            let frame = tokio::select! {
                biased;
                f = body.frame() => f,
                r = std::future::poll_fn(|cx| tx.poll_reset(cx)) => {
                    return Err(format!("the peer reset the stream: {r:?}").into());
                }
            };
            let Some(frame) = frame else {
                tx.send_data(Bytes::new(), true)?;
                return Ok(());
            };
            match frame.map_err(Into::into)?.into_data() {
                Ok(data) => {
                    let eos = body.is_end_stream();
                    send_data(&mut tx, data, eos, first).await?;
                    first = false;
                    if eos {
                        return Ok(());
                    }
                }
                Err(f) => {
                    if let Ok(t) = f.into_trailers() {
                        tx.send_trailers(t)?;
                        return Ok(());
                    }
                }
            }
        }
    }
    .await;
    if let Err(e) = r {
        debug!(error = %e, "an HTTP/2 body ended early");
        tx.send_reset(reset);
    }
}

/// Sends one chunk once the stream has any send capacity: h2 queues what
/// does not fit yet (its send buffer is bounded, and `poll_capacity` waits
/// for it to drain). Claiming one byte rather than the chunk's length keeps
/// a stream that cannot send from pinning the connection's window. `eos`
/// ends the stream with the chunk. A body's `first` chunk goes to h2's
/// queue at once: nothing of the stream is queued yet, and waiting would
/// only keep the same bytes here instead of there; the wait before the
/// next chunk still holds a slow reader's stream to one queued chunk
/// (skipping it for the first: ~550 instructions per request fewer).
async fn send_data(
    tx: &mut h2::SendStream<Bytes>,
    data: Bytes,
    eos: bool,
    first: bool,
) -> Result<(), BoxError> {
    if data.is_empty() {
        if eos {
            tx.send_data(data, true)?;
        }
        return Ok(());
    }
    if first {
        tx.send_data(data, eos)?;
        return Ok(());
    }
    tx.reserve_capacity(1);
    while tx.capacity() == 0 {
        match std::future::poll_fn(|cx| tx.poll_capacity(cx)).await {
            Some(n) => n?,
            None => return Err("the stream closed".into()),
        };
    }
    tx.send_data(data, eos)?;
    Ok(())
}
