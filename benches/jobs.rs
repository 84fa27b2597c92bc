//! Async jobs: how fast a submit is answered when jobs are durable (redb at
//! `jobs.path`, committed before the 202; or Redis, two replicas sharing one
//! queue), and how 50 jobs at once fare against an upstream allowing 10
//! requests in any second (0.2–0.6 s an image).
//! `cargo bench --bench jobs`

#[path = "common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use fake_openai::{Behaviour, Fake, Limits};
use penstock::config::BudgetConfig;
use serde_json::{Value, json};

fn main() {
    common::block_on(async {
        scenario("redb", None).await;
        match common::RedisServer::start() {
            Some(redis) => scenario("redis, 2 replicas", Some(&redis.url())).await,
            None => println!("jobs: redis-server is not installed; Redis not measured"),
        }
    });
}

/// 50 jobs at once, submitted round-robin to the replicas.
async fn scenario(store: &str, redis: Option<&str>) {
    {
        let fake = Fake::start(Behaviour {
            limits: Some(Limits {
                requests: 10,
                window: Duration::from_secs(1),
                ..Limits::default()
            }),
            latency: (Duration::from_millis(200), Duration::from_millis(600)),
            record_bodies: false,
            ..Behaviour::default()
        })
        .await;
        let dir = tempfile::tempdir().unwrap();
        let mut config = common::config_for(&fake.url());
        config.budgets = vec![BudgetConfig {
            models: vec!["gpt-image-*".into()],
            rpm: Some(600),
            ..BudgetConfig::default()
        }];
        config.jobs.path = Some(dir.path().join("jobs.redb"));
        config.jobs.store = penstock::config::JobStore::Redb;
        if let Some(redis) = redis {
            config.state.backend = penstock::config::Backend::Redis;
            config.state.redis_url = redis.to_string();
        }
        let mut replicas = vec![penstock::start(&config, |_| None).await.unwrap()];
        if redis.is_some() {
            replicas.push(penstock::start(&config, |_| None).await.unwrap());
            for r in &replicas {
                common::until_healthy(r.admin_addr).await;
            }
        }
        let urls: Vec<String> = replicas
            .iter()
            .map(|p| format!("http://{}", p.addr))
            .collect();
        let url = urls[0].clone();
        let client = reqwest::Client::new();
        let started = Instant::now();
        let submits = (0..50).map(|i| {
            let (client, url) = (client.clone(), urls[i % urls.len()].clone());
            async move {
                let t = Instant::now();
                let resp = client
                    .post(format!("{url}/v1/images/generations"))
                    .header("authorization", "Bearer sk-bench")
                    .header("prefer", "respond-async")
                    .json(&json!({"model": "gpt-image-1", "prompt": format!("job {i}"), "quality": "low", "size": "1024x1024"}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(resp.status(), 202);
                let id = resp.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();
                (t.elapsed(), id)
            }
        });
        let mut answered = futures_util::future::join_all(submits).await;
        let all_submitted = started.elapsed();
        answered.sort();
        let mut succeeded = 0;
        for (_, id) in &answered {
            loop {
                let v: Value = client
                    .get(format!("{url}/penstock/v1/jobs/{id}"))
                    .header("authorization", "Bearer sk-bench")
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                match v["status"].as_str().unwrap() {
                    "queued" | "running" => tokio::time::sleep(Duration::from_millis(50)).await,
                    "succeeded" => {
                        succeeded += 1;
                        break;
                    }
                    _ => break,
                }
            }
        }
        let wall = started.elapsed();
        let ideal = Duration::from_millis(4 * 1050 + 400);
        println!(
            "jobs ({store}): 50 image generations submitted at once with Prefer: respond-async"
        );
        println!(
            "submit answered: p50 {}, p99 {}, max {}; all 50 in {}",
            common::ms(answered[25].0),
            common::ms(answered[49].0),
            common::ms(answered[49].0.max(answered[48].0)),
            common::ms(all_submitted)
        );
        println!(
            "{succeeded}/50 succeeded, {} upstream 429s, all done in {:.2} s (ideal {:.2} s, {:.2}x)",
            fake.answered(429),
            wall.as_secs_f64(),
            ideal.as_secs_f64(),
            wall.as_secs_f64() / ideal.as_secs_f64()
        );
    }
}
