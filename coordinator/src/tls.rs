//! TLS for the coordinator's listener: `fleetbench-coordinator init` makes a certificate authority of
//! the coordinator's own and a server certificate signed by it (rcgen, ECDSA P-256 keys made with
//! `ring`); `serve` loads the server certificate from the data directory, or from `tls_cert`/`tls_key`
//! (a certificate from the operator's own CA). Clients and agents trust the CA certificate (`ca.pem`),
//! whose SHA-256 fingerprint `init` prints.
//!
//! Files, in `<data dir>/tls/`: `ca.pem` (public; give it to clients), `ca.key`, `server.pem`,
//! `server.key` (keys are written with mode 0600). Validity: the CA 10 years, the server certificate
//! 1 year; `init` run again keeps the CA (so clients keep trusting it) and issues a new server
//! certificate, e.g. for new names or before the old one expires.

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::sign::CertifiedKey;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use sha2::{Digest, Sha256};

use crate::config::CoordinatorConfig;
use crate::error::{Error, Result};

/// Days the CA certificate is valid.
pub const CA_VALID_DAYS: i64 = 3650;
/// Days a server certificate is valid.
pub const SERVER_VALID_DAYS: i64 = 365;

/// Names every server certificate holds besides those asked for, so local clients can connect.
const LOCAL_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// The TLS files in a data directory.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// `<data dir>/tls`.
    pub dir: PathBuf,
}

impl TlsFiles {
    /// The files under `data_dir`.
    pub fn under(data_dir: &Path) -> Self {
        Self {
            dir: data_dir.join("tls"),
        }
    }
    /// The CA certificate (PEM): what clients and agents trust.
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    /// The CA key (PEM, 0600).
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }
    /// The server certificate (PEM).
    pub fn server_cert(&self) -> PathBuf {
        self.dir.join("server.pem")
    }
    /// The server key (PEM, 0600).
    pub fn server_key(&self) -> PathBuf {
        self.dir.join("server.key")
    }
}

/// What `init` did.
#[derive(Debug, Clone)]
pub struct Initialised {
    /// Where the files are.
    pub files: TlsFiles,
    /// True when the CA was made now; false when an existing one was kept.
    pub new_ca: bool,
    /// SHA-256 of the CA certificate's DER, lower-case hex.
    pub ca_fingerprint: String,
    /// The names the server certificate holds.
    pub names: Vec<String>,
}

fn rc(what: &str, e: rcgen::Error) -> Error {
    Error::Internal(format!("{what}: {e}"))
}

fn io(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::Storage(format!("{what} {}: {e}", path.display()))
}

fn valid_for(params: &mut CertificateParams, days: i64) {
    let now = time::OffsetDateTime::now_utc();
    // An hour back, for clocks a little behind ours.
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(days);
}

/// The CA's parameters. They are the same every time, so a server certificate issued later names the
/// same issuer as the stored CA certificate.
fn ca_params() -> Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|e| rc("CA", e))?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "fleetbench");
    dn.push(DnType::CommonName, "fleetbench coordinator CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

/// Writes `text` to `path`, readable by its owner only when `secret`.
pub(crate) fn write_file(path: &Path, text: &str, secret: bool) -> Result<()> {
    // A temporary file of its own (`server.key.tmp`, never shared with `server.pem`), made new: a
    // stale one left by an interrupted run may have other permissions, which a key must not inherit.
    let mut name = path.as_os_str().to_owned();
    name.push(".tmp");
    let tmp = PathBuf::from(name);
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(io("cannot remove", &tmp, e));
        }
        _ => {}
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, if secret { 0o600 } else { 0o644 });
    let mut f = opts.open(&tmp).map_err(|e| io("cannot write", &tmp, e))?;
    f.write_all(text.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| io("cannot write", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io("cannot write", path, e))
}

/// SHA-256 of the first certificate in `pem`, lower-case hex.
pub fn fingerprint(pem: &str) -> Result<String> {
    fleetbench_common::token::ca_fingerprint(pem).map_err(Error::InvalidArgument)
}

/// Makes the CA (unless `files` already hold one, which is kept) and a new server certificate for
/// `names` (DNS names or IP addresses) plus localhost.
pub fn init(files: &TlsFiles, names: &[String]) -> Result<Initialised> {
    std::fs::create_dir_all(&files.dir).map_err(|e| io("cannot create", &files.dir, e))?;
    // The fingerprint of a new CA comes from the DER rcgen made, that of a kept one from its PEM file:
    // the test that both agree checks the PEM reading.
    let (ca_key, new_ca, ca_fingerprint) = if files.ca_key().exists() && files.ca_cert().exists() {
        let key = read_ca_key(files)?;
        let cert = std::fs::read_to_string(files.ca_cert())
            .map_err(|e| io("cannot read", &files.ca_cert(), e))?;
        (key, false, fingerprint(&cert)?)
    } else {
        let key = KeyPair::generate().map_err(|e| rc("a CA key", e))?;
        let mut params = ca_params()?;
        valid_for(&mut params, CA_VALID_DAYS);
        let cert = params.self_signed(&key).map_err(|e| rc("the CA", e))?;
        write_file(&files.ca_key(), &key.serialize_pem(), true)?;
        write_file(&files.ca_cert(), &cert.pem(), false)?;
        let fp = hex::encode(Sha256::digest(cert.der()));
        (key, true, fp)
    };
    let all = names_with_local(names)?;
    issue_server_with(
        files,
        &ca_key,
        &all,
        time::Duration::days(SERVER_VALID_DAYS),
    )?;
    Ok(Initialised {
        files: files.clone(),
        new_ca,
        ca_fingerprint,
        names: all,
    })
}

/// `names` checked, after the local names every certificate holds.
fn names_with_local(names: &[String]) -> Result<Vec<String>> {
    let mut all: Vec<String> = LOCAL_NAMES.iter().map(|s| s.to_string()).collect();
    for n in names {
        let n = n.trim();
        if n.is_empty() || n.contains(char::is_whitespace) || n.contains('/') {
            return Err(Error::InvalidArgument(format!(
                "san: '{n}' is not a host name or IP address"
            )));
        }
        // A port has no place in a certificate's names (IPv6 addresses hold colons of their own).
        if n.contains(':') && n.parse::<IpAddr>().is_err() {
            return Err(Error::InvalidArgument(format!(
                "san: '{n}' looks like HOST:PORT; give the name or address alone (the port is not \
                 part of a certificate's names)"
            )));
        }
        if !all.iter().any(|a| a == n) {
            all.push(n.to_string());
        }
    }
    Ok(all)
}

fn read_ca_key(files: &TlsFiles) -> Result<KeyPair> {
    let pem = std::fs::read_to_string(files.ca_key())
        .map_err(|e| io("cannot read", &files.ca_key(), e))?;
    KeyPair::from_pem(&pem).map_err(|e| rc("the CA key", e))
}

/// Issues a server certificate for `names` (all of them, as given) signed by the CA in `files`, valid
/// from an hour ago for `valid`, and writes it with a new key over the old files.
pub fn issue_server(files: &TlsFiles, names: &[String], valid: time::Duration) -> Result<()> {
    issue_server_with(files, &read_ca_key(files)?, names, valid)
}

fn issue_server_with(
    files: &TlsFiles,
    ca_key: &KeyPair,
    names: &[String],
    valid: time::Duration,
) -> Result<()> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|e| rc("server", e))?;
    params.subject_alt_names = names
        .iter()
        .map(|n| match n.parse::<IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => n
                .clone()
                .try_into()
                .map(SanType::DnsName)
                .map_err(|e| rc(&format!("san '{n}'"), e)),
        })
        .collect::<Result<_>>()?;
    params
        .distinguished_name
        .push(DnType::CommonName, "fleetbench coordinator");
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + valid;
    let key = KeyPair::generate().map_err(|e| rc("a server key", e))?;
    let issuer = Issuer::new(ca_params()?, ca_key);
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|e| rc("the server certificate", e))?;
    write_file(&files.server_key(), &key.serialize_pem(), true)?;
    write_file(&files.server_cert(), &cert.pem(), false)
}

/// What a certificate says of itself: its names and validity (seconds since the epoch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// DNS names and IP addresses.
    pub names: Vec<String>,
    /// Start of validity.
    pub not_before: i64,
    /// End of validity.
    pub not_after: i64,
}

/// Reads the names and validity of a DER certificate.
pub fn cert_info(der: &[u8]) -> Result<CertInfo> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| Error::InvalidArgument(format!("not an X.509 certificate: {e}")))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(d) => names.push(d.to_string()),
                GeneralName::IPAddress(b) => match b.len() {
                    4 => names.push(
                        IpAddr::from(<[u8; 4]>::try_from(*b).unwrap_or_default()).to_string(),
                    ),
                    16 => names.push(
                        IpAddr::from(<[u8; 16]>::try_from(*b).unwrap_or_default()).to_string(),
                    ),
                    _ => {}
                },
                _ => {}
            }
        }
    }
    Ok(CertInfo {
        names,
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
    })
}

/// Whether a certificate valid over `info` is due for renewal at `now` (seconds): a third of its
/// validity or less is left.
pub fn renewal_due(info: &CertInfo, now: i64) -> bool {
    let life = (info.not_after - info.not_before).max(0);
    info.not_after - now <= life / 3
}

/// Where the served certificate comes from.
#[derive(Debug, Clone)]
enum Source {
    /// Made by `init` from the CA in the data directory: renewed here before it expires, and sent
    /// with the CA certificate, so an agent holding only a join token finds the CA it pins.
    Own(TlsFiles),
    /// The operator's own (`tls_cert`, `tls_key`): read again when the files change.
    Given { cert: PathBuf, key: PathBuf },
}

/// The coordinator's server certificate, swapped in place when it is renewed or its files change:
/// new connections get the new one, open ones keep theirs.
#[derive(Debug)]
pub struct ServerCerts {
    source: Source,
    current: std::sync::RwLock<Arc<CertifiedKey>>,
    /// The file contents `current` was made from.
    loaded: std::sync::Mutex<(String, String)>,
}

fn parse_key(cert_pem: &str, key_pem: &str, ca_pem: Option<&str>) -> Result<CertifiedKey> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let bad =
        |what: &str, e: &dyn std::fmt::Display| Error::InvalidArgument(format!("TLS {what}: {e}"));
    let mut chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| bad("certificate", &e))?;
    if chain.is_empty() {
        return Err(Error::InvalidArgument(
            "TLS certificate: the file holds no PEM certificate".into(),
        ));
    }
    if let Some(ca) = ca_pem {
        for c in CertificateDer::pem_slice_iter(ca.as_bytes()) {
            let c = c.map_err(|e| bad("CA certificate", &e))?;
            if !chain.contains(&c) {
                chain.push(c);
            }
        }
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| bad("key", &e))?;
    let signer =
        rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| bad("key", &e))?;
    let certified = CertifiedKey::new(chain, signer);
    // A certificate and a key replaced one after the other can be read half way: both parse, but
    // they do not belong together, and every handshake would fail.
    certified.keys_match().map_err(|e| {
        Error::InvalidArgument(format!(
            "TLS: the key does not belong to the certificate ({e})"
        ))
    })?;
    Ok(certified)
}

impl ServerCerts {
    /// The certificate to serve with: `tls_cert`/`tls_key` when set, else the files `init` made in the
    /// data directory; None when there are none.
    pub fn load(config: &CoordinatorConfig) -> Result<Option<Arc<Self>>> {
        let source = match (config.tls_cert.is_empty(), config.tls_key.is_empty()) {
            (false, false) => Source::Given {
                cert: PathBuf::from(&config.tls_cert),
                key: PathBuf::from(&config.tls_key),
            },
            (true, true) => match data_dir_of(config).map(|d| TlsFiles::under(&d)) {
                Some(f) if f.server_cert().exists() => Source::Own(f),
                _ => return Ok(None),
            },
            _ => {
                return Err(Error::InvalidArgument(
                    "tls_cert, tls_key: give both or neither".into(),
                ));
            }
        };
        let (cert, key, ca) = Self::read(&source)?;
        let current = parse_key(&cert, &key, ca.as_deref())?;
        Ok(Some(Arc::new(Self {
            source,
            current: std::sync::RwLock::new(Arc::new(current)),
            loaded: std::sync::Mutex::new((cert, key)),
        })))
    }

    fn paths(source: &Source) -> (PathBuf, PathBuf) {
        match source {
            Source::Own(f) => (f.server_cert(), f.server_key()),
            Source::Given { cert, key } => (cert.clone(), key.clone()),
        }
    }

    fn read(source: &Source) -> Result<(String, String, Option<String>)> {
        let (cert, key) = Self::paths(source);
        let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| io("cannot read", p, e));
        let ca = match source {
            Source::Own(f) => std::fs::read_to_string(f.ca_cert()).ok(),
            Source::Given { .. } => None,
        };
        Ok((read(&cert)?, read(&key)?, ca))
    }

    /// The certificate served now (leaf first).
    pub fn chain(&self) -> Vec<Vec<u8>> {
        let current = self
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        current.cert.iter().map(|c| c.to_vec()).collect()
    }

    /// Renews a certificate `init` made when it is due (the CA key must be in the data directory),
    /// then serves the files as they are now if they changed. Returns what it did, for the log.
    pub fn refresh(&self) -> Result<Option<String>> {
        let mut what = None;
        if let Source::Own(files) = &self.source
            && !files.ca_key().exists()
        {
            let (cert, _, _) = Self::read(&self.source)?;
            if let Ok(der) = pem::parse(&cert)
                && let Ok(info) = cert_info(der.contents())
                && renewal_due(&info, time::OffsetDateTime::now_utc().unix_timestamp())
            {
                return Err(Error::FailedPrecondition(format!(
                    "the server certificate is due for renewal (it expires at {} s since the epoch), \
                     but the CA key {} is not here: run `fleetbench-coordinator init` where the CA key \
                     is and copy server.pem and server.key back",
                    info.not_after,
                    files.ca_key().display()
                )));
            }
        }
        if let Source::Own(files) = &self.source
            && files.ca_key().exists()
        {
            let (cert, _, _) = Self::read(&self.source)?;
            let der = pem::parse(&cert)
                .map_err(|e| Error::InvalidArgument(format!("TLS certificate: {e}")))?;
            let info = cert_info(der.contents())?;
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            if renewal_due(&info, now) {
                issue_server(files, &info.names, time::Duration::days(SERVER_VALID_DAYS))?;
                what = Some(format!(
                    "renewed the server certificate (it expired or was to expire at {}; the new one is valid for {SERVER_VALID_DAYS} days)",
                    info.not_after
                ));
            }
        }
        let (cert, key, ca) = Self::read(&self.source)?;
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if (cert.as_str(), key.as_str()) != (loaded.0.as_str(), loaded.1.as_str()) {
            // A certificate half written by other tooling fails to parse: the old one stays served and
            // the next look tries again.
            let fresh = parse_key(&cert, &key, ca.as_deref())?;
            *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(fresh);
            *loaded = (cert, key);
            what.get_or_insert_with(|| "serving the changed certificate files".to_string());
        }
        Ok(what)
    }

    /// Looks at the certificate every `every` until `stop`.
    pub async fn keep_fresh(
        self: Arc<Self>,
        every: std::time::Duration,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            let me = self.clone();
            match tokio::task::spawn_blocking(move || me.refresh()).await {
                Ok(Ok(Some(what))) => tracing::info!("TLS: {what}."),
                Ok(Ok(None)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "TLS: could not refresh the server certificate; the current one stays.")
                }
                Err(e) => tracing::warn!(error = %e, "TLS: the certificate refresh failed."),
            }
        }
    }

    /// A rustls server configuration serving this certificate (HTTP/2 only, as gRPC needs).
    pub fn server_config(self: &Arc<Self>) -> Result<rustls::ServerConfig> {
        let provider = fleetbench_proto::connect::ring_provider();
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Internal(format!("TLS: {e}")))?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }
}

impl rustls::server::ResolvesServerCert for ServerCerts {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

/// The data directory the TLS files live in: `data_dir`, else the SQLite file's folder.
pub fn data_dir_of(config: &CoordinatorConfig) -> Option<PathBuf> {
    if !config.data_dir.is_empty() {
        return Some(PathBuf::from(&config.data_dir));
    }
    let path = config.database.strip_prefix("sqlite://")?;
    let path = path.split('?').next().unwrap_or(path);
    Some(
        Path::new(path)
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from(".")),
    )
}

/// Whether `listen` (IP:port) is reachable from this machine only.
pub fn is_loopback(listen: &str) -> bool {
    listen
        .parse::<std::net::SocketAddr>()
        .is_ok_and(|a| a.ip().is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_keeps_its_ca_and_writes_keys_for_the_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let files = TlsFiles::under(dir.path());
        let first = init(&files, &["coord.example.net".into(), "10.0.0.5".into()]).unwrap();
        assert!(first.new_ca);
        assert!(first.names.contains(&"10.0.0.5".to_string()));
        for key in [files.ca_key(), files.server_key()] {
            let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
        }
        let server1 = std::fs::read_to_string(files.server_cert()).unwrap();
        let again = init(&files, &["other.example.net".into()]).unwrap();
        assert!(!again.new_ca);
        assert_eq!(again.ca_fingerprint, first.ca_fingerprint);
        assert_ne!(
            std::fs::read_to_string(files.server_cert()).unwrap(),
            server1
        );
        assert!(init(&files, &["two words".into()]).is_err());
        let e = init(&files, &["coord.example.net:7700".into()]).unwrap_err();
        assert!(e.to_string().contains("HOST:PORT"), "{e}");
        assert!(init(&files, &["10.0.0.5:7700".into()]).is_err());
        assert!(init(&files, &["fd00::5".into()]).is_ok());
    }

    #[test]
    fn stale_temporary_files_never_make_a_key_readable_by_others() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let files = TlsFiles::under(dir.path());
        std::fs::create_dir_all(&files.dir).unwrap();
        // Left by interrupted runs: world-readable temporary files under the names a key's write
        // used (before the fix the key and its certificate shared `server.tmp`) and uses now.
        for stale in ["server.tmp", "ca.tmp", "server.key.tmp", "ca.key.tmp"] {
            let p = files.dir.join(stale);
            std::fs::write(&p, b"stale").unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        init(&files, &[]).unwrap();
        for key in [files.ca_key(), files.server_key()] {
            let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
        }
    }

    fn leaf(files: &TlsFiles) -> Vec<u8> {
        let pem = std::fs::read_to_string(files.server_cert()).unwrap();
        pem::parse(pem).unwrap().contents().to_vec()
    }

    #[test]
    fn a_certificate_is_due_for_renewal_in_the_last_third_of_its_validity() {
        let info = |nb, na| CertInfo {
            names: vec![],
            not_before: nb,
            not_after: na,
        };
        assert!(!renewal_due(&info(0, 300), 199));
        assert!(renewal_due(&info(0, 300), 200));
        assert!(renewal_due(&info(0, 300), 400));
    }

    #[test]
    fn a_certificate_init_made_is_renewed_for_the_same_names_and_served_with_its_ca() {
        let dir = tempfile::tempdir().unwrap();
        let files = TlsFiles::under(dir.path());
        init(&files, &["coord.example.net".into(), "10.0.0.5".into()]).unwrap();
        let config = CoordinatorConfig {
            data_dir: dir.path().display().to_string(),
            ..Default::default()
        };
        let certs = ServerCerts::load(&config).unwrap().unwrap();
        // Served with the CA after the leaf, so a join token's pin finds it.
        let ca = std::fs::read_to_string(files.ca_cert()).unwrap();
        let ca_der = pem::parse(&ca).unwrap().contents().to_vec();
        assert_eq!(certs.chain(), vec![leaf(&files), ca_der.clone()]);
        // A year left of a year: nothing to do.
        assert_eq!(certs.refresh().unwrap(), None);
        // Ten minutes left of seventy: renewed, same names, a year's validity, served at once.
        let names = cert_info(&leaf(&files)).unwrap().names;
        issue_server(&files, &names, time::Duration::minutes(10)).unwrap();
        let short = leaf(&files);
        let what = certs.refresh().unwrap().unwrap();
        assert!(what.contains("renewed"), "{what}");
        let renewed = cert_info(&leaf(&files)).unwrap();
        assert_ne!(leaf(&files), short);
        assert_eq!(renewed.names, names);
        assert!(
            names.contains(&"10.0.0.5".to_string())
                && names.contains(&"coord.example.net".to_string())
        );
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        assert!(renewed.not_after - now > 300 * 86_400, "{renewed:?}");
        assert_eq!(certs.chain(), vec![leaf(&files), ca_der]);
    }

    #[test]
    fn certificate_files_of_your_own_are_served_again_when_they_change() {
        let dir = tempfile::tempdir().unwrap();
        let files = TlsFiles::under(dir.path());
        init(&files, &[]).unwrap();
        let (cert, key) = (dir.path().join("mine.pem"), dir.path().join("mine.key"));
        std::fs::copy(files.server_cert(), &cert).unwrap();
        std::fs::copy(files.server_key(), &key).unwrap();
        let config = CoordinatorConfig {
            tls_cert: cert.display().to_string(),
            tls_key: key.display().to_string(),
            ..Default::default()
        };
        let certs = ServerCerts::load(&config).unwrap().unwrap();
        assert_eq!(certs.chain(), vec![leaf(&files)]);
        assert_eq!(certs.refresh().unwrap(), None);
        // Your tooling renews them (here: init again); a half-written key is not served.
        init(&files, &[]).unwrap();
        std::fs::copy(files.server_cert(), &cert).unwrap();
        std::fs::write(&key, "-----BEGIN PRIVATE KEY-----\ntrunc").unwrap();
        assert!(certs.refresh().is_err());
        assert_ne!(certs.chain(), vec![leaf(&files)]);
        std::fs::copy(files.server_key(), &key).unwrap();
        assert!(certs.refresh().unwrap().is_some());
        assert_eq!(certs.chain(), vec![leaf(&files)]);
    }

    #[test]
    fn a_key_that_does_not_belong_to_the_certificate_is_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (
            TlsFiles::under(&dir.path().join("a")),
            TlsFiles::under(&dir.path().join("b")),
        );
        init(&a, &[]).unwrap();
        init(&b, &[]).unwrap();
        let config = CoordinatorConfig {
            tls_cert: a.server_cert().display().to_string(),
            tls_key: b.server_key().display().to_string(),
            ..Default::default()
        };
        let e = ServerCerts::load(&config).unwrap_err().to_string();
        assert!(e.contains("does not belong"), "{e}");
    }

    #[test]
    fn loopback_addresses_are_told_apart() {
        assert!(is_loopback("127.0.0.1:7700"));
        assert!(is_loopback("[::1]:7700"));
        assert!(!is_loopback("0.0.0.0:7700"));
        assert!(!is_loopback("10.0.0.5:7700"));
    }
}
