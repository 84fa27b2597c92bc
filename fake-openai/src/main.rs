//! Run the fake OpenAI by hand to rehearse a penstock config without spending money:
//! `cargo run -p fake-openai -- --listen 127.0.0.1:8081 --rps 10 --latency-ms 200-600`
use std::time::Duration;

use clap::Parser;
use fake_openai::{Behaviour, Fake, Limits};

#[derive(Parser)]
#[command(about = "A fake OpenAI API for rehearsing penstock configs")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8081")]
    listen: std::net::SocketAddr,
    /// Requests allowed per organization/project and model in any window (see --window-ms).
    #[arg(long)]
    rps: Option<u32>,
    /// Tokens allowed per organization/project and model in any window.
    #[arg(long)]
    tokens: Option<u64>,
    /// Images allowed per window, per organization/project and model.
    #[arg(long)]
    ipm: Option<u64>,
    /// Length of the rate-limit window in milliseconds.
    #[arg(long, default_value_t = 1000)]
    window_ms: u64,
    /// Latency of each call in milliseconds, as MIN-MAX or a single number.
    #[arg(long, default_value = "0")]
    latency_ms: String,
    /// Fraction of calls that fail with 500/502/503.
    #[arg(long, default_value_t = 0.0)]
    fail_rate: f64,
    /// Fraction of calls whose connection is reset.
    #[arg(long, default_value_t = 0.0)]
    reset_rate: f64,
    /// Answer every call with 429 insufficient_quota.
    #[arg(long)]
    insufficient_quota: bool,
    /// Send no x-ratelimit-* headers at all, not even on refusals (penstock
    /// then learns from 429s and their retry-after alone).
    #[arg(long)]
    no_rate_limit_headers: bool,
    /// Image answers announce x-ratelimit-* as text answers do (OpenAI's do
    /// not: by default a successful image answer carries none).
    #[arg(long)]
    image_answer_limits: bool,
    /// Image 429s carry no x-ratelimit-*-images headers (OpenAI's do).
    #[arg(long)]
    no_image_refusal_limits: bool,
    /// Never compress answers, whatever the client accepts.
    #[arg(long)]
    no_compression: bool,
    /// Close a keep-alive connection idle this many seconds, as the load
    /// balancers in front of OpenAI do (0: never).
    #[arg(long, default_value_t = 60)]
    idle_close_s: u64,
    /// Act as an Azure OpenAI resource: /openai/v1/... and
    /// /openai/deployments/{d}/...?api-version=, an api-key header, limits
    /// per deployment, remaining-only headers, Azure-shaped 429s.
    #[arg(long)]
    azure: bool,
    /// With --azure: a prompt containing this word is refused by the
    /// content filter (400 content_filter).
    #[arg(long)]
    azure_filtered_word: Option<String>,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let (lo, hi) = match args.latency_ms.split_once('-') {
        Some((a, b)) => (a.parse().unwrap_or(0), b.parse().unwrap_or(0)),
        None => {
            let x = args.latency_ms.parse().unwrap_or(0);
            (x, x)
        }
    };
    let behaviour = Behaviour {
        latency: (Duration::from_millis(lo), Duration::from_millis(hi.max(lo))),
        fail_rate: args.fail_rate,
        reset_rate: args.reset_rate,
        insufficient_quota: args.insufficient_quota,
        announce_limits: !args.no_rate_limit_headers,
        image_answer_limits: args.image_answer_limits,
        image_refusal_limits: !args.no_image_refusal_limits,
        compress: !args.no_compression,
        idle_close: (args.idle_close_s > 0).then(|| Duration::from_secs(args.idle_close_s)),
        limits: args.rps.map(|requests| Limits {
            requests,
            tokens: args.tokens,
            images: args.ipm,
            window: Duration::from_millis(args.window_ms),
            ..Limits::default()
        }),
        record_bodies: false,
        azure: args.azure.then(|| fake_openai::Azure {
            deployments: Vec::new(),
            filtered_word: args.azure_filtered_word.clone(),
        }),
        ..Behaviour::default()
    };
    let fake = match Fake::serve(args.listen, behaviour, None).await {
        Ok(f) => f,
        Err(e) => {
            eprintln!("fake-openai: cannot listen on {}: {e}", args.listen);
            std::process::exit(1);
        }
    };
    println!("fake-openai listening on {}", fake.url());
    let _ = tokio::signal::ctrl_c().await;
}
