//! Header hygiene of L7 requests: hop-by-hop headers, identity headers no
//! client may send (in the head and in trailers), X-Forwarded-For, and the
//! identity read from a verified client certificate exactly as the
//! apiserver's Go `crypto/x509` reads it.

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::body::{Body, Frame, SizeHint};
use x509_parser::der_parser::asn1_rs::Tag;

use crate::config::ForwardedFor;

/// Every header whose name starts with this names a user to the apiserver
/// (`--requestheader-*-headers`: user, group, uid, extra-*).
const IDENTITY_PREFIX: &str = "x-remote-";

/// Headers from which the apiserver's audit log takes `sourceIPs`.
/// (Names are parsed once, here: a `&str` lookup parses it on every request.)
const FORWARDING: [HeaderName; 3] = [
    HeaderName::from_static("x-forwarded-for"),
    HeaderName::from_static("x-real-ip"),
    HeaderName::from_static("forwarded"),
];
const XFF: HeaderName = HeaderName::from_static("x-forwarded-for");
/// Hop-by-hop headers that are always removed (RFC 9110 §7.6.1 and the
/// proxy-* ones).
const HOP_BY_HOP: [HeaderName; 7] = [
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
];

/// Headers that concern one hop only (RFC 9110 §7.6.1), plus those named in Connection.
pub fn strip_hop_by_hop(h: &mut HeaderMap, keep_upgrade: bool) {
    // One pass over a typical head of a few headers is cheaper than hashing
    // every name to remove: most requests and responses carry none of them.
    let present = h.keys().any(|k| {
        k == header::CONNECTION || k == header::UPGRADE || HOP_BY_HOP.iter().any(|n| n == k)
    });
    if !present {
        if keep_upgrade {
            h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        }
        return;
    }
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for n in named {
        if keep_upgrade && n == header::UPGRADE {
            continue;
        }
        h.remove(n);
    }
    for n in &HOP_BY_HOP {
        h.remove(n);
    }
    if keep_upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    } else {
        h.remove(header::CONNECTION);
        h.remove(header::UPGRADE);
    }
}

/// Removes every header a client might use to name itself: all `X-Remote-*`
/// and the frontend's `strip_headers` (lowercase names).
pub fn strip_identity(h: &mut HeaderMap, extra: &[String]) {
    let names: Vec<HeaderName> = h
        .keys()
        .filter(|k| is_identity(k.as_str(), extra))
        .cloned()
        .collect();
    for k in names {
        h.remove(k);
    }
}

fn is_identity(name: &str, extra: &[String]) -> bool {
    name.starts_with(IDENTITY_PREFIX) || extra.iter().any(|e| e == name)
}

/// The X-Forwarded-For value naming a client: made once per connection.
pub fn forwarded_value(client: IpAddr) -> HeaderValue {
    HeaderValue::from_str(&client.to_string()).expect("an IP is a header value")
}

/// Sets X-Forwarded-For to the client's address (`ip`, from
/// [`forwarded_value`]). `Replace` first drops what the client sent in
/// X-Forwarded-For, X-Real-Ip and Forwarded; `Append` keeps them and appends
/// the address to X-Forwarded-For.
pub fn set_forwarded_for(h: &mut HeaderMap, ip: &HeaderValue, mode: ForwardedFor) {
    let prev: Vec<&[u8]> = match mode {
        ForwardedFor::Replace => {
            if h.keys().any(|k| FORWARDING.iter().any(|n| n == k)) {
                for n in &FORWARDING {
                    h.remove(n);
                }
            }
            Vec::new()
        }
        ForwardedFor::Append => h.get_all(&XFF).iter().map(HeaderValue::as_bytes).collect(),
    };
    if prev.is_empty() {
        h.insert(XFF, ip.clone());
        return;
    }
    let mut v = prev.join(&b", "[..]);
    v.extend_from_slice(b", ");
    v.extend_from_slice(ip.as_bytes());
    // A client value that is no valid header value: keep only ours.
    let v = HeaderValue::from_bytes(&v).unwrap_or_else(|_| ip.clone());
    h.insert(XFF, v);
}

/// A client identity from a verified certificate: user (CN) and groups (O).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientId {
    pub user: String,
    pub groups: Vec<String>,
}

/// Reads the identity as the apiserver does (Go `pkix.Name.FillFromRDNSequence`
/// and the x509 authenticator): the last CN is the user, every O is a group,
/// in order. `None` when the CN is missing or empty (the apiserver does not
/// authenticate such a certificate) or a name uses an encoding Go refuses.
pub fn client_id(der: &[u8]) -> Option<ClientId> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let mut user = None;
    let mut groups = Vec::new();
    for rdn in cert.subject().iter() {
        for atv in rdn.iter() {
            let oid = atv.attr_type();
            let is_cn = *oid == x509_parser::oid_registry::OID_X509_COMMON_NAME;
            let is_o = *oid == x509_parser::oid_registry::OID_X509_ORGANIZATION_NAME;
            if !is_cn && !is_o {
                continue;
            }
            let v = decode_string(atv.attr_value().tag(), atv.attr_value().data)?;
            if is_cn {
                user = Some(v);
            } else {
                groups.push(v);
            }
        }
    }
    let user = user.filter(|u| !u.is_empty())?;
    Some(ClientId { user, groups })
}

/// Decodes a directory string as Go's `parseASN1String` does.
fn decode_string(tag: Tag, data: &[u8]) -> Option<String> {
    match tag {
        Tag::Utf8String => String::from_utf8(data.to_vec()).ok(),
        Tag::PrintableString | Tag::Ia5String | Tag::NumericString => data
            .is_ascii()
            .then(|| String::from_utf8_lossy(data).into_owned()),
        // Go returns the bytes as they are; Latin-1 is the nearest reading.
        Tag::TeletexString => Some(match std::str::from_utf8(data) {
            Ok(s) => s.to_string(),
            Err(_) => data.iter().map(|&b| b as char).collect(),
        }),
        Tag::BmpString => {
            if !data.len().is_multiple_of(2) {
                return None;
            }
            let mut units: Vec<u16> = data
                .chunks_exact(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]))
                .collect();
            // Go strips one trailing NUL.
            if units.last() == Some(&0) {
                units.pop();
            }
            Some(
                char::decode_utf16(units)
                    .map(|c| c.unwrap_or(char::REPLACEMENT_CHARACTER))
                    .collect(),
            )
        }
        _ => None,
    }
}

/// Puts a verified client's identity into front-proxy headers.
pub fn insert_identity(h: &mut HeaderMap, id: &ClientId) -> Result<(), &'static str> {
    let user = HeaderValue::from_str(&id.user)
        .map_err(|_| "client certificate CN is not a valid header value")?;
    h.insert("x-remote-user", user);
    for g in &id.groups {
        if let Ok(v) = HeaderValue::from_str(g) {
            h.append("x-remote-group", v);
        }
    }
    Ok(())
}

/// Set when a client's request body failed (a framing error h1guard found,
/// a reset stream): an upstream error that follows is the client's doing,
/// not the backend's.
#[derive(Clone, Default, Debug)]
pub struct BodyFault(Arc<AtomicBool>);

impl BodyFault {
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// A request body whose trailers (HTTP/1.1 chunked trailers, HTTP/2 trailing
/// HEADERS) lose the same identity headers as the head, and whose failure
/// is recorded in a [`BodyFault`].
pub struct StripTrailers<B> {
    inner: B,
    extra: Vec<String>,
    fault: BodyFault,
}

impl<B> StripTrailers<B> {
    pub fn new(inner: B, extra: &[String], fault: BodyFault) -> Self {
        StripTrailers {
            inner,
            extra: extra.to_vec(),
            fault,
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for StripTrailers<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let me = &mut *self;
        match Pin::new(&mut me.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let frame = match frame.into_trailers() {
                    Ok(mut t) => {
                        strip_identity(&mut t, &me.extra);
                        Frame::trailers(t)
                    }
                    Err(f) => f,
                };
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                me.fault.0.store(true, Ordering::Release);
                Poll::Ready(Some(Err(e)))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_and_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("x-remote-user", "admin"),
            ("x-remote-group", "system:masters"),
            ("x-remote-extra-scopes", "all"),
            ("x-remote-uid", "0"),
            ("x-custom-user", "root"),
            ("impersonate-user", "bob"),
            ("authorization", "Bearer t"),
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
        ] {
            h.append(k, HeaderValue::from_static(v));
        }
        strip_identity(&mut h, &["x-custom-user".to_string()]);
        strip_hop_by_hop(&mut h, false);
        let mut left: Vec<_> = h.keys().map(|k| k.as_str().to_string()).collect();
        left.sort();
        assert_eq!(left, ["authorization", "impersonate-user"]);
    }

    #[test]
    fn forwarding_headers_are_replaced_or_appended() {
        let ip = forwarded_value("10.1.2.3".parse().unwrap());
        let client = || {
            let mut h = HeaderMap::new();
            h.append("x-forwarded-for", HeaderValue::from_static("1.1.1.1"));
            h.append("x-forwarded-for", HeaderValue::from_static("2.2.2.2"));
            h.insert("x-real-ip", HeaderValue::from_static("3.3.3.3"));
            h.insert("forwarded", HeaderValue::from_static("for=4.4.4.4"));
            h
        };
        let mut h = client();
        set_forwarded_for(&mut h, &ip, ForwardedFor::Replace);
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(h["x-forwarded-for"], "10.1.2.3");
        assert!(h.get("x-real-ip").is_none() && h.get("forwarded").is_none());
        let mut h = client();
        set_forwarded_for(&mut h, &ip, ForwardedFor::Append);
        assert_eq!(h["x-forwarded-for"], "1.1.1.1, 2.2.2.2, 10.1.2.3");
        assert_eq!(h["x-real-ip"], "3.3.3.3");
    }

    #[test]
    fn bmp_strings_decode_as_go_does() {
        let bmp = |s: &str| -> Vec<u8> { s.encode_utf16().flat_map(u16::to_be_bytes).collect() };
        assert_eq!(decode_string(Tag::BmpString, &bmp("jänë")).unwrap(), "jänë");
        let mut nul = bmp("ops");
        nul.extend([0, 0]);
        assert_eq!(decode_string(Tag::BmpString, &nul).unwrap(), "ops");
        assert_eq!(decode_string(Tag::BmpString, &[0, 0x61, 0]), None);
        assert_eq!(decode_string(Tag::PrintableString, "é".as_bytes()), None);
        assert_eq!(decode_string(Tag::UniversalString, &[0, 0, 0, 0x61]), None);
    }
}
