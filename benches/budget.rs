//! The budget's two numbers, in one run:
//! 1. 50 users press "Generate" at once against a strict upstream (10 req/s in any
//!    second, 0.2-0.6 s per image): a client that retries like the official SDKs
//!    (2 retries, `retry-after-ms` when <= 60 s, else 0.5 s * 2^n), going direct vs
//!    through penstock. Success rate, upstream 429s, wall time vs ideal.
//! 2. Memory per queued request with 10,000 requests waiting for budget, counted by
//!    a counting allocator around the real stack (bodies excluded).
//!
//! `cargo bench --bench budget`

#[path = "common/mod.rs"]
mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fake_openai::{Behaviour, Fake, Limits};
use http_body_util::Full;
use penstock::config::BudgetConfig;
use tower::{Service, ServiceExt};

struct Counting;
static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator and only counts bytes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn budget(rpm: u64) -> BudgetConfig {
    BudgetConfig {
        name: None,
        models: vec!["gpt-image-*".into()],
        rpm: Some(rpm),
        tpm: None,
        ipm: None,
        burst: Duration::from_secs(1),
        safety_margin: Duration::from_millis(50),
        max_in_flight: None,
        shared: false,
        upstream: None,
    }
}

async fn scenario() {
    let strict = || Behaviour {
        limits: Some(Limits {
            requests: 10,
            tokens: None,
            window: Duration::from_secs(1),
            ..Limits::default()
        }),
        latency: (Duration::from_millis(200), Duration::from_millis(600)),
        record_bodies: false,
        ..Behaviour::default()
    };
    let direct_fake = Fake::start(strict()).await;
    let direct = common::fifty_users(
        "gpt-image-1-mini",
        &format!("{}/v1/images/generations", direct_fake.url()),
    )
    .await;

    let fake = Fake::start(strict()).await;
    let mut config = common::config_for(&fake.url());
    config.budgets = vec![budget(600)];
    let p = penstock::start(&config, |_| None).await.unwrap();
    let proxied = common::fifty_users(
        "gpt-image-1-mini",
        &format!("http://{}/v1/images/generations", p.addr),
    )
    .await;

    let ideal = Duration::from_millis(4400); // 10 now, 10 more each second, ~0.4 s each
    println!(
        "50 users, upstream 10 req/s (sliding 1 s window), 0.2-0.6 s per image, SDK-style retries"
    );
    println!(
        "{:<10} {:>10} {:>14} {:>16} {:>12} {:>14}",
        "path", "succeeded", "upstream 429", "upstream calls", "wall", "wall / ideal"
    );
    for (name, o, f) in [
        ("direct", &direct, &direct_fake),
        ("penstock", &proxied, &fake),
    ] {
        println!(
            "{:<10} {:>7}/50 {:>14} {:>16} {:>10.2} s {:>14.2}",
            name,
            o.ok,
            f.answered(429),
            f.calls(),
            o.wall.as_secs_f64(),
            o.wall.as_secs_f64() / ideal.as_secs_f64()
        );
    }
    drop(p);
}

async fn queued_memory() {
    const WAITING: usize = 10_000;
    let fake = Fake::start(Behaviour::default()).await;
    let mut config = common::config_for(&fake.url());
    config.budgets = vec![budget(10)];
    // At ten requests a minute, 10,000 requests need 17 hours: allow it (a day
    // is the most a wait may be), or penstock rightly refuses them as hopeless.
    config.queue.max_wait = Duration::from_secs(24 * 3600);
    config.retry.deadline = Duration::from_secs(24 * 3600);
    config.queue.max_depth = WAITING + 1;
    let (stack, shared) = penstock::stack::build::<Full<Bytes>>(&config, |_| None).unwrap();
    let body: &'static [u8] = br#"{"model":"gpt-image-1","prompt":"a lighthouse at dusk","quality":"low","size":"1024x1024"}"#;
    let request = || {
        http::Request::post("/v1/images/generations")
            .header("content-type", "application/json")
            .header("authorization", "Bearer sk-bench")
            .header("user-agent", "OpenAI/Python 3.0.0")
            // Identical requests would be coalesced: this measures the budget queue.
            .header("cache-control", "no-store")
            .body(Full::new(Bytes::from_static(body)))
            .unwrap()
    };
    // Spend the pool's burst so everything after it waits.
    let first = stack.clone().oneshot(request()).await.unwrap();
    assert_eq!(first.status(), 200);
    drop(first);
    let depth = || shared.budgets.status().first().map_or(0, |p| p.queue_depth);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = LIVE.load(Ordering::Relaxed);
    let mut tasks = Vec::with_capacity(WAITING);
    for _ in 0..WAITING {
        // As the server does: the edge is called at once, its future spawned.
        tasks.push(tokio::spawn(stack.clone().call(request())));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while depth() < WAITING {
        assert!(
            Instant::now() < deadline,
            "only {} of {WAITING} queued",
            depth()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let after = LIVE.load(Ordering::Relaxed);
    let task_handles = (WAITING * std::mem::size_of::<tokio::task::JoinHandle<()>>()) as isize;
    let per_request = (after - before - task_handles) as f64 / WAITING as f64;
    println!(
        "{WAITING} requests waiting for budget: {:.0} bytes each (bodies are static, not counted)",
        per_request
    );
    for t in tasks {
        t.abort();
    }
    while depth() > 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("after the clients left: queue depth {}", depth());
}

fn main() {
    common::block_on(async {
        scenario().await;
        queued_memory().await;
    });
}
