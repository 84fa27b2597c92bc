//! Several upstreams, in one run:
//! 1. The cost of routing: penstock with 1, 3 and 10 upstreams serving one
//!    model (fakes answering at once, no limits), 32 callers in a closed
//!    loop; requests a second and the time each adds over calling a fake
//!    directly. Flat means choosing among upstreams costs nothing that grows.
//! 2. The gain: 100 image generations at once against N upstreams of 5
//!    requests a second each (a `[[budget]]` of rpm = 300 that applies to each),
//!    0.2 s an image: wall time against the ideal (100 / 5N seconds), and
//!    upstream 429s (none is the promise).
//!
//! `cargo bench --bench upstreams` (`REQUESTS`: calls per routing run)

#[path = "common/mod.rs"]
mod common;

use std::time::Duration;

use fake_openai::{Behaviour, Fake, Limits};
use penstock::config::{BudgetConfig, UpstreamConfig, Upstreams};

const IMAGE: &str =
    r#"{"model":"gpt-image-1","prompt":"a lighthouse","quality":"low","size":"1024x1024"}"#;

fn body(i: usize) -> bytes::Bytes {
    bytes::Bytes::from(IMAGE.replace("a lighthouse", &format!("lighthouse {i}")))
}

/// A config with one upstream per fake, each with a key of its own.
fn config(fakes: &[Fake]) -> penstock::Config {
    let mut c = common::config_for(&fakes[0].url());
    c.upstream = Upstreams::from_list(
        fakes
            .iter()
            .enumerate()
            .map(|(i, f)| UpstreamConfig {
                name: Some(format!("u{i}")),
                base_url: f.url(),
                api_key_env: Some("KEY".into()),
                ..UpstreamConfig::default()
            })
            .collect(),
    );
    c
}

async fn routing_cost(requests: usize) {
    let quick = || Behaviour {
        record_bodies: false,
        ..Behaviour::default()
    };
    let direct_fake = Fake::start(quick()).await;
    let direct = common::run_with(
        &format!("{}/v1/images/generations", direct_fake.url()),
        body,
        requests,
        32,
    )
    .await;
    println!(
        "routing: {requests} image calls, 32 callers, upstreams answering at once; direct {:.0} calls/s",
        direct.throughput()
    );
    println!(
        "{:>10} {:>12} {:>14} {:>16}",
        "upstreams", "calls/s", "vs direct", "added per call"
    );
    for n in [1, 3, 10] {
        let mut fakes = Vec::new();
        for _ in 0..n {
            fakes.push(Fake::start(quick()).await);
        }
        let p = penstock::start(&config(&fakes), |_| Some("sk-bench".into()))
            .await
            .unwrap();
        let url = format!("http://{}/v1/images/generations", p.addr);
        // Warm: learned pools made, connections open.
        common::run_with(&url, body, 200, 32).await;
        let run = common::run_with(&url, move |i| body(i + 1_000_000), requests, 32).await;
        assert_eq!(run.failed, 0, "{n} upstreams: failures");
        let spread: Vec<usize> = fakes.iter().map(Fake::calls).collect();
        println!(
            "{n:>10} {:>12.0} {:>13.3}x {:>13.1} µs   (calls per upstream: {spread:?})",
            run.throughput(),
            run.throughput() / direct.throughput(),
            (run.percentile(0.5).as_secs_f64() - direct.percentile(0.5).as_secs_f64()) * 1e6,
        );
    }
}

async fn throughput_gain() {
    let limited = || Behaviour {
        limits: Some(Limits {
            requests: 5,
            window: Duration::from_secs(1),
            ..Limits::default()
        }),
        latency: (Duration::from_millis(200), Duration::from_millis(200)),
        record_bodies: false,
        ..Behaviour::default()
    };
    println!(
        "\n100 generations at once, upstreams of 5 requests/s each, 0.2 s an image, [[budget]] rpm = 300 per upstream"
    );
    println!(
        "{:>10} {:>10} {:>10} {:>10} {:>13} {:>14}",
        "upstreams", "succeeded", "wall", "ideal", "wall / ideal", "upstream 429"
    );
    let mut one = None;
    for n in [1usize, 2, 3] {
        let mut fakes = Vec::new();
        for _ in 0..n {
            fakes.push(Fake::start(limited()).await);
        }
        let mut c = config(&fakes);
        c.budgets = vec![BudgetConfig {
            models: vec!["gpt-image-*".into()],
            rpm: Some(300),
            burst: Duration::from_secs(1),
            ..BudgetConfig::default()
        }];
        c.queue.max_wait = Duration::from_secs(120);
        let p = penstock::start(&c, |_| Some("sk-bench".into()))
            .await
            .unwrap();
        let url = format!("http://{}/v1/images/generations", p.addr);
        let run = common::run_with(&url, move |i| body(i + 10_000 * n), 100, 100).await;
        // 5 at once per upstream, then 5 more each second (plus the margin).
        let ideal = Duration::from_secs_f64((100.0 / (5.0 * n as f64) - 1.0).max(0.0) + 0.2);
        let refused: usize = fakes.iter().map(|f| f.answered(429)).sum();
        let wall = run.wall.as_secs_f64();
        let gain = one.map_or(String::new(), |w: f64| {
            format!("   {:.2}x one upstream", w / wall)
        });
        one.get_or_insert(wall);
        println!(
            "{n:>10} {:>6}/100 {:>8.2} s {:>8.2} s {:>13.2} {:>14}{gain}",
            run.ok,
            wall,
            ideal.as_secs_f64(),
            wall / ideal.as_secs_f64(),
            refused,
        );
    }
}

fn main() {
    common::block_on(async {
        routing_cost(common::env("REQUESTS", 20_000)).await;
        throughput_gain().await;
    });
}
