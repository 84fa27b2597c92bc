//! Hours, not seconds: steady open-loop load held for minutes, every scenario
//! at once in one run (they are light: a few calls a second each).
//!
//! 1. **Sustained rate** (`RATES`): the fake at 600 requests a minute (10 in any
//!    second, announced in `x-ratelimit-*`), 0.2-0.4 s a call; offered 80, 90,
//!    95 and 100 % of it, through a configured `rpm = 600` pool and a learned
//!    one, with the memory backend and with Redis: what each admits a second
//!    once warm, as a share of the upstream's limit, its upstream 429s, and
//!    the p99 wait in the first and the last minute (flat, or growing).
//! 2. **Soak** (`SOAK`): three penstock processes sharing one Redis, one
//!    `rpm = 600` budget, 90 % of the limit spread over them; as control, one
//!    process with the memory backend. Per minute: calls completed against
//!    calls offered, p50/p99 wait, upstream 429s, penstock's own refusals;
//!    Redis's `used_memory` and key count; each process's RSS.
//!
//! `cargo bench --bench soak` (`SOAK_SECS`, default 600; `SCENARIOS=rates` or
//! `soak` for one half). Sends only to 127.0.0.1, a bounded number of calls.

#[path = "common/mod.rs"]
mod common;

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fake_openai::{Behaviour, Fake, Limits};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// Appends a line to a report (the scenarios run at once; each prints its
/// report whole at the end).
macro_rules! say {
    ($out:ident, $($arg:tt)*) => {{
        $out.push_str(&format!($($arg)*));
        $out.push('\n');
    }};
}

/// One call as the client saw it.
#[derive(Clone, Copy)]
struct Seen {
    /// Seconds from the start when it was sent.
    sent: f64,
    status: u16,
    /// `x-penstock-queue-ms`.
    waited_ms: u64,
}

/// Sends `rate` calls a second to `urls` in turn (open loop: on time whatever
/// the answers do) for `secs`; every call's outcome.
async fn open_loop(urls: Vec<String>, rate: f64, secs: u64, start: Instant) -> Vec<Seen> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let total = (rate * secs as f64) as usize;
    let mut tasks = Vec::with_capacity(total);
    for i in 0..total {
        let due = start + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(due.into()).await;
        let (client, url, seen) = (client.clone(), urls[i % urls.len()].clone(), seen.clone());
        tasks.push(tokio::spawn(async move {
            let body = format!(
                r#"{{"model":"gpt-4o-mini","max_tokens":16,"messages":[{{"role":"user","content":"call {i}"}}]}}"#
            );
            let req = http::Request::post(&url)
                .header("content-type", "application/json")
                .header("authorization", "Bearer sk-soak")
                .body(Full::new(Bytes::from(body)))
                .unwrap();
            let sent = due.duration_since(start).as_secs_f64();
            let (status, waited_ms) = match client.request(req).await {
                Ok(resp) => {
                    let waited = resp
                        .headers()
                        .get("x-penstock-queue-ms")
                        .and_then(|v| v.to_str().ok()?.parse().ok())
                        .unwrap_or(0);
                    let status = resp.status().as_u16();
                    let _ = resp.into_body().collect().await;
                    (status, waited)
                }
                Err(_) => (0, 0),
            };
            seen.lock().unwrap().push(Seen {
                sent,
                status,
                waited_ms,
            });
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let mut out = seen.lock().unwrap().clone();
    out.sort_by(|a, b| a.sent.total_cmp(&b.sent));
    out
}

fn percentile(mut v: Vec<u64>, p: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v.sort();
    v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1]
}

/// p99 of the waits of the calls sent within [from, to) seconds.
fn p99_between(seen: &[Seen], from: f64, to: f64) -> u64 {
    percentile(
        seen.iter()
            .filter(|s| s.sent >= from && s.sent < to)
            .map(|s| s.waited_ms)
            .collect(),
        0.99,
    )
}

/// The fake at ten calls in any second, announced as 600 a minute.
fn ten_a_second() -> Behaviour {
    Behaviour {
        limits: Some(Limits {
            requests: 10,
            window: Duration::from_secs(1),
            ..Limits::default()
        }),
        latency: (Duration::from_millis(200), Duration::from_millis(400)),
        record_bodies: false,
        ..Behaviour::default()
    }
}

fn budget_600() -> penstock::config::BudgetConfig {
    penstock::config::BudgetConfig {
        name: Some("chat".into()),
        models: vec!["gpt-4o*".into()],
        rpm: Some(600),
        ..Default::default()
    }
}

async fn rates(secs: u64, redis: Option<&common::RedisServer>) -> String {
    let mut out = String::new();
    let start = Instant::now();
    let mut runs = Vec::new();
    let backends: Vec<&str> = match redis {
        Some(_) => vec!["memory", "redis"],
        None => vec!["memory"],
    };
    for backend in &backends {
        for pool in ["configured", "learned"] {
            for share in [0.80, 0.90, 0.95, 1.00] {
                let fake = Fake::start(ten_a_second()).await;
                let mut config = common::config_for(&fake.url());
                config.server.threads = 1;
                config.queue.max_wait = Duration::from_secs(600);
                config.retry.deadline = Duration::from_secs(1200);
                if pool == "configured" {
                    config.budgets = vec![budget_600()];
                }
                if let (Some(redis), "redis") = (redis, *backend) {
                    config.state.backend = penstock::config::Backend::Redis;
                    config.state.redis_url = redis.url();
                    config.state.key_prefix = format!("rates-{pool}-{share}");
                }
                let p = penstock::start(&config, |_| None).await.unwrap();
                let url = format!("http://{}/v1/chat/completions", p.addr);
                let label = format!("{backend:<7} {pool:<11} {:>4.0} %", share * 100.0);
                runs.push((
                    label,
                    share,
                    fake,
                    p,
                    tokio::spawn(open_loop(vec![url], 10.0 * share, secs, start)),
                ));
            }
        }
    }
    say!(
        out,
        "Sustained rate: the upstream takes 10 calls in any second (600 a minute, announced); open loop for {secs} s"
    );
    say!(
        out,
        "{:<26} {:>10} {:>12} {:>14} {:>13} {:>13} {:>12}",
        "backend pool offered",
        "offered/s",
        "admitted/s",
        "of the limit",
        "upstream 429",
        "p99 wait 1st",
        "p99 last"
    );
    for (label, share, fake, p, task) in runs {
        let seen = task.await.unwrap();
        // Warm from the second minute: what the upstream answered in the
        // rest of the load (queued calls still answered after it are not
        // counted: this is the rate penstock admits, not what was offered).
        let warm = 60.0_f64.min(secs as f64 / 3.0);
        let (from, to) = (
            start + Duration::from_secs_f64(warm),
            start + Duration::from_secs(secs),
        );
        let ok = fake
            .requests()
            .iter()
            .filter(|r| r.status == 200 && r.answered_at >= from && r.answered_at < to)
            .count();
        let admitted = ok as f64 / (secs as f64 - warm);
        let last = secs as f64 - 60.0_f64.min(secs as f64 / 3.0);
        say!(
            out,
            "{label:<26} {:>10.2} {:>12.2} {:>13.1}% {:>13} {:>10} ms {:>9} ms",
            10.0 * share,
            admitted,
            admitted * 10.0,
            fake.answered(429),
            p99_between(&seen, 0.0, warm),
            p99_between(&seen, last, secs as f64),
        );
        drop(p);
    }
    out
}

/// A penstock process on `config` (TOML), its proxy and admin addresses.
fn spawn(dir: &std::path::Path, name: &str, config: &str) -> (Child, String, String) {
    let port = common::free_port();
    let admin = common::free_port();
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!("listen = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n{config}"),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_penstock"))
        .args(["--config", path.to_str().unwrap(), "--log-format", "json"])
        .env("PENSTOCK_LOG", "warn")
        .stderr(log)
        .stdout(Stdio::null())
        .spawn()
        .expect("penstock starts");
    (
        child,
        format!("http://127.0.0.1:{port}"),
        format!("127.0.0.1:{admin}"),
    )
}

async fn until_up(admin: &str) {
    for _ in 0..400 {
        if reqwest::get(format!("http://{admin}/readyz"))
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("penstock at {admin} never became ready");
}

/// Redis's `used_memory` (bytes) and key count.
fn redis_memory(port: u16) -> (u64, u64) {
    let cli = |args: &[&str]| {
        Command::new("redis-cli")
            .args(["-p", &port.to_string()])
            .args(args)
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default()
    };
    let used = cli(&["INFO", "memory"])
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let keys = cli(&["DBSIZE"]).trim().parse().unwrap_or(0);
    (used, keys)
}

async fn soak(secs: u64, redis: &common::RedisServer) -> String {
    let mut out = String::new();
    let dir = tempfile::tempdir().unwrap();
    let shared_fake = Fake::start(ten_a_second()).await;
    let alone_fake = Fake::start(ten_a_second()).await;
    let budget = "[[budget]]\nname = \"chat\"\nmodels = [\"gpt-4o*\"]\nrpm = 600\n\
                  [queue]\nmax_wait = \"600s\"\n[retry]\ndeadline = \"20m\"\n";
    let mut procs = Vec::new();
    for i in 0..3 {
        procs.push(spawn(
            dir.path(),
            &format!("replica{i}"),
            &format!(
                "[upstream]\nbase_url = \"{}\"\n{budget}[state]\nbackend = \"redis\"\nredis_url = \"{}\"\nkey_prefix = \"soak\"\n",
                shared_fake.url(),
                redis.url()
            ),
        ));
    }
    procs.push(spawn(
        dir.path(),
        "alone",
        &format!("[upstream]\nbase_url = \"{}\"\n{budget}", alone_fake.url()),
    ));
    for (_, _, admin) in &procs {
        until_up(admin).await;
    }
    // Give the replicas a heartbeat to see each other.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_start: Vec<u64> = procs
        .iter()
        .map(|(c, _, _)| common::rss_kib(c.id()))
        .collect();
    let start = Instant::now();
    let shared_urls: Vec<String> = procs[..3]
        .iter()
        .map(|(_, u, _)| format!("{u}/v1/chat/completions"))
        .collect();
    let alone_url = vec![format!("{}/v1/chat/completions", procs[3].1)];
    let shared = tokio::spawn(open_loop(shared_urls, 9.0, secs, start));
    let alone = tokio::spawn(open_loop(alone_url, 9.0, secs, start));
    // Redis's memory and keys, once a minute (and at the end).
    let mut memory = Vec::new();
    let minutes = secs.div_ceil(60);
    for m in 1..=minutes {
        let at = start + Duration::from_secs((m * 60).min(secs));
        tokio::time::sleep_until(at.into()).await;
        memory.push((m, redis_memory(redis.port)));
    }
    let shared = shared.await.unwrap();
    let alone = alone.await.unwrap();
    let rss_end: Vec<u64> = procs
        .iter()
        .map(|(c, _, _)| common::rss_kib(c.id()))
        .collect();
    say!(
        out,
        "\nSoak: 9 calls a second (90 % of the limit) for {secs} s; three replicas sharing Redis, and one alone in memory"
    );
    say!(
        out,
        "{:<8} {:<7} {:>8} {:>10} {:>9} {:>9} {:>9} {:>10} {:>11} {:>10}",
        "setup",
        "minute",
        "offered",
        "completed",
        "share",
        "p50 wait",
        "p99 wait",
        "refused",
        "redis MiB",
        "redis keys"
    );
    for (name, seen, fake) in [
        ("redis x3", &shared, &shared_fake),
        ("memory", &alone, &alone_fake),
    ] {
        for m in 0..minutes {
            let (from, to) = ((m * 60) as f64, ((m + 1) * 60).min(secs) as f64);
            let this: Vec<&Seen> = seen
                .iter()
                .filter(|s| s.sent >= from && s.sent < to)
                .collect();
            let ok = this.iter().filter(|s| s.status == 200).count();
            let refused = this.iter().filter(|s| s.status != 200).count();
            let waits: Vec<u64> = this.iter().map(|s| s.waited_ms).collect();
            let (mib, keys) = match name {
                "redis x3" => memory
                    .get(m as usize)
                    .map_or((0.0, 0), |(_, (b, k))| (*b as f64 / 1048576.0, *k)),
                _ => (0.0, 0),
            };
            say!(
                out,
                "{name:<8} {:<7} {:>8} {:>10} {:>8.1}% {:>6} ms {:>6} ms {:>10} {:>11.2} {:>10}",
                m + 1,
                this.len(),
                ok,
                100.0 * ok as f64 / this.len().max(1) as f64,
                percentile(waits.clone(), 0.5),
                percentile(waits, 0.99),
                refused,
                mib,
                keys
            );
        }
        say!(out, "{name:<8} upstream 429s: {}", fake.answered(429));
    }
    for (i, (child, _, _)) in procs.iter_mut().enumerate() {
        let name = if i < 3 {
            format!("replica {i}")
        } else {
            "memory".into()
        };
        say!(
            out,
            "{name:<10} RSS {:>7} KiB at start, {:>7} KiB at the end",
            rss_start[i],
            rss_end[i]
        );
        let _ = child.kill();
        let _ = child.wait();
    }
    out
}

fn main() {
    let secs: u64 = common::env("SOAK_SECS", 600);
    let which: String = common::env("SCENARIOS", "all".to_string());
    common::block_on(async {
        let redis = common::RedisServer::start();
        if redis.is_none() {
            println!("redis-server is not installed: the Redis scenarios are left out");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let rates_run = matches!(which.as_str(), "all" | "rates");
        let soak_run = matches!(which.as_str(), "all" | "soak") && redis.is_some();
        let (a, b) = tokio::join!(
            async {
                match rates_run {
                    true => rates(secs, redis.as_ref()).await,
                    false => String::new(),
                }
            },
            async {
                match (soak_run, redis.as_ref()) {
                    (true, Some(redis)) => soak(secs, redis).await,
                    _ => String::new(),
                }
            }
        );
        print!("{a}{b}");
    });
}
