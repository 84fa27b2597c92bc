//! TLS to the upstream: the fake serves HTTPS with a certificate from a private CA
//! (made here with rcgen), and penstock trusts it only through `ca_file`.

use std::sync::Arc;

use crate::support::*;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

struct Pki {
    ca_pem: String,
    server: Arc<rustls::ServerConfig>,
}

fn private_ca() -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
    let mut server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![leaf.der().clone()],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
    )
    .unwrap();
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Pki {
        ca_pem: ca.pem(),
        server: Arc::new(server),
    }
}

#[tokio::test]
async fn private_ca_from_ca_file_is_trusted_and_http2_is_negotiated() {
    let pki = private_ca();
    let fake = Fake::start_tls(Behaviour::default(), pki.server).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &pki.ca_pem).unwrap();

    let mut config = config_for(&format!("https://localhost:{}", fake.addr().port()));
    config.upstream.ca_file = Some(ca_file);
    let p = penstock::start(&config, |_| None).await.unwrap();
    let resp = http()
        .post(format!("http://{}/v1/images/generations", p.addr))
        .json(&serde_json::json!({"model": "gpt-image-1", "prompt": "over tls"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let seen = &fake.requests()[0];
    assert_eq!(seen.version, http::Version::HTTP_2, "ALPN picked h2");
    assert_eq!(seen.path, "/v1/images/generations");
    // Calls at once share the one HTTP/2 connection.
    let calls = (0..4).map(|_| http().get(format!("http://{}/v1/models", p.addr)).send());
    for resp in futures_util::future::join_all(calls).await {
        assert_eq!(resp.unwrap().status(), 200);
    }
    assert_eq!(fake.connections(), 1, "one multiplexed connection");
}

#[tokio::test]
async fn an_untrusted_certificate_is_a_502_not_a_silent_downgrade() {
    let pki = private_ca();
    let fake = Fake::start_tls(Behaviour::default(), pki.server).await;
    let config = config_for(&format!("https://localhost:{}", fake.addr().port()));
    let p = penstock::start(&config, |_| None).await.unwrap();
    let resp = http()
        .get(format!("http://{}/v1/models", p.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 502);
    let v = json(resp).await;
    assert_eq!(v["error"]["code"], "penstock_upstream_unreachable");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("certificate"),
        "{v}"
    );
    assert_eq!(fake.calls(), 0);
}

#[test]
fn a_ca_file_without_certificates_stops_startup() {
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("empty.pem");
    std::fs::write(&ca_file, "not a certificate\n").unwrap();
    let mut config = config_for("https://localhost:1");
    config.upstream.ca_file = Some(ca_file);
    let err = penstock::upstream::Upstream::new(&config.upstream, |_| None, None)
        .err()
        .expect("startup error");
    assert!(err.to_string().starts_with("upstream.ca_file: "), "{err}");
}

/// Against the real API a new connection costs a TLS handshake before a call
/// can leave on it: the first window's calls wait for it, the next window's
/// go at once on the warm connection. Were each counted from its admission,
/// the upstream would see both windows' calls within one second; counted
/// from when it left, it never sees more than its limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_that_waited_for_a_handshake_are_counted_from_when_they_left() {
    let pki = private_ca();
    let fake = Fake::start_tls(
        Behaviour {
            handshake_delay: std::time::Duration::from_millis(300),
            ..ten_per_second()
        },
        pki.server,
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &pki.ca_pem).unwrap();
    let mut config = config_for(&format!("https://localhost:{}", fake.addr().port()));
    config.upstream.ca_file = Some(ca_file);
    config.retry.max_attempts = 1;
    config.budgets = vec![penstock::config::BudgetConfig {
        models: vec!["gpt-image-*".into()],
        rpm: Some(600),
        ..Default::default()
    }];
    let p = penstock::start(&config, |_| None).await.unwrap();
    let calls = (0..20).map(|i| {
        http()
            .post(format!("http://{}/v1/images/generations", p.addr))
            .json(&serde_json::json!({"model": "gpt-image-1", "prompt": format!("cold {i}")}))
            .send()
    });
    let statuses: Vec<u16> = futures_util::future::join_all(calls)
        .await
        .into_iter()
        .map(|r| r.unwrap().status().as_u16())
        .collect();
    assert_eq!(fake.answered(429), 0, "{statuses:?}");
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let status = status_at(&format!("http://{}", p.admin_addr)).await;
    let late = status["pools"][0]["late_departures"].as_u64().unwrap();
    assert!(late >= 1, "{status}");
}
