//! Realistic, schema-valid example outputs for each agent, deterministic by seed.
//!
//! The provider simulator answers with these so the whole pipeline runs offline through the same
//! code path as real providers. (Filled by the agents work.)

/// A sample output for the response schema called `schema_name`, or `None` when the name is not
/// one of the agents' schemas. `hint` is the user prompt, so samples can echo the business.
pub fn sample_output(schema_name: &str, seed: u64, hint: &str) -> Option<serde_json::Value> {
    let _ = (schema_name, seed, hint);
    None
}
