//! Accepting connections. Each connection runs hyper's server on its own, so that a request can
//! ask for its own connection to be reset (a TCP RST before any byte of the response), which a
//! handler behind `axum::serve` has no way to do: the `reset` fault needs the socket.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// A handle on the connection a request came in on, in the request's extensions.
#[derive(Debug, Clone, Default)]
pub(crate) struct ConnControl {
    reset: Arc<Notify>,
}

impl ConnControl {
    /// Closes the connection with a TCP RST, discarding anything not yet sent. The handler that
    /// asks should then wait: its future is dropped with the connection.
    pub(crate) fn reset(&self) {
        self.reset.notify_one();
    }
}

/// How long open connections may take to finish once shutdown starts; streams watch the same
/// cancellation and end at once, so this only bounds a connection hyper keeps half-open.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Serves `app` on `listener` until `shutdown` is cancelled, then lets open connections finish.
pub(crate) async fn serve(listener: TcpListener, app: Router, shutdown: CancellationToken) {
    let graceful = GracefulShutdown::new();
    loop {
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _peer)) => tcp,
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::debug!(%error, "simulator accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        // Token streams are many small writes: without TCP_NODELAY, Nagle delays them by up to
        // 40 ms and TTFT measurements against the simulator become meaningless.
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%error, "simulator could not set TCP_NODELAY");
        }
        // A second handle on the socket, kept to set SO_LINGER 0 if a request asks for a reset
        // while hyper owns the first.
        let (tcp, twin) = match split_handle(tcp) {
            Ok(pair) => pair,
            Err(error) => {
                tracing::debug!(%error, "simulator could not duplicate a socket; dropping it");
                continue;
            }
        };
        let control = ConnControl::default();
        let reset = control.reset.clone();
        let app = app.clone();
        let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
            request.extensions_mut().insert(control.clone());
            let app = app.clone();
            async move { app.oneshot(request).await }
        });
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let builder = auto::Builder::new(TokioExecutor::new());
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(tcp), service);
            let connection = watcher.watch(connection.into_owned());
            tokio::select! {
                served = connection => {
                    if let Err(error) = served {
                        tracing::debug!(%error, "simulator connection ended with an error");
                    }
                }
                () = reset.notified() => {
                    // Dropping the connection and then the twin closes the socket's last
                    // handle; with a zero linger the kernel answers with RST instead of FIN.
                    match tokio::net::TcpStream::from_std(twin) {
                        Ok(twin) => {
                            if let Err(error) = twin.set_zero_linger() {
                                tracing::debug!(%error, "simulator could not set SO_LINGER 0");
                            }
                        }
                        Err(error) => tracing::debug!(%error, "simulator could not reset a connection"),
                    }
                }
            }
        });
    }
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("simulator connections still open after shutdown; dropping them");
    }
}

/// The socket as tokio's stream plus a duplicate handle (same socket, second descriptor).
fn split_handle(
    tcp: tokio::net::TcpStream,
) -> std::io::Result<(tokio::net::TcpStream, std::net::TcpStream)> {
    let std = tcp.into_std()?;
    let twin = std.try_clone()?;
    Ok((tokio::net::TcpStream::from_std(std)?, twin))
}
