//! Telling a job's webhook that it ended: signed as Standard Webhooks
//! specifies (`webhook-id`, `webhook-timestamp`, `webhook-signature`), with
//! retries and a doubling pause, the delivery's state kept on the job. A
//! request may name its own webhook only under `jobs.webhook_prefixes`,
//! compared by parts.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http::Request;
use http_body_util::Full;

use super::{Delivery, Job, Jobs, now_ms};
use crate::config::JobsConfig;

type Client = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
>;

/// Where and how jobs' ends are told.
pub(super) struct Webhook {
    /// `jobs.webhook_prefixes`, parsed: compared by scheme, host, port and
    /// path segments.
    prefixes: Vec<crate::vocab::url::UrlPrefix>,
    /// `jobs.webhook_secret_env`'s key: no webhook is told without it.
    secret: Option<Vec<u8>>,
    client: Client,
}

impl Webhook {
    pub(super) fn new(
        config: &JobsConfig,
        env: &impl Fn(&str) -> Option<String>,
    ) -> Result<Webhook, String> {
        let secret = match &config.webhook_secret_env {
            Some(name) => {
                let value = env(name).ok_or_else(|| {
                    format!("jobs.webhook_secret_env: environment variable {name} is not set")
                })?;
                let encoded = value.strip_prefix("whsec_").unwrap_or(&value);
                Some(
                    base64::engine::general_purpose::STANDARD
                        .decode(encoded)
                        .map_err(|_| {
                            format!(
                                "jobs.webhook_secret_env: {name} is not whsec_ followed by base64"
                            )
                        })?,
                )
            }
            None => None,
        };
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        })
        .with_no_client_auth();
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build();
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build(https);
        let prefixes = config
            .webhook_prefixes
            .iter()
            .map(|p| crate::vocab::url::UrlPrefix::parse(p))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("jobs.webhook_prefixes: {e}"))?;
        Ok(Webhook {
            prefixes,
            secret,
            client,
        })
    }

    /// A request may name `url` as its webhook: it is under an allowed
    /// prefix, and deliveries can be signed.
    pub(super) fn allows(&self, url: &str) -> bool {
        self.secret.is_some() && self.prefixes.iter().any(|p| p.allows(url))
    }
}

impl Jobs {
    /// Tells the job's webhook, signed as Standard Webhooks specifies, with
    /// retries and a doubling pause; its state is kept on the job.
    pub(super) async fn deliver(self: Arc<Self>, job: Job) {
        let (Some(delivery), Some(secret)) = (job.webhook.clone(), self.webhook.secret.clone())
        else {
            return;
        };
        let data = self.view(&job, true).await.unwrap_or_default();
        let payload = serde_json::json!({
            "type": format!("job.{}", job.state.label()),
            "timestamp": now_ms() / 1000,
            "data": data,
        })
        .to_string();
        let msg_id = format!("msg_{}", job.id);
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret);
        let mut pause = self.config.webhook_backoff;
        let mut delivery = delivery;
        for attempt in 1..=self.config.webhook_attempts.max(1) {
            let ts = (now_ms() / 1000).to_string();
            let signed = format!("{msg_id}.{ts}.{payload}");
            let sig = base64::engine::general_purpose::STANDARD
                .encode(ring::hmac::sign(&key, signed.as_bytes()).as_ref());
            let req = Request::post(delivery.url.as_str())
                .header("content-type", "application/json")
                .header("webhook-id", msg_id.as_str())
                .header("webhook-timestamp", ts.as_str())
                .header("webhook-signature", format!("v1,{sig}"))
                .body(Full::new(Bytes::from(payload.clone())));
            let outcome = match req {
                Ok(req) => {
                    match tokio::time::timeout(
                        Duration::from_secs(30),
                        self.webhook.client.request(req),
                    )
                    .await
                    {
                        Ok(Ok(resp)) if resp.status().is_success() => Ok(()),
                        Ok(Ok(resp)) => Err(format!("answered {}", resp.status())),
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(_) => Err("timed out".to_string()),
                    }
                }
                Err(e) => Err(e.to_string()),
            };
            delivery.attempts = attempt;
            match outcome {
                Ok(()) => {
                    delivery.state = "delivered".into();
                    delivery.last_error = None;
                    self.metrics.webhook("delivered");
                    self.record_delivery(&job.id, &delivery).await;
                    return;
                }
                Err(e) => {
                    delivery.last_error = Some(e);
                    let last = attempt >= self.config.webhook_attempts;
                    delivery.state = if last { "failed" } else { "pending" }.into();
                    self.metrics
                        .webhook(if last { "gave_up" } else { "failed" });
                    self.record_delivery(&job.id, &delivery).await;
                    if last {
                        return;
                    }
                    tokio::time::sleep(pause).await;
                    pause = pause.saturating_mul(2);
                }
            }
        }
    }

    async fn record_delivery(&self, id: &str, delivery: &Delivery) {
        if let Ok(Some(mut job)) = self.load(id).await
            && job.state.is_done()
        {
            job.webhook = Some(delivery.clone());
            let _ = self.change(&job, &[job.state], None).await;
        }
    }
}
