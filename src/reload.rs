//! Reloading the config while serving (SIGHUP, or the file changed). The new
//! file is loaded and validated as at start; a bad one changes nothing and is
//! logged once. A good one takes effect at once for new requests where it can
//! ([`LIVE_KEYS`]: budgets in place, client caps, the queue's limits), with
//! what waits, what is in flight, the cache and jobs kept; every other key
//! that changed is named and takes effect at the next start.

use std::path::Path;
use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::admin;
use crate::config::{Config, LIVE_KEYS};

/// How a reload went, as `/status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// RFC 3339.
    pub(crate) at: String,
    /// `"ok"`, or `"error"` (nothing changed).
    pub result: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The hash of the config in effect.
    pub hash: String,
    /// Keys applied by this reload.
    pub applied: Vec<String>,
    /// Keys changed in the file since the start that wait for the next one.
    pub restart_needed: Vec<String>,
    /// Budgets removed: their waiters went to the pools covering their models.
    pub removed_budgets: Vec<String>,
}

/// Applies reloads to a running penstock.
pub(crate) struct Reloader {
    state: Arc<admin::State>,
    /// The config the process started with: what cannot change live.
    started: Config,
    /// The config in effect.
    current: Mutex<Config>,
    /// The last error logged, so a file that stays bad is logged once.
    last_error: Mutex<Option<String>>,
}

fn now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Reloader {
    pub(crate) fn new(config: &Config, state: Arc<admin::State>) -> Reloader {
        Reloader {
            state,
            started: config.clone(),
            current: Mutex::new(config.clone()),
            last_error: Mutex::new(None),
        }
    }

    /// Loads `path` as at start and applies it.
    pub(crate) fn reload_file(&self, path: &Path) -> Outcome {
        match Config::load(path) {
            Ok(config) => self.apply(config),
            Err(e) => self.failed(e.to_string()),
        }
    }

    /// A file that cannot be used: nothing changes.
    pub(crate) fn failed(&self, error: String) -> Outcome {
        let shared = self.state.shared();
        shared.metrics.reloaded("error");
        let mut last = locked(&self.last_error);
        if last.as_deref() != Some(error.as_str()) {
            tracing::error!(error = %error, "config reload failed: nothing changed");
            *last = Some(error.clone());
        }
        drop(last);
        let outcome = Outcome {
            at: now(),
            result: "error",
            error: Some(error),
            hash: locked(&self.current).hash(),
            applied: Vec::new(),
            restart_needed: Vec::new(),
            removed_budgets: Vec::new(),
        };
        self.state.reloaded(None, serde_json::json!(outcome));
        outcome
    }

    /// Applies a validated config: the live keys now, the others named.
    pub(crate) fn apply(&self, new: Config) -> Outcome {
        let shared = self.state.shared();
        let mut current = locked(&self.current);
        let live = |key: &String| {
            LIVE_KEYS
                .iter()
                .any(|l| key == l || key.starts_with(&format!("{l}.")))
        };
        let applied: Vec<String> = current
            .changed_keys(&new)
            .into_iter()
            .filter(|k| live(k))
            .collect();
        let restart_needed: Vec<String> = self
            .started
            .changed_keys(&new)
            .into_iter()
            .filter(|k| !live(k))
            .collect();
        let mut removed = Vec::new();
        if applied
            .iter()
            .any(|k| k == "budget" || k.starts_with("queue."))
        {
            removed = shared
                .budgets
                .reconfigure(&new)
                .iter()
                .map(|n| n.to_string())
                .collect();
        }
        if applied.iter().any(|k| k == "client") {
            shared.clients.reload(&new.clients);
        }
        if applied
            .iter()
            .any(|k| k == "client" || k.starts_with("spend."))
        {
            shared.spend.reload(&new);
        }
        // What is in effect: the live keys from the file, the others as started.
        let mut effective = self.started.clone();
        effective.budgets = new.budgets.clone();
        effective.clients = new.clients.clone();
        effective.queue.max_wait = new.queue.max_wait;
        effective.queue.max_depth = new.queue.max_depth;
        effective.queue.batch_min_share = new.queue.batch_min_share;
        effective.spend.usd_per_day = new.spend.usd_per_day;
        effective.spend.usd_per_month = new.spend.usd_per_month;
        let hash = new.hash();
        if let Some(redis) = &shared.redis {
            redis.set_config_hash(&hash);
        }
        *current = effective;
        shared.metrics.reloaded("ok");
        *locked(&self.last_error) = None;
        tracing::info!(
            hash = %hash,
            applied = ?applied,
            removed_budgets = ?removed,
            "config reloaded"
        );
        if !restart_needed.is_empty() {
            tracing::warn!(
                keys = ?restart_needed,
                "changed in the config file, these take effect at the next start"
            );
        }
        let outcome = Outcome {
            at: now(),
            result: "ok",
            error: None,
            hash,
            applied,
            restart_needed,
            removed_budgets: removed,
        };
        self.state
            .reloaded(Some(&current), serde_json::json!(outcome));
        outcome
    }
}
