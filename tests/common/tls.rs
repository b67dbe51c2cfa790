//! A TLS front for the emulator (which serves plain HTTP), as a corporate TLS-inspecting proxy or
//! cloud storage over https would be: for the TLS tests of `tests/reliability_security.rs` and
//! the span downloads of `tests/traces.rs`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// A host name only the tests' CONNECT proxy resolves (to 127.0.0.1); the front's certificate
/// names it too.
pub const PROXIED_HOST: &str = "workspace.proxied.invalid";

/// A test-only TLS front for the emulator (which serves plain HTTP): a CA generated at runtime, a
/// server certificate for `localhost` and `127.0.0.1` signed by it, and a rustls acceptor on
/// 127.0.0.1 relaying the decrypted bytes to the emulator's plain port.
pub struct TlsFront {
    /// `https://localhost:<port>`.
    pub url: String,
    pub port: u16,
    /// The CA certificate, PEM: what an operator gives as DATABRICKS_CA_BUNDLE.
    pub ca_pem: String,
    /// TCP connections accepted (handshake done or not).
    pub accepted: Arc<AtomicUsize>,
    /// TLS handshakes that completed.
    pub handshakes: Arc<AtomicUsize>,
}

/// A fresh self-signed CA, always with the same name: two calls give two CAs that differ only in
/// their key, so a test using one as the bundle for the other's server proves the signature is
/// checked, not the issuer's name.
pub fn test_ca() -> (rcgen::Certificate, rcgen::KeyPair) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(
        DnType::CommonName,
        "databricks-shield test inspecting proxy CA",
    );
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    (ca_cert, ca_key)
}

pub async fn tls_front(emu_url: &str) -> TlsFront {
    use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair};
    use tokio_rustls::rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    use tokio_rustls::rustls::{crypto::ring, ServerConfig};

    let (ca_cert, ca_key) = test_ca();

    // `new` turns "127.0.0.1" into an IP address SAN.
    let mut leaf_params = CertificateParams::new(vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        PROXIED_HOST.to_string(),
    ])
    .unwrap();
    leaf_params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    leaf_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = leaf_params.signed_by(&leaf_key, &ca_cert, &ca_key).unwrap();

    // An explicit provider: no process-wide default is needed (and none is installed).
    let config = ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));

    let upstream = emu_url
        .strip_prefix("http://")
        .unwrap()
        .trim_end_matches('/')
        .to_string();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let handshakes = Arc::new(AtomicUsize::new(0));
    let (a, h) = (accepted.clone(), handshakes.clone());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            a.fetch_add(1, Ordering::SeqCst);
            let (acceptor, upstream, h) = (acceptor.clone(), upstream.clone(), h.clone());
            tokio::spawn(async move {
                // A client that does not trust the CA aborts the handshake: nothing to relay.
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                h.fetch_add(1, Ordering::SeqCst);
                let Ok(mut up) = tokio::net::TcpStream::connect(&upstream).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
            });
        }
    });
    TlsFront {
        url: format!("https://localhost:{port}"),
        port,
        ca_pem: ca_cert.pem(),
        accepted,
        handshakes,
    }
}
