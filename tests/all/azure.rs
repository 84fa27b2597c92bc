//! Azure OpenAI as an upstream: an OpenAI-shaped request is put to it as
//! Azure expects (the v1 API or a deployment path, `api-key`, the deployment
//! as `model`), an Azure-shaped one passes straight through, Azure's 429s
//! and content filter are understood, and the official Python SDK's
//! `AzureOpenAI` client works through penstock as it does directly.

use std::path::Path;
use std::time::Duration;

use fake_openai::Azure;
use penstock::config::{Config, UpstreamConfig, UpstreamKind, Upstreams};

use crate::support::{self, Behaviour, Fake, Limits, http};

fn env(k: &str) -> Option<String> {
    match k {
        "AZURE_KEY" => Some("az-secret".into()),
        "OPENAI_KEY" => Some("sk-openai".into()),
        _ => None,
    }
}

fn azure(url: &str, api_version: Option<&str>) -> UpstreamConfig {
    UpstreamConfig {
        name: Some("azure".into()),
        kind: UpstreamKind::Azure,
        base_url: url.into(),
        api_key_env: Some("AZURE_KEY".into()),
        deployments: [("gpt-image-1".to_string(), "img-east".to_string())].into(),
        api_version: api_version.map(str::to_string),
        ..UpstreamConfig::default()
    }
}

async fn fake_azure(behaviour: Behaviour) -> Fake {
    Fake::start(Behaviour {
        azure: Some(Azure {
            deployments: vec!["img-east".into(), "chat-east".into(), "gpt-4o-mini".into()],
            filtered_word: Some("forbidden".into()),
        }),
        record_bodies: true,
        ..behaviour
    })
    .await
}

async fn start(ups: Vec<UpstreamConfig>) -> (penstock::Running, String) {
    let mut c: Config = support::config_for(&ups[0].base_url);
    c.upstream = Upstreams::from_list(ups);
    c.validate("test").expect("valid config");
    let running = penstock::start(&c, env).await.expect("starts");
    let url = format!("http://{}", running.addr);
    (running, url)
}

const IMAGE: &str = r#"{"prompt":"a lighthouse","model":"gpt-image-1","size":"1024x1024","n":1}"#;

async fn post(url: &str, path: &str, body: &str) -> reqwest::Response {
    http()
        .post(format!("{url}{path}"))
        .header("content-type", "application/json")
        .header("authorization", "Bearer sk-client")
        .body(body.to_string())
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn an_openai_shaped_request_reaches_azures_v1_api_as_an_azure_client_sends_it() {
    let fake = fake_azure(Behaviour::default()).await;
    let (_running, url) = start(vec![azure(&fake.url(), None)]).await;
    let resp = post(&url, "/v1/images/generations", IMAGE).await;
    assert_eq!(resp.status(), 200);
    let got = &fake.requests()[0];
    assert_eq!(got.path, "/openai/v1/images/generations");
    assert_eq!(got.query, None);
    assert_eq!(got.headers["api-key"], "az-secret");
    assert!(
        got.headers.get("authorization").is_none(),
        "the client's key never goes"
    );
    // The body byte for byte, its model naming the deployment.
    assert_eq!(
        got.body,
        IMAGE.replace(r#""model":"gpt-image-1""#, r#""model":"img-east""#)
    );
}

#[tokio::test]
async fn with_an_api_version_requests_go_to_deployment_paths() {
    let fake = fake_azure(Behaviour::default()).await;
    let (_running, url) = start(vec![azure(&fake.url(), Some("2025-04-01-preview"))]).await;
    let resp = post(&url, "/v1/images/generations", IMAGE).await;
    assert_eq!(resp.status(), 200);
    let chat = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;
    let resp = post(&url, "/v1/chat/completions?x=1", chat).await;
    assert_eq!(resp.status(), 200);
    let got = fake.requests();
    assert_eq!(
        got[0].path,
        "/openai/deployments/img-east/images/generations"
    );
    assert_eq!(
        got[0].query.as_deref(),
        Some("api-version=2025-04-01-preview")
    );
    // A model without a deployment of its own name is its own deployment,
    // and the client's query goes on after api-version.
    assert_eq!(
        got[1].path,
        "/openai/deployments/gpt-4o-mini/chat/completions"
    );
    assert_eq!(
        got[1].query.as_deref(),
        Some("api-version=2025-04-01-preview&x=1")
    );
    assert_eq!(got[1].body, chat);
}

#[tokio::test]
async fn an_azure_shaped_request_passes_straight_through_with_penstocks_key() {
    let fake = fake_azure(Behaviour::default()).await;
    let (_running, url) = start(vec![azure(&fake.url(), None)]).await;
    let path = "/openai/deployments/img-east/images/generations?api-version=2024-10-21";
    let body = r#"{"prompt":"a lighthouse","size":"1024x1024"}"#;
    let resp = http()
        .post(format!("{url}{path}"))
        .header("content-type", "application/json")
        .header("api-key", "az-client-key")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let got = &fake.requests()[0];
    assert_eq!(got.path, "/openai/deployments/img-east/images/generations");
    assert_eq!(got.query.as_deref(), Some("api-version=2024-10-21"));
    assert_eq!(got.headers["api-key"], "az-secret");
    assert_eq!(got.body, body);
}

#[tokio::test]
async fn azures_content_filter_is_passed_on_once_and_never_retried() {
    let fake = fake_azure(Behaviour::default()).await;
    let (_running, url) = start(vec![azure(&fake.url(), None)]).await;
    let resp = post(
        &url,
        "/v1/images/generations",
        r#"{"prompt":"something forbidden","model":"gpt-image-1"}"#,
    )
    .await;
    assert_eq!(resp.status(), 400);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "content_filter");
    assert_eq!(fake.calls(), 1);
}

/// Azure at 5 requests a second per deployment, announcing what remains
/// and nothing else; a refusal in its own shape with retry-after-ms.
async fn azure_five_a_second() -> Fake {
    fake_azure(Behaviour {
        limits: Some(Limits {
            requests: 5,
            window: Duration::from_secs(1),
            ..Limits::default()
        }),
        record_bodies: false,
        ..Behaviour::default()
    })
    .await
}

/// 20 different image requests at once; each answer's status.
async fn twenty(url: &str) -> Vec<u16> {
    let mut tasks = Vec::new();
    for i in 0..20 {
        let url = url.to_string();
        tasks.push(tokio::spawn(async move {
            let body = IMAGE.replace("a lighthouse", &format!("a lighthouse {i}"));
            post(&url, "/v1/images/generations", &body)
                .await
                .status()
                .as_u16()
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test]
async fn a_budget_for_an_azure_deployment_keeps_every_call_from_a_429() {
    let fake = azure_five_a_second().await;
    let mut c: Config = support::config_for(&fake.url());
    c.upstream = Upstreams::from_list(vec![azure(&fake.url(), None)]);
    c.budgets = vec![penstock::config::BudgetConfig {
        models: vec!["gpt-image-*".into()],
        rpm: Some(300),
        burst: Duration::from_secs(1),
        upstream: Some("azure".into()),
        ..Default::default()
    }];
    c.validate("test").unwrap();
    let running = penstock::start(&c, env).await.unwrap();
    let statuses = twenty(&format!("http://{}", running.addr)).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(fake.answered(429), 0);
}

#[tokio::test]
async fn azures_429s_without_announced_limits_still_end_in_answers() {
    // No budget: Azure announces no limits, so the learned pool learns from
    // its refusals alone, pausing for each one's retry-after-ms.
    let fake = azure_five_a_second().await;
    let (_running, url) = start(vec![azure(&fake.url(), None)]).await;
    let statuses = twenty(&url).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let refused = fake.answered(429);
    assert!(
        refused > 0,
        "the fake refused nothing: the test shows nothing"
    );
    assert!(refused <= 40, "{refused} refusals for 20 requests");
    let r = fake.requests();
    let first = r.iter().find(|r| r.status == 429).unwrap();
    assert!(first.path.starts_with("/openai/v1/"));
}

#[tokio::test]
async fn an_openai_project_and_an_azure_deployment_share_one_model() {
    let openai = support::fake_taking(Duration::from_millis(30)).await;
    let az = fake_azure(Behaviour {
        latency: (Duration::from_millis(30), Duration::from_millis(30)),
        ..Behaviour::default()
    })
    .await;
    let first = UpstreamConfig {
        name: Some("openai".into()),
        base_url: openai.url(),
        api_key_env: Some("OPENAI_KEY".into()),
        ..UpstreamConfig::default()
    };
    let (_running, url) = start(vec![first, azure(&az.url(), None)]).await;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let body = IMAGE.replace("a lighthouse", &format!("a lighthouse {i}"));
            let resp = post(&url, "/v1/images/generations", &body).await;
            assert_eq!(resp.status(), 200);
            resp.headers()["x-penstock-upstream"]
                .to_str()
                .unwrap()
                .to_string()
        }));
    }
    let mut on_azure = 0;
    for t in tasks {
        on_azure += usize::from(t.await.unwrap() == "azure");
    }
    // Calls in flight spread them: both served.
    assert!(on_azure > 0 && on_azure < 20, "{on_azure} of 20 on azure");
    assert_eq!(az.calls(), on_azure);
    assert!(
        az.requests()
            .iter()
            .all(|r| r.headers["api-key"] == "az-secret")
    );
    assert!(
        openai
            .requests()
            .iter()
            .all(|r| r.headers["authorization"] == "Bearer sk-openai")
    );
}

/// The Python SDK, if installed (`PENSTOCK_REQUIRE_SDKS=1`: it must be).
fn python_sdk() -> bool {
    let found = std::process::Command::new("python3")
        .args(["-c", "import openai"])
        .status()
        .is_ok_and(|s| s.success());
    let required = std::env::var("PENSTOCK_REQUIRE_SDKS").is_ok_and(|v| v == "1");
    assert!(
        found || !required,
        "the Python OpenAI SDK is not installed and PENSTOCK_REQUIRE_SDKS=1"
    );
    if !found {
        eprintln!(
            "\n\n*** SKIPPED: the Python OpenAI SDK is not installed (pip install openai) ***\n"
        );
    }
    found
}

async fn run_azure_script(base: &str) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/azure.py");
    let out = tokio::process::Command::new("python3")
        .arg(script)
        .env("BASE", base)
        .env_remove("OPENAI_API_KEY")
        .env_remove("AZURE_OPENAI_API_KEY")
        .output()
        .await
        .expect("python runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_sdks_azure_client_sees_through_penstock_what_it_sees_directly() {
    if !python_sdk() {
        return;
    }
    let fake = fake_azure(Behaviour::default()).await;
    let (_running, url) = start(vec![azure(&fake.url(), None)]).await;
    let direct = run_azure_script(&fake.url()).await;
    let through = run_azure_script(&url).await;
    assert_eq!(through, direct);
    assert!(through.contains("image 1 True True"), "{through}");
    // What reached Azure through penstock: the SDK's own paths, penstock's key.
    let got = fake.requests();
    let half = got.len() / 2;
    for (d, t) in got[..half].iter().zip(&got[half..]) {
        assert_eq!((&t.path, &t.query), (&d.path, &d.query));
        assert_eq!(t.body, d.body);
        assert_eq!(t.headers["api-key"], "az-secret");
        assert!(t.headers.get("authorization").is_none());
    }
}

#[tokio::test]
async fn an_image_edit_names_the_deployment_in_its_form() {
    let fake = fake_azure(Behaviour::default()).await;
    let (_running, url) = start(vec![azure(&fake.url(), None)]).await;
    let body = support::multipart(
        "XyZ",
        &[("model", "gpt-image-1"), ("prompt", "add a boat")],
        &[("image", "harbour.png", b"PNGDATA")],
    );
    let resp = http()
        .post(format!("{url}/v1/images/edits"))
        .header("content-type", "multipart/form-data; boundary=XyZ")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let got = &fake.requests()[0];
    assert_eq!(got.path, "/openai/v1/images/edits");
    let expected =
        String::from_utf8_lossy(&body).replace("\r\n\r\ngpt-image-1\r\n", "\r\n\r\nimg-east\r\n");
    assert_eq!(String::from_utf8_lossy(&got.body), expected);
}
