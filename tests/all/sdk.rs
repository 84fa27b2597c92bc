//! The official Python and Node SDKs' `responses.create` (plain, streamed,
//! with the image tool) see through penstock what they see calling the fake
//! directly. The scripts are in `tests/sdk/`; they need `pip install openai`
//! and `npm ci` in `tests/sdk` (`.ci/run` does both). Where an SDK is
//! missing these tests say so loudly and end; with `PENSTOCK_REQUIRE_SDKS=1`
//! (set by `.ci/run`) they fail instead.

use std::path::Path;
use std::process::Command;

use crate::support::*;

fn required() -> bool {
    std::env::var("PENSTOCK_REQUIRE_SDKS").is_ok_and(|v| v == "1")
}

/// The SDK's interpreter and script, if the SDK is installed.
fn sdk(name: &str) -> Option<(&'static str, &'static str)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk");
    let found = match name {
        "python" => Command::new("python3")
            .args(["-c", "import openai"])
            .status()
            .is_ok_and(|s| s.success()),
        _ => {
            dir.join("node_modules/openai/package.json").exists()
                && Command::new("node")
                    .arg("--version")
                    .status()
                    .is_ok_and(|s| s.success())
        }
    };
    if !found {
        assert!(
            !required(),
            "the {name} OpenAI SDK is not installed and PENSTOCK_REQUIRE_SDKS=1"
        );
        eprintln!(
            "\n\n*** SKIPPED: the {name} OpenAI SDK is not installed (pip install openai; npm ci in tests/sdk) ***\n"
        );
        return None;
    }
    Some(match name {
        "python" => ("python3", "tests/sdk/responses.py"),
        _ => ("node", "tests/sdk/responses.mjs"),
    })
}

/// Runs the script against `base`; what it printed.
async fn run(program: &str, script: &str, base: &str) -> String {
    let out = tokio::process::Command::new(program)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join(script))
        .env("BASE", base)
        .env_remove("OPENAI_API_KEY")
        .output()
        .await
        .expect("the SDK runs");
    assert!(
        out.status.success(),
        "{program} {script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

async fn the_sdk_sees_through_penstock_what_it_sees_directly(name: &str) {
    let Some((program, script)) = sdk(name) else {
        return;
    };
    let h = start(Behaviour::default()).await;
    let direct = run(program, script, &format!("{}/v1", h.fake.url())).await;
    let through = run(program, script, &format!("{}/v1", h.url)).await;
    assert_eq!(through, direct);
    assert!(through.contains("image 1 "), "{through}");
    let metrics = h.metrics().await;
    assert!(
        metrics.contains(
            r#"penstock_requests_total{route="responses",model="gpt-4.1-mini",status="200""#
        ),
        "{metrics}"
    );
    let tokens = sample(
        &metrics,
        r#"penstock_tokens_total{model="gpt-4.1-mini",kind="actual"}"#,
    );
    assert!(tokens > 0.0, "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_sdk_sees_through_penstock_what_it_sees_directly() {
    the_sdk_sees_through_penstock_what_it_sees_directly("python").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_sdk_sees_through_penstock_what_it_sees_directly() {
    the_sdk_sees_through_penstock_what_it_sees_directly("node").await;
}
