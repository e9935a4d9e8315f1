//! The simulator's own connection handling: one descriptor per connection (so it can hold as
//! many streams as the open-files limit allows), keep-alive, and the `reset` fault answered with
//! a TCP RST rather than a FIN.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::Duration;

use keyvex_sim::{self as sim, SimConfig, SimHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn start() -> SimHandle {
    let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    sim::start(addr, SimConfig::fast(11)).await.unwrap()
}

fn request(fault: Option<&str>) -> String {
    let body = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hi"}]}"#;
    let fault = fault.map_or_else(String::new, |f| format!("x-sim-fault: {f}\r\n"));
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: sim\r\nauthorization: Bearer sk-test\r\ncontent-type: application/json\r\n{fault}content-length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// TCP sockets this process holds under more than one descriptor. Counted by socket, not by
/// descriptor, so other tests of this binary opening connections meanwhile do not matter; and
/// TCP only, because tokio's signal driver (child processes of the SDK tests) keeps a Unix
/// socket under two descriptors by design.
fn tcp_sockets_held_twice() -> usize {
    let mut tcp = std::collections::HashSet::new();
    for table in ["/proc/self/net/tcp", "/proc/self/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            if let Some(inode) = line.split_whitespace().nth(9) {
                tcp.insert(format!("socket:[{inode}]"));
            }
        }
    }
    let mut seen = std::collections::HashMap::<String, usize>::new();
    for entry in std::fs::read_dir("/proc/self/fd").unwrap() {
        // A descriptor closed between listing and reading has no link any more.
        if let Ok(target) = std::fs::read_link(entry.unwrap().path()) {
            let target = target.to_string_lossy().into_owned();
            if tcp.contains(&target) {
                *seen.entry(target).or_default() += 1;
            }
        }
    }
    seen.values().filter(|&&n| n > 1).count()
}

#[tokio::test]
async fn a_connection_costs_the_simulator_one_descriptor() {
    let sim = start().await;
    let mut clients = Vec::new();
    for _ in 0..50 {
        let mut tcp = TcpStream::connect(sim.addr()).await.unwrap();
        // A full exchange, so the simulator has surely accepted the connection and handed it
        // to hyper (which keeps it open: HTTP/1.1 keep-alive).
        tcp.write_all(request(None).as_bytes()).await.unwrap();
        let mut head = [0u8; 12];
        tcp.read_exact(&mut head).await.unwrap();
        assert_eq!(&head, b"HTTP/1.1 200");
        clients.push(tcp);
    }
    // A second handle per accepted connection would halve the connections the simulator can
    // hold under its open-files limit.
    let twice = tcp_sockets_held_twice();
    assert_eq!(twice, 0, "{twice} sockets held under two descriptors");
    drop(clients);
    sim.shutdown().await;
}

#[tokio::test]
async fn the_reset_fault_answers_with_rst() {
    let sim = start().await;
    let mut tcp = TcpStream::connect(sim.addr()).await.unwrap();
    tcp.write_all(request(Some("reset")).as_bytes())
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
        .await
        .expect("the simulator neither answered nor closed");
    // A FIN would read as Ok(0) (a clean end); the fault is a reset.
    match read {
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}"),
        Ok(n) => panic!("read {n} bytes instead of a reset: {:?}", &buf[..n]),
    }
    sim.shutdown().await;
}

#[tokio::test]
async fn a_kept_alive_connection_serves_requests_one_after_another() {
    let sim = start().await;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .build()
        .unwrap();
    for _ in 0..3 {
        let response = client
            .post(format!("{}/chat/completions", sim.base_url()))
            .bearer_auth("sk-test")
            .json(&serde_json::json!({
                "model": "gpt-4o-mini",
                "messages": [{"role": "user", "content": "Hi"}],
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["object"], "chat.completion");
    }
    sim.shutdown().await;
}
