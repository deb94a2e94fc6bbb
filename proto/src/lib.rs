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
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

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
