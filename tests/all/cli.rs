//! The `penstock` binary: config errors, `check`, and what a served request logs.

use std::process::Stdio;
use std::time::Duration;

use crate::support::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_penstock");

fn write_config(dir: &tempfile::TempDir, text: &str) -> std::path::PathBuf {
    let path = dir.path().join("penstock.toml");
    std::fs::write(&path, text).unwrap();
    path
}

async fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[tokio::test]
async fn broken_config_files_name_the_file_and_key_and_exit_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "[upstream]\nconnect_timeout = 5\n",
            "key `upstream.connect_timeout`",
        ),
        (
            "[upstream]\nbase_url = \"http://x\"\ntimeout = \"5s\"\n",
            "key `upstream.timeout`: unknown field",
        ),
        (
            "[server]\nmax_body_size = \"lots\"\n",
            "key `server.max_body_size`",
        ),
        ("[upstream\n", "line 1"),
        (
            "admin_listen = \"127.0.0.1:8080\"\n",
            "key `admin_listen`: must differ from `listen`",
        ),
    ];
    for (text, expected) in cases {
        let path = write_config(&dir, text);
        for cmd in [&["check"][..], &[][..]] {
            let mut args = cmd.to_vec();
            args.extend(["--config", path.to_str().unwrap()]);
            let (code, _, stderr) = run(&args, &[]).await;
            assert_eq!(code, 2, "{text:?} {cmd:?}: {stderr}");
            assert!(stderr.contains(path.to_str().unwrap()), "{stderr}");
            assert!(stderr.contains(expected), "{text:?}: {stderr}");
        }
    }
    let (code, _, stderr) = run(&["--config", "/no/such/penstock.toml"], &[]).await;
    assert_eq!(code, 2);
    assert!(
        stderr.contains("/no/such/penstock.toml: cannot read"),
        "{stderr}"
    );
}

#[tokio::test]
async fn check_prints_the_effective_config_and_never_a_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        &dir,
        "[upstream]\nbase_url = \"https://user:sk-url-secret@example.com\"\napi_key_env = \"PENSTOCK_TEST_KEY\"\n",
    );
    let path = path.to_str().unwrap();
    let (code, stdout, stderr) = run(
        &["check", "--config", path],
        &[("PENSTOCK_TEST_KEY", "sk-env-secret")],
    )
    .await;
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("api_key_env = \"PENSTOCK_TEST_KEY\""),
        "{stdout}"
    );
    assert!(
        stdout.contains("attempt_timeout = \"5m\""),
        "defaults are shown: {stdout}"
    );
    assert!(
        !stdout.contains("secret") && !stderr.contains("secret"),
        "{stdout}"
    );

    // Sidecar mode with its variable unset cannot serve, so check fails too.
    let (code, _, stderr) = run(&["check", "--config", path], &[]).await;
    assert_eq!(code, 2);
    assert!(
        stderr.contains("upstream.api_key_env: environment variable PENSTOCK_TEST_KEY is not set"),
        "{stderr}"
    );

    // The shipped config works as it is.
    let (code, _, stderr) = run(&["check", "--config", "config/penstock.toml"], &[]).await;
    assert_eq!(code, 0, "{stderr}");
}

/// A running `penstock --log-format json` in front of `fake`, with the log
/// filter `filter`: its address once it says it listens, and its log lines.
struct Served {
    child: tokio::process::Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStderr>>,
    log: Vec<String>,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Served {
    async fn start(fake: &Fake, filter: &str) -> Served {
        let dir = tempfile::tempdir().unwrap();
        let path = write_config(
            &dir,
            &format!(
                "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[upstream]\nbase_url = \"{}\"\napi_key_env = \"PENSTOCK_TEST_KEY\"\n",
                fake.url()
            ),
        );
        let mut child = Command::new(BIN)
            .args(["--config", path.to_str().unwrap(), "--log-format", "json"])
            .env("PENSTOCK_TEST_KEY", "sk-sidecar-secret")
            .env("PENSTOCK_LOG", filter)
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut log = Vec::new();
        let addr = loop {
            let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
                .await
                .expect("penstock starts")
                .unwrap()
                .expect("penstock is running");
            let v: serde_json::Value = serde_json::from_str(&line).expect("JSON log line");
            log.push(line);
            if v["message"] == "penstock listening" {
                break v["addr"].as_str().unwrap().to_string();
            }
        };
        Served {
            child,
            lines,
            log,
            addr,
            _dir: dir,
        }
    }

    /// Stops it with SIGTERM, asserts a clean exit, and returns the whole log.
    async fn stop(mut self) -> Vec<String> {
        let pid = self.child.id().unwrap().to_string();
        assert!(
            std::process::Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        while let Ok(Some(line)) = self.lines.next_line().await {
            self.log.push(line);
        }
        let status = tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(status.success(), "SIGTERM is a clean exit");
        self.log
    }

    async fn generate(&self) {
        let resp = http()
            .post(format!("http://{}/v1/images/generations", self.addr))
            .header("authorization", "Bearer sk-client-secret")
            .json(&serde_json::json!({"model": "gpt-image-1", "prompt": "a secret garden"}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
}

fn request_lines(log: &[String]) -> Vec<serde_json::Value> {
    log.iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == "request")
        .collect()
}

#[tokio::test]
async fn served_requests_log_one_json_line_without_keys_and_sigterm_stops_cleanly() {
    let fake = Fake::start(Behaviour::default()).await;
    let served = Served::start(&fake, "debug").await;
    served.generate().await;
    let log = served.stop().await;

    let requests = request_lines(&log);
    assert_eq!(requests.len(), 1, "one line per request: {log:#?}");
    let r = &requests[0];
    assert_eq!(r["status"], 200);
    assert_eq!(r["method"], "POST");
    assert_eq!(r["path"], "/v1/images/generations");
    assert_eq!(r["model"], "gpt-image-1");
    assert_eq!(r["upstream_request_id"], "req_1");
    assert!(r["latency_ms"].is_u64() && r["request_id"].as_str().unwrap().starts_with("ps-"));
    assert_eq!(r["level"], "INFO");
    assert_eq!(r["target"], "penstock::access");
    assert!(r["timestamp"].as_str().unwrap().ends_with('Z'));
    let all = log.join("\n");
    assert!(
        !all.contains("secret"),
        "no key or prompt in the logs: {all}"
    );
    assert!(fake.requests()[0].headers["authorization"] == "Bearer sk-sidecar-secret");
}

#[tokio::test]
async fn the_log_filter_can_silence_request_lines() {
    let fake = Fake::start(Behaviour::default()).await;
    let served = Served::start(&fake, "warn,penstock::server=info").await;
    served.generate().await;
    let log = served.stop().await;
    assert_eq!(fake.calls(), 1);
    assert!(request_lines(&log).is_empty(), "{log:#?}");
}

/// Every key of the shipped config (set or shown commented out) has its row
/// in the configuration reference: the two are kept together.
#[test]
fn the_configuration_reference_names_every_key_of_the_shipped_file() {
    let reference = std::fs::read_to_string("docs/configuration.md").unwrap();
    // The keys the reference's rows name: `section.key`, `[[array]] key`,
    // and bare names after them in the same cell (`a.b`, `c` is a.b and a.c).
    let mut documented = std::collections::HashSet::new();
    for row in reference.lines().filter(|l| l.starts_with("| ")) {
        let cell = row.split('|').nth(1).unwrap_or("");
        let mut section = String::new();
        if let Some(rest) = cell.trim().strip_prefix("`[[") {
            section = rest.split("]]").next().unwrap_or("").to_string();
        }
        for token in cell.split('`').skip(1).step_by(2) {
            let token = token.trim_start_matches("[[").trim();
            let token = token.split("]] ").last().unwrap_or(token);
            match token.rsplit_once('.') {
                Some((s, k)) if !s.contains('"') => {
                    section = s.to_string();
                    documented.insert(format!("{s}.{k}"));
                }
                _ => {
                    documented.insert(match section.is_empty() {
                        true => token.to_string(),
                        false => format!("{section}.{token}"),
                    });
                }
            }
        }
    }
    let shipped = std::fs::read_to_string("config/penstock.toml").unwrap();
    let mut section = String::new();
    let mut missing = Vec::new();
    for line in shipped.lines() {
        let line = line.trim().trim_start_matches('#').trim();
        if line.starts_with('[') {
            section = line
                .trim_matches(|c| c == '[' || c == ']')
                .split(']')
                .next()
                .unwrap_or("")
                .to_string();
            continue;
        }
        let Some((key, _)) = line.split_once('=') else {
            continue;
        };
        let key = key.trim();
        let plain = !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        // Keys of tables keyed by a glob or a route (`[prices."gpt-image-2*"]`,
        // `[estimate.default_model]`) are data, documented by their table.
        if !plain || section.contains('"') || section == "estimate.default_model" {
            continue;
        }
        let name = match section.is_empty() {
            true => key.to_string(),
            false => format!("{section}.{key}"),
        };
        if !documented.contains(&name) {
            missing.push(name);
        }
    }
    assert!(
        missing.is_empty(),
        "keys of config/penstock.toml without a row in docs/configuration.md: {missing:?}"
    );
}

/// The README's worked config is a config penstock accepts.
#[test]
fn the_readmes_worked_config_is_valid() {
    let readme = std::fs::read_to_string("README.md").unwrap();
    let start = readme.find("## A worked config").unwrap();
    let block = readme[start..].split("```toml").nth(1).unwrap();
    let toml = block.split("```").next().unwrap();
    let config = penstock::Config::parse(toml, "README.md").expect("it parses");
    config.validate("README.md").expect("it is valid");
    // And the one with several upstreams after it.
    let start = readme.find("### More capacity").unwrap();
    let block = readme[start..].split("```toml").nth(1).unwrap();
    let toml = block.split("```").next().unwrap();
    let config = penstock::Config::parse(toml, "README.md").expect("it parses");
    config.validate("README.md").expect("it is valid");
    assert_eq!(config.upstream.all().len(), 3);
    assert_eq!(config.fallbacks.len(), 1);
}
