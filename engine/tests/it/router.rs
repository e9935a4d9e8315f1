//! Integration tests: router.
