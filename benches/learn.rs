//! Zero-config penstock (no `[[budget]]`, learning on) against direct calls,
//! in one run:
//! 1. A quiet upstream that never refuses (no `x-ratelimit-*`, as OpenAI's
//!    images API answers), 1 s and 30 s a generation, 50 callers in a closed
//!    loop: throughput through penstock over direct. penstock must add no wait.
//! 2. 50 users at once, retrying as the official SDKs do, against an upstream
//!    taking 10 images a second: speaking as OpenAI's images API (nothing on a
//!    success, the image limit on a 429) and saying nothing at all. Success,
//!    upstream 429s, wall time against the ideal.
//!
//! `cargo bench --bench learn` (`ROUNDS_1S`, `ROUNDS_30S`: rounds of 50 calls)

#[path = "common/mod.rs"]
mod common;

use std::time::Duration;

use fake_openai::{Behaviour, Fake, Limits};

const IMAGE: &str =
    r#"{"model":"gpt-image-1","prompt":"a lighthouse","quality":"low","size":"1024x1024"}"#;

async fn never_limiting(latency: Duration, rounds: usize) {
    let quiet = || Behaviour {
        announce_limits: false,
        latency: (latency, latency),
        record_bodies: false,
        ..Behaviour::default()
    };
    let total = 50 * rounds;
    // Distinct prompts: nothing is coalesced or cached.
    let body =
        |i: usize| bytes::Bytes::from(IMAGE.replace("a lighthouse", &format!("lighthouse {i}")));
    let direct_fake = Fake::start(quiet()).await;
    let direct = common::run_with(
        &format!("{}/v1/images/generations", direct_fake.url()),
        body,
        total,
        50,
    )
    .await;
    let fake = Fake::start(quiet()).await;
    let p = penstock::start(&common::config_for(&fake.url()), |_| None)
        .await
        .unwrap();
    let proxied = common::run_with(
        &format!("http://{}/v1/images/generations", p.addr),
        body,
        total,
        50,
    )
    .await;
    println!(
        "{:>5.0} s a call, {total} calls, 50 callers: direct {:.2} calls/s ({} ok), penstock {:.2} calls/s ({} ok, most at once upstream {}): {:.3}x direct",
        latency.as_secs_f64(),
        direct.throughput(),
        direct.ok,
        proxied.throughput(),
        proxied.ok,
        fake.max_in_flight(),
        proxied.throughput() / direct.throughput(),
    );
}

async fn fifty_against_a_limit() {
    let limited = |announce: bool| Behaviour {
        limits: Some(Limits {
            requests: 10,
            images: Some(10),
            window: Duration::from_secs(1),
            ..Limits::default()
        }),
        announce_limits: announce,
        latency: (Duration::from_millis(200), Duration::from_millis(600)),
        record_bodies: false,
        ..Behaviour::default()
    };
    // 10 at once, then 10 more each second, ~0.4 s each.
    let ideal = Duration::from_millis(4400);
    println!(
        "\n50 users at once, upstream 10 images/s (sliding 1 s window), 0.2-0.6 s an image, SDK-style retries, no [[budget]]"
    );
    println!(
        "{:<34} {:>10} {:>13} {:>15} {:>9} {:>13}",
        "upstream, path", "succeeded", "upstream 429", "upstream calls", "wall", "wall / ideal"
    );
    for (shape, announce) in [
        ("images API (429 says -images)", true),
        ("quiet (says nothing)", false),
    ] {
        let direct_fake = Fake::start(limited(announce)).await;
        let direct = common::fifty_users(
            "gpt-image-1",
            &format!("{}/v1/images/generations", direct_fake.url()),
        )
        .await;
        let fake = Fake::start(limited(announce)).await;
        let p = penstock::start(&common::config_for(&fake.url()), |_| None)
            .await
            .unwrap();
        let proxied = common::fifty_users(
            "gpt-image-1",
            &format!("http://{}/v1/images/generations", p.addr),
        )
        .await;
        for (path, o, f) in [
            ("direct", &direct, &direct_fake),
            ("penstock", &proxied, &fake),
        ] {
            println!(
                "{:<34} {:>7}/50 {:>13} {:>15} {:>7.2} s {:>13.2}",
                format!("{shape}, {path}"),
                o.ok,
                f.answered(429),
                f.calls(),
                o.wall.as_secs_f64(),
                o.wall.as_secs_f64() / ideal.as_secs_f64()
            );
        }
    }
}

fn main() {
    common::block_on(async {
        never_limiting(Duration::from_secs(1), common::env("ROUNDS_1S", 10)).await;
        never_limiting(Duration::from_secs(30), common::env("ROUNDS_30S", 2)).await;
        fifty_against_a_limit().await;
    });
}
