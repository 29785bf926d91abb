//! L7 at cluster scale, against fakes that enforce what kube-apiserver does
//! (100 streams per connection, Go's answer to a stream beyond it, 256 KiB
//! windows): many watches, GOAWAY storms, slow and stalled readers, tunnels
//! against max_connections, cut responses seen as errors, reloads that keep
//! upstream connections.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use apilb::demo::{FakeApiserver, FakeOptions};
use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2::SendRequest;
use tokio::net::TcpStream;

/// kube-apiserver's default SETTINGS_MAX_CONCURRENT_STREAMS.
const KUBE_MAX_STREAMS: u32 = 100;

struct Scale {
    pki: Pki,
    fakes: Vec<FakeApiserver>,
    yaml: String,
}

impl Scale {
    /// Three fakes with kube-apiserver's stream limit; `tune` adjusts their options.
    async fn fakes(tune: impl Fn(&mut FakeOptions)) -> Self {
        let pki = Pki::new();
        let mut fakes = Vec::new();
        for i in 1..=3 {
            let mut o = pki.fake_options(&format!("api-{i}"));
            o.max_concurrent_streams = Some(KUBE_MAX_STREAMS);
            o.watch_interval = Duration::from_secs(1);
            tune(&mut o);
            fakes.push(FakeApiserver::start(o).await.unwrap());
        }
        let dir = pki.dir.path();
        let addrs: Vec<_> = fakes.iter().map(|f| f.addr()).collect();
        let ca = pki.ca_file.display();
        let yaml = format!(
            "admin:\n  listen: 127.0.0.1:0\nworkers: 1\nshutdown_grace: 1s\nfrontends:\n  - name: fe\n    listen: 127.0.0.1:0\n    mode: http\n    pool: p\n    tls:\n      cert_file: {}\n      key_file: {}\n\
             pools:\n  - name: p\n    servers:\n{}    tls:\n      ca_file: {ca}\n      server_name: kubernetes\n\
             \x20   health:\n      check: tcp\n      interval: 500ms\n      timeout: 250ms\n      rise: 1\n      fall: 2\n",
            dir.join("server.crt").display(),
            dir.join("server.key").display(),
            servers_yaml(&addrs),
        );
        Scale { pki, fakes, yaml }
    }

    fn tls(&self, alpn: &[u8]) -> Arc<rustls::ClientConfig> {
        let origin = std::path::Path::new("test");
        apilb::tls::ClientMaterial {
            ca: Some(apilb::tls::certs_from_pem(self.pki.ca.cert_pem.as_bytes(), origin).unwrap()),
            identity: None,
            insecure_skip_verify: false,
            alpn: vec![alpn.to_vec()],
        }
        .build()
        .unwrap()
    }

    async fn tls_conn(
        &self,
        addr: SocketAddr,
        alpn: &[u8],
    ) -> tokio_rustls::client::TlsStream<TcpStream> {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("kubernetes").unwrap();
        tokio_rustls::TlsConnector::from(self.tls(alpn))
            .connect(name, tcp)
            .await
            .unwrap()
    }

    /// An HTTP/2 client connection to apilb.
    async fn h2(&self, addr: SocketAddr) -> SendRequest<Full<Bytes>> {
        let tls = self.tls_conn(addr, b"h2").await;
        let (send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tls),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        send
    }

    fn check_limits(&self) {
        for f in &self.fakes {
            assert!(
                f.peak_streams() <= KUBE_MAX_STREAMS as usize,
                "{}: {} streams at once on one connection",
                f.name(),
                f.peak_streams()
            );
            assert_eq!(
                f.streams_over_limit(),
                0,
                "{}: streams over the limit",
                f.name()
            );
        }
    }
}

fn get(addr: SocketAddr, path: &str) -> hyper::Request<Full<Bytes>> {
    hyper::Request::get(format!("https://{addr}{path}"))
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// `n` GETs of /version on `clients` fresh HTTP/2 connections, all at once;
/// returns the slowest.
async fn gets_from_others(s: &Scale, addr: SocketAddr, clients: usize, n: usize) -> Duration {
    let mut tasks = Vec::new();
    for c in 0..clients {
        let send = s.h2(addr).await;
        for _ in 0..n / clients {
            let mut send = send.clone();
            tasks.push(tokio::spawn(async move {
                let t = Instant::now();
                let resp = send.send_request(get(addr, "/version")).await.unwrap();
                assert_eq!(resp.status(), 200, "client {c}");
                resp.into_body().collect().await.unwrap();
                t.elapsed()
            }));
        }
    }
    let mut slowest = Duration::ZERO;
    for t in tasks {
        slowest = slowest.max(t.await.unwrap());
    }
    slowest
}

fn upstream_conns(metrics: &str, f: &FakeApiserver) -> f64 {
    metric(
        metrics,
        &format!(
            "apilb_backend_upstream_connections{{pool=\"p\",server=\"{}\"}}",
            f.addr()
        ),
    )
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_1000_to_3_backends_with_100_streams_leave_200_gets_under_1s() {
    let s = Scale::fakes(|_| {}).await;
    let h = start_yaml(&s.yaml).await;
    let addr = fe(&h);
    // 1,000 watches on 20 client connections (50 streams each).
    let mut watches = Vec::new();
    for _ in 0..20 {
        let send = s.h2(addr).await;
        for _ in 0..50 {
            let mut send = send.clone();
            watches.push(tokio::spawn(async move {
                let resp = send
                    .send_request(get(addr, "/api/v1/namespaces?watch=true"))
                    .await
                    .unwrap();
                assert_eq!(resp.status(), 200);
                let mut body = resp.into_body();
                next_frame(&mut body, Duration::from_secs(20))
                    .await
                    .expect("first watch event");
                body
            }));
        }
    }
    let mut bodies = Vec::new();
    for w in watches {
        bodies.push(w.await.unwrap());
    }
    assert_eq!(bodies.len(), 1000);

    let slowest = gets_from_others(&s, addr, 10, 200).await;
    assert!(
        slowest < Duration::from_secs(1),
        "slowest GET took {slowest:?}"
    );

    // Every watch still streams.
    let mut still = 0;
    for b in bodies.iter_mut() {
        if next_frame(b, Duration::from_secs(10)).await.is_some() {
            still += 1;
        }
    }
    assert_eq!(still, 1000, "watches still streaming");
    let (_, m) = admin_get(h.admin_addr().unwrap(), "/metrics").await;
    for f in &s.fakes {
        let n = upstream_conns(&m, f);
        eprintln!(
            "{}: {n} upstream connections, at most {} streams on one, slowest GET {slowest:?}",
            f.name(),
            f.peak_streams()
        );
        assert!(n >= 4.0, "{}: {n} upstream connections", f.name());
    }
    s.check_limits();
    drop(bodies);
    h.shutdown();
    h.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goaway_at_5_percent_2000_mixed_requests_fail_none_and_write_once() {
    let s = Scale::fakes(|o| o.goaway_percent = 5).await;
    let h = start_yaml(&s.yaml).await;
    let addr = fe(&h);
    let methods = ["GET", "POST", "PUT", "DELETE"];
    let mut clients = Vec::new();
    for _ in 0..8 {
        clients.push(s.h2(addr).await);
    }
    let sem = Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = Vec::new();
    for i in 0..2000usize {
        let mut send = clients[i % clients.len()].clone();
        let permit = sem.clone().acquire_owned().await.unwrap();
        tasks.push(tokio::spawn(async move {
            let m = methods[i % 4];
            let (path, body) = if m == "GET" {
                ("/version".to_string(), Bytes::new())
            } else {
                (
                    format!("/api/v1/namespaces/default/configmaps/cm-{i}"),
                    Bytes::from(format!("{{\"data\":{{\"i\":\"{i}\"}}}}")),
                )
            };
            let req = hyper::Request::builder()
                .method(m)
                .uri(format!("https://{addr}{path}"))
                .header("x-request-id", i.to_string())
                .body(Full::new(body))
                .unwrap();
            let resp = send.send_request(req).await.unwrap();
            let status = resp.status();
            let text = resp.into_body().collect().await.unwrap().to_bytes();
            drop(permit);
            (m, path, i, status, text)
        }));
    }
    let mut failures = Vec::new();
    let mut expected = Vec::new();
    for t in tasks {
        let (m, path, i, status, text) = t.await.unwrap();
        if status != 200 {
            failures.push(format!(
                "{m} {path}: {status} {}",
                String::from_utf8_lossy(&text)
            ));
        }
        if m != "GET" {
            expected.push(format!("{m} {path} {i}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    let mut executed: HashMap<String, usize> = HashMap::new();
    for f in &s.fakes {
        for (k, n) in f.executed() {
            *executed.entry(k).or_default() += n;
        }
    }
    let goaways: usize = s.fakes.iter().map(|f| f.goaways()).sum();
    assert!(
        goaways >= 20,
        "only {goaways} GOAWAYs: the test did not exercise them"
    );
    let (_, m) = admin_get(h.admin_addr().unwrap(), "/metrics").await;
    let retried: f64 = s
        .fakes
        .iter()
        .filter_map(|f| {
            metric(
                &m,
                &format!(
                    "apilb_backend_refused_retried_total{{pool=\"p\",server=\"{}\"}}",
                    f.addr()
                ),
            )
        })
        .sum();
    eprintln!("{goaways} GOAWAYs, {retried} requests refused and sent again");
    assert_eq!(executed.len(), expected.len(), "distinct writes executed");
    for k in &expected {
        assert_eq!(executed.get(k), Some(&1), "{k} executed");
    }
    s.check_limits();
    h.shutdown();
    h.wait().await;
}

/// VmRSS of a process, in bytes.
fn rss(pid: i32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = s.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

/// The documented worst case for one slow or stalled response stream
/// (README, "L7 memory"): the upstream stream window, the client-side send
/// buffer (HTTP/2) or hyper's write buffer (HTTP/1.1), and TLS records.
const PER_SLOW_STREAM: u64 = 256 * 1024 + 80 * 1024 + 64 * 1024;

const BIG: u64 = 100_000_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_and_20kbps_readers_of_100mb_slow_only_themselves() {
    let s = Scale::fakes(|_| {}).await;
    let dir = s.pki.dir.path().to_path_buf();
    let cfg = dir.join("apilb.yaml");
    std::fs::write(&cfg, &s.yaml).unwrap();
    let d = Daemon::start(&cfg);
    let addr = d.frontend_addr("fe").await;
    let admin = d.admin_addr().await;
    // Warm up: the process's own steady state before the slow readers.
    gets_from_others(&s, addr, 4, 40).await;
    let base = rss(d.pid());
    let path = format!("/api/v1/configmaps?size={BIG}");
    let mut hold = Vec::new();
    // 5 HTTP/2 clients with a zero window: headers arrive, no data may.
    for _ in 0..5 {
        let tls = s.tls_conn(addr, b"h2").await;
        let (mut send, conn) =
            hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .initial_stream_window_size(0)
                .handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        let resp = send.send_request(get(addr, &path)).await.unwrap();
        assert_eq!(resp.status(), 200);
        hold.push(Box::new((send, resp)) as Box<dyn Send>);
    }
    // 5 HTTP/1.1 clients that send the request and never read.
    for _ in 0..5 {
        let mut tls = s.tls_conn(addr, b"http/1.1").await;
        tokio::io::AsyncWriteExt::write_all(
            &mut tls,
            format!("GET {path} HTTP/1.1\r\nhost: kubernetes\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        hold.push(Box::new(tls));
    }
    // 10 clients reading at 20 KB/s.
    let mut readers = Vec::new();
    for _ in 0..10 {
        let mut send = s.h2(addr).await;
        let req = get(addr, &path);
        readers.push(tokio::spawn(async move {
            let mut body = send.send_request(req).await.unwrap().into_body();
            let mut got = 0u64;
            while let Some(Ok(f)) = body.frame().await {
                if let Ok(d) = f.into_data() {
                    got += d.len() as u64;
                    tokio::time::sleep(Duration::from_secs_f64(d.len() as f64 / 20_000.0)).await;
                }
            }
            got
        }));
    }
    // Let the slow streams fill every buffer they can.
    wait_for("20 upstream streams", Duration::from_secs(10), || async {
        let (_, m) = admin_get(admin, "/metrics").await;
        let n: f64 = s
            .fakes
            .iter()
            .filter_map(|f| {
                metric(
                    &m,
                    &format!(
                        "apilb_backend_upstream_streams{{pool=\"p\",server=\"{}\"}}",
                        f.addr()
                    ),
                )
            })
            .sum();
        (n >= 20.0).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let slowest = gets_from_others(&s, addr, 10, 200).await;
    assert!(
        slowest < Duration::from_secs(1),
        "slowest GET took {slowest:?}"
    );
    let grown = rss(d.pid()).saturating_sub(base);
    // The documented bound for 20 slow streams, plus 16 MiB for the
    // 14 client connections' TLS state and allocator slack.
    let bound = 20 * PER_SLOW_STREAM + 16 * 1024 * 1024;
    eprintln!(
        "apilb RSS grew {} KiB with 20 slow readers of 100 MB (bound {} KiB)",
        grown / 1024,
        bound / 1024
    );
    assert!(grown < bound, "RSS grew {grown} bytes, bound {bound}");
    for r in &readers {
        assert!(!r.is_finished(), "a 20 KB/s reader finished 100 MB early");
    }
    for r in readers {
        r.abort();
    }
    drop(hold);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_leaves_the_pool_alone_opens_no_connection_to_its_3_backends() {
    let s = Scale::fakes(|_| {}).await;
    // No health probes: every connection the fakes see is an upstream one.
    let yaml = s.yaml.replace("check: tcp", "check: none");
    let cfg = s.pki.dir.path().join("apilb.yaml");
    std::fs::write(&cfg, &yaml).unwrap();
    let h = start_file(&cfg).await;
    let addr = fe(&h);
    gets_from_others(&s, addr, 3, 60).await;
    let before: Vec<usize> = s.fakes.iter().map(|f| f.connections()).collect();
    assert!(before.iter().all(|&n| n >= 1), "{before:?}");
    // Change the frontend only (its request_timeout), then reload.
    write_atomic(
        &cfg,
        &yaml.replace(
            "    mode: http\n",
            "    mode: http\n    request_timeout: 30s\n",
        ),
    );
    h.reload().await.unwrap();
    gets_from_others(&s, addr, 3, 60).await;
    let after: Vec<usize> = s.fakes.iter().map(|f| f.connections()).collect();
    assert_eq!(
        after, before,
        "TLS handshakes to the backends after a reload that left the pool alone"
    );
    // A reload that changes the pool's TLS settings builds new connections.
    write_atomic(
        &cfg,
        &yaml.replace(
            "      server_name: kubernetes\n",
            "      server_name: localhost\n",
        ),
    );
    h.reload().await.unwrap();
    gets_from_others(&s, addr, 3, 60).await;
    let changed: Vec<usize> = s.fakes.iter().map(|f| f.connections()).collect();
    assert!(
        changed.iter().zip(&after).all(|(c, a)| c > a),
        "{changed:?} vs {after:?}"
    );
    h.shutdown();
    h.wait().await;
}

/// Runs curl on a watch through apilb; returns it once the first event arrived.
async fn curl_watch(s: &Scale, addr: SocketAddr, proto: &str) -> tokio::process::Child {
    use tokio::io::AsyncBufReadExt;
    let curl = require_tool("curl").expect("curl");
    let mut child = tokio::process::Command::new(curl)
        .args(["-sS", "-N", proto, "--cacert"])
        .arg(&s.pki.ca_file)
        .arg("--resolve")
        .arg(format!("kubernetes:{}:127.0.0.1", addr.port()))
        .arg(format!(
            "https://kubernetes:{}/api/v1/namespaces?watch=true",
            addr.port()
        ))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out = tokio::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(10), out.read_line(&mut line))
        .await
        .expect("first watch event")
        .unwrap();
    assert!(line.contains("ADDED"), "{line}");
    tokio::spawn(async move {
        let mut sink = Vec::new();
        let _ = tokio::io::AsyncReadExt::read_to_end(&mut out, &mut sink).await;
    });
    child
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_apilb_cuts_is_an_error_to_curl_over_http1_and_http2() {
    if require_tool("curl").is_none() {
        return;
    }
    let s = Scale::fakes(|_| {}).await;
    let h = start_yaml(&s.yaml).await;
    let addr = fe(&h);
    for proto in ["--http1.1", "--http2"] {
        let mut child = curl_watch(&s, addr, proto).await;
        // What close_after_down, drain_timeout and a removed server do.
        for b in &h.shared().snapshot.load().pools["p"].backends {
            b.close_connections();
        }
        let out = tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .expect("curl ends after the cut")
            .unwrap();
        let mut err = String::new();
        tokio::io::AsyncReadExt::read_to_string(child.stderr.as_mut().unwrap(), &mut err)
            .await
            .unwrap();
        assert!(
            !out.success(),
            "{proto}: curl saw a clean end: {out:?} {err}"
        );
        eprintln!("{proto}: curl {out}: {}", err.trim());
    }
    h.shutdown();
    h.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_hold_2_of_2_max_connections_until_they_close() {
    let s = Scale::fakes(|_| {}).await;
    let yaml = s.yaml.replace(
        "    mode: http\n",
        "    mode: http\n    max_connections: 2\n",
    );
    let h = start_yaml(&yaml).await;
    let addr = fe(&h);
    let admin = h.admin_addr().unwrap();
    let mut tunnels = Vec::new();
    for _ in 0..2 {
        let mut t = s.tls_conn(addr, b"http/1.1").await;
        tokio::io::AsyncWriteExt::write_all(
            &mut t,
            b"GET /api/v1/namespaces/default/pods/p/exec?command=cat HTTP/1.1\r\nHost: kubernetes\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n\r\n",
        )
        .await
        .unwrap();
        let mut head = vec![0u8; 12];
        tokio::io::AsyncReadExt::read_exact(&mut t, &mut head)
            .await
            .unwrap();
        assert_eq!(&head, b"HTTP/1.1 101");
        tunnels.push(t);
    }
    let gauge =
        |m: &str, name: &str| metric(m, &format!("{name}{{frontend=\"fe\"}}")).unwrap_or(0.0);
    let (_, m) = admin_get(admin, "/metrics").await;
    assert_eq!(gauge(&m, "apilb_frontend_active_connections"), 2.0, "{m}");
    assert_eq!(gauge(&m, "apilb_http_active_tunnels"), 2.0);
    // A third client finds no slot: it is closed without an answer.
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("kubernetes").unwrap();
    let third = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_rustls::TlsConnector::from(s.tls(b"http/1.1")).connect(name, tcp),
    )
    .await
    .expect("the third connection is closed, not left hanging");
    assert!(
        third.is_err(),
        "a third connection got through with max_connections: 2"
    );
    drop(tunnels);
    wait_for("tunnels released", Duration::from_secs(5), || async {
        let (_, m) = admin_get(admin, "/metrics").await;
        (gauge(&m, "apilb_frontend_active_connections") == 0.0
            && gauge(&m, "apilb_http_active_tunnels") == 0.0)
            .then_some(())
    })
    .await;
    h.shutdown();
    h.wait().await;
}

/// `pools[].upstream`: with at most 1 connection per server and servers
/// that allow 2 streams each, 6 watches fill the 3 backends; the next request
/// waits for a free stream and gets 503 after `queue_timeout` (busy, not
/// down: no failover, backends stay up), and is served once streams free up.
#[tokio::test]
async fn a_full_pool_queues_then_answers_503_after_queue_timeout() {
    let mut s = Scale::fakes(|o| o.max_concurrent_streams = Some(2)).await;
    s.yaml.push_str(
        "    upstream:\n      max_connections_per_server: 1\n      max_queued: 8\n      queue_timeout: 300ms\n",
    );
    let h = start_yaml(&s.yaml).await;
    let addr = fe(&h);
    let send = s.h2(addr).await;
    let mut watches = Vec::new();
    for i in 0..6 {
        let resp = send
            .clone()
            .send_request(get(addr, "/api/v1/namespaces?watch=true"))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "watch {i}");
        watches.push(resp);
    }
    let t = Instant::now();
    let resp = send
        .clone()
        .send_request(get(addr, "/version"))
        .await
        .unwrap();
    let waited = t.elapsed();
    assert_eq!(resp.status(), 503, "a request beyond the full pool");
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains("queue_timeout"), "{body}");
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(3),
        "waited {waited:?}"
    );
    let m = String::from_utf8(h.shared().metrics.render()).unwrap();
    for f in &s.fakes {
        assert_eq!(
            upstream_conns(&m, f),
            1.0,
            "{}: one connection at most\n{m}",
            f.name()
        );
    }
    assert!((0..3).all(|i| backend_up(&h, "p", i)), "busy is not down");
    s.check_limits();
    drop(watches);
    let resp = wait_for(
        "a free stream after the watches end",
        Duration::from_secs(5),
        || {
            let mut send = send.clone();
            async move {
                let r = send.send_request(get(addr, "/version")).await.ok()?;
                (r.status() == 200).then_some(r)
            }
        },
    )
    .await;
    assert_eq!(resp.status(), 200);
    h.shutdown();
    h.wait().await;
}

/// An HTTP/2 client connection (the h2 crate, no pool around it) whose
/// task the test can abort, which closes its TCP connection.
async fn h2_raw(
    s: &Scale,
    addr: SocketAddr,
) -> (
    h2::client::SendRequest<Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let tls = s.tls_conn(addr, b"h2").await;
    let (send, conn) = within("the HTTP/2 handshake", h2::client::handshake(tls))
        .await
        .unwrap();
    (send, tokio::spawn(conn))
}

/// `f`'s output, or a panic naming `what` after 20 s.
async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), f)
        .await
        .unwrap_or_else(|_| panic!("{what} took over 20s"))
}

/// Opens a watch and waits for its first event.
async fn raw_watch(send: h2::client::SendRequest<Bytes>, addr: SocketAddr) -> h2::RecvStream {
    let req = http::Request::get(format!("https://{addr}/api/v1/namespaces?watch=true"))
        .body(())
        .unwrap();
    let mut send = within("a free stream", send.ready()).await.unwrap();
    let (resp, _) = send.send_request(req, true).unwrap();
    let resp = within("a watch's response", resp).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    next_data(&mut body).await.expect("first watch event");
    body
}

async fn next_data(body: &mut h2::RecvStream) -> Option<Bytes> {
    let d = tokio::time::timeout(Duration::from_secs(20), body.data()).await;
    let d = d.ok()??.ok()?;
    let _ = body.flow_control().release_capacity(d.len());
    Some(d)
}

/// Waits until apilb counts `want` L7 streams in flight.
async fn active_streams(h: &apilb::Handle, want: i64, what: &str) {
    let g = h.shared().metrics.http_active("fe");
    wait_for(what, Duration::from_secs(15), || {
        let n = g.get();
        async move { (n == want).then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_1000_reset_or_disconnected_by_clients_free_their_streams() {
    let s = Scale::fakes(|_| {}).await;
    let h = start_yaml(&s.yaml).await;
    let addr = fe(&h);
    // 1,000 endless watches on 10 client connections (100 streams each).
    let mut conns = Vec::new();
    let mut watches = Vec::new();
    for _ in 0..10 {
        let (send, task) = h2_raw(&s, addr).await;
        conns.push(task);
        for _ in 0..100 {
            watches.push(tokio::spawn(raw_watch(send.clone(), addr)));
        }
    }
    let mut bodies = Vec::new();
    for w in watches {
        bodies.push(w.await.unwrap());
    }
    active_streams(&h, 1000, "1,000 watches in flight").await;
    // Every client resets half of its watches (RST_STREAM CANCEL)...
    let kept: Vec<_> = bodies
        .into_iter()
        .enumerate()
        .filter_map(|(i, b)| (i % 2 == 0).then_some(b))
        .collect();
    active_streams(&h, 500, "the 500 reset watches to end").await;
    // ...then half of the clients close their TCP connections.
    for c in &conns[..5] {
        c.abort();
    }
    active_streams(&h, 250, "the watches of 5 closed connections to end").await;
    // The other 250 still stream.
    let mut still = 0;
    for mut b in kept.into_iter().skip(250) {
        if next_data(&mut b).await.is_some() {
            still += 1;
        }
    }
    assert_eq!(still, 250, "watches still streaming");
    active_streams(&h, 0, "every watch to end").await;
    s.check_limits();
    h.shutdown();
    h.wait().await;
}

/// Opens `n` streams and resets each at once, the way a rapid-reset attack
/// does: on a single-threaded runtime they go out together, before apilb
/// takes any of them up.
async fn open_and_reset(
    mut send: h2::client::SendRequest<Bytes>,
    addr: SocketAddr,
    n: usize,
) -> h2::client::SendRequest<Bytes> {
    for _ in 0..n {
        send = within("a free stream", send.ready()).await.unwrap();
        let req = http::Request::get(format!("https://{addr}/version"))
            .body(())
            .unwrap();
        let (_resp, mut stream) = send.send_request(req, false).unwrap();
        stream.send_reset(h2::Reason::CANCEL);
    }
    send
}

#[tokio::test]
async fn a_reset_flood_of_100_streams_closes_that_connection_only() {
    let s = Scale::fakes(|_| {}).await;
    let h = start_yaml(&s.yaml).await;
    let addr = fe(&h);
    let (send, conn) = h2_raw(&s, addr).await;
    // 10 resets are a client changing its mind: the connection still serves.
    let send = open_and_reset(send, addr, 10).await;
    let req = http::Request::get(format!("https://{addr}/version"))
        .body(())
        .unwrap();
    let ready = within("a free stream", send.clone().ready()).await;
    let (resp, _) = ready.unwrap().send_request(req, true).unwrap();
    assert_eq!(within("a GET", resp).await.unwrap().status(), 200);
    // 100 are an attack: GOAWAY (ENHANCE_YOUR_CALM) and the connection closes.
    let _send = open_and_reset(send, addr, 100).await;
    let end = tokio::time::timeout(Duration::from_secs(10), conn)
        .await
        .expect("apilb closes the flooding connection")
        .unwrap();
    let e = end.expect_err("the connection ends with an error");
    assert!(
        e.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM) || e.is_io(),
        "{e}"
    );
    // Everyone else is served.
    let slowest = gets_from_others(&s, addr, 2, 20).await;
    assert!(slowest < Duration::from_secs(5), "{slowest:?}");
    h.shutdown();
    h.wait().await;
}
