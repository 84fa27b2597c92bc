//! Reloading the config while serving: budgets change in place (ledgers and
//! queues kept), a removed budget's waiters move on, client caps change, a bad
//! file changes nothing, and what cannot change live is named. The binary
//! reloads on SIGHUP and when its file changes.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::*;

/// A config file in `dir` for `fake`, with `more` (TOML) after it, loaded as
/// at start.
fn write(dir: &tempfile::TempDir, fake: &Fake, more: &str) -> std::path::PathBuf {
    config_file(
        dir,
        &fake.url(),
        &format!(
            "[server]\nthreads = 1\nshutdown_grace = \"2s\"\n[jobs]\nstore = \"memory\"\n{more}"
        ),
    )
}

async fn started(path: &std::path::Path) -> (penstock::Running, String, String) {
    let config = penstock::Config::load(path).expect("valid config");
    let running = penstock::start(&config, |_| None).await.unwrap();
    let url = format!("http://{}", running.addr);
    let admin = format!("http://{}", running.admin_addr);
    (running, url, admin)
}

fn budget(name: &str, rpm: u64) -> String {
    format!("[[budget]]\nname = \"{name}\"\nmodels = [\"gpt-image-*\"]\nrpm = {rpm}\n")
}

async fn generate(url: &str, key: &str) -> reqwest::Response {
    http()
        .post(format!("{url}/v1/images/generations"))
        .header("authorization", format!("Bearer {key}"))
        .header("cache-control", "no-store")
        .json(
            &json!({"model": "gpt-image-1", "prompt": "p", "quality": "low", "size": "1024x1024"}),
        )
        .send()
        .await
        .unwrap()
}

async fn status(admin: &str) -> Value {
    json(http().get(format!("{admin}/status")).send().await.unwrap()).await
}

/// The pool named `name` in `/status`.
fn pool<'a>(s: &'a Value, name: &str) -> Option<&'a Value> {
    s["pools"].as_array()?.iter().find(|p| p["name"] == name)
}

async fn until_queued(admin: &str, name: &str, n: u64) {
    for _ in 0..3000 {
        let s = status(admin).await;
        if pool(&s, name).is_some_and(|p| p["queue_depth"] == n) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{name} never had {n} waiting: {}", status(admin).await);
}

fn queue_ms(resp: &reqwest::Response) -> u64 {
    resp.headers()["x-penstock-queue-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn a_raised_budget_admits_what_waits_in_place() {
    let fake = Fake::start(Behaviour::default()).await;
    let dir = tempfile::tempdir().unwrap();
    // Two a minute: after the first call, the next may go in 30 s.
    let path = write(&dir, &fake, &budget("images", 2));
    let (running, url, admin) = started(&path).await;
    let hash_before = status(&admin).await["config"]["hash"].clone();
    assert_eq!(generate(&url, "sk-a").await.status(), 200);
    let waiting = tokio::spawn({
        let url = url.clone();
        async move { generate(&url, "sk-a").await }
    });
    until_queued(&admin, "images", 1).await;

    write(&dir, &fake, &budget("images", 600));
    let outcome = running.reload_file(&path);
    assert_eq!(outcome.result, "ok", "{outcome:?}");
    assert_eq!(outcome.applied, ["budget"]);
    assert!(outcome.restart_needed.is_empty(), "{outcome:?}");

    // It went well before the 30 s the old limit would have made it wait.
    let resp = waiting.await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(queue_ms(&resp) < 25_000, "waited {} ms", queue_ms(&resp));
    assert_eq!(fake.calls(), 2);
    // The same pool, with its ledger: both calls counted against the new limit.
    let s = status(&admin).await;
    let p = pool(&s, "images").unwrap();
    assert_eq!(p["remaining"]["requests"]["limit"], 600);
    assert_eq!(p["remaining"]["requests"]["minute_remaining"], 598);
    assert_eq!(s["reload"]["result"], "ok");
    assert_ne!(s["config"]["hash"], hash_before);
    assert_eq!(s["config"]["budgets"][0]["rpm"], 600);
    let metrics = metrics_at(&admin).await;
    assert_eq!(
        sample(&metrics, r#"penstock_config_reload_total{result="ok"}"#),
        1.0
    );
    running.shutdown().await;
}

#[tokio::test]
async fn a_lowered_budget_counts_what_it_already_admitted() {
    let fake = Fake::start(Behaviour::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, &fake, &budget("images", 600));
    let (running, url, admin) = started(&path).await;
    for _ in 0..5 {
        assert_eq!(generate(&url, "sk-a").await.status(), 200);
    }
    // Five a minute now: the minute holds five already.
    write(&dir, &fake, &budget("images", 5));
    assert_eq!(running.reload_file(&path).result, "ok");
    let resp = http()
        .post(format!("{url}/v1/images/generations"))
        .header("authorization", "Bearer sk-a")
        .header("cache-control", "no-store")
        .header("x-penstock-max-wait-ms", "1000")
        .json(
            &json!({"model": "gpt-image-1", "prompt": "p", "quality": "low", "size": "1024x1024"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    assert_eq!(json(resp).await["error"]["code"], "penstock_wait_too_long");
    assert_eq!(fake.calls(), 5);
    let s = status(&admin).await;
    assert_eq!(
        pool(&s, "images").unwrap()["remaining"]["requests"]["minute_remaining"],
        0
    );
    running.shutdown().await;
}

#[tokio::test]
async fn a_removed_budgets_waiters_move_to_the_pool_that_covers_their_model() {
    let fake = Fake::start(Behaviour::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, &fake, &budget("slow", 2));
    let (running, url, admin) = started(&path).await;
    assert_eq!(generate(&url, "sk-a").await.status(), 200);
    let waiting = tokio::spawn({
        let url = url.clone();
        async move { generate(&url, "sk-a").await }
    });
    until_queued(&admin, "slow", 1).await;

    write(&dir, &fake, &budget("fast", 600));
    let outcome = running.reload_file(&path);
    assert_eq!(outcome.removed_budgets, ["slow"]);
    let resp = waiting.await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(queue_ms(&resp) < 25_000, "waited {} ms", queue_ms(&resp));
    let s = status(&admin).await;
    assert!(pool(&s, "slow").is_none());
    assert_eq!(
        pool(&s, "fast").unwrap()["remaining"]["requests"]["minute_remaining"],
        599
    );
    running.shutdown().await;
}

#[tokio::test]
async fn a_bad_file_changes_nothing_and_says_which_key() {
    let fake = Fake::start(Behaviour::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, &fake, &budget("images", 600));
    let (running, url, admin) = started(&path).await;
    assert_eq!(generate(&url, "sk-a").await.status(), 200);
    let before = status(&admin).await["config"].clone();

    write(
        &dir,
        &fake,
        "[[budget]]\nname = \"images\"\nmodels = [\"gpt-image-*\"]\nrpm = \"many\"\n",
    );
    let outcome = running.reload_file(&path);
    assert_eq!(outcome.result, "error");
    assert!(
        outcome.error.as_deref().unwrap().contains("rpm"),
        "{outcome:?}"
    );
    // A second try of the same bad file: the same answer.
    assert_eq!(running.reload_file(&path).result, "error");
    let s = status(&admin).await;
    assert_eq!(s["config"], before, "nothing changed");
    assert_eq!(s["reload"]["result"], "error");
    assert!(s["reload"]["error"].as_str().unwrap().contains("rpm"));
    assert_eq!(generate(&url, "sk-a").await.status(), 200);
    let metrics = metrics_at(&admin).await;
    assert_eq!(
        sample(&metrics, r#"penstock_config_reload_total{result="error"}"#),
        2.0
    );
    running.shutdown().await;
}

#[tokio::test]
async fn keys_that_cannot_change_live_are_named_and_wait_for_the_next_start() {
    let fake = Fake::start(Behaviour::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, &fake, "[queue]\nmax_wait = \"60s\"\n");
    let (running, url, admin) = started(&path).await;
    std::fs::write(
        &path,
        format!(
            "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[upstream]\nbase_url = \"{}\"\n\
             [server]\nthreads = 1\nshutdown_grace = \"2s\"\nmax_body_size = \"1KiB\"\n[jobs]\nstore = \"memory\"\n\
             [queue]\nmax_wait = \"30s\"\n",
            fake.url()
        ),
    )
    .unwrap();
    let outcome = running.reload_file(&path);
    assert_eq!(outcome.result, "ok");
    assert_eq!(outcome.applied, ["queue.max_wait"]);
    assert_eq!(outcome.restart_needed, ["server.max_body_size"]);
    // Still the old body limit.
    let big = json!({"model": "gpt-image-1", "prompt": "x".repeat(4096)});
    let resp = http()
        .post(format!("{url}/v1/images/generations"))
        .header("authorization", "Bearer sk-a")
        .json(&big)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let s = status(&admin).await;
    assert_eq!(s["config"]["queue"]["max_wait_ms"], 30_000);
    assert_eq!(
        s["reload"]["restart_needed"],
        json!(["server.max_body_size"])
    );
    running.shutdown().await;
}

#[tokio::test]
async fn client_caps_change_live() {
    let fake = Fake::start(Behaviour::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let id = penstock::edge::key_id_of(b"Bearer sk-capped");
    let cap = |rpm: u64| format!("[[client]]\nid = \"{id}\"\nrpm = {rpm}\nburst = 1\n");
    let path = write(&dir, &fake, &cap(1));
    let (running, url, _admin) = started(&path).await;
    assert_eq!(generate(&url, "sk-capped").await.status(), 200);
    let over = generate(&url, "sk-capped").await;
    assert_eq!(over.status(), 429);
    assert_eq!(
        json(over).await["error"]["code"],
        "penstock_client_rate_limited"
    );

    write(&dir, &fake, &cap(6000));
    assert_eq!(running.reload_file(&path).applied, ["client"]);
    assert_eq!(generate(&url, "sk-capped").await.status(), 200);

    // Unchanged caps keep what was spent of them.
    write(
        &dir,
        &fake,
        &format!("{}[queue]\nmax_wait = \"59s\"\n", cap(1)),
    );
    assert_eq!(running.reload_file(&path).result, "ok");
    assert_eq!(generate(&url, "sk-capped").await.status(), 200);
    write(
        &dir,
        &fake,
        &format!("{}[queue]\nmax_wait = \"58s\"\n", cap(1)),
    );
    running.reload_file(&path);
    assert_eq!(generate(&url, "sk-capped").await.status(), 429);
    running.shutdown().await;
}

#[tokio::test]
async fn the_binary_reloads_when_its_file_changes_and_on_sighup() {
    let fake = Fake::start(Behaviour::default()).await;
    // The config penstock is given is a link to a file elsewhere: replacing
    // the link is a change penstock sees; writing the file it points to is
    // not (another directory), and waits for a SIGHUP.
    let (dir, elsewhere) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let target = |rpm: u64| {
        let src = write(&elsewhere, &fake, &budget("images", rpm));
        let named = elsewhere.path().join(format!("{rpm}.toml"));
        std::fs::rename(src, &named).unwrap();
        named
    };
    let path = dir.path().join("penstock.toml");
    std::os::unix::fs::symlink(target(60), &path).unwrap();
    let (mut child, _url, admin) = spawn_penstock_admin(&path).await;
    let rpm = |s: &Value| s["config"]["budgets"][0]["rpm"].clone();
    assert_eq!(rpm(&status(&admin).await), 60);

    // Replaced as an editor saves: a new file renamed over the old one.
    let link = dir.path().join("new-link");
    std::os::unix::fs::symlink(target(120), &link).unwrap();
    std::fs::rename(&link, &path).unwrap();
    for i in 0.. {
        if rpm(&status(&admin).await) == 120 {
            break;
        }
        assert!(i < 1500, "the file's change was never applied");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Written where penstock does not look: only SIGHUP reads it again.
    let hup = || async {
        let pid = child.id().unwrap().to_string();
        let sent = tokio::process::Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .await
            .unwrap();
        assert!(sent.success());
    };
    std::fs::write(elsewhere.path().join("120.toml"), "listen = [\n").unwrap();
    hup().await;
    for i in 0.. {
        assert!(i < 1500, "the SIGHUP was never heard");
        let s = status(&admin).await;
        if s["reload"]["result"] == "error" {
            assert_eq!(rpm(&s), 120, "a bad file changes nothing");
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let good = write(&elsewhere, &fake, &budget("images", 240));
    std::fs::rename(good, elsewhere.path().join("120.toml")).unwrap();
    hup().await;
    for i in 0.. {
        assert!(i < 1500, "the SIGHUP was never heard");
        let s = status(&admin).await;
        if rpm(&s) == 240 {
            assert_eq!(s["reload"]["result"], "ok");
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().await.unwrap();
}
