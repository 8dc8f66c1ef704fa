//! The one TLS set-up behind every HTTPS connection the crate opens (`Forward`'s upstreams,
//! JWKS and OAuth2 token fetches): rustls on ring, the Mozilla roots of `webpki-roots` plus
//! any the caller trusts, plain HTTP or HTTPS by the URL's scheme, HTTP/1.1 enabled.

use std::sync::Arc;

use hyper_rustls::HttpsConnectorBuilder;
use hyper_rustls::builderstates::WantsProtocols2;
use rustls::pki_types::CertificateDer;

/// The connector builder, HTTP/1.1 on; HTTP/2 is the caller's choice.
pub(crate) fn connector_builder(
    extra_roots: &[CertificateDer<'static>],
) -> HttpsConnectorBuilder<WantsProtocols2> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for root in extra_roots {
        roots.add(root.clone()).expect("a valid root certificate");
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("ring supports rustls' default protocol versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
}
