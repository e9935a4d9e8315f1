//! Test harness shared by the integration modules: a moto server per test and a fault-injecting
//! proxy in front of it.

// Test code: a failed unwrap is a failed test (clippy's test allowance does not reach helpers).
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod fault_proxy;
pub mod moto;

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("keyvex-{tag}-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn file(&self, name: &str) -> std::path::PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
