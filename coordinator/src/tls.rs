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
        let pem = std::fs::read_to_string(files.ca_key())
            .map_err(|e| io("cannot read", &files.ca_key(), e))?;
        let key = KeyPair::from_pem(&pem).map_err(|e| rc("the CA key", e))?;
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
    let mut all: Vec<String> = LOCAL_NAMES.iter().map(|s| s.to_string()).collect();
    for n in names {
        let n = n.trim();
        if n.is_empty() || n.contains(char::is_whitespace) || n.contains('/') {
            return Err(Error::InvalidArgument(format!(
                "san: '{n}' is not a host name or IP address"
            )));
        }
        if !all.iter().any(|a| a == n) {
            all.push(n.to_string());
        }
    }
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|e| rc("server", e))?;
    params.subject_alt_names = all
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
    valid_for(&mut params, SERVER_VALID_DAYS);
    let key = KeyPair::generate().map_err(|e| rc("a server key", e))?;
    let issuer = Issuer::new(ca_params()?, &ca_key);
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|e| rc("the server certificate", e))?;
    write_file(&files.server_key(), &key.serialize_pem(), true)?;
    write_file(&files.server_cert(), &cert.pem(), false)?;
    Ok(Initialised {
        files: files.clone(),
        new_ca,
        ca_fingerprint,
        names: all,
    })
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

/// The server certificate and key (PEM) to serve with: `tls_cert`/`tls_key` when set, else the files
/// `init` made in the data directory; None when there are none.
pub fn server_identity(config: &CoordinatorConfig) -> Result<Option<(String, String)>> {
    let (cert, key) = match (config.tls_cert.is_empty(), config.tls_key.is_empty()) {
        (false, false) => (
            PathBuf::from(&config.tls_cert),
            PathBuf::from(&config.tls_key),
        ),
        (true, true) => match data_dir_of(config).map(|d| TlsFiles::under(&d)) {
            Some(f) if f.server_cert().exists() => (f.server_cert(), f.server_key()),
            _ => return Ok(None),
        },
        _ => {
            return Err(Error::InvalidArgument(
                "tls_cert, tls_key: give both or neither".into(),
            ));
        }
    };
    let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| io("cannot read", p, e));
    Ok(Some((read(&cert)?, read(&key)?)))
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

    #[test]
    fn loopback_addresses_are_told_apart() {
        assert!(is_loopback("127.0.0.1:7700"));
        assert!(is_loopback("[::1]:7700"));
        assert!(!is_loopback("0.0.0.0:7700"));
        assert!(!is_loopback("10.0.0.5:7700"));
    }
}
