//! Shared by the integration tests: penstock in front of the fake upstream, both on
//! `127.0.0.1:0`.
#![allow(dead_code)]

use std::time::Duration;

#[allow(unused_imports)]
pub use fake_openai::{Behaviour, Fake, Limits};
use penstock::{Config, Running};

pub mod redis_server;

pub struct Harness {
    pub fake: Fake,
    pub penstock: Running,
    /// `http://127.0.0.1:PORT` of penstock's proxy listener.
    pub url: String,
    /// `http://127.0.0.1:PORT` of penstock's admin listener.
    pub admin: String,
}

/// A config pointing at `upstream`, with both listeners on ephemeral ports.
pub fn config_for(upstream: &str) -> Config {
    let mut c = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        ..Config::default()
    };
    c.upstream.base_url = upstream.to_string();
    c.upstream.connect_timeout = Duration::from_secs(2);
    c.server.shutdown_grace = Duration::from_secs(5);
    // Retries as in production, only with short backoffs.
    c.retry.initial_backoff = Duration::from_millis(10);
    c.retry.max_backoff = Duration::from_millis(100);
    // Served on the test's own runtime, where a test's log subscriber sees
    // it; the binary (and the tests that start it) use one per core.
    c.server.threads = 1;
    // Jobs in memory unless a test asks for a file: tests run side by side.
    c.jobs.store = penstock::config::JobStore::Memory;
    c
}

pub async fn start(behaviour: Behaviour) -> Harness {
    start_with(behaviour, |_| {}, |_| None).await
}

pub async fn start_with(
    behaviour: Behaviour,
    tune: impl FnOnce(&mut Config),
    env: impl Fn(&str) -> Option<String>,
) -> Harness {
    let fake = Fake::start(behaviour).await;
    let mut config = config_for(&fake.url());
    tune(&mut config);
    config.validate("test").expect("test config is valid");
    let penstock = penstock::start(&config, env)
        .await
        .expect("penstock starts");
    Harness {
        url: format!("http://{}", penstock.addr),
        admin: format!("http://{}", penstock.admin_addr),
        fake,
        penstock,
    }
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// A multipart body with a fixed boundary, built by hand so its bytes are known.
pub fn multipart(
    boundary: &str,
    fields: &[(&str, &str)],
    files: &[(&str, &str, &[u8])],
) -> Vec<u8> {
    let mut body = Vec::new();
    for (name, value) in fields {
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
            )
            .as_bytes(),
        );
    }
    for (name, filename, bytes) in files {
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{filename}\"\r\nContent-Type: image/png\r\n\r\n").as_bytes(),
        );
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    body
}

impl Harness {
    /// `GET /status` on the admin listener.
    pub async fn status(&self) -> serde_json::Value {
        let url = format!("{}/status", self.admin);
        json(http().get(url).send().await.unwrap()).await
    }

    /// `GET /metrics` on the admin listener, as text.
    pub async fn metrics(&self) -> String {
        let url = format!("{}/metrics", self.admin);
        http().get(url).send().await.unwrap().text().await.unwrap()
    }
}

/// `GET /metrics` on the admin listener at `admin`, as text.
pub async fn metrics_at(admin: &str) -> String {
    let url = format!("{admin}/metrics");
    http().get(url).send().await.unwrap().text().await.unwrap()
}

/// `GET /status` on the admin listener at `admin`.
pub async fn status_at(admin: &str) -> serde_json::Value {
    json(http().get(format!("{admin}/status")).send().await.unwrap()).await
}

pub async fn json(resp: reqwest::Response) -> serde_json::Value {
    resp.json().await.expect("JSON body")
}

/// The value of the Prometheus sample `series` (name with labels, as exposed).
pub fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no sample {series} in\n{text}"))
        .parse()
        .unwrap()
}

/// A penstock in this process.
pub struct Replica {
    /// Serves while it is kept.
    pub _running: Running,
    pub url: String,
    pub admin: String,
}

/// Starts a penstock on `config` in this process.
pub async fn replica(config: &Config) -> Replica {
    config.validate("test").expect("valid config");
    let running = penstock::start(config, |_| None).await.expect("starts");
    Replica {
        url: format!("http://{}", running.addr),
        admin: format!("http://{}", running.admin_addr),
        _running: running,
    }
}

impl Replica {
    pub async fn status(&self) -> serde_json::Value {
        json(
            http()
                .get(format!("{}/status", self.admin))
                .send()
                .await
                .unwrap(),
        )
        .await
    }

    /// Waits until this replica's view of Redis is `healthy` (and sees `live`
    /// replicas at least).
    pub async fn until_state(&self, healthy: bool, live: usize) {
        for _ in 0..400 {
            let s = self.status().await;
            let seen = s["state"]["live_replicas"].as_array().map_or(0, Vec::len);
            if s["state"]["healthy"] == healthy && (!healthy || seen >= live) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!(
            "redis never became healthy={healthy}: {}",
            self.status().await
        );
    }
}

/// The fake taking `latency` for every call.
pub async fn fake_taking(latency: Duration) -> Fake {
    Fake::start(Behaviour {
        latency: (latency, latency),
        ..Behaviour::default()
    })
    .await
}

/// The fake at ten requests a second, 0.2 to 0.6 s an image (the README's
/// rehearsal).
pub fn ten_per_second() -> Behaviour {
    Behaviour {
        limits: Some(Limits {
            requests: 10,
            window: Duration::from_secs(1),
            ..Limits::default()
        }),
        latency: (Duration::from_millis(200), Duration::from_millis(600)),
        record_bodies: false,
        ..Behaviour::default()
    }
}

/// Starts the penstock binary with the config file `config` (JSON logs); the
/// process and its proxy URL once it listens. Its log is read on, so it
/// never blocks on a full pipe.
pub async fn spawn_penstock(config: &std::path::Path) -> (tokio::process::Child, String) {
    let (child, url, _) = spawn_penstock_admin(config).await;
    (child, url)
}

/// [`spawn_penstock`], with the admin listener's URL too.
pub async fn spawn_penstock_admin(
    config: &std::path::Path,
) -> (tokio::process::Child, String, String) {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_penstock"))
        .args(["--config", config.to_str().unwrap(), "--log-format", "json"])
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let (url, admin) = loop {
        let line = lines.next_line().await.unwrap().expect("penstock runs");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if v["message"] == "penstock listening" {
            break (
                format!("http://{}", v["addr"].as_str().unwrap()),
                format!("http://{}", v["admin_addr"].as_str().unwrap()),
            );
        }
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, url, admin)
}

/// Writes `penstock.toml` in `dir`: both listeners on ephemeral ports, the
/// upstream at `upstream`, then `more` (TOML); its path.
pub fn config_file(dir: &tempfile::TempDir, upstream: &str, more: &str) -> std::path::PathBuf {
    let path = dir.path().join("penstock.toml");
    std::fs::write(
        &path,
        format!(
            "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[upstream]\nbase_url = \"{upstream}\"\n{more}"
        ),
    )
    .unwrap();
    path
}

/// A TCP relay on 127.0.0.1 to `target` that can be frozen: while frozen it
/// passes no bytes either way, its connections left open (a network
/// partition between one client and the server, the server still there for
/// the others).
pub struct Relay {
    pub addr: std::net::SocketAddr,
    frozen: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    pub async fn start(target: std::net::SocketAddr) -> Relay {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let frozen = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = frozen.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(target).await else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                for (mut from, mut to) in [
                    (
                        Box::new(cr) as Box<dyn tokio::io::AsyncRead + Send + Unpin>,
                        Box::new(sw) as Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
                    ),
                    (Box::new(sr), Box::new(cw)),
                ] {
                    let flag = flag.clone();
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let n = match from.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            while flag.load(Ordering::Acquire) {
                                tokio::time::sleep(Duration::from_millis(10)).await;
                            }
                            if to.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            }
        });
        Relay { addr, frozen, task }
    }

    pub fn freeze(&self, frozen: bool) {
        self.frozen
            .store(frozen, std::sync::atomic::Ordering::Release);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}
