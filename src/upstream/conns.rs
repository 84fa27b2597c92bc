//! Connections to the upstream, pooled per proxy thread.
//!
//! Each thread keeps its own idle HTTP/1.1 connections (and, when ALPN picks
//! HTTP/2, one multiplexed connection), so a request takes a connection its own
//! runtime drives, with no lock shared between threads and no task spawned per
//! request. A connection goes back to its thread's pool when its answer's body
//! has been read to the end; one whose body was dropped part way is closed.
//! A request the upstream never saw because a reused connection had just
//! closed goes again on another connection.

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::uri::{PathAndQuery, Uri};
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::{Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::Instant;
use tower::Service;

use crate::vocab::context::Departure;
use crate::vocab::url::BaseUrl;

type Body = Full<Bytes>;

/// Why no answer came.
#[derive(Debug)]
pub(crate) enum SendError {
    /// No connection could be made.
    Connect(String),
    /// The connection failed while the request was sent or answered.
    Connection(String),
}

/// Connections tried for one request before it fails unsent.
const SEND_TRIES: usize = 4;

/// A pool of upstream connections, one set per thread that uses it.
pub(crate) struct Conns {
    connector: HttpsConnector<HttpConnector>,
    /// Where connections go; HTTP/2 requests carry its scheme and authority.
    base: BaseUrl,
    /// `Host` of HTTP/1.1 requests.
    host: HeaderValue,
    idle_timeout: Duration,
    h2: http2::Builder<TokioExecutor>,
    local: thread_local::ThreadLocal<Arc<Mutex<Local>>>,
}

/// One thread's connections.
#[derive(Default)]
struct Local {
    /// Idle HTTP/1.1 connections, the most recently used last.
    idle: Vec<(http1::SendRequest<Body>, Instant)>,
    /// The thread's HTTP/2 connection, once ALPN has chosen HTTP/2.
    h2: Option<http2::SendRequest<Body>>,
}

/// An HTTP/1.1 connection lent to one request; [`Lent::give_back`] returns
/// it to the pool it came from.
pub(crate) struct Lent {
    sender: http1::SendRequest<Body>,
    home: Arc<Mutex<Local>>,
}

impl Lent {
    /// Returns the connection to its pool: its answer has been read whole.
    pub(crate) fn give_back(self) {
        if self.sender.is_closed() {
            return;
        }
        let mut local = self.home.lock().unwrap_or_else(|e| e.into_inner());
        local.idle.push((self.sender, Instant::now()));
    }
}

enum Checkout {
    /// An HTTP/1.1 connection; whether it was reused rather than made.
    H1(http1::SendRequest<Body>, bool),
    H2(http2::SendRequest<Body>),
}

impl Conns {
    pub(crate) fn new(
        connector: HttpsConnector<HttpConnector>,
        base: BaseUrl,
        idle_timeout: Duration,
        keep_alive: Duration,
    ) -> Conns {
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        // Pings find a dead HTTP/2 connection while a long generation is due
        // and no bytes flow.
        h2.timer(TokioTimer::new())
            .keep_alive_interval(keep_alive)
            .keep_alive_timeout(keep_alive.min(Duration::from_secs(20)))
            .keep_alive_while_idle(true);
        Conns {
            connector,
            host: base.host(),
            base,
            idle_timeout,
            h2,
            local: thread_local::ThreadLocal::new(),
        }
    }

    /// This thread's pool; the first use starts its sweep of idle connections.
    fn local(&self) -> &Arc<Mutex<Local>> {
        self.local.get_or(|| {
            let local = Arc::new(Mutex::new(Local::default()));
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(sweep(Arc::downgrade(&local), self.idle_timeout));
            }
            local
        })
    }

    /// Sends `req` (its URI in origin form, `/path?query`) and returns the
    /// answer's head, with the HTTP/1.1 connection to give back once its body
    /// is read.
    ///
    /// `departure` is told as the request is handed to a connection ready for
    /// it: after any wait for a new one (its TLS handshake), so the call is
    /// counted from when it really leaves.
    pub(crate) async fn send(
        &self,
        mut req: Request<Body>,
        departure: Option<&dyn Departure>,
    ) -> Result<(Response<Incoming>, Option<Lent>), SendError> {
        let home = self.local().clone();
        let path = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        // A request comes back unsent only when its connection had just closed;
        // a few tries find one that has not.
        for _ in 0..SEND_TRIES {
            let checkout = self.checkout(&home).await?;
            if let Some(departure) = departure {
                departure.departed();
            }
            match checkout {
                Checkout::H2(mut sender) => {
                    // HTTP/2 carries the scheme and authority in the URI.
                    *req.uri_mut() = self.base.absolute(path.clone());
                    return match sender.try_send_request(req).await {
                        Ok(resp) => Ok((resp, None)),
                        Err(mut e) => match e.take_message() {
                            // Never sent: the connection had closed. The next
                            // checkout finds it closed and makes another.
                            Some(again) => {
                                req = again;
                                continue;
                            }
                            None => Err(SendError::Connection(chain(&e.into_error()))),
                        },
                    };
                }
                Checkout::H1(mut sender, reused) => {
                    *req.uri_mut() = Uri::from(path.clone());
                    req.headers_mut()
                        .entry(header::HOST)
                        .or_insert_with(|| self.host.clone());
                    match sender.try_send_request(req).await {
                        Ok(resp) => {
                            let home = home.clone();
                            return Ok((resp, Some(Lent { sender, home })));
                        }
                        Err(mut e) => match e.take_message() {
                            Some(again) if reused => req = again,
                            _ => return Err(SendError::Connection(chain(&e.into_error()))),
                        },
                    }
                }
            }
        }
        Err(SendError::Connection(
            "every connection tried closed before the request was sent".into(),
        ))
    }

    /// A ready connection: an idle one of this thread's, else a new one.
    async fn checkout(&self, home: &Mutex<Local>) -> Result<Checkout, SendError> {
        loop {
            let found = {
                let mut local = home.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(h2) = &local.h2 {
                    if !h2.is_closed() {
                        return Ok(Checkout::H2(h2.clone()));
                    }
                    local.h2 = None;
                }
                local.idle.pop()
            };
            let Some((mut sender, since)) = found else {
                break;
            };
            if sender.is_closed() || since.elapsed() > self.idle_timeout {
                continue;
            }
            // A connection given back as its body ended may not have turned
            // to the next request yet.
            if sender.ready().await.is_ok() {
                return Ok(Checkout::H1(sender, true));
            }
        }
        // Boxed: a new connection is rare, and its future is large; unboxed it
        // would grow every request's.
        Box::pin(self.connect(home)).await
    }

    async fn connect(&self, home: &Mutex<Local>) -> Result<Checkout, SendError> {
        let io = self
            .connector
            .clone()
            .call(self.base.origin())
            .await
            .map_err(|e| SendError::Connect(chain(&*e)))?;
        if io.connected().is_negotiated_h2() {
            let (sender, conn) = self
                .h2
                .handshake(io)
                .await
                .map_err(|e| SendError::Connect(chain(&e)))?;
            tokio::spawn(drive(conn));
            let mut local = home.lock().unwrap_or_else(|e| e.into_inner());
            // Another request of this thread may have made one meanwhile.
            let sender = match &local.h2 {
                Some(open) if !open.is_closed() => open.clone(),
                _ => {
                    local.h2 = Some(sender.clone());
                    sender
                }
            };
            return Ok(Checkout::H2(sender));
        }
        let (mut sender, conn) = http1::handshake(io)
            .await
            .map_err(|e| SendError::Connect(chain(&e)))?;
        tokio::spawn(drive(conn));
        sender
            .ready()
            .await
            .map_err(|e| SendError::Connect(chain(&e)))?;
        Ok(Checkout::H1(sender, false))
    }
}

/// Runs a connection until it closes.
async fn drive(conn: impl Future<Output = hyper::Result<()>>) {
    if let Err(e) = conn.await {
        tracing::debug!(error = %e, "upstream connection ended with an error");
    }
}

/// Closes a thread's connections idle longer than `timeout`, until the pool
/// is gone.
async fn sweep(local: Weak<Mutex<Local>>, timeout: Duration) {
    let period = (timeout / 2).max(Duration::from_millis(100));
    loop {
        tokio::time::sleep(period).await;
        let Some(local) = local.upgrade() else { return };
        let mut local = local.lock().unwrap_or_else(|e| e.into_inner());
        local
            .idle
            .retain(|(s, since)| !s.is_closed() && since.elapsed() <= timeout);
    }
}

/// "outer: inner: innermost", since hyper's top-level messages alone say little.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}
