//! Starts a private moto server (local DynamoDB) per test on a free loopback port, and kills its
//! process group when the guard drops. Finds `moto_server` through `MOTO_SERVER` or
//! `<repo>/.venv/bin/moto_server`, installing it with `scripts/ensure-moto.sh` when missing.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use std::os::unix::process::CommandExt;

pub struct Moto {
    child: Child,
    pub endpoint: String,
}

/// One install at a time inside this test binary (the script also locks across processes).
static INSTALL: Mutex<()> = Mutex::new(());

/// The repository root (this crate is `engine/testkit`).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn moto_bin() -> PathBuf {
    if let Ok(path) = std::env::var("MOTO_SERVER") {
        return PathBuf::from(path);
    }
    let bin = repo_root().join(".venv/bin/moto_server");
    if !bin.exists() {
        let _guard = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
        if !bin.exists() {
            let status = Command::new("bash")
                .arg(repo_root().join("scripts/ensure-moto.sh"))
                .status()
                .expect("running scripts/ensure-moto.sh");
            assert!(
                status.success(),
                "scripts/ensure-moto.sh failed; see its output above"
            );
        }
    }
    bin
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Moto {
    pub async fn start() -> Moto {
        let bin = moto_bin();
        let port = free_port();
        let child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Own process group, so the guard can kill anything moto spawns.
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        let moto = Moto {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        // Readiness of an external process: poll its port (there is no signal to wait on).
        let http = reqwest::Client::new();
        for _ in 0..300 {
            if http
                .get(format!("{}/moto-api/", moto.endpoint))
                .send()
                .await
                .is_ok()
            {
                return moto;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("moto_server did not answer on port {port} within 15 s");
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let pgid = self.child.id();
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{pgid}")])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The shared AWS settings a local test starts from: dummy credentials, `us-east-1`, and
/// otherwise the SDK's defaults (its standard retry included), as a deployment has them. Pass it
/// to the engine's own client constructors (`keyvex_store::dynamo::configure`,
/// `keyvex_server::queue::configure`) to test them with their timeouts.
pub async fn sdk_config() -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .test_credentials()
        .region(aws_config::Region::new("us-east-1"))
        .load()
        .await
}

/// An SDK client for `endpoint` with dummy credentials and SDK retries off, so the store's own
/// retry loop is what the tests exercise, and short timeouts so an outage fails fast.
pub async fn client(endpoint: &str) -> aws_sdk_dynamodb::Client {
    let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .test_credentials()
        .region(aws_config::Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .retry_config(aws_config::retry::RetryConfig::disabled())
        .timeout_config(
            aws_config::timeout::TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(2))
                .operation_timeout(Duration::from_secs(10))
                .build(),
        )
        .load()
        .await;
    aws_sdk_dynamodb::Client::new(&conf)
}

/// An SQS client for `endpoint` with dummy credentials; SDK retries stay on (the worker relies on
/// them like in production), and the operation timeout sits above the longest long-poll the tests
/// use (1 s) with room for a slow moto.
pub async fn sqs_client(endpoint: &str) -> aws_sdk_sqs::Client {
    let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .test_credentials()
        .region(aws_config::Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .timeout_config(
            aws_config::timeout::TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(2))
                .operation_timeout(Duration::from_secs(15))
                .build(),
        )
        .load()
        .await;
    aws_sdk_sqs::Client::new(&conf)
}

/// One DynamoDB item.
pub type Item = std::collections::HashMap<String, aws_sdk_dynamodb::types::AttributeValue>;

/// A client for `moto` with the single table `name` created (keys, both GSIs, TTL).
pub async fn table(moto: &Moto, name: &str) -> aws_sdk_dynamodb::Client {
    let client = client(&moto.endpoint).await;
    keyvex_store::dynamo::create_table(&client, name)
        .await
        .unwrap();
    client
}

/// Every item of `table`, page by page (a `Scan`: test reads only; the engine never scans).
pub async fn scan_all(client: &aws_sdk_dynamodb::Client, table: &str) -> Vec<Item> {
    let mut items = Vec::new();
    let mut start = None;
    loop {
        let page = client
            .scan()
            .table_name(table)
            .set_exclusive_start_key(start)
            .send()
            .await
            .unwrap();
        items.extend(page.items.unwrap_or_default());
        match page.last_evaluated_key {
            Some(k) if !k.is_empty() => start = Some(k),
            _ => return items,
        }
    }
}

/// A string attribute of an item.
pub fn s(item: &Item, name: &str) -> String {
    item[name].as_s().unwrap().clone()
}

/// A number attribute of an item.
pub fn n(item: &Item, name: &str) -> u64 {
    item[name].as_n().unwrap().parse().unwrap()
}
