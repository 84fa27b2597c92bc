//! Submit now, collect later: `Prefer: respond-async` jobs, stored in redb.

mod support;

use std::time::Duration;

use penstock::config::BudgetConfig;
use serde_json::{Value, json};
use support::*;

fn image(prompt: &str) -> Value {
    json!({"model": "gpt-image-1", "prompt": prompt, "quality": "low", "size": "1024x1024"})
}

async fn submit(url: &str, key: &str, body: &Value, extra: &[(&str, &str)]) -> reqwest::Response {
    let mut req = http()
        .post(format!("{url}/v1/images/generations"))
        .header("authorization", format!("Bearer {key}"))
        .header("prefer", "respond-async")
        .json(body);
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}

async fn job(url: &str, key: &str, id: &str) -> (u16, Value) {
    let resp = http()
        .get(format!("{url}/penstock/v1/jobs/{id}"))
        .header("authorization", format!("Bearer {key}"))
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

/// Polls until the job has ended; its view.
async fn finished(url: &str, key: &str, id: &str) -> Value {
    for _ in 0..3000 {
        let (status, v) = job(url, key, id).await;
        assert_eq!(status, 200, "{v}");
        if !["queued", "running"].contains(&v["status"].as_str().unwrap()) {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("job {id} never ended");
}

fn budget_10_per_second(c: &mut penstock::Config) {
    c.budgets = vec![BudgetConfig {
        models: vec!["gpt-image-*".into()],
        rpm: Some(600),
        ..BudgetConfig::default()
    }];
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_jobs_are_accepted_at_once_and_all_succeed_without_upstream_rate_limits() {
    let h = start_with(
        Behaviour {
            limits: Some(Limits {
                requests: 10,
                window: Duration::from_secs(1),
                ..Limits::default()
            }),
            latency: (Duration::from_secs(2), Duration::from_secs(2)),
            ..Behaviour::default()
        },
        budget_10_per_second,
        |_| None,
    )
    .await;
    let submits = (0..50).map(|i| {
        let url = h.url.clone();
        async move { submit(&url, "sk-a", &image(&format!("job {i}")), &[]).await }
    });
    let accepted = futures_util::future::join_all(submits).await;
    // Every submit was answered before any generation could have ended.
    assert_eq!(h.fake.answered(200), 0, "submits waited for the upstream");
    let mut ids = Vec::new();
    for resp in accepted {
        assert_eq!(resp.status(), 202);
        let location = resp.headers()["location"].to_str().unwrap().to_string();
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["status"], "queued");
        assert_eq!(
            location,
            format!("/penstock/v1/jobs/{}", v["id"].as_str().unwrap())
        );
        ids.push(v["id"].as_str().unwrap().to_string());
    }
    // A synchronous answer, for its shape.
    let sync: Value = http()
        .post(format!("{}/v1/images/generations", h.url))
        .header("authorization", "Bearer sk-a")
        .json(&image("sync"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for id in &ids {
        let v = finished(&h.url, "sk-a", id).await;
        assert_eq!(v["status"], "succeeded", "{v}");
        assert_eq!(v["response"]["status"], 200);
        let result = http()
            .get(format!("{}/penstock/v1/jobs/{id}/result", h.url))
            .header("authorization", "Bearer sk-a")
            .send()
            .await
            .unwrap();
        assert_eq!(result.status(), 200);
        assert!(
            result.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("application/json")
        );
        let body: Value = result.json().await.unwrap();
        let keys = |v: &Value| {
            let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
            k.sort();
            k
        };
        assert_eq!(
            keys(&body),
            keys(&sync),
            "the same shape as a synchronous answer"
        );
        assert_eq!(keys(&body["data"][0]), keys(&sync["data"][0]));
        assert_eq!(body, v["response"]["body"]);
    }
    assert_eq!(h.fake.answered(429), 0);
    assert_eq!(h.fake.answered(200), 51);
    let metrics = h.metrics().await;
    assert_eq!(
        sample(&metrics, r#"penstock_jobs{state="succeeded"}"#),
        50.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_cannot_read_cancel_or_list_another_tenants_jobs() {
    let h = start(Behaviour::default()).await;
    let resp = submit(&h.url, "sk-a", &image("mine"), &[]).await;
    let id = resp.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    finished(&h.url, "sk-a", &id).await;
    let (status, v) = job(&h.url, "sk-b", &id).await;
    assert_eq!(status, 404);
    assert_eq!(v["error"]["code"], "penstock_job_not_found");
    for path in [
        format!("/penstock/v1/jobs/{id}/result"),
        format!("/penstock/v1/jobs/{id}"),
    ] {
        let resp = http()
            .get(format!("{}{path}", h.url))
            .header("authorization", "Bearer sk-b")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 404);
    }
    let cancel = http()
        .delete(format!("{}/penstock/v1/jobs/{id}", h.url))
        .header("authorization", "Bearer sk-b")
        .send()
        .await
        .unwrap();
    assert_eq!(cancel.status(), 404);
    let list = |key: &'static str| {
        let url = h.url.clone();
        async move {
            http()
                .get(format!("{url}/penstock/v1/jobs"))
                .header("authorization", format!("Bearer {key}"))
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    assert_eq!(list("sk-b").await["data"].as_array().unwrap().len(), 0);
    let mine = list("sk-a").await;
    assert_eq!(mine["data"].as_array().unwrap().len(), 1);
    assert_eq!(mine["data"][0]["status"], "succeeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_queued_job_never_reaches_the_upstream() {
    let h = start_with(
        Behaviour {
            latency: (Duration::from_millis(500), Duration::from_millis(500)),
            ..Behaviour::default()
        },
        |c| c.jobs.max_running = 1,
        |_| None,
    )
    .await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let resp = submit(&h.url, "sk-a", &image(&format!("cancel {i}")), &[]).await;
        ids.push(
            resp.json::<Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let (_, third) = job(&h.url, "sk-a", &ids[2]).await;
    assert_eq!(third["status"], "queued");
    assert!(third["position"].as_u64().is_some(), "{third}");
    let cancelled: Value = http()
        .delete(format!("{}/penstock/v1/jobs/{}", h.url, ids[2]))
        .header("authorization", "Bearer sk-a")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(cancelled["status"], "cancelled");
    for id in &ids[..2] {
        assert_eq!(finished(&h.url, "sk-a", id).await["status"], "succeeded");
    }
    assert_eq!(
        finished(&h.url, "sk-a", &ids[2]).await["status"],
        "cancelled"
    );
    assert_eq!(h.fake.calls(), 2, "the cancelled job was never sent");
    let result = http()
        .get(format!("{}/penstock/v1/jobs/{}/result", h.url, ids[2]))
        .header("authorization", "Bearer sk-a")
        .send()
        .await
        .unwrap();
    assert_eq!(result.status(), 409);
}
