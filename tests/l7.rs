//! L7 mode: TLS termination, per-request balancing over HTTP/1.1 and HTTP/2,
//! streaming, upgrades, identity forwarding, request hygiene and limits.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use apilb::demo::{FakeApiserver, Leaf};
use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Empty};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// apilb's L7 frontend in front of fakes that optionally accept client certs.
struct L7 {
    pki: Pki,
    fakes: Vec<FakeApiserver>,
    h: apilb::Handle,
    yaml: String,
}

impl L7 {
    /// `client_ca`: verify client certificates at apilb (front-proxy path on).
    /// `check`: the pool's health check kind.
    async fn start(client_ca: bool, check: &str, extra_fe: &str) -> Self {
        Self::start_with(client_ca, check, extra_fe, "").await
    }

    /// `extra_health`: more keys for the pool's health section.
    async fn start_with(client_ca: bool, check: &str, extra_fe: &str, extra_health: &str) -> Self {
        let pki = Pki::new();
        let dir = pki.dir.path().to_path_buf();
        // The fakes ask for (but do not require) client certs, as an apiserver does.
        let mut fakes = Vec::new();
        for i in 1..=3 {
            let mut o = pki.fake_options(&format!("api-{i}"));
            o.client_ca_pem = Some(pki.ca.cert_pem.clone());
            o.watch_events = Some(30);
            o.watch_interval = Duration::from_millis(200);
            fakes.push(FakeApiserver::start(o).await.unwrap());
        }
        let (fp_crt, fp_key) = pki
            .ca
            .client("front-proxy-client", None)
            .unwrap()
            .write(&dir, "front-proxy")
            .unwrap();
        let addrs: Vec<_> = fakes.iter().map(|f| f.addr()).collect();
        let ca = pki.ca_file.display().to_string();
        let client_ca = if client_ca {
            format!("      client_ca_file: {ca}\n")
        } else {
            String::new()
        };
        let yaml = format!(
            "admin:\n  listen: 127.0.0.1:0\nshutdown_grace: 2s\nfrontends:\n  - name: fe\n    listen: 127.0.0.1:0\n    mode: http\n    pool: p\n{extra_fe}    tls:\n      cert_file: {}\n      key_file: {}\n{client_ca}\
             pools:\n  - name: p\n    servers:\n{}    tls:\n      ca_file: {ca}\n      server_name: kubernetes\n      front_proxy_cert_file: {}\n      front_proxy_key_file: {}\n\
             \x20   health:\n      check: {check}\n      interval: 500ms\n      timeout: 250ms\n      rise: 1\n      fall: 2\n{extra_health}      tls:\n        ca_file: {ca}\n        server_name: kubernetes\n",
            dir.join("server.crt").display(),
            dir.join("server.key").display(),
            servers_yaml(&addrs),
            fp_crt.display(),
            fp_key.display(),
        );
        let yaml = if check == "https" {
            yaml
        } else {
            yaml.replace(
                "      tls:\n        ca_file",
                "      #tls:\n        #ca_file",
            )
            .replace("        server_name: kubernetes\n", "")
        };
        let h = start_yaml(&yaml).await;
        L7 {
            pki,
            fakes,
            h,
            yaml,
        }
    }

    fn addr(&self) -> SocketAddr {
        fe(&self.h)
    }

    fn tls(&self, identity: Option<&Leaf>, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        let origin = std::path::Path::new("test");
        apilb::tls::ClientMaterial {
            ca: Some(apilb::tls::certs_from_pem(self.pki.ca.cert_pem.as_bytes(), origin).unwrap()),
            identity: identity.map(|l| {
                (
                    apilb::tls::certs_from_pem(l.cert_pem.as_bytes(), origin).unwrap(),
                    apilb::tls::key_from_pem(l.key_pem.as_bytes(), origin).unwrap(),
                )
            }),
            insecure_skip_verify: false,
            alpn: alpn.iter().map(|a| a.to_vec()).collect(),
        }
        .build()
        .unwrap()
    }

    async fn raw(&self) -> tokio_rustls::client::TlsStream<TcpStream> {
        let tcp = TcpStream::connect(self.addr()).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("kubernetes").unwrap();
        tokio_rustls::TlsConnector::from(self.tls(None, &[b"http/1.1"]))
            .connect(name, tcp)
            .await
            .unwrap()
    }

    /// GET /whoami over HTTP/1.1 with extra headers; returns the fake's JSON.
    async fn whoami(&self, identity: Option<&Leaf>, headers: &[(&str, &str)]) -> serde_json::Value {
        let tcp = TcpStream::connect(self.addr()).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("kubernetes").unwrap();
        let s = tokio_rustls::TlsConnector::from(self.tls(identity, &[b"http/1.1"]))
            .connect(name, tcp)
            .await
            .unwrap();
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(s))
                .await
                .unwrap();
        tokio::spawn(conn);
        let mut b = hyper::Request::get("/whoami").header("host", "kubernetes");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let resp = send
            .send_request(b.body(Empty::<Bytes>::new()).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&body).unwrap()
    }
}

fn header<'a>(v: &'a serde_json::Value, name: &str) -> Vec<&'a str> {
    v["headers"][name]
        .as_array()
        .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_with_a_token_gets_version_and_a_streaming_watch() {
    let Some(kubectl) = require_tool("kubectl") else {
        return;
    };
    let l7 = L7::start(false, "https", "").await;
    let kc = l7.pki.dir.path().join("kubeconfig");
    apilb::demo::write_kubeconfig(
        &kc,
        &format!("https://{}", l7.addr()),
        &l7.pki.ca_file,
        "secret-token",
    )
    .unwrap();
    let out = kubectl_raw(&kubectl, &kc, "/version").await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["gitVersion"], apilb::demo::fake::FAKE_GIT_VERSION);
    // The bearer token reaches the apiserver unchanged, without a client cert.
    let out = kubectl_raw(&kubectl, &kc, "/whoami").await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(header(&v, "authorization"), ["Bearer secret-token"]);
    assert_eq!(v["client_cn"], serde_json::Value::Null);

    // A watch: the fake streams 30 events 200 ms apart (6 s); the first must
    // reach kubectl while the stream is still going.
    let t = Instant::now();
    let mut child = tokio::process::Command::new(&kubectl)
        .arg("--kubeconfig")
        .arg(&kc)
        .args(["get", "--raw", "/api/v1/namespaces?watch=true"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(5), lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let first_at = t.elapsed();
    assert!(first.contains("\"ADDED\""), "{first}");
    assert!(
        first_at < Duration::from_secs(3),
        "first event after {first_at:?}: buffered?"
    );
    assert!(
        child.try_wait().unwrap().is_none(),
        "kubectl still streaming when the first event arrived"
    );
    let mut n = 1;
    while let Ok(Some(_)) = lines.next_line().await {
        n += 1;
    }
    assert_eq!(n, 30, "every event arrived");
    assert!(child.wait().await.unwrap().success());
    l7.h.shutdown();
    l7.h.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_http2_connection_spreads_300_requests_over_three_backends() {
    let l7 = L7::start(false, "https", "").await;
    let mut send = h2_client(&l7).await;
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..300 {
        let req = hyper::Request::get(format!("https://{}/whoami", l7.addr()))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let server = resp.headers()["x-fake-server"]
            .to_str()
            .unwrap()
            .to_string();
        resp.into_body().collect().await.unwrap();
        *counts.entry(server).or_default() += 1;
    }
    assert_eq!(counts.len(), 3, "{counts:?}");
    for (s, n) in &counts {
        assert!((90..=110).contains(n), "{s} got {n}: {counts:?}");
    }
    let (_, m) = admin_get(l7.h.admin_addr().unwrap(), "/metrics").await;
    let total: f64 = l7
        .fakes
        .iter()
        .filter_map(|f| {
            metric(
                &m,
                &format!("apilb_http_requests_total{{code=\"200\",frontend=\"fe\",method=\"GET\",pool=\"p\",server=\"{}\"}}", f.addr()),
            )
        })
        .sum();
    assert_eq!(total, 300.0);
    l7.h.shutdown();
    l7.h.wait().await;
}

#[tokio::test]
async fn front_proxy_identity_is_set_from_the_certificate_and_never_from_the_client() {
    let l7 = L7::start(true, "https", "").await;
    let jane = l7.pki.ca.client("jane", Some("dev")).unwrap();

    let v = l7.whoami(Some(&jane), &[]).await;
    assert_eq!(header(&v, "x-remote-user"), ["jane"]);
    assert_eq!(header(&v, "x-remote-group"), ["dev"]);
    assert_eq!(
        v["client_cn"], "front-proxy-client",
        "sent over the front-proxy connection"
    );

    let v = l7
        .whoami(
            Some(&jane),
            &[
                ("X-Remote-User", "admin"),
                ("X-Remote-Group", "system:masters"),
                ("X-Remote-Extra-Scopes", "all"),
            ],
        )
        .await;
    assert_eq!(
        header(&v, "x-remote-user"),
        ["jane"],
        "the client's own header is replaced"
    );
    assert_eq!(header(&v, "x-remote-group"), ["dev"]);
    assert!(header(&v, "x-remote-extra-scopes").is_empty());

    let v = l7
        .whoami(
            None,
            &[
                ("X-Remote-User", "admin"),
                ("X-Remote-Group", "system:masters"),
                ("Authorization", "Bearer t0k"),
            ],
        )
        .await;
    assert!(header(&v, "x-remote-user").is_empty(), "{v}");
    assert!(header(&v, "x-remote-group").is_empty(), "{v}");
    assert_eq!(
        v["client_cn"],
        serde_json::Value::Null,
        "no front-proxy certificate without a verified client"
    );
    assert_eq!(header(&v, "authorization"), ["Bearer t0k"]);

    for who in [Some(&jane), None] {
        let v = l7.whoami(who, &[("Impersonate-User", "bob")]).await;
        assert_eq!(
            header(&v, "impersonate-user"),
            ["bob"],
            "Impersonate-* passes through"
        );
    }
    l7.h.shutdown();
    l7.h.wait().await;
}

#[tokio::test]
async fn hop_by_hop_headers_go_and_x_forwarded_for_is_appended() {
    let l7 = L7::start(false, "https", "    forwarded_for: append\n").await;
    let v = l7
        .whoami(
            None,
            &[
                ("Connection", "keep-alive, X-Hop"),
                ("X-Hop", "1"),
                ("Keep-Alive", "timeout=5"),
                ("X-Forwarded-For", "1.2.3.4"),
            ],
        )
        .await;
    assert!(header(&v, "x-hop").is_empty(), "{v}");
    assert!(header(&v, "keep-alive").is_empty(), "{v}");
    assert_eq!(header(&v, "x-forwarded-for"), ["1.2.3.4, 127.0.0.1"]);
    l7.h.shutdown();
    l7.h.wait().await;
}

async fn read_head<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b))
            .await
            .unwrap()
            .unwrap();
        if n == 0 {
            break;
        }
        head.push(b[0]);
    }
    String::from_utf8_lossy(&head).to_string()
}

#[tokio::test]
async fn spdy_and_websocket_upgrades_tunnel_both_ways() {
    let l7 = L7::start(false, "https", "").await;
    for (proto, extra) in [
        (
            "SPDY/3.1",
            "X-Stream-Protocol-Version: v4.channel.k8s.io\r\n",
        ),
        (
            "websocket",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n",
        ),
    ] {
        let mut s = l7.raw().await;
        s.write_all(
            format!("GET /api/v1/namespaces/default/pods/p/exec?command=cat HTTP/1.1\r\nHost: kubernetes\r\nConnection: Upgrade\r\nUpgrade: {proto}\r\n{extra}\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
        let head = read_head(&mut s).await;
        assert!(head.starts_with("HTTP/1.1 101"), "{proto}: {head}");
        assert!(
            head.to_ascii_lowercase()
                .contains(&format!("upgrade: {}", proto.to_ascii_lowercase())),
            "{head}"
        );
        if proto == "websocket" {
            assert!(head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{head}");
        }
        for i in 0..20 {
            let msg = format!("{proto} frame {i} \x00\x01\x02 binary\n");
            s.write_all(msg.as_bytes()).await.unwrap();
            let mut back = vec![0u8; msg.len()];
            tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(back, msg.as_bytes());
        }
    }
    l7.h.shutdown();
    l7.h.wait().await;
}

#[tokio::test]
async fn smuggling_shapes_and_oversized_headers_never_reach_a_backend() {
    // tcp probes, so every request a fake counts came through apilb.
    let l7 = L7::start(false, "tcp", "    max_header_bytes: 8192\n").await;
    let served = |l7: &L7| l7.fakes.iter().map(|f| f.requests()).sum::<usize>();
    let big = format!(
        "GET /version HTTP/1.1\r\nHost: k\r\nX-Big: {}\r\n\r\n",
        "a".repeat(10_000)
    );
    let cases: Vec<(String, &str)> = vec![
        ("POST /api/v1/namespaces HTTP/1.1\r\nHost: k\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /admin HTTP/1.1\r\n\r\n".into(), "400"),
        ("POST /api/v1/namespaces HTTP/1.1\r\nHost: k\r\nContent-Length: 4\r\nContent-Length: 40\r\n\r\nabcd".into(), "400"),
        ("POST /api/v1/namespaces HTTP/1.1\r\nHost: k\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n".into(), "400"),
        ("POST /api/v1/namespaces HTTP/1.1\r\nHost: k\r\nTransfer-Encoding: xchunked\r\n\r\n".into(), "400"),
        (big, "431"),
    ];
    for (req, code) in cases {
        let before = served(&l7);
        let mut s = l7.raw().await;
        s.write_all(req.as_bytes()).await.unwrap();
        let mut resp = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut resp))
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&resp);
        assert!(
            text.starts_with(&format!("HTTP/1.1 {code}")),
            "expected {code}, got {text:?} for {:?}",
            &req[..60.min(req.len())]
        );
        assert_eq!(served(&l7), before, "nothing reached a backend");
    }
    let (_, m) = admin_get(l7.h.admin_addr().unwrap(), "/metrics").await;
    assert!(
        metric(
            &m,
            "apilb_frontend_rejected_connections_total{frontend=\"fe\",reason=\"bad_request\"}"
        )
        .unwrap()
            >= 4.0
    );
    // And a clean request on a fresh connection is still served.
    let mut s = l7.raw().await;
    s.write_all(b"GET /version HTTP/1.1\r\nHost: k\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    l7.h.shutdown();
    l7.h.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_client_is_closed_at_the_header_timeout_while_others_are_served() {
    let l7 = L7::start(false, "tcp", "    header_timeout: 2s\n").await;
    let mut slow = l7.raw().await;
    let t = Instant::now();
    let writer = tokio::spawn(async move {
        let head = b"GET /version HTTP/1.1\r\nHost: kubernetes\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
        for b in head {
            if slow.write_all(&[*b]).await.is_err() {
                break;
            }
            // Fail fast if apilb closed us: a read returns 0 or an error.
            let mut x = [0u8; 64];
            match tokio::time::timeout(Duration::from_secs(1), slow.read(&mut x)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return Some(Instant::now()),
                Ok(Ok(n)) => {
                    return Some(Instant::now())
                        .filter(|_| String::from_utf8_lossy(&x[..n]).starts_with("HTTP/1.1 408"))
                }
                Err(_) => {}
            }
        }
        None
    });
    // Meanwhile another client is served.
    let r = https_get(l7.addr(), "/version", l7.tls(None, &[b"http/1.1"]))
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let closed = writer.await.unwrap().expect("the slow client was closed");
    let after = closed.duration_since(t);
    assert!(
        after >= Duration::from_millis(1500) && after < Duration::from_millis(4500),
        "closed after {after:?}"
    );
    l7.h.shutdown();
    l7.h.wait().await;
}

#[tokio::test]
async fn an_http2_client_that_sends_no_preface_is_closed_at_the_header_timeout() {
    let l7 = L7::start(false, "tcp", "    header_timeout: 2s\n").await;
    let tcp = TcpStream::connect(l7.addr()).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("kubernetes").unwrap();
    let mut silent = tokio_rustls::TlsConnector::from(l7.tls(None, &[b"h2"]))
        .connect(name, tcp)
        .await
        .unwrap();
    assert_eq!(silent.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let t = Instant::now();
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), silent.read_to_end(&mut got)).await;
    let after = t.elapsed();
    assert!(read.is_ok(), "the silent client is still open after 10s");
    assert!(
        after >= Duration::from_millis(1500) && after < Duration::from_millis(4500),
        "closed after {after:?}"
    );
    // Meanwhile and after, HTTP/2 clients that speak are served.
    let mut send = h2_client::<Empty<Bytes>>(&l7).await;
    let req = hyper::Request::get(format!("https://{}/version", l7.addr()))
        .body(Empty::new())
        .unwrap();
    assert_eq!(send.send_request(req).await.unwrap().status(), 200);
    l7.h.shutdown();
    l7.h.wait().await;
}

/// Reads one HTTP/2 frame: type, flags and payload; `None` at EOF.
async fn read_frame<R: tokio::io::AsyncRead + Unpin>(r: &mut R) -> Option<(u8, u8, Vec<u8>)> {
    let mut head = [0u8; 9];
    r.read_exact(&mut head).await.ok()?;
    let len = (head[0] as usize) << 16 | (head[1] as usize) << 8 | head[2] as usize;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await.ok()?;
    Some((head[3], head[4], payload))
}

#[tokio::test]
async fn an_http2_client_that_answers_no_ping_is_closed_and_one_that_does_is_kept() {
    let fe = "    http2_keepalive_interval: 1s\n    http2_keepalive_timeout: 1s\n";
    let l7 = L7::start(false, "tcp", fe).await;
    // A client whose HTTP/2 stack answers PINGs (hyper's), idle throughout.
    let mut alive = h2_client::<Empty<Bytes>>(&l7).await;
    // A client that speaks HTTP/2 but never answers a PING: a peer that
    // vanished without FIN or RST looks the same to apilb.
    let tcp = TcpStream::connect(l7.addr()).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("kubernetes").unwrap();
    let mut mute = tokio_rustls::TlsConnector::from(l7.tls(None, &[b"h2"]))
        .connect(name, tcp)
        .await
        .unwrap();
    let t = Instant::now();
    mute.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    let (mut pings, mut first_ping) = (0, None);
    let ended = tokio::time::timeout(Duration::from_secs(15), async {
        while let Some((kind, flags, _)) = read_frame(&mut mute).await {
            match (kind, flags & 1) {
                // The server's SETTINGS: acknowledged, as a client must.
                (4, 0) => mute.write_all(b"\0\0\0\x04\x01\0\0\0\0").await.unwrap(),
                (6, 0) => {
                    pings += 1;
                    first_ping.get_or_insert(t.elapsed());
                }
                _ => {}
            }
        }
    })
    .await;
    let after = t.elapsed();
    assert!(ended.is_ok(), "the mute client is still open after 15s");
    assert_eq!(pings, 1, "one unanswered PING, then the close");
    let first = first_ping.unwrap();
    assert!(
        first >= Duration::from_millis(800) && first < Duration::from_secs(5),
        "first PING after {first:?} (interval 1s)"
    );
    assert!(
        after - first >= Duration::from_millis(800) && after - first < Duration::from_secs(5),
        "closed {:?} after the PING (timeout 1s)",
        after - first
    );
    // The client that answers went through the same rounds and still serves.
    let req = hyper::Request::get(format!("https://{}/version", l7.addr()))
        .body(Empty::new())
        .unwrap();
    assert_eq!(alive.send_request(req).await.unwrap().status(), 200);
    l7.h.shutdown();
    l7.h.wait().await;
}

#[tokio::test]
async fn a_killed_backend_costs_no_request() {
    let l7 = L7::start(false, "https", "").await;
    let tls = l7.tls(None, &[b"http/1.1"]);
    for _ in 0..6 {
        assert_eq!(
            https_get(l7.addr(), "/version", tls.clone())
                .await
                .unwrap()
                .status,
            200
        );
    }
    l7.fakes[0].kill();
    for i in 0..200 {
        let r = https_get(l7.addr(), "/version", tls.clone())
            .await
            .unwrap_or_else(|e| panic!("request {i} failed: {e}"));
        assert_eq!(r.status, 200, "request {i}");
        assert_ne!(r.server.as_deref(), Some("api-1"));
    }
    l7.h.shutdown();
    l7.h.wait().await;
}

#[tokio::test]
async fn http_mode_config_is_validated() {
    let pki = Pki::new();
    let base = "frontends:\n  - name: f\n    listen: 127.0.0.1:0\n    mode: http\n    pool: p\n";
    let pool = "pools:\n  - name: p\n    servers: ['127.0.0.1:6443']\n";
    let e = apilb::config::parse(&format!("{base}{pool}"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("frontends[0].tls: is required"), "{e}");
    let tls = format!(
        "    tls:\n      cert_file: {}\n      key_file: {}\n",
        pki.dir.path().join("server.crt").display(),
        pki.dir.path().join("server.key").display()
    );
    let e = apilb::config::parse(&format!("{base}{tls}{pool}"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("pools[0].tls.ca_file: is required"), "{e}");
    let ok = format!(
        "{base}{tls}{pool}    tls:\n      ca_file: {}\n",
        pki.ca_file.display()
    );
    let cfg = apilb::config::parse(&ok).unwrap();
    assert_eq!(
        cfg.frontends[0].http.as_ref().unwrap().request_timeout,
        Duration::from_secs(60)
    );
    let e =
        apilb::config::parse(&ok.replace("mode: http\n", "mode: tcp\n    request_timeout: 5s\n"))
            .unwrap_err()
            .to_string();
    assert!(
        e.contains("frontends[0].request_timeout: only used with mode: http"),
        "{e}"
    );
    let h = cfg.frontends[0].http.as_ref().unwrap();
    assert_eq!(
        (h.http2_keepalive_interval, h.http2_keepalive_timeout),
        (Duration::from_secs(30), Duration::from_secs(20))
    );
    // The error for `ok` with `keys` added to the frontend.
    let refused = |keys: &str| {
        let yaml = ok.replace("mode: http\n", &format!("mode: http\n{keys}"));
        apilb::config::parse(&yaml).unwrap_err().to_string()
    };
    let e = refused("    http2_keepalive_interval: 0s\n    http2_keepalive_timeout: soon\n");
    assert!(
        e.contains("frontends[0].http2_keepalive_interval: must be longer than 0"),
        "{e}"
    );
    assert!(
        e.contains("frontends[0].http2_keepalive_timeout: invalid duration"),
        "{e}"
    );
    let e = refused("    http2_keepalive_interval: 25h\n");
    assert!(
        e.contains("frontends[0].http2_keepalive_interval: must be at most 24h"),
        "{e}"
    );
}

async fn h2_client<B>(l7: &L7) -> hyper::client::conn::http2::SendRequest<B>
where
    B: hyper::body::Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tcp = TcpStream::connect(l7.addr()).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("kubernetes").unwrap();
    let tls = tokio_rustls::TlsConnector::from(l7.tls(None, &[b"h2"]))
        .connect(name, tcp)
        .await
        .unwrap();
    assert_eq!(
        tls.get_ref().1.alpn_protocol(),
        Some(&b"h2"[..]),
        "apilb negotiates HTTP/2"
    );
    let (send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    send
}

#[tokio::test]
async fn a_long_lived_client_connection_follows_a_reload_that_removes_a_server() {
    let l7 = L7::start(false, "https", "").await;
    let mut send = h2_client(&l7).await;
    let removed = l7.fakes[0].addr();
    let yaml = l7.yaml.replace(&format!("      - {removed}\n"), "");
    assert_ne!(yaml, l7.yaml);
    l7.h.apply(apilb::config::parse(&yaml).unwrap())
        .await
        .unwrap();
    for _ in 0..30 {
        let req = hyper::Request::get(format!("https://{}/whoami", l7.addr()))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_ne!(
            resp.headers()["x-fake-server"],
            "api-1",
            "a removed server got a request on an old connection"
        );
        resp.into_body().collect().await.unwrap();
    }
    l7.h.shutdown();
    l7.h.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_to_a_hung_backend_ends_after_close_after_down_and_streams_are_counted() {
    let l7 = L7::start_with(false, "https", "", "      close_after_down: 1s\n").await;
    let admin = l7.h.admin_addr().unwrap();
    let mut send = h2_client(&l7).await;
    let req = hyper::Request::get(format!(
        "https://{}/api/v1/namespaces?watch=true",
        l7.addr()
    ))
    .body(Empty::<Bytes>::new())
    .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let server = resp.headers()["x-fake-server"]
        .to_str()
        .unwrap()
        .to_string();
    let mut body = resp.into_body();
    assert!(next_frame(&mut body, Duration::from_secs(5))
        .await
        .is_some());
    let (_, m) = admin_get(admin, "/metrics").await;
    assert_eq!(
        metric(&m, "apilb_http_active_streams{frontend=\"fe\"}"),
        Some(1.0),
        "an open watch is an active stream"
    );
    let fake = l7.fakes.iter().find(|f| f.name() == server).unwrap();
    fake.set_hang(true);
    let t = Instant::now();
    let mut events = 1;
    while next_frame(&mut body, Duration::from_secs(10))
        .await
        .is_some()
    {
        events += 1;
    }
    assert!(
        events < 30,
        "the stream was cut before its natural end ({events} events)"
    );
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "cut after {:?}",
        t.elapsed()
    );
    wait_for(
        "the stream gauge to drop",
        Duration::from_secs(5),
        || async {
            let (_, m) = admin_get(admin, "/metrics").await;
            (metric(&m, "apilb_http_active_streams{frontend=\"fe\"}") == Some(0.0)).then_some(())
        },
    )
    .await;
    l7.h.shutdown();
    l7.h.wait().await;
}

/// POSTs `n` bytes to the fake, which answers with the length it read.
async fn post_len<B>(send: &mut B, n: usize, h2: bool, addr: SocketAddr) -> u64
where
    B: PostSender,
{
    let uri = if h2 {
        format!("https://{addr}/api/v1/namespaces/default/configmaps")
    } else {
        "/api/v1/namespaces/default/configmaps".to_string()
    };
    let req = hyper::Request::post(uri)
        .header("host", "kubernetes")
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(Bytes::from(vec![b'x'; n])))
        .unwrap();
    let resp = send.post(req).await;
    assert_eq!(resp.status(), 200, "POST of {n} bytes");
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    v["bodyBytes"].as_u64().unwrap()
}

trait PostSender {
    async fn post(
        &mut self,
        r: hyper::Request<http_body_util::Full<Bytes>>,
    ) -> hyper::Response<hyper::body::Incoming>;
}

impl PostSender for hyper::client::conn::http2::SendRequest<http_body_util::Full<Bytes>> {
    async fn post(
        &mut self,
        r: hyper::Request<http_body_util::Full<Bytes>>,
    ) -> hyper::Response<hyper::body::Incoming> {
        self.send_request(r).await.unwrap()
    }
}

impl PostSender for hyper::client::conn::http1::SendRequest<http_body_util::Full<Bytes>> {
    async fn post(
        &mut self,
        r: hyper::Request<http_body_util::Full<Bytes>>,
    ) -> hyper::Response<hyper::body::Incoming> {
        self.send_request(r).await.unwrap()
    }
}

/// Request bodies cross apilb whole: 60 KiB (kept for a resend) and 8 MiB
/// (streamed in the apiserver's 256 KiB stream window), from HTTP/2 and
/// HTTP/1.1 clients, to HTTP/2 apiservers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_of_60_kib_and_8_mib_arrive_whole_from_http1_and_http2_clients() {
    let l7 = L7::start(false, "https", "").await;
    let mut h2 = h2_client(&l7).await;
    let mut h1 = tls_http1(l7.addr(), l7.tls(None, &[b"http/1.1"]))
        .await
        .unwrap();
    for n in [0, 60 * 1024, 8 * 1024 * 1024] {
        let got = tokio::time::timeout(
            Duration::from_secs(20),
            post_len(&mut h2, n, true, l7.addr()),
        )
        .await
        .expect("HTTP/2 POST within 20 s");
        assert_eq!(got, n as u64, "HTTP/2 client, {n} bytes");
        let got = tokio::time::timeout(
            Duration::from_secs(20),
            post_len(&mut h1, n, false, l7.addr()),
        )
        .await
        .expect("HTTP/1.1 POST within 20 s");
        assert_eq!(got, n as u64, "HTTP/1.1 client, {n} bytes");
    }
    l7.h.shutdown();
    l7.h.wait().await;
}

/// An HTTP/1.1 Host that makes no URI cannot go to an HTTP/2 apiserver: it
/// is answered 400 by apilb, and it costs no upstream connection (before,
/// h2 refused it and each such request retired up to six connections).
#[tokio::test]
async fn a_host_that_makes_no_uri_is_a_400_and_retires_no_upstream_connection() {
    let l7 = L7::start(false, "tcp", "").await;
    let served = |l7: &L7| l7.fakes.iter().map(|f| f.requests()).sum::<usize>();
    let conns = |m: &str, l7: &L7| -> f64 {
        l7.fakes
            .iter()
            .map(|f| {
                let s = format!(
                    "apilb_backend_upstream_connections{{pool=\"p\",server=\"{}\"}}",
                    f.addr()
                );
                metric(m, &s).unwrap_or(0.0)
            })
            .sum()
    };
    let get = |host: &'static str| {
        format!("GET /version HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
    };
    let ask = |req: String| {
        let l7 = &l7;
        async move {
            let mut s = l7.raw().await;
            s.write_all(req.as_bytes()).await.unwrap();
            let mut resp = Vec::new();
            tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut resp))
                .await
                .expect("an answer within 5 s")
                .unwrap();
            String::from_utf8_lossy(&resp).into_owned()
        }
    };
    for _ in 0..3 {
        assert!(ask(get("kubernetes")).await.starts_with("HTTP/1.1 200"));
    }
    let admin = l7.h.admin_addr().unwrap();
    let before = conns(&admin_get(admin, "/metrics").await.1, &l7);
    assert!(before >= 1.0, "the valid requests opened connections");
    let served_before = served(&l7);
    for _ in 0..10 {
        let text = ask(get("a b")).await;
        assert!(text.starts_with("HTTP/1.1 400"), "{text}");
        assert!(text.contains("Host header"), "{text}");
    }
    assert_eq!(served(&l7), served_before, "nothing reached a backend");
    let after = conns(&admin_get(admin, "/metrics").await.1, &l7);
    assert_eq!(after, before, "upstream connections were retired");
    assert!(ask(get("kubernetes")).await.starts_with("HTTP/1.1 200"));
    l7.h.shutdown();
    l7.h.wait().await;
}
