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
    let runs = |bin: &str, arg: &str| {
        Command::new(bin)
            .arg(arg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let found = runs("redis-server", "--version") && runs("openssl", "version");
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
    /// The certificates, when it serves TLS only.
    tls: Option<crate::TempDir>,
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
            tls: None,
        }
    }

    /// A server that speaks TLS only (`rediss://127.0.0.1:PORT`), with a certificate for
    /// 127.0.0.1 signed by a CA of its own ([`Redis::ca_file`]), made with `openssl`.
    pub async fn start_tls() -> Redis {
        let mut redis = Redis::unstarted(None);
        let dir = crate::TempDir::new("redis-tls");
        make_certificates(&dir);
        redis.url = format!("rediss://127.0.0.1:{}", redis.port);
        redis.tls = Some(dir);
        redis.spawn().await;
        redis
    }

    /// The CA that signed a TLS server's certificate (PEM).
    pub fn ca_file(&self) -> Option<std::path::PathBuf> {
        self.tls.as_ref().map(|dir| dir.file("ca.pem"))
    }

    async fn spawn(&mut self) {
        let port = self.port.to_string();
        let mut args = match &self.tls {
            None => vec!["--port".to_owned(), port],
            Some(dir) => vec![
                "--port".to_owned(),
                "0".to_owned(),
                "--tls-port".to_owned(),
                port,
                "--tls-cert-file".to_owned(),
                dir.file("server.pem").display().to_string(),
                "--tls-key-file".to_owned(),
                dir.file("server.key").display().to_string(),
                "--tls-ca-cert-file".to_owned(),
                dir.file("ca.pem").display().to_string(),
                "--tls-auth-clients".to_owned(),
                "no".to_owned(),
            ],
        };
        args.extend([
            "--bind".to_owned(),
            "127.0.0.1".to_owned(),
            "--save".to_owned(),
            String::new(),
            "--appendonly".to_owned(),
            "no".to_owned(),
        ]);
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
        // Readiness of an external process: poll its port for a PONG (a TLS port: for a
        // connection).
        for _ in 0..200 {
            let ready = match &self.tls {
                None => self.ping().await,
                Some(_) => tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                    .await
                    .is_ok(),
            };
            if ready {
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

/// A CA, and a server certificate for 127.0.0.1 it signed, in `dir` (`ca.pem`, `server.pem`,
/// `server.key`).
fn make_certificates(dir: &crate::TempDir) {
    std::fs::write(
        dir.file("server.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .expect("writing the certificate extensions");
    let [ca_key, ca, key, csr, cert, ext] = [
        "ca.key",
        "ca.pem",
        "server.key",
        "server.csr",
        "server.pem",
        "server.ext",
    ]
    .map(|name| dir.file(name).display().to_string());
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let ca_step: Vec<&str> = [
        &["req", "-x509"][..],
        &ec,
        &["-days", "2", "-subj", "/CN=keyvex test CA"],
    ]
    .concat()
    .into_iter()
    .chain(["-keyout", &ca_key, "-out", &ca])
    .collect();
    let key_step: Vec<&str> = [&["req"][..], &ec, &["-subj", "/CN=127.0.0.1"]]
        .concat()
        .into_iter()
        .chain(["-keyout", &key, "-out", &csr])
        .collect();
    let sign_step = vec![
        "x509",
        "-req",
        "-days",
        "2",
        "-set_serial",
        "1",
        "-in",
        &csr,
        "-CA",
        &ca,
        "-CAkey",
        &ca_key,
        "-extfile",
        &ext,
        "-out",
        &cert,
    ];
    let steps = [ca_step, key_step, sign_step];
    for args in steps {
        let out = Command::new("openssl")
            .args(&args)
            .output()
            .expect("running openssl (scripts/ensure-redis.sh installs it)");
        assert!(
            out.status.success(),
            "openssl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}
