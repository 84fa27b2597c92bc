//! What penstock adds: the same closed-loop load against the fake upstream (no added
//! latency), directly and through penstock, in one run.
//! `cargo bench --bench overhead` (BENCH_REQUESTS, BENCH_CONCURRENCY to change the load)

#[path = "common/mod.rs"]
mod common;

use fake_openai::{Behaviour, Fake};

fn main() {
    // `cargo bench` passes --bench; nothing to parse.
    common::block_on(async {
        let total: usize = common::env("BENCH_REQUESTS", 20_000);
        let concurrency: usize = common::env("BENCH_CONCURRENCY", 32);
        let fake = Fake::start(Behaviour {
            record_bodies: false,
            ..Behaviour::default()
        })
        .await;
        let config = common::config_for(&fake.url());
        let p = penstock::start(&config, |_| None).await.unwrap();

        let direct_url = format!("{}/v1/chat/completions", fake.url());
        let proxy_url = format!("http://{}/v1/chat/completions", p.addr);
        // Warm both paths (connections, pools), then measure alternately.
        common::run(&direct_url, common::CHAT.as_bytes(), 2_000, concurrency).await;
        common::run(&proxy_url, common::CHAT.as_bytes(), 2_000, concurrency).await;
        fake.clear();
        let direct = common::run(&direct_url, common::CHAT.as_bytes(), total, concurrency).await;
        let proxied = common::run(&proxy_url, common::CHAT.as_bytes(), total, concurrency).await;
        assert_eq!(
            direct.failed + proxied.failed,
            0,
            "every request must succeed"
        );

        println!(
            "overhead: {total} requests, {concurrency} concurrent, POST /v1/chat/completions, fake upstream without latency"
        );
        println!("{:<10} {:>12} {:>12} {:>12}", "path", "req/s", "p50", "p99");
        for (name, r) in [("direct", &direct), ("penstock", &proxied)] {
            println!(
                "{:<10} {:>12.0} {:>12} {:>12}",
                name,
                r.throughput(),
                common::ms(r.percentile(0.5)),
                common::ms(r.percentile(0.99))
            );
        }
        let added = |p: f64| proxied.percentile(p).saturating_sub(direct.percentile(p));
        println!(
            "throughput ratio (penstock / direct): {:.2}",
            proxied.throughput() / direct.throughput()
        );
        println!(
            "added latency: p50 {}, p99 {}",
            common::ms(added(0.5)),
            common::ms(added(0.99))
        );
    });
}
