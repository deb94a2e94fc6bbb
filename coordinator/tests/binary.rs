//! The `fleetbench-coordinator` binary: bad settings fail at start with errors that name what is wrong
//! (and never print a database password); good ones serve.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn coordinator() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fleetbench-coordinator"));
    c.env_remove("RUST_LOG").stdin(Stdio::null());
    for v in [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
        "FLEETBENCH_LOG_FORMAT",
    ] {
        c.env_remove(v);
    }
    c
}

fn fails_with(args: &[&str], needle: &str) -> String {
    let out = coordinator()
        .args(args)
        .output()
        .expect("run the coordinator");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "expected failure for {args:?}");
    assert!(
        stderr.contains(needle),
        "stderr for {args:?} lacks '{needle}':\n{stderr}"
    );
    stderr
}

#[test]
fn otlp_and_metrics_settings_that_cannot_work_are_named() {
    for (args, needle) in [
        (
            &["--otlp-endpoint", "collector:4318"][..],
            "otlp_endpoint: 'collector:4318' must be an http:// URL",
        ),
        (
            &["--otlp-endpoint", "https://collector:4318"][..],
            "TLS to a collector is not built into fleetbench",
        ),
        (
            &[
                "--otlp-endpoint",
                "http://collector:4318",
                "--otlp-protocol",
                "http/json",
            ][..],
            "otlp_protocol: 'http/json' is not an OTLP protocol fleetbench exports over",
        ),
        (
            &["--metrics-listen", "localhost"][..],
            "metrics_listen: 'localhost' is not an IP:port",
        ),
        (&["--log-format", "yaml"][..], "use text or json"),
    ] {
        let mut all = vec!["--listen", "127.0.0.1:0"];
        all.extend_from_slice(args);
        fails_with(&all, needle);
    }
    // The standard variable is read, and checked the same way.
    let out = coordinator()
        .args(["--listen", "127.0.0.1:0"])
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", "ftp://collector")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("OTEL_EXPORTER_OTLP_ENDPOINT: 'ftp://collector'"),
        "{stderr}"
    );
}

#[test]
fn a_malformed_database_url_is_named() {
    fails_with(
        &["--listen", "127.0.0.1:0", "--database", "mysql://db/fleet"],
        "must start with sqlite:// or postgres://",
    );
}

#[test]
fn an_unreachable_database_is_named_without_its_password() {
    let stderr = fails_with(
        &[
            "--listen",
            "127.0.0.1:0",
            "--database",
            "postgres://bob:s3cret@127.0.0.1:1/fleet",
        ],
        "cannot connect to database postgres://bob:***@127.0.0.1:1/fleet",
    );
    assert!(!stderr.contains("s3cret"), "{stderr}");
}

#[test]
fn a_sqlite_file_that_cannot_be_created_is_named() {
    fails_with(
        &[
            "--listen",
            "127.0.0.1:0",
            "--database",
            "sqlite:///nonexistent-dir/x/fleet.db",
        ],
        "cannot open database sqlite:///nonexistent-dir/x/fleet.db",
    );
}

#[test]
fn bad_settings_name_the_field() {
    fails_with(
        &["--listen", "nowhere"],
        "listen: 'nowhere' is not an IP:port address",
    );
    fails_with(
        &["--listen", "127.0.0.1:0", "--lease-timeout-ms", "10"],
        "lease_timeout_ms",
    );
}

/// Starts the coordinator with `args`, waits until it has written its address, and returns both.
fn start(args: &[&str], dir: &std::path::Path) -> (std::process::Child, String) {
    let addr_file = dir.join("addr");
    let _ = std::fs::remove_file(&addr_file);
    let mut child = coordinator()
        .args(args)
        .arg("--database")
        .arg(format!("sqlite://{}", dir.join("fleet.db").display()))
        .arg("--addr-file")
        .arg(&addr_file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let addr = loop {
        if let Ok(a) = std::fs::read_to_string(&addr_file)
            && !a.is_empty()
        {
            break a.trim().to_string();
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the coordinator exited"
        );
        assert!(Instant::now() < deadline, "no address file");
        std::thread::sleep(Duration::from_millis(20));
    };
    (child, addr)
}

#[test]
fn it_serves_on_port_zero_and_reports_the_address() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr) = start(&["--listen", "127.0.0.1:0"], dir.path());
    let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();
    assert_ne!(port, 0);
    std::net::TcpStream::connect(&addr).expect("it accepts connections");
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn an_address_others_can_reach_needs_tls_or_insecure() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("fleet.db").display());
    fails_with(
        &["--listen", "0.0.0.0:0", "--database", &db],
        "without TLS: run `fleetbench-coordinator init",
    );
    // --insecure serves plaintext there.
    let (mut child, _) = start(&["--listen", "0.0.0.0:0", "--insecure"], dir.path());
    child.kill().unwrap();
    child.wait().unwrap();
    // After init (its files in the SQLite file's folder, the default data directory), the same
    // command serves, with TLS.
    let init = coordinator()
        .args(["init", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(init.status.success());
    let (mut child, _) = start(&["--listen", "0.0.0.0:0"], dir.path());
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn init_makes_a_ca_and_a_server_certificate_and_prints_the_fingerprint() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let out = coordinator()
        .args(["init", "--data-dir"])
        .arg(dir.path())
        .args(["--san", "coord.example.net", "--san", "10.0.0.5"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("Made a certificate authority"), "{stdout}");
    assert!(stdout.contains("coord.example.net, 10.0.0.5"), "{stdout}");
    let fp = stdout
        .lines()
        .find_map(|l| l.split("CA fingerprint (SHA-256 of its DER): ").nth(1))
        .expect("a fingerprint line")
        .trim()
        .to_string();
    assert_eq!(fp.len(), 64, "{fp}");
    for (file, mode) in [
        ("ca.pem", 0o644),
        ("ca.key", 0o600),
        ("server.pem", 0o644),
        ("server.key", 0o600),
    ] {
        let meta = std::fs::metadata(dir.path().join("tls").join(file)).unwrap();
        let got = meta.permissions().mode() & 0o777;
        if mode == 0o600 {
            assert_eq!(got, mode, "{file}");
        } else {
            assert_eq!(got & 0o077 & !0o044, 0, "{file}: {got:o}");
        }
    }
    // Again: the CA is kept, so clients keep trusting it.
    let again = coordinator()
        .args(["init", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&again.stdout).to_string();
    assert!(
        stdout.contains("Kept the certificate authority"),
        "{stdout}"
    );
    assert!(stdout.contains(&fp), "{stdout}");
}

#[test]
fn json_logs_are_one_object_per_line() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let mut child = coordinator()
        .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
        .arg("--database")
        .arg(format!(
            "sqlite://{}",
            dir.path().join("fleet.db").display()
        ))
        .arg("--data-dir")
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            if tx.send(line.unwrap()).is_err() {
                return;
            }
        }
    });
    let mut seen = Vec::new();
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("no 'Coordinator listening.' line; got {seen:#?}"));
        let v: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("not a JSON object ({e}): {line}"));
        assert!(
            v["timestamp"].is_string() && v["level"].is_string(),
            "{line}"
        );
        seen.push(line.clone());
        if v["fields"]["message"] == "Coordinator listening." {
            assert!(v["fields"]["addr"].is_string(), "{line}");
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
}
