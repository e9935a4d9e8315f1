//! Route modules; each exposes `routes()` (and admin ones `admin_routes()`).

pub mod agents;
pub mod chat;
pub mod health;
pub mod pipeline;
