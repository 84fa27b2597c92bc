//! The Redis backend's cost per request, against the in-process (memory)
//! backend, in one run: the same budgeted chat calls (the budget never binds,
//! so every call is admitted by the ledger and waits for nothing else) through
//! one replica with `[state] backend = "memory"` and one with `"redis"`, in
//! front of the fake upstream without latency. Reports p50/p99 one at a time
//! (the latency a request pays), requests/s at 32 concurrent, and CPU per
//! request of this process (load generator, fake and penstock) and of
//! redis-server. Starts its own redis-server on a free port.
//! `cargo bench --bench redis` (BENCH_REQUESTS to change the load)

#[path = "common/mod.rs"]
mod common;

use std::time::Duration;

use fake_openai::{Behaviour, Fake};
use penstock::config::{Backend, BudgetConfig};

struct Measured {
    run: common::Run,
    cpu_self: f64,
    cpu_redis: f64,
}

async fn measure(url: &str, total: usize, concurrency: usize, redis_pid: &str) -> Measured {
    let (s0, r0) = (common::cpu_us("self"), common::cpu_us(redis_pid));
    let run = common::run(url, common::CHAT.as_bytes(), total, concurrency).await;
    let n = (run.ok + run.failed).max(1) as f64;
    Measured {
        cpu_self: (common::cpu_us("self") - s0) / n,
        cpu_redis: (common::cpu_us(redis_pid) - r0) / n,
        run,
    }
}

fn main() {
    let Some(redis) = common::RedisServer::start() else {
        println!("redis: redis-server is not installed; nothing measured");
        return;
    };
    let port = redis.port;
    let redis_pid = redis.pid();
    common::block_on(async {
        let total: usize = common::env("BENCH_REQUESTS", 20_000);
        let fake = Fake::start(Behaviour {
            record_bodies: false,
            ..Behaviour::default()
        })
        .await;
        let mut config = common::config_for(&fake.url());
        config.budgets = vec![BudgetConfig {
            models: vec!["gpt-4o-mini".into()],
            rpm: Some(100_000_000),
            tpm: Some(100_000_000_000),
            ..BudgetConfig::default()
        }];
        let memory = penstock::start(&config, |_| None).await.unwrap();
        config.state.backend = Backend::Redis;
        config.state.redis_url = format!("redis://127.0.0.1:{port}");
        let shared = penstock::start(&config, |_| None).await.unwrap();
        // Until the replica has connected and heard its heartbeat.
        common::until_healthy(shared.admin_addr).await;
        let urls = [
            (
                "memory",
                format!("http://{}/v1/chat/completions", memory.addr),
            ),
            (
                "redis",
                format!("http://{}/v1/chat/completions", shared.addr),
            ),
        ];
        for (_, url) in &urls {
            common::run(url, common::CHAT.as_bytes(), 2_000, 32).await;
        }
        let mut one = Vec::new();
        let mut many = Vec::new();
        for (name, url) in &urls {
            one.push((name, measure(url, total / 4, 1, &redis_pid).await));
        }
        for (name, url) in &urls {
            many.push((name, measure(url, total, 32, &redis_pid).await));
        }
        for (_, m) in one.iter().chain(&many) {
            assert_eq!(m.run.failed, 0, "every request must succeed");
        }
        // The admission script alone, one call at a time.
        let alone = {
            use penstock::admission::ledger::Limits;
            use penstock::admission::shared::Candidate;
            let state = penstock::state::Redis::start(&config.state).unwrap();
            while !state.healthy() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let key = state.pool_key("bench", "alone");
            let limits = Limits {
                per_minute: [Some(100_000_000), Some(100_000_000_000), None],
                burst: Duration::from_secs(1),
                margin: Duration::from_millis(50),
                safety: 1.0,
            };
            let cost = penstock::vocab::cost::Cost {
                requests: 1,
                tokens: 30,
                images: 0,
            };
            let one = [Candidate {
                client: "c",
                weight: 1,
                cost,
                batch: false,
            }];
            let mut times = Vec::new();
            for _ in 0..2_000 {
                let t = std::time::Instant::now();
                state
                    .book(&key, &one, &limits, Duration::from_millis(200))
                    .await
                    .unwrap();
                times.push(t.elapsed());
            }
            times.sort();
            (times[1_000], times[1_980])
        };
        println!(
            "redis: POST /v1/chat/completions under a budget that never binds, fake upstream without latency"
        );
        println!(
            "admission script alone, one at a time: p50 {}, p99 {}",
            common::ms(alone.0),
            common::ms(alone.1)
        );
        println!(
            "{:<8} {:>12} {:>12} {:>12} {:>16} {:>16}",
            "backend", "p50 (1)", "p99 (1)", "req/s (32)", "cpu µs/req (32)", "redis µs/req"
        );
        for ((name, a), (_, b)) in one.iter().zip(&many) {
            println!(
                "{:<8} {:>12} {:>12} {:>12.0} {:>16.1} {:>16.1}",
                name,
                common::ms(a.run.percentile(0.5)),
                common::ms(a.run.percentile(0.99)),
                b.run.throughput(),
                b.cpu_self,
                b.cpu_redis
            );
        }
        // What the shared ledger holds per call of the last minute.
        let mut conn = redis::Client::open(format!("redis://127.0.0.1:{port}"))
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("penstock:v1:pool:*:minute")
            .query_async(&mut conn)
            .await
            .unwrap();
        let mut entries = 0u64;
        for k in &keys {
            entries += redis::cmd("ZCARD")
                .arg(k)
                .query_async::<u64>(&mut conn)
                .await
                .unwrap();
        }
        let info: String = redis::cmd("INFO")
            .arg("memory")
            .query_async(&mut conn)
            .await
            .unwrap();
        let used: f64 = info
            .lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0);
        println!(
            "shared ledger: {entries} calls in the minute window, redis used_memory {:.1} MiB: about {:.0} bytes a call",
            used / 1048576.0,
            used / entries.max(1) as f64
        );
        let added = |p: f64| {
            one[1]
                .1
                .run
                .percentile(p)
                .saturating_sub(one[0].1.run.percentile(p))
        };
        println!(
            "redis vs memory: added p50 {}, p99 {}; throughput {:.2}; cpu +{:.1} µs/req here, +{:.1} µs/req in redis-server",
            common::ms(added(0.5)),
            common::ms(added(0.99)),
            many[1].1.run.throughput() / many[0].1.run.throughput(),
            many[1].1.cpu_self - many[0].1.cpu_self,
            many[1].1.cpu_redis
        );
    });
    // Three replicas sharing the Redis in front of an upstream allowing ten
    // requests in any second: 90 generations at once, spread over them.
    common::block_on(async {
        let fake = Fake::start(Behaviour {
            limits: Some(fake_openai::Limits {
                requests: 10,
                window: Duration::from_secs(1),
                ..fake_openai::Limits::default()
            }),
            latency: (Duration::from_millis(200), Duration::from_millis(600)),
            record_bodies: false,
            ..Behaviour::default()
        })
        .await;
        let mut config = common::config_for(&fake.url());
        config.budgets = vec![BudgetConfig {
            models: vec!["gpt-image-*".into()],
            rpm: Some(600),
            ..BudgetConfig::default()
        }];
        config.retry.max_attempts = 1;
        config.state.backend = Backend::Redis;
        config.state.redis_url = format!("redis://127.0.0.1:{port}");
        config.state.key_prefix = "three".into();
        let mut replicas = Vec::new();
        for _ in 0..3 {
            replicas.push(penstock::start(&config, |_| None).await.unwrap());
        }
        for r in &replicas {
            common::until_healthy(r.admin_addr).await;
        }
        let client = reqwest::Client::new();
        let started = std::time::Instant::now();
        let calls = (0..90).map(|i| {
            let url = format!("http://{}/v1/images/generations", replicas[i % 3].addr);
            let client = client.clone();
            async move {
                client
                    .post(url)
                    .header("authorization", "Bearer sk-bench")
                    .json(&serde_json::json!({"model": "gpt-image-1", "prompt": format!("three {i}"), "quality": "low", "size": "1024x1024"}))
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
                    .unwrap_or(0)
            }
        });
        let statuses = futures_util::future::join_all(calls).await;
        let wall = started.elapsed();
        // Ten now and ten more each second (a window and its margin), ~0.4 s each.
        let ideal = Duration::from_millis(8 * 1050 + 400);
        println!(
            "three replicas, one redis, upstream at 10 requests/s: {}/90 succeeded, {} upstream 429s, wall {:.2} s, wall / ideal {:.2}",
            statuses.iter().filter(|s| **s == 200).count(),
            fake.answered(429),
            wall.as_secs_f64(),
            wall.as_secs_f64() / ideal.as_secs_f64()
        );
    });
    drop(redis);
}
