//! The CLI keeps SIGPIPE ignored while it talks to a coordinator, so that a write to a socket whose
//! peer has gone fails with EPIPE where it was made instead of ending the process. hyper and rustls
//! write with `writev`, which has no `MSG_NOSIGNAL`: with SIGPIPE's default action, the TLS
//! close_notify the client wrote after the quickstart had stopped its coordinator killed the CLI by
//! SIGPIPE (once in about 25 runs, after the quickstart had printed everything). Output into a
//! closed pipe still ends the CLI by SIGPIPE; tests/tests/compare.rs checks that.

use std::io::Read;
use std::net::TcpListener;
use std::process::{Command, Stdio};

/// The signals a process ignores, from the `SigIgn` mask in /proc/PID/status.
fn ignored_signals(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let mask = status
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:"))
        .unwrap_or_else(|| panic!("no SigIgn line in /proc/{pid}/status:\n{status}"));
    u64::from_str_radix(mask.trim(), 16).unwrap()
}

#[test]
fn sigpipe_stays_ignored_while_the_cli_talks_to_a_coordinator() {
    // A "coordinator" that accepts the connection and never answers: the CLI is then inside its
    // network code, where the disposition matters, for as long as the test needs.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let mut cli = Command::new(env!("CARGO_BIN_EXE_fleetbench"))
        .args(["--coordinator", &url, "agents", "list"])
        .env_remove("FLEETBENCH_TOKEN")
        .env_remove("FLEETBENCH_CA_CERT")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (mut conn, _) = listener.accept().unwrap();
    // The client has connected and sent its first bytes (the HTTP/2 preface): it is past `main`'s
    // set-up and waiting on the socket.
    let mut preface = [0u8; 24];
    conn.read_exact(&mut preface).unwrap();
    assert_eq!(&preface[..3], b"PRI", "an HTTP/2 client preface");
    let ignored = ignored_signals(cli.id());
    cli.kill().unwrap();
    let out = cli.wait_with_output().unwrap();
    assert!(
        ignored & (1 << (libc::SIGPIPE - 1)) != 0,
        "SIGPIPE is not ignored (SigIgn {ignored:#x}): a write to a closed socket would end the CLI; \
         stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
