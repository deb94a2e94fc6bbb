//! Generated types of the fleetbench gRPC API (`fleetbench.v1`) and of the ONNX model format (`onnx`).

/// The fleetbench v1 API: messages and tonic clients and servers.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("fleetbench.v1");

    /// The API's encoded `FileDescriptorSet`, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("fleetbench_descriptor");
}

/// The ONNX model format (`onnx-ml.proto`), used to inspect and rewrite graphs.
pub mod onnx {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("onnx");
}

/// Endpoints to a coordinator, with TLS for `https://` addresses.
pub mod connect {
    use tonic::metadata::{Ascii, MetadataValue};
    use tonic::service::interceptor::InterceptedService;
    use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

    /// Adds `authorization: Bearer <token>` to every call (marked sensitive, so transports that log
    /// headers leave it out). Clones share the token: [`Bearer::set`] changes it for every client made
    /// with one (an agent's renewed credential reaches the downloads already under way).
    #[derive(Clone, Default)]
    pub struct Bearer(std::sync::Arc<std::sync::RwLock<Option<MetadataValue<Ascii>>>>);

    fn header(token: Option<&str>) -> Result<Option<MetadataValue<Ascii>>, String> {
        let Some(token) = token.map(str::trim).filter(|t| !t.is_empty()) else {
            return Ok(None);
        };
        let mut v = MetadataValue::try_from(format!("Bearer {token}")).map_err(|_| {
            "the token holds characters a gRPC header cannot carry; copy it again".to_string()
        })?;
        v.set_sensitive(true);
        Ok(Some(v))
    }

    impl Bearer {
        /// A bearer of `token`; none sends no header. The error does not repeat the token.
        pub fn new(token: Option<&str>) -> Result<Self, String> {
            Ok(Self(std::sync::Arc::new(std::sync::RwLock::new(header(
                token,
            )?))))
        }

        /// Sends `token` from now on, from this bearer and every clone of it.
        pub fn set(&self, token: Option<&str>) -> Result<(), String> {
            let v = header(token)?;
            *self.0.write().unwrap_or_else(|e| e.into_inner()) = v;
            Ok(())
        }
    }

    impl std::fmt::Debug for Bearer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            let set = self.0.read().unwrap_or_else(|e| e.into_inner()).is_some();
            f.write_str(if set {
                "Bearer(<redacted>)"
            } else {
                "Bearer(none)"
            })
        }
    }

    impl tonic::service::Interceptor for Bearer {
        fn call(
            &mut self,
            mut request: tonic::Request<()>,
        ) -> Result<tonic::Request<()>, tonic::Status> {
            if let Some(v) = &*self.0.read().unwrap_or_else(|e| e.into_inner()) {
                request.metadata_mut().insert("authorization", v.clone());
            }
            Ok(request)
        }
    }

    /// A channel whose calls carry a token.
    pub type Authed = InterceptedService<Channel, Bearer>;

    /// An endpoint for `url`. An `https://` address is verified against `ca_pem` (the coordinator's
    /// CA certificate), which it needs; an `http://` address takes none. The error names what is wrong.
    pub fn endpoint(url: &str, ca_pem: Option<&str>) -> Result<Endpoint, String> {
        let ep = Endpoint::from_shared(url.to_string()).map_err(|e| {
            format!(
                "coordinator address '{url}' is not a valid URL (expected https://HOST:PORT): {e}"
            )
        })?;
        match (url.starts_with("https://"), ca_pem) {
            (true, Some(pem)) => ep
                .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))
                .map_err(|e| format!("TLS settings for {url}: {e}")),
            (true, None) => Err(format!(
                "{url} is served with TLS: give the coordinator's CA certificate (--ca-cert, or \
                 FLEETBENCH_CA_CERT; it is ca.pem in the coordinator's data directory)"
            )),
            (false, Some(_)) => Err(format!(
                "a CA certificate was given, but {url} is not an https:// address; use https://"
            )),
            (false, None) => Ok(ep),
        }
    }

    /// The workspace's one TLS crypto provider: rustls on `ring` (no second crypto library). rustls
    /// marks it deprecated only because `ring` offers no post-quantum key exchange.
    pub fn ring_provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
        #[allow(deprecated)]
        std::sync::Arc::new(rustls::crypto::ring::default_provider())
    }

    /// Records the certificates a server presents and accepts them: only for reading what a server
    /// presents, never for a connection that carries anything.
    #[derive(Debug)]
    struct Capture {
        seen: std::sync::Mutex<Vec<Vec<u8>>>,
        algs: rustls::crypto::WebPkiSupportedAlgorithms,
    }

    impl rustls::client::danger::ServerCertVerifier for Capture {
        fn verify_server_cert(
            &self,
            end_entity: &rustls::pki_types::CertificateDer<'_>,
            intermediates: &[rustls::pki_types::CertificateDer<'_>],
            _server_name: &rustls::pki_types::ServerName<'_>,
            _ocsp_response: &[u8],
            _now: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            seen.push(end_entity.to_vec());
            seen.extend(intermediates.iter().map(|c| c.to_vec()));
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &rustls::pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &rustls::pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
        }

        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.algs.supported_schemes()
        }
    }

    /// The certificates the TLS server at `url` (`https://HOST:PORT`) presents, leaf first, read
    /// without trusting them: nothing is sent over that connection.
    pub async fn presented_chain(url: &str) -> Result<Vec<Vec<u8>>, String> {
        let uri: tonic::codegen::http::Uri = url
            .parse()
            .map_err(|e| format!("coordinator address '{url}' is not a valid URL: {e}"))?;
        let host = uri
            .host()
            .ok_or_else(|| format!("coordinator address '{url}' names no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(443);
        let provider = ring_provider();
        let capture = std::sync::Arc::new(Capture {
            seen: Default::default(),
            algs: provider.signature_verification_algorithms,
        });
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(capture.clone())
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let name = rustls::pki_types::ServerName::try_from(host.clone())
            .map_err(|e| format!("coordinator address '{url}': {e}"))?;
        let timeout = std::time::Duration::from_secs(10);
        let handshake = async {
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
                .await
                .map_err(|e| format!("cannot reach {url}: {e}"))?;
            tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
                .connect(name, tcp)
                .await
                .map_err(|e| format!("no TLS handshake with {url} (is it served with TLS?): {e}"))
        };
        tokio::time::timeout(timeout, handshake)
            .await
            .map_err(|_| format!("no TLS handshake with {url} within {timeout:?}"))??;
        let seen = std::mem::take(&mut *capture.seen.lock().unwrap_or_else(|e| e.into_inner()));
        Ok(seen)
    }

    /// The CA certificate (DER) whose SHA-256 is `pin`, as the coordinator at `url` presents it beside
    /// its own certificate: how an agent holding only a join token finds the CA it then verifies the
    /// coordinator against (as k3s agents do with the CA hash in their token). The error says what the
    /// server presented instead.
    pub async fn fetch_pinned_ca(url: &str, pin: &str) -> Result<Vec<u8>, PinError> {
        use sha2::{Digest, Sha256};
        let chain = presented_chain(url).await.map_err(PinError::Unreachable)?;
        let hashes: Vec<String> = chain
            .iter()
            .map(|c| hex::encode(Sha256::digest(c)))
            .collect();
        match hashes.iter().position(|h| h.eq_ignore_ascii_case(pin)) {
            Some(i) => Ok(chain[i].clone()),
            None => Err(PinError::NotPinned(format!(
                "the server at {url} did not present the CA certificate the join token pins \
                 (SHA-256 {pin}); it presented certificates with SHA-256 {}: it is another \
                 coordinator, or something between us is not the coordinator",
                hashes.join(", ")
            ))),
        }
    }

    /// Why no pinned CA was found.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum PinError {
        /// No TLS server answered (down, not yet up, or not TLS): try again later.
        Unreachable(String),
        /// A server answered without the pinned CA: it is not the coordinator the token names.
        NotPinned(String),
    }

    impl std::fmt::Display for PinError {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            match self {
                PinError::Unreachable(m) | PinError::NotPinned(m) => f.write_str(m),
            }
        }
    }

    /// Reads a CA certificate file (PEM), naming the file when it cannot.
    pub fn read_ca(path: &std::path::Path) -> Result<String, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("CA certificate {}: {e}", path.display()))?;
        if !text.contains("-----BEGIN CERTIFICATE-----") {
            return Err(format!(
                "CA certificate {}: not a PEM certificate",
                path.display()
            ));
        }
        Ok(text)
    }
}
