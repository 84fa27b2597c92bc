//! The connection to Redis, its health, and the replicas it knows of.

use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;

use crate::config::StateConfig;

/// A connection to Redis as penstock uses it: to one server (found directly
/// or through Sentinel) or to a Cluster, which routes each command by its
/// key's hash tag. Cheap to clone: both are multiplexed handles.
#[derive(Clone)]
pub(crate) enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Where Redis is.
enum Target {
    Single(Box<redis::Client>),
    /// The primary, as the sentinels name it now: asked again whenever Redis
    /// stops answering (a failover moves it).
    Sentinel(Box<tokio::sync::Mutex<redis::sentinel::SentinelClient>>),
    Cluster(Box<redis::cluster::ClusterClient>),
}

impl Target {
    fn from_config(config: &StateConfig) -> Result<Target, String> {
        if !config.cluster_nodes.is_empty() {
            let client = redis::cluster::ClusterClient::builder(config.cluster_nodes.clone())
                .connection_timeout(config.connect_timeout)
                .response_timeout(config.command_timeout)
                .build()
                .map_err(|e| format!("state.cluster_nodes: {e}"))?;
            return Ok(Target::Cluster(Box::new(client)));
        }
        if !config.sentinels.is_empty() {
            let primary: redis::ConnectionInfo =
                redis::IntoConnectionInfo::into_connection_info(config.redis_url.as_str())
                    .map_err(|e| format!("state.redis_url: {e}"))?;
            let node = redis::sentinel::SentinelNodeConnectionInfo::default()
                .set_redis_connection_info(primary.redis_settings().clone());
            let sentinels: Vec<String> = config
                .sentinels
                .iter()
                .map(|s| match s.contains("://") {
                    true => s.clone(),
                    false => format!("redis://{s}"),
                })
                .collect();
            let client = redis::sentinel::SentinelClient::build(
                sentinels,
                config.sentinel_master.clone().unwrap_or_default(),
                Some(node),
                redis::sentinel::SentinelServerType::Master,
            )
            .map_err(|e| format!("state.sentinels: {e}"))?;
            return Ok(Target::Sentinel(Box::new(tokio::sync::Mutex::new(client))));
        }
        redis::Client::open(config.redis_url.as_str())
            .map(|c| Target::Single(Box::new(c)))
            .map_err(|e| e.to_string())
    }

    /// A new connection to where Redis is now.
    async fn connect(&self, manager: &ConnectionManagerConfig) -> redis::RedisResult<Conn> {
        match self {
            Target::Single(client) => {
                ConnectionManager::new_with_config((**client).clone(), manager.clone())
                    .await
                    .map(Conn::Single)
            }
            Target::Sentinel(sentinel) => {
                let client = sentinel.lock().await.async_get_client().await?;
                ConnectionManager::new_with_config(client, manager.clone())
                    .await
                    .map(Conn::Single)
            }
            Target::Cluster(client) => client.get_async_connection().await.map(Conn::Cluster),
        }
    }

    /// Redis moves (a failover): a connection that stops answering is
    /// dropped, and the next is made to where the sentinels say it is now.
    fn follows_failover(&self) -> bool {
        matches!(self, Target::Sentinel(_))
    }
}

/// The version of the key layout and scripts; part of every key.
const VERSION: &str = "v1";

const STARTING: u8 = 0;
const UP: u8 = 1;
const DOWN: u8 = 2;

/// Redis did not answer in time, or answered with an error: the caller falls
/// back to what this replica knows alone.
#[derive(Debug, Clone, Copy)]
pub struct Unavailable;

/// The Redis connection, its health and the replicas it knows of.
pub struct Redis {
    conn: RwLock<Option<Conn>>,
    /// A second connection for answers and job bodies (megabytes each): on
    /// the first, a large transfer would hold up the budget's scripts behind
    /// it (one multiplexed connection answers in order).
    bulk: RwLock<Option<Conn>>,
    /// `{prefix}:v1:`
    pub(crate) base: String,
    /// This replica's id, as other replicas see it.
    pub(crate) replica: String,
    command_timeout: Duration,
    connect_timeout: Duration,
    heartbeat: Duration,
    /// How long a leader's lease on a shared call lasts unrenewed.
    pub(crate) lease: Duration,
    configured_replicas: Option<u32>,
    /// [`STARTING`], [`UP`] or [`DOWN`].
    health: AtomicU8,
    /// Times Redis came back after being unavailable.
    rejoins: AtomicU64,
    /// When Redis last came back after being unavailable.
    rejoined: Mutex<Option<tokio::time::Instant>>,
    /// The replicas last seen alive (0: never seen), for the fallback share.
    seen_replicas: AtomicU32,
    live: Mutex<Vec<String>>,
    /// This replica's config hash, told with each heartbeat.
    config_hash: Mutex<String>,
    /// Each live replica's config hash, as the last heartbeat saw them.
    config_hashes: Mutex<std::collections::BTreeMap<String, String>>,
    /// The URL without its password, for logs and `/status`.
    shown_url: String,
}

/// `/status` view of the backend.
#[derive(Debug, serde::Serialize)]
pub struct Status {
    pub(crate) backend: &'static str,
    pub(crate) url: String,
    pub(crate) healthy: bool,
    pub(crate) replica: String,
    pub(crate) live_replicas: Vec<String>,
    /// Each live replica's config hash: a mismatch shows replicas whose
    /// files differ.
    pub(crate) config_hashes: std::collections::BTreeMap<String, String>,
    /// While Redis is unavailable each limit is divided by this (absent:
    /// unknown, and nothing budgeted is admitted until Redis answers).
    pub(crate) fallback_share: Option<u32>,
}

const HEARTBEAT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 2)
local live = redis.call('ZRANGE', KEYS[1], 0, -1)
-- Each live replica's config hash; departed replicas' are dropped.
if ARGV[3] ~= '' then redis.call('HSET', KEYS[2], ARGV[1], ARGV[3]) end
local alive = {}
for _, r in ipairs(live) do alive[r] = true end
for _, r in ipairs(redis.call('HKEYS', KEYS[2])) do
  if not alive[r] then redis.call('HDEL', KEYS[2], r) end
end
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[2]) * 2)
return {live, redis.call('HMGET', KEYS[2], unpack(live))}
"#;

/// Hashed once: a heartbeat runs every `state.heartbeat`.
static HEARTBEAT_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(HEARTBEAT));

impl Redis {
    /// Checks the URL and starts connecting and the heartbeat in the
    /// background: until Redis answers, the replica serves on its local share.
    pub fn start(config: &StateConfig) -> Result<Arc<Redis>, String> {
        let target = Target::from_config(config)?;
        let replica = format!(
            "{}-{}-{:08x}",
            hostname(),
            std::process::id(),
            fastrand::u32(..)
        );
        let redis = Arc::new(Redis {
            conn: RwLock::new(None),
            bulk: RwLock::new(None),
            base: format!("{}:{VERSION}:", config.key_prefix),
            replica,
            command_timeout: config.command_timeout,
            connect_timeout: config.connect_timeout,
            heartbeat: config.heartbeat,
            lease: config.lease,
            configured_replicas: config.replicas,
            health: AtomicU8::new(STARTING),
            rejoins: AtomicU64::new(0),
            rejoined: Mutex::new(None),
            seen_replicas: AtomicU32::new(0),
            live: Mutex::new(Vec::new()),
            config_hash: Mutex::new(String::new()),
            config_hashes: Mutex::new(std::collections::BTreeMap::new()),
            shown_url: match (config.sentinels.first(), config.cluster_nodes.first()) {
                (Some(_), _) => format!(
                    "sentinel {} at {}",
                    config.sentinel_master.as_deref().unwrap_or(""),
                    config
                        .sentinels
                        .iter()
                        .map(|s| crate::vocab::url::BaseUrl::redact(s))
                        .collect::<Vec<_>>()
                        .join(",")
                ),
                (None, Some(_)) => format!(
                    "cluster at {}",
                    config
                        .cluster_nodes
                        .iter()
                        .map(|s| crate::vocab::url::BaseUrl::redact(s))
                        .collect::<Vec<_>>()
                        .join(",")
                ),
                (None, None) => crate::vocab::url::BaseUrl::redact(&config.redis_url),
            },
        });
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.connect_timeout))
            .set_response_timeout(Some(config.command_timeout))
            .set_number_of_retries(1)
            .set_max_delay(config.heartbeat);
        let weak = Arc::downgrade(&redis);
        let connect_timeout = config.connect_timeout;
        tokio::spawn(async move {
            loop {
                let Some(redis) = weak.upgrade() else { return };
                let missing = redis.read_conn().is_none();
                if missing {
                    let made =
                        tokio::time::timeout(connect_timeout * 2, target.connect(&manager)).await;
                    match made {
                        Ok(Ok(conn)) => {
                            *redis.conn.write().unwrap_or_else(|e| e.into_inner()) = Some(conn)
                        }
                        Ok(Err(e)) => redis.down(&e.to_string()),
                        Err(_) => redis.down("connecting timed out"),
                    }
                }
                let no_bulk = redis
                    .bulk
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .is_none();
                if no_bulk && redis.read_conn().is_some() {
                    let made =
                        tokio::time::timeout(connect_timeout * 2, target.connect(&manager)).await;
                    if let Ok(Ok(conn)) = made {
                        *redis.bulk.write().unwrap_or_else(|e| e.into_inner()) = Some(conn);
                    }
                }
                redis.beat().await;
                if !redis.healthy() && target.follows_failover() {
                    // Where the sentinels say the primary is now, next time.
                    *redis.conn.write().unwrap_or_else(|e| e.into_inner()) = None;
                    *redis.bulk.write().unwrap_or_else(|e| e.into_inner()) = None;
                }
                let pause = redis.heartbeat;
                drop(redis);
                tokio::time::sleep(pause).await;
            }
        });
        Ok(redis)
    }

    fn read_conn(&self) -> Option<Conn> {
        self.conn.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Says this replica is alive and learns who else is; Redis is healthy
    /// again when this succeeds.
    async fn beat(&self) {
        let Some(mut conn) = self.read_conn() else {
            return;
        };
        let window = (self.heartbeat * 3).as_millis() as u64;
        let script = &*HEARTBEAT_SCRIPT;
        let mut inv = script.key(format!("{}replicas", self.base));
        // Hashed to the same cluster slot as the replicas' key.
        inv.key(format!("{{{}replicas}}:config", self.base));
        let hash = self
            .config_hash
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        inv.arg(&self.replica).arg(window).arg(hash);
        let call = inv.invoke_async::<(Vec<String>, Vec<Option<String>>)>(&mut conn);
        match tokio::time::timeout(self.command_timeout, call).await {
            Ok(Ok((live, hashes))) => {
                *self.config_hashes.lock().unwrap_or_else(|e| e.into_inner()) = live
                    .iter()
                    .cloned()
                    .zip(hashes)
                    .filter_map(|(r, h)| Some((r, h?)))
                    .collect();
                // Follows replicas that leave as well as those that join
                // (a replica drops out three heartbeats after its last).
                self.seen_replicas
                    .store(live.len().min(u32::MAX as usize) as u32, Ordering::Relaxed);
                *self.live.lock().unwrap_or_else(|e| e.into_inner()) = live;
                self.up();
            }
            Ok(Err(e)) => self.down(&e.to_string()),
            Err(_) => self.down("the heartbeat timed out"),
        }
    }

    fn up(&self) {
        let was = self.health.swap(UP, Ordering::AcqRel);
        if was != UP {
            if was == DOWN {
                *self.rejoined.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(tokio::time::Instant::now());
            }
            self.rejoins.fetch_add(1, Ordering::AcqRel);
            tracing::info!(url = %self.shown_url, replica = %self.replica, "redis available: budgets, cache and breaker are shared");
        }
    }

    /// Logged once per change of health, and once at start if Redis never came.
    fn down(&self, why: &str) {
        if self.health.swap(DOWN, Ordering::AcqRel) != DOWN {
            match self.fallback_share() {
                Some(share) => {
                    tracing::warn!(url = %self.shown_url, error = why, share, "redis unavailable: each pool keeps 1/{share} of its limits until it returns")
                }
                None => {
                    tracing::error!(url = %self.shown_url, error = why, "redis unavailable and never reached, with no state.replicas: how many replicas share the limits is unknown, so budgeted requests are refused (503) until redis answers")
                }
            }
        }
    }

    /// Waits (at most `within`) until the first attempt to reach Redis has
    /// come to something, so a replica starting beside a healthy Redis
    /// serves shared from its first request.
    pub(crate) async fn first_contact(&self, within: Duration) {
        let until = tokio::time::Instant::now() + within;
        while self.health.load(Ordering::Acquire) == STARTING && tokio::time::Instant::now() < until
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// How long [`Redis::first_contact`] may take: connecting, then a
    /// heartbeat.
    pub(crate) fn contact_time(&self) -> Duration {
        self.connect_timeout * 2 + self.command_timeout
    }

    /// Healthy, and long enough since Redis came back that every replica
    /// has had a heartbeat to come back too (and tell it what it spent
    /// alone): until then a replica keeps to its own share, so none books
    /// the whole limit while others still spend their shares unknown to it.
    pub(crate) fn settled(&self) -> bool {
        self.healthy()
            && self
                .rejoined
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_none_or(|t| t.elapsed() >= self.heartbeat * 2 + Duration::from_millis(500))
    }

    /// Settled after an outage, but not long enough that every replica has
    /// surely left its own share for the shared ledger: bookings keep within
    /// this replica's share as well.
    pub(crate) fn rejoining(&self) -> bool {
        let settle = self.heartbeat * 2 + Duration::from_millis(500);
        self.rejoined
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|t| t.elapsed() < settle * 2)
    }

    /// Redis answered the last heartbeat and no command has failed since.
    pub fn healthy(&self) -> bool {
        self.health.load(Ordering::Acquire) == UP
    }

    /// Changes each time Redis comes back: a pool that served on its own share
    /// meanwhile tells the shared ledger what it spent.
    pub(crate) fn epoch(&self) -> u64 {
        self.rejoins.load(Ordering::Acquire)
    }

    /// While Redis is unavailable, each pool keeps `1/share` of its limits:
    /// the replicas last seen alive, at least the configured count. `None`
    /// before Redis was ever reached with no count configured: how many
    /// replicas share the limits is unknown, and nothing is admitted on a
    /// guess (a replica that spent the whole limit would fail open).
    pub(crate) fn fallback_share(&self) -> Option<u32> {
        let seen = self.seen_replicas.load(Ordering::Relaxed);
        match (self.configured_replicas, seen) {
            (None, 0) => None,
            (configured, seen) => Some(configured.unwrap_or(1).max(seen).max(1)),
        }
    }

    /// A connection, when Redis is believed healthy.
    pub(crate) fn conn(&self) -> Result<Conn, Unavailable> {
        if !self.healthy() {
            return Err(Unavailable);
        }
        self.read_conn().ok_or(Unavailable)
    }

    /// Runs one command (or script) within the command timeout; a failure
    /// marks Redis unavailable until the next heartbeat succeeds.
    pub(crate) async fn timed<T>(
        &self,
        call: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, Unavailable> {
        match tokio::time::timeout(self.command_timeout, call).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                self.down(&e.to_string());
                Err(Unavailable)
            }
            Err(_) => {
                self.down("a command timed out");
                Err(Unavailable)
            }
        }
    }

    /// The connection for answers and bodies, when Redis is believed healthy
    /// (until it is made, the first).
    pub(crate) fn bulk_conn(&self) -> Result<Conn, Unavailable> {
        if !self.healthy() {
            return Err(Unavailable);
        }
        let bulk = self.bulk.read().unwrap_or_else(|e| e.into_inner()).clone();
        bulk.or_else(|| self.read_conn()).ok_or(Unavailable)
    }

    /// Runs a transfer of about `bytes` on the bulk connection: bounded by
    /// four command timeouts (at least a second: transfers queue behind each
    /// other on the connection) plus the time the bytes take at a slow
    /// 4 MiB/s. A failure is this transfer's alone: the heartbeat, not a
    /// large answer that took its time, says whether Redis is healthy.
    pub(crate) async fn timed_bulk<T>(
        &self,
        call: impl Future<Output = redis::RedisResult<T>>,
        bytes: usize,
    ) -> Result<T, Unavailable> {
        let allowed = (self.command_timeout * 4).max(Duration::from_secs(1))
            + Duration::from_millis((bytes as u64) >> 12);
        match tokio::time::timeout(allowed, call).await {
            Ok(Ok(v)) => Ok(v),
            _ => Err(Unavailable),
        }
    }

    /// As [`Redis::timed`], but an error Redis answered with (out of memory,
    /// say) is the caller's to handle and leaves Redis healthy; only a
    /// timeout or a broken connection marks it unavailable.
    pub(crate) async fn timed_quietly<T>(
        &self,
        call: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<redis::RedisResult<T>, Unavailable> {
        match tokio::time::timeout(self.command_timeout, call).await {
            Ok(Err(e)) if e.is_io_error() || e.is_connection_dropped() => {
                self.down(&e.to_string());
                Err(Unavailable)
            }
            Ok(result) => Ok(result),
            Err(_) => {
                self.down("a command timed out");
                Err(Unavailable)
            }
        }
    }

    /// This replica's config hash, told to the others with each heartbeat.
    pub(crate) fn set_config_hash(&self, hash: &str) {
        *self.config_hash.lock().unwrap_or_else(|e| e.into_inner()) = hash.to_string();
    }

    pub(crate) fn status(&self) -> Status {
        Status {
            backend: "redis",
            url: self.shown_url.clone(),
            healthy: self.healthy(),
            replica: self.replica.clone(),
            live_replicas: self.live.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            config_hashes: self
                .config_hashes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            fallback_share: self.fallback_share(),
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| {
            h.trim()
                .chars()
                .filter(|c| c.is_ascii_graphic())
                .take(32)
                .collect()
        })
        .filter(|h: &String| !h.is_empty())
        .unwrap_or_else(|| "penstock".to_string())
}
