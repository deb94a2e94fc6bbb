//! The `fleetbench-coordinator` binary: bad settings fail at start with errors that name what is wrong
//! (and never print a database password); good ones serve.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn coordinator() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fleetbench-coordinator"));
    c.env_remove("RUST_LOG").stdin(Stdio::null());
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
    fails_with(&["--listen", "nowhere"], "listen");
    fails_with(
        &["--listen", "127.0.0.1:0", "--lease-timeout-ms", "10"],
        "lease_timeout_ms",
    );
}

#[test]
fn it_serves_on_port_zero_and_reports_the_address() {
    let dir = tempfile::tempdir().unwrap();
    let addr_file = dir.path().join("addr");
    let mut child = coordinator()
        .args(["--listen", "127.0.0.1:0"])
        .arg("--database")
        .arg(format!(
            "sqlite://{}",
            dir.path().join("fleet.db").display()
        ))
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
            break a;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the coordinator exited"
        );
        assert!(Instant::now() < deadline, "no address file");
        std::thread::sleep(Duration::from_millis(20));
    };
    let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();
    assert_ne!(port, 0);
    std::net::TcpStream::connect(addr.trim()).expect("it accepts connections");
    child.kill().unwrap();
    child.wait().unwrap();
}
