//! Building rustls client and server configs from PEM files or PEM text.

use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    Read(#[from] crate::fsread::ReadError),
    #[error("{path}: no PEM certificate found")]
    NoCertificate { path: PathBuf },
    #[error("{path}: no PEM private key found")]
    NoKey { path: PathBuf },
    #[error("{path}: invalid PEM: {source}")]
    Pem {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Rustls {
        what: &'static str,
        source: rustls::Error,
    },
    #[error("the private key does not match the certificate (their public keys differ)")]
    KeyMismatch,
    #[error("invalid TLS server name {0:?}")]
    ServerName(String),
}

/// The crypto provider apilb uses everywhere (ring: no C toolchain beyond cc).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads a PEM file through the one bounded reader (regular files up to 1 MiB).
fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    Ok(crate::fsread::read_bounded(path)?)
}

/// Reads every certificate from a PEM file; at least one must be there.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    certs_from_pem(&read(path)?, path)
}

/// Reads the first private key (PKCS#8, PKCS#1 or SEC1) from a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    key_from_pem(&read(path)?, path)
}

pub fn certs_from_pem(pem: &[u8], origin: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = rustls_pemfile::certs(&mut BufReader::new(pem))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            path: origin.to_path_buf(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: origin.to_path_buf(),
        });
    }
    Ok(certs)
}

pub fn key_from_pem(pem: &[u8], origin: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    rustls_pemfile::private_key(&mut BufReader::new(pem))
        .map_err(|source| TlsError::Pem {
            path: origin.to_path_buf(),
            source,
        })?
        .ok_or_else(|| TlsError::NoKey {
            path: origin.to_path_buf(),
        })
}

fn roots(certs: Vec<CertificateDer<'static>>) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for c in certs {
        store.add(c).map_err(|source| TlsError::Rustls {
            what: "CA certificate",
            source,
        })?;
    }
    Ok(store)
}

/// Material for a TLS client: whom to trust and which certificate to present.
pub struct ClientMaterial {
    /// `None` with `insecure_skip_verify` false is not allowed (config checks it).
    pub ca: Option<Vec<CertificateDer<'static>>>,
    pub identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    pub insecure_skip_verify: bool,
    pub alpn: Vec<Vec<u8>>,
}

impl ClientMaterial {
    /// Reads the files named; errors name the file.
    pub fn from_files(
        ca_file: Option<&Path>,
        cert_file: Option<&Path>,
        key_file: Option<&Path>,
        insecure_skip_verify: bool,
    ) -> Result<Self, TlsError> {
        let ca = ca_file.map(load_certs).transpose()?;
        let identity = match (cert_file, key_file) {
            (Some(c), Some(k)) => Some((load_certs(c)?, load_key(k)?)),
            _ => None,
        };
        Ok(ClientMaterial {
            ca,
            identity,
            insecure_skip_verify,
            alpn: Vec::new(),
        })
    }

    pub fn build(self) -> Result<Arc<ClientConfig>, TlsError> {
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|source| TlsError::Rustls {
                what: "protocol versions",
                source,
            })?;
        let builder = if self.insecure_skip_verify {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerify(provider())))
        } else {
            builder.with_root_certificates(roots(self.ca.unwrap_or_default())?)
        };
        let mut cfg = match self.identity {
            Some((certs, key)) => builder
                .with_client_auth_cert(certs, key)
                .map_err(|source| TlsError::Rustls {
                    what: "client certificate",
                    source,
                })?,
            None => builder.with_no_client_auth(),
        };
        cfg.alpn_protocols = self.alpn;
        Ok(Arc::new(cfg))
    }
}

/// How a TLS server treats client certificates.
pub enum ClientAuth<'a> {
    /// Never asks for one.
    None,
    /// Requires one signed by this CA (PEM).
    Required(&'a [u8]),
    /// Asks for one; a presented certificate must verify against this CA
    /// (PEM), but a client may also present none (bearer tokens).
    Optional(&'a [u8]),
}

/// A server config from PEM text.
pub fn server_config(
    cert_pem: &[u8],
    key_pem: &[u8],
    client_auth: ClientAuth<'_>,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, TlsError> {
    let origin = Path::new("<memory>");
    server_config_from(
        certs_from_pem(cert_pem, origin)?,
        key_from_pem(key_pem, origin)?,
        client_auth,
        alpn,
    )
}

/// A server config from PEM files (L7 frontends; re-read on every reload).
pub fn server_config_files(
    cert_file: &Path,
    key_file: &Path,
    client_ca_file: Option<&Path>,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, TlsError> {
    let ca = client_ca_file.map(read).transpose()?;
    let auth = match &ca {
        Some(pem) => ClientAuth::Optional(pem),
        None => ClientAuth::None,
    };
    server_config_from(load_certs(cert_file)?, load_key(key_file)?, auth, alpn)
}

fn server_config_from(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_auth: ClientAuth<'_>,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, TlsError> {
    let origin = Path::new("<memory>");
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Rustls {
            what: "protocol versions",
            source,
        })?;
    let (ca, optional) = match client_auth {
        ClientAuth::None => (None, false),
        ClientAuth::Required(ca) => (Some(ca), false),
        ClientAuth::Optional(ca) => (Some(ca), true),
    };
    let builder = match ca {
        Some(ca) => {
            let mut vb = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots(certs_from_pem(ca, origin)?)?),
                provider(),
            );
            if optional {
                vb = vb.allow_unauthenticated();
            }
            let verifier = vb.build().map_err(|e| TlsError::Rustls {
                what: "client CA",
                source: rustls::Error::General(e.to_string()),
            })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder
        .with_single_cert(certs, key)
        .map_err(|source| TlsError::Rustls {
            what: "server certificate",
            source,
        })?;
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}

/// Checks that `key` is the private key of the first certificate of `certs`
/// by comparing public keys (SubjectPublicKeyInfo).
pub fn check_key_matches(
    certs: &[CertificateDer<'static>],
    key: PrivateKeyDer<'static>,
) -> Result<(), TlsError> {
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|source| TlsError::Rustls {
            what: "private key",
            source,
        })?;
    match rustls::sign::CertifiedKey::new(certs.to_vec(), signing).keys_match() {
        Ok(()) => Ok(()),
        // ring knows the public key of every key type it loads; "unknown"
        // would only come from a provider that does not.
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(()),
        Err(rustls::Error::InconsistentKeys(_)) => Err(TlsError::KeyMismatch),
        Err(source) => Err(TlsError::Rustls {
            what: "certificate",
            source,
        }),
    }
}

/// The earliest expiry (`notAfter`, Unix seconds) among `certs`; `None` when
/// none parses.
pub fn earliest_expiry(certs: &[CertificateDer<'_>]) -> Option<i64> {
    certs
        .iter()
        .filter_map(|c| x509_parser::parse_x509_certificate(c.as_ref()).ok())
        .map(|(_, c)| c.validity().not_after.timestamp())
        .min()
}

/// The name to verify: a DNS name, or an IP address (IP SANs work).
pub fn server_name(name: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(name.to_string()).map_err(|_| TlsError::ServerName(name.to_string()))
}

/// `insecure_skip_verify: true`: accepts any server certificate, still checks signatures.
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
