//! Client-facing HTTP/2 through the h2 crate: each connection's streams run
//! the handler and stream their responses on the connection's own task, the
//! connection PINGs its client, and shutdown says GOAWAY and lets open
//! streams finish. A request spawns no task and a finished response wakes
//! none before it is written (the step round 3 took upstream, client side).

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt;
use http::header::{HeaderValue, CONTENT_LENGTH, DATE};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Body;
use tokio::time::Instant;
use tracing::{debug, error};

use super::h2body::{pipe, BoxError, PeerBody, MAX_SEND_BUF};
use super::Env;
use crate::config::HttpFrontend;

/// Client-facing HTTP/2 receive windows: what one stream's / connection's
/// unread request bodies can hold in apilb.
pub const CLIENT_STREAM_WINDOW: u32 = 256 * 1024;
pub const CLIENT_CONN_WINDOW: u32 = 1024 * 1024;
/// Reset streams a client may cause before its HTTP/2 connection is closed.
const MAX_PENDING_RESETS: usize = 20;
const MAX_LOCAL_RESETS: usize = 1024;

/// What a frontend's settings say about its HTTP/2 connections, copied so
/// that a connection holds no reference to the configuration it began with.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_streams: u32,
    pub max_header_list: u32,
    /// For the client's connection preface.
    pub handshake_timeout: Duration,
    /// A PING to the client this often: find dead peers without cutting
    /// idle watches.
    pub keepalive: Duration,
    /// No answer to a PING within this closes the connection.
    pub keepalive_timeout: Duration,
}

impl From<&HttpFrontend> for Limits {
    fn from(s: &HttpFrontend) -> Self {
        Limits {
            max_streams: s.http2_max_concurrent_streams,
            max_header_list: u32::try_from(s.max_header_bytes).unwrap_or(u32::MAX),
            handshake_timeout: s.header_timeout,
            keepalive: s.http2_keepalive_interval,
            keepalive_timeout: s.http2_keepalive_timeout,
        }
    }
}

/// Serves one client HTTP/2 connection until it ends, shutdown drains it
/// (GOAWAY, then open streams finish), or the grace runs out. The client's
/// preface must arrive within `header_timeout`; `handle` answers each
/// request, polled on this connection's task.
pub async fn serve<T, H, F, B>(io: T, limits: Limits, env: &Env, handle: H)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    H: Fn(Request<PeerBody>) -> F,
    F: Future<Output = Response<B>> + Send + 'static,
    B: Body<Data = Bytes, Error = BoxError> + Unpin + Send + 'static,
{
    let shake = builder(limits).handshake(io);
    let conn = tokio::select! {
        r = tokio::time::timeout(limits.handshake_timeout, shake) => match r {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return debug!(error = %e, "client HTTP/2 handshake failed"),
            Err(_) => return debug!("no HTTP/2 preface within header_timeout"),
        },
        _ = env.hard_stop.cancelled() => return,
    };
    if let Err(e) = run(conn, limits, env, handle).await {
        debug!(error = %e, "client connection ended with an error");
    }
}

fn builder(l: Limits) -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.max_concurrent_streams(l.max_streams)
        .max_pending_accept_reset_streams(MAX_PENDING_RESETS)
        .max_local_error_reset_streams(Some(MAX_LOCAL_RESETS))
        .max_header_list_size(l.max_header_list)
        .initial_window_size(CLIENT_STREAM_WINDOW)
        .initial_connection_window_size(CLIENT_CONN_WINDOW)
        .max_send_buffer_size(MAX_SEND_BUF);
    b
}

/// Accepts streams until the connection closes. Every `keepalive` a PING
/// goes out; no answer within `keepalive_timeout` closes the connection.
async fn run<T, H, F, B>(
    mut conn: h2::server::Connection<T, Bytes>,
    limits: Limits,
    env: &Env,
    handle: H,
) -> Result<(), BoxError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    H: Fn(Request<PeerBody>) -> F,
    F: Future<Output = Response<B>> + Send + 'static,
    B: Body<Data = Bytes, Error = BoxError> + Unpin + Send + 'static,
{
    let mut pings = conn.ping_pong().ok_or("the PING handle was taken")?;
    let (every, wait) = (limits.keepalive, limits.keepalive_timeout);
    let mut tick = tokio::time::interval_at(Instant::now() + every, every);
    // A late answer (timeout above the interval) must not send a burst.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let pong_due = tokio::time::sleep(wait);
    // Made once: a waiter on the process-wide tokens per request would cost
    // a lock each.
    let shutdown = env.shutdown.cancelled();
    let hard_stop = env.hard_stop.cancelled();
    tokio::pin!(pong_due, shutdown, hard_stop);
    let (mut awaiting, mut draining) = (false, false);
    // The connection's streams run on its own task: a response wakes no
    // other task to be written, and a request spawns none.
    let mut streams = FuturesUnordered::new();
    loop {
        tokio::select! {
            biased;
            // Ready responses first, so that one poll of the connection
            // writes them all.
            Some(()) = streams.next(), if !streams.is_empty() => {}
            s = conn.accept() => match s {
                Some(Ok((req, respond))) if req.method() == Method::CONNECT => refuse(respond),
                Some(Ok((req, respond))) => {
                    let fut = in_place(|| handle(req.map(PeerBody::H2)));
                    let stream = in_place(|| isolated(answer(fut, respond)));
                    streams.push(stream as Stream);
                }
                Some(Err(e)) => return Err(e.into()),
                None => return Ok(()),
            },
            r = std::future::poll_fn(|cx| pings.poll_pong(cx)), if awaiting => {
                r?;
                awaiting = false;
            }
            _ = tick.tick(), if !awaiting => {
                pings.send_ping(h2::Ping::opaque())?;
                awaiting = true;
                pong_due.as_mut().reset(Instant::now() + wait);
            }
            _ = &mut pong_due, if awaiting => {
                return Err(format!("no PING answer within {wait:?}").into());
            }
            _ = &mut shutdown, if !draining => {
                draining = true;
                conn.graceful_shutdown();
            }
            _ = &mut hard_stop => return Ok(()),
        }
    }
}

/// A stream's future, boxed.
type Stream = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Boxes the future `make` returns, built in its allocation. A request's
/// future is kilobytes (its state across every await); one built first and
/// then boxed, or moved into an `async fn` that pins it, is copied whole
/// each time (round 11: memmove fell from 17.8 % to 15.7 % of L7 CPU).
/// In place is the optimizer's doing, not a language guarantee.
fn in_place<F: Future>(make: impl FnOnce() -> F) -> Pin<Box<F>> {
    let slot = Box::<F>::new_uninit();
    Box::into_pin(Box::write(slot, make()))
}

/// A panic in one stream's handler ends that stream (h2 resets it when its
/// handles drop), not the connection and the other streams on it. A
/// combinator, not an `async fn`: it polls `stream` where it was built.
fn isolated<F: Future<Output = ()>>(stream: F) -> impl Future<Output = ()> {
    std::panic::AssertUnwindSafe(stream)
        .catch_unwind()
        .map(|r| {
            if r.is_err() {
                error!("a request's handler panicked; its stream was reset");
            }
        })
}

/// CONNECT (a tunnel over one stream) is not something kube clients use:
/// 405, and the stream ends.
fn refuse(mut respond: h2::server::SendResponse<Bytes>) {
    let mut r = Response::new(());
    *r.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
    if respond.send_response(r, true).is_err() {
        respond.send_reset(h2::Reason::INTERNAL_ERROR);
    }
}

/// Runs one stream: the handler's response (dropped if the client resets
/// the stream first), then its body within the client's window. A body that
/// breaks ends the stream with RST_STREAM INTERNAL_ERROR.
async fn answer<F, B>(mut fut: Pin<Box<F>>, mut respond: h2::server::SendResponse<Bytes>)
where
    F: Future<Output = Response<B>>,
    B: Body<Data = Bytes, Error = BoxError> + Unpin,
{
    let resp = tokio::select! {
        biased;
        r = fut.as_mut() => r,
        r = std::future::poll_fn(|cx| respond.poll_reset(cx)) => {
            return debug!(reason = ?r, "the client reset a stream before its response");
        }
    };
    // The handler's state (kilobytes) is not kept while the body streams.
    drop(fut);
    let (mut head, body) = resp.into_parts();
    // The apiserver's responses carry one; apilb's own answers get it here.
    if !head.headers.contains_key(DATE) {
        let now = httpdate::fmt_http_date(std::time::SystemTime::now());
        if let Ok(v) = HeaderValue::from_str(&now) {
            head.headers.insert(DATE, v);
        }
    }
    let eos = body.is_end_stream();
    if !eos {
        if let Some(n) = body.size_hint().exact() {
            head.headers
                .entry(CONTENT_LENGTH)
                .or_insert_with(|| HeaderValue::from(n));
        }
    }
    match respond.send_response(Response::from_parts(head, ()), eos) {
        Ok(tx) if !eos => pipe(body, tx, h2::Reason::INTERNAL_ERROR).await,
        Ok(_) => {}
        Err(e) => {
            debug!(error = %e, "a response head could not be sent");
            respond.send_reset(h2::Reason::INTERNAL_ERROR);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_stream_ends_alone() {
        let ran = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let r = ran.clone();
        isolated(async move {
            r.store(true, std::sync::atomic::Ordering::SeqCst);
            panic!("a handler bug");
        })
        .await;
        assert!(ran.load(std::sync::atomic::Ordering::SeqCst));
    }
}
