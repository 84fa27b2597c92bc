//! As fast as nginx: the penstock binary (budgets that never bind, cache
//! lookups, metrics and the access log on) against nginx `proxy_pass` with
//! upstream keep-alive, and against the upstream alone, all in front of the
//! same fast upstream (a minimal hyper server answering a fixed chat
//! completion: the fake's own work would hide the proxies' cost), loaded by
//! `wrk -t2 -c32` in alternating runs. Prints
//! req/s, the ratios, CPU µs per request of the proxy's processes, p50/p99
//! and penstock's RSS. Needs `wrk` (and `nginx` for the baseline); says so
//! and ends where they are missing.
//! `cargo bench --bench nginx` (BENCH_SECONDS, BENCH_ROUNDS to change the load)

#[path = "common/mod.rs"]
mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

const ANSWER: &str = r#"{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,"message":{"role":"assistant","content":"The answer is blowing in the wind."},"finish_reason":"stop"}],"usage":{"prompt_tokens":17,"completion_tokens":9,"total_tokens":26}}"#;

/// A minimal upstream on one thread of its own: every request gets the same
/// chat completion, as fast as hyper can answer. Its address.
fn fast_upstream() -> std::net::SocketAddr {
    common::serve_on_thread(hyper::service::service_fn(
        |req: hyper::Request<hyper::body::Incoming>| async move {
            use http_body_util::BodyExt;
            let _ = req.into_body().collect().await;
            let body = http_body_util::Full::new(bytes::Bytes::from_static(ANSWER.as_bytes()));
            let mut resp = hyper::Response::new(body.boxed());
            resp.headers_mut().insert(
                "content-type",
                http::HeaderValue::from_static("application/json"),
            );
            resp.headers_mut()
                .insert("x-request-id", http::HeaderValue::from_static("req_bench"));
            Ok::<_, std::convert::Infallible>(resp)
        },
    ))
}

fn installed(program: &str) -> bool {
    Command::new(program)
        .arg("-v")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// CPU time (user + system) of `pids`, in microseconds.
fn cpu_us(pids: &[u32]) -> f64 {
    pids.iter()
        .map(|pid| common::cpu_us(&pid.to_string()))
        .sum()
}

/// `pid` and its children.
fn family(pid: u32) -> Vec<u32> {
    let mut out = vec![pid];
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if common::stat_fields(&child.to_string())
                .is_some_and(|f| f.get(1) == Some(&pid.to_string()))
            {
                out.push(child);
            }
        }
    }
    out
}

#[derive(Default, Clone)]
struct Sample {
    requests: u64,
    seconds: f64,
    p50_us: f64,
    p99_us: f64,
    cpu_us_per_request: Option<f64>,
    non_2xx: u64,
}

impl Sample {
    fn rate(&self) -> f64 {
        self.requests as f64 / self.seconds.max(1e-9)
    }
}

/// "1.23ms", "456.00us", "1.2s" → µs.
fn micros(v: &str) -> f64 {
    let at = v.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(v.len());
    let (num, unit) = v.split_at(at);
    let n: f64 = num.parse().unwrap_or(0.0);
    match unit {
        "us" => n,
        "ms" => n * 1e3,
        "s" => n * 1e6,
        "m" => n * 60e6,
        _ => n,
    }
}

/// One wrk run against `url`; CPU counted over `pids`.
fn wrk(url: &str, script: &std::path::Path, conns: u32, secs: u64, pids: &[u32]) -> Sample {
    let threads = conns.min(2);
    let before = cpu_us(pids);
    let out = Command::new("wrk")
        .args([
            format!("-t{threads}"),
            format!("-c{conns}"),
            format!("-d{secs}s"),
            "--latency".into(),
            "-s".into(),
            script.display().to_string(),
            url.into(),
        ])
        .output()
        .expect("wrk runs");
    let after = cpu_us(pids);
    let text = String::from_utf8_lossy(&out.stdout);
    let mut s = Sample::default();
    for line in text.lines() {
        let t = line.trim();
        if let Some(v) = t.strip_prefix("50%") {
            s.p50_us = micros(v.trim());
        } else if let Some(v) = t.strip_prefix("99%") {
            s.p99_us = micros(v.trim());
        } else if t.contains("requests in") {
            let f: Vec<&str> = t.split_whitespace().collect();
            s.requests = f.first().and_then(|v| v.parse().ok()).unwrap_or(0);
            s.seconds = f
                .get(3)
                .map_or(0.0, |v| micros(v.trim_end_matches(',')) / 1e6);
        } else if let Some(v) = t.strip_prefix("Non-2xx or 3xx responses:") {
            s.non_2xx = v.trim().parse().unwrap_or(0);
        }
    }
    if !pids.is_empty() && s.requests > 0 {
        s.cpu_us_per_request = Some((after - before).max(0.0) / s.requests as f64);
    }
    s
}

/// A wrk script sending the chat body with one of `keys` API keys in turn.
fn keys_script(keys: usize) -> String {
    let body = common::CHAT;
    format!(
        "local n = 0\nlocal body = '{body}'\nrequest = function()\n  n = n + 1\n  local key = \"Bearer sk-tenant-\" .. (n % {keys})\n  return wrk.format(\"POST\", nil, {{[\"Content-Type\"] = \"application/json\", [\"Authorization\"] = key}}, body)\nend\n"
    )
}

fn nginx_conf(dir: &std::path::Path, upstream_port: u16, port: u16) -> std::path::PathBuf {
    let d = dir.display();
    let conf = format!(
        "worker_processes auto;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\ndaemon off;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log {d}/access.log;\n  client_body_temp_path {d}/body;\n\
         proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n\
         scgi_temp_path {d}/scgi;\n  upstream fake {{ server 127.0.0.1:{upstream_port}; keepalive 64; }}\n\
         server {{\n    listen 127.0.0.1:{port};\n    location / {{\n      proxy_pass http://fake;\n\
         proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n    }}\n  }}\n}}\n"
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).unwrap();
    path
}

async fn until_listening(port: u16) {
    for _ in 0..400 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("nothing listens on {port}");
}

fn main() {
    if !installed("wrk") {
        println!("nginx: wrk is not installed (Debian: apt-get install wrk); nothing measured");
        return;
    }
    let secs: u64 = common::env("BENCH_SECONDS", 5);
    let rounds: u64 = common::env("BENCH_ROUNDS", 2);
    common::block_on(async move {
        let upstream = fast_upstream();
        let upstream_port = upstream.port();
        let upstream_url = format!("http://{upstream}");
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("post.lua");
        let body = common::CHAT;
        std::fs::write(
            &script,
            format!(
                "wrk.method = \"POST\"\nwrk.body = '{body}'\nwrk.headers[\"Content-Type\"] = \"application/json\"\nwrk.headers[\"Authorization\"] = \"Bearer sk-bench\"\n"
            ),
        )
        .unwrap();

        // penstock, the binary, as deployed: a budget that never binds, the
        // cache looked up, metrics, the access log written to a file.
        let port = common::free_port();
        let config = dir.path().join("penstock.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:0\"\n[upstream]\nbase_url = \"{}\"\n\
                 [[budget]]\nname = \"text\"\nmodels = [\"gpt-4o*\"]\nrpm = 100000000\ntpm = 100000000000\n",
                upstream_url
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("penstock.log")).unwrap();
        let mut penstock = Command::new(env!("CARGO_BIN_EXE_penstock"))
            .args(["--config", config.to_str().unwrap(), "--log-format", "json"])
            .stderr(log)
            .spawn()
            .expect("penstock starts");
        until_listening(port).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let idle_rss = common::rss_kib(penstock.id());

        let nginx_port = common::free_port();
        let mut nginx = None;
        if installed("nginx") {
            let conf = nginx_conf(dir.path(), upstream_port, nginx_port);
            nginx = Command::new("nginx")
                .args([
                    "-c",
                    conf.to_str().unwrap(),
                    "-p",
                    dir.path().to_str().unwrap(),
                ])
                .stderr(Stdio::null())
                .spawn()
                .ok();
            until_listening(nginx_port).await;
        } else {
            println!("nginx: nginx is not installed (Debian: apt-get install nginx); no baseline");
        }

        let mut targets: Vec<(&str, String, Vec<u32>)> = vec![
            (
                "upstream",
                format!("{upstream_url}/v1/chat/completions"),
                vec![],
            ),
            (
                "penstock",
                format!("http://127.0.0.1:{port}/v1/chat/completions"),
                vec![penstock.id()],
            ),
        ];
        if let Some(n) = &nginx {
            targets.push((
                "nginx",
                format!("http://127.0.0.1:{nginx_port}/v1/chat/completions"),
                family(n.id()),
            ));
        }
        let names: Vec<String> = targets.iter().map(|(n, _, _)| n.to_string()).collect();
        let many_keys = dir.path().to_path_buf();
        let (runs, quiet, spread) = tokio::task::spawn_blocking(move || {
            // Warm every path, then alternate.
            for (_, url, _) in &targets {
                wrk(url, &script, 32, 1, &[]);
            }
            let mut runs: Vec<Vec<Sample>> = vec![Vec::new(); targets.len()];
            for _ in 0..rounds {
                for (i, (_, url, pids)) in targets.iter().enumerate() {
                    runs[i].push(wrk(url, &script, 32, secs, pids));
                }
            }
            // Latency on one connection: far below the peak rate.
            let quiet: Vec<Sample> = targets
                .iter()
                .map(|(_, url, pids)| wrk(url, &script, 1, secs.min(3), pids))
                .collect();
            // Cost growth: the same load spread over many API keys (each its own
            // tenant and its own pool), against penstock alone.
            let penstock_target = &targets[1];
            let spread: Vec<(usize, Sample)> = [1usize, 100, 1000]
                .iter()
                .map(|&keys| {
                    let script = many_keys.join(format!("keys-{keys}.lua"));
                    std::fs::write(&script, keys_script(keys)).unwrap();
                    (
                        keys,
                        wrk(&penstock_target.1, &script, 32, secs, &penstock_target.2),
                    )
                })
                .collect();
            (runs, quiet, spread)
        })
        .await
        .unwrap();
        let busy_rss = common::rss_kib(penstock.id());
        let best: Vec<Sample> = runs
            .iter()
            .map(|r| {
                r.iter()
                    .max_by(|a, b| a.rate().total_cmp(&b.rate()))
                    .cloned()
                    .unwrap_or_default()
            })
            .collect();
        let upstream_rate = best[0].rate();
        let nginx_rate = names
            .iter()
            .position(|n| n == "nginx")
            .map(|i| best[i].rate());
        println!(
            "nginx: wrk -t2 -c32 -d{secs}s, POST /v1/chat/completions, {rounds} alternating rounds (best of each), {} cores",
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        println!(
            "{:<10} {:>10} {:>10} {:>8} {:>11} {:>10} {:>10}",
            "target", "req/s", "/upstream", "/nginx", "cpu µs/req", "p50", "p99"
        );
        for (name, s) in names.iter().zip(&best) {
            let cpu = s
                .cpu_us_per_request
                .map_or("-".to_string(), |c| format!("{c:.1}"));
            let vs_nginx = nginx_rate.map_or("-".to_string(), |n| format!("{:.2}", s.rate() / n));
            let errors = match s.non_2xx {
                0 => String::new(),
                n => format!("  ({n} non-2xx)"),
            };
            println!(
                "{:<10} {:>10.0} {:>10.2} {:>8} {:>11} {:>8.0}µs {:>8.0}µs{errors}",
                name,
                s.rate(),
                s.rate() / upstream_rate,
                vs_nginx,
                cpu,
                s.p50_us,
                s.p99_us,
            );
        }
        println!(
            "one connection (latency far below the peak rate), added over the upstream alone:"
        );
        for (name, s) in names.iter().zip(&quiet) {
            let cpu = s
                .cpu_us_per_request
                .map_or(String::new(), |c| format!("  cpu {c:>5.1} µs/req"));
            println!(
                "{:<10} p50 {:>6.0}µs  p99 {:>6.0}µs  added p50 {:>5.0}µs  p99 {:>5.0}µs{cpu}",
                name,
                s.p50_us,
                s.p99_us,
                s.p50_us - quiet[0].p50_us,
                s.p99_us - quiet[0].p99_us
            );
        }
        println!(
            "penstock with the load spread over API keys (each a tenant and a pool of its own):"
        );
        for (keys, s) in &spread {
            println!(
                "{:>5} keys  {:>8.0} req/s  ({:.2} of one key)  p99 {:>6.0}µs  cpu {:>5.1} µs/req",
                keys,
                s.rate(),
                s.rate() / spread[0].1.rate(),
                s.p99_us,
                s.cpu_us_per_request.unwrap_or(0.0)
            );
        }
        println!(
            "penstock RSS: idle {:.1} MiB, after the load {:.1} MiB",
            idle_rss as f64 / 1024.0,
            busy_rss as f64 / 1024.0
        );
        let _ = penstock.kill();
        let _ = penstock.wait();
        if let Some(mut n) = nginx {
            let _ = Command::new("kill").arg(n.id().to_string()).status();
            let _ = n.wait();
        }
    });
}
