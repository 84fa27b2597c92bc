//! The bound on request bodies held in memory (`server.max_buffered`), as the
//! process's resident memory shows it: the penstock binary, with the default
//! 512 MiB bound, and a budget letting one chat call go a minute; twelve
//! 50 MiB chat bodies sent at once, as a client that sends its whole body
//! before reading does. Ten fit the bound and wait for budget, the rest are
//! refused (503 `penstock_overloaded`); the resident memory's growth is
//! compared with the bound.
//!
//! `cargo bench --bench memory` (`BODIES`, `BODY_MIB`)

#[path = "common/mod.rs"]
mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fake_openai::{Behaviour, Fake};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn until_listening(port: u16) {
    for _ in 0..400 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("nothing listens on {port}");
}

async fn status(admin: u16) -> serde_json::Value {
    reqwest::get(format!("http://127.0.0.1:{admin}/status"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn main() {
    let bodies: usize = common::env("BODIES", 12);
    let mib: usize = common::env("BODY_MIB", 50);
    common::block_on(async move {
        let fake = Fake::start(Behaviour {
            record_bodies: false,
            ..Behaviour::default()
        })
        .await;
        let dir = tempfile::tempdir().unwrap();
        let (port, admin) = (common::free_port(), common::free_port());
        let config = dir.path().join("penstock.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n\
                 [upstream]\nbase_url = \"{}\"\n\
                 [[budget]]\nname = \"chat\"\nmodels = [\"gpt-4o*\"]\nrpm = 1\n\
                 [queue]\nmax_wait = \"600s\"\n[jobs]\nstore = \"memory\"\n",
                fake.url()
            ),
        )
        .unwrap();
        let mut penstock = Command::new(env!("CARGO_BIN_EXE_penstock"))
            .args(["--config", config.to_str().unwrap()])
            .env("PENSTOCK_LOG", "warn")
            .stderr(Stdio::null())
            .spawn()
            .expect("penstock starts");
        until_listening(port).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = common::rss_kib(penstock.id());
        let content = "a".repeat(mib << 20);
        let body = format!(
            r#"{{"model":"gpt-4o-mini","max_tokens":16,"messages":[{{"role":"user","content":"{content}"}}]}}"#
        );
        drop(content);
        let body = std::sync::Arc::new(body.into_bytes());
        let mut clients = Vec::new();
        for _ in 0..bodies {
            let body = body.clone();
            clients.push(tokio::spawn(async move {
                let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .unwrap();
                let head = format!(
                    "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nauthorization: Bearer sk-bench\r\ncontent-length: {}\r\n\r\n",
                    body.len()
                );
                conn.write_all(head.as_bytes()).await.unwrap();
                let _ = conn.write_all(&body).await;
                let mut status = [0u8; 12];
                let _ = conn.read_exact(&mut status).await;
                String::from_utf8_lossy(&status[9..12]).to_string()
            }));
        }
        // Until every body is either held (waiting, or the one in flight)
        // or refused, and the memory settles.
        let started = Instant::now();
        let (mut held, mut peak) = (0u64, 0u64);
        let mut last_change = Instant::now();
        while started.elapsed() < Duration::from_secs(120) {
            let s = status(admin).await;
            let now = s["buffered_bytes"].as_u64().unwrap_or(0);
            let rss = common::rss_kib(penstock.id());
            if now != held || rss > peak + 1024 {
                last_change = Instant::now();
            }
            held = now;
            peak = peak.max(rss);
            let refused = clients.iter().filter(|c| c.is_finished()).count();
            if last_change.elapsed() > Duration::from_secs(3) && held > 0 && refused > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let after = common::rss_kib(penstock.id());
        let bound = 512u64 << 10;
        println!(
            "{bodies} bodies of {mib} MiB at once; max_buffered 512 MiB; buffered now {} MiB",
            held >> 20
        );
        println!(
            "resident memory: {} MiB before, {} MiB after ({} MiB peak): grew {} MiB = {:.2}x max_buffered",
            before >> 10,
            after >> 10,
            peak >> 10,
            (after.saturating_sub(before)) >> 10,
            after.saturating_sub(before) as f64 / bound as f64
        );
        let mut outcomes = std::collections::BTreeMap::<String, usize>::new();
        let _ = penstock.kill();
        let _ = penstock.wait();
        for c in clients {
            *outcomes.entry(c.await.unwrap()).or_default() += 1;
        }
        println!("answers after the process stopped (empty: still waiting): {outcomes:?}");
    });
}
