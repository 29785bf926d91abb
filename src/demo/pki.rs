//! A throwaway certificate authority (rcgen) for the demo and the tests.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// A CA that signs leaf certificates.
pub struct Ca {
    cert: Certificate,
    key: KeyPair,
    pub cert_pem: String,
}

/// A signed certificate with its private key, both PEM.
#[derive(Clone)]
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Leaf {
    /// Writes `NAME.crt` and `NAME.key` into `dir`.
    pub fn write(&self, dir: &Path, name: &str) -> std::io::Result<(PathBuf, PathBuf)> {
        let c = dir.join(format!("{name}.crt"));
        let k = dir.join(format!("{name}.key"));
        std::fs::write(&c, &self.cert_pem)?;
        std::fs::write(&k, &self.key_pem)?;
        Ok((c, k))
    }
}

impl Ca {
    pub fn new(common_name: &str) -> Result<Self, rcgen::Error> {
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, common_name);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate()?;
        let cert = p.self_signed(&key)?;
        let cert_pem = cert.pem();
        Ok(Ca {
            cert,
            key,
            cert_pem,
        })
    }

    /// Writes the CA certificate as `NAME.crt` into `dir`.
    pub fn write(&self, dir: &Path, name: &str) -> std::io::Result<PathBuf> {
        let p = dir.join(format!("{name}.crt"));
        std::fs::write(&p, &self.cert_pem)?;
        Ok(p)
    }

    /// A serving certificate for these names (IP addresses become IP SANs).
    pub fn server(&self, names: &[&str]) -> Result<Leaf, rcgen::Error> {
        self.leaf(
            names,
            names.first().copied().unwrap_or("server"),
            None,
            true,
            false,
        )
    }

    /// A client certificate: CN is the user, O the group (Kubernetes' reading).
    /// rcgen holds one value per attribute type, so one group at most.
    pub fn client(&self, common_name: &str, org: Option<&str>) -> Result<Leaf, rcgen::Error> {
        self.leaf(&[], common_name, org, false, true)
    }

    /// Serving and client use in one (etcd peers).
    pub fn peer(&self, names: &[&str], common_name: &str) -> Result<Leaf, rcgen::Error> {
        self.leaf(names, common_name, None, true, true)
    }

    fn leaf(
        &self,
        names: &[&str],
        cn: &str,
        org: Option<&str>,
        server: bool,
        client: bool,
    ) -> Result<Leaf, rcgen::Error> {
        let mut p =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
        p.distinguished_name.push(DnType::CommonName, cn);
        if let Some(o) = org {
            p.distinguished_name.push(DnType::OrganizationName, o);
        }
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        if server {
            p.extended_key_usages
                .push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        if client {
            p.extended_key_usages
                .push(ExtendedKeyUsagePurpose::ClientAuth);
        }
        let key = KeyPair::generate()?;
        let cert = p.signed_by(&key, &self.cert, &self.key)?;
        Ok(Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}
