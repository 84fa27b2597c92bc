//! Metrics, cost accounting and status: a known mix of traffic gives exact counts.
//! The only test in this binary: it captures logs through a thread-local
//! subscriber, which other tests running beside it would disturb.

#[path = "all/support/mod.rs"]
mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use penstock::config::BudgetConfig;
use serde_json::json;
use support::*;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn a_known_mix_gives_exact_counts_costs_and_savings_and_no_key_anywhere() {
    // Everything runs on this thread, so the subscriber sees penstock's logs.
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .with_max_level(tracing::Level::DEBUG)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let h = start_with(
        Behaviour {
            // The first call fails: the leader is retried once.
            fail_first: 1,
            latency: (Duration::from_millis(200), Duration::from_millis(200)),
            ..Behaviour::default()
        },
        |c| {
            c.budgets = vec![BudgetConfig {
                name: Some("images".into()),
                models: vec!["gpt-image-*".into()],
                // Two requests a minute, one a second.
                rpm: Some(2),
                tpm: None,
                ipm: None,
                burst: Duration::from_secs(1),
                safety_margin: Duration::from_millis(50),
                max_in_flight: None,
                shared: false,
                upstream: None,
            }];
        },
        |_| None,
    )
    .await;
    let post = |prompt: &'static str, headers: Vec<(&'static str, &'static str)>| {
        let url = h.url.clone();
        async move {
            let mut req = http()
                .post(format!("{url}/v1/images/generations"))
                .header("authorization", "Bearer sk-live-metrics-secret")
                .json(&json!({"model": "gpt-image-1", "prompt": prompt, "quality": "low", "size": "1024x1024"}));
            for (k, v) in headers {
                req = req.header(k, v);
            }
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            let cache = resp.headers()["x-penstock-cache"]
                .to_str()
                .unwrap()
                .to_string();
            resp.bytes().await.unwrap();
            (status, cache)
        }
    };
    // Three identical at once: one leader (retried after a 503), two coalesced.
    let (a, b, c) = tokio::join!(
        post("a lighthouse", vec![]),
        post("a lighthouse", vec![]),
        post("a lighthouse", vec![])
    );
    let mut outcomes = vec![a, b, c];
    outcomes.sort();
    assert_eq!(
        outcomes,
        vec![
            (200, "coalesced".into()),
            (200, "coalesced".into()),
            (200, "miss".into())
        ]
    );
    // The same again: a hit.
    assert_eq!(post("a lighthouse", vec![]).await, (200, "hit".into()));
    // A new prompt when both of the minute's requests are spent: refused at once.
    assert_eq!(
        post("a harbour", vec![("x-penstock-max-wait-ms", "100")])
            .await
            .0,
        429
    );
    assert_eq!(h.fake.calls(), 2);

    let text = h.metrics().await;
    let requests = |status: u16, cache: &str| {
        sample(
            &text,
            &format!(
                "penstock_requests_total{{route=\"images.generations\",model=\"gpt-image-1\",status=\"{status}\",cache=\"{cache}\"}}"
            ),
        )
    };
    assert_eq!(requests(200, "miss"), 1.0);
    assert_eq!(requests(200, "coalesced"), 2.0);
    assert_eq!(requests(200, "hit"), 1.0);
    assert_eq!(requests(429, "miss"), 1.0);
    let attempts = |outcome: &str| {
        sample(
            &text,
            &format!(
                "penstock_upstream_attempts_total{{route=\"images.generations\",model=\"gpt-image-1\",outcome=\"{outcome}\"}}"
            ),
        )
    };
    assert_eq!(attempts("transient"), 1.0);
    assert_eq!(attempts("success"), 1.0);
    assert_eq!(
        sample(&text, "penstock_cache_events_total{event=\"miss\"}"),
        2.0
    );
    assert_eq!(
        sample(&text, "penstock_cache_events_total{event=\"coalesced\"}"),
        2.0
    );
    assert_eq!(
        sample(&text, "penstock_cache_events_total{event=\"hit\"}"),
        1.0
    );
    assert_eq!(
        sample(&text, "penstock_queue_wait_seconds_count{pool=\"images\"}"),
        2.0
    );
    // The retry waited for the next one-per-second slot.
    assert!(sample(&text, "penstock_queue_wait_seconds_sum{pool=\"images\"}") > 0.5);
    assert_eq!(
        sample(
            &text,
            "penstock_upstream_duration_seconds_count{route=\"images.generations\"}"
        ),
        2.0
    );
    assert_eq!(
        sample(
            &text,
            "penstock_upstream_duration_seconds_bucket{le=\"0.1\",route=\"images.generations\"}"
        ),
        0.0
    );
    assert_eq!(
        sample(
            &text,
            "penstock_upstream_duration_seconds_bucket{le=\"0.25\",route=\"images.generations\"}"
        ),
        2.0
    );
    assert_eq!(sample(&text, "penstock_queue_depth{pool=\"images\"}"), 0.0);
    assert_eq!(
        sample(&text, "penstock_late_departures{pool=\"images\"}"),
        0.0
    );
    assert_eq!(
        sample(
            &text,
            "penstock_budget_remaining{pool=\"images\",dimension=\"requests\"}"
        ),
        0.0
    );

    // Tokens: penstock's estimate (12 prompt characters at four a token, as
    // OpenAI's limiter counts, + the low-quality square) and the fake's usage
    // (its own prompt count + 272), for the one paid answer.
    assert_eq!(
        sample(
            &text,
            "penstock_tokens_total{model=\"gpt-image-1\",kind=\"estimated\"}"
        ),
        3.0 + 272.0
    );
    assert_eq!(
        sample(
            &text,
            "penstock_tokens_total{model=\"gpt-image-1\",kind=\"actual\"}"
        ),
        3.0 + 272.0
    );
    assert_eq!(
        sample(&text, "penstock_images_total{model=\"gpt-image-1\"}"),
        1.0
    );
    // gpt-image-1: 3 text tokens at $5/M + 272 image tokens at $40/M.
    let one = (3.0 * 5.0 + 272.0 * 40.0) / 1e6;
    let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
    assert!(close(
        sample(&text, "penstock_cost_usd_total{model=\"gpt-image-1\"}"),
        one
    ));
    assert!(close(
        sample(&text, "penstock_saved_usd_total{reason=\"coalesced\"}"),
        2.0 * one
    ));
    assert!(close(
        sample(&text, "penstock_saved_usd_total{reason=\"cache\"}"),
        one
    ));

    let status = http()
        .get(format!("{}/status", h.admin))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(v["cache"]["entries"], 1);
    assert_eq!(v["pools"][0]["name"], "images");
    assert!(v["uptime_secs"].is_u64() && v["version"].is_string());

    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<serde_json::Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|v: &serde_json::Value| v["fields"]["message"] == "request")
        .collect();
    assert_eq!(lines.len(), 5, "one line per request");
    let leader = lines
        .iter()
        .find(|l| l["fields"]["cache"] == "miss" && l["fields"]["status"] == 200)
        .unwrap();
    assert_eq!(leader["fields"]["attempts"], "2");
    assert_eq!(leader["fields"]["tokens"], 275);
    assert!(close(leader["fields"]["cost_usd"].as_f64().unwrap(), one));
    let hit = lines
        .iter()
        .find(|l| l["fields"]["cache"] == "hit")
        .unwrap();
    assert_eq!(hit["fields"]["attempts"], "0");
    assert!(close(hit["fields"]["saved_usd"].as_f64().unwrap(), one));
    assert_eq!(hit["fields"]["cost_usd"], 0.0);

    for (what, s) in [("metrics", &text), ("status", &status), ("logs", &logs)] {
        assert!(!s.contains("metrics-secret"), "a key in {what}");
        assert!(!s.contains("lighthouse"), "a prompt in {what}");
    }
}
