//! What the cache costs and saves, in one run:
//! 1. A cache hit vs a miss vs talking to the upstream directly (fake upstream
//!    without latency): throughput and p50/p99.
//! 2. Building the context (parse, estimate, cache key) of a 20 MiB multipart edit:
//!    time, and bytes allocated as a multiple of the body (the body may be copied
//!    at most once).
//!
//! `cargo bench --bench cache`

#[path = "common/mod.rs"]
mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use bytes::Bytes;
use fake_openai::{Behaviour, Fake};
use http_body_util::Full;

struct Counting;
static ALLOCATED: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator and only counts bytes allocated.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATED.fetch_add(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATED.fetch_add(new_size.saturating_sub(layout.size()), Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn image(i: usize) -> Bytes {
    Bytes::from(format!(
        r#"{{"model":"gpt-image-1","prompt":"prompt {i}","quality":"low","size":"1024x1024"}}"#
    ))
}

async fn hit_vs_miss() {
    let total = 10_000;
    let concurrency = 32;
    let fake = Fake::start(Behaviour {
        record_bodies: false,
        ..Behaviour::default()
    })
    .await;
    let p = penstock::start(&common::config_for(&fake.url()), |_| None)
        .await
        .unwrap();
    let direct_url = format!("{}/v1/images/generations", fake.url());
    let proxy_url = format!("http://{}/v1/images/generations", p.addr);
    // Warm up, and put prompt 0 in the cache.
    common::run_with(&direct_url, |i| image(1_000_000 + i), 1_000, concurrency).await;
    common::run_with(&proxy_url, |_| image(0), 1_000, concurrency).await;
    let calls = fake.calls();
    let hits = common::run_with(&proxy_url, |_| image(0), total, concurrency).await;
    let hit_calls = fake.calls() - calls;
    let misses = common::run_with(&proxy_url, |i| image(1 + i), total, concurrency).await;
    let direct = common::run_with(&direct_url, |i| image(2_000_000 + i), total, concurrency).await;
    assert_eq!(hits.failed + misses.failed + direct.failed, 0);
    assert_eq!(hit_calls, 0, "hits never reach the upstream");

    println!(
        "cache: {total} image requests each, {concurrency} concurrent, fake upstream without latency"
    );
    println!("{:<16} {:>10} {:>12} {:>12}", "path", "req/s", "p50", "p99");
    for (name, r) in [
        ("direct", &direct),
        ("penstock miss", &misses),
        ("penstock hit", &hits),
    ] {
        println!(
            "{:<16} {:>10.0} {:>12} {:>12}",
            name,
            r.throughput(),
            common::ms(r.percentile(0.5)),
            common::ms(r.percentile(0.99))
        );
    }
    println!(
        "hit / miss throughput: {:.2}; hit / direct: {:.2}; miss / direct: {:.2}",
        hits.throughput() / misses.throughput(),
        hits.throughput() / direct.throughput(),
        misses.throughput() / direct.throughput()
    );
}

async fn multipart_key() {
    const SIZE: usize = 20 * 1024 * 1024;
    let boundary = "----penstockBenchBoundary";
    let mut body = Vec::with_capacity(SIZE + 1024);
    for (name, value) in [
        ("model", "gpt-image-1"),
        ("prompt", "add a lighthouse"),
        ("quality", "high"),
    ] {
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
            )
            .as_bytes(),
        );
    }
    for (i, share) in [0.5f64, 0.5].iter().enumerate() {
        body.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"image[]\"; filename=\"{i}.png\"\r\nContent-Type: image/png\r\n\r\n").as_bytes());
        let n = (SIZE as f64 * share) as usize;
        body.extend((0..n).map(|j| (j * 31 + i) as u8));
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    let body = Bytes::from(body);
    let defaults = penstock::Config::default();
    let metrics = std::sync::Arc::new(penstock::telemetry::metrics::Metrics::new(&defaults.prices));
    let config = std::sync::Arc::new(penstock::edge::EdgeConfig::new(&defaults, metrics));
    let request = || {
        http::Request::post("/v1/images/edits")
            .header(
                "content-type",
                format!("multipart/form-data; boundary={boundary}"),
            )
            .header("authorization", "Bearer sk-bench")
            .body(Full::new(body.clone()))
            .unwrap()
    };
    // Once to warm the tokenizer, then measured.
    penstock::edge::prepare(request(), config.clone())
        .await
        .unwrap();
    let runs = 10;
    let mut best = f64::MAX;
    let mut allocated = 0;
    for _ in 0..runs {
        let before = ALLOCATED.load(Ordering::Relaxed);
        let t = Instant::now();
        let prepared = penstock::edge::prepare(request(), config.clone())
            .await
            .unwrap();
        best = best.min(t.elapsed().as_secs_f64());
        allocated = ALLOCATED.load(Ordering::Relaxed) - before;
        let ctx = prepared.body().ctx.clone().unwrap();
        assert!(ctx.cache_key.is_some());
    }
    println!(
        "20 MiB multipart edit: context with cache key in {:.1} ms (best of {runs}), {:.1} MiB allocated = {:.2} x the body",
        best * 1000.0,
        allocated as f64 / (1 << 20) as f64,
        allocated as f64 / body.len() as f64
    );
}

fn main() {
    common::block_on(async {
        hit_vs_miss().await;
        multipart_key().await;
    });
}
