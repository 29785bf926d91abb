//! A small etcd v3 client: gRPC framing over hyper's HTTP/2 client, prost messages
//! from `etcdpb` (generated once, committed). Only what the election needs: KV Range/Txn,
//! Lease Grant/KeepAlive/Revoke/TimeToLive, Watch.
//!
//! One connection at a time; a transport failure or an "unavailable" answer drops it and
//! the next call goes to the next endpoint, so a dead or partitioned member is left behind.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prost::Message;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::either::Either;

use super::etcdpb as pb;
use crate::config::vip::{EtcdEndpoint, VipEtcd};
use crate::tls::{self, ClientMaterial, TlsError};

/// An etcd lease id.
pub type LeaseId = i64;

/// gRPC status codes after which another endpoint is worth trying.
const UNAVAILABLE: u32 = 14;
const DEADLINE_EXCEEDED: u32 = 4;

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("{endpoint}: connect: {source}")]
    Connect {
        endpoint: String,
        source: std::io::Error,
    },
    #[error("{endpoint}: http/2: {source}")]
    Http {
        endpoint: String,
        source: hyper::Error,
    },
    #[error("{endpoint}: {method}: {message} (grpc status {code})")]
    Status {
        endpoint: String,
        method: &'static str,
        code: u32,
        message: String,
    },
    #[error("{endpoint}: {method}: {detail}")]
    Protocol {
        endpoint: String,
        method: &'static str,
        detail: String,
    },
    #[error("{endpoint}: {method}: no answer within {}", humantime::format_duration(*.timeout))]
    Timeout {
        endpoint: String,
        method: &'static str,
        timeout: Duration,
    },
    #[error("etcd TLS: {0}")]
    Tls(#[from] TlsError),
}

impl EtcdError {
    /// Whether the connection (or the member behind it) should be given up.
    fn abandons_connection(&self) -> bool {
        match self {
            EtcdError::Status { code, .. } => *code == UNAVAILABLE || *code == DEADLINE_EXCEEDED,
            _ => true,
        }
    }
}

/// The body of a gRPC request: a first message, then (for streams) whatever the sender sends.
pub struct ReqBody {
    first: Option<Bytes>,
    rest: Option<mpsc::Receiver<Bytes>>,
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(b) = self.first.take() {
            return Poll::Ready(Some(Ok(Frame::data(b))));
        }
        match self.rest.as_mut() {
            None => Poll::Ready(None),
            Some(rx) => rx.poll_recv(cx).map(|m| m.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.rest.is_none()
    }
}

/// A length-prefixed gRPC message (uncompressed).
fn frame<M: Message>(m: &M) -> Bytes {
    let len = m.encoded_len();
    let mut b = BytesMut::with_capacity(5 + len);
    b.extend_from_slice(&[0]);
    b.extend_from_slice(&(len as u32).to_be_bytes());
    m.encode(&mut b).expect("capacity reserved");
    b.freeze()
}

/// Takes one whole message off the front of `buf`, if there is one.
fn unframe(buf: &mut BytesMut) -> Option<Result<Bytes, String>> {
    if buf.len() < 5 {
        return None;
    }
    if buf[0] != 0 {
        return Some(Err("compressed gRPC message (not requested)".into()));
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if buf.len() < 5 + len {
        return None;
    }
    buf.advance(5);
    Some(Ok(buf.split_to(len).freeze()))
}

/// The grpc-status in a header map: `None` when absent, `Err` for a failure.
fn grpc_status(h: &http::HeaderMap) -> Option<Result<(), (u32, String)>> {
    let code: u32 = h.get("grpc-status")?.to_str().ok()?.parse().ok()?;
    if code == 0 {
        return Some(Ok(()));
    }
    let msg = h
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .unwrap_or("")
        .to_string();
    Some(Err((code, msg)))
}

type Io = Either<TcpStream, tokio_rustls::client::TlsStream<TcpStream>>;

/// The result of a campaign transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Campaign {
    Won,
    /// Someone holds the key: its value (the holder's identity) and the store revision.
    Lost {
        holder: String,
        revision: i64,
    },
}

/// The election key as read: who holds it under which lease, at which store revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyState {
    pub holder: Option<(String, LeaseId)>,
    pub revision: i64,
}

pub struct Client {
    endpoints: Vec<EtcdEndpoint>,
    tls: Option<Arc<rustls::ClientConfig>>,
    timeout: Duration,
    current: usize,
    conn: Option<http2::SendRequest<ReqBody>>,
}

impl Client {
    /// Reads the TLS files (errors name them); connects lazily on the first call.
    pub fn new(cfg: &VipEtcd, timeout: Duration) -> Result<Client, EtcdError> {
        let tls = if cfg.endpoints.iter().any(|e| e.tls) {
            let mut m = ClientMaterial::from_files(
                cfg.ca_file.as_deref(),
                cfg.cert_file.as_deref(),
                cfg.key_file.as_deref(),
                false,
            )?;
            m.alpn = vec![b"h2".to_vec()];
            Some(m.build()?)
        } else {
            None
        };
        Ok(Client {
            endpoints: cfg.endpoints.clone(),
            tls,
            timeout,
            current: 0,
            conn: None,
        })
    }

    fn endpoint(&self) -> String {
        self.endpoints[self.current].to_string()
    }

    /// The open connection, or a new one to the first endpoint (from the current one
    /// on) that accepts within half the call timeout.
    async fn connect(&mut self) -> Result<http2::SendRequest<ReqBody>, EtcdError> {
        if let Some(c) = &self.conn {
            if !c.is_closed() {
                return Ok(c.clone());
            }
        }
        let mut last = None;
        for _ in 0..self.endpoints.len() {
            let limit = self.timeout / 2;
            let ep = self.endpoint();
            match tokio::time::timeout(limit, self.connect_current()).await {
                Ok(Ok(send)) => {
                    self.conn = Some(send.clone());
                    return Ok(send);
                }
                Ok(Err(e)) => last = Some(e),
                Err(_) => {
                    last = Some(EtcdError::Connect {
                        endpoint: ep,
                        source: std::io::ErrorKind::TimedOut.into(),
                    })
                }
            }
            self.current = (self.current + 1) % self.endpoints.len();
        }
        Err(last.expect("at least one endpoint"))
    }

    async fn connect_current(&mut self) -> Result<http2::SendRequest<ReqBody>, EtcdError> {
        let ep = self.endpoints[self.current].clone();
        let err = |source| EtcdError::Connect {
            endpoint: ep.to_string(),
            source,
        };
        let tcp = TcpStream::connect((ep.host.as_str(), ep.port))
            .await
            .map_err(err)?;
        let _ = tcp.set_nodelay(true);
        let io: Io = match (&self.tls, ep.tls) {
            (Some(cfg), true) => {
                let name = tls::server_name(&ep.host)?;
                let s = tokio_rustls::TlsConnector::from(cfg.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(err)?;
                Either::Right(s)
            }
            _ => Either::Left(tcp),
        };
        let (send, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(TokioIo::new(io))
            .await
            .map_err(|source| EtcdError::Http {
                endpoint: ep.to_string(),
                source,
            })?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(etcd.endpoint = %ep, error = %e, "etcd connection ended");
            }
        });
        Ok(send)
    }

    /// Forgets the connection and moves to the next endpoint after a failure (a failed
    /// connect has moved on already).
    fn fail_over(&mut self, e: &EtcdError) {
        if matches!(e, EtcdError::Connect { .. }) {
            self.conn = None;
        } else if e.abandons_connection() {
            self.conn = None;
            self.current = (self.current + 1) % self.endpoints.len();
        }
    }

    /// Opens a gRPC call; returns the response body once the headers said yes.
    async fn open(&mut self, method: &'static str, body: ReqBody) -> Result<Incoming, EtcdError> {
        let mut send = self.connect().await?;
        let ep = &self.endpoints[self.current];
        let scheme = if ep.tls { "https" } else { "http" };
        let req = http::Request::post(format!("{scheme}://{}:{}{method}", ep.host, ep.port))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(body)
            .expect("static request parts are valid");
        let resp = send
            .send_request(req)
            .await
            .map_err(|source| EtcdError::Http {
                endpoint: ep.to_string(),
                source,
            })?;
        if resp.status() != http::StatusCode::OK {
            return Err(self.protocol(method, format!("HTTP status {}", resp.status())));
        }
        if let Some(Err((code, message))) = grpc_status(resp.headers()) {
            return Err(self.status(method, code, message));
        }
        Ok(resp.into_body())
    }

    fn protocol(&self, method: &'static str, detail: String) -> EtcdError {
        EtcdError::Protocol {
            endpoint: self.endpoint(),
            method,
            detail,
        }
    }

    fn status(&self, method: &'static str, code: u32, message: String) -> EtcdError {
        EtcdError::Status {
            endpoint: self.endpoint(),
            method,
            code,
            message,
        }
    }

    /// One request message, one response message (unary calls, and one-shot use of
    /// LeaseKeepAlive's stream), within the client's timeout.
    async fn call<Q: Message, R: Message + Default>(
        &mut self,
        method: &'static str,
        req: &Q,
    ) -> Result<R, EtcdError> {
        let body = ReqBody {
            first: Some(frame(req)),
            rest: None,
        };
        let timeout = self.timeout;
        let result = match tokio::time::timeout(timeout, self.unary(method, body)).await {
            Ok(r) => r,
            Err(_) => Err(EtcdError::Timeout {
                endpoint: self.endpoint(),
                method,
                timeout,
            }),
        };
        if let Err(e) = &result {
            self.fail_over(e);
        }
        result
    }

    async fn unary<R: Message + Default>(
        &mut self,
        method: &'static str,
        body: ReqBody,
    ) -> Result<R, EtcdError> {
        let incoming = self.open(method, body).await?;
        let all = incoming.collect().await.map_err(|source| EtcdError::Http {
            endpoint: self.endpoint(),
            source,
        })?;
        if let Some(Err((code, message))) = all.trailers().and_then(grpc_status) {
            return Err(self.status(method, code, message));
        }
        let mut data = BytesMut::from(all.to_bytes());
        match unframe(&mut data) {
            Some(Ok(msg)) => R::decode(msg).map_err(|e| self.protocol(method, e.to_string())),
            Some(Err(d)) => Err(self.protocol(method, d)),
            None => Err(self.protocol(method, "no response message".into())),
        }
    }

    /// Grants a lease of `ttl`; returns its id and the TTL etcd granted.
    pub async fn grant(&mut self, ttl: Duration) -> Result<(LeaseId, i64), EtcdError> {
        let req = pb::LeaseGrantRequest {
            ttl: ttl.as_secs() as i64,
            id: 0,
        };
        let r: pb::LeaseGrantResponse = self.call("/etcdserverpb.Lease/LeaseGrant", &req).await?;
        if !r.error.is_empty() {
            return Err(self.protocol("LeaseGrant", r.error));
        }
        Ok((r.id, r.ttl))
    }

    /// Renews a lease once; returns the remaining TTL (0 or less: the lease is gone).
    pub async fn keepalive(&mut self, lease: LeaseId) -> Result<i64, EtcdError> {
        let req = pb::LeaseKeepAliveRequest { id: lease };
        let r: pb::LeaseKeepAliveResponse = self
            .call("/etcdserverpb.Lease/LeaseKeepAlive", &req)
            .await?;
        Ok(r.ttl)
    }

    /// Revokes a lease, deleting the keys bound to it.
    pub async fn revoke(&mut self, lease: LeaseId) -> Result<(), EtcdError> {
        let req = pb::LeaseRevokeRequest { id: lease };
        let _: pb::LeaseRevokeResponse = self.call("/etcdserverpb.Lease/LeaseRevoke", &req).await?;
        Ok(())
    }

    /// The remaining TTL of a lease and the keys bound to it (TTL -1: gone).
    pub async fn time_to_live(&mut self, lease: LeaseId) -> Result<(i64, Vec<Vec<u8>>), EtcdError> {
        let req = pb::LeaseTimeToLiveRequest {
            id: lease,
            keys: true,
        };
        let r: pb::LeaseTimeToLiveResponse = self
            .call("/etcdserverpb.Lease/LeaseTimeToLive", &req)
            .await?;
        Ok((r.ttl, r.keys))
    }

    /// Reads the election key.
    pub async fn get(&mut self, key: &str) -> Result<KeyState, EtcdError> {
        let req = pb::RangeRequest {
            key: key.as_bytes().to_vec(),
            ..Default::default()
        };
        let r: pb::RangeResponse = self.call("/etcdserverpb.KV/Range", &req).await?;
        Ok(KeyState {
            holder: r
                .kvs
                .first()
                .map(|kv| (String::from_utf8_lossy(&kv.value).into_owned(), kv.lease)),
            revision: r.header.map_or(0, |h| h.revision),
        })
    }

    /// Creates `key = value` bound to `lease` only if the key does not exist.
    pub async fn campaign(
        &mut self,
        key: &str,
        value: &str,
        lease: LeaseId,
    ) -> Result<Campaign, EtcdError> {
        use pb::compare::{CompareResult, CompareTarget, TargetUnion};
        use pb::request_op::Request;
        let k = key.as_bytes().to_vec();
        let req = pb::TxnRequest {
            compare: vec![pb::Compare {
                result: CompareResult::Equal as i32,
                target: CompareTarget::Create as i32,
                key: k.clone(),
                target_union: Some(TargetUnion::CreateRevision(0)),
                range_end: Vec::new(),
            }],
            success: vec![pb::RequestOp {
                request: Some(Request::RequestPut(pb::PutRequest {
                    key: k.clone(),
                    value: value.as_bytes().to_vec(),
                    lease,
                    ..Default::default()
                })),
            }],
            failure: vec![pb::RequestOp {
                request: Some(Request::RequestRange(pb::RangeRequest {
                    key: k,
                    ..Default::default()
                })),
            }],
        };
        let r: pb::TxnResponse = self.call("/etcdserverpb.KV/Txn", &req).await?;
        if r.succeeded {
            return Ok(Campaign::Won);
        }
        let holder = r
            .responses
            .into_iter()
            .find_map(|op| match op.response {
                Some(pb::response_op::Response::ResponseRange(rr)) => rr.kvs.into_iter().next(),
                _ => None,
            })
            .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
            .unwrap_or_default();
        Ok(Campaign::Lost {
            holder,
            revision: r.header.map_or(0, |h| h.revision),
        })
    }

    /// Watches `key` from `start_revision` until it is deleted (Ok) or the watch fails.
    /// No timeout of its own: the caller bounds it.
    pub async fn wait_deleted(&mut self, key: &str, start_revision: i64) -> Result<(), EtcdError> {
        let result = self.watch_inner(key, start_revision).await;
        if let Err(e) = &result {
            self.fail_over(e);
        }
        result
    }

    async fn watch_inner(&mut self, key: &str, start_revision: i64) -> Result<(), EtcdError> {
        const METHOD: &str = "/etcdserverpb.Watch/Watch";
        let create = pb::WatchRequest {
            request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
                pb::WatchCreateRequest {
                    key: key.as_bytes().to_vec(),
                    start_revision,
                    ..Default::default()
                },
            )),
        };
        // The request stream stays open while `_keep` lives: etcd ends a watch whose
        // client closed its side in some versions.
        let (_keep, rx) = mpsc::channel(1);
        let body = ReqBody {
            first: Some(frame(&create)),
            rest: Some(rx),
        };
        let timeout = self.timeout;
        let mut incoming = match tokio::time::timeout(timeout, self.open(METHOD, body)).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(EtcdError::Timeout {
                    endpoint: self.endpoint(),
                    method: "Watch",
                    timeout,
                })
            }
        };
        let mut buf = BytesMut::new();
        loop {
            while let Some(msg) = unframe(&mut buf) {
                let msg = msg.map_err(|d| self.protocol("Watch", d))?;
                let w = pb::WatchResponse::decode(msg)
                    .map_err(|e| self.protocol("Watch", e.to_string()))?;
                if w.canceled {
                    return Err(self.protocol("Watch", format!("canceled: {}", w.cancel_reason)));
                }
                let deleted = pb::event::EventType::Delete as i32;
                if w.events.iter().any(|ev| ev.r#type == deleted) {
                    return Ok(());
                }
            }
            match incoming.frame().await {
                Some(Ok(f)) => match f.into_data() {
                    Ok(d) => buf.extend_from_slice(&d),
                    Err(f) => {
                        let detail = match f.trailers_ref().and_then(grpc_status) {
                            Some(Err((code, message))) => {
                                return Err(self.status("Watch", code, message))
                            }
                            _ => "stream ended".to_string(),
                        };
                        return Err(self.protocol("Watch", detail));
                    }
                },
                Some(Err(source)) => {
                    return Err(EtcdError::Http {
                        endpoint: self.endpoint(),
                        source,
                    })
                }
                None => return Err(self.protocol("Watch", "stream ended".into())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let m = pb::LeaseKeepAliveRequest { id: 0x1234_5678 };
        let f = frame(&m);
        assert_eq!(f[0], 0);
        assert_eq!(
            u32::from_be_bytes([f[1], f[2], f[3], f[4]]) as usize,
            f.len() - 5
        );
        let mut buf = BytesMut::from(&f[..3]);
        assert!(unframe(&mut buf).is_none(), "partial header");
        let mut buf = BytesMut::from(&f[..]);
        buf.extend_from_slice(&f);
        for _ in 0..2 {
            let msg = unframe(&mut buf).unwrap().unwrap();
            assert_eq!(pb::LeaseKeepAliveRequest::decode(msg).unwrap(), m);
        }
        assert!(buf.is_empty());
    }

    #[test]
    fn grpc_status_reads_code_and_message() {
        let mut h = http::HeaderMap::new();
        assert!(grpc_status(&h).is_none());
        h.insert("grpc-status", "5".parse().unwrap());
        h.insert("grpc-message", "lease not found".parse().unwrap());
        assert_eq!(
            grpc_status(&h),
            Some(Err((5, "lease not found".to_string())))
        );
    }
}
