//! Routing a process to its primary and fallback models (filled by the router work).
