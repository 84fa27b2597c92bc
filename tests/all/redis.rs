//! Several replicas, one OpenAI budget: penstocks sharing one real
//! `redis-server` (started by each test on a free port) spend one ledger, one
//! cache and one quota breaker, and fall back to a share of the limits when
//! Redis goes away.

use std::time::Duration;

use crate::support::redis_server::RedisServer;
use crate::support::*;
use penstock::Config;
use penstock::config::{Backend, BudgetConfig};
use serde_json::json;

/// Tests that count upstream 429s through a failure, and the one that moves
/// hundreds of megabytes, take turns: `cargo test` runs the tests on threads
/// of one process, and a starved one sends its calls late.
static TIMED: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn shared_config(upstream: &str, redis: &str) -> Config {
    let mut c = config_for(upstream);
    c.state.backend = Backend::Redis;
    c.state.redis_url = redis.to_string();
    c.state.heartbeat = Duration::from_millis(200);
    c.budgets = vec![BudgetConfig {
        models: vec!["gpt-image-*".into()],
        rpm: Some(600),
        // The tests share two cores: a thread can stall for tens of
        // milliseconds, and a call booked on time reach the fake late.
        safety_margin: Duration::from_millis(200),
        ..BudgetConfig::default()
    }];
    c
}

async fn replicas(n: usize, config: &Config) -> Vec<Replica> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(replica(config).await);
    }
    for r in &out {
        r.until_state(true, n).await;
    }
    out
}

async fn generate(url: &str, prompt: &str) -> reqwest::Response {
    http()
        .post(format!("{url}/v1/images/generations"))
        .header("authorization", "Bearer sk-test")
        .json(&json!({"model": "gpt-image-1", "prompt": prompt, "quality": "low", "size": "1024x1024"}))
        .send()
        .await
        .unwrap()
}

/// `n` generations with their own prompts, spread over the replicas in turn.
async fn spread(replicas: &[Replica], n: usize, tag: &str) -> Vec<u16> {
    let calls = (0..n).map(|i| {
        let url = replicas[i % replicas.len()].url.clone();
        let prompt = format!("{tag} {i}");
        async move { generate(&url, &prompt).await.status().as_u16() }
    });
    futures_util::future::join_all(calls).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_spend_one_budget_without_upstream_rate_limits() {
    let _turn = TIMED.lock().await;
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let fake = Fake::start(ten_per_second()).await;
    let mut config = shared_config(&fake.url(), &redis.url());
    config.retry.max_attempts = 1;
    let group = replicas(3, &config).await;
    let statuses = spread(&group, 90, "shared").await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert!(
        fake.answered(429) <= 2,
        "{} upstream 429s",
        fake.answered(429)
    );
    assert_eq!(fake.answered(200), 90);
    let status = group[0].status().await;
    assert_eq!(status["state"]["backend"], "redis");
    assert_eq!(
        status["state"]["live_replicas"].as_array().unwrap().len(),
        3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_memory_state_three_replicas_overrun_the_limit() {
    // What the shared ledger prevents: the same test with each replica on its
    // own ledger draws the upstream's 429s.
    let fake = Fake::start(ten_per_second()).await;
    let mut config = shared_config(&fake.url(), "redis://127.0.0.1:1");
    config.state.backend = Backend::Memory;
    config.retry.max_attempts = 1;
    let mut group = Vec::new();
    for _ in 0..3 {
        group.push(replica(&config).await);
    }
    let statuses = spread(&group, 90, "alone").await;
    assert!(
        statuses.iter().filter(|s| **s == 429).count() > 2,
        "{statuses:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_prompt_at_three_replicas_costs_one_call_and_a_second_wave_none() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let fake = fake_taking(Duration::from_millis(800)).await;
    let group = replicas(3, &shared_config(&fake.url(), &redis.url())).await;
    for wave in 0..2 {
        let calls = group.iter().map(|r| async move {
            let resp = generate(&r.url, "one lighthouse").await;
            let outcome = resp.headers()["x-penstock-cache"]
                .to_str()
                .unwrap()
                .to_string();
            (resp.status(), outcome, resp.bytes().await.unwrap())
        });
        let answers = futures_util::future::join_all(calls).await;
        assert!(answers.iter().all(|(s, _, _)| *s == 200), "{answers:?}");
        assert!(
            answers.iter().all(|(_, _, b)| *b == answers[0].2),
            "one answer for all"
        );
        let mut outcomes: Vec<_> = answers.iter().map(|(_, o, _)| o.as_str()).collect();
        outcomes.sort();
        if wave == 0 {
            assert_eq!(outcomes, ["coalesced", "coalesced", "miss"]);
        } else {
            assert_eq!(outcomes, ["hit", "hit", "hit"]);
        }
        assert_eq!(fake.calls(), 1, "wave {wave}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_seeing_the_quota_gone_stops_them_all() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let fake = Fake::start(Behaviour {
        insufficient_quota: true,
        ..Behaviour::default()
    })
    .await;
    let group = replicas(3, &shared_config(&fake.url(), &redis.url())).await;
    let first = generate(&group[0].url, "first").await;
    assert_eq!(first.status(), 429);
    assert_eq!(fake.calls(), 1);
    // The breaker is in Redis before the answer reaches the client only
    // shortly after: wait for it rather than race it.
    let mut conn = redis.conn().await;
    for _ in 0..200 {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("penstock:v1:pool:*:breaker")
            .query_async(&mut conn)
            .await
            .unwrap();
        if !keys.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for r in &group[1..] {
        for i in 0..5 {
            let resp = generate(&r.url, &format!("other {i}")).await;
            assert_eq!(resp.status(), 429);
            assert_eq!(resp.headers()["x-penstock-circuit"], "open");
            let body: serde_json::Value = resp.json().await.unwrap();
            assert_eq!(body["error"]["code"], "insufficient_quota", "{body}");
        }
    }
    assert_eq!(fake.calls(), 1, "no replica spent another call on it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_run_loses_no_request_and_the_shared_ledger_resumes() {
    let _turn = TIMED.lock().await;
    let Some(mut redis) = RedisServer::start().await else {
        return;
    };
    let fake = Fake::start(ten_per_second()).await;
    let group = replicas(3, &shared_config(&fake.url(), &redis.url())).await;
    // Generations spread over the replicas; Redis dies while they wait.
    let run = spread(&group, 60, "before");
    let kill = async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        redis.kill();
    };
    let (statuses, ()) = tokio::join!(run, kill);
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    // Each replica waited out one burst window, then kept a third of the
    // limit: the upstream refused (almost) nothing.
    let refused = fake.answered(429);
    assert!(refused <= 2, "{refused} upstream 429s while redis was away");
    for r in &group {
        r.until_state(false, 0).await;
        let metrics = http()
            .get(format!("{}/metrics", r.admin))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(sample(&metrics, "penstock_state_degraded"), 1.0);
        assert_eq!(r.status().await["state"]["fallback_share"], 3);
    }
    // Served on the local share while Redis is away.
    let statuses = spread(&group, 18, "alone").await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    redis.restart().await;
    for r in &group {
        r.until_state(true, 3).await;
    }
    let before = fake.answered(429);
    let statuses = spread(&group, 30, "after").await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert!(
        fake.answered(429) - before <= 2,
        "{} upstream 429s after rejoining",
        fake.answered(429) - before
    );
    // The ledger is in Redis again.
    let mut conn = redis.conn().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("penstock:v1:pool:*:minute")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    let booked: u64 = redis::cmd("ZCARD")
        .arg(&keys[0])
        .query_async(&mut conn)
        .await
        .unwrap();
    // Those of the last minute, and what was spent alone, told to it on
    // rejoining (the 18 served alone at least).
    assert!(booked >= 48, "{booked} calls in the shared minute");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_while_leading_a_shared_call_is_taken_over_after_its_lease() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let fake = fake_taking(Duration::from_secs(2)).await;
    let dir = tempfile::tempdir().unwrap();
    let path = config_file(&dir, &fake.url(), &redis.state_toml());
    // The leader: a real process, killed with SIGKILL.
    let (mut leader, leader_url) = spawn_penstock(&path).await;
    let mut config = shared_config(&fake.url(), &redis.url());
    config.budgets.clear();
    config.state.lease = Duration::from_secs(1);
    let follower = replica(&config).await;
    follower.until_state(true, 2).await;
    let led = tokio::spawn(async move { generate(&leader_url, "a dying leader").await });
    while fake.calls() < 1 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let followed = tokio::spawn({
        let url = follower.url.clone();
        async move { generate(&url, "a dying leader").await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(fake.calls(), 1, "the follower waits for the leader's call");
    leader.start_kill().unwrap();
    leader.wait().await.unwrap();
    assert!(
        led.await.unwrap_err().is_panic(),
        "the leader's client lost it"
    );
    let resp = followed.await.unwrap();
    assert_eq!(resp.status(), 200);
    // Its lease lapsed unrenewed: the follower made the call itself.
    assert_eq!(resp.headers()["x-penstock-cache"], "miss");
    assert_eq!(fake.calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_stops_answering_does_not_hang_requests() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let fake = Fake::start(Behaviour::default()).await;
    let group = replicas(2, &shared_config(&fake.url(), &redis.url())).await;
    assert_eq!(generate(&group[0].url, "warm").await.status(), 200);
    // The process stays, its socket open, and answers nothing.
    redis.freeze(true);
    let statuses = spread(&group, 10, "frozen").await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    for r in &group {
        r.until_state(false, 0).await;
    }
    redis.freeze(false);
    for r in &group {
        r.until_state(true, 2).await;
    }
    assert_eq!(fake.calls(), 11);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_turn_does_not_depend_on_the_replica_it_reached() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let fake = Fake::start(Behaviour::default()).await;
    let mut config = shared_config(&fake.url(), &redis.url());
    config.upstream.api_key_env = Some("KEY".into());
    // Twenty calls every two seconds: long windows, so the web client comes
    // well inside one.
    config.budgets[0].burst = Duration::from_secs(2);
    let mut group = Vec::new();
    for _ in 0..2 {
        config.validate("test").unwrap();
        let running = penstock::start(&config, |_| Some("sk-sidecar".into()))
            .await
            .unwrap();
        group.push(Replica {
            url: format!("http://{}", running.addr),
            admin: format!("http://{}", running.admin_addr),
            _running: running,
        });
    }
    for r in &group {
        r.until_state(true, 2).await;
    }
    let send = |url: String, client: &'static str, i: usize| async move {
        http()
            .post(format!("{url}/v1/images/generations"))
            .header("x-penstock-client", client)
            .json(&json!({"model": "gpt-image-1", "prompt": format!("{client} {i}"), "quality": "low", "size": "1024x1024"}))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    // A batch client floods both replicas; a web client reaches one of them.
    let batch: Vec<_> = (0..80)
        .map(|i| tokio::spawn(send(group[i % 2].url.clone(), "batch", i)))
        .collect();
    // Once most of the batch waits in the two queues (the first window's
    // twenty are gone).
    let mut waiting = 0;
    for _ in 0..500 {
        waiting = 0;
        for r in &group {
            waiting += r.status().await["pools"][0]["queue_depth"]
                .as_u64()
                .unwrap_or(0);
        }
        if waiting >= 45 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(waiting >= 45, "the batch never queued: {waiting} waiting");
    let web: Vec<_> = (0..24)
        .map(|i| tokio::spawn(send(group[1].url.clone(), "web", i)))
        .collect();
    for t in web {
        assert_eq!(t.await.unwrap(), 200);
    }
    for t in batch {
        t.abort();
    }
    // In the upstream's order, the 48 calls up to the web client's last: as
    // on one replica, it had every other turn (24, give or take the order of
    // calls sent at the same moment); each replica serving its own queue in
    // turn would give it one turn in four (12). Counted back from its last
    // call, as its first requests may still have been arriving one by one.
    let order: Vec<bool> = fake
        .requests()
        .iter()
        .map(|r| {
            let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
            v["prompt"].as_str().unwrap().starts_with("web")
        })
        .collect();
    let last = order.iter().rposition(|w| *w).unwrap();
    let turns = &order[(last + 1).saturating_sub(48)..=last];
    let web_turns = turns.iter().filter(|w| **w).count();
    assert!(
        web_turns >= 18,
        "web had {web_turns} of the {} turns up to its last: {turns:?}",
        turns.len()
    );
}

/// The law of the shared ledger: whatever several replicas book at once, at
/// any moment the calls inside a burst window (the window the upstream
/// enforces a minute's limit over) never sum above its capacity in any
/// dimension, refunds included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_bookings_never_exceed_a_limit_in_any_window() {
    use penstock::admission::ledger::Limits;
    use penstock::admission::shared::{Booking, Candidate};
    use penstock::vocab::cost::Cost;
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let config = penstock::config::StateConfig {
        backend: Backend::Redis,
        redis_url: redis.url(),
        ..Default::default()
    };
    let limits = Limits {
        // Two requests and 100 tokens per 100 ms window.
        per_minute: [Some(1200), Some(60_000), None],
        burst: Duration::from_millis(100),
        margin: Duration::ZERO,
        safety: 1.0,
    };
    let mut tasks = Vec::new();
    for replica in 0..4u64 {
        let config = config.clone();
        tasks.push(tokio::spawn(async move {
            let shared = penstock::state::Redis::start(&config).unwrap();
            while !shared.healthy() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let key = shared.pool_key("law", "cred");
            let mut rng = fastrand::Rng::with_seed(replica);
            let mut booked = Vec::new();
            while booked.len() < 12 {
                let cost = Cost {
                    requests: 1,
                    tokens: rng.u64(0..=100),
                    images: 0,
                };
                let client = format!("client-{}", rng.u8(0..3));
                let candidates = [Candidate {
                    client: &client,
                    weight: 1 + cost.tokens,
                    cost,
                    batch: false,
                }];
                let (booking, _) = shared
                    .book(&key, &candidates, &limits, Duration::from_millis(20))
                    .await
                    .expect("redis answers");
                match booking {
                    Booking::Booked { id, at, .. } => {
                        // Some calls turn out cheaper: a refund.
                        let actual = if rng.bool() {
                            Cost {
                                tokens: rng.u64(0..=cost.tokens),
                                ..cost
                            }
                        } else {
                            cost
                        };
                        if actual != cost {
                            shared.settle(&key, id, &actual).await.unwrap();
                        }
                        booked.push((at, actual));
                    }
                    Booking::Wait(wait) => {
                        tokio::time::sleep(wait.saturating_sub(Duration::from_millis(20))).await
                    }
                    Booking::Deferred => tokio::time::sleep(Duration::from_millis(5)).await,
                    Booking::Tripped(_) => unreachable!("no breaker here"),
                }
            }
            booked
        }));
    }
    let mut all: Vec<(u64, Cost)> = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort_by_key(|(at, _)| *at);
    assert_eq!(all.len(), 48);
    for (end, _) in &all {
        let inside = all.iter().filter(|(at, _)| at <= end && *at + 100 > *end);
        let (requests, tokens) =
            inside.fold((0, 0), |(r, t), (_, c)| (r + c.requests, t + c.tokens));
        assert!(
            requests <= 2,
            "{requests} requests in the window ending at {end}: {all:?}"
        );
        assert!(
            tokens <= 100,
            "{tokens} tokens in the window ending at {end}: {all:?}"
        );
    }
}

/// A started shared state on `redis`, once healthy.
async fn shared_state(redis: &RedisServer) -> std::sync::Arc<penstock::state::Redis> {
    let config = penstock::config::StateConfig {
        backend: Backend::Redis,
        redis_url: redis.url(),
        ..Default::default()
    };
    let shared = penstock::state::Redis::start(&config).unwrap();
    while !shared.healthy() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    shared
}

/// Every key under the pool's hash tag, with its time to live in ms.
async fn pool_ttls(redis: &RedisServer) -> Vec<(String, i64)> {
    let mut conn = redis.conn().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*pool:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut out = Vec::new();
    for k in keys {
        let ttl: i64 = redis::cmd("PTTL")
            .arg(&k)
            .query_async(&mut conn)
            .await
            .unwrap();
        out.push((k, ttl));
    }
    out.sort();
    out
}

fn one_call() -> penstock::vocab::cost::Cost {
    penstock::vocab::cost::Cost {
        requests: 1,
        tokens: 10,
        images: 0,
    }
}

/// One client's one call, as a replica proposes it for booking.
fn one_candidate() -> [penstock::admission::shared::Candidate<'static>; 1] {
    [penstock::admission::shared::Candidate {
        client: "c",
        weight: 1,
        cost: one_call(),
        batch: false,
    }]
}

fn limits_600() -> penstock::admission::ledger::Limits {
    penstock::admission::ledger::Limits {
        per_minute: [Some(600), Some(1_000_000), None],
        burst: Duration::from_secs(1),
        margin: Duration::from_millis(50),
        safety: 1.0,
    }
}

/// No key of a pool lives shorter than what refers to it: after every kind
/// of script (book, settle, observe, pause), the pool's keys share one time
/// to live. (The running sums in the state hash had outlived the windows
/// they sum, and a pool then looked full for ever.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pools_keys_are_kept_alive_together_by_every_script() {
    use penstock::admission::shared::Booking;
    use penstock::vocab::headers::{RateLimitHeaders, Remaining};
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let shared = shared_state(&redis).await;
    let key = shared.pool_key("ttl", "cred");
    let candidates = one_candidate();
    let limits = limits_600();
    let book = || shared.book(&key, &candidates, &limits, Duration::from_millis(200));
    let (Booking::Booked { id, at, .. }, _) = book().await.unwrap() else {
        panic!("an empty pool books at once");
    };
    let aligned = |ttls: Vec<(String, i64)>, after: &str| {
        let (lo, hi) = ttls.iter().fold((i64::MAX, i64::MIN), |(lo, hi), (_, t)| {
            (lo.min(*t), hi.max(*t))
        });
        assert!(ttls.len() >= 5, "{ttls:?}");
        assert!(lo > 0, "a key without an expiry after {after}: {ttls:?}");
        assert!(hi - lo < 2_000, "keys expire apart after {after}: {ttls:?}");
    };
    aligned(pool_ttls(&redis).await, "book");
    // Time passes; each later script refreshes all of them.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let headers = RateLimitHeaders {
        requests: Some(Remaining {
            remaining: 5,
            reset: Duration::from_secs(1),
        }),
        ..RateLimitHeaders::default()
    };
    shared
        .observe(&key, at, Duration::from_millis(50), &headers)
        .await
        .unwrap();
    aligned(pool_ttls(&redis).await, "observe");
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    shared.pause(&key, Duration::from_millis(10)).await.unwrap();
    aligned(pool_ttls(&redis).await, "pause");
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    shared
        .settle(&key, id, &penstock::vocab::cost::Cost::default())
        .await
        .unwrap();
    aligned(pool_ttls(&redis).await, "settle");
}

/// A booked call that left late counts from when it left, in both windows:
/// moved within the burst window, or back into it with its sums if it had
/// already left it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_booking_that_left_late_holds_the_shared_window_from_when_it_left() {
    use penstock::admission::shared::Booking;
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let shared = shared_state(&redis).await;
    let key = shared.pool_key("late", "cred");
    let candidates = one_candidate();
    // Two calls per burst window of 1.05 s (the margin included).
    let limits = penstock::admission::ledger::Limits {
        per_minute: [Some(120), None, None],
        ..limits_600()
    };
    let book = || shared.book(&key, &candidates, &limits, Duration::ZERO);
    let mut ids = Vec::new();
    for _ in 0..2 {
        let (Booking::Booked { id, wait, .. }, _) = book().await.unwrap() else {
            panic!("an empty pool books at once");
        };
        assert!(wait < Duration::from_millis(50));
        ids.push(id);
    }
    let until_free = || async {
        match book().await.unwrap().0 {
            Booking::Wait(wait) => wait,
            other => panic!("the window is full: {other:?}"),
        }
    };
    assert!(until_free().await <= Duration::from_millis(1050));
    // Both left 600 ms late: the window frees 600 ms later.
    for id in &ids {
        shared.redate(&key, *id, 600).await.unwrap();
    }
    let wait = until_free().await;
    assert!(wait > Duration::from_millis(1300), "{wait:?}");
    assert!(wait <= Duration::from_millis(1650), "{wait:?}");
    // Once both have left the burst window, one more is booked; then the
    // first is said to have left 1.5 s late (a host stalled that long): it
    // is back in the burst window, and the next call waits for it.
    tokio::time::sleep(wait).await;
    let (Booking::Booked { .. }, _) = book().await.unwrap() else {
        panic!("the window has room");
    };
    shared.redate(&key, ids[0], 1500).await.unwrap();
    let wait = until_free().await;
    assert!(wait > Duration::from_millis(300), "{wait:?}");
}

/// Running sums whose entries are gone (a window's keys lost) no longer hold
/// the pool: an empty window sums to nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sums_without_their_entries_do_not_stall_the_pool() {
    use penstock::admission::shared::Booking;
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let shared = shared_state(&redis).await;
    let key = shared.pool_key("heal", "cred");
    let candidates = one_candidate();
    let limits = penstock::admission::ledger::Limits {
        per_minute: [Some(60), None, None],
        ..limits_600()
    };
    let book = || shared.book(&key, &candidates, &limits, Duration::from_millis(200));
    assert!(matches!(book().await.unwrap().0, Booking::Booked { .. }));
    assert!(
        matches!(book().await.unwrap().0, Booking::Wait(_)),
        "one a second"
    );
    // The windows' sorted sets vanish (as an expiry set apart did), the
    // sums stay.
    let mut conn = redis.conn().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*pool:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    for k in keys
        .iter()
        .filter(|k| k.ends_with(":burst") || k.ends_with(":minute"))
    {
        let _: i64 = redis::cmd("DEL")
            .arg(k)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    // The bucket (one a second) has drained meanwhile.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert!(
        matches!(book().await.unwrap().0, Booking::Booked { .. }),
        "the pool admits again"
    );
}

/// A leader whose lease renewal fails once (Redis a moment away) keeps its
/// lease: a follower arriving after Redis is back waits for the leader's
/// answer rather than paying for a second call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_keeps_its_lease_through_a_moment_without_redis() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let fake = fake_taking(Duration::from_secs(6)).await;
    let mut config = shared_config(&fake.url(), &redis.url());
    config.budgets.clear();
    // Two seconds: a renewal delayed by a loaded machine still comes in time.
    config.state.lease = Duration::from_secs(2);
    let group = replicas(2, &config).await;
    let led = tokio::spawn({
        let url = group[0].url.clone();
        async move { generate(&url, "a leader through a hiccup").await }
    });
    while fake.calls() < 1 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Redis stops answering longer than a command may take (a renewal
    // fails), shorter than the lease.
    tokio::time::sleep(Duration::from_millis(200)).await;
    redis.freeze(true);
    tokio::time::sleep(Duration::from_millis(500)).await;
    redis.freeze(false);
    for r in &group {
        r.until_state(true, 2).await;
    }
    // Well past when an unrenewed lease would have lapsed.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let followed = generate(&group[1].url, "a leader through a hiccup").await;
    assert_eq!(followed.status(), 200);
    assert_eq!(followed.headers()["x-penstock-cache"], "coalesced");
    assert_eq!(led.await.unwrap().status(), 200);
    assert_eq!(fake.calls(), 1, "one call, paid once");
}

/// With Redis down at start and no `state.replicas`, a replica does not
/// spend a limit on a guess: budgeted requests are refused (503, retry
/// later) until Redis answers; a configured count gives the share at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_at_start_never_fails_open() {
    let Some(mut redis) = RedisServer::start().await else {
        return;
    };
    redis.kill();
    let fake = Fake::start(ten_per_second()).await;
    let config = shared_config(&fake.url(), &redis.url());
    let unknown = replica(&config).await;
    let resp = generate(&unknown.url, "on a guess").await;
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().contains_key("retry-after-ms"));
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(
        body["error"]["code"], "penstock_state_unavailable",
        "{body}"
    );
    assert_eq!(fake.calls(), 0);
    assert!(unknown.status().await["state"]["fallback_share"].is_null());
    // A model with no limit (a learned pool that has heard nothing) has
    // nothing to overrun.
    let chat = http()
        .post(format!("{}/v1/chat/completions", unknown.url))
        .json(&json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(chat.status(), 200);
    // Told how many replicas share the limits, it spends its share at once.
    let mut counted = config.clone();
    counted.state.replicas = Some(3);
    let known = replica(&counted).await;
    assert_eq!(generate(&known.url, "a third").await.status(), 200);
    assert_eq!(known.status().await["state"]["fallback_share"], 3);
    // Redis comes: the first replica shares the ledger.
    redis.restart().await;
    unknown.until_state(true, 1).await;
    assert_eq!(generate(&unknown.url, "shared now").await.status(), 200);
}

/// The fallback share follows replicas that leave as well as those that join.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fallback_share_follows_replicas_that_leave() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let fake = Fake::start(Behaviour::default()).await;
    let mut group = replicas(3, &shared_config(&fake.url(), &redis.url())).await;
    assert_eq!(group[0].status().await["state"]["fallback_share"], 3);
    group.truncate(2);
    for _ in 0..200 {
        if group[0].status().await["state"]["fallback_share"] == 2 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the share stayed at {}", group[0].status().await["state"]);
}

/// Redis as operators run it, with a memory limit and no eviction: the
/// shared cache keeps within `cache.max_size` across replicas (oldest out
/// first) and jobs within `jobs.max_bytes`, so three hundred distinct 1 MB
/// answers never fill Redis, budgets keep admitting, and jobs keep their
/// answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_limited_redis_keeps_sharing_budgets_and_jobs_under_a_stream_of_large_answers() {
    let _turn = TIMED.lock().await;
    let Some(redis) =
        RedisServer::start_with(&["--maxmemory", "64mb", "--maxmemory-policy", "noeviction"]).await
    else {
        return;
    };
    let fake = Fake::start(Behaviour {
        image_bytes: 1 << 20,
        limits: Some(Limits {
            requests: 100,
            window: Duration::from_secs(1),
            ..Limits::default()
        }),
        latency: (Duration::from_millis(20), Duration::from_millis(60)),
        record_bodies: false,
        ..Behaviour::default()
    })
    .await;
    let mut c = shared_config(&fake.url(), &redis.url());
    c.budgets[0].rpm = Some(6000);
    c.cache.max_size = bytesize::ByteSize::b(8 << 20);
    c.cache.max_entry_size = bytesize::ByteSize::b(4 << 20);
    c.jobs.max_bytes = bytesize::ByteSize::b(20 << 20);
    // Two replicas, the fake and the client share this test's process (and
    // its debug build) while 400 MB of answers pass: its timers run late.
    c.state.command_timeout = Duration::from_secs(2);
    let group = replicas(2, &c).await;
    let mut jobs = Vec::new();
    for batch in 0..12 {
        let statuses = spread(&group, 25, &format!("large {batch}")).await;
        assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
        let resp = http()
            .post(format!("{}/v1/images/generations", group[batch % 2].url))
            .header("authorization", "Bearer sk-test")
            .header("prefer", "respond-async")
            .json(&json!({"model": "gpt-image-1", "prompt": format!("job {batch}"), "quality": "low"}))
            .send()
            .await
            .unwrap();
        if resp.status() != 202 {
            let mut conn = redis.conn().await;
            let info: String = redis::cmd("INFO")
                .arg("memory")
                .query_async(&mut conn)
                .await
                .unwrap();
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg("*")
                .query_async(&mut conn)
                .await
                .unwrap();
            let mut sizes = Vec::new();
            for k in &keys {
                let n: Option<i64> = redis::cmd("MEMORY")
                    .arg("USAGE")
                    .arg(k)
                    .query_async(&mut conn)
                    .await
                    .unwrap_or(None);
                sizes.push((n, k.clone()));
            }
            sizes.sort();
            panic!("batch {batch}: {:?}\n{info}\n{sizes:?}", resp.text().await);
        }
        jobs.push(
            resp.json::<serde_json::Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    assert_eq!(fake.answered(429), 0, "budgets kept being shared");
    let mut conn = redis.conn().await;
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(&mut conn)
        .await
        .unwrap();
    let used: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(used < 64 << 20, "redis holds {used} bytes");
    let cached: Option<u64> = redis::cmd("GET")
        .arg("penstock:v1:{cache}:bytes")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(cached.unwrap_or(0) <= 8 << 20, "{cached:?} bytes cached");
    for r in &group {
        assert_eq!(r.status().await["state"]["healthy"], true);
    }
    for id in &jobs {
        let url = format!("{}/penstock/v1/jobs/{id}", group[0].url);
        let mut state = serde_json::Value::Null;
        for _ in 0..500 {
            state = http()
                .get(&url)
                .header("authorization", "Bearer sk-test")
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if state["status"] == "succeeded" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(state["status"], "succeeded", "{state}");
    }
}

/// Every key penstock writes expires, or is one of the few bounded by what
/// they hold (the job queue and its counts, live jobs): listed after a run
/// of budgets, the cache, shared calls, a learned pool, a pause and jobs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_key_expires_or_is_bounded() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let fake = Fake::start(Behaviour {
        latency: (Duration::from_millis(50), Duration::from_millis(100)),
        ..ten_per_second()
    })
    .await;
    let group = replicas(2, &shared_config(&fake.url(), &redis.url())).await;
    // Budgeted and cached, coalesced across replicas, and refused upstream.
    assert!(spread(&group, 30, "mix").await.iter().all(|s| *s == 200));
    assert!(spread(&group, 30, "mix").await.iter().all(|s| *s == 200));
    // A learned pool (no budget covers chat).
    let chat = http()
        .post(format!("{}/v1/chat/completions", group[0].url))
        .header("authorization", "Bearer sk-test")
        .json(&json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(chat.status(), 200);
    // A job, to its end.
    let resp = http()
        .post(format!("{}/v1/images/generations", group[1].url))
        .header("authorization", "Bearer sk-test")
        .header("prefer", "respond-async")
        .json(&json!({"model": "gpt-image-1", "prompt": "a job", "quality": "low"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let id = resp.json::<serde_json::Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    for _ in 0..500 {
        let v: serde_json::Value = http()
            .get(format!("{}/penstock/v1/jobs/{id}", group[0].url))
            .header("authorization", "Bearer sk-test")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if v["status"] == "succeeded" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut conn = redis.conn().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(keys.len() > 20, "{keys:?}");
    // Bounded by what they hold: the job queue, its counts and indexes.
    let bounded = [
        ":jobs:{jobs}:seq",
        ":jobs:{jobs}:counts",
        ":jobs:{jobs}:queue",
        ":jobs:{jobs}:running",
        ":jobs:{jobs}:holders",
        ":jobs:{jobs}:ended",
        ":jobs:{jobs}:bytes",
    ];
    let mut unbounded = Vec::new();
    for k in &keys {
        let ttl: i64 = redis::cmd("PTTL")
            .arg(k)
            .query_async(&mut conn)
            .await
            .unwrap();
        if ttl > 0 || bounded.iter().any(|b| k.ends_with(b)) {
            continue;
        }
        // A job's record lives while the job does (bounded by
        // jobs.max_total), then expires.
        if k.contains(":jobs:{jobs}:job:") {
            let state: Option<String> = redis::cmd("HGET")
                .arg(k)
                .arg("state")
                .query_async(&mut conn)
                .await
                .unwrap();
            if matches!(state.as_deref(), Some("queued" | "running")) {
                continue;
            }
        }
        unbounded.push(k.clone());
    }
    assert!(
        unbounded.is_empty(),
        "keys without an expiry: {unbounded:?}"
    );
}

/// Redis Cluster: three replicas on a three-node cluster (made with
/// `redis-cli --cluster create`) spend one budget, share the cache and a job
/// queue, each script on the node of its keys' hash tag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_on_a_redis_cluster_spend_one_budget() {
    let _turn = TIMED.lock().await;
    let Some(cluster) = crate::support::redis_server::RedisCluster::start().await else {
        return;
    };
    let fake = Fake::start(ten_per_second()).await;
    let mut config = shared_config(&fake.url(), "redis://127.0.0.1:1");
    config.state.cluster_nodes = cluster.urls();
    let group = replicas(3, &config).await;
    let statuses = spread(&group, 60, "cluster").await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(fake.answered(429), 0, "one budget for all three");
    // The shared cache: another replica's identical request is a hit.
    let hit = generate(&group[1].url, "cluster 0").await;
    assert_eq!(hit.headers()["x-penstock-cache"], "hit");
    // A job, submitted on one replica, done and read on another.
    let resp = http()
        .post(format!("{}/v1/images/generations", group[0].url))
        .header("authorization", "Bearer sk-test")
        .header("prefer", "respond-async")
        .json(&json!({"model": "gpt-image-1", "prompt": "a clustered job", "quality": "low"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let id = resp.json::<serde_json::Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut state = serde_json::Value::Null;
    for _ in 0..500 {
        state = http()
            .get(format!("{}/penstock/v1/jobs/{id}", group[2].url))
            .header("authorization", "Bearer sk-test")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if state["status"] == "succeeded" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(state["status"], "succeeded", "{state}");
    for r in &group {
        assert_eq!(r.status().await["state"]["healthy"], true);
    }
}

/// Redis Sentinel: the primary is found through the sentinels; killed under
/// load, penstock follows the replica the sentinels promote, spending its
/// fallback share while it switches, and loses no request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_primary_killed_under_load_is_followed_to_the_promoted_replica() {
    let _turn = TIMED.lock().await;
    let Some(mut sentinels) = crate::support::redis_server::RedisSentinels::start().await else {
        return;
    };
    let fake = Fake::start(ten_per_second()).await;
    let mut config = shared_config(&fake.url(), "redis://127.0.0.1:1");
    config.state.sentinels = sentinels.addrs();
    config.state.sentinel_master = Some("penstock".into());
    let group = replicas(3, &config).await;
    assert_eq!(generate(&group[0].url, "warm").await.status(), 200);
    let run = spread(&group, 80, "failover");
    let kill = async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        sentinels.primary.kill();
    };
    let (statuses, ()) = tokio::join!(run, kill);
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert!(
        fake.answered(429) <= 2,
        "{} upstream 429s through the failover",
        fake.answered(429)
    );
    // The sentinels promoted the replica, and every replica of penstock is
    // sharing through it.
    let mut promoted = None;
    for _ in 0..400 {
        promoted = sentinels.primary_port();
        if promoted == Some(sentinels.replica.port) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(promoted, Some(sentinels.replica.port));
    for r in &group {
        r.until_state(true, 3).await;
    }
    let before = fake.answered(429);
    let statuses = spread(&group, 30, "after").await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert!(fake.answered(429) - before <= 2);
    let mut conn = sentinels.replica.conn().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("penstock:v1:pool:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!keys.is_empty(), "the ledger lives on the promoted primary");
}

/// Each replica reloads its own file: `/status` shows every live replica's
/// config hash, so one whose file differs is visible from any of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_each_replicas_config_hash() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let fake = Fake::start(Behaviour::default()).await;
    let config = shared_config(&fake.url(), &redis.url());
    let reps = replicas(2, &config).await;
    let hashes = |s: &serde_json::Value| -> Vec<String> {
        s["state"]["config_hashes"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    let mut seen = Vec::new();
    for _ in 0..400 {
        seen = hashes(&reps[0].status().await);
        if seen.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(seen, [config.hash(), config.hash()]);

    let mut changed = config.clone();
    changed.budgets[0].rpm = Some(1200);
    let outcome = reps[1]._running.reload(changed.clone());
    assert_eq!(outcome.hash, changed.hash());
    for _ in 0..400 {
        let mut seen = hashes(&reps[0].status().await);
        seen.sort();
        let mut want = vec![config.hash(), changed.hash()];
        want.sort();
        if seen == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!(
        "the other replica's hash never showed: {}",
        reps[0].status().await
    );
}

/// Priority holds across replicas: batch requests waiting on one replica go
/// after an interactive request that came later to another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interactive_request_on_one_replica_goes_before_batch_on_another() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let _turn = TIMED.lock().await;
    let fake = Fake::start(Behaviour {
        record_bodies: true,
        ..Behaviour::default()
    })
    .await;
    let mut config = shared_config(&fake.url(), &redis.url());
    config.budgets[0].rpm = Some(60);
    config.budgets[0].ipm = Some(120);
    // Every key spends one pool: the budget is shared.
    config.budgets[0].shared = true;
    let reps = replicas(2, &config).await;
    // Batch requests ask for one image, the interactive one for two: by
    // fairness alone (cost-weighted) every batch request would go first.
    let send = |url: String, key: String, prompt: String, batch: bool| async move {
        let n = if batch { 1 } else { 2 };
        let mut req = http()
            .post(format!("{url}/v1/images/generations"))
            .header("authorization", format!("Bearer {key}"))
            .header("cache-control", "no-store")
            .json(&json!({"model": "gpt-image-1", "prompt": prompt, "n": n, "quality": "low", "size": "1024x1024"}));
        if batch {
            req = req.header("x-penstock-priority", "batch");
        }
        req.send().await.unwrap().status()
    };
    assert_eq!(
        send(reps[0].url.clone(), "sk-0".into(), "first".into(), false).await,
        200
    );
    let mut batch = Vec::new();
    for i in 1..=4 {
        batch.push(tokio::spawn(send(
            reps[0].url.clone(),
            format!("sk-{i}"),
            format!("batch {i}"),
            true,
        )));
    }
    for i in 0.. {
        assert!(i < 1500, "the batch requests never queued");
        let s = reps[0].status().await;
        let queued: u64 = s["pools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["queue_batch"].as_u64().unwrap_or(0))
            .sum();
        if queued == 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        send(
            reps[1].url.clone(),
            "sk-9".into(),
            "interactive".into(),
            false
        )
        .await,
        200
    );
    for b in batch {
        assert_eq!(b.await.unwrap(), 200);
    }
    let mut calls = fake.requests();
    calls.sort_by_key(|r| r.answered_at);
    let prompts: Vec<String> = calls
        .iter()
        .map(|r| {
            serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()["prompt"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(prompts[..2], ["first", "interactive"], "{prompts:?}");
}
