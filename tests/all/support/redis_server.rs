//! A `redis-server` of the test's own, on a free port, stopped when dropped.
//! Where `redis-server` is missing, tests that need it say so loudly and end;
//! with `PENSTOCK_REQUIRE_REDIS=1` (set by `.ci/run`) they fail instead.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
    /// More arguments for `redis-server` (`--maxmemory 64mb`, say).
    extra: Vec<String>,
}

fn required() -> bool {
    std::env::var("PENSTOCK_REQUIRE_REDIS").is_ok_and(|v| v == "1")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl RedisServer {
    /// A fresh server, or `None` (after a loud message) where there is none to
    /// start and none is required.
    pub async fn start() -> Option<RedisServer> {
        Self::start_with(&[]).await
    }

    /// As [`RedisServer::start`], with more arguments for `redis-server`.
    pub async fn start_with(extra: &[&str]) -> Option<RedisServer> {
        Self::start_at(free_port(), extra).await
    }

    /// As [`RedisServer::start_with`], on `port`.
    pub async fn start_at(port: u16, extra: &[&str]) -> Option<RedisServer> {
        let found = Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            assert!(
                !required(),
                "redis-server is not installed and PENSTOCK_REQUIRE_REDIS=1: install it (apt-get install redis-server)"
            );
            eprintln!(
                "\n\n*** SKIPPED: redis-server is not installed; the Redis backend is NOT tested. ***\n*** Install it (apt-get install redis-server) or run .ci/run. ***\n"
            );
            return None;
        }
        let mut server = RedisServer {
            child: None,
            port,
            dir: tempfile::tempdir().unwrap(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        server.run().await;
        Some(server)
    }

    async fn run(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir.path().to_str().unwrap(),
            ])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        for _ in 0..200 {
            if self.ping().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("redis-server did not answer on port {}", self.port);
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn ping(&self) -> bool {
        let Ok(client) = redis::Client::open(self.url()) else {
            return false;
        };
        let Ok(Ok(mut conn)) = tokio::time::timeout(
            Duration::from_millis(500),
            client.get_multiplexed_async_connection(),
        )
        .await
        else {
            return false;
        };
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .is_ok()
    }

    /// A connection for the test's own look at what penstock wrote.
    /// A config file's `[state]` naming this server, with a 200 ms heartbeat
    /// and a 1 s lease.
    pub fn state_toml(&self) -> String {
        format!(
            "[state]\nbackend = \"redis\"\nredis_url = \"{}\"\nheartbeat = \"200ms\"\nlease = \"1s\"\n",
            self.url()
        )
    }

    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    /// Kills the server at once (SIGKILL), its data gone with it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops (SIGSTOP) or resumes (SIGCONT) the server: stopped, it keeps its
    /// connections open and answers nothing.
    pub fn freeze(&self, frozen: bool) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let signal = if frozen { "-STOP" } else { "-CONT" };
        assert!(
            Command::new("kill")
                .args([signal, &pid])
                .status()
                .unwrap()
                .success()
        );
    }

    /// Starts it again on the same port, empty.
    pub async fn restart(&mut self) {
        self.kill();
        self.run().await;
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A port free on 127.0.0.1 whose cluster bus port (10,000 above) is free too.
fn free_cluster_port() -> u16 {
    loop {
        let port = free_port();
        if port < 55_000 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

/// Runs `redis-cli` against `port`; its output.
fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli runs");
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// A three-node Redis Cluster (no replicas), made with `redis-cli --cluster
/// create`, stopped when dropped.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub async fn start() -> Option<RedisCluster> {
        let mut nodes = Vec::new();
        for _ in 0..3 {
            let node =
                RedisServer::start_at(free_cluster_port(), &["--cluster-enabled", "yes"]).await?;
            nodes.push(node);
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let mut args = vec!["--cluster", "create"];
        args.extend(addrs.iter().map(String::as_str));
        args.extend(["--cluster-replicas", "0", "--cluster-yes"]);
        cli(nodes[0].port, &args);
        for _ in 0..400 {
            if nodes
                .iter()
                .all(|n| cli(n.port, &["CLUSTER", "INFO"]).contains("cluster_state:ok"))
            {
                return Some(RedisCluster { nodes });
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("the cluster never became ready");
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }
}

/// A primary, a replica of it, and three sentinels monitoring it as
/// `penstock`, each on a free port, stopped when dropped.
pub struct RedisSentinels {
    pub primary: RedisServer,
    pub replica: RedisServer,
    sentinels: Vec<(Child, u16)>,
    _dir: tempfile::TempDir,
}

impl RedisSentinels {
    pub async fn start() -> Option<RedisSentinels> {
        let primary = RedisServer::start().await?;
        let replica =
            RedisServer::start_with(&["--replicaof", "127.0.0.1", &primary.port.to_string()])
                .await?;
        let dir = tempfile::tempdir().unwrap();
        let mut sentinels = Vec::new();
        for i in 0..3 {
            let port = free_port();
            let conf = dir.path().join(format!("sentinel{i}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {}\n\
                     sentinel monitor penstock 127.0.0.1 {} 2\n\
                     sentinel down-after-milliseconds penstock 1000\n\
                     sentinel failover-timeout penstock 5000\n\
                     sentinel parallel-syncs penstock 1\n",
                    dir.path().display(),
                    primary.port
                ),
            )
            .unwrap();
            let child = Command::new("redis-server")
                .arg(&conf)
                .arg("--sentinel")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server --sentinel starts");
            sentinels.push((child, port));
        }
        let s = RedisSentinels {
            primary,
            replica,
            sentinels,
            _dir: dir,
        };
        // Until the replica is in sync and every sentinel knows the others
        // and the replica.
        for _ in 0..800 {
            let synced =
                cli(s.replica.port, &["INFO", "replication"]).contains("master_link_status:up");
            let known = s.sentinels.iter().all(|(_, p)| {
                let info = cli(*p, &["SENTINEL", "MASTER", "penstock"]);
                let num = |field: &str| {
                    let mut lines = info.lines();
                    while let Some(l) = lines.next() {
                        if l.trim() == field {
                            return lines.next().and_then(|v| v.trim().parse::<u32>().ok());
                        }
                    }
                    None
                };
                num("num-slaves").unwrap_or(0) >= 1 && num("num-other-sentinels").unwrap_or(0) >= 2
            });
            if synced && known {
                return Some(s);
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("the sentinels never saw the replica and each other");
    }

    pub fn addrs(&self) -> Vec<String> {
        self.sentinels
            .iter()
            .map(|(_, p)| format!("127.0.0.1:{p}"))
            .collect()
    }

    /// The port the sentinels name as the primary now.
    pub fn primary_port(&self) -> Option<u16> {
        let out = cli(
            self.sentinels[0].1,
            &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", "penstock"],
        );
        out.lines().nth(1)?.trim().parse().ok()
    }
}

impl Drop for RedisSentinels {
    fn drop(&mut self) {
        for (child, _) in &mut self.sentinels {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
