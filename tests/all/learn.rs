//! Zero-config budgets: with no `[[budget]]`, a learned pool constrains nothing
//! until the upstream refuses something, then learns the limits from what it is
//! told (announced limits, a 429's `-images` headers) or, told nothing, from
//! the 429s themselves. Tested against an upstream that announces everything,
//! one that speaks as OpenAI's images API does (nothing on a success, the
//! image limit on a 429), and one that says nothing at all.

use std::time::Duration;

use crate::support::*;
use penstock::config::BudgetConfig;
use serde_json::json;

/// `n` generations at once, each with its own prompt; their statuses and
/// `x-penstock-queue-ms`.
async fn generate_all(h: &Harness, n: usize, tag: &str) -> Vec<(u16, u64)> {
    let url = format!("{}/v1/images/generations", h.url);
    let calls = (0..n).map(|i| {
        let url = url.clone();
        let body = json!({"model": "gpt-image-1", "prompt": format!("{tag} {i}"), "quality": "low", "size": "1024x1024"});
        async move {
            let resp = http().post(url).json(&body).send().await.unwrap();
            let queued = resp
                .headers()
                .get("x-penstock-queue-ms")
                .map_or(0, |v| v.to_str().unwrap().parse().unwrap());
            (resp.status().as_u16(), queued)
        }
    });
    futures_util::future::join_all(calls).await
}

fn all_ok(results: &[(u16, u64)]) -> bool {
    results.iter().all(|(s, _)| *s == 200)
}

/// The fake at ten images (and requests) a second.
fn ten_images_per_second() -> Behaviour {
    Behaviour {
        limits: Some(Limits {
            requests: 10,
            images: Some(10),
            window: Duration::from_secs(1),
            ..Limits::default()
        }),
        ..ten_per_second()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn against_a_quiet_upstream_that_refuses_nothing_no_call_waits() {
    // OpenAI's images API as it answers a tier with room: no rate-limit
    // headers, each generation taking a while (long enough that twenty sent
    // at once overlap even when the tests sharing the machine delay some).
    let h = start(Behaviour {
        announce_limits: false,
        latency: (Duration::from_secs(3), Duration::from_secs(3)),
        ..Behaviour::default()
    })
    .await;
    let results = generate_all(&h, 20, "quiet").await;
    assert!(all_ok(&results), "{results:?}");
    assert_eq!(
        h.fake.max_in_flight(),
        20,
        "all twenty were generating at once, as they would be directly"
    );
    assert!(
        results.iter().all(|(_, queued)| *queued == 0),
        "nothing waited for budget: {results:?}"
    );
    let status = h.status().await;
    let pool = &status["pools"][0];
    assert_eq!(pool["name"], "learned:gpt-image-1", "{status}");
    assert_eq!(
        pool["limits"], "learned: open (the upstream has refused nothing)",
        "{status}"
    );
    assert!(pool["limits_since"].is_string(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_limit_of_a_429_is_learned_and_the_next_burst_draws_no_429() {
    // The fake as OpenAI's images API: successes announce nothing, a refusal
    // says `x-ratelimit-limit-images` and when to come back.
    let h = start_with(
        ten_images_per_second(),
        |c| c.retry.max_attempts = 6,
        |_| None,
    )
    .await;
    let first = generate_all(&h, 50, "first").await;
    assert!(all_ok(&first), "{first:?}");
    // The first burst went open, as it would directly: what the upstream
    // could not take came back refused (at most the 40 over its limit, fewer
    // when the first 429 came back before the last of the 50 arrived), and
    // the retries were paced.
    let refused_first = h.fake.answered(429);
    assert!(
        (1..=46).contains(&refused_first),
        "{refused_first} upstream 429s"
    );
    let status = h.status().await;
    let pool = &status["pools"][0];
    assert_eq!(
        pool["limits"], "learned: x-ratelimit-limit headers",
        "{status}"
    );
    // 600 images a minute announced on the 429, 95 % of it used.
    assert_eq!(pool["remaining"]["images"]["per_minute"], 570, "{status}");
    // Known now: a second burst waits its turn and is never refused.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    h.fake.clear();
    let second = generate_all(&h, 50, "second").await;
    assert!(all_ok(&second), "{second:?}");
    assert_eq!(h.fake.answered(429), 0, "the learned limit held");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announced_limits_on_answers_are_followed_when_lowered() {
    let h = start(Behaviour {
        image_answer_limits: true,
        ..ten_per_second()
    })
    .await;
    assert!(all_ok(&generate_all(&h, 20, "before").await));
    let status = h.status().await;
    assert_eq!(
        status["pools"][0]["remaining"]["requests"]["per_minute"], 570,
        "{status}"
    );
    // A lower tier: five a second, announced as 300 a minute.
    h.fake.set_behaviour(|b| {
        b.limits = Some(Limits {
            requests: 5,
            window: Duration::from_secs(1),
            ..Limits::default()
        })
    });
    tokio::time::sleep(Duration::from_millis(1100)).await;
    h.fake.clear();
    let results = generate_all(&h, 30, "after").await;
    assert!(all_ok(&results), "{results:?}");
    // At most the calls sent under the old pace (a burst of 10 where 5 now
    // fit); from the first answer on, the new limit holds.
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
async fn told_nothing_the_calls_in_flight_are_learned_from_the_429s() {
    let h = start_with(
        Behaviour {
            announce_limits: false,
            ..ten_per_second()
        },
        |c| c.retry.max_attempts = 8,
        |_| None,
    )
    .await;
    let results = generate_all(&h, 50, "silent").await;
    assert!(all_ok(&results), "{results:?}");
    let refused = h.fake.answered(429);
    // The first burst's 40, and few after: a direct client retrying as the
    // SDKs do draws more than twice as many (`cargo bench --bench learn`).
    assert!((1..=60).contains(&refused), "{refused} upstream 429s");
    let status = h.status().await;
    let pool = &status["pools"][0];
    assert_eq!(pool["limits"], "learned: upstream 429s", "{status}");
    let window = pool["max_in_flight"].as_u64().unwrap();
    assert!((1..=10).contains(&window), "{status}");
}

#[tokio::test(start_paused = true)]
async fn an_idle_learned_pool_forgets_and_starts_open_again() {
    use penstock::admission::Registry;
    use penstock::config::Config;
    use penstock::vocab::cost::Cost;
    use penstock::vocab::headers::RateLimitHeaders;

    let registry = std::sync::Arc::new(Registry::new(&Config::default(), None));
    registry.evict_periodically();
    let key: std::sync::Arc<str> = "key:a".into();
    let one = Cost {
        requests: 1,
        tokens: 0,
        images: 1,
    };
    let pool = registry.pool("gpt-image-1", &key).unwrap();
    let permit = pool
        .acquire(&key, one, Duration::from_secs(1))
        .await
        .unwrap();
    permit.learn(&RateLimitHeaders::default(), true);
    drop(permit);
    assert_eq!(pool.status().limits, "learned: upstream 429s");
    drop(pool);
    // Two minutes with nothing sent: the pool is dropped with what it learned.
    tokio::time::sleep(Duration::from_secs(150)).await;
    assert_eq!(registry.len(), 0);
    let pool = registry.pool("gpt-image-1", &key).unwrap();
    assert_eq!(
        pool.status().limits,
        "learned: open (the upstream has refused nothing)"
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
    assert!(all_ok(&generate_all(&h, 3, "configured").await));
    let status = h.status().await;
    let pools = status["pools"].as_array().unwrap();
    assert_eq!(pools.len(), 1, "{status}");
    assert_eq!(pools[0]["name"], "mine");
    assert_eq!(pools[0]["limits"], "configured");
    assert_eq!(pools[0]["remaining"]["requests"]["per_minute"], 120);
}
