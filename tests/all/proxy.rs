//! The transparent proxy: what a client sees through penstock is what it would see
//! talking to the upstream directly.

use std::time::{Duration, Instant};

use crate::support::*;
use async_openai::types::chat::{
    ChatCompletionRequestUserMessageArgs, CreateChatCompletionRequestArgs,
};
use async_openai::types::images::{
    CreateImageEditRequestArgs, CreateImageRequestArgs, ImageInput, ImageModel, ImageQuality,
    ImageSize,
};
use async_openai::{Client, config::OpenAIConfig};
use futures_util::StreamExt;

fn sdk(base: &str) -> Client<OpenAIConfig> {
    Client::with_config(
        OpenAIConfig::new()
            .with_api_base(format!("{base}/v1"))
            .with_api_key("sk-test-client"),
    )
}

#[tokio::test]
async fn official_client_gets_through_penstock_what_it_gets_directly() {
    let h = start(Behaviour::default()).await;
    let (via, direct) = (sdk(&h.url), sdk(&h.fake.url()));

    // Image generation.
    let req = CreateImageRequestArgs::default()
        .prompt("a lighthouse at dusk")
        .model(ImageModel::GptImage1dot5)
        .size(ImageSize::S1024x1536)
        .quality(ImageQuality::High)
        .n(2)
        .build()
        .unwrap();
    let a = via.images().generate(req.clone()).await.unwrap();
    let b = direct.images().generate(req).await.unwrap();
    assert_eq!(a.data.len(), 2);
    assert_eq!(format!("{:?}", a.usage), format!("{:?}", b.usage));
    assert_eq!(
        a.usage.as_ref().unwrap().output_tokens,
        2 * 6240,
        "the upstream's usage reaches the client"
    );
    let image = |r: &async_openai::types::images::ImagesResponse| format!("{:?}", r.data[0]);
    assert_eq!(
        image(&a).split("revised_prompt").next(),
        image(&b).split("revised_prompt").next()
    );

    // Edit with two images (multipart).
    let edit = CreateImageEditRequestArgs::default()
        .image(vec![
            ImageInput::from_vec_u8("a.png".into(), vec![0x89, b'P', b'N', b'G', 1, 2, 3]),
            ImageInput::from_vec_u8("b.png".into(), vec![0x89, b'P', b'N', b'G', 4, 5, 6]),
        ])
        .prompt("add a boat")
        .model(ImageModel::GptImage1dot5)
        .build()
        .unwrap();
    let a = via.images().edit(edit.clone()).await.unwrap();
    let b = direct.images().edit(edit).await.unwrap();
    assert_eq!(
        a.usage.as_ref().unwrap().input_tokens,
        b.usage.as_ref().unwrap().input_tokens
    );
    let edits: Vec<_> = h
        .fake
        .requests()
        .into_iter()
        .filter(|r| r.path == "/v1/images/edits")
        .collect();
    assert_eq!(edits.len(), 2);
    let count_images = |body: &[u8]| String::from_utf8_lossy(body).matches("filename=\"").count();
    assert_eq!(count_images(&edits[0].body), 2);

    // Chat, streamed.
    let chat = CreateChatCompletionRequestArgs::default()
        .model("gpt-4o-mini")
        .max_tokens(50u32)
        .messages([ChatCompletionRequestUserMessageArgs::default()
            .content("one two three four five")
            .build()
            .unwrap()
            .into()])
        .build()
        .unwrap();
    let collect = |client: Client<OpenAIConfig>, chat| async move {
        let mut stream = client.chat().create_stream(chat).await.unwrap();
        let mut text = String::new();
        while let Some(chunk) = stream.next().await {
            for choice in chunk.unwrap().choices {
                text.push_str(choice.delta.content.as_deref().unwrap_or(""));
            }
        }
        text
    };
    let a = collect(via.clone(), chat.clone()).await;
    let b = collect(direct.clone(), chat).await;
    assert_eq!(a, "one two three four five");
    assert_eq!(a, b);

    // Models.
    let a = via.models().list().await.unwrap();
    let b = direct.models().list().await.unwrap();
    assert_eq!(format!("{a:?}"), format!("{b:?}"));
    assert!(a.data.iter().any(|m| m.id == "gpt-image-1"));
}

#[tokio::test]
async fn multipart_is_forwarded_byte_for_byte() {
    let h = start(Behaviour::default()).await;
    let image: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let body = multipart(
        "----penstockTestBoundary7MA4YWxk",
        &[
            ("prompt", "make it blue"),
            ("model", "gpt-image-1"),
            ("n", "1"),
        ],
        &[
            ("image[]", "a.png", &image),
            ("image[]", "b.png", &image[..1000]),
        ],
    );
    let ct = "multipart/form-data; boundary=----penstockTestBoundary7MA4YWxk";
    let resp = http()
        .post(format!("{}/v1/images/edits", h.url))
        .header("content-type", ct)
        .header("authorization", "Bearer sk-test")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let seen = &h.fake.requests()[0];
    assert_eq!(
        seen.body.as_ref(),
        body.as_slice(),
        "body arrives byte for byte"
    );
    assert_eq!(seen.headers["content-type"], ct, "boundary intact");
    assert_eq!(
        seen.headers["content-length"],
        body.len().to_string().as_str()
    );
}

#[tokio::test]
async fn any_method_path_and_query_pass_through_with_headers_both_ways() {
    let h = start(Behaviour::default()).await;
    let client = http();
    let resp = client
        .delete(format!("{}/v1/never/heard/of?x=1&y=%20z", h.url))
        .header("authorization", "Bearer sk-client-key")
        .header("openai-organization", "org-1")
        .header("openai-project", "proj-1")
        .header("x-stainless-retry-count", "0")
        .header("user-agent", "OpenAI/Python 3.0")
        .header("connection", "x-hop-header")
        .header("x-hop-header", "must not travel")
        .send()
        .await
        .unwrap();
    let direct = client
        .delete(format!("{}/v1/never/heard/of?x=1&y=%20z", h.fake.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        404,
        "the upstream's own error passes through"
    );
    assert_eq!(resp.headers()["openai-version"], "2020-10-01");
    assert!(resp.headers().contains_key("x-request-id"));
    assert!(
        resp.headers()
            .contains_key("x-ratelimit-remaining-requests")
    );
    assert!(
        resp.headers()["x-penstock-request-id"]
            .to_str()
            .unwrap()
            .starts_with("ps-")
    );
    assert_eq!(resp.text().await.unwrap(), direct.text().await.unwrap());

    let seen = &h.fake.requests()[0];
    assert_eq!(seen.method, "DELETE");
    assert_eq!(seen.path, "/v1/never/heard/of");
    assert_eq!(seen.query.as_deref(), Some("x=1&y=%20z"));
    assert_eq!(seen.headers["authorization"], "Bearer sk-client-key");
    assert_eq!(seen.headers["openai-organization"], "org-1");
    assert_eq!(seen.headers["openai-project"], "proj-1");
    assert_eq!(seen.headers["x-stainless-retry-count"], "0");
    assert_eq!(seen.headers["user-agent"], "OpenAI/Python 3.0");
    assert_eq!(seen.headers["host"], h.fake.addr().to_string().as_str());
    assert!(!seen.headers.contains_key("x-hop-header"));
}

#[tokio::test]
async fn sse_events_arrive_as_the_upstream_sends_them() {
    let h = start(Behaviour {
        stream_interval: Duration::from_millis(400),
        ..Behaviour::default()
    })
    .await;
    let started = Instant::now();
    let resp = http()
        .post(format!("{}/v1/images/generations", h.url))
        .json(&serde_json::json!({"model": "gpt-image-1", "prompt": "p", "stream": true, "partial_images": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    let first_at = started.elapsed();
    assert!(String::from_utf8_lossy(&first).contains("image_generation.partial_image"));
    let mut rest = Vec::new();
    while let Some(chunk) = body.next().await {
        rest.extend_from_slice(&chunk.unwrap());
    }
    let last_at = started.elapsed();
    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.contains("image_generation.completed") && rest.contains("\"usage\""));
    // Four events 400 ms apart: the first must come ~1.2 s before the last.
    assert!(
        last_at - first_at >= Duration::from_millis(1000),
        "first event at {first_at:?}, last at {last_at:?}: the stream was buffered"
    );
}

#[tokio::test]
async fn oversized_bodies_get_413_before_anything_is_sent() {
    let h = start_with(
        Behaviour::default(),
        |c| c.server.max_body_size = bytesize::ByteSize::kib(1),
        |_| None,
    )
    .await;
    let client = http();
    // Declared too large: refused from the header alone.
    let resp = client
        .post(format!("{}/v1/embeddings", h.url))
        .header("content-type", "application/json")
        .body(vec![b' '; 4096])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    assert_eq!(resp.headers()["x-should-retry"], "false");
    let v = json(resp).await;
    assert_eq!(v["error"]["code"], "penstock_body_too_large");
    assert_eq!(v["error"]["type"], "invalid_request_error");

    // Chunked, no length: refused once the limit is crossed.
    let chunks =
        futures_util::stream::iter((0..8).map(|_| Ok::<_, std::io::Error>(vec![b' '; 512])));
    let resp = client
        .post(format!("{}/v1/embeddings", h.url))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    assert_eq!(h.fake.calls(), 0);

    // Within the limit it passes.
    let resp = client
        .post(format!("{}/v1/embeddings", h.url))
        .json(&serde_json::json!({"model": "text-embedding-3-small", "input": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn malformed_json_is_refused_with_a_clear_error_and_costs_nothing() {
    let h = start(Behaviour::default()).await;
    // A 400 with `code`, its message returned.
    let refused = |path: &str, content_type: &'static str, body: Vec<u8>, code: &'static str| {
        let url = format!("{}{path}", h.url);
        async move {
            let resp = http()
                .post(url)
                .header("content-type", content_type)
                .body(body)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 400);
            let v = json(resp).await;
            assert_eq!(v["error"]["code"], code);
            v["error"]["message"].as_str().unwrap().to_string()
        }
    };
    let json_refused = |body: Vec<u8>| {
        refused(
            "/v1/images/generations",
            "application/json",
            body,
            "penstock_invalid_json",
        )
    };
    let cut = json_refused(br#"{"model": "gpt-image-1", "prompt": "#.to_vec()).await;
    assert!(cut.contains("line 1"), "{cut}");
    // Bytes that are not UTF-8 inside a string are not JSON either.
    let mut latin1 = br#"{"model": "gpt-image-1", "prompt": "caf"#.to_vec();
    latin1.extend_from_slice(b"\xe9\"}");
    let latin1 = json_refused(latin1).await;
    assert!(latin1.contains("UTF-8 (at byte 39)"), "{latin1}");
    refused(
        "/v1/images/edits",
        "multipart/form-data; boundary=abc",
        b"--abc\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nunterminated".to_vec(),
        "penstock_invalid_multipart",
    )
    .await;
    assert_eq!(h.fake.calls(), 0);
}

#[tokio::test]
async fn unreachable_upstream_is_a_502_from_penstock() {
    // A port that was just free: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = config_for(&format!("http://127.0.0.1:{port}"));
    let p = penstock::start(&config, |_| None).await.unwrap();
    let resp = http()
        .get(format!("http://{}/v1/models", p.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 502);
    let v = json(resp).await;
    assert_eq!(v["error"]["code"], "penstock_upstream_unreachable");
    assert_eq!(v["error"]["type"], "penstock_error");
}

#[tokio::test]
async fn slow_upstream_is_a_504_from_penstock() {
    let h = start_with(
        Behaviour {
            latency: (Duration::from_secs(3), Duration::from_secs(3)),
            ..Behaviour::default()
        },
        |c| c.upstream.attempt_timeout = Duration::from_millis(200),
        |_| None,
    )
    .await;
    let started = Instant::now();
    let resp = http()
        .get(format!("{}/v1/models", h.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 504);
    // The timeout is per attempt: four attempts of 200 ms, then penstock gives
    // up, before the upstream answered any of them.
    assert!(started.elapsed() >= Duration::from_millis(800));
    assert!(h.fake.requests().is_empty(), "no attempt was waited out");
    assert_eq!(resp.headers()["x-penstock-attempts"], "4");
    assert_eq!(resp.headers()["x-should-retry"], "false");
    assert_eq!(
        json(resp).await["error"]["code"],
        "penstock_upstream_timeout"
    );
    assert_eq!(h.fake.calls(), 4);
}

#[tokio::test]
async fn sidecar_mode_replaces_client_credentials() {
    let h = start_with(
        Behaviour::default(),
        |c| {
            c.upstream.api_key_env = Some("SIDECAR_KEY".into());
            c.upstream.project = Some("proj-sidecar".into());
        },
        |k| (k == "SIDECAR_KEY").then(|| "sk-sidecar-secret".into()),
    )
    .await;
    let resp = http()
        .get(format!("{}/v1/models", h.url))
        .header("authorization", "Bearer sk-client-leak")
        .header("api-key", "azure-client-leak")
        .header("openai-organization", "org-client")
        .header("openai-project", "proj-client")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let seen = &h.fake.requests()[0];
    assert_eq!(seen.headers["authorization"], "Bearer sk-sidecar-secret");
    assert_eq!(seen.headers["openai-project"], "proj-sidecar");
    assert!(!seen.headers.contains_key("openai-organization"));
    assert!(!seen.headers.contains_key("api-key"));
    let all: String = seen
        .headers
        .values()
        .map(|v| v.to_str().unwrap_or(""))
        .collect();
    assert!(
        !all.contains("leak"),
        "no client credential reached the upstream"
    );
}

#[tokio::test]
async fn clients_may_speak_http2_without_tls() {
    let h = start(Behaviour::default()).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let resp = client
        .request(
            http::Request::get(format!("{}/v1/models", h.url))
                .body(Default::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_2);
}

#[tokio::test]
async fn health_and_readiness_are_on_the_admin_port_only() {
    let h = start(Behaviour::default()).await;
    let client = http();
    let r = client
        .get(format!("{}/healthz", h.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client
        .get(format!("{}/readyz", h.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // On the proxy port /healthz is just another path, forwarded upstream.
    let r = client
        .get(format!("{}/healthz", h.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(h.fake.calls(), 1);
}

#[tokio::test]
async fn shutdown_lets_in_flight_requests_finish() {
    let h = start(Behaviour {
        latency: (Duration::from_millis(600), Duration::from_millis(600)),
        ..Behaviour::default()
    })
    .await;
    let url = format!("{}/v1/models", h.url);
    let in_flight = tokio::spawn(async move { http().get(url).send().await });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let addr = h.penstock.addr;
    h.penstock.shutdown().await;
    let resp = in_flight.await.unwrap().unwrap();
    assert_eq!(resp.status(), 200, "the in-flight request finished");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "no new connections after shutdown"
    );
}

#[tokio::test]
async fn a_large_prompt_is_priced_off_the_async_workers_and_forwarded_whole() {
    let h = start(Behaviour::default()).await;
    // ~300 KB of prose: priced on the blocking pool.
    let prompt = "the quick brown fox jumps over the lazy dog ".repeat(7_000);
    let body = serde_json::json!({"model": "gpt-4o-mini", "max_tokens": 10, "messages": [{"role": "user", "content": prompt}]});
    let resp = http()
        .post(format!("{}/v1/chat/completions", h.url))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.bytes().await.unwrap();
    let seen: serde_json::Value = serde_json::from_slice(&h.fake.requests()[0].body).unwrap();
    assert_eq!(seen, body);
    let text = h.metrics().await;
    // 44 characters a repeat, four a token as OpenAI's limiter counts, 7,000
    // repeats, plus message overhead and max_tokens.
    let estimated = sample(
        &text,
        "penstock_tokens_total{model=\"gpt-4o-mini\",kind=\"estimated\"}",
    );
    assert_eq!(estimated, (77_000 + 2 + 4 + 10) as f64);
}

/// A chat completion through `url`; its status.
async fn chat_status(url: &str) -> u16 {
    http()
        .post(format!("{url}/v1/chat/completions"))
        .header("authorization", "Bearer sk-test-client")
        .json(&serde_json::json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn upstream_connections_are_reused_and_one_the_upstream_closed_is_replaced() {
    // Idle a second, the upstream closes: long enough that five calls in a
    // row stay on one connection even when the tests sharing the machine
    // delay one.
    let h = start(Behaviour {
        idle_close: Some(Duration::from_secs(1)),
        ..Behaviour::default()
    })
    .await;
    for _ in 0..5 {
        assert_eq!(chat_status(&h.url).await, 200);
    }
    assert_eq!(h.fake.connections(), 1, "one connection served all five");
    // The upstream closes the idle connection; the next call takes a new one
    // and its client never sees the closed one.
    for _ in 0..1000 {
        if h.fake.open_connections() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(h.fake.open_connections(), 0, "the upstream closed it");
    assert_eq!(chat_status(&h.url).await, 200);
    assert_eq!(h.fake.connections(), 2);
    assert_eq!(h.fake.calls(), 6);
}

#[tokio::test]
async fn a_stream_its_client_dropped_does_not_spoil_the_next_call() {
    let h = start(Behaviour {
        stream_interval: Duration::from_millis(50),
        ..Behaviour::default()
    })
    .await;
    let resp = http()
        .post(format!("{}/v1/chat/completions", h.url))
        .header("authorization", "Bearer sk-test-client")
        .json(&serde_json::json!({"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": "a long story"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    assert!(body.next().await.unwrap().is_ok());
    drop(body);
    // The half-read connection is not lent again (hyper closes it, and the
    // pool skips a closed one): the next calls succeed, on a new connection.
    for _ in 0..3 {
        assert_eq!(chat_status(&h.url).await, 200);
    }
    assert_eq!(h.fake.calls(), 4);
    assert_eq!(
        h.fake.connections(),
        2,
        "the dropped stream's connection was not reused, the next three shared one"
    );
}
