//! Property tests with a bounded case count (quick in CI): any bytes as a
//! config file and any bytes as an HTTP/1 request head are answered with a
//! clear error or accepted, never a panic, in bounded time; a head the guard
//! accepts is the same request to hyper.

use std::path::Path;
use std::time::{Duration, Instant};

use apilb::proxy::h1guard::{inspect_head, H1Guard, Verdict};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CASES: u32 = 2048;

/// A valid config with IP-literal servers (no name is looked up).
const VALID: &str = "admin:\n  listen: 127.0.0.1:0\nfrontends:\n  - name: f\n    listen: 127.0.0.1:0\n    pool: p\n    max_connections: 10\npools:\n  - name: p\n    servers: ['127.0.0.1:6443', '[::1]:6443']\n    connect_timeout: 2s\n    health:\n      check: tcp\n      interval: 2s\n      timeout: 1s\n      rise: 2\n";

/// Bytes that change YAML's structure (no letters: no host name appears).
const YAML_BYTES: &[u8] = b" \n\t-:[]{},'\"#&*!|>?%@`0123456789.\\\r\x00\xff";

/// Parses one config text, timed.
fn timed_parse(
    bytes: &[u8],
) -> (
    Result<apilb::config::Config, apilb::config::ConfigError>,
    Duration,
) {
    let t = Instant::now();
    let r = apilb::config::from_bytes(Path::new("/p.yaml"), bytes);
    (r, t.elapsed())
}

/// Checks one config text; panics (fails the property) on an unclear error.
/// A parse over the time bound is timed again: a slow input is slow twice,
/// while a pause of the host is not.
fn check_config(bytes: &[u8]) {
    let bound = Duration::from_secs(2);
    let (r, took) = timed_parse(bytes);
    if took >= bound {
        let (_, again) = timed_parse(bytes);
        assert!(again < bound, "took {took:?}, then {again:?}");
    }
    let Err(e) = r else { return };
    assert!(!e.errors.is_empty());
    for fe in &e.errors {
        assert!(!fe.path.is_empty() && !fe.message.is_empty(), "{fe:?}");
        if fe.message.starts_with("invalid YAML") {
            assert!(
                fe.message.contains("line ") && fe.message.contains("column "),
                "a syntax error names line and column: {fe}"
            );
        }
    }
}

fn mutated() -> impl Strategy<Value = Vec<u8>> {
    let edit = (
        any::<prop::sample::Index>(),
        0..3u8,
        prop::sample::select(YAML_BYTES),
    );
    prop::collection::vec(edit, 1..8).prop_map(|edits| {
        let mut b = VALID.as_bytes().to_vec();
        for (at, op, c) in edits {
            let i = at.index(b.len() + 1);
            match op {
                0 => b.insert(i, c),
                1 if i < b.len() => {
                    b.remove(i);
                }
                _ if i < b.len() => b[i] = c,
                _ => {}
            }
        }
        b
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn any_bytes_as_a_config_give_ok_or_a_clear_error(b in prop::collection::vec(any::<u8>(), 0..400)) {
        check_config(&b);
    }

    #[test]
    fn edited_configs_give_ok_or_a_clear_error(b in mutated()) {
        check_config(&b);
    }
}

/// What hyper's service saw of one request: method, target, headers.
type Seen = (String, String, Vec<(String, Vec<u8>)>);

/// Serves `input` with hyper behind a guard; returns the client's bytes and
/// the requests the service saw, or `None` if the connection did not end
/// within 5 s.
async fn serve(input: Vec<u8>) -> Option<(String, Vec<Seen>)> {
    let (mut client, server) = tokio::io::duplex(1 << 20);
    let guard = H1Guard::new(server, 8192, apilb::metrics::Metrics::new().frontend("t"));
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = seen.clone();
    let task = tokio::spawn(async move {
        let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            let s = s.clone();
            async move {
                let headers = req
                    .headers()
                    .iter()
                    .map(|(k, v)| (k.as_str().to_string(), v.as_bytes().to_vec()))
                    .collect();
                s.lock()
                    .unwrap()
                    .push((req.method().to_string(), req.uri().to_string(), headers));
                let _ = req.into_body().collect().await;
                Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                    Bytes::from_static(b"ok"),
                )))
            }
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .half_close(true)
            .max_header_size(8192)
            .serve_connection(hyper_util::rt::TokioIo::new(guard), svc)
            .await;
    });
    client.write_all(&input).await.unwrap();
    client.shutdown().await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut back))
        .await
        .ok()?
        .unwrap();
    task.await.expect("no panic in the server");
    let seen = seen.lock().unwrap().clone();
    Some((String::from_utf8_lossy(&back).into_owned(), seen))
}

/// `serve` on a fresh runtime; a connection over the time bound is served
/// again, as in `check_config`: only one that is slow twice fails.
fn serve_bounded(input: &[u8]) -> (String, Vec<Seen>) {
    let once = || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(serve(input.to_vec()))
    };
    once()
        .or_else(once)
        .expect("the connection ends in bounded time")
}

fn head() -> impl Strategy<Value = Vec<u8>> {
    let method = prop::sample::select(vec!["GET", "POST", "HEAD", "PUT", "CONNECT", "G T", ""]);
    let target = "(/[a-z0-9%?=&]{0,12}|\\*|http://[a-z]{1,5}/[a-z]{0,4}|[ -~]{0,6})";
    let version = prop::sample::select(vec!["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.1 "]);
    let name = prop::sample::select(vec![
        "Host",
        "Content-Length",
        "Transfer-Encoding",
        "Upgrade",
        "Connection",
        "X-A",
        "X A",
        "X-A ",
        "",
    ]);
    let value = prop::sample::select(vec![
        "x",
        "0",
        "5",
        "+5",
        "-1",
        "5, 5",
        "chunked",
        "gzip, chunked",
        " chunked ",
        "Chunked",
        "websocket",
        "a\x01b",
        "\u{e9}",
    ]);
    let eol = prop::sample::select(vec!["\r\n", "\n", "\r"]);
    let line = (name, value, eol.clone()).prop_map(|(n, v, e)| format!("{n}: {v}{e}"));
    let tail = prop::collection::vec(any::<u8>(), 0..24);
    (
        method,
        target,
        version,
        eol.clone(),
        prop::collection::vec(line, 0..5),
        eol,
        tail,
    )
        .prop_map(|(m, t, v, e1, lines, e2, tail)| {
            let mut b = format!("{m} {t} {v}{e1}{}{e2}", lines.concat()).into_bytes();
            b.extend(tail);
            b
        })
}

fn status_codes(text: &str) -> Vec<u16> {
    text.match_indices("HTTP/1.1 ")
        .filter_map(|(i, _)| text.get(i + 9..i + 12)?.parse().ok())
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn any_bytes_as_an_http1_head_are_served_or_refused_the_same_way(input in head()) {
        let (back, seen) = serve_bounded(&input);
        let codes = status_codes(&back);
        prop_assert!(codes.iter().all(|c| [200, 400, 431].contains(c)), "codes {codes:?} for {:?}", String::from_utf8_lossy(&input));
        match inspect_head(&input) {
            Verdict::Refused(code) => {
                prop_assert!(seen.is_empty(), "hyper saw a refused head: {seen:?}");
                // Without an empty line the guard is still waiting when the
                // client ends: nothing is answered, nothing passes.
                prop_assert!(codes.is_empty() || codes == vec![code], "{codes:?}");
            }
            Verdict::Accepted(h) => {
                if let Some((method, target, headers)) = seen.first() {
                    prop_assert_eq!(method, &h.method);
                    prop_assert_eq!(target, &h.target);
                    let mut want: Vec<_> = h.headers.iter().map(|(n, v)| (n.to_ascii_lowercase(), v.clone())).collect();
                    // hyper keeps one of repeated equal Content-Length
                    // headers (RFC 9110 8.6); the guard refuses unequal ones.
                    let mut cl = want.iter().filter(|(n, _)| n == "content-length").count();
                    want.retain(|(n, _)| { cl -= usize::from(n == "content-length"); n != "content-length" || cl == 0 });
                    let mut got = headers.clone();
                    want.sort();
                    got.sort();
                    prop_assert_eq!(got, want);
                } else {
                    prop_assert!(codes.first().is_some_and(|c| *c != 200), "accepted but neither served nor refused: {back:?}");
                }
            }
            Verdict::Partial => prop_assert!(seen.is_empty(), "{seen:?}"),
        }
    }
}
