//! The one place the layer order lives. Reading [`build`] top to bottom is reading
//! a request's path through penstock.

use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use tower::ServiceBuilder;

use crate::config::Config;
use crate::telemetry::metrics::Metrics;
use crate::upstream::{self, Upstream};
use crate::vocab::body::{Body, BoxError};
use crate::{admission, cache, client_caps, edge, jobs, retry, spend};

/// What keeps the stack from being built; each names the config key.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Upstream(#[from] upstream::BuildError),
    #[error("project.key_envs: {0}")]
    Projects(String),
    #[error("state.redis_url: {0}")]
    Redis(String),
    #[error("{0}")]
    Jobs(String),
}

/// State the stack shares with the admin endpoints.
pub struct Shared {
    pub budgets: Arc<admission::Registry>,
    pub cache: cache::Handle,
    pub metrics: Arc<Metrics>,
    /// Bytes of request bodies held now.
    pub(crate) buffered: edge::Buffered,
    /// The Redis backend, when configured.
    pub(crate) redis: Option<Arc<crate::state::Redis>>,
    /// Async jobs, when enabled.
    pub(crate) jobs: Option<Arc<jobs::Jobs>>,
    /// The per-client caps, which a reload replaces.
    pub(crate) clients: client_caps::Layer,
    /// The spend caps and what each client spent.
    pub(crate) spend: spend::Layer,
    /// The upstream, for its health.
    pub(crate) upstream: Upstream,
}

/// The edge's parsing, for requests penstock makes itself (async jobs).
fn prepare(edge: Arc<edge::EdgeConfig>) -> crate::vocab::context::Prepare {
    Arc::new(move |req| {
        let edge = edge.clone();
        Box::pin(async move {
            let route = crate::vocab::route::Route::from_path(req.uri().path());
            edge::buffer(req, edge, route, tokio::time::Instant::now()).await
        })
    })
}

/// Builds the proxy service; `env` reads environment variables (the sidecar key).
pub fn build<B>(
    config: &Config,
    env: impl Fn(&str) -> Option<String>,
) -> Result<
    (
        impl tower::Service<
            Request<B>,
            Response = Response<Body>,
            Error = std::convert::Infallible,
            Future: Send,
        > + Clone
        + Send
        + 'static,
        Shared,
    ),
    BuildError,
>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let metrics = Arc::new(Metrics::new(&config.prices));
    let upstream = Upstream::several(&config.upstream, &env, Some(metrics.clone()))?;
    // Shared state: with Redis, every pool's ledger, the breaker and the cache
    // are shared by the replicas that name it.
    let redis = match config.state.backend {
        crate::config::Backend::Memory => None,
        crate::config::Backend::Redis => {
            let redis = crate::state::Redis::start(&config.state).map_err(BuildError::Redis)?;
            redis.set_config_hash(&config.hash());
            Some(redis)
        }
    };
    let budgets = Arc::new(admission::Registry::new(config, redis.clone()));
    budgets.evict_periodically();
    let mut edge = edge::EdgeConfig::new(config, metrics.clone());
    edge.add_projects(&config.projects, &env)
        .map_err(BuildError::Projects)?;
    let buffered = edge.buffered();
    let own_orgs = edge.own_orgs.clone();
    let edge = Arc::new(edge);
    // A config not read from a file has its data directory found now.
    let mut resolved = config.jobs.clone();
    if resolved.path.is_none() {
        let mut c = config.clone();
        c.resolve_paths(None, &env);
        resolved = c.jobs;
    }
    let jobs = match config.jobs.enabled {
        true => Some(
            jobs::Jobs::open(
                &resolved,
                config.retry.after_send,
                config.upstream.attempt_timeout,
                metrics.clone(),
                prepare(edge.clone()),
                redis.clone(),
                &env,
            )
            .map_err(BuildError::Jobs)?,
        ),
        false => None,
    };
    let cache = cache::Layer::new(
        &config.cache,
        config.retry.deadline,
        metrics.clone(),
        redis.clone(),
    );
    let cache_handle = cache.handle();
    let upstream_handle = upstream.clone();
    let clients = client_caps::Layer::new(&config.clients);
    // Spend: shared in Redis; else in a file when a cap is configured at
    // start (`spend.path`, beside the jobs), in memory otherwise.
    let ledger = match (&redis, config.caps_spend()) {
        (Some(redis), _) => spend::Ledger::Redis(redis.clone()),
        (None, true) => {
            let mut c = config.clone();
            c.resolve_paths(None, &env);
            spend::Ledger::local(c.spend.path.as_deref()).map_err(BuildError::Jobs)?
        }
        (None, false) => spend::Ledger::local(None).map_err(BuildError::Jobs)?,
    };
    let spend = spend::Layer::new(config, ledger, metrics.clone());
    let stack = ServiceBuilder::new()
        // Edge: body limit and one buffered copy, the parsed context with its cost
        // estimate, errors turned into OpenAI-shaped responses, and the log line;
        // outermost so it sees everything.
        .layer(edge::Layer::shared(edge))
        // Async jobs: a `Prefer: respond-async` request is stored and answered
        // at once, then runs through everything below with no client attached.
        .layer(jobs::Layer::new(jobs.clone()))
        // Coalescing and the cache: above retries and budgets, so a hit or a
        // coalesced request costs no attempt and no budget.
        .layer(cache)
        // Per-client caps: after the cache (a hit uses no quota), before retries
        // (a request counts once).
        .layer(clients.clone())
        // Spend caps: a call's price reserved before it goes (a hit is free, a
        // request reserves once for all its attempts), settled by its answer.
        .layer(spend.clone())
        // Retries of transient failures, above admission so that every attempt
        // waits for and pays its own budget (the upstream counts failed calls too).
        .layer(retry::Layer::new(&config.retry, metrics.clone()))
        // Admission: each attempt waits here, fairly, until its pool can pay.
        .layer(admission::Layer::new(
            budgets.clone(),
            metrics.clone(),
            own_orgs,
            Arc::new(upstream.clone()),
        ))
        // One attempt upstream, bounded by the per-attempt timeout.
        .service(upstream);
    Ok((
        stack,
        Shared {
            budgets,
            cache: cache_handle,
            metrics,
            buffered,
            redis,
            jobs,
            clients,
            spend,
            upstream: upstream_handle,
        },
    ))
}
