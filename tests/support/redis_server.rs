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
            port: free_port(),
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
