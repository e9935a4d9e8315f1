//! Route modules; each exposes `routes()` (and admin ones `admin_routes()`).

pub mod admin;
pub mod admin_models;
pub mod agents;
pub mod budgets;
pub mod chat;
pub mod health;
pub mod jobs;
pub mod pipeline;
pub mod sessions;
