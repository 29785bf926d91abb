//! Trust boundaries and config safety (issue 11): what `check` and reloads
//! refuse or warn about, bounded file reads, and what clients cannot do to
//! identity headers, forwarding headers and HTTP/1 framing.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

/// Runs `apilb check -c PATH` and returns (exit code, stdout, stderr, time taken).
/// A `check` that has not ended after 5 s is killed and fails the test.
fn check(path: &Path) -> (Option<i32>, String, String, Duration) {
    let t = Instant::now();
    let mut child = Command::new(apilb_bin())
        .args(["check", "-c"])
        .arg(path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    while child.try_wait().unwrap().is_none() {
        if t.elapsed() > Duration::from_secs(5) {
            let _ = child.kill();
            panic!("apilb check -c {} hung", path.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        t.elapsed(),
    )
}

/// An L7 config (TLS files in `dir`) whose pool skips upstream verification.
fn http_yaml(cert: &Path, key: &Path, extra_pool: &str) -> String {
    format!(
        "admin:\n  listen: 127.0.0.1:0\nfrontends:\n  - name: fe\n    listen: 127.0.0.1:0\n    mode: http\n    pool: p\n    tls:\n      cert_file: {}\n      key_file: {}\n\
         pools:\n  - name: p\n    servers: ['127.0.0.1:6443']\n    health:\n      check: none\n    tls:\n      insecure_skip_verify: true\n{extra_pool}",
        cert.display(),
        key.display()
    )
}

/// A serving certificate that expires `days` from now (negative: expired).
fn cert_expiring_in(dir: &Path, name: &str, days: i64) -> (PathBuf, PathBuf, i64) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    let not_after = unix_now() + days * 86_400;
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    p.not_before = epoch + Duration::from_secs((unix_now() - 400 * 86_400) as u64);
    p.not_after = epoch + Duration::from_secs(not_after as u64);
    let cert = p.self_signed(&key).unwrap();
    let c = dir.join(format!("{name}.crt"));
    let k = dir.join(format!("{name}.key"));
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c, k, not_after)
}

/// Starts apilb in-process from a file that only explicit reloads re-read.
async fn start_unwatched(path: &Path) -> apilb::Handle {
    let cfg = apilb::config::load(path).unwrap_or_else(|e| panic!("{e}"));
    let opts = apilb::Options {
        watch_config: false,
        ..Default::default()
    };
    apilb::start_with(cfg, opts).await.unwrap()
}

/// Point 4: `check` and a reload refuse a server_name that is no name, and a
/// pool naming apilb's own listen address.
#[tokio::test]
async fn check_and_reload_refuse_bad_server_names_and_loops() {
    let tmp = tempfile::tempdir().unwrap();
    let (c, k, _) = cert_expiring_in(tmp.path(), "srv", 300);
    let cfg = tmp.path().join("apilb.yaml");
    let good = http_yaml(&c, &k, "");
    let bad_name = good.replace(
        "insecure_skip_verify: true\n",
        "insecure_skip_verify: true\n      server_name: 'bad name!'\n",
    );
    std::fs::write(&cfg, &bad_name).unwrap();
    let (code, _, err, _) = check(&cfg);
    assert_eq!(code, Some(78), "{err}");
    assert!(
        err.contains(
            "pools[0].tls.server_name: \"bad name!\" is neither a DNS name nor an IP address"
        ),
        "{err}"
    );

    std::fs::write(&cfg, &good).unwrap();
    let h = start_unwatched(&cfg).await;
    std::fs::write(&cfg, &bad_name).unwrap();
    let e = h.reload().await.unwrap_err().to_string();
    assert!(e.contains("pools[0].tls.server_name"), "{e}");
    // A pool server on the frontend's own (wildcard) port is a loop.
    let port = closed_port().await.port();
    let looped = good
        .replace(
            "listen: 127.0.0.1:0\n    mode",
            &format!("listen: 0.0.0.0:{port}\n    mode"),
        )
        .replace("'127.0.0.1:6443'", &format!("'127.0.0.1:{port}'"));
    std::fs::write(&cfg, &looped).unwrap();
    let e = h.reload().await.unwrap_err().to_string();
    assert!(
        e.contains("pools[0].servers[0]") && e.contains("own listen addresses"),
        "{e}"
    );
    assert_eq!(reloads(&h), (0, 2), "both reloads refused");
    h.shutdown();
    h.wait().await;
}

/// Point 5: `check` warns about a certificate that expires within 30 days or
/// has expired, and the running daemon exports every file's expiry.
#[tokio::test]
async fn expiring_certificates_are_warned_about_and_exported() {
    let tmp = tempfile::tempdir().unwrap();
    let (c, k, not_after) = cert_expiring_in(tmp.path(), "soon", 10);
    let (ca, _, ca_after) = cert_expiring_in(tmp.path(), "ca-old", -3);
    let (far, far_key, _) = cert_expiring_in(tmp.path(), "far", 200);
    let cfg = tmp.path().join("apilb.yaml");
    let yaml = http_yaml(&c, &k, "").replace(
        "    tls:\n      insecure_skip_verify: true\n",
        &format!(
            "    tls:\n      ca_file: {}\n      front_proxy_cert_file: {}\n      front_proxy_key_file: {}\n",
            ca.display(),
            far.display(),
            far_key.display()
        ),
    );
    std::fs::write(&cfg, &yaml).unwrap();
    let (code, out, err, _) = check(&cfg);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.starts_with("ok:"), "{out}");
    assert!(
        err.contains(&format!(
            "warning: frontends[0].tls.cert_file: certificate {} expires in 9 days",
            c.display()
        )) || err.contains(&format!(
            "warning: frontends[0].tls.cert_file: certificate {} expires in 10 days",
            c.display()
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "warning: pools[0].tls.ca_file: certificate {} expired 3 days ago",
            ca.display()
        )),
        "{err}"
    );
    assert!(
        !err.contains("far.crt"),
        "200 days left is no warning: {err}"
    );

    let h = start_unwatched(&cfg).await;
    let (_, m) = admin_get(h.admin_addr().unwrap(), "/metrics").await;
    for (file, want) in [(&c, not_after), (&ca, ca_after)] {
        let series = format!(
            "apilb_tls_certificate_expiry_timestamp_seconds{{file=\"{}\"}}",
            file.display()
        );
        assert_eq!(metric(&m, &series), Some(want as f64), "{series}\n{m}");
    }
    assert!(m.contains(&format!("file=\"{}\"", far.display())));
    h.shutdown();
    h.wait().await;
}

/// Point 6: a FIFO or a device as a certificate, key or config file gets a
/// clear error at once; a FIFO never wedges later reloads; a symlink to a
/// regular file is fine; deep YAML is refused fast with its line and column.
#[tokio::test]
async fn special_files_and_deep_yaml_are_refused_within_a_second() {
    let tmp = tempfile::tempdir().unwrap();
    let (c, k, _) = cert_expiring_in(tmp.path(), "srv", 300);
    let fifo = tmp.path().join("fifo.crt");
    mkfifo(&fifo);
    let link = tmp.path().join("link.crt");
    std::os::unix::fs::symlink(&c, &link).unwrap();
    let cfg = tmp.path().join("apilb.yaml");

    for (cert, key, want) in [
        (&fifo, &k, "frontends[0].tls.cert_file: cannot read"),
        (
            &c,
            &PathBuf::from("/dev/zero"),
            "frontends[0].tls.key_file: cannot read /dev/zero: it is a character device",
        ),
    ] {
        std::fs::write(&cfg, http_yaml(cert, key, "")).unwrap();
        let (code, _, err, took) = check(&cfg);
        assert_eq!(code, Some(78), "{err}");
        assert!(err.contains(want), "{err}");
        assert!(took < Duration::from_secs(1), "check took {took:?}");
    }
    let (code, _, err, took) = check(&fifo);
    assert_eq!(code, Some(78));
    assert!(err.contains("it is a FIFO, not a regular file"), "{err}");
    assert!(took < Duration::from_secs(1), "{took:?}");

    // 200 KB of nesting: refused before serde_yaml spends its time on it.
    let deep = tmp.path().join("deep.yaml");
    std::fs::write(&deep, format!("frontends: {}", "[".repeat(200_000))).unwrap();
    let (code, _, err, took) = check(&deep);
    assert_eq!(code, Some(78));
    assert!(
        err.contains("nesting deeper than 64 levels at line 1 column"),
        "{err}"
    );
    assert!(took < Duration::from_secs(1), "{took:?}");

    // Running: a FIFO in a reload is refused at once, and the next good file loads.
    std::fs::write(&cfg, http_yaml(&link, &k, "")).unwrap();
    let h = start_unwatched(&cfg).await;
    std::fs::write(&cfg, http_yaml(&fifo, &k, "")).unwrap();
    let t = Instant::now();
    let e = tokio::time::timeout(Duration::from_secs(5), h.reload())
        .await
        .expect("a FIFO must not wedge the reload")
        .unwrap_err()
        .to_string();
    assert!(e.contains("FIFO"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(1));
    std::fs::write(&cfg, http_yaml(&link, &k, "    connect_attempts: 2\n")).unwrap();
    tokio::time::timeout(Duration::from_secs(5), h.reload())
        .await
        .unwrap()
        .unwrap();
    h.shutdown();
    h.wait().await;
}

/// A TLS backend (h2 and http/1.1) that answers every request with the
/// headers and trailers it received, as JSON.
struct Mirror {
    addr: std::net::SocketAddr,
    stop: tokio_util::sync::CancellationToken,
}

impl Drop for Mirror {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn as_json(h: &http::HeaderMap) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    for k in h.keys() {
        let v: Vec<_> = h
            .get_all(k)
            .iter()
            .map(|v| serde_json::Value::from(String::from_utf8_lossy(v.as_bytes())))
            .collect();
        m.insert(k.as_str().to_string(), v.into());
    }
    m.into()
}

async fn mirror(
    req: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<http_body_util::Full<bytes::Bytes>>, std::convert::Infallible> {
    use http_body_util::BodyExt;
    let (parts, body) = req.into_parts();
    let collected = body.collect().await.ok();
    let trailers = collected
        .as_ref()
        .and_then(|c| c.trailers().cloned())
        .unwrap_or_default();
    let v = serde_json::json!({
        "headers": as_json(&parts.headers),
        "trailers": as_json(&trailers),
        "body": collected.map(|c| String::from_utf8_lossy(&c.to_bytes()).into_owned()),
    });
    Ok(hyper::Response::new(http_body_util::Full::new(
        v.to_string().into(),
    )))
}

impl Mirror {
    async fn start(pki: &Pki) -> Self {
        let cfg = apilb::tls::server_config(
            pki.serving.cert_pem.as_bytes(),
            pki.serving.key_pem.as_bytes(),
            apilb::tls::ClientAuth::None,
            &[b"h2", b"http/1.1"],
        )
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        let s = stop.clone();
        tokio::spawn(async move {
            loop {
                let sock = tokio::select! {
                    _ = s.cancelled() => return,
                    r = listener.accept() => match r { Ok((x, _)) => x, Err(_) => continue },
                };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(sock).await else {
                        return;
                    };
                    let b = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    );
                    let _ = b
                        .serve_connection(
                            hyper_util::rt::TokioIo::new(tls),
                            hyper::service::service_fn(mirror),
                        )
                        .await;
                });
            }
        });
        Mirror { addr, stop }
    }
}

/// apilb with two L7 frontends (`fe`: defaults plus `strip_headers`, verified
/// client certificates; `fe2`: `forwarded_for: append`) in front of a Mirror.
struct Identity {
    pki: Pki,
    /// The CA of client certificates (client_ca_file).
    client_ca: (rcgen::Certificate, rcgen::KeyPair),
    _mirror: Mirror,
    h: apilb::Handle,
}

impl Identity {
    async fn start() -> Self {
        let pki = Pki::new();
        let m = Mirror::start(&pki).await;
        let dir = pki.dir.path();
        let (fp_crt, fp_key) = pki
            .ca
            .client("front-proxy-client", None)
            .unwrap()
            .write(dir, "fp")
            .unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "client-ca");
        let ca_cert = p.self_signed(&ca_key).unwrap();
        std::fs::write(dir.join("client-ca.crt"), ca_cert.pem()).unwrap();
        let tls = format!(
            "    tls:\n      cert_file: {}\n      key_file: {}\n      client_ca_file: {}\n",
            dir.join("server.crt").display(),
            dir.join("server.key").display(),
            dir.join("client-ca.crt").display()
        );
        let yaml = format!(
            "admin:\n  listen: 127.0.0.1:0\nfrontends:\n  - name: fe\n    listen: 127.0.0.1:0\n    mode: http\n    pool: p\n    strip_headers: [X-Custom-User]\n{tls}\
             \x20 - name: fe2\n    listen: 127.0.0.1:0\n    mode: http\n    pool: p\n    forwarded_for: append\n{tls}\
             pools:\n  - name: p\n    servers: ['{}']\n    health:\n      check: none\n    tls:\n      ca_file: {}\n      server_name: kubernetes\n      front_proxy_cert_file: {}\n      front_proxy_key_file: {}\n",
            m.addr,
            pki.ca_file.display(),
            fp_crt.display(),
            fp_key.display()
        );
        let h = start_yaml(&yaml).await;
        Identity {
            pki,
            client_ca: (ca_cert, ca_key),
            _mirror: m,
            h,
        }
    }

    fn tls(
        &self,
        identity: Option<&apilb::demo::Leaf>,
        alpn: &[u8],
    ) -> std::sync::Arc<rustls::ClientConfig> {
        let mut c = (*self.pki.client_config(identity)).clone();
        c.alpn_protocols = vec![alpn.to_vec()];
        std::sync::Arc::new(c)
    }

    async fn connect(
        &self,
        fe: &str,
        identity: Option<&apilb::demo::Leaf>,
        alpn: &[u8],
    ) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        let tcp = tokio::net::TcpStream::connect(self.h.frontend_addr(fe).unwrap())
            .await
            .unwrap();
        let name = rustls::pki_types::ServerName::try_from("kubernetes").unwrap();
        tokio_rustls::TlsConnector::from(self.tls(identity, alpn))
            .connect(name, tcp)
            .await
            .unwrap()
    }

    /// Writes one raw HTTP/1.1 request (with `Connection: close`) and returns
    /// the mirror's JSON.
    async fn h1_raw(
        &self,
        fe: &str,
        identity: Option<&apilb::demo::Leaf>,
        req: &str,
    ) -> serde_json::Value {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = self.connect(fe, identity, b"http/1.1").await;
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        let body = &text[text.find('{').unwrap()..=text.rfind('}').unwrap()];
        serde_json::from_str(body).unwrap()
    }
}

fn values<'a>(v: &'a serde_json::Value, part: &str, name: &str) -> Vec<&'a str> {
    v[part][name]
        .as_array()
        .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
        .unwrap_or_default()
}

/// A request body of fixed frames (data, then trailers).
struct Frames(std::collections::VecDeque<hyper::body::Frame<bytes::Bytes>>);

impl hyper::body::Body for Frames {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>> {
        std::task::Poll::Ready(self.0.pop_front().map(Ok))
    }
}

/// Point 8: every `X-Remote-*` header and every `strip_headers` name is
/// removed from the head and from HTTP/1.1 and HTTP/2 trailers.
#[tokio::test]
async fn identity_headers_are_removed_from_heads_and_trailers() {
    let t = Identity::start().await;
    let v = t
        .h1_raw(
            "fe",
            None,
            "POST /api/v1/namespaces HTTP/1.1\r\nHost: kubernetes\r\nConnection: close\r\nX-Remote-Uid: 0\r\nX-Remote-User: admin\r\nX-Custom-User: root\r\nX-Ok: 1\r\n\
             Transfer-Encoding: chunked\r\nTrailer: X-Remote-Uid, X-Custom-User, X-Ok-T\r\n\r\n5\r\nhello\r\n0\r\nX-Remote-Uid: 0\r\nX-Remote-Group: system:masters\r\nX-Custom-User: root\r\nX-Ok-T: 1\r\n\r\n",
        )
        .await;
    assert_eq!(v["body"], "hello");
    for name in ["x-remote-uid", "x-remote-user", "x-custom-user"] {
        assert!(values(&v, "headers", name).is_empty(), "{name}: {v}");
    }
    assert_eq!(values(&v, "headers", "x-ok"), ["1"]);
    for name in ["x-remote-uid", "x-remote-group", "x-custom-user"] {
        assert!(
            values(&v, "trailers", name).is_empty(),
            "trailer {name}: {v}"
        );
    }
    assert_eq!(values(&v, "trailers", "x-ok-t"), ["1"], "{v}");

    // HTTP/2: trailing HEADERS.
    let s = t.connect("fe", None, b"h2").await;
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(s),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-remote-uid", "0".parse().unwrap());
    trailers.insert("x-remote-extra-scopes", "all".parse().unwrap());
    trailers.insert("x-custom-user", "root".parse().unwrap());
    trailers.insert("x-ok-t", "2".parse().unwrap());
    let body = Frames(
        [
            hyper::body::Frame::data(bytes::Bytes::from_static(b"hi")),
            hyper::body::Frame::trailers(trailers),
        ]
        .into(),
    );
    let req = hyper::Request::post("https://kubernetes/api/v1/namespaces")
        .header("x-remote-uid", "0")
        .body(body)
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    use http_body_util::BodyExt;
    let b = resp.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(v["body"], "hi");
    assert!(values(&v, "headers", "x-remote-uid").is_empty(), "{v}");
    for name in ["x-remote-uid", "x-remote-extra-scopes", "x-custom-user"] {
        assert!(
            values(&v, "trailers", name).is_empty(),
            "h2 trailer {name}: {v}"
        );
    }
    assert_eq!(values(&v, "trailers", "x-ok-t"), ["2"], "{v}");
    t.h.shutdown();
    t.h.wait().await;
}

/// Point 9: X-Forwarded-For, X-Real-Ip and Forwarded from the client are
/// dropped by default (X-Forwarded-For is the client's address only), and
/// kept with the address appended under `forwarded_for: append`.
#[tokio::test]
async fn forwarding_headers_are_replaced_by_default_and_appended_on_request() {
    let t = Identity::start().await;
    let req = "GET /version HTTP/1.1\r\nHost: kubernetes\r\nConnection: close\r\nX-Forwarded-For: 6.6.6.6\r\nX-Real-Ip: 7.7.7.7\r\nForwarded: for=8.8.8.8\r\n\r\n";
    let v = t.h1_raw("fe", None, req).await;
    assert_eq!(
        values(&v, "headers", "x-forwarded-for"),
        ["127.0.0.1"],
        "{v}"
    );
    assert!(values(&v, "headers", "x-real-ip").is_empty(), "{v}");
    assert!(values(&v, "headers", "forwarded").is_empty(), "{v}");
    let v = t.h1_raw("fe2", None, req).await;
    assert_eq!(
        values(&v, "headers", "x-forwarded-for"),
        ["6.6.6.6, 127.0.0.1"],
        "{v}"
    );
    assert_eq!(values(&v, "headers", "x-real-ip"), ["7.7.7.7"]);
    t.h.shutdown();
    t.h.wait().await;
}

/// Point 10: several CNs (the last wins, as in Go), a BMPString CN, several
/// O (each a group) and a UTF8String O map as the apiserver maps them.
#[tokio::test]
async fn client_certificates_map_as_the_apiserver_maps_them() {
    use rcgen::{DnType, DnValue};
    let t = Identity::start().await;
    let cn = DnType::CustomDnType(vec![2, 5, 4, 3]);
    let o = DnType::CustomDnType(vec![2, 5, 4, 10]);
    let cert = |dn: Vec<(DnType, DnValue)>| {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        for (k, v) in dn {
            p.distinguished_name.push(k, v);
        }
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let key = rcgen::KeyPair::generate().unwrap();
        let c = p.signed_by(&key, &t.client_ca.0, &t.client_ca.1).unwrap();
        apilb::demo::Leaf {
            cert_pem: c.pem(),
            key_pem: key.serialize_pem(),
        }
    };
    let bmp = |s: &str| DnValue::BmpString(s.try_into().unwrap());
    let cases = [
        (
            vec![
                (DnType::CommonName, DnValue::from("first")),
                (DnType::OrganizationName, DnValue::from("dev")),
                (cn.clone(), bmp("jänë")),
                (o.clone(), bmp("öps")),
            ],
            "jänë",
            vec!["dev", "öps"],
        ),
        (
            vec![
                (
                    DnType::OrganizationName,
                    DnValue::PrintableString("a".try_into().unwrap()),
                ),
                (DnType::CommonName, DnValue::Utf8String("łukasz".into())),
            ],
            "łukasz",
            vec!["a"],
        ),
    ];
    for (dn, user, groups) in cases {
        let leaf = cert(dn);
        let v = t
            .h1_raw(
                "fe",
                Some(&leaf),
                "GET /version HTTP/1.1\r\nHost: kubernetes\r\nConnection: close\r\n\r\n",
            )
            .await;
        assert_eq!(values(&v, "headers", "x-remote-user"), [user], "{v}");
        assert_eq!(values(&v, "headers", "x-remote-group"), groups, "{v}");
    }
    t.h.shutdown();
    t.h.wait().await;
}

/// Point 12: the admin server is no proxy: absolute-form requests get 404.
#[tokio::test]
async fn the_admin_server_answers_absolute_form_with_404() {
    let echo = EchoBackend::start("b1").await;
    let h = start_yaml(&l4_yaml(&[echo.addr], "    health:\n      check: none\n")).await;
    let admin = h.admin_addr().unwrap();
    for path in ["/readyz", "/metrics", "/healthz"] {
        assert_eq!(admin_get(admin, path).await.0, 200, "{path}");
        for prefix in ["http://x", "http://127.0.0.1"] {
            let (code, body) = admin_get(admin, &format!("{prefix}{path}")).await;
            assert_eq!(code, 404, "{prefix}{path}: {body}");
        }
    }
    h.shutdown();
    h.wait().await;
}

/// Writes `input` on a fresh TLS HTTP/1.1 connection and reads until apilb closes it.
async fn exchange(t: &Identity, input: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = t.connect("fe", None, b"http/1.1").await;
    s.write_all(input.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("apilb closes the connection")
        .ok();
    String::from_utf8_lossy(&out).into_owned()
}

fn statuses(text: &str) -> Vec<&str> {
    text.match_indices("HTTP/1.1 ")
        .map(|(i, _)| &text[i + 9..i + 12])
        .collect()
}

/// Point 11: a CL+TE request is refused after a declined upgrade and behind
/// a bare-LF head; a refusal comes after the earlier pipelined answer, which
/// arrives whole; a bad chunk size is a 400 counted as a client error.
#[tokio::test]
async fn every_http1_request_is_checked_and_answered_in_order() {
    let t = Identity::start().await;
    let smuggle = "POST /api/v1/namespaces HTTP/1.1\r\nHost: k\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
    for (first, name) in [
        ("GET /api/v1/namespaces/d/pods/p/exec HTTP/1.1\r\nHost: k\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n\r\n", "declined upgrade"),
        ("GET /version HTTP/1.1\nHost: k\n\n", "bare-LF head"),
        ("GET /version HTTP/1.1\r\nHost: k\r\n\r\n", "pipelined"),
    ] {
        let back = exchange(&t, &format!("{first}{smuggle}")).await;
        assert_eq!(statuses(&back), ["200", "400"], "{name}: {back}");
        let first_body = back.find("\"headers\"").expect("the first answer is whole");
        assert!(first_body < back.rfind("HTTP/1.1 400").unwrap(), "{name}: {back}");
        assert!(!back.contains("\"body\":\"\"}HTTP/1.1 200"), "{name}: one answer only");
    }
    let admin = t.h.admin_addr().unwrap();
    let bad_requests = |m: &str| {
        metric(
            m,
            "apilb_frontend_rejected_connections_total{frontend=\"fe\",reason=\"bad_request\"}",
        )
        .unwrap_or(0.0)
    };
    let before = bad_requests(&admin_get(admin, "/metrics").await.1);
    let back = exchange(
        &t,
        "POST /api/v1/namespaces HTTP/1.1\r\nHost: k\r\nTransfer-Encoding: chunked\r\n\r\n+5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(statuses(&back), ["400"], "{back}");
    let m = admin_get(admin, "/metrics").await.1;
    assert_eq!(bad_requests(&m), before + 1.0, "{m}");
    assert!(
        !m.lines()
            .any(|l| l.starts_with("apilb_http_requests_total") && l.contains("code=\"502\"")),
        "no 502 counted against the backend:\n{m}"
    );
    t.h.shutdown();
    t.h.wait().await;
}
