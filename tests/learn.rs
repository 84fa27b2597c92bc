//! Zero-config budgets: with no `[[budget]]`, penstock learns each model's limits
//! from the upstream's answers and keeps 50 simultaneous generations from
//! turning into rate-limit errors.

mod support;

use std::time::Duration;

use penstock::config::BudgetConfig;
use serde_json::json;
use support::*;

/// `n` generations at once, each with its own prompt; their statuses.
async fn generate_all(h: &Harness, n: usize, tag: &str) -> Vec<u16> {
    let url = format!("{}/v1/images/generations", h.url);
    let calls = (0..n).map(|i| {
        let url = url.clone();
        let body = json!({"model": "gpt-image-1", "prompt": format!("{tag} {i}"), "quality": "low", "size": "1024x1024"});
        async move {
            http()
                .post(url)
                .json(&body)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    });
    futures_util::future::join_all(calls).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_budget_fifty_generations_all_succeed_from_announced_limits() {
    let h = start_with(ten_per_second(), |c| c.retry.max_attempts = 1, |_| None).await;
    let statuses = generate_all(&h, 50, "announced").await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert!(
        h.fake.answered(429) <= 2,
        "{} upstream 429s",
        h.fake.answered(429)
    );
    let status = h.status().await;
    let pool = &status["pools"][0];
    assert_eq!(pool["name"], "learned:gpt-image-1", "{status}");
    assert_eq!(pool["limits"], "learned: x-ratelimit-limit headers");
    // 600 a minute announced, 95% of it used.
    assert_eq!(pool["remaining"]["requests"]["per_minute"], 570, "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lowered_limit_is_followed_from_the_next_answer() {
    let h = start(ten_per_second()).await;
    assert!(
        generate_all(&h, 20, "before")
            .await
            .iter()
            .all(|s| *s == 200)
    );
    // A lower tier: five a second, announced as 300 a minute.
    h.fake.set_behaviour(|b| {
        b.limits = Some(Limits {
            requests: 5,
            window: Duration::from_secs(1),
            ..Limits::default()
        })
    });
    h.fake.clear();
    let statuses = generate_all(&h, 30, "after").await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    // At most the calls already sent under the old pace (a burst of 9 where 5
    // now fit); from the first answer on, the new limit holds.
    assert!(
        h.fake.answered(429) <= 5,
        "{} upstream 429s",
        h.fake.answered(429)
    );
    let status = h.status().await;
    assert_eq!(
        status["pools"][0]["remaining"]["requests"]["per_minute"], 285,
        "{status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_nothing_announced_the_rate_is_learned_from_the_429s() {
    let h = start(Behaviour {
        announce_limits: false,
        ..ten_per_second()
    })
    .await;
    let statuses = generate_all(&h, 50, "silent").await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert!(
        h.fake.answered(429) <= 10,
        "{} upstream 429s",
        h.fake.answered(429)
    );
    let status = h.status().await;
    assert_eq!(
        status["pools"][0]["limits"], "learned: upstream 429s",
        "{status}"
    );
}

#[tokio::test]
async fn a_configured_budget_wins_over_learning() {
    let h = start_with(
        ten_per_second(),
        |c| {
            c.budgets = vec![BudgetConfig {
                name: Some("mine".into()),
                models: vec!["gpt-image-1".into()],
                rpm: Some(120),
                ..BudgetConfig::default()
            }]
        },
        |_| None,
    )
    .await;
    assert!(
        generate_all(&h, 3, "configured")
            .await
            .iter()
            .all(|s| *s == 200)
    );
    let status = h.status().await;
    let pools = status["pools"].as_array().unwrap();
    assert_eq!(pools.len(), 1, "{status}");
    assert_eq!(pools[0]["name"], "mine");
    assert_eq!(pools[0]["limits"], "configured");
    assert_eq!(pools[0]["remaining"]["requests"]["per_minute"], 120);
}
