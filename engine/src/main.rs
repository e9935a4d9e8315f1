//! The `keyvex` binary: CLI over the engine library.

fn main() {}
