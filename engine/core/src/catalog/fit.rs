//! Whether an engine can serve a catalog version the way it is written. A replica serves only
//! the providers it has keys for; a version that would send a process's calls here to a provider
//! without a key, where the version in force did not, would quietly turn that process into
//! "fallback only" on this replica. Such a version is refused here (the replica keeps the version
//! it has) rather than applied halfway.

use super::Catalog;
use crate::stream::ProviderKind;

/// What `next` would take away from this engine compared with `current`, one line per process:
/// a primary that is served here now but would need a provider without a key, or a process that
/// has a servable model now and would have none. Empty when `next` can be served as written (a
/// gap `current` has too — a replica started with one provider key — is not held against it).
pub fn regressions(
    current: &Catalog,
    next: &Catalog,
    configured: impl Fn(ProviderKind) -> bool,
) -> Vec<String> {
    let mut problems = Vec::new();
    for (process, route) in next.routes() {
        let servable =
            |catalog: &Catalog, id: &str| catalog.model(id).is_some_and(|m| configured(m.provider));
        let now = current.route(process);
        let primary_now = servable(current, &now.primary);
        let any_now = primary_now || servable(current, &now.fallback);
        let primary_next = servable(next, &route.primary);
        let any_next = primary_next || servable(next, &route.fallback);
        let key = process.key();
        if any_now && !any_next {
            problems.push(format!(
                "processes.{key}: neither {} nor {} has its provider configured here",
                route.primary, route.fallback
            ));
        } else if primary_now && !primary_next {
            let provider = next
                .model(&route.primary)
                .map_or_else(|| "its".to_owned(), |m| m.provider.to_string());
            problems.push(format!(
                "processes.{key}.primary: {} needs the {provider} provider, which has no API key on this replica (every {key} call here would go to its fallback)",
                route.primary
            ));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::EMBEDDED_CATALOG;

    fn with_primary(process: &str, primary: &str, fallback: &str) -> Catalog {
        let mut v: serde_json::Value = serde_json::from_str(EMBEDDED_CATALOG).unwrap();
        v["processes"][process]["primary"] = primary.into();
        v["processes"][process]["fallback"] = fallback.into();
        Catalog::parse(&v.to_string(), "next.json").unwrap()
    }

    #[test]
    fn a_primary_moved_to_a_provider_without_a_key_is_a_regression() {
        let current = Catalog::embedded().unwrap();
        let openai_only = |k| k == ProviderKind::OpenAi;
        // logicArchitect's primary is gpt-5.4 (served here); moved to Anthropic, it is not.
        let next = with_primary("logicArchitect", "claude-sonnet-4-6", "gpt-5.4");
        let problems = regressions(&current, &next, openai_only);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].contains("processes.logicArchitect.primary")
                && problems[0].contains("anthropic"),
            "{problems:?}"
        );
        // With both providers nothing is lost.
        assert!(regressions(&current, &next, |_| true).is_empty());
        // magicSpark's primary is on Anthropic already: moving it to OpenAI is a gain.
        let next = with_primary("magicSpark", "gpt-5.4", "claude-sonnet-4-6");
        assert!(regressions(&current, &next, openai_only).is_empty());
        // A price change keeps every route where it is.
        assert!(regressions(&current, &current, openai_only).is_empty());
    }

    #[test]
    fn without_any_provider_nothing_is_lost_either() {
        let current = Catalog::embedded().unwrap();
        let next = with_primary("logicArchitect", "claude-sonnet-4-6", "gpt-5.4");
        assert!(regressions(&current, &next, |_| false).is_empty());
    }
}
