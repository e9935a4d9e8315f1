//! What changed between two catalogs, one line per change: what `keyvex models diff` prints, what
//! the admin API returns, and (shortened) the summary stored with every published version.

use std::fmt;

use super::{Catalog, ModelSpec, ProcessRoute};
use crate::cost::Price;

/// The changes from one catalog to another, in a stable order: the label, then the models by id
/// (added, removed or changed), then the processes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CatalogDiff {
    pub changes: Vec<String>,
}

impl CatalogDiff {
    pub fn between(old: &Catalog, new: &Catalog) -> CatalogDiff {
        let mut changes = Vec::new();
        if old.label() != new.label() {
            changes.push(format!("label {:?} → {:?}", old.label(), new.label()));
        }
        let mut ids: Vec<&str> = old
            .models()
            .iter()
            .chain(new.models())
            .map(|m| m.id.as_str())
            .collect();
        ids.sort_unstable();
        ids.dedup();
        for id in ids {
            match (old.model(id), new.model(id)) {
                (None, Some(m)) => {
                    changes.push(format!("model {id} added ({}, {})", m.provider, prices(m)))
                }
                (Some(_), None) => changes.push(format!("model {id} removed")),
                (Some(a), Some(b)) => model_changes(a, b, &mut changes),
                (None, None) => {}
            }
        }
        for (process, a) in old.routes() {
            route_changes(process.key(), a, new.route(process), &mut changes);
        }
        CatalogDiff { changes }
    }

    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// The changes on one line, cut to about `max_chars` characters with a count of the rest.
    pub fn summary(&self, max_chars: usize) -> String {
        if self.changes.is_empty() {
            return "no changes".to_owned();
        }
        let mut out = String::new();
        for (i, change) in self.changes.iter().enumerate() {
            let sep = if out.is_empty() { "" } else { "; " };
            if !out.is_empty()
                && out.chars().count() + sep.len() + change.chars().count() > max_chars
            {
                out.push_str(&format!("; … and {} more", self.changes.len() - i));
                return out;
            }
            out.push_str(sep);
            out.push_str(change);
        }
        out
    }
}

impl fmt::Display for CatalogDiff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.changes.is_empty() {
            return writeln!(f, "no changes");
        }
        for change in &self.changes {
            writeln!(f, "{change}")?;
        }
        Ok(())
    }
}

/// A price as the catalog file writes it (USD per million tokens).
fn usd(p: Price) -> String {
    format!("${}", p.usd_per_mtok())
}

fn prices(m: &ModelSpec) -> String {
    let write = m
        .pricing
        .cache_write
        .map_or_else(String::new, |w| format!(", cache write {}", usd(w)));
    format!(
        "input {}, cached input {}{write}, output {} per MTok",
        usd(m.pricing.input),
        usd(m.pricing.cached_input),
        usd(m.pricing.output)
    )
}

fn model_changes(a: &ModelSpec, b: &ModelSpec, out: &mut Vec<String>) {
    let id = &a.id;
    if a.provider != b.provider {
        out.push(format!("{id}: provider {} → {}", a.provider, b.provider));
    }
    if a.display_name != b.display_name {
        out.push(format!(
            "{id}: displayName {:?} → {:?}",
            a.display_name, b.display_name
        ));
    }
    let (pa, pb) = (&a.pricing, &b.pricing);
    for (name, x, y) in [
        ("inputPerMTok", Some(pa.input), Some(pb.input)),
        (
            "cachedInputPerMTok",
            Some(pa.cached_input),
            Some(pb.cached_input),
        ),
        ("cacheWritePerMTok", pa.cache_write, pb.cache_write),
        ("outputPerMTok", Some(pa.output), Some(pb.output)),
    ] {
        if x != y {
            let show = |p: Option<Price>| p.map_or_else(|| "none".to_owned(), usd);
            out.push(format!("{id}: {name} {} → {}", show(x), show(y)));
        }
    }
    if a.context_window != b.context_window {
        out.push(format!(
            "{id}: contextWindow {} → {}",
            a.context_window, b.context_window
        ));
    }
    if a.max_output_tokens != b.max_output_tokens {
        out.push(format!(
            "{id}: maxOutputTokens {} → {}",
            a.max_output_tokens, b.max_output_tokens
        ));
    }
    if a.prefill != b.prefill {
        out.push(format!("{id}: prefill {} → {}", a.prefill, b.prefill));
    }
}

fn route_changes(process: &str, a: &ProcessRoute, b: &ProcessRoute, out: &mut Vec<String>) {
    if a.primary != b.primary {
        out.push(format!("{process}: primary {} → {}", a.primary, b.primary));
    }
    if a.fallback != b.fallback {
        out.push(format!(
            "{process}: fallback {} → {}",
            a.fallback, b.fallback
        ));
    }
    if a.max_output_tokens != b.max_output_tokens {
        out.push(format!(
            "{process}: maxOutputTokens {} → {}",
            a.max_output_tokens, b.max_output_tokens
        ));
    }
    if a.temperature != b.temperature {
        let show = |t: Option<f32>| t.map_or_else(|| "default".to_owned(), |t| t.to_string());
        out.push(format!(
            "{process}: temperature {} → {}",
            show(a.temperature),
            show(b.temperature)
        ));
    }
    if a.rescue != b.rescue {
        out.push(format!(
            "{process}: midStreamFailover {} ×{} → {} ×{}",
            a.rescue.mode.as_str(),
            a.rescue.max_rescues,
            b.rescue.mode.as_str(),
            b.rescue.max_rescues
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::EMBEDDED_CATALOG;

    fn edited(edit: impl FnOnce(&mut serde_json::Value)) -> Catalog {
        let mut v: serde_json::Value = serde_json::from_str(EMBEDDED_CATALOG).unwrap();
        edit(&mut v);
        Catalog::parse(&v.to_string(), "edited.json").unwrap()
    }

    #[test]
    fn names_each_price_route_and_model_change() {
        let old = Catalog::embedded().unwrap();
        let new = edited(|v| {
            v["models"][1]["pricing"]["outputPerMTok"] = 12.5.into();
            v["processes"]["magicSpark"]["primary"] = "gpt-5.4-mini".into();
            v["processes"]["magicSpark"]["fallback"] = "claude-haiku-4-5".into();
            v["processes"]["magicSpark"]["midStreamFailover"] = "off".into();
            v["models"][1]["prefill"] = true.into();
            v["models"].as_array_mut().unwrap().remove(0);
        });
        let diff = CatalogDiff::between(&old, &new);
        assert_eq!(
            diff.changes,
            vec![
                "gpt-5.4: outputPerMTok $15 → $12.5",
                "gpt-5.4: prefill false → true",
                "model gpt-5.5 removed",
                "magicSpark: primary claude-sonnet-4-6 → gpt-5.4-mini",
                "magicSpark: fallback gpt-5.4 → claude-haiku-4-5",
                "magicSpark: midStreamFailover restart ×1 → off ×0",
            ]
        );
        assert!(CatalogDiff::between(&new, &new).is_empty());
        assert_eq!(CatalogDiff::between(&new, &new).summary(100), "no changes");
        let back = CatalogDiff::between(&new, &old);
        assert!(
            back.changes[2].starts_with("model gpt-5.5 added (openai, input $5"),
            "{back}"
        );
    }

    #[test]
    fn the_summary_is_cut_with_a_count_of_the_rest() {
        let diff = CatalogDiff {
            changes: (0..10).map(|i| format!("change number {i}")).collect(),
        };
        let s = diff.summary(40);
        assert!(s.starts_with("change number 0; change number 1"), "{s}");
        assert!(s.ends_with("; … and 8 more"), "{s}");
        assert_eq!(diff.summary(10_000).matches("change number").count(), 10);
    }
}
