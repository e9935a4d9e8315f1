//! OpenAI Chat Completions streaming provider (filled by the providers work).
