//! EndpointSlices as a real kube-apiserver serves them, for the fakes in
//! `fake.rs`: one `EndpointStore` shared by every fake of a test (the
//! cluster's etcd), list and chunked watch of `discovery.k8s.io/v1`
//! EndpointSlices with resourceVersions, ADDED / MODIFIED / DELETED /
//! BOOKMARK events, 410 Gone (a `Status` with reason `Expired`) for a
//! history that is gone, and client-certificate authentication. Test hooks
//! change endpoints, expire the history and stop serving the API.

use std::collections::{BTreeMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::{Response, StatusCode};
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::fake::ChannelBody;

type Resp = Response<BoxBody<Bytes, std::convert::Infallible>>;

/// How often an idle watch gets a BOOKMARK.
pub const BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);
/// Events kept for watches that resume; older ones are "compacted".
const HISTORY: usize = 1000;

/// One endpoint of a slice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeEndpoint {
    pub ip: IpAddr,
    /// `None` leaves the condition out (which clients must read as ready).
    pub ready: Option<bool>,
}

impl FakeEndpoint {
    pub fn ready(ip: IpAddr) -> Self {
        FakeEndpoint {
            ip,
            ready: Some(true),
        }
    }
}

struct Inner {
    rv: u64,
    slices: BTreeMap<String, Value>,
    history: VecDeque<(u64, &'static str, Value)>,
    /// A watch from a resourceVersion below this gets 410 Gone.
    oldest: u64,
}

/// The EndpointSlices of one Service, shared by every fake of a cluster.
pub struct EndpointStore {
    namespace: String,
    service: String,
    port_name: String,
    port: u16,
    inner: Mutex<Inner>,
    /// The latest resourceVersion; watches wait on it.
    changed: watch::Sender<u64>,
    serving: AtomicBool,
    /// Cancelled (and replaced) to end every open watch.
    cut: Mutex<CancellationToken>,
}

impl EndpointStore {
    /// Slices of `namespace/service`, at the port `port_name` = `port`.
    pub fn new(namespace: &str, service: &str, port_name: &str, port: u16) -> Arc<Self> {
        Arc::new(EndpointStore {
            namespace: namespace.into(),
            service: service.into(),
            port_name: port_name.into(),
            port,
            inner: Mutex::new(Inner {
                rv: 100,
                slices: BTreeMap::new(),
                history: VecDeque::new(),
                oldest: 0,
            }),
            changed: watch::channel(100).0,
            serving: AtomicBool::new(true),
            cut: Mutex::new(CancellationToken::new()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Creates (ADDED) or replaces (MODIFIED) slice `name`.
    pub fn upsert(&self, name: &str, endpoints: &[FakeEndpoint]) {
        let mut g = self.lock();
        g.rv += 1;
        let rv = g.rv;
        let obj = self.slice(name, endpoints, rv);
        let kind = if g.slices.insert(name.into(), obj.clone()).is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        self.record(&mut g, kind, obj);
    }

    /// Deletes slice `name` (DELETED), if it exists.
    pub fn delete(&self, name: &str) {
        let mut g = self.lock();
        let Some(mut obj) = g.slices.remove(name) else {
            return;
        };
        g.rv += 1;
        obj["metadata"]["resourceVersion"] = g.rv.to_string().into();
        self.record(&mut g, "DELETED", obj);
    }

    /// Compacts the history: every open watch gets 410 Gone, and so does a
    /// watch resumed from any resourceVersion seen so far.
    pub fn expire(&self) {
        let mut g = self.lock();
        // Other objects change in a real cluster too: the next list's
        // resourceVersion is past the compaction.
        g.rv += 1;
        g.oldest = g.rv;
        g.history.clear();
        self.changed.send_replace(g.rv);
    }

    /// Off: API requests get 503 and open watches end; the port stays open
    /// and `/readyz` keeps answering.
    pub fn set_serving(&self, on: bool) {
        self.serving.store(on, Relaxed);
        if !on {
            let mut cut = self.cut.lock().unwrap_or_else(|e| e.into_inner());
            cut.cancel();
            *cut = CancellationToken::new();
        }
    }

    fn record(&self, g: &mut Inner, kind: &'static str, obj: Value) {
        g.history.push_back((g.rv, kind, obj));
        if g.history.len() > HISTORY {
            let (rv, _, _) = g.history.pop_front().expect("not empty");
            g.oldest = rv + 1;
        }
        self.changed.send_replace(g.rv);
    }

    fn slice(&self, name: &str, endpoints: &[FakeEndpoint], rv: u64) -> Value {
        let eps: Vec<Value> = endpoints
            .iter()
            .map(|e| {
                let mut ep = json!({"addresses": [e.ip.to_string()]});
                if let Some(r) = e.ready {
                    ep["conditions"] = json!({"ready": r, "serving": r, "terminating": false});
                }
                ep
            })
            .collect();
        let v6 = endpoints.first().is_some_and(|e| e.ip.is_ipv6());
        json!({
            "kind": "EndpointSlice",
            "apiVersion": "discovery.k8s.io/v1",
            "metadata": {
                "name": name,
                "namespace": self.namespace,
                "uid": format!("00000000-0000-4000-8000-{:012x}", name.len()),
                "resourceVersion": rv.to_string(),
                "generation": 1,
                "creationTimestamp": "2026-01-01T00:00:00Z",
                "labels": {
                    "kubernetes.io/service-name": self.service,
                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"
                }
            },
            "addressType": if v6 { "IPv6" } else { "IPv4" },
            "endpoints": eps,
            "ports": [{"name": self.port_name, "protocol": "TCP", "port": self.port}]
        })
    }

    /// Answers `path?query` if it is this store's collection; else `None`.
    pub(super) fn handle(
        self: &Arc<Self>,
        path: &str,
        query: &str,
        authenticated: bool,
        stop: &CancellationToken,
    ) -> Option<Resp> {
        let want = format!(
            "/apis/discovery.k8s.io/v1/namespaces/{}/endpointslices",
            self.namespace
        );
        if path != want {
            return None;
        }
        if !self.serving.load(Relaxed) {
            return Some(status(
                503,
                "ServiceUnavailable",
                "the apiserver is shutting down",
            ));
        }
        if !authenticated {
            return Some(status(401, "Unauthorized", "Unauthorized"));
        }
        let q = Query::parse(query);
        if !q.selects(&self.service) {
            return Some(self.list_of(Vec::new()));
        }
        Some(if q.watch {
            self.watch(q, stop)
        } else {
            let g = self.lock();
            let items = g
                .slices
                .values()
                .map(|s| {
                    let mut s = s.clone();
                    // Items of a typed list carry no kind/apiVersion.
                    let m = s.as_object_mut().expect("object");
                    m.remove("kind");
                    m.remove("apiVersion");
                    s
                })
                .collect();
            drop(g);
            self.list_of(items)
        })
    }

    fn list_of(&self, items: Vec<Value>) -> Resp {
        let rv = self.lock().rv;
        let body = json!({
            "kind": "EndpointSliceList",
            "apiVersion": "discovery.k8s.io/v1",
            "metadata": {"resourceVersion": rv.to_string()},
            "items": items,
        });
        respond(StatusCode::OK, body.to_string().into())
    }

    fn watch(self: &Arc<Self>, q: Query, stop: &CancellationToken) -> Resp {
        let (tx, rx) = mpsc::channel::<Bytes>(16);
        let cut = self.cut.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let stop = stop.clone();
        tokio::spawn(self.clone().stream(q, tx, stop, cut));
        Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/json")
            .header("transfer-encoding", "chunked")
            .body(BoxBody::new(ChannelBody(rx)))
            .expect("valid response")
    }

    /// Sends the events after the cursor as they happen, one JSON per chunk.
    async fn stream(
        self: Arc<Self>,
        q: Query,
        tx: mpsc::Sender<Bytes>,
        stop: CancellationToken,
        cut: CancellationToken,
    ) {
        let mut changed = self.changed.subscribe();
        let deadline = tokio::time::sleep(q.timeout);
        tokio::pin!(deadline);
        let (mut cursor, initial) = match q.rv {
            Some(rv) if rv > 0 => (rv, Vec::new()),
            _ => {
                let g = self.lock();
                let adds = g.slices.values().map(|s| event("ADDED", s)).collect();
                (g.rv, adds)
            }
        };
        for e in initial {
            if tx.send(e).await.is_err() {
                return;
            }
        }
        loop {
            let out = self.since(&mut cursor);
            let gone = out.is_none();
            for e in out.unwrap_or_else(|| vec![gone_event(cursor)]) {
                if tx.send(e).await.is_err() {
                    return;
                }
            }
            if gone {
                return;
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = cut.cancelled() => return,
                _ = &mut deadline => return,
                r = changed.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(BOOKMARK_INTERVAL), if q.bookmarks => {
                    let b = json!({"kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
                        "metadata": {"resourceVersion": cursor.to_string()}});
                    if tx.send(event("BOOKMARK", &b)).await.is_err() { return; }
                }
            }
        }
    }

    /// Events after `cursor` (moving it), or `None` when they are gone.
    fn since(&self, cursor: &mut u64) -> Option<Vec<Bytes>> {
        let g = self.lock();
        if *cursor < g.oldest {
            return None;
        }
        let out = g
            .history
            .iter()
            .filter(|(rv, _, _)| *rv > *cursor)
            .map(|(_, kind, obj)| event(kind, obj))
            .collect();
        *cursor = (*cursor).max(g.history.back().map(|h| h.0).unwrap_or(0));
        Some(out)
    }
}

/// The query parameters a list or watch uses.
struct Query {
    watch: bool,
    rv: Option<u64>,
    bookmarks: bool,
    timeout: Duration,
    selector: Option<String>,
}

impl Query {
    fn parse(query: &str) -> Self {
        let mut q = Query {
            watch: false,
            rv: None,
            bookmarks: false,
            timeout: Duration::from_secs(1800),
            selector: None,
        };
        for kv in query.split('&') {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            let v = percent_decode(v);
            match k {
                "watch" => q.watch = v == "true" || v == "1",
                "resourceVersion" => q.rv = v.parse().ok(),
                "allowWatchBookmarks" => q.bookmarks = v == "true",
                "timeoutSeconds" => {
                    q.timeout = Duration::from_secs(v.parse().unwrap_or(1800));
                }
                "labelSelector" => q.selector = Some(v),
                _ => {}
            }
        }
        q
    }

    /// Only `kubernetes.io/service-name=NAME` selectors are understood.
    fn selects(&self, service: &str) -> bool {
        match &self.selector {
            None => true,
            Some(s) => s == &format!("kubernetes.io/service-name={service}"),
        }
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match (b[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn event(kind: &str, obj: &Value) -> Bytes {
    let mut line = json!({"type": kind, "object": obj}).to_string();
    line.push('\n');
    line.into()
}

/// What the apiserver sends when a watch resumes from a compacted version.
fn gone_event(rv: u64) -> Bytes {
    let mut s = status_json(410, "Expired", &format!("too old resource version: {rv}"));
    s["metadata"] = json!({});
    event("ERROR", &s)
}

fn status_json(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn status(code: u16, reason: &str, message: &str) -> Resp {
    let body = status_json(code, reason, message).to_string();
    respond(StatusCode::from_u16(code).expect("valid code"), body.into())
}

fn respond(code: StatusCode, body: Bytes) -> Resp {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(body).boxed())
        .expect("valid response")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parsing_decodes_the_selector() {
        let q = Query::parse("labelSelector=kubernetes.io%2Fservice-name%3Dkubernetes&watch=true&resourceVersion=7&allowWatchBookmarks=true&timeoutSeconds=290");
        assert!(q.watch && q.bookmarks);
        assert_eq!(q.rv, Some(7));
        assert_eq!(q.timeout, Duration::from_secs(290));
        assert!(q.selects("kubernetes") && !q.selects("other"));
    }

    #[test]
    fn history_moves_the_cursor_and_expires() {
        let s = EndpointStore::new("default", "kubernetes", "https", 6443);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        s.upsert("kubernetes", &[FakeEndpoint::ready(ip)]);
        s.upsert("kubernetes", &[]);
        s.delete("kubernetes");
        let mut cursor = 100;
        let evs = s.since(&mut cursor).unwrap();
        let kinds: Vec<String> = evs
            .iter()
            .map(|b| {
                serde_json::from_slice::<Value>(b).unwrap()["type"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(kinds, ["ADDED", "MODIFIED", "DELETED"]);
        assert_eq!(cursor, 103);
        s.expire();
        assert!(s.since(&mut cursor).is_none(), "410 after compaction");
        let mut fresh = s.lock().rv;
        assert_eq!(
            s.since(&mut fresh).unwrap().len(),
            0,
            "a relist's version is fine"
        );
    }
}
