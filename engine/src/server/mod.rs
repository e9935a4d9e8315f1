//! HTTP API (in progress).
