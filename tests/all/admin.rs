//! The admin listener's page, checked in a real browser (headless Chromium),
//! and what guards the listener: a bearer token for the page, `/status` and
//! `/metrics`, health and readiness open, nothing but reads.
//!
//! The browser test needs `chromium` (Debian's package; `.ci/run` installs
//! it). Where it is missing the test says so loudly and ends; with
//! `PENSTOCK_REQUIRE_BROWSER=1` (set by `.ci/run`) it fails instead.
//! `PENSTOCK_ADMIN_SCREENSHOT=docs/admin-page.png` also saves a screenshot.

use std::process::Command;
use std::time::Duration;

use futures_util::StreamExt;
use penstock::config::BudgetConfig;
use serde_json::json;

use crate::support::*;

const TOKEN: &str = "admin-secret-token";

fn chromium() -> Option<&'static str> {
    let found = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| {
            Command::new(b)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        });
    if found.is_none() {
        assert!(
            std::env::var("PENSTOCK_REQUIRE_BROWSER").as_deref() != Ok("1"),
            "chromium is not installed and PENSTOCK_REQUIRE_BROWSER=1"
        );
        eprintln!("\n\n*** SKIPPED: chromium is not installed (apt-get install chromium) ***\n");
    }
    found
}

/// Chromium's flags for a headless run that lets the page's script run
/// for a few (virtual) seconds, its console going to stderr.
fn headless(browser: &str, profile: &std::path::Path) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(browser);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        "--virtual-time-budget=4000",
        "--enable-logging=stderr",
        "--v=0",
    ])
    .arg(format!("--user-data-dir={}", profile.display()));
    cmd
}

fn image_budget() -> BudgetConfig {
    BudgetConfig {
        name: Some("images".into()),
        models: vec!["gpt-image-*".into()],
        rpm: None,
        tpm: None,
        ipm: Some(1),
        burst: Duration::from_secs(1),
        safety_margin: Duration::from_millis(50),
        max_in_flight: None,
        shared: false,
        upstream: None,
    }
}

async fn generate(url: &str, max_wait_ms: Option<&str>) -> reqwest::Response {
    let mut req = http()
        .post(format!("{url}/v1/images/generations"))
        .header("authorization", "Bearer sk-page")
        .header("cache-control", "no-store")
        .json(&json!({"model": "gpt-image-1", "prompt": "a lighthouse", "quality": "low", "size": "1024x1024"}));
    if let Some(ms) = max_wait_ms {
        req = req.header("x-penstock-max-wait-ms", ms);
    }
    req.send().await.unwrap()
}

/// The sum of every sample of a counter family.
fn total(metrics: &str, family: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{family}{{")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn the_page_shows_pools_counters_and_refusals_in_a_real_browser() {
    let Some(browser) = chromium() else {
        return;
    };
    let h = start_with(
        Behaviour::default(),
        |c| {
            c.admin.token_env = Some("PAGE_TOKEN".into());
            c.budgets = vec![image_budget()];
        },
        |var| (var == "PAGE_TOKEN").then(|| TOKEN.to_string()),
    )
    .await;
    // One image a minute: the first is made, the next one asked to wait at
    // most 100 ms is refused by penstock, and a third waits in the queue.
    assert_eq!(generate(&h.url, None).await.status(), 200);
    let refused = generate(&h.url, Some("100")).await;
    assert_eq!(refused.status(), 429);
    let chat = http()
        .post(format!("{}/v1/chat/completions", h.url))
        .header("authorization", "Bearer sk-page")
        .json(&json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(chat.status(), 200);
    let url = h.url.clone();
    let waiting = tokio::spawn(async move { generate(&url, None).await });
    let auth = format!("Bearer {TOKEN}");
    for i in 0.. {
        assert!(i < 1500, "the third request never queued");
        let s = json(
            http()
                .get(format!("{}/status", h.admin))
                .header("authorization", &auth)
                .send()
                .await
                .unwrap(),
        )
        .await;
        let queued = s["pools"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "images" && p["queue_depth"] == 1);
        if queued {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let profile = tempfile::tempdir().unwrap();
    let page = format!("{}/?token={TOKEN}", h.admin);
    let out = headless(browser, profile.path())
        .arg("--dump-dom")
        .arg(&page)
        .output()
        .await
        .expect("chromium runs");
    let dom = String::from_utf8_lossy(&out.stdout).to_string();
    let console = String::from_utf8_lossy(&out.stderr).to_string();
    let metrics = http()
        .get(format!("{}/metrics", h.admin))
        .header("authorization", &auth)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();

    // The script ran, read /status with the token and drew it, without errors.
    assert!(out.status.success(), "chromium: {console}");
    assert!(dom.contains(r#"data-script-errors="0""#), "{dom}");
    assert!(!dom.contains(r#"data-updates="0""#), "never updated: {dom}");
    let messages: Vec<&str> = console.lines().filter(|l| l.contains(":CONSOLE")).collect();
    assert!(messages.is_empty(), "console: {messages:?}");
    // Pools by name, the one waiting first.
    let images = dom.find(r#"data-pool="images""#).expect("images pool row");
    let chat = dom
        .find(r#"data-pool="learned:gpt-4o-mini""#)
        .unwrap_or_else(|| panic!("learned pool row: {dom}"));
    assert!(images < chat, "the busiest pool comes first");
    let row = &dom[images..chat];
    assert!(
        row.contains(r#"<td class="num">1</td>"#),
        "one waiting: {row}"
    );
    assert!(row.contains(r#"data-dim="images""#), "{row}");
    // Counters that match /metrics.
    let requests = total(&metrics, "penstock_requests_total");
    assert!(requests >= 3.0, "{metrics}");
    assert!(
        dom.contains(&format!(r#"id="total-requests">{requests}<"#)),
        "requests {requests} in {dom}"
    );
    let calls = total(&metrics, "penstock_upstream_attempts_total");
    assert!(
        dom.contains(&format!(r#"id="total-upstream-calls">{calls}<"#)),
        "upstream calls {calls} in {dom}"
    );
    assert!(dom.contains(r#"id="total-refused">1<"#), "{dom}");
    // The refusal, with its reason, and no secret anywhere.
    assert!(
        dom.contains(r#"data-code="penstock_wait_too_long""#),
        "{dom}"
    );
    assert!(!dom.contains("sk-page") && !dom.contains(TOKEN), "{dom}");

    // On a phone's screen the page fits its width (tables scroll in their box).
    for size in ["--window-size=1280,900", "--window-size=390,844"] {
        let out = headless(browser, profile.path())
            .arg(size)
            .arg("--dump-dom")
            .arg(&page)
            .output()
            .await
            .expect("chromium runs");
        let dom = String::from_utf8_lossy(&out.stdout);
        assert!(dom.contains(r#"data-overflow-x="false""#), "{size}: {dom}");
    }

    if let Ok(path) = std::env::var("PENSTOCK_ADMIN_SCREENSHOT") {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
        let out = headless(browser, profile.path())
            .arg(format!("--screenshot={}", path.display()))
            .arg("--window-size=1280,1500")
            .arg("--hide-scrollbars")
            .arg(&page)
            .output()
            .await
            .expect("chromium runs");
        assert!(out.status.success());
    }
    waiting.abort();
}

#[tokio::test]
async fn the_token_guards_the_page_status_and_metrics_but_not_health() {
    let h = start_with(
        Behaviour::default(),
        |c| c.admin.token_env = Some("PAGE_TOKEN".into()),
        |var| (var == "PAGE_TOKEN").then(|| TOKEN.to_string()),
    )
    .await;
    let get = |path: &str, auth: Option<&str>| {
        let mut req = http().get(format!("{}{path}", h.admin));
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        req.send()
    };
    for path in ["/", "/status", "/metrics"] {
        let resp = get(path, None).await.unwrap();
        assert_eq!(resp.status(), 401, "{path}");
        assert!(
            resp.headers()["www-authenticate"]
                .to_str()
                .unwrap()
                .starts_with("Bearer")
        );
        let wrong = get(path, Some("Bearer not-it")).await.unwrap();
        assert_eq!(wrong.status(), 401, "{path}");
        let right = get(path, Some(&format!("Bearer {TOKEN}"))).await.unwrap();
        assert_eq!(right.status(), 200, "{path}");
        let query = get(&format!("{path}?token={TOKEN}"), None).await.unwrap();
        assert_eq!(query.status(), 200, "{path}");
    }
    for path in ["/healthz", "/readyz"] {
        assert_eq!(get(path, None).await.unwrap().status(), 200, "{path}");
    }
    // Read-only.
    let post = http()
        .post(format!("{}/status", h.admin))
        .header("authorization", format!("Bearer {TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), 405);
    assert_eq!(post.headers()["allow"], "GET, HEAD");
}

#[tokio::test]
async fn a_token_variable_that_is_not_set_stops_startup() {
    let fake = Fake::start(Behaviour::default()).await;
    let mut config = config_for(&fake.url());
    config.admin.token_env = Some("PAGE_TOKEN".into());
    let err = penstock::start(&config, |_| None)
        .await
        .err()
        .expect("no token, no start");
    assert!(err.to_string().contains("admin.token_env"), "{err}");
    assert!(err.to_string().contains("PAGE_TOKEN"), "{err}");
}

#[tokio::test]
async fn the_page_is_self_contained_and_kept_to_itself() {
    let h = start(Behaviour::default()).await;
    let resp = http().get(format!("{}/", h.admin)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let headers = resp.headers().clone();
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let csp = headers["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"));
    assert_eq!(headers["x-frame-options"], "DENY");
    assert_eq!(headers["referrer-policy"], "no-referrer");
    let html = resp.text().await.unwrap();
    // Nothing is loaded from elsewhere: no external script, style, font or image.
    for needle in ["src=", "<link", "@import", "url("] {
        assert!(!html.contains(needle), "{needle}");
    }
    let outside: Vec<&str> = html
        .match_indices("http")
        .map(|(i, _)| &html[i..(i + 30).min(html.len())])
        .filter(|s| !s.starts_with("http://www.w3.org/2000/svg"))
        .collect();
    assert!(outside.is_empty(), "{outside:?}");
}

#[tokio::test]
async fn status_lists_the_pools_asked_for_busiest_first() {
    let h = start_with(
        Behaviour::default(),
        |c| {
            let mut second = image_budget();
            second.name = Some("text".into());
            second.models = vec!["gpt-4o*".into()];
            second.ipm = None;
            second.rpm = Some(600);
            c.budgets = vec![image_budget(), second];
        },
        |_| None,
    )
    .await;
    assert_eq!(generate(&h.url, None).await.status(), 200);
    let chat = http()
        .post(format!("{}/v1/chat/completions", h.url))
        .header("authorization", "Bearer sk-page")
        .json(&json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(chat.status(), 200);
    let names = |v: serde_json::Value| -> Vec<String> {
        v["pools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap().to_string())
            .collect()
    };
    let get = |q: &str| http().get(format!("{}/status{q}", h.admin)).send();
    assert_eq!(
        names(json(get("").await.unwrap()).await),
        ["images", "text"]
    );
    assert_eq!(
        names(json(get("?pools=IMA").await.unwrap()).await),
        ["images"]
    );
    assert_eq!(
        names(json(get("?limit=1&pools=t").await.unwrap()).await),
        ["text"]
    );
    let all = json(get("").await.unwrap()).await;
    assert_eq!(all["pools_total"], 2);
    // What the page charts: totals, intervals, refusals.
    assert_eq!(all["recent"]["totals"]["requests"], 2);
    assert_eq!(all["recent"]["totals"]["upstream_calls"], 2);
    assert!(!all["recent"]["history"].as_array().unwrap().is_empty());
    assert_eq!(all["recent"]["refusals"], json!([]));
    assert_eq!(all["breakers"], json!([]));
}

#[tokio::test]
async fn a_thousand_pools_are_drawn() {
    let Some(browser) = chromium() else {
        return;
    };
    let h = start(Behaviour::default()).await;
    // Pass-through: every key has its own learned pool.
    let (url, client) = (h.url.clone(), http());
    futures_util::stream::iter(0..1000)
        .for_each_concurrent(50, |i| {
            let (url, client) = (url.clone(), client.clone());
            async move {
                let resp = client
                    .post(format!("{url}/v1/embeddings"))
                    .header("authorization", format!("Bearer sk-many-{i}"))
                    .json(&json!({"model": "text-embedding-3-small", "input": "x"}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(resp.status(), 200);
            }
        })
        .await;
    assert_eq!(h.status().await["pools_total"], 1000);
    let profile = tempfile::tempdir().unwrap();
    let out = headless(browser, profile.path())
        .arg("--dump-dom")
        .arg(format!("{}/", h.admin))
        .output()
        .await
        .expect("chromium runs");
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(dom.contains(r#"data-script-errors="0""#));
    assert_eq!(dom.matches("data-pool=").count(), 1000);
    assert!(dom.contains("1000 shown of 1,000"), "{dom}");
}
