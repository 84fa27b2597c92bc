//! Hostile clients and broken upstreams: penstock stays bounded in time and
//! memory, answers clearly, and keeps serving everyone else.

mod support;

use std::time::Duration;

use penstock::config::BudgetConfig;
use serde_json::json;
use support::*;

fn image(prompt: &str) -> serde_json::Value {
    json!({"model": "gpt-image-1", "prompt": prompt, "quality": "low", "size": "1024x1024"})
}

#[tokio::test]
async fn the_request_deadline_bounds_queue_waits_and_attempts_together() {
    // One call holds the only slot for 3 s; the next may wait 60 s and its
    // attempt may take 5 minutes, but the whole request has 1 s.
    let h = start_with(
        Behaviour {
            latency: (Duration::from_secs(3), Duration::from_secs(3)),
            ..Behaviour::default()
        },
        |c| {
            c.budgets = vec![BudgetConfig {
                models: vec!["gpt-image-*".into()],
                rpm: Some(6000),
                max_in_flight: Some(1),
                ..BudgetConfig::default()
            }];
            c.queue.max_wait = Duration::from_secs(60);
            c.retry.deadline = Duration::from_secs(1);
        },
        |_| None,
    )
    .await;
    let url = format!("{}/v1/images/generations", h.url);
    let started = tokio::time::Instant::now();
    let (first, second) = tokio::join!(http().post(&url).json(&image("a")).send(), async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        http().post(&url).json(&image("b")).send().await
    });
    // The first's attempt is cut at its deadline, not after 3 s of upstream.
    let first = first.unwrap();
    assert_eq!(first.status(), 504);
    assert_eq!(
        json(first).await["error"]["code"],
        "penstock_upstream_timeout"
    );
    // The second waited for the slot until what was left of its second: then
    // refused, or admitted and cut; never the 3 s call that a 200 would need.
    let second = second.unwrap();
    let code = json_code(second).await;
    assert!(
        code == "penstock_queue_timeout" || code == "penstock_upstream_timeout",
        "{code}"
    );
    assert!(started.elapsed() >= Duration::from_secs(1));
}

async fn json_code(resp: reqwest::Response) -> String {
    json(resp).await["error"]["code"]
        .as_str()
        .unwrap_or("")
        .to_string()
}
