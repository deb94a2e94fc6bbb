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
    /// headers leave it out).
    #[derive(Clone, Default)]
    pub struct Bearer(Option<MetadataValue<Ascii>>);

    impl Bearer {
        /// A bearer of `token`; none sends no header. The error does not repeat the token.
        pub fn new(token: Option<&str>) -> Result<Self, String> {
            let Some(token) = token.map(str::trim).filter(|t| !t.is_empty()) else {
                return Ok(Self(None));
            };
            let mut v = MetadataValue::try_from(format!("Bearer {token}")).map_err(|_| {
                "the token holds characters a gRPC header cannot carry; copy it again".to_string()
            })?;
            v.set_sensitive(true);
            Ok(Self(Some(v)))
        }
    }

    impl std::fmt::Debug for Bearer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(if self.0.is_some() {
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
            if let Some(v) = &self.0 {
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
