//! Anthropic Messages streaming provider (filled by the providers work).
