//! Stop signals for every command: Ctrl-C (SIGINT) and SIGTERM (how orchestrators stop a
//! process). Registered when called, not when first polled, so a signal that arrives while a
//! command starts up is not missed.

use std::future::Future;

use anyhow::Context;

/// A future that resolves on the first SIGINT or SIGTERM after this call.
pub fn stop_signal() -> anyhow::Result<impl Future<Output = ()> + Send + 'static> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut interrupt = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
        let mut terminate = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
        Ok(async move {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            if let Err(error) = tokio::signal::ctrl_c().await {
                tracing::error!(%error, "cannot listen for Ctrl-C");
                std::future::pending::<()>().await;
            }
        })
    }
}

/// The exit code of a command stopped by a signal (128 + SIGINT, as shells report it).
pub const INTERRUPTED: u8 = 130;
