//! A `redis-server` for the tests that need one.

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tower_gateway_auth::keys::KeyId;

use super::TempDir;

/// A `redis-server` of our own, with an append-only file so that data survives a kill.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: TempDir,
}

impl RedisServer {
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn spawn(port: u16, dir: &TempDir) -> std::io::Result<Child> {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .arg("--dir")
            .arg(&dir.0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not start on port {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(child)
    }

    /// Our own server, or `None` (and a visible message) when there is no `redis-server`.
    pub fn start() -> Option<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = TempDir::new("redis");
        match Self::spawn(port, &dir) {
            Ok(child) => Some(RedisServer {
                child: Some(child),
                port,
                dir,
            }),
            Err(e) if std::env::var_os("REQUIRE_REDIS").is_some() => {
                panic!("REQUIRE_REDIS is set but redis-server cannot be started: {e}")
            }
            Err(e) => {
                eprintln!(
                    "SKIPPED: redis-server cannot be started ({e}); install it or set REDIS_URL"
                );
                None
            }
        }
    }

    /// Kills the server (SIGKILL: no goodbye to the clients).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    pub fn restart(&mut self) {
        self.kill();
        self.child = Some(Self::spawn(self.port, &self.dir).unwrap());
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Where tests talk to Redis: `REDIS_URL`, or a server of their own.
pub fn redis_url() -> Option<(String, Option<RedisServer>)> {
    if let Ok(url) = std::env::var("REDIS_URL") {
        return Some((url, None));
    }
    let server = RedisServer::start()?;
    Some((server.url(), Some(server)))
}

/// A namespace of its own per test, so tests sharing one Redis never meet.
pub fn namespace() -> String {
    format!("tga-test-{}", KeyId::random())
}

/// A real Redis Cluster of three masters (no replicas), each a `redis-server
/// --cluster-enabled yes` of our own, joined by `redis-cli --cluster create`.
pub struct RedisCluster {
    nodes: Vec<(Child, u16)>,
    _dirs: Vec<TempDir>,
}

impl RedisCluster {
    /// Three masters on free loopback ports (each port and its cluster-bus port, port +
    /// 10000, free), or `None` with a message when `redis-server` is missing (a failure
    /// under `REQUIRE_REDIS`).
    pub fn start() -> Option<Self> {
        let mut nodes = Vec::new();
        let mut dirs = Vec::new();
        for _ in 0..3 {
            let port = free_port_pair();
            let dir = TempDir::new("redis-cluster");
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .args(["--cluster-enabled", "yes"])
                .args(["--cluster-config-file", "nodes.conf"])
                .args(["--cluster-node-timeout", "2000"])
                .arg("--dir")
                .arg(&dir.0)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn();
            let child = match child {
                Ok(child) => child,
                Err(e) if std::env::var_os("REQUIRE_REDIS").is_some() => {
                    panic!("REQUIRE_REDIS is set but redis-server cannot be started: {e}")
                }
                Err(e) => {
                    eprintln!("SKIPPED: redis-server cannot be started ({e})");
                    return None;
                }
            };
            nodes.push((child, port));
            dirs.push(dir);
        }
        let cluster = RedisCluster { nodes, _dirs: dirs };
        let deadline = Instant::now() + Duration::from_secs(10);
        for (_, port) in &cluster.nodes {
            while TcpStream::connect(("127.0.0.1", *port)).is_err() {
                assert!(
                    Instant::now() < deadline,
                    "redis-server did not start on {port}"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let addresses: Vec<String> = cluster
            .nodes
            .iter()
            .map(|(_, port)| format!("127.0.0.1:{port}"))
            .collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect(
                "redis-cli (Debian's redis-tools, with redis-server) is needed for the cluster",
            );
        assert!(
            created.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&created.stdout)
        );
        // Every node must see all 16384 slots served before the tests start.
        for (_, port) in &cluster.nodes {
            loop {
                let info = Command::new("redis-cli")
                    .args(["-p", &port.to_string(), "cluster", "info"])
                    .output()
                    .unwrap();
                if String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") {
                    break;
                }
                assert!(
                    Instant::now() < deadline + Duration::from_secs(20),
                    "the cluster did not come up"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Some(cluster)
    }

    /// The seed list, as `redis_url` takes it: every node, joined by commas.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(|(_, port)| format!("redis://127.0.0.1:{port}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// One node's URL.
    pub fn node_url(&self, i: usize) -> String {
        format!("redis://127.0.0.1:{}", self.nodes[i].1)
    }

    /// The number of keys each master holds.
    pub fn keys_per_node(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .map(|(_, port)| {
                let out = Command::new("redis-cli")
                    .args(["-p", &port.to_string(), "dbsize"])
                    .output()
                    .unwrap();
                String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
            })
            .collect()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for (child, _) in &mut self.nodes {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A port that is free, with its cluster-bus port (port + 10000) free too.
fn free_port_pair() -> u16 {
    loop {
        let port = 20_000 + (getrandom::u32().unwrap() % 20_000) as u16;
        let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
        if free(port) && free(port + 10_000) {
            return port;
        }
    }
}

/// How many times Redis ran each command since its statistics were last reset:
/// `INFO commandstats`, as (command, calls).
pub async fn command_calls(url: &str) -> std::collections::HashMap<String, u64> {
    let client = redis::Client::open(url).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut c)
        .await
        .unwrap();
    info.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("cmdstat_")?;
            let (name, stats) = rest.split_once(':')?;
            let calls = stats.split(',').find_map(|kv| kv.strip_prefix("calls="))?;
            Some((name.to_owned(), calls.parse().ok()?))
        })
        .collect()
}
