//! Accepting connections. Each connection runs hyper's server on its own, so that a request can
//! ask for its own connection to be reset (a TCP RST before any byte of the response), which a
//! handler behind `axum::serve` has no way to do: the `reset` fault needs the socket.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
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
        // hyper gets a handle on the socket and this task keeps another, to set SO_LINGER 0 if a
        // request asks for a reset while hyper owns the connection. Both share one descriptor.
        let socket = Arc::new(tcp);
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
            let io = TokioIo::new(SharedSocket(Arc::clone(&socket)));
            let connection = builder.serve_connection_with_upgrades(io, service);
            let connection = watcher.watch(connection.into_owned());
            tokio::select! {
                served = connection => {
                    if let Err(error) = served {
                        tracing::debug!(%error, "simulator connection ended with an error");
                    }
                }
                () = reset.notified() => {
                    // With a zero linger, closing the socket's last handle (the connection's,
                    // then this one, as the task ends) answers with RST instead of FIN.
                    if let Err(error) = socket.set_zero_linger() {
                        tracing::debug!(%error, "simulator could not set SO_LINGER 0");
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

/// A connection's socket shared between hyper and the task that may reset it. One descriptor
/// per connection: a duplicate per connection would let the simulator hold only half as many
/// connections under the process's open-files limit (10,000 at the sandbox's 20,000), and a
/// 10,000-stream soak would find its last connections waiting in the accept queue.
struct SharedSocket(Arc<TcpStream>);

/// Waits until the socket is ready, then tries `op`; a readiness that turns out spurious
/// (`WouldBlock`) waits again, as tokio's own `TcpStream` does.
fn when_ready<T>(
    cx: &mut Context<'_>,
    mut ready: impl FnMut(&mut Context<'_>) -> Poll<io::Result<()>>,
    mut op: impl FnMut() -> io::Result<T>,
) -> Poll<io::Result<T>> {
    loop {
        ready!(ready(cx))?;
        match op() {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            result => return Poll::Ready(result),
        }
    }
}

impl AsyncRead for SharedSocket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let socket = &self.0;
        when_ready(
            cx,
            |cx| socket.poll_read_ready(cx),
            || socket.try_read_buf(buf),
        )
        .map_ok(drop)
    }
}

impl AsyncWrite for SharedSocket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let socket = &self.0;
        when_ready(
            cx,
            |cx| socket.poll_write_ready(cx),
            || socket.try_write(buf),
        )
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let socket = &self.0;
        when_ready(
            cx,
            |cx| socket.poll_write_ready(cx),
            || socket.try_write_vectored(bufs),
        )
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Writes go straight to the socket; nothing is buffered here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Half-closes the socket (FIN) as tokio's own `TcpStream` does on shutdown.
        Poll::Ready(SockRef::from(self.0.as_ref()).shutdown(std::net::Shutdown::Write))
    }
}
