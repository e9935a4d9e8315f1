//! Starts a private `redis-server` per test on a free loopback port (no persistence), and kills
//! it when the guard drops; like moto. Installs Debian's `redis-server` with
//! `scripts/ensure-redis.sh` when it is not on `PATH`. [`Redis::stop`] and [`Redis::restart`]
//! take it away and bring it back on the same port, for the outage tests. [`Redis::start_cluster`]
//! starts a one-node Redis Cluster (cluster mode on, every slot on this node), which answers
//! commands as a cluster does: a script whose keys span slots is refused.

use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use crate::moto::repo_root;

static INSTALL: Mutex<()> = Mutex::new(());

fn ensure_installed() {
    let found = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if found {
        return;
    }
    let _guard = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    let status = Command::new("bash")
        .arg(repo_root().join("scripts/ensure-redis.sh"))
        .status()
        .expect("running scripts/ensure-redis.sh");
    assert!(
        status.success(),
        "scripts/ensure-redis.sh failed; see its output above"
    );
}

/// A running redis-server of one test.
pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    /// `redis://127.0.0.1:PORT`.
    pub url: String,
    /// The cluster's node file, when it runs in cluster mode.
    cluster_dir: Option<crate::TempDir>,
}

impl Redis {
    pub async fn start() -> Redis {
        let mut redis = Redis::unstarted(None);
        redis.spawn().await;
        redis
    }

    /// A one-node Redis Cluster holding every slot.
    pub async fn start_cluster() -> Redis {
        let mut redis = Redis::unstarted(Some(crate::TempDir::new("redis-cluster")));
        redis.spawn().await;
        let added = redis.command("CLUSTER ADDSLOTSRANGE 0 16383").await;
        assert!(added.starts_with("+OK"), "CLUSTER ADDSLOTSRANGE: {added}");
        for _ in 0..200 {
            if redis
                .command("CLUSTER INFO")
                .await
                .contains("cluster_state:ok")
            {
                return redis;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!(
            "the one-node cluster on port {} did not reach cluster_state:ok within 5 s",
            redis.port
        );
    }

    fn unstarted(cluster_dir: Option<crate::TempDir>) -> Redis {
        ensure_installed();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Redis {
            child: None,
            port,
            url: format!("redis://127.0.0.1:{port}"),
            cluster_dir,
        }
    }

    async fn spawn(&mut self) {
        let port = self.port.to_string();
        let mut args = vec![
            "--port".to_owned(),
            port,
            "--bind".to_owned(),
            "127.0.0.1".to_owned(),
            "--save".to_owned(),
            String::new(),
            "--appendonly".to_owned(),
            "no".to_owned(),
        ];
        if let Some(dir) = &self.cluster_dir {
            args.extend([
                "--cluster-enabled".to_owned(),
                "yes".to_owned(),
                "--cluster-config-file".to_owned(),
                dir.file("nodes.conf").display().to_string(),
            ]);
        }
        let child = Command::new("redis-server")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting redis-server");
        self.child = Some(child);
        // Readiness of an external process: poll its port for a PONG.
        for _ in 0..200 {
            if self.ping().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!(
            "redis-server did not answer on port {} within 5 s",
            self.port
        );
    }

    /// Whether the server answers `PING`.
    pub async fn ping(&self) -> bool {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await else {
            return false;
        };
        if s.write_all(b"PING\r\n").await.is_err() {
            return false;
        }
        let mut buf = [0u8; 7];
        matches!(
            tokio::time::timeout(Duration::from_secs(1), s.read_exact(&mut buf)).await,
            Ok(Ok(_)) if &buf == b"+PONG\r\n"
        )
    }

    /// Sends one inline command and returns the start of the answer, as text.
    async fn command(&self, command: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .expect("connecting to redis-server");
        s.write_all(format!("{command}\r\n").as_bytes())
            .await
            .expect("writing to redis-server");
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
            .await
            .expect("redis-server answered")
            .expect("reading from redis-server");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    /// Kills the server (an outage); its data is gone with it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port.
    pub async fn restart(&mut self) {
        self.stop();
        self.spawn().await;
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}
