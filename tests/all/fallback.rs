//! Fallback models, opt in: a request whose model cannot be had in time goes
//! with a configured fallback, says so (`x-penstock-model`), and never does
//! when it asks not to (`x-penstock-fallback: none`).

use std::time::Duration;

use penstock::config::{BudgetConfig, FallbackConfig, UpstreamConfig, Upstreams};

use crate::support::{self, Behaviour, Fake, http};

fn image(n: usize) -> serde_json::Value {
    serde_json::json!({"model": "gpt-image-1", "prompt": format!("a lighthouse {n}"), "size": "1024x1024"})
}

fn to_mini(after: Duration) -> FallbackConfig {
    FallbackConfig {
        models: vec!["gpt-image-1".into()],
        to: vec!["gpt-image-1-mini".into()],
        after,
    }
}

/// penstock before a recording fake: gpt-image-1 at `rpm` (over `burst`),
/// falling back to gpt-image-1-mini (unlimited) after `after`.
async fn limited_with_fallback(rpm: u64, burst: Duration, after: Duration) -> support::Harness {
    support::start_with(
        Behaviour {
            record_bodies: true,
            ..Behaviour::default()
        },
        |c| {
            c.budgets = vec![BudgetConfig {
                models: vec!["gpt-image-1".into()],
                rpm: Some(rpm),
                burst,
                ..BudgetConfig::default()
            }];
            c.fallbacks = vec![to_mini(after)];
        },
        |_| None,
    )
    .await
}

/// The models the fake was asked for, in order.
fn models(fake: &Fake) -> Vec<String> {
    fake.requests()
        .iter()
        .map(|r| {
            let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
            v["model"].as_str().unwrap().to_string()
        })
        .collect()
}

async fn send(url: &str, body: &serde_json::Value, no_fallback: bool) -> (u16, Option<String>) {
    let mut req = http()
        .post(format!("{url}/v1/images/generations"))
        .json(body);
    if no_fallback {
        req = req.header("x-penstock-fallback", "none");
    }
    let resp = req.send().await.unwrap();
    let model = resp
        .headers()
        .get("x-penstock-model")
        .map(|v| v.to_str().unwrap().to_string());
    (resp.status().as_u16(), model)
}

#[tokio::test]
async fn a_model_full_for_longer_than_after_falls_back_and_a_request_that_refuses_waits() {
    // One gpt-image-1 a second; gpt-image-1-mini unlimited.
    let h = limited_with_fallback(60, Duration::from_secs(1), Duration::from_millis(500)).await;
    let mut tasks = Vec::new();
    for i in 0..6 {
        let url = h.url.clone();
        tasks.push(tokio::spawn(
            async move { send(&url, &image(i), false).await },
        ));
    }
    let mut fell_back = 0;
    for t in tasks {
        let (status, model) = t.await.unwrap();
        assert_eq!(status, 200);
        if let Some(m) = model {
            assert_eq!(m, "gpt-image-1-mini");
            fell_back += 1;
        }
    }
    // One goes now, one more within the half second: the rest fall back.
    assert!((4..=5).contains(&fell_back), "{fell_back} fell back");
    let asked = models(&h.fake);
    assert_eq!(
        asked.iter().filter(|m| *m == "gpt-image-1-mini").count(),
        fell_back
    );
    // The pool is full again; this one refuses a fallback: it waits.
    h.fake.clear();
    let (status, model) = send(&h.url, &image(100), true).await;
    assert_eq!((status, model), (200, None));
    assert_eq!(models(&h.fake), ["gpt-image-1"]);
    // Its answer was the asked model's; a request allowing fallbacks for the
    // same prompt is a different entry, and the refusing one never gets a
    // fallback's cached answer.
    let (_, model) = send(&h.url, &image(3), true).await;
    assert_eq!(
        model, None,
        "a fallback's answer was handed to a request refusing it"
    );
    let metrics = h.metrics().await;
    assert!(
        metrics.contains(r#"penstock_images_total{model="gpt-image-1-mini"}"#),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("images"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[tokio::test]
async fn when_every_upstream_of_a_model_is_down_its_fallback_on_another_serves() {
    let down = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let b = Fake::start(Behaviour {
        record_bodies: true,
        ..Behaviour::default()
    })
    .await;
    let a = UpstreamConfig {
        name: Some("a".into()),
        base_url: down,
        api_key_env: Some("KEY_A".into()),
        models: vec!["gpt-image-1".into()],
        breaker_failures: 1,
        breaker_cooldown: Duration::from_secs(30),
        connect_timeout: Duration::from_secs(2),
        ..UpstreamConfig::default()
    };
    let mini = UpstreamConfig {
        name: Some("b".into()),
        base_url: b.url(),
        api_key_env: Some("KEY_B".into()),
        models: vec!["gpt-image-1-mini".into()],
        ..UpstreamConfig::default()
    };
    let mut c = support::config_for(&b.url());
    c.upstream = Upstreams::from_list(vec![a, mini]);
    c.fallbacks = vec![to_mini(Duration::from_secs(5))];
    c.validate("test").unwrap();
    let running = penstock::start(&c, |k| Some(format!("sk-{k}")))
        .await
        .unwrap();
    let url = format!("http://{}", running.addr);
    for i in 0..5 {
        let (status, model) = send(&url, &image(i), false).await;
        assert_eq!((status, model.as_deref()), (200, Some("gpt-image-1-mini")));
    }
    assert_eq!(models(&b), vec!["gpt-image-1-mini"; 5]);
    // Refusing a fallback, it gets the down upstream's answer.
    let (status, model) = send(&url, &image(9), true).await;
    assert_eq!((status, model), (503, None));
}

#[test]
fn a_fallback_names_models_not_globs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.toml");
    std::fs::write(
        &path,
        "[[fallback]]\nmodels = [\"gpt-image-1\"]\nto = [\"gpt-image-*\"]\n",
    )
    .unwrap();
    let err = penstock::Config::load(&path).unwrap_err().to_string();
    assert!(err.contains("fallback[0].to"), "{err}");
}

#[tokio::test]
async fn an_image_edit_falls_back_with_its_forms_model_rewritten() {
    let h = limited_with_fallback(1, Duration::from_secs(60), Duration::from_millis(200)).await;
    // The minute's one call.
    assert_eq!(send(&h.url, &image(0), false).await, (200, None));
    let body = support::multipart(
        "XyZ",
        &[("model", "gpt-image-1"), ("prompt", "add a boat")],
        &[("image", "harbour.png", b"PNGDATA")],
    );
    let resp = http()
        .post(format!("{}/v1/images/edits", h.url))
        .header("content-type", "multipart/form-data; boundary=XyZ")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-penstock-model"], "gpt-image-1-mini");
    let sent = &h.fake.requests()[1];
    let expected = String::from_utf8_lossy(&body)
        .replace("\r\n\r\ngpt-image-1\r\n", "\r\n\r\ngpt-image-1-mini\r\n");
    assert_eq!(String::from_utf8_lossy(&sent.body), expected);
}
