//! Hostile clients and broken upstreams: penstock stays bounded in time and
//! memory, answers clearly, and keeps serving everyone else.

use std::time::Duration;

use crate::support::*;
use penstock::config::BudgetConfig;
use serde_json::json;

fn image(prompt: &str) -> serde_json::Value {
    json!({"model": "gpt-image-1", "prompt": prompt, "quality": "low", "size": "1024x1024"})
}

#[tokio::test]
async fn the_request_deadline_bounds_queue_waits_and_attempts_together() {
    // One call holds the only slot for 3 s; the next may wait 60 s and its
    // attempt may take 5 minutes, but the whole request has 1 s.
    let h = start_with(
        Behaviour {
            latency: (Duration::from_secs(3), Duration::from_secs(3)),
            ..Behaviour::default()
        },
        |c| {
            c.budgets = vec![BudgetConfig {
                models: vec!["gpt-image-*".into()],
                rpm: Some(6000),
                max_in_flight: Some(1),
                ..BudgetConfig::default()
            }];
            c.queue.max_wait = Duration::from_secs(60);
            c.retry.deadline = Duration::from_secs(1);
        },
        |_| None,
    )
    .await;
    let url = format!("{}/v1/images/generations", h.url);
    let started = tokio::time::Instant::now();
    let (first, second) = tokio::join!(http().post(&url).json(&image("a")).send(), async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        http().post(&url).json(&image("b")).send().await
    });
    // The first's attempt is cut at its deadline, not after 3 s of upstream.
    let first = first.unwrap();
    assert_eq!(first.status(), 504);
    assert_eq!(
        json(first).await["error"]["code"],
        "penstock_upstream_timeout"
    );
    // The second waited for the slot until what was left of its second: then
    // refused, or admitted and cut; never the 3 s call that a 200 would need.
    let second = second.unwrap();
    let code = json_code(second).await;
    assert!(
        code == "penstock_queue_timeout" || code == "penstock_upstream_timeout",
        "{code}"
    );
    assert!(started.elapsed() >= Duration::from_secs(1));
}

async fn json_code(resp: reqwest::Response) -> String {
    json(resp).await["error"]["code"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

#[tokio::test]
async fn an_upstream_that_stalls_mid_body_is_cut_and_a_shared_call_ends_for_all() {
    let h = start_with(
        Behaviour {
            stall_after_bytes: Some(10),
            ..Behaviour::default()
        },
        |c| c.upstream.read_timeout = Duration::from_millis(500),
        |_| None,
    )
    .await;
    // A client's own call: the head came, the body breaks off.
    let resp = http()
        .post(format!("{}/v1/chat/completions", h.url))
        .json(&json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.bytes().await.is_err(), "the body ends in an error");
    // A shared call: the leader and the one waiting with it both hear.
    let url = format!("{}/v1/images/generations", h.url);
    let (a, b) = tokio::join!(http().post(&url).json(&image("stall")).send(), async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        http().post(&url).json(&image("stall")).send().await
    });
    for resp in [a.unwrap(), b.unwrap()] {
        assert_eq!(resp.status(), 502);
        assert_eq!(
            json(resp).await["error"]["code"],
            "penstock_upstream_connection_error"
        );
    }
    // The key is free again: the next request makes a new call.
    h.fake.set_behaviour(|b| b.stall_after_bytes = None);
    let again = http()
        .post(&url)
        .json(&image("stall"))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 200);
    assert_eq!(again.headers()["x-penstock-cache"], "miss");
}

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until the server closes the connection; what it sent before.
async fn until_closed(conn: &mut TcpStream) -> String {
    let mut seen = Vec::new();
    // A guard against hanging for ever, not a measure of speed.
    let read = tokio::time::timeout(Duration::from_secs(60), conn.read_to_end(&mut seen)).await;
    assert!(read.is_ok(), "the server never closed the connection");
    String::from_utf8_lossy(&seen).into_owned()
}

#[tokio::test]
async fn slow_clients_are_cut_off_and_the_rest_are_served() {
    let h = start_with(
        Behaviour::default(),
        |c| {
            c.server.header_read_timeout = Duration::from_millis(300);
            c.server.body_read_timeout = Duration::from_millis(300);
        },
        |_| None,
    )
    .await;
    let addr = h.penstock.addr;
    // Half a header, then silence: closed.
    let mut slowloris = TcpStream::connect(addr).await.unwrap();
    slowloris
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    // A body that stops halfway: 408, with penstock's own code.
    let mut stalled = TcpStream::connect(addr).await.unwrap();
    stalled
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"model\":")
        .await
        .unwrap();
    // An idle keep-alive connection: closed too.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    // Meanwhile everyone else is served.
    let ok = http()
        .get(format!("{}/v1/models", h.url))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(until_closed(&mut slowloris).await, "");
    let answer = until_closed(&mut stalled).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("penstock_body_timeout"), "{answer}");
    let answer = until_closed(&mut idle).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[tokio::test]
async fn at_the_connection_cap_new_clients_wait_and_the_admin_port_answers() {
    let h = start_with(
        Behaviour::default(),
        |c| c.server.max_connections = 2,
        |_| None,
    )
    .await;
    let addr = h.penstock.addr;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 12];
        c.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"HTTP/1.1 200");
        held.push(c);
    }
    // A third waits in the backlog while two are open...
    let third = tokio::spawn({
        let url = format!("{}/v1/models", h.url);
        async move { http().get(url).send().await.unwrap().status() }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!third.is_finished(), "over the cap, not served yet");
    // ...the admin port still answers...
    let health = http()
        .get(format!("{}/healthz", h.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    // ...and one closing lets it in.
    held.pop();
    assert_eq!(third.await.unwrap(), 200);
}

#[tokio::test]
async fn bodies_held_by_all_requests_are_bounded_and_freed_when_they_end() {
    let h = start_with(
        Behaviour {
            latency: (Duration::from_secs(2), Duration::from_secs(2)),
            record_bodies: false,
            ..Behaviour::default()
        },
        |c| {
            c.server.max_body_size = bytesize::ByteSize::mib(1);
            c.server.max_buffered = bytesize::ByteSize::mib(2);
            c.budgets = vec![BudgetConfig {
                models: vec!["gpt-image-*".into()],
                rpm: Some(60),
                ..BudgetConfig::default()
            }];
        },
        |_| None,
    )
    .await;
    let url = format!("{}/v1/images/generations", h.url);
    let big = |tag: &str| {
        let prompt = format!("{tag}{}", "x".repeat(900 * 1024));
        json!({"model": "gpt-image-1", "prompt": prompt})
    };
    let send = |body: serde_json::Value, after: u64| {
        let url = url.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(after)).await;
            http().post(url).json(&body).send().await.unwrap()
        }
    };
    // One in flight, one waiting for the next second's budget: 1.8 MB held.
    // A third would pass 2 MiB: refused at once, with when to come back.
    let (a, b, c) = tokio::join!(send(big("a"), 0), send(big("b"), 100), send(big("c"), 300));
    assert_eq!(c.status(), 503);
    let retry_ms: u64 = c.headers()["retry-after-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_ms > 0);
    assert_eq!(json(c).await["error"]["code"], "penstock_overloaded");
    assert_eq!(a.status(), 200);
    assert_eq!(b.status(), 200);
    // All ended: nothing held, and the next big body is taken.
    assert_eq!(h.status().await["buffered_bytes"], 0);
    assert_eq!(send(big("d"), 0).await.status(), 200);
}

#[tokio::test]
async fn an_oversized_body_is_answered_413_and_read_off_so_the_client_hears_it() {
    let h = start_with(
        Behaviour::default(),
        |c| c.server.max_body_size = bytesize::ByteSize::kib(64),
        |_| None,
    )
    .await;
    // 80 MiB announced and sent in full, as a client that does not wait for
    // an early answer does (httpx): it reads the 413, not a reset, whatever
    // the size (the drain once stopped at 16 MiB).
    let mut conn = TcpStream::connect(h.penstock.addr).await.unwrap();
    let body = vec![b'a'; 80 << 20];
    let head = format!(
        "POST /v1/images/edits HTTP/1.1\r\nhost: x\r\ncontent-type: application/octet-stream\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(&body).await.unwrap();
    let mut answer = vec![0u8; 12];
    conn.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"HTTP/1.1 413");
    assert_eq!(h.fake.calls(), 0);
}

#[tokio::test]
async fn a_refused_body_is_read_off_no_longer_than_the_lingering_time() {
    let h = start_with(
        Behaviour::default(),
        |c| {
            c.server.max_body_size = bytesize::ByteSize::kib(1);
            c.server.lingering_timeout = Duration::from_millis(300);
            c.server.lingering_time = Duration::from_secs(1);
        },
        |_| None,
    )
    .await;
    // A client that announces a huge body and trickles it for ever: its
    // connection is let go after the lingering time.
    let mut conn = TcpStream::connect(h.penstock.addr).await.unwrap();
    let head = "POST /v1/images/edits HTTP/1.1\r\nhost: x\r\ncontent-length: 1000000000\r\n\r\n";
    conn.write_all(head.as_bytes()).await.unwrap();
    let (mut read, mut write) = conn.into_split();
    let trickle = tokio::spawn(async move {
        for _ in 0..200 {
            if write.write_all(b"x").await.is_err() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    });
    let mut answer = Vec::new();
    let _ = read.read_to_end(&mut answer).await;
    assert!(answer.starts_with(b"HTTP/1.1 413"), "{answer:?}");
    assert!(trickle.await.unwrap(), "the connection was closed on it");
}

#[tokio::test]
async fn tunnels_traces_own_headers_and_url_passwords_never_reach_the_upstream() {
    let fake = Fake::start(Behaviour::default()).await;
    let config = config_for(&format!("http://user:sk-url-secret@{}", fake.addr()));
    config.validate("test").unwrap();
    let p = penstock::start(&config, |_| None).await.unwrap();
    let url = format!("http://{}", p.addr);
    for method in ["CONNECT", "TRACE"] {
        let mut conn = TcpStream::connect(p.addr).await.unwrap();
        let target = if method == "CONNECT" {
            "example.com:443"
        } else {
            "/v1/models"
        };
        conn.write_all(format!("{method} {target} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut answer = vec![0u8; 12];
        conn.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"HTTP/1.1 405", "{method}");
    }
    let resp = http()
        .get(format!("{url}/v1/models"))
        .header("x-penstock-client", "web")
        .header("x-penstock-max-wait-ms", "100")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let seen = &fake.requests()[0];
    assert_eq!(
        fake.calls(),
        1,
        "the tunnel and the trace were not forwarded"
    );
    assert!(
        seen.headers
            .keys()
            .all(|k| !k.as_str().starts_with("x-penstock-"))
    );
    let all = format!("{:?}", seen.headers);
    assert!(
        !all.contains("sk-url-secret") && !all.contains("user:"),
        "{all}"
    );
}

#[tokio::test]
async fn pathological_prompts_are_counted_by_characters_and_never_refused() {
    let h = start(Behaviour {
        record_bodies: false,
        ..Behaviour::default()
    })
    .await;
    // A megabyte of spaces (it overflowed a tokenizer's stack) and 20 MB of one
    // letter (it cost a tokenizer tens of CPU-seconds).
    for (text, chars) in [(" ", 1 << 20), ("a", 20 << 20)] {
        let prompt = text.repeat(chars);
        let resp = http()
            .post(format!("{}/v1/chat/completions", h.url))
            .json(&json!({"model": "gpt-4o-mini", "max_tokens": 1,
                "messages": [{"role": "user", "content": prompt}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.bytes().await.unwrap();
    }
    let text = h.metrics().await;
    let estimated = sample(
        &text,
        "penstock_tokens_total{model=\"gpt-4o-mini\",kind=\"estimated\"}",
    );
    let expected = ((1u64 << 20) / 4 + (20u64 << 20) / 4 + 2 * (2 + 4 + 1)) as f64;
    assert_eq!(estimated, expected);
}

#[tokio::test]
async fn numbers_no_duration_or_counter_holds_are_answered_not_panicked_on() {
    let h = start_with(
        Behaviour::default(),
        |c| {
            c.budgets = vec![BudgetConfig {
                models: vec!["gpt-4o-mini".into()],
                rpm: Some(600),
                tpm: Some(1_000_000),
                ..BudgetConfig::default()
            }]
        },
        |_| None,
    )
    .await;
    let url = format!("{}/v1/chat/completions", h.url);
    let resp = http()
        .post(&url)
        .header("x-stainless-timeout", "1e20")
        .header("x-penstock-max-wait-ms", "1e30")
        .json(
            &json!({"model": "gpt-4o-mini", "n": 18446744073709551615u64,
            "max_tokens": 18446744073709551000u64,
            "messages": [{"role": "user", "content": "hi"}]}),
        )
        .send()
        .await
        .unwrap();
    // Far over the token limit: refused as too large, never wrapped into a
    // small number that would turn the limit off.
    assert_eq!(resp.status(), 400);
    assert_eq!(
        json(resp).await["error"]["code"],
        "penstock_request_too_large"
    );
    // The same worker pool still serves, and the budget still counts.
    let ok = http()
        .post(&url)
        .json(&json!({"model": "gpt-4o-mini", "max_tokens": 5,
            "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let status = h.status().await;
    let tokens = &status["pools"][0]["remaining"]["tokens"]["minute_remaining"];
    assert!(tokens.as_u64().unwrap() > 999_000, "{status}");
}
