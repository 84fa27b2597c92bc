//! Listeners: the proxy (HTTP/1.1 and h2c) and the admin port, with graceful
//! shutdown that stops accepting, then lets in-flight requests finish within the
//! grace period.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin;
use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        addr: SocketAddr,
        what: &'static str,
        source: std::io::Error,
    },
    #[error(transparent)]
    Build(#[from] crate::stack::BuildError),
    #[error("admin.token_env: environment variable {0} is not set")]
    AdminToken(String),
}

/// A running penstock; [`Running::shutdown`] drains it.
pub struct Running {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    /// Told when every proxy thread has drained: until then each keeps its
    /// runtime running, as tasks one thread started (a pool's admission, a
    /// shared call) may serve another's requests.
    drained: watch::Sender<bool>,
    budgets: Arc<crate::admission::Registry>,
    grace: Duration,
    reloader: crate::reload::Reloader,
    spend: crate::spend::Layer,
}

impl Running {
    /// Loads the config file again and applies what can change live
    /// ([`crate::reload`]); a bad file changes nothing.
    pub fn reload_file(&self, path: &std::path::Path) -> crate::reload::Outcome {
        self.reloader.reload_file(path)
    }

    /// Applies a validated config ([`crate::reload`]).
    pub fn reload(&self, config: Config) -> crate::reload::Outcome {
        self.reloader.apply(config)
    }

    /// Stops accepting and waits for in-flight requests (up to the grace
    /// period). Requests waiting for budget keep their turn meanwhile; those
    /// still waiting shortly before the grace ends could not go in time and
    /// are answered then (503 `penstock_shutting_down`), while their
    /// connections are still open.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let (budgets, close) = (self.budgets.clone(), closing_time(self.grace));
        let closer = tokio::spawn(async move {
            tokio::time::sleep(close).await;
            budgets.close_queues();
        });
        for t in self.tasks {
            let _ = t.await;
        }
        closer.abort();
        // What was spent, written before the process ends.
        self.spend.flush();
        let _ = self.drained.send(true);
    }
}

/// When, into a shutdown's grace, requests still waiting for budget are
/// answered: a second before it ends (a quarter of a shorter grace), time to
/// write the answer.
fn closing_time(grace: Duration) -> Duration {
    grace.saturating_sub(Duration::from_secs(1).min(grace / 4))
}

/// Binds both listeners and starts serving. Every part of the stack is built
/// first: a part that cannot be built stops startup rather than being skipped.
pub async fn start(
    config: &Config,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Running, StartError> {
    let admin_token = match &config.admin.token_env {
        Some(var) => Some(
            env(var)
                .filter(|t| !t.trim().is_empty())
                .ok_or_else(|| StartError::AdminToken(var.clone()))?,
        ),
        None => None,
    };
    let (stack, shared) = crate::stack::build::<Incoming>(config, env)?;
    if let Some(redis) = &shared.redis {
        redis.first_contact(redis.contact_time()).await;
    }
    let threads = match config.server.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let proxy = listen(config.listen, threads > 1).map_err(|source| StartError::Bind {
        addr: config.listen,
        what: "listen",
        source,
    })?;
    let admin_listener = TcpListener::bind(config.admin_listen)
        .await
        .map_err(|source| StartError::Bind {
            addr: config.admin_listen,
            what: "admin_listen",
            source,
        })?;
    let addr = proxy.local_addr().expect("bound socket has an address");
    // Whatever keeps the proxy port from being served (another socket on
    // it, a thread or runtime that cannot start) is reported against it.
    let proxy_err = |source| StartError::Bind {
        addr,
        what: "listen",
        source,
    };
    let admin_addr = admin_listener
        .local_addr()
        .expect("bound socket has an address");

    let budgets = shared.budgets.clone();
    let spend = shared.spend.clone();
    let state = Arc::new(admin::State::new(config, shared, admin_token.as_deref()));
    state.sample_periodically();
    let reloader = crate::reload::Reloader::new(config, state.clone());
    let (stop, stopped) = watch::channel(false);
    let grace = config.server.shutdown_grace;

    let limits = Limits {
        // One cap for all the proxy's threads.
        slots: Arc::new(tokio::sync::Semaphore::new(connection_cap(
            config.server.max_connections,
        ))),
        header_read_timeout: config.server.header_read_timeout,
    };
    // The edge is always ready (it waits inside calls), so each request calls
    // it directly: no `oneshot` keeping room for a service and a request for
    // the request's whole life.
    let proxy_svc = service_fn(move |req| crate::vocab::service::call_now(&mut stack.clone(), req));
    let mut tasks = Vec::new();
    let (drained, all_drained) = watch::channel(false);
    if threads <= 1 {
        let proxy = TcpListener::from_std(proxy).map_err(proxy_err)?;
        tasks.push(tokio::spawn(serve(
            proxy,
            limits.clone(),
            proxy_svc,
            stopped.clone(),
            grace,
            Some(state.clone()),
        )));
    } else {
        // One runtime per thread, each accepting on its own socket: a
        // request's tasks, timers and upstream connection stay on the thread
        // that accepted it, with no hand-over between threads.
        let mut listeners = vec![proxy];
        for _ in 1..threads {
            listeners.push(listen(addr, true).map_err(proxy_err)?);
        }
        for (i, listener) in listeners.into_iter().enumerate() {
            let (done, finished) = tokio::sync::oneshot::channel::<()>();
            let (limits, svc, stopped, state) = (
                limits.clone(),
                proxy_svc.clone(),
                stopped.clone(),
                state.clone(),
            );
            let mut all_drained = all_drained.clone();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(proxy_err)?;
            std::thread::Builder::new()
                .name(format!("penstock-proxy-{i}"))
                .spawn(move || {
                    runtime.block_on(async move {
                        match TcpListener::from_std(listener) {
                            Ok(listener) => {
                                serve(listener, limits, svc, stopped, grace, Some(state)).await
                            }
                            Err(e) => tracing::error!(error = %e, "a proxy thread cannot listen"),
                        }
                        let _ = done.send(());
                        // A closed channel (penstock dropped) ends the wait too.
                        let _ = all_drained.wait_for(|d| *d).await;
                    });
                })
                .map_err(proxy_err)?;
            tasks.push(tokio::spawn(async move {
                let _ = finished.await;
            }));
        }
    }
    let admin_state = state.clone();
    let admin_svc = service_fn(move |req| admin::handle(admin_state.clone(), req));
    // The admin port has a few connections of its own, apart from the proxy's.
    let admin_limits = Limits {
        slots: Arc::new(tokio::sync::Semaphore::new(ADMIN_CONNECTIONS)),
        header_read_timeout: config.server.header_read_timeout,
    };
    tasks.push(tokio::spawn(serve(
        admin_listener,
        admin_limits,
        admin_svc,
        stopped,
        grace,
        None,
    )));
    state.ready.store(true, Ordering::Release);
    tracing::info!(%addr, %admin_addr, threads, upstream = %crate::vocab::url::BaseUrl::redact(&config.upstream.base_url), "penstock listening");
    Ok(Running {
        addr,
        admin_addr,
        stop,
        tasks,
        drained,
        budgets,
        grace,
        reloader,
        spend,
    })
}

/// Connections the admin listener serves at once.
const ADMIN_CONNECTIONS: usize = 64;

/// File descriptors kept for everything but client connections: the admin
/// port, listeners, logs.
const RESERVED_FDS: u64 = 128;

/// What one listener allows its clients.
#[derive(Clone)]
struct Limits {
    /// Open connections, shared by the listener's threads.
    slots: Arc<tokio::sync::Semaphore>,
    header_read_timeout: Duration,
}

/// A listening socket on `addr` (backlog 1024, `SO_REUSEADDR` as tokio's
/// own); with `shared`, `SO_REUSEPORT` too, so that each proxy thread can
/// have its own.
fn listen(addr: SocketAddr, shared: bool) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    #[cfg(unix)]
    {
        socket.set_reuse_address(true)?;
        if shared {
            socket.set_reuse_port(true)?;
        }
    }
    #[cfg(not(unix))]
    let _ = shared;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Raises the soft open-file limit to the hard one, and caps client
/// connections so that each, with its upstream connection, fits under it.
fn connection_cap(configured: usize) -> usize {
    let soft = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read or raise the open-file limit");
            return configured;
        }
    };
    let fit = usize::try_from(soft.saturating_sub(RESERVED_FDS + ADMIN_CONNECTIONS as u64) / 2)
        .unwrap_or(usize::MAX)
        .max(1);
    if fit < configured {
        tracing::warn!(
            open_files = soft,
            max_connections = fit,
            "server.max_connections lowered to fit the open-file limit"
        );
    }
    configured.min(fit)
}

async fn serve<S>(
    listener: TcpListener,
    limits: Limits,
    svc: S,
    mut stopped: watch::Receiver<bool>,
    grace: Duration,
    readiness: Option<Arc<admin::State>>,
) where
    S: hyper::service::Service<
            hyper::Request<Incoming>,
            Response = hyper::Response<crate::vocab::body::Body>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // hyper's header-read timeout is off unless a timer is set; it also closes
    // keep-alive connections idle that long.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(limits.header_read_timeout))
        .keep_alive_timeout(limits.header_read_timeout);
    let graceful = GracefulShutdown::new();
    let pacer = tokio::spawn(pace(limits.header_read_timeout / 4));
    let slots = limits.slots;
    loop {
        // At the cap, stop accepting: further connections wait in the backlog.
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
            _ = stopped_signal(&mut stopped) => break,
        };
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        // Out of file descriptors and the like: back off, keep serving.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let conn = builder.serve_connection(TokioIo::new(stream), svc.clone()).into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                    drop(slot);
                });
            }
            _ = stopped_signal(&mut stopped) => break,
        }
    }
    pacer.abort();
    if let Some(state) = readiness {
        state.ready.store(false, Ordering::Release);
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(grace) => {
            tracing::warn!(grace = %humantime::format_duration(grace), "grace period over; closing remaining connections");
        }
    }
}

/// Keeps a timer due within `period` on this thread's runtime. tokio wakes its
/// own driver (a write to an eventfd, and one more turn of the event loop)
/// whenever a timer is set earlier than the one the driver last slept toward.
/// While a call waited on the upstream, only its long timeouts were pending,
/// so the header-read timer of the connection's next request did that once per
/// request. With this timer pending, later timers never come first: one wake
/// per `period` instead of a syscall per request.
async fn pace(period: Duration) {
    let mut tick = tokio::time::interval(period.max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
    }
}

async fn stopped_signal(stopped: &mut watch::Receiver<bool>) {
    // A closed channel means the owner is gone: stop too.
    let _ = stopped.wait_for(|s| *s).await;
}
