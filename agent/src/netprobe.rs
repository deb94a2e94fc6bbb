//! The agent's network measurements (see [`fleetbench_common::network`] for the method): its path to
//! the coordinator over the gRPC connection it already has (Probe calls), and to each operator-named
//! target over TCP, which a TCP echo answers — [`serve_echo`] is the one `fleetbench-agent
//! probe-server` runs. The uplink runs them between tasks only, and aborts them when a task arrives.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleetbench_common::network::{self, NetworkPath, ProbeTarget};
use fleetbench_common::now_ms;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::config::NetworkSettings;

/// Longest one probe step (a connect, a round trip, a transfer) may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest a probe-server connection is served.
const ECHO_CONNECTION_LIMIT: Duration = Duration::from_secs(120);

/// Bytes of one round-trip exchange with an echo.
const PING_BYTES: usize = 32;

/// Times `exchange(up, down)` — one exchange carrying `up` bytes to the target and `down` back —
/// into a path: a warm-up, `samples` small exchanges, one transfer up and one down. `symmetric`
/// targets (echoes) carry the same bytes both ways, so one transfer gives both figures.
async fn measure<F, Fut>(
    target: &str,
    address: &str,
    settings: &NetworkSettings,
    symmetric: bool,
    mut exchange: F,
) -> NetworkPath
where
    F: FnMut(u64, u64) -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let mut timed = async |up: u64, down: u64| -> Result<f64, String> {
        let start = Instant::now();
        tokio::time::timeout(STEP_TIMEOUT, exchange(up, down))
            .await
            .map_err(|_| format!("no answer within {} s", STEP_TIMEOUT.as_secs()))??;
        Ok(start.elapsed().as_secs_f64())
    };
    let outcome = async {
        let ping = if symmetric { PING_BYTES as u64 } else { 0 };
        timed(ping, ping).await?;
        let mut rtts = Vec::with_capacity(settings.samples as usize);
        for _ in 0..settings.samples {
            rtts.push(timed(ping, ping).await?);
        }
        let (rtt, rtt_min) = network::round_trips(&rtts).expect("at least one sample");
        let bytes = settings.probe_bytes;
        let (up, down) = if symmetric {
            let both = network::throughput(bytes, timed(bytes, bytes).await?, rtt_min);
            (both, both)
        } else {
            let up = network::throughput(bytes, timed(bytes, 0).await?, rtt_min);
            let down = network::throughput(bytes, timed(0, bytes).await?, rtt_min);
            (up, down)
        };
        Ok::<_, String>(NetworkPath {
            target: target.into(),
            address: address.into(),
            rtt_ms: rtt * 1e3,
            rtt_min_ms: rtt_min * 1e3,
            up_bytes_per_s: up,
            down_bytes_per_s: down,
            probe_bytes: bytes,
            samples: settings.samples,
            measured_at_ms: now_ms(),
            error: String::new(),
        })
    };
    outcome
        .await
        .unwrap_or_else(|e| NetworkPath::failed(target, address, e, now_ms()))
}

/// Measures the path to the coordinator at `address` with Probe calls on `client`'s connection.
pub async fn coordinator<T>(
    client: fleetbench_proto::v1::agent_service_client::AgentServiceClient<T>,
    address: &str,
    settings: &NetworkSettings,
) -> NetworkPath
where
    T: tonic::client::GrpcService<tonic::body::Body> + Clone,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    measure(
        network::COORDINATOR,
        address,
        settings,
        false,
        |up, down| {
            let mut client = client.clone();
            async move {
                let reply = client
                    .probe(fleetbench_proto::v1::ProbeRequest {
                        payload: vec![0x5a; up as usize],
                        response_bytes: down as u32,
                    })
                    .await
                    .map_err(|s| format!("Probe: {}", s.message()))?;
                if reply.get_ref().payload.len() as u64 != down {
                    return Err(format!(
                        "Probe: asked for {down} bytes, got {}",
                        reply.get_ref().payload.len()
                    ));
                }
                Ok(())
            }
        },
    )
    .await
}

/// Sends `n` bytes to an echo and reads `n` back, at once (the echo returns as it receives).
async fn echo(stream: &mut TcpStream, n: u64) -> Result<(), String> {
    let (mut r, mut w) = stream.split();
    let send = async {
        let chunk = vec![0x5au8; (n as usize).min(64 * 1024)];
        let mut left = n as usize;
        while left > 0 {
            let k = left.min(chunk.len());
            w.write_all(&chunk[..k]).await?;
            left -= k;
        }
        w.flush().await
    };
    let receive = async {
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = 0u64;
        while got < n {
            match r.read(&mut buf).await? {
                0 => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!(
                            "the target closed the connection after echoing {got} of {n} bytes (is it a TCP echo?)"
                        ),
                    ));
                }
                k => got += k as u64,
            }
        }
        Ok(())
    };
    tokio::try_join!(send, receive)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Measures the path to a TCP echo target.
pub async fn echo_target(target: &ProbeTarget, settings: &NetworkSettings) -> NetworkPath {
    let connect = tokio::time::timeout(STEP_TIMEOUT, TcpStream::connect(&target.address)).await;
    let stream = match connect {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            return NetworkPath::failed(
                &target.name,
                &target.address,
                format!("cannot connect: {e}"),
                now_ms(),
            );
        }
        Err(_) => {
            return NetworkPath::failed(
                &target.name,
                &target.address,
                format!("no connection within {} s", STEP_TIMEOUT.as_secs()),
                now_ms(),
            );
        }
    };
    let _ = stream.set_nodelay(true);
    let stream = Arc::new(tokio::sync::Mutex::new(stream));
    measure(&target.name, &target.address, settings, true, |up, _| {
        let stream = stream.clone();
        async move { echo(&mut *stream.lock().await, up).await }
    })
    .await
}

/// Measures every path: the coordinator's, then each target's, one after another.
pub async fn all<T>(
    client: fleetbench_proto::v1::agent_service_client::AgentServiceClient<T>,
    coordinator_address: &str,
    settings: &NetworkSettings,
) -> Vec<NetworkPath>
where
    T: tonic::client::GrpcService<tonic::body::Body> + Clone,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    let mut paths = vec![coordinator(client, coordinator_address, settings).await];
    for t in &settings.targets {
        paths.push(echo_target(t, settings).await);
    }
    paths
}

/// Serves a TCP echo on `listener`: each connection's bytes go back as they arrive, at most
/// `max_connections` connections at once (more are closed at once), each for at most two minutes.
pub async fn serve_echo(listener: TcpListener, max_connections: usize) -> std::io::Result<()> {
    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections.max(1)));
    loop {
        let (mut socket, peer) = match listener.accept().await {
            Ok(c) => c,
            // Out of descriptors and the like: wait a moment rather than spin.
            Err(e) => {
                tracing::warn!(error = %e, "Could not accept a probe connection.");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "Too many probe connections; closed this one.");
            continue;
        };
        tokio::spawn(async move {
            let _slot = slot;
            let _ = socket.set_nodelay(true);
            let (mut r, mut w) = socket.split();
            let _ =
                tokio::time::timeout(ECHO_CONNECTION_LIMIT, tokio::io::copy(&mut r, &mut w)).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(targets: Vec<ProbeTarget>) -> NetworkSettings {
        NetworkSettings {
            targets,
            probe_bytes: 256 * 1024,
            samples: 3,
            interval: None,
        }
    }

    #[tokio::test]
    async fn an_echo_target_is_measured_through_the_probe_server() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve_echo(listener, 4));
        let target = ProbeTarget {
            name: "hq".into(),
            address: addr.to_string(),
        };
        let p = echo_target(&target, &settings(vec![])).await;
        assert!(p.ok(), "{p:?}");
        assert_eq!((p.target.as_str(), p.samples), ("hq", 3));
        assert!(p.rtt_ms > 0.0 && p.rtt_min_ms <= p.rtt_ms, "{p:?}");
        assert!(p.up_bytes_per_s > 0.0 && p.up_bytes_per_s == p.down_bytes_per_s);
        server.abort();
    }

    #[tokio::test]
    async fn an_unreachable_target_is_reported_not_fatal() {
        // A port that was just free: nothing listens there.
        let addr = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let target = ProbeTarget {
            name: "gone".into(),
            address: addr.to_string(),
        };
        let p = echo_target(&target, &settings(vec![])).await;
        assert!(p.error.contains("cannot connect"), "{p:?}");
        assert_eq!(p.rtt_ms, 0.0);
    }

    #[tokio::test]
    async fn a_server_that_does_not_echo_is_named() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Accepts, reads the first exchange without answering, hangs up.
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut b = [0u8; PING_BYTES];
            let _ = s.read_exact(&mut b).await;
        });
        let target = ProbeTarget {
            name: "web".into(),
            address: addr.to_string(),
        };
        let p = echo_target(&target, &settings(vec![])).await;
        assert!(p.error.contains("is it a TCP echo"), "{p:?}");
    }
}
