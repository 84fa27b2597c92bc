//! Spend caps: a client past its daily cap gets 429 `penstock_spend_limit`
//! with `retry-after` at the day's end, and nothing goes upstream; other
//! clients go on; what was spent survives a restart, is shared by replicas
//! through Redis, and a reload changes the caps live.

use std::time::Duration;

use penstock::config::ClientConfig;
use serde_json::json;

use crate::support::redis_server::RedisServer;
use crate::support::*;

/// A low-quality square image: 272 output tokens, about $0.011 by
/// gpt-image-1's token prices.
async fn generate(url: &str, key: &str, prompt: &str) -> reqwest::Response {
    http()
        .post(format!("{url}/v1/images/generations"))
        .header("authorization", format!("Bearer {key}"))
        .json(&json!({"model": "gpt-image-1", "prompt": prompt, "quality": "low", "size": "1024x1024"}))
        .send()
        .await
        .unwrap()
}

fn capped(key: &str, usd_per_day: f64) -> ClientConfig {
    ClientConfig {
        id: penstock::edge::key_id_of(format!("Bearer {key}").as_bytes()),
        usd_per_day: Some(usd_per_day),
        ..ClientConfig::default()
    }
}

#[tokio::test]
async fn a_client_past_its_daily_cap_is_refused_until_the_day_ends() {
    let dir = tempfile::tempdir().unwrap();
    let h = start_with(
        Behaviour::default(),
        |c| {
            c.clients = vec![capped("sk-capped", 0.03)];
            c.spend.path = Some(dir.path().join("spend.redb"));
        },
        |_| None,
    )
    .await;
    assert_eq!(generate(&h.url, "sk-capped", "one").await.status(), 200);
    assert_eq!(generate(&h.url, "sk-capped", "two").await.status(), 200);
    let refused = generate(&h.url, "sk-capped", "three").await;
    assert_eq!(refused.status(), 429);
    let wait: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=86_400).contains(&wait), "retry-after {wait}");
    let body = json(refused).await;
    assert_eq!(body["error"]["code"], "penstock_spend_limit");
    assert!(body["error"]["message"].as_str().unwrap().contains("daily"));
    assert_eq!(h.fake.calls(), 2, "nothing went upstream");
    // Others are not capped; a cache hit costs nothing.
    assert_eq!(generate(&h.url, "sk-free", "four").await.status(), 200);
    assert_eq!(generate(&h.url, "sk-capped", "one").await.status(), 200);
    // /status and /metrics show what it spent.
    let s = h.status().await;
    let spent = &s["spend"]["clients"][0];
    let today = spent["spent_today_usd"].as_f64().unwrap();
    assert!((0.02..=0.03).contains(&today), "{spent}");
    assert_eq!(spent["usd_per_day"], 0.03);
    let metrics = h.metrics().await;
    let client = spent["client"].as_str().unwrap();
    let shown = sample(
        &metrics,
        &format!(r#"penstock_client_spend_usd{{client="{client}",period="day"}}"#),
    );
    assert!((shown - today).abs() < 1e-9, "{shown} vs {today}");
}

#[tokio::test]
async fn what_was_spent_survives_a_restart() {
    let fake = Fake::start(Behaviour::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let id = penstock::edge::key_id_of(b"Bearer sk-capped");
    let path = config_file(
        &dir,
        &fake.url(),
        &format!(
            "[jobs]\nstore = \"memory\"\n[spend]\npath = \"{}\"\n[[client]]\nid = \"{id}\"\nusd_per_day = 0.03\n",
            dir.path().join("spend.redb").display()
        ),
    );
    let (mut child, url) = spawn_penstock(&path).await;
    assert_eq!(generate(&url, "sk-capped", "one").await.status(), 200);
    assert_eq!(generate(&url, "sk-capped", "two").await.status(), 200);
    let pid = child.id().unwrap().to_string();
    let sent = tokio::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(sent.success());
    child.wait().await.unwrap();

    let (_child, url) = spawn_penstock(&path).await;
    let refused = generate(&url, "sk-capped", "three").await;
    assert_eq!(refused.status(), 429);
    assert_eq!(json(refused).await["error"]["code"], "penstock_spend_limit");
    assert_eq!(fake.calls(), 2);
}

#[tokio::test]
async fn a_reload_raises_a_cap_and_what_was_spent_stays() {
    let fake = Fake::start(Behaviour::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let id = penstock::edge::key_id_of(b"Bearer sk-capped");
    let write = |usd: f64| {
        config_file(
            &dir,
            &fake.url(),
            &format!(
                "[server]\nthreads = 1\n[jobs]\nstore = \"memory\"\n[spend]\npath = \"{}\"\n[[client]]\nid = \"{id}\"\nusd_per_day = {usd}\n",
                dir.path().join("spend.redb").display()
            ),
        )
    };
    let path = write(0.015);
    let config = penstock::Config::load(&path).unwrap();
    let running = penstock::start(&config, |_| None).await.unwrap();
    let url = format!("http://{}", running.addr);
    assert_eq!(generate(&url, "sk-capped", "one").await.status(), 200);
    assert_eq!(generate(&url, "sk-capped", "two").await.status(), 429);
    write(0.03);
    let outcome = running.reload_file(&path);
    assert_eq!(outcome.applied, ["client"], "{outcome:?}");
    assert_eq!(generate(&url, "sk-capped", "two").await.status(), 200);
    assert_eq!(generate(&url, "sk-capped", "three").await.status(), 429);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_what_a_client_spent() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let fake = Fake::start(Behaviour::default()).await;
    let mut config = config_for(&fake.url());
    config.state.backend = penstock::config::Backend::Redis;
    config.state.redis_url = redis.url();
    config.state.heartbeat = Duration::from_millis(200);
    config.clients = vec![capped("sk-capped", 0.03)];
    let (a, b) = (replica(&config).await, replica(&config).await);
    a.until_state(true, 2).await;
    b.until_state(true, 2).await;
    assert_eq!(generate(&a.url, "sk-capped", "one").await.status(), 200);
    assert_eq!(generate(&b.url, "sk-capped", "two").await.status(), 200);
    // Settled from the answers: spent, as either replica sees it.
    let refused = generate(&a.url, "sk-capped", "three").await;
    assert_eq!(refused.status(), 429);
    assert_eq!(json(refused).await["error"]["code"], "penstock_spend_limit");
    let refused = generate(&b.url, "sk-capped", "four").await;
    assert_eq!(refused.status(), 429);
    assert_eq!(fake.calls(), 2);
    let s = b.status().await;
    let today = s["spend"]["clients"][0]["spent_today_usd"]
        .as_f64()
        .unwrap();
    assert!((0.02..=0.03).contains(&today), "{s}");
}
