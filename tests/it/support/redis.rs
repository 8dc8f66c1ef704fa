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
