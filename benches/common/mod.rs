//! A small closed-loop load generator shared by the benchmarks: `concurrency`
//! workers on keep-alive connections send `total` requests to 127.0.0.1 and record
//! each latency. Bounded in count, so it always stops by itself.
#![allow(dead_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

pub struct Run {
    pub ok: usize,
    pub failed: usize,
    pub wall: Duration,
    pub latencies: Vec<Duration>,
}

impl Run {
    pub fn throughput(&self) -> f64 {
        (self.ok + self.failed) as f64 / self.wall.as_secs_f64()
    }
    pub fn percentile(&self, p: f64) -> Duration {
        let mut l = self.latencies.clone();
        l.sort();
        l[((l.len() as f64 * p).ceil() as usize).clamp(1, l.len()) - 1]
    }
}

pub async fn run(url: &str, body: &'static [u8], total: usize, concurrency: usize) -> Run {
    run_with(url, move |_| Bytes::from_static(body), total, concurrency).await
}

/// Like [`run`], with the `i`th request's body made by `body(i)`.
pub async fn run_with(
    url: &str,
    body: impl Fn(usize) -> Bytes + Send + Sync + 'static,
    total: usize,
    concurrency: usize,
) -> Run {
    let body = Arc::new(body);
    let client = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(concurrency)
        .build_http::<Full<Bytes>>();
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (client, next, url, body) =
            (client.clone(), next.clone(), url.to_string(), body.clone());
        workers.push(tokio::spawn(async move {
            let (mut ok, mut failed, mut lat) = (0, 0, Vec::new());
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let req = http::Request::post(&url)
                    .header("content-type", "application/json")
                    .header("authorization", "Bearer sk-bench")
                    .body(Full::new(body(i)))
                    .unwrap();
                let t = Instant::now();
                match client.request(req).await {
                    Ok(resp) => {
                        let good = resp.status().is_success();
                        let _ = resp.into_body().collect().await;
                        if good { ok += 1 } else { failed += 1 }
                    }
                    Err(_) => failed += 1,
                }
                lat.push(t.elapsed());
            }
            (ok, failed, lat)
        }));
    }
    let mut run = Run {
        ok: 0,
        failed: 0,
        wall: Duration::ZERO,
        latencies: Vec::new(),
    };
    for w in workers {
        let (ok, failed, lat) = w.await.unwrap();
        run.ok += ok;
        run.failed += failed;
        run.latencies.extend(lat);
    }
    run.wall = started.elapsed();
    run
}

pub fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

/// penstock's defaults, pointed at `upstream`, listening on ephemeral ports.
pub fn config_for(upstream: &str) -> penstock::Config {
    let mut config = penstock::Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        ..penstock::Config::default()
    };
    config.upstream.base_url = upstream.to_string();
    config.jobs.store = penstock::config::JobStore::Memory;
    config
}

/// Runs a benchmark on the two-worker runtime every benchmark uses.
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}

/// A port free on 127.0.0.1 when asked.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}

/// A `redis-server` of the benchmark's own on a free port (no snapshots),
/// stopped when dropped; `None` where it is not installed.
pub struct RedisServer {
    child: std::process::Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    pub fn start() -> Option<RedisServer> {
        let port = free_port();
        let dir = tempfile::tempdir().ok()?;
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .arg("--dir")
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .ok()?;
        Some(RedisServer {
            child,
            port,
            _dir: dir,
        })
    }

    pub fn pid(&self) -> String {
        self.child.id().to_string()
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The chat completion body the throughput benches send.
pub const CHAT: &str = r#"{"model":"gpt-4o-mini","max_tokens":16,"messages":[{"role":"user","content":"how many roads must a man walk down"}]}"#;

/// The environment variable `name` parsed, or `default`.
pub fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The fields of `/proc/{pid}/stat` after the command name (which may hold
/// spaces); `pid` may be `self`.
pub fn stat_fields(pid: &str) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// CPU time (user + system) of a process so far, in microseconds.
pub fn cpu_us(pid: &str) -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    let per_second = *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
            .unwrap_or(100.0)
    });
    let Some(f) = stat_fields(pid) else {
        return 0.0;
    };
    // utime and stime: fields 14 and 15, 11 and 12 after the command name.
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) * 1e6 / per_second
}

/// Waits until the penstock whose admin port is `admin` has connected to
/// Redis and heard its heartbeat.
pub async fn until_healthy(admin: std::net::SocketAddr) {
    let status = format!("http://{admin}/status");
    for _ in 0..200 {
        let body = reqwest::get(&status).await.unwrap().text().await.unwrap();
        if body.contains(r#""healthy":true"#) && body.contains(r#""backend":"redis""#) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Serves `service` over HTTP/1 on 127.0.0.1, on one thread and runtime of
/// its own (a stand-in upstream); its address.
pub fn serve_on_thread<S>(service: S) -> std::net::SocketAddr
where
    S: hyper::service::Service<
            hyper::Request<hyper::body::Incoming>,
            Response = hyper::Response<
                http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>,
            >,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let service = service.clone();
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
    });
    addr
}

/// What [`fifty_users`] saw.
pub struct Outcome {
    pub ok: usize,
    pub wall: Duration,
}

/// `users` simultaneous generations of `model`, each retried the way the
/// official SDKs do: 2 retries, after `retry-after-ms`, else `retry-after`,
/// when either is at most 60 s, else after 0.5 s * 2^n with jitter.
pub async fn fifty_users(model: &str, url: &str) -> Outcome {
    users(50, model, url).await
}

/// As [`fifty_users`], with `n` users.
pub async fn users(n: usize, model: &str, url: &str) -> Outcome {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let started = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let (client, url, model) = (client.clone(), url.to_string(), model.to_string());
            tokio::spawn(async move {
                let body = format!(
                    r#"{{"model":"{model}","prompt":"user {i}","quality":"low","size":"1024x1024"}}"#
                );
                for attempt in 0..3u32 {
                    let req = http::Request::post(&url)
                        .header("content-type", "application/json")
                        .header("authorization", "Bearer sk-bench")
                        .header("x-stainless-retry-count", attempt.to_string())
                        .body(Full::new(Bytes::from(body.clone())))
                        .unwrap();
                    let Ok(resp) = client.request(req).await else {
                        continue;
                    };
                    let status = resp.status();
                    let header = |name: &str, scale: f64| {
                        resp.headers()
                            .get(name)
                            .and_then(|v| v.to_str().ok()?.parse::<f64>().ok())
                            .map(|x| x * scale)
                    };
                    let retry_after = header("retry-after-ms", 1.0)
                        .or_else(|| header("retry-after", 1000.0))
                        .filter(|ms| *ms > 0.0 && *ms <= 60_000.0)
                        .map(|ms| Duration::from_secs_f64(ms / 1000.0));
                    let _ = resp.into_body().collect().await;
                    if status.is_success() {
                        return true;
                    }
                    if attempt < 2 && (status == 429 || status.is_server_error()) {
                        let jitter =
                            1.0 - 0.25 * ((i * 7 + attempt as usize * 13) % 100) as f64 / 100.0;
                        let backoff = Duration::from_secs_f64(
                            (0.5 * 2f64.powi(attempt as i32)).min(8.0) * jitter,
                        );
                        tokio::time::sleep(retry_after.unwrap_or(backoff)).await;
                    }
                }
                false
            })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        ok += t.await.unwrap() as usize;
    }
    Outcome {
        ok,
        wall: started.elapsed(),
    }
}

/// A process's resident memory, in KiB (0 when it cannot be read).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}
