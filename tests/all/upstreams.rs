//! Several upstreams for one model: each request waits for whichever can
//! admit it soonest, a spent or refusing upstream is taken out (one probe per
//! cool-down), one that refuses connections costs no request, and objects
//! stay with the upstream that made them.

use std::time::Duration;

use penstock::config::{BudgetConfig, Config, UpstreamConfig, Upstreams};

use crate::support::{self, Behaviour, Fake, Limits, http};

/// An image request of its own (identical ones would be coalesced).
fn image() -> serde_json::Value {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    serde_json::json!({"model": "gpt-image-1", "prompt": format!("a lighthouse, {n}"), "size": "1024x1024"})
}

fn env(k: &str) -> Option<String> {
    match k {
        "KEY_A" => Some("sk-a".into()),
        "KEY_B" => Some("sk-b".into()),
        "KEY_C" => Some("sk-c".into()),
        _ => None,
    }
}

/// An upstream named `name` at `url`, with key `KEY_<NAME>`.
fn upstream(name: &str, url: &str) -> UpstreamConfig {
    UpstreamConfig {
        name: Some(name.into()),
        base_url: url.into(),
        api_key_env: Some(format!("KEY_{}", name.to_uppercase())),
        connect_timeout: Duration::from_secs(2),
        breaker_cooldown: Duration::from_millis(500),
        ..UpstreamConfig::default()
    }
}

fn config(ups: Vec<UpstreamConfig>) -> Config {
    let mut c = support::config_for(&ups[0].base_url);
    c.upstream = Upstreams::from_list(ups);
    c
}

/// `rpm` images a minute on every upstream, a second's share at once.
fn images_budget(rpm: u64) -> BudgetConfig {
    BudgetConfig {
        name: Some("images".into()),
        models: vec!["gpt-image-*".into()],
        rpm: Some(rpm),
        burst: Duration::from_secs(1),
        ..BudgetConfig::default()
    }
}

async fn start(config: &Config) -> (penstock::Running, String, String) {
    config.validate("test").expect("valid config");
    let running = penstock::start(config, env).await.expect("starts");
    let url = format!("http://{}", running.addr);
    let admin = format!("http://{}", running.admin_addr);
    (running, url, admin)
}

fn five_per_second() -> Behaviour {
    Behaviour {
        limits: Some(Limits {
            requests: 5,
            window: Duration::from_secs(1),
            ..Limits::default()
        }),
        latency: (Duration::from_millis(50), Duration::from_millis(100)),
        ..Behaviour::default()
    }
}

/// `n` image requests at once; each answer's status and upstream.
async fn burst(url: &str, n: usize) -> Vec<(u16, String)> {
    let mut tasks = Vec::new();
    for _ in 0..n {
        let url = format!("{url}/v1/images/generations");
        tasks.push(tokio::spawn(async move {
            let resp = http().post(url).json(&image()).send().await.unwrap();
            let up = resp
                .headers()
                .get("x-penstock-upstream")
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default();
            (resp.status().as_u16(), up)
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

fn keys_seen(fake: &Fake) -> Vec<String> {
    let mut keys: Vec<String> = fake
        .requests()
        .iter()
        .map(|r| r.headers["authorization"].to_str().unwrap().to_string())
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

#[tokio::test]
async fn fifty_generations_spread_over_two_upstreams_of_five_a_second_with_no_429() {
    let a = Fake::start(five_per_second()).await;
    let b = Fake::start(five_per_second()).await;
    let mut c = config(vec![upstream("a", &a.url()), upstream("b", &b.url())]);
    // The budget applies to each upstream on its own: 5 a second each.
    c.budgets = vec![images_budget(300)];
    let (_running, url, admin) = start(&c).await;
    let answers = burst(&url, 50).await;
    assert!(answers.iter().all(|(s, _)| *s == 200), "{answers:?}");
    let on_a = answers.iter().filter(|(_, u)| u == "a").count();
    let on_b = answers.iter().filter(|(_, u)| u == "b").count();
    assert_eq!(on_a + on_b, 50, "every answer names its upstream");
    // Each upstream took about half: neither waited while the other had room.
    assert!((20..=30).contains(&on_a), "a served {on_a}, b {on_b}");
    assert_eq!(a.calls(), on_a);
    assert_eq!(b.calls(), on_b);
    assert_eq!(
        a.answered(429) + b.answered(429),
        0,
        "no upstream refused a call"
    );
    // Each got its own key, never the other's.
    assert_eq!(keys_seen(&a), ["Bearer sk-a"]);
    assert_eq!(keys_seen(&b), ["Bearer sk-b"]);
    // /status: each upstream's pool and health.
    let status = support::status_at(&admin).await;
    let creds: Vec<&str> = status["pools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["credential"].as_str().unwrap())
        .collect();
    assert!(
        creds.contains(&"sidecar") && creds.contains(&"sidecar@b"),
        "{creds:?}"
    );
    let names: Vec<&str> = status["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a", "b"]);
    let metrics = support::metrics_at(&admin).await;
    let calls = |up: &str| {
        support::sample(
            &metrics,
            &format!(r#"penstock_upstream_calls_total{{upstream="{up}",outcome="success"}}"#),
        ) as usize
    };
    assert_eq!((calls("a"), calls("b")), (on_a, on_b));
}

/// A fake allowing `n` requests a second.
fn per_second(n: u32) -> Behaviour {
    Behaviour {
        limits: Some(Limits {
            requests: n,
            window: Duration::from_secs(1),
            ..Limits::default()
        }),
        latency: (Duration::from_millis(50), Duration::from_millis(100)),
        ..Behaviour::default()
    }
}

#[tokio::test]
async fn three_upstreams_of_different_limits_each_take_their_share_with_no_429() {
    let fakes = [
        Fake::start(per_second(2)).await,
        Fake::start(per_second(4)).await,
        Fake::start(per_second(6)).await,
    ];
    let names = ["a", "b", "c"];
    let mut c = config(
        names
            .iter()
            .zip(&fakes)
            .map(|(n, f)| upstream(n, &f.url()))
            .collect(),
    );
    // Each upstream's own limits, named.
    c.budgets = names
        .iter()
        .zip([120, 240, 360])
        .map(|(n, rpm)| BudgetConfig {
            name: Some(format!("images-{n}")),
            upstream: Some(n.to_string()),
            ..images_budget(rpm)
        })
        .collect();
    let (_running, url, _) = start(&c).await;
    let answers = burst(&url, 60).await;
    assert!(answers.iter().all(|(s, _)| *s == 200), "{answers:?}");
    let served: Vec<usize> = names
        .iter()
        .map(|n| answers.iter().filter(|(_, u)| u == n).count())
        .collect();
    // 12 a second in all: about 10, 20 and 30 of the 60.
    assert!(
        (6..=14).contains(&served[0])
            && (15..=25).contains(&served[1])
            && (24..=36).contains(&served[2]),
        "{served:?}"
    );
    for f in &fakes {
        assert_eq!(f.answered(429), 0);
    }
}

#[tokio::test]
async fn with_room_everywhere_calls_follow_the_weights() {
    let a = support::fake_taking(Duration::from_millis(200)).await;
    let b = support::fake_taking(Duration::from_millis(200)).await;
    let mut heavy = upstream("a", &a.url());
    heavy.weight = 3;
    let c = config(vec![heavy, upstream("b", &b.url())]);
    let (_running, url, _) = start(&c).await;
    let answers = burst(&url, 40).await;
    assert!(answers.iter().all(|(s, _)| *s == 200));
    // Forty at once, nothing limiting: three out at a for each at b.
    let on_a = answers.iter().filter(|(_, u)| u == "a").count();
    assert!((26..=34).contains(&on_a), "a took {on_a} of 40");
}

#[tokio::test]
async fn one_upstream_alone_serves_the_same_burst_in_twice_the_windows() {
    // The control for the test above: the same budget on one upstream
    // admits 5 a second, so 50 need ten windows (each request's queue time
    // says so), where two upstreams need five.
    let a = Fake::start(five_per_second()).await;
    let mut c = config(vec![upstream("a", &a.url())]);
    c.budgets = vec![images_budget(300)];
    let (_running, url, _) = start(&c).await;
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let url = format!("{url}/v1/images/generations");
        tasks.push(tokio::spawn(async move {
            let resp = http().post(url).json(&image()).send().await.unwrap();
            assert_eq!(resp.status(), 200);
            // One upstream: no header says which.
            assert!(resp.headers().get("x-penstock-upstream").is_none());
            resp.headers()["x-penstock-queue-ms"]
                .to_str()
                .unwrap()
                .parse::<u64>()
                .unwrap()
        }));
    }
    let mut longest = 0;
    for t in tasks {
        longest = longest.max(t.await.unwrap());
    }
    assert!(longest >= 8_000, "the last waited {longest} ms");
    assert_eq!(a.answered(429), 0);
}

/// One request alone: the first to find upstream `a` spent or refusing.
async fn one(url: &str) -> (u16, String) {
    burst(url, 1).await.pop().unwrap()
}

#[tokio::test]
async fn a_spent_upstream_gets_a_probe_per_cool_down_and_the_other_serves_everyone() {
    let spent = Fake::start(Behaviour {
        insufficient_quota: true,
        ..Behaviour::default()
    })
    .await;
    let b = support::fake_taking(Duration::from_millis(20)).await;
    let c = config(vec![upstream("a", &spent.url()), upstream("b", &b.url())]);
    let (_running, url, admin) = start(&c).await;
    // The first finds a's money gone and is served by b at once.
    assert_eq!(one(&url).await, (200, "b".to_string()));
    assert_eq!(spent.calls(), 1);
    let resp_attempts = spent.calls();
    for round in 0..3 {
        let answers = burst(&url, 10).await;
        assert!(
            answers.iter().all(|(s, u)| *s == 200 && u == "b"),
            "round {round}: {answers:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Then one probe per cool-down (0.5 s, then doubling) at most, in about
    // a second of traffic.
    let probes = spent.calls() - resp_attempts;
    assert!(probes <= 2, "the spent upstream got {probes} probes");
    assert_eq!(b.calls(), 31);
    let status = support::status_at(&admin).await;
    assert_eq!(status["upstreams"][0]["healthy"], false, "{status}");
    assert_eq!(status["upstreams"][1]["healthy"], true);
}

#[tokio::test]
async fn an_upstream_refusing_the_key_is_taken_out_and_its_requests_go_to_the_other() {
    let refusing = Fake::start(Behaviour {
        invalid_keys: vec!["Bearer sk-a".into()],
        ..Behaviour::default()
    })
    .await;
    let b = support::fake_taking(Duration::from_millis(20)).await;
    // A cool-down longer than the test: no probe comes in it.
    let mut a = upstream("a", &refusing.url());
    a.breaker_cooldown = Duration::from_secs(30);
    let c = config(vec![a, upstream("b", &b.url())]);
    let (_running, url, _) = start(&c).await;
    assert_eq!(one(&url).await, (200, "b".to_string()));
    assert_eq!(refusing.calls(), 1);
    let answers = burst(&url, 20).await;
    assert!(
        answers.iter().all(|(s, u)| *s == 200 && u == "b"),
        "{answers:?}"
    );
    assert_eq!(refusing.calls(), 1, "taken out after its refusal");
    assert_eq!(refusing.answered(401), 1);
}

#[tokio::test]
async fn an_upstream_refusing_connections_costs_no_request() {
    // A port nobody listens on.
    let down = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let b = support::fake_taking(Duration::from_millis(20)).await;
    let c = config(vec![upstream("a", &down), upstream("b", &b.url())]);
    let (_running, url, _) = start(&c).await;
    for _ in 0..3 {
        let answers = burst(&url, 10).await;
        assert!(
            answers.iter().all(|(s, u)| *s == 200 && u == "b"),
            "{answers:?}"
        );
    }
    assert_eq!(b.calls(), 30);
}

#[tokio::test]
async fn a_model_goes_only_to_upstreams_serving_it_and_objects_stay_with_the_first() {
    let a = support::fake_taking(Duration::from_millis(5)).await;
    let b = support::fake_taking(Duration::from_millis(5)).await;
    let mut only_images = upstream("b", &b.url());
    only_images.models = vec!["gpt-image-*".into()];
    let mut c = config(vec![upstream("a", &a.url()), only_images]);
    // a is full for images (one a minute): images go to b once it is spent.
    c.budgets = vec![BudgetConfig {
        upstream: Some("a".into()),
        ..images_budget(1)
    }];
    let (_running, url, _) = start(&c).await;
    let answers = burst(&url, 6).await;
    assert!(answers.iter().all(|(s, _)| *s == 200), "{answers:?}");
    assert!(
        answers.iter().filter(|(_, u)| u == "b").count() >= 5,
        "{answers:?}"
    );
    // A chat model b does not serve: a alone.
    for _ in 0..3 {
        let resp = http()
            .post(format!("{url}/v1/chat/completions"))
            .json(&serde_json::json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-penstock-upstream"], "a");
    }
    // A stored response, a file: objects of one organization, on the first.
    let resp = http()
        .post(format!("{url}/v1/responses"))
        .json(&serde_json::json!({"model": "gpt-4o-mini", "input": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-penstock-upstream"], "a");
    let resp = http().get(format!("{url}/v1/files")).send().await.unwrap();
    assert_eq!(resp.headers()["x-penstock-upstream"], "a");
    assert_eq!(b.calls_to("/v1/responses") + b.calls_to("/v1/files"), 0);
}

#[test]
fn several_upstreams_each_need_a_name_and_a_key_and_budgets_name_real_ones() {
    let err = |toml: &str| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        std::fs::write(&path, toml).unwrap();
        Config::load(&path)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    let two = "[[upstream]]\nname = \"a\"\napi_key_env = \"A\"\n[[upstream]]\nname = \"b\"\n";
    assert!(err(two).contains("upstream[1].api_key_env"), "{}", err(two));
    let same = "[[upstream]]\nname = \"a\"\napi_key_env = \"A\"\n[[upstream]]\nname = \"a\"\napi_key_env = \"B\"\n";
    assert!(err(same).contains("upstream[1].name"), "{}", err(same));
    let budget = "[[upstream]]\nname = \"a\"\napi_key_env = \"A\"\n[[budget]]\nmodels = [\"x\"]\nrpm = 1\nupstream = \"nope\"\n";
    assert!(
        err(budget).contains("budget[0].upstream"),
        "{}",
        err(budget)
    );
    let azure = "[[upstream]]\nname = \"az\"\nkind = \"azure\"\n";
    assert!(
        err(azure).contains("upstream.api_key_env"),
        "{}",
        err(azure)
    );
    // One [upstream] table is as before.
    assert_eq!(err("[upstream]\nbase_url = \"http://127.0.0.1:1\"\n"), "");
}

#[tokio::test]
async fn two_replicas_share_each_upstreams_budget_through_redis() {
    let Some(redis) = support::redis_server::RedisServer::start().await else {
        return;
    };
    let a = Fake::start(five_per_second()).await;
    let b = Fake::start(five_per_second()).await;
    let mut c = config(vec![upstream("a", &a.url()), upstream("b", &b.url())]);
    c.budgets = vec![BudgetConfig {
        // The tests share two cores: a call booked on time can reach its
        // fake late.
        safety_margin: Duration::from_millis(200),
        ..images_budget(300)
    }];
    c.state.backend = penstock::config::Backend::Redis;
    c.state.redis_url = redis.url();
    c.state.heartbeat = Duration::from_millis(200);
    let (_one, url_one, _) = start(&c).await;
    let (_two, url_two, _) = start(&c).await;
    let (x, y) = tokio::join!(burst(&url_one, 20), burst(&url_two, 20));
    let all: Vec<_> = x.into_iter().chain(y).collect();
    assert!(all.iter().all(|(s, _)| *s == 200), "{all:?}");
    let on_b = all.iter().filter(|(_, u)| u == "b").count();
    assert!((10..=30).contains(&on_b), "b served {on_b} of 40");
    // Two replicas, one ledger per upstream: neither fake refused a call.
    assert_eq!(a.answered(429) + b.answered(429), 0);
}
