//! `POST /v1/chat/completions` (placeholder replaced below).
use crate::server::AppState;
pub fn routes() -> axum::Router<AppState> {
    axum::Router::new()
}
