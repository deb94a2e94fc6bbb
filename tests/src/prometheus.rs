//! A real Prometheus (`/usr/bin/prometheus`, Debian's package) for tests: a temporary configuration
//! and data folder, a free port, scraping the targets it is given; and a small HTTP client to read
//! `/metrics` and Prometheus's query API.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use http_body_util::BodyExt;

/// The Prometheus binary.
pub const BINARY: &str = "/usr/bin/prometheus";

/// GETs `url` (plain HTTP); returns the status and the body.
pub async fn get(url: &str) -> anyhow::Result<(u16, String)> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<axum::body::Bytes>>();
    let res = tokio::time::timeout(Duration::from_secs(10), client.get(url.parse()?)).await??;
    let status = res.status().as_u16();
    let body = res.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// A Prometheus server, stopped when dropped.
pub struct Prometheus {
    child: Child,
    /// Its HTTP address.
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus scraping `targets` (host:port, path /metrics) every `scrape`, on a free port,
    /// and waits until it is ready.
    pub async fn start(targets: &[SocketAddr], scrape: Duration) -> anyhow::Result<Prometheus> {
        let dir = tempfile::tempdir()?;
        let list: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let ms = scrape.as_millis();
        let config = format!(
            "global:\n  scrape_interval: {ms}ms\n  evaluation_interval: {ms}ms\nscrape_configs:\n  \
             - job_name: fleetbench\n    static_configs:\n      - targets: [{}]\n",
            list.join(", ")
        );
        std::fs::write(dir.path().join("prometheus.yml"), config)?;
        // A free port: bound, read, closed, then given to Prometheus (which has no port-0 mode).
        let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let child = Command::new(BINARY)
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(dir.path().join("log"))?))
            .spawn()
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot start {BINARY} ({e}); scripts/ensure-prometheus.sh installs it"
                )
            })?;
        let p = Prometheus {
            child,
            addr,
            _dir: dir,
        };
        let ready = format!("http://{addr}/-/ready");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok((200, _)) = get(&ready).await {
                return Ok(p);
            }
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!("Prometheus did not become ready: {}", p.log());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("log")).unwrap_or_default()
    }

    /// Runs an instant PromQL query; returns the `data.result` array.
    pub async fn query(&self, promql: &str) -> anyhow::Result<Vec<serde_json::Value>> {
        let url = format!(
            "http://{}/api/v1/query?query={}",
            self.addr,
            urlencode(promql)
        );
        let (status, body) = get(&url).await?;
        let v: serde_json::Value = serde_json::from_str(&body)?;
        if status != 200 || v["status"] != "success" {
            anyhow::bail!("query {promql}: HTTP {status}: {body}");
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    /// The scrape targets' health, as Prometheus reports it.
    pub async fn targets_up(&self) -> anyhow::Result<bool> {
        let (_, body) = get(&format!("http://{}/api/v1/targets", self.addr)).await?;
        let v: serde_json::Value = serde_json::from_str(&body)?;
        let active = v["data"]["activeTargets"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        Ok(!active.is_empty() && active.iter().all(|t| t["health"] == "up"))
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Percent-encodes a query parameter.
pub fn urlencode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// True when the Prometheus binary is installed.
pub fn installed() -> bool {
    Path::new(BINARY).exists()
}
