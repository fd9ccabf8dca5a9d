//! Certificates of a deployment (rcgen): one CA, the cloud's server certificate, and a client
//! certificate per edge. An edge's id is the Common Name of its certificate; the cloud's QUIC
//! endpoint (mutual TLS) accepts only edges whose certificate this CA signed.
//!
//! A cluster's nodes get a certificate each for the QUIC between them (mutual TLS, Common
//! Name `tiervec node <name>` — a name no edge id can take, since edge ids have no spaces).
//!
//! Layout of the directory: `ca.pem`, `ca.key`, `server.pem`, `server.key`,
//! `edges/<edge-id>.pem`, `edges/<edge-id>.key`, `nodes/<node>.pem`, `nodes/<node>.key`. Keys
//! are written with mode 0600, atomically.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum CertError {
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("edge id `{0}` must be 1–64 characters of A-Z, a-z, 0-9, _ and -")]
    BadEdgeId(String),
    #[error("node name `{0}` must be 1–64 characters of A-Z, a-z, 0-9, _, - and .")]
    BadNodeName(String),
}

/// The Common Name of a cluster node's certificate is this followed by its name.
pub use crate::storage::peer::{NODE_NAME_PREFIX, NODE_SERVER_NAME};

/// The CA's subject: fixed, so an issuer can be rebuilt from the key alone to sign more edges.
fn ca_params(deployment: &str) -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "tiervec");
    dn.push(
        DnType::CommonName,
        format!("tiervec deployment CA {deployment}"),
    );
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

fn write(path: &Path, text: &str, secret: bool) -> Result<(), CertError> {
    let io = |source| CertError::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    tiervec_shared::durable::write_atomic(path, text.as_bytes(), false).map_err(io)?;
    if secret {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    }
    Ok(())
}

fn read(path: &Path) -> Result<String, CertError> {
    std::fs::read_to_string(path).map_err(|source| CertError::Io {
        path: path.to_owned(),
        source,
    })
}

/// The certificates directory of a deployment.
pub struct CertDir {
    pub dir: PathBuf,
    pub deployment: String,
}

impl CertDir {
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    pub fn server_cert(&self) -> PathBuf {
        self.dir.join("server.pem")
    }

    pub fn server_key(&self) -> PathBuf {
        self.dir.join("server.key")
    }

    pub fn edge_cert(&self, edge: &str) -> PathBuf {
        self.dir.join("edges").join(format!("{edge}.pem"))
    }

    pub fn edge_key(&self, edge: &str) -> PathBuf {
        self.dir.join("edges").join(format!("{edge}.key"))
    }

    /// Creates the CA unless it exists; returns whether it was created.
    pub fn ensure_ca(&self) -> Result<bool, CertError> {
        if self.ca_cert().exists() && self.dir.join("ca.key").exists() {
            return Ok(false);
        }
        let key = KeyPair::generate()?;
        let cert = ca_params(&self.deployment)?.self_signed(&key)?;
        write(&self.dir.join("ca.key"), &key.serialize_pem(), true)?;
        write(&self.ca_cert(), &cert.pem(), false)?;
        Ok(true)
    }

    fn issuer(&self) -> Result<Issuer<'static, KeyPair>, CertError> {
        let key = KeyPair::from_pem(&read(&self.dir.join("ca.key"))?)?;
        Ok(Issuer::new(ca_params(&self.deployment)?, key))
    }

    /// Issues the cloud's server certificate for `names` (DNS names or IP addresses).
    pub fn issue_server(&self, names: &[String]) -> Result<(), CertError> {
        let issuer = self.issuer()?;
        let mut params = CertificateParams::new(names.to_vec())?;
        params
            .distinguished_name
            .push(DnType::CommonName, "tiervec cloud");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        write(&self.server_key(), &key.serialize_pem(), true)?;
        write(&self.server_cert(), &cert.pem(), false)
    }

    pub fn node_cert(&self, node: &str) -> PathBuf {
        self.dir.join("nodes").join(format!("{node}.pem"))
    }

    pub fn node_key(&self, node: &str) -> PathBuf {
        self.dir.join("nodes").join(format!("{node}.key"))
    }

    /// Issues cluster node `node`'s certificate for the QUIC between nodes: Common Name
    /// `tiervec node <node>`, DNS name `tiervec-node`, for server and client use.
    pub fn issue_node(&self, node: &str) -> Result<(), CertError> {
        let ok = !node.is_empty()
            && node.len() <= 64
            && node
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
        if !ok {
            return Err(CertError::BadNodeName(node.to_owned()));
        }
        let issuer = self.issuer()?;
        let mut params = CertificateParams::new(vec![NODE_SERVER_NAME.to_owned()])?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{NODE_NAME_PREFIX}{node}"));
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        write(&self.node_key(node), &key.serialize_pem(), true)?;
        write(&self.node_cert(node), &cert.pem(), false)
    }

    /// Issues a client certificate whose Common Name is the edge's id.
    pub fn issue_edge(&self, edge: &str) -> Result<(), CertError> {
        let ok = !edge.is_empty()
            && edge.len() <= 64
            && edge
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            return Err(CertError::BadEdgeId(edge.to_owned()));
        }
        let issuer = self.issuer()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, edge);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        write(&self.edge_key(edge), &key.serialize_pem(), true)?;
        write(&self.edge_cert(edge), &cert.pem(), false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_deployment_gets_a_ca_a_server_and_edges() {
        let dir = tempfile::tempdir().unwrap();
        let certs = CertDir {
            dir: dir.path().to_owned(),
            deployment: "test".into(),
        };
        assert!(certs.ensure_ca().unwrap());
        let ca_before = std::fs::read(certs.ca_cert()).unwrap();
        assert!(!certs.ensure_ca().unwrap(), "an existing CA is kept");
        certs
            .issue_server(&["localhost".into(), "127.0.0.1".into()])
            .unwrap();
        certs.issue_edge("edge-1").unwrap();
        certs.issue_edge("edge-2").unwrap();
        assert_eq!(std::fs::read(certs.ca_cert()).unwrap(), ca_before);
        for (cert, key) in [
            (certs.server_cert(), certs.server_key()),
            (certs.edge_cert("edge-1"), certs.edge_key("edge-1")),
        ] {
            CertificateDer::from_pem_file(&cert).unwrap();
            PrivateKeyDer::from_pem_file(&key).unwrap();
            assert_eq!(
                std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        assert!(matches!(
            certs.issue_edge("../evil"),
            Err(CertError::BadEdgeId(_))
        ));
    }
}
