//! Streaming: how late penstock forwards a server-sent event. A minimal
//! upstream streams a chat completion, one event every 10 ms, each carrying
//! when it was written; the client (in the same process, on the same clock)
//! notes when each arrives, directly and through penstock.
//! `cargo bench --bench stream` (BENCH_STREAMS to change the count)

#[path = "common/mod.rs"]
mod common;

use std::sync::LazyLock;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::StreamBody;

/// The clock both sides read.
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

const EVENTS: usize = 20;

fn micros_now() -> u64 {
    EPOCH.elapsed().as_micros() as u64
}

/// An upstream streaming `EVENTS` chunks 10 ms apart; its address.
fn streaming_upstream() -> std::net::SocketAddr {
    common::serve_on_thread(hyper::service::service_fn(
        |req: hyper::Request<hyper::body::Incoming>| async move {
            use http_body_util::BodyExt;
            let _ = req.into_body().collect().await;
            let (tx, rx) = tokio::sync::mpsc::channel::<
                Result<hyper::body::Frame<Bytes>, std::convert::Infallible>,
            >(4);
            tokio::spawn(async move {
                for i in 0..EVENTS {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    let event = format!(
                        "data: {{\"id\":\"chatcmpl-s\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"w{i} \"}}}}],\"sent_us\":{}}}\n\n",
                        micros_now()
                    );
                    if tx
                        .send(Ok(hyper::body::Frame::data(Bytes::from(event))))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                let done = Bytes::from_static(b"data: [DONE]\n\n");
                let _ = tx.send(Ok(hyper::body::Frame::data(done))).await;
            });
            let mut resp = hyper::Response::new(BodyExt::boxed(StreamBody::new(tokio_stream(rx))));
            resp.headers_mut().insert(
                "content-type",
                http::HeaderValue::from_static("text/event-stream"),
            );
            Ok::<_, std::convert::Infallible>(resp)
        },
    ))
}

/// The receiver as a stream.
fn tokio_stream<T: Send + 'static>(
    rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send {
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|v| (v, rx)) })
}

/// Streams `n` completions from `url`; each event's delay from being written
/// upstream to being read here.
async fn delays(url: &str, n: usize) -> Vec<Duration> {
    let client = reqwest::Client::new();
    let mut out = Vec::new();
    for i in 0..n {
        let resp = client
            .post(url)
            .header("authorization", "Bearer sk-bench")
            .json(&serde_json::json!({"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": format!("stream {i}")}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let mut body = resp.bytes_stream();
        let mut pending = Vec::new();
        while let Some(chunk) = body.next().await {
            let now = micros_now();
            pending.extend_from_slice(&chunk.unwrap());
            while let Some(end) = pending.windows(2).position(|w| w == b"\n\n") {
                let event: Vec<u8> = pending.drain(..end + 2).collect();
                let text = String::from_utf8_lossy(&event);
                if let Some(at) = text.find("\"sent_us\":") {
                    let rest = &text[at + 10..];
                    let sent: u64 = rest[..rest.find('}').unwrap()].parse().unwrap();
                    out.push(Duration::from_micros(now.saturating_sub(sent)));
                }
            }
        }
    }
    out
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1]
}

fn main() {
    let streams: usize = common::env("BENCH_STREAMS", 20);
    LazyLock::force(&EPOCH);
    common::block_on(async move {
        let upstream = streaming_upstream();
        let mut config = common::config_for(&format!("http://{upstream}"));
        config.budgets = vec![penstock::config::BudgetConfig {
            models: vec!["gpt-4o*".into()],
            rpm: Some(100_000_000),
            tpm: Some(100_000_000_000),
            ..penstock::config::BudgetConfig::default()
        }];
        let p = penstock::start(&config, |_| None).await.unwrap();
        let direct_url = format!("http://{upstream}/v1/chat/completions");
        let proxy_url = format!("http://{}/v1/chat/completions", p.addr);
        delays(&proxy_url, 2).await;
        let mut direct = delays(&direct_url, streams).await;
        let mut proxied = delays(&proxy_url, streams).await;
        println!(
            "stream: {streams} streamed chat completions, {EVENTS} events 10 ms apart each; delay from the upstream's write to the client's read"
        );
        for (name, d) in [("direct", &mut direct), ("penstock", &mut proxied)] {
            println!(
                "{:<10} {} events  p50 {:>6} µs  p99 {:>6} µs  max {:>6} µs",
                name,
                d.len(),
                pct(d, 0.5).as_micros(),
                pct(d, 0.99).as_micros(),
                pct(d, 1.0).as_micros()
            );
        }
        println!(
            "added by penstock: p50 {} µs, p99 {} µs",
            pct(&mut proxied, 0.5)
                .saturating_sub(pct(&mut direct, 0.5))
                .as_micros(),
            pct(&mut proxied, 0.99)
                .saturating_sub(pct(&mut direct, 0.99))
                .as_micros()
        );
    });
}
