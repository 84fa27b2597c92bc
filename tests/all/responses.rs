//! The Responses API, as OpenAI serves it now: plain, streamed, with the
//! image tool; counted at admission from its input and `max_output_tokens`,
//! its image tool charged to the image model's pool, settled from `usage`;
//! stored responses never shared across tenants.

use std::time::Duration;

use penstock::config::BudgetConfig;
use serde_json::{Value, json};

use crate::support::*;

async fn create(url: &str, key: &str, body: &Value) -> reqwest::Response {
    http()
        .post(format!("{url}/v1/responses"))
        .header("authorization", format!("Bearer {key}"))
        .json(body)
        .send()
        .await
        .unwrap()
}

/// The event types of an SSE body, in order.
fn event_types(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_pass_through_plain_streamed_and_with_the_image_tool_as_directly() {
    let h = start(Behaviour::default()).await;
    let direct = h.fake.url();
    let plain = json!({"model": "gpt-4.1-mini", "input": "say hello to the world", "max_output_tokens": 50});
    for url in [direct.as_str(), h.url.as_str()] {
        let v: Value = create(url, "sk-a", &plain).await.json().await.unwrap();
        assert_eq!(v["object"], "response", "{v}");
        assert_eq!(
            v["output"][0]["content"][0]["text"],
            "say hello to the world"
        );
        assert!(v["usage"]["total_tokens"].as_u64().unwrap() > 0);
    }
    // A stream's typed events arrive as they were sent, the usage on the last.
    let streamed = json!({"model": "gpt-4.1-mini", "input": "stream these words", "stream": true});
    let direct_events = event_types(
        &create(&direct, "sk-a", &streamed)
            .await
            .text()
            .await
            .unwrap(),
    );
    let resp = create(&h.url, "sk-a", &streamed).await;
    assert_eq!(resp.headers()["x-penstock-cache"], "bypass");
    let through = event_types(&resp.text().await.unwrap());
    assert_eq!(through, direct_events);
    assert_eq!(
        through.first().map(String::as_str),
        Some("response.created")
    );
    assert_eq!(
        through.last().map(String::as_str),
        Some("response.completed")
    );
    // The image tool, forced, streams its partial images.
    let image = json!({"model": "gpt-4.1-mini", "input": "a lighthouse", "stream": true,
        "tools": [{"type": "image_generation", "quality": "low", "size": "1024x1024", "partial_images": 2}],
        "tool_choice": {"type": "image_generation"}});
    let events = event_types(&create(&h.url, "sk-a", &image).await.text().await.unwrap());
    assert_eq!(
        events
            .iter()
            .filter(|e| *e == "response.image_generation_call.partial_image")
            .count(),
        2
    );
    // Usage was read from the answers and streams it crossed.
    let metrics = h.metrics().await;
    let actual = sample(
        &metrics,
        r#"penstock_tokens_total{model="gpt-4.1-mini",kind="actual"}"#,
    );
    assert!(actual > 0.0, "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_image_tool_waits_for_the_image_models_budget() {
    // The upstream takes two images a second; the image budget knows it.
    let h = start_with(
        Behaviour {
            limits: Some(Limits {
                requests: 100,
                images: Some(2),
                window: Duration::from_secs(1),
                ..Limits::default()
            }),
            latency: (Duration::from_millis(50), Duration::from_millis(50)),
            ..Behaviour::default()
        },
        |c| {
            c.budgets = vec![BudgetConfig {
                name: Some("images".into()),
                models: vec!["gpt-image-*".into()],
                ipm: Some(120),
                safety_margin: Duration::from_millis(100),
                ..BudgetConfig::default()
            }]
        },
        |_| None,
    )
    .await;
    let calls = (0..6).map(|i| {
        let url = h.url.clone();
        async move {
            let body = json!({"model": "gpt-4.1-mini", "input": format!("lighthouse {i}"),
                "tools": [{"type": "image_generation", "quality": "low"}],
                "tool_choice": {"type": "image_generation"}});
            create(&url, "sk-a", &body).await.status().as_u16()
        }
    });
    let statuses = futures_util::future::join_all(calls).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(h.fake.answered(429), 0, "the image tool waited its turn");
    let status = h.status().await;
    assert!(
        status["pools"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "images"),
        "{status}"
    );
}

#[tokio::test]
async fn an_image_tool_the_model_did_not_call_gives_its_image_back() {
    let h = start_with(
        Behaviour::default(),
        |c| {
            c.budgets = vec![BudgetConfig {
                name: Some("images".into()),
                models: vec!["gpt-image-*".into()],
                ipm: Some(60),
                ..BudgetConfig::default()
            }]
        },
        |_| None,
    )
    .await;
    // Offered, not forced, and the input asks for no picture: not called.
    let body = json!({"model": "gpt-4.1-mini", "input": "just say hi",
        "tools": [{"type": "image_generation", "quality": "low"}]});
    let v: Value = create(&h.url, "sk-a", &body).await.json().await.unwrap();
    assert_eq!(v["output"].as_array().unwrap().len(), 1, "{v}");
    let status = h.status().await;
    let pool = status["pools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "images")
        .cloned()
        .unwrap();
    assert_eq!(
        pool["remaining"]["images"]["minute_remaining"], 60,
        "{status}"
    );
    // Forced, it is called and kept.
    let forced = json!({"model": "gpt-4.1-mini", "input": "a lighthouse",
        "tools": [{"type": "image_generation", "quality": "low"}],
        "tool_choice": {"type": "image_generation"}});
    assert_eq!(create(&h.url, "sk-a", &forced).await.status(), 200);
    let status = h.status().await;
    let pool = status["pools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "images")
        .cloned()
        .unwrap();
    assert_eq!(
        pool["remaining"]["images"]["minute_remaining"], 59,
        "{status}"
    );
}

#[tokio::test]
async fn a_stored_response_is_never_handed_to_another_tenant() {
    let h = start_with(
        Behaviour::default(),
        |c| {
            c.cache.paths.push("/v1/responses".into());
            c.cache.scope = penstock::config::CacheScope::Global;
        },
        |_| None,
    )
    .await;
    let stored = json!({"model": "gpt-4.1-mini", "input": "remember this"});
    let a = create(&h.url, "sk-a", &stored).await;
    let b = create(&h.url, "sk-b", &stored).await;
    assert_eq!(a.headers()["x-penstock-cache"], "miss");
    assert_eq!(
        b.headers()["x-penstock-cache"],
        "miss",
        "another tenant's object"
    );
    let a: Value = a.json().await.unwrap();
    let b: Value = b.json().await.unwrap();
    assert_ne!(a["id"], b["id"]);
    // Each continues its own: the chain reaches the upstream, keyed by it.
    let next =
        json!({"model": "gpt-4.1-mini", "input": "and then", "previous_response_id": a["id"]});
    assert_eq!(create(&h.url, "sk-a", &next).await.status(), 200);
    // Not stored, the same request is a global cache's to share.
    let ephemeral = json!({"model": "gpt-4.1-mini", "input": "forget this", "store": false});
    assert_eq!(
        create(&h.url, "sk-a", &ephemeral).await.headers()["x-penstock-cache"],
        "miss"
    );
    assert_eq!(
        create(&h.url, "sk-b", &ephemeral).await.headers()["x-penstock-cache"],
        "hit"
    );
}
