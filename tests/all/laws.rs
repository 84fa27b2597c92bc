//! Laws, checked on generated inputs: the ledger never admits more than a limit
//! within any window; the estimator never panics or overflows on any body; two
//! requests get the same cache key exactly when they mean the same.

use std::time::Duration;

use penstock::admission::ledger::{Ledger, Limits};
use penstock::config::EstimateConfig;
use penstock::edge::estimate::{self, Estimator, InputImage, MultipartSummary};
use penstock::vocab::cost::Cost;
use penstock::vocab::headers::{RateLimitHeaders, Remaining};
use penstock::vocab::json::Json;
use penstock::vocab::route::Route;
use proptest::prelude::*;
use serde_json::{Map, Value};
use tokio::time::Instant;

#[derive(Debug, Clone)]
enum Step {
    /// Time passes, in milliseconds.
    Wait(u64),
    /// A call of this cost asks to be admitted (it is, if the ledger says it fits).
    Ask(Cost),
    /// An admitted call (by index, modulo) turns out to have cost less.
    Refund(usize, u8),
    /// The upstream reports what remains, for the last admitted call.
    Hint(u64, u64),
    /// The upstream paused the pool for this many milliseconds.
    Pause(u64),
}

fn cost(max: u64) -> impl Strategy<Value = Cost> {
    (1..=3u64, 0..=max, 0..=4u64).prop_map(|(requests, tokens, images)| Cost {
        requests,
        tokens,
        images,
    })
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    let step = prop_oneof![
        3 => (0..1500u64).prop_map(Step::Wait),
        5 => cost(3000).prop_map(Step::Ask),
        1 => (any::<usize>(), any::<u8>()).prop_map(|(i, f)| Step::Refund(i, f)),
        1 => (0..5000u64, 0..2000u64).prop_map(|(r, ms)| Step::Hint(r, ms)),
        1 => (0..3000u64).prop_map(Step::Pause),
    ];
    prop::collection::vec(step, 1..200)
}

/// The sums of the counted costs of the calls admitted within any `window`.
fn worst_window(calls: &[(Instant, [u64; 3])], window: Duration) -> [u64; 3] {
    let mut worst = [0u64; 3];
    for (i, (start, _)) in calls.iter().enumerate() {
        let mut sum = [0u64; 3];
        let mut count = [0; 3];
        for (at, c) in &calls[i..] {
            if *at >= *start + window {
                break;
            }
            for d in 0..3 {
                sum[d] += c[d];
                count[d] += usize::from(c[d] > 0);
            }
        }
        // A lone call larger than the burst goes when the window is empty (of
        // that dimension).
        for d in 0..3 {
            if count[d] > 1 {
                worst[d] = worst[d].max(sum[d]);
            }
        }
    }
    worst
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn the_ledger_never_admits_more_than_a_limit_in_any_window(
        rpm in 30..600u64,
        tpm in 5_000..200_000u64,
        ipm in 5..120u64,
        safety in 0.5..=1.0f64,
        steps in steps(),
    ) {
        let limits = Limits {
            per_minute: [Some(rpm), Some(tpm), Some(ipm)],
            burst: Duration::from_secs(1),
            margin: Duration::ZERO,
            safety,
        };
        let mut ledger = Ledger::new(limits);
        let caps = ledger.burst_caps();
        let mut now = Instant::now();
        let mut calls: Vec<(Instant, [u64; 3])> = Vec::new();
        let mut tickets = Vec::new();
        for step in steps {
            match step {
                Step::Wait(ms) => now += Duration::from_millis(ms),
                Step::Ask(c) => {
                    let c = Cost {
                        requests: c.requests.min(rpm),
                        tokens: c.tokens.min(tpm),
                        images: c.images.min(ipm),
                    };
                    if ledger.ready_at(now, &c) <= now {
                        tickets.push((ledger.charge(now, &c), calls.len()));
                        calls.push((now, c.dims()));
                    }
                }
                Step::Refund(i, f) if !tickets.is_empty() => {
                    let (ticket, idx) = tickets[i % tickets.len()];
                    let old = calls[idx].1;
                    let less = old.map(|v| v * u64::from(f) / 255);
                    ledger.settle(ticket, &Cost { requests: less[0], tokens: less[1], images: less[2] });
                    calls[idx].1 = less;
                }
                Step::Refund(..) => {}
                Step::Hint(remaining, ms) => {
                    if let Some(&(ticket, _)) = tickets.last() {
                        let r = Some(Remaining { remaining, reset: Duration::from_millis(ms) });
                        ledger.observe(now, ticket.at, &RateLimitHeaders { requests: r, tokens: r, images: None, ..RateLimitHeaders::default() });
                    }
                }
                Step::Pause(ms) => ledger.pause(now + Duration::from_millis(ms)),
            }
        }
        let burst = worst_window(&calls, limits.burst);
        let minute = worst_window(&calls, Duration::from_secs(60));
        for d in 0..3 {
            prop_assert!(burst[d] <= caps[d], "burst {d}: {} > {}", burst[d], caps[d]);
            prop_assert!(minute[d] <= limits.per_minute[d].unwrap(), "minute {d}: {}", minute[d]);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    /// Under demand that never lets up, the ledger admits at least the limit
    /// (times the safety fraction) for the time elapsed, less one window's
    /// capacity: no rounding loses a share of the limit.
    #[test]
    fn over_a_long_run_the_ledger_admits_the_whole_limit(
        per_minute in 5..20_000u64,
        safety in 0.5..=1.0f64,
        burst_ms in 200..5_000u64,
        minutes in 1..6u64,
    ) {
        let limits = Limits {
            per_minute: [Some(per_minute), None, None],
            burst: Duration::from_millis(burst_ms),
            margin: Duration::ZERO,
            safety,
        };
        let mut ledger = Ledger::new(limits);
        let window = ledger.burst_caps()[0];
        let one = Cost { requests: 1, tokens: 0, images: 0 };
        let start = Instant::now();
        let end = start + Duration::from_secs(60 * minutes);
        let mut now = start;
        let mut admitted = 0u64;
        while now < end {
            let at = ledger.ready_at(now, &one);
            if at > now {
                now = at;
                continue;
            }
            ledger.charge(now, &one);
            admitted += 1;
        }
        let elapsed = (now - start).as_secs_f64().min(60.0 * minutes as f64);
        let owed = per_minute as f64 * safety * elapsed / 60.0 - window as f64;
        prop_assert!(
            admitted as f64 >= owed.floor(),
            "{admitted} admitted, at least {owed} owed"
        );
    }
}

/// JSON of the shapes the estimator reads, with numbers anywhere in u64, and
/// strings of any characters.
fn json() -> impl Strategy<Value = Value> {
    let keys = prop::sample::select(vec![
        "model",
        "n",
        "max_tokens",
        "max_completion_tokens",
        "max_output_tokens",
        "messages",
        "content",
        "prompt",
        "size",
        "quality",
        "partial_images",
        "stream",
        "input",
        "instructions",
        "images",
        "tools",
        "type",
        "text",
        "input_fidelity",
    ]);
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,40}".prop_map(Value::String),
        prop::sample::select(vec![
            "auto",
            "high",
            "low",
            "1024x1024",
            "99999999999x99999999999",
            "x",
            "hd"
        ])
        .prop_map(|s| Value::String(s.to_string())),
    ];
    leaf.prop_recursive(4, 64, 8, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((keys.clone(), inner), 0..8).prop_map(|kv| {
                Value::Object(
                    kv.into_iter()
                        .map(|(k, v)| (k.to_string(), v))
                        .collect::<Map<_, _>>(),
                )
            }),
        ]
    })
}

const ROUTES: [Route; 9] = [
    Route::ImagesGenerations,
    Route::ImagesEdits,
    Route::ImagesVariations,
    Route::ChatCompletions,
    Route::Completions,
    Route::Responses,
    Route::Embeddings,
    Route::Models,
    Route::Other,
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn no_json_body_makes_the_estimate_panic_or_wrap(v in json()) {
        let e = Estimator::new(&EstimateConfig::default()).unwrap();
        let text = v.to_string();
        let v: Json = serde_json::from_str(&text).unwrap();
        for route in ROUTES {
            let c = e.estimate(route, v.get("model").and_then(Json::as_str), estimate::Body::Json(&v));
            prop_assert!(c.requests == 1);
            let _ = estimate::image_ask(route, estimate::Body::Json(&v));
        }
    }

    #[test]
    fn no_multipart_fields_make_the_estimate_panic_or_wrap(
        fields in prop::collection::hash_map(
            prop::sample::select(vec!["model", "n", "size", "quality", "prompt", "partial_images", "stream", "input_fidelity"]),
            prop_oneof![".{0,20}", "[0-9]{1,25}", Just("18446744073709551615".to_string())],
            0..8,
        ),
        images in prop::collection::vec(prop::option::of((any::<u32>(), any::<u32>())), 0..16),
    ) {
        let m = MultipartSummary {
            fields: fields.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            images: images.into_iter().map(|size| InputImage { size }).collect(),
            digest: [0; 32],
        };
        let e = Estimator::new(&EstimateConfig::default()).unwrap();
        for route in [Route::ImagesEdits, Route::ImagesVariations, Route::ImagesGenerations] {
            e.estimate(route, Some("gpt-image-1"), estimate::Body::Multipart(&m));
        }
    }

    #[test]
    fn equal_meaning_means_an_equal_cache_key(v in json(), indent in any::<bool>()) {
        // The same value written twice: keys in one order and in the reverse
        // order, with other spacing.
        prop_assert_eq!(key(&write(&v, false, false)), key(&write(&v, true, indent)));
    }

    #[test]
    fn a_different_meaning_means_a_different_cache_key(a in json(), b in json()) {
        prop_assume!(a != b);
        prop_assert_ne!(key(&a.to_string()), key(&b.to_string()));
    }
}

/// JSON text with every object's keys in order or reversed, spaced or not.
fn write(v: &Value, reverse: bool, spaced: bool) -> String {
    let sep = if spaced { " \n  " } else { "" };
    match v {
        Value::Object(o) => {
            let mut entries: Vec<_> = o.iter().collect();
            if reverse {
                entries.reverse();
            }
            let parts: Vec<String> = entries
                .into_iter()
                .map(|(k, x)| {
                    format!(
                        "{sep}{}:{sep}{}",
                        Value::from(k.as_str()),
                        write(x, reverse, spaced)
                    )
                })
                .collect();
            format!("{{{}{sep}}}", parts.join(","))
        }
        Value::Array(a) => {
            let parts: Vec<String> = a
                .iter()
                .map(|x| format!("{sep}{}", write(x, reverse, spaced)))
                .collect();
            format!("[{}]", parts.join(","))
        }
        other => other.to_string(),
    }
}

/// The cache-key hash of a JSON text, read as penstock reads bodies.
fn key(text: &str) -> [u8; 32] {
    let v: Json = serde_json::from_str(text).unwrap();
    let mut h = blake3::Hasher::new();
    penstock::edge::parse::hash_json(&mut h, &v);
    h.finalize().into()
}

/// What a caller does to a learned pool whose upstream refuses nothing.
#[derive(Debug, Clone)]
enum Use {
    /// A call asks to be admitted.
    Ask(Cost),
    /// An admitted call (by index, modulo) is answered without a rate limit,
    /// announcing nothing, and ends.
    Answer(usize),
    /// Time passes, in milliseconds.
    Wait(u64),
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 100, failure_persistence: None, ..ProptestConfig::default() })]

    /// Against an upstream that refuses nothing and announces nothing (OpenAI's
    /// images API with room to spare), a learned pool adds no wait to any call
    /// up to its ceiling of calls in flight.
    #[test]
    fn a_learned_pool_adds_no_wait_while_the_upstream_refuses_nothing(
        uses in prop::collection::vec(prop_oneof![
            4 => cost(100_000).prop_map(Use::Ask),
            3 => any::<usize>().prop_map(Use::Answer),
            1 => (0..5000u64).prop_map(Use::Wait),
        ], 1..300),
    ) {
        use penstock::admission::learn::Learner;
        use penstock::admission::pool::{Pool, Settings};
        const CEILING: usize = 64;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async {
            let pool = Pool::start(
                "learned:m".into(),
                "cred".into(),
                Settings {
                    limits: Limits {
                        per_minute: [None; 3],
                        burst: Duration::from_secs(1),
                        margin: Duration::from_millis(50),
                        safety: 0.95,
                    },
                    max_in_flight: None,
                    probe_grace: Duration::from_secs(2),
                    learner: Some(Learner::new(CEILING)),
                    remote: None,
                },
                std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0)),
                10_000,
            );
            let client: std::sync::Arc<str> = "c".into();
            let mut out = Vec::new();
            for u in uses {
                match u {
                    Use::Ask(c) if out.len() < CEILING => {
                        let asked = Instant::now();
                        let permit = pool.acquire(&client, c, Duration::from_secs(600)).await;
                        let permit = permit.map_err(|e| TestCaseError::fail(e.to_string()))?;
                        prop_assert_eq!(Instant::now(), asked, "a call waited");
                        prop_assert_eq!(permit.queued, Duration::ZERO);
                        out.push(permit);
                    }
                    Use::Ask(_) => {}
                    Use::Answer(i) if !out.is_empty() => {
                        let permit = out.swap_remove(i % out.len());
                        permit.learn(&RateLimitHeaders::default(), false);
                    }
                    Use::Answer(_) => {}
                    Use::Wait(ms) => tokio::time::advance(Duration::from_millis(ms)).await,
                }
            }
            Ok(())
        })?;
    }
}

/// URLs made of parts a hostile client might combine against the prefix
/// `https://hooks.example.com/penstock`.
fn webhook_url() -> impl Strategy<Value = String> {
    let scheme = prop::sample::select(vec!["https", "http", "HTTPS", "ftp"]);
    let userinfo = prop::sample::select(vec![
        "",
        "u@",
        "u:p@",
        "hooks.example.com@",
        "hooks.example.com:443@",
    ]);
    let host = prop::sample::select(vec![
        "hooks.example.com",
        "HOOKS.EXAMPLE.COM",
        "hooks.example.com.evil.net",
        "evil.net",
        "hooks.example.co",
        "xhooks.example.com",
    ]);
    let port = prop::sample::select(vec!["", ":443", ":80", ":1234", ":8443"]);
    let path = prop::sample::select(vec![
        "",
        "/",
        "/penstock",
        "/penstock/",
        "/penstock/jobs",
        "/penstockx",
        "/penstock/../admin",
        "/penstock/%2e%2e/admin",
        "/other",
        "/Penstock",
    ]);
    let query = prop::sample::select(vec!["", "?a=1", "#f"]);
    (scheme, userinfo, host, port, path, query)
        .prop_map(|(s, u, h, p, pa, q)| format!("{s}://{u}{h}{p}{pa}{q}"))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

    /// A URL is allowed exactly when another parser (the `url` crate's) sees
    /// the prefix's scheme, host and port, no user or password, no dot
    /// segments, and a path at or below the prefix's, at a `/`.
    #[test]
    fn a_webhook_url_is_allowed_exactly_under_its_prefix(url in webhook_url()) {
        use penstock::vocab::url::UrlPrefix;
        let prefix = UrlPrefix::parse("https://hooks.example.com/penstock").unwrap();
        let allowed = prefix.allows(&url);
        let expected = reqwest::Url::parse(&url).ok().is_some_and(|u| {
            let raw_path = url
                .split_once("://")
                .map(|(_, rest)| rest)
                .and_then(|rest| rest.find('/').map(|i| &rest[i..]))
                .unwrap_or("");
            let raw_path = raw_path.split(['?', '#']).next().unwrap_or("");
            u.scheme() == "https"
                && u.username().is_empty()
                && u.password().is_none()
                && u.host_str() == Some("hooks.example.com")
                && u.port_or_known_default() == Some(443)
                && !raw_path.contains("..")
                && !raw_path.to_ascii_lowercase().contains("%2e")
                && (u.path() == "/penstock" || u.path().starts_with("/penstock/"))
        });
        prop_assert_eq!(allowed, expected, "{}", url);
    }
}
