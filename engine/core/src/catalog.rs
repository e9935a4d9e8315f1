//! The model catalog: which models exist, what they cost, and which model serves each process.
//!
//! Loaded from `models/default-models.json` (embedded at build time) or from a file given by
//! path. Everything is checked at load: a bad catalog stops the process at start with an error
//! naming the file and the key, never later in the middle of a request.
//!
//! A catalog can also be a numbered version kept in the store and swapped in while the engine
//! runs; the catalog a process starts with is version 0. `diff` compares two catalogs, `fit`
//! tells whether this engine can serve a version as written.

pub mod diff;
pub mod fit;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use agents::Process;
use serde::Deserialize;

use crate::cost::{Price, Pricing};
use crate::provider::anthropic_version::{AnthropicVersion, AnthropicVersions};
use crate::stream::ProviderKind;

/// The catalog shipped with the binary.
pub const EMBEDDED_CATALOG: &str = include_str!("../../../models/default-models.json");
const EMBEDDED_NAME: &str = "models/default-models.json (embedded)";

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("cannot read model catalog {file}: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    #[error("model catalog {file} is not valid: {source}")]
    Parse {
        file: String,
        source: serde_json::Error,
    },
    #[error("model catalog {file}: `{key}`: {problem}")]
    Invalid {
        file: String,
        key: String,
        problem: String,
    },
}

/// One model, with its prices and limits.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub id: String,
    pub provider: ProviderKind,
    pub display_name: String,
    pub pricing: Pricing,
    pub context_window: u64,
    pub max_output_tokens: u32,
    /// The Anthropic API version this model must be called with, whatever `ANTHROPIC_VERSION`
    /// says (a newer model may exist only on a newer version). Anthropic models only.
    pub anthropic_version: Option<AnthropicVersion>,
    /// Whether the model accepts a conversation ending in an assistant message and continues
    /// it (an assistant prefill). A chat stream cut mid-answer is continued on such a model by
    /// sending the partial answer as that last message; any other model is asked to continue
    /// through a user instruction instead, and never receives a trailing assistant message.
    pub prefill: bool,
}

/// What a route does when its committed stream breaks after content (a cut, a stall, an
/// in-stream error, the provider's own deadline).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub enum MidStreamFailover {
    /// Start the same request again on the next candidate; the caller is told to drop what it
    /// received (structured answers cannot be spliced).
    Restart,
    /// Ask the next candidate to continue the text already sent; the caller sees one stream.
    Continue,
    /// End the call with an explicit mid-stream error and an estimated cost.
    Off,
}

impl MidStreamFailover {
    pub fn as_str(self) -> &'static str {
        match self {
            MidStreamFailover::Restart => "restart",
            MidStreamFailover::Continue => "continue",
            MidStreamFailover::Off => "off",
        }
    }
}

/// How many broken streams one request may rescue, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RescuePolicy {
    pub mode: MidStreamFailover,
    /// Rescues per request (each one a new call, inside the request's total deadline).
    pub max_rescues: u32,
}

impl RescuePolicy {
    /// What the four agents do unless the catalog says otherwise.
    pub const PROCESS_DEFAULT: RescuePolicy = RescuePolicy {
        mode: MidStreamFailover::Restart,
        max_rescues: 1,
    };
    /// What a chat call on one model does unless the catalog says otherwise.
    pub const CHAT_DEFAULT: RescuePolicy = RescuePolicy {
        mode: MidStreamFailover::Continue,
        max_rescues: 1,
    };
    pub const OFF: RescuePolicy = RescuePolicy {
        mode: MidStreamFailover::Off,
        max_rescues: 0,
    };

    /// Whether a stream that broke after content may be rescued, `used` rescues in.
    pub fn allows(self, used: u32) -> bool {
        self.mode != MidStreamFailover::Off && used < self.max_rescues
    }
}

/// Which models serve a process, and with what generation settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessRoute {
    pub primary: String,
    pub fallback: String,
    pub max_output_tokens: u32,
    pub temperature: Option<f32>,
    /// What happens when a stream breaks after content (`midStreamFailover`, `maxRescues`).
    pub rescue: RescuePolicy,
}

/// A process temperature one of its models is called without (see
/// [`Catalog::unsent_temperatures`]).
#[derive(Debug, Clone, PartialEq)]
pub struct UnsentTemperature {
    pub process: Process,
    pub temperature: f32,
    pub model: String,
    pub version: AnthropicVersion,
}

impl std::fmt::Display for UnsentTemperature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} temperature {} on {} (API version {})",
            self.process.key(),
            self.temperature,
            self.model,
            self.version
        )
    }
}

#[derive(Debug, Clone)]
pub struct Catalog {
    source: String,
    /// The file's own `version` field: a label for people, not the store's version number.
    label: String,
    /// The store's version number; 0 for the catalog the process started with.
    version: u64,
    /// When this version became the active one (unix ms), where known.
    activated_at_ms: Option<u64>,
    /// Shared: a route holds its candidates' specs for as long as it streams, and a copy each
    /// (two strings and the prices) was kept in every open stream.
    models: Vec<Arc<ModelSpec>>,
    by_id: HashMap<String, usize>,
    processes: BTreeMap<Process, ProcessRoute>,
    /// What a call on one model (the chat route, `complete`) does when its stream breaks after
    /// content (`chat.midStreamFailover`, `chat.maxRescues`).
    model_rescue: RescuePolicy,
}

impl Catalog {
    /// The catalog compiled into the binary.
    pub fn embedded() -> Result<Catalog, CatalogError> {
        Catalog::parse(EMBEDDED_CATALOG, EMBEDDED_NAME)
    }

    /// The embedded catalog, or the file at `path` when one is given.
    pub fn load(path: Option<&Path>) -> Result<Catalog, CatalogError> {
        let Some(path) = path else {
            return Catalog::embedded();
        };
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| CatalogError::Read {
            file: file.clone(),
            source,
        })?;
        Catalog::parse(&text, &file)
    }

    /// Parses and validates catalog JSON; `file` is only used in error messages.
    pub fn parse(json: &str, file: &str) -> Result<Catalog, CatalogError> {
        let raw: RawCatalog = serde_json::from_str(json).map_err(|source| CatalogError::Parse {
            file: file.to_owned(),
            source,
        })?;
        let invalid = |key: String, problem: String| CatalogError::Invalid {
            file: file.to_owned(),
            key,
            problem,
        };

        let mut models = Vec::with_capacity(raw.models.len());
        let mut by_id = HashMap::new();
        for (i, m) in raw.models.into_iter().enumerate() {
            if m.id.trim().is_empty() {
                return Err(invalid(
                    format!("models[{i}].id"),
                    "must not be empty".into(),
                ));
            }
            if by_id.insert(m.id.clone(), i).is_some() {
                return Err(invalid(
                    format!("models[{i}].id"),
                    format!("duplicate model id {:?}", m.id),
                ));
            }
            let price = |name: &str, usd: f64| {
                Price::from_usd_per_mtok(usd)
                    .map_err(|p| invalid(format!("models[{i}].pricing.{name}"), p))
            };
            let pricing = Pricing {
                input: price("inputPerMTok", m.pricing.input_per_mtok)?,
                cached_input: price("cachedInputPerMTok", m.pricing.cached_input_per_mtok)?,
                cache_write: m
                    .pricing
                    .cache_write_per_mtok
                    .map(|w| price("cacheWritePerMTok", w))
                    .transpose()?,
                output: price("outputPerMTok", m.pricing.output_per_mtok)?,
            };
            if m.max_output_tokens == 0 || u64::from(m.max_output_tokens) > m.context_window {
                return Err(invalid(
                    format!("models[{i}].maxOutputTokens"),
                    format!(
                        "{} must be between 1 and the context window ({})",
                        m.max_output_tokens, m.context_window
                    ),
                ));
            }
            let anthropic_version = match (&m.anthropic_version, m.provider) {
                (None, _) => None,
                (Some(text), ProviderKind::Anthropic) => {
                    Some(text.parse::<AnthropicVersion>().map_err(|e| {
                        invalid(format!("models[{i}].anthropicVersion"), e.to_string())
                    })?)
                }
                (Some(_), other) => {
                    return Err(invalid(
                        format!("models[{i}].anthropicVersion"),
                        format!(
                            "{:?} is a {other} model; only Anthropic models have an API version, remove the key",
                            m.id
                        ),
                    ));
                }
            };
            models.push(Arc::new(ModelSpec {
                display_name: m.display_name.unwrap_or_else(|| m.id.clone()),
                id: m.id,
                provider: m.provider,
                pricing,
                context_window: m.context_window,
                max_output_tokens: m.max_output_tokens,
                anthropic_version,
                prefill: m.prefill,
            }));
        }

        let mut processes = BTreeMap::new();
        for (name, route) in raw.processes {
            let process: Process = name.parse().map_err(|e: agents::UnknownProcess| {
                invalid(format!("processes.{name}"), e.to_string())
            })?;
            let lookup = |which: &str, id: &str| {
                by_id.get(id).map(|&i| &models[i]).ok_or_else(|| {
                    invalid(
                        format!("processes.{name}.{which}"),
                        format!("{id:?} is not a model in this catalog"),
                    )
                })
            };
            let primary = lookup("primary", &route.primary)?;
            let fallback = lookup("fallback", &route.fallback)?;
            if primary.provider == fallback.provider {
                return Err(invalid(
                    format!("processes.{name}.fallback"),
                    format!(
                        "{:?} is on the same provider ({}) as the primary; a fallback must survive the primary provider's outage",
                        fallback.id, primary.provider
                    ),
                ));
            }
            for m in [primary, fallback] {
                if route.max_output_tokens > m.max_output_tokens {
                    return Err(invalid(
                        format!("processes.{name}.maxOutputTokens"),
                        format!(
                            "{} exceeds {}'s limit of {}",
                            route.max_output_tokens, m.id, m.max_output_tokens
                        ),
                    ));
                }
            }
            if route.max_output_tokens == 0 {
                return Err(invalid(
                    format!("processes.{name}.maxOutputTokens"),
                    "must be at least 1".into(),
                ));
            }
            if let Some(t) = route.temperature
                && !(0.0..=2.0).contains(&t)
            {
                return Err(invalid(
                    format!("processes.{name}.temperature"),
                    format!("{t} is outside 0..=2"),
                ));
            }
            processes.insert(
                process,
                ProcessRoute {
                    primary: route.primary,
                    fallback: route.fallback,
                    max_output_tokens: route.max_output_tokens,
                    temperature: route.temperature,
                    rescue: rescue_policy(
                        route.mid_stream_failover,
                        route.max_rescues,
                        RescuePolicy::PROCESS_DEFAULT,
                    ),
                },
            );
        }
        for p in Process::ALL {
            if !processes.contains_key(&p) {
                return Err(invalid(
                    format!("processes.{}", p.key()),
                    "missing: every process needs a primary and a fallback model".into(),
                ));
            }
        }

        Ok(Catalog {
            source: file.to_owned(),
            label: raw.version,
            version: 0,
            activated_at_ms: None,
            models,
            by_id,
            processes,
            model_rescue: raw.chat.map_or(RescuePolicy::CHAT_DEFAULT, |chat| {
                rescue_policy(
                    chat.mid_stream_failover,
                    chat.max_rescues,
                    RescuePolicy::CHAT_DEFAULT,
                )
            }),
        })
    }

    /// Where this catalog came from (a path, or the embedded default).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The file's `version` field (e.g. `2026-11-25`): a label chosen by whoever wrote it.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The store's version number of this catalog: 0 for the one the process started with
    /// (embedded or `KEYVEX_MODELS_FILE`), 1, 2, … for versions published to the store.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// When this version became the active one (unix ms); `None` for a catalog that was never
    /// activated in a store (version 0 from the start).
    pub fn activated_at_ms(&self) -> Option<u64> {
        self.activated_at_ms
    }

    /// This catalog as store version `version`, active since `activated_at_ms`.
    pub fn as_version(mut self, version: u64, activated_at_ms: Option<u64>) -> Catalog {
        self.version = version;
        self.activated_at_ms = activated_at_ms;
        self
    }

    pub fn models(&self) -> &[Arc<ModelSpec>] {
        &self.models
    }

    pub fn model(&self, id: &str) -> Option<&Arc<ModelSpec>> {
        self.by_id.get(id).map(|&i| &self.models[i])
    }

    /// Every process has a route (checked at load), so this never fails.
    /// What a call on one model does when its stream breaks after content.
    pub fn model_rescue(&self) -> RescuePolicy {
        self.model_rescue
    }

    /// This catalog with every route's mid-stream policy set to `policy`, calls on one model
    /// included (a deployment sets it per process in the catalog file instead).
    pub fn with_rescue(mut self, policy: RescuePolicy) -> Catalog {
        for route in self.processes.values_mut() {
            route.rescue = policy;
        }
        self.model_rescue = policy;
        self
    }

    pub fn route(&self, process: Process) -> &ProcessRoute {
        // Validated in `parse`: all four processes are present.
        &self.processes[&process]
    }

    pub fn routes(&self) -> impl Iterator<Item = (Process, &ProcessRoute)> {
        self.processes.iter().map(|(p, r)| (*p, r))
    }

    /// The processes whose temperature will not reach one of their models: an Anthropic model
    /// called with an API version that has no sampling parameters. In process order, primary
    /// before fallback.
    pub fn unsent_temperatures(&self, versions: &AnthropicVersions) -> Vec<UnsentTemperature> {
        let mut unsent = Vec::new();
        for (process, route) in self.routes() {
            let Some(temperature) = route.temperature else {
                continue;
            };
            for id in [&route.primary, &route.fallback] {
                let Some(model) = self.model(id) else {
                    continue;
                };
                let version = versions.for_model(id);
                if model.provider == ProviderKind::Anthropic
                    && !version.accepts_sampling_parameters()
                {
                    unsent.push(UnsentTemperature {
                        process,
                        temperature,
                        model: id.clone(),
                        version,
                    });
                }
            }
        }
        unsent
    }

    /// The API version of each Anthropic model: its own `anthropicVersion`, else `default`.
    pub fn anthropic_versions(&self, default: AnthropicVersion) -> AnthropicVersions {
        self.models
            .iter()
            .filter_map(|m| Some((m.id.clone(), m.anthropic_version?)))
            .fold(AnthropicVersions::new(default), |versions, (id, v)| {
                versions.with_model(id, v)
            })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawCatalog {
    version: String,
    #[serde(default)]
    #[expect(
        dead_code,
        reason = "accepted so a catalog can carry notes for people; never read"
    )]
    notes: Option<String>,
    models: Vec<RawModel>,
    processes: BTreeMap<String, RawRoute>,
    /// Settings of calls on one model (the chat route).
    #[serde(default)]
    chat: Option<RawChat>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawChat {
    #[serde(default)]
    mid_stream_failover: Option<MidStreamFailover>,
    #[serde(default)]
    max_rescues: Option<u32>,
}

/// A policy from the catalog's keys: `off` allows no rescue whatever `maxRescues` says.
fn rescue_policy(
    mode: Option<MidStreamFailover>,
    max_rescues: Option<u32>,
    default: RescuePolicy,
) -> RescuePolicy {
    let mode = mode.unwrap_or(default.mode);
    RescuePolicy {
        mode,
        max_rescues: match mode {
            MidStreamFailover::Off => 0,
            _ => max_rescues.unwrap_or(default.max_rescues),
        },
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawModel {
    id: String,
    provider: ProviderKind,
    display_name: Option<String>,
    pricing: RawPricing,
    context_window: u64,
    max_output_tokens: u32,
    /// Parsed in `Catalog::parse`, so an unknown version is reported with its key.
    #[serde(default)]
    anthropic_version: Option<String>,
    #[serde(default)]
    prefill: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawPricing {
    #[serde(rename = "inputPerMTok")]
    input_per_mtok: f64,
    #[serde(rename = "cachedInputPerMTok")]
    cached_input_per_mtok: f64,
    #[serde(rename = "cacheWritePerMTok", default)]
    cache_write_per_mtok: Option<f64>,
    #[serde(rename = "outputPerMTok")]
    output_per_mtok: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawRoute {
    primary: String,
    fallback: String,
    max_output_tokens: u32,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    mid_stream_failover: Option<MidStreamFailover>,
    #[serde(default)]
    max_rescues: Option<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn embedded_value() -> serde_json::Value {
        serde_json::from_str(EMBEDDED_CATALOG).unwrap()
    }

    fn parse_value(v: &serde_json::Value) -> Result<Catalog, CatalogError> {
        Catalog::parse(&v.to_string(), "test.json")
    }

    #[test]
    fn embedded_catalog_is_valid_and_complete() {
        let c = Catalog::embedded().unwrap();
        for p in Process::ALL {
            let r = c.route(p);
            let primary = c.model(&r.primary).unwrap();
            let fallback = c.model(&r.fallback).unwrap();
            assert_ne!(primary.provider, fallback.provider, "{p}");
        }
        assert!(
            c.models()
                .iter()
                .any(|m| m.provider == ProviderKind::OpenAi)
        );
        assert!(
            c.models()
                .iter()
                .any(|m| m.provider == ProviderKind::Anthropic)
        );
    }

    #[test]
    fn unknown_model_in_a_process_names_the_key_and_file() {
        let mut v = embedded_value();
        v["processes"]["magicSpark"]["primary"] = "gpt-9".into();
        let e = parse_value(&v).unwrap_err().to_string();
        assert!(e.contains("test.json"), "{e}");
        assert!(e.contains("processes.magicSpark.primary"), "{e}");
        assert!(e.contains("gpt-9"), "{e}");
    }

    #[test]
    fn duplicate_id_is_rejected() {
        let mut v = embedded_value();
        let first = v["models"][0].clone();
        v["models"].as_array_mut().unwrap().push(first);
        let e = parse_value(&v).unwrap_err().to_string();
        assert!(e.contains("duplicate model id"), "{e}");
    }

    #[test]
    fn missing_price_is_rejected() {
        let mut v = embedded_value();
        v["models"][0]["pricing"]
            .as_object_mut()
            .unwrap()
            .remove("outputPerMTok");
        let e = parse_value(&v).unwrap_err().to_string();
        assert!(
            e.contains("outputPerMTok") && e.contains("test.json"),
            "{e}"
        );
    }

    #[test]
    fn missing_process_and_same_provider_fallback_are_rejected() {
        let mut v = embedded_value();
        v["processes"]
            .as_object_mut()
            .unwrap()
            .remove("styleMaster");
        let e = parse_value(&v).unwrap_err().to_string();
        assert!(e.contains("processes.styleMaster"), "{e}");

        let mut v = embedded_value();
        let primary = v["processes"]["logicArchitect"]["primary"].clone();
        v["processes"]["logicArchitect"]["fallback"] = primary;
        let e = parse_value(&v).unwrap_err().to_string();
        assert!(e.contains("same provider"), "{e}");
    }

    #[test]
    fn a_model_may_name_its_anthropic_version_and_a_bad_one_is_named() {
        let mut v = embedded_value();
        let anthropic = v["models"]
            .as_array()
            .unwrap()
            .iter()
            .position(|m| m["provider"] == "anthropic")
            .unwrap();
        let id = v["models"][anthropic]["id"].as_str().unwrap().to_owned();
        v["models"][anthropic]["anthropicVersion"] = "2026-10-21".into();
        let c = parse_value(&v).unwrap();
        assert_eq!(
            c.model(&id).unwrap().anthropic_version,
            Some(AnthropicVersion::V2026_10_21)
        );
        let versions = c.anthropic_versions(AnthropicVersion::V2023_06_01);
        assert_eq!(versions.for_model(&id), AnthropicVersion::V2026_10_21);
        let other = c
            .models()
            .iter()
            .find(|m| m.provider == ProviderKind::Anthropic && m.id != id)
            .unwrap();
        assert_eq!(versions.for_model(&other.id), AnthropicVersion::V2023_06_01);

        v["models"][anthropic]["anthropicVersion"] = "2024-01-01".into();
        let e = parse_value(&v).unwrap_err().to_string();
        assert!(
            e.contains("test.json")
                && e.contains(&format!("models[{anthropic}].anthropicVersion"))
                && e.contains("2024-01-01")
                && e.contains("2023-06-01, 2026-10-21"),
            "{e}"
        );

        let mut v = embedded_value();
        let openai = v["models"]
            .as_array()
            .unwrap()
            .iter()
            .position(|m| m["provider"] == "openai")
            .unwrap();
        v["models"][openai]["anthropicVersion"] = "2026-10-21".into();
        let e = parse_value(&v).unwrap_err().to_string();
        assert!(
            e.contains(&format!("models[{openai}].anthropicVersion"))
                && e.contains("only Anthropic models"),
            "{e}"
        );
    }

    #[test]
    fn temperatures_of_processes_on_anthropic_models_without_sampling_are_listed() {
        // At least one process with a temperature on an Anthropic primary, whatever today's
        // routes are.
        let mut v = embedded_value();
        let first = |provider: &str| {
            v["models"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["provider"] == provider)
                .unwrap()["id"]
                .clone()
        };
        let (anthropic, openai) = (first("anthropic"), first("openai"));
        v["processes"]["magicSpark"]["primary"] = anthropic;
        v["processes"]["magicSpark"]["fallback"] = openai;
        v["processes"]["magicSpark"]["temperature"] = 0.9.into();
        let c = parse_value(&v).unwrap();
        assert!(
            c.unsent_temperatures(&AnthropicVersions::new(AnthropicVersion::V2023_06_01))
                .is_empty()
        );
        let unsent = c.unsent_temperatures(&AnthropicVersions::new(AnthropicVersion::V2026_10_21));
        // Exactly the (process, Anthropic model) pairs of processes that set a temperature.
        let mut expected = Vec::new();
        for (process, route) in c.routes() {
            for id in [&route.primary, &route.fallback] {
                if c.model(id).unwrap().provider == ProviderKind::Anthropic
                    && let Some(t) = route.temperature
                {
                    expected.push((process, t, id.clone()));
                }
            }
        }
        assert!(expected.iter().any(|(p, ..)| *p == Process::MagicSpark));
        let got: Vec<_> = unsent
            .iter()
            .map(|u| (u.process, u.temperature, u.model.clone()))
            .collect();
        assert_eq!(got, expected);
        let line = unsent[0].to_string();
        assert!(
            line.contains(unsent[0].process.key()) && line.contains("2026-10-21"),
            "{line}"
        );

        // A model pinned to the old version keeps its temperature under a new default.
        let pinned = &expected[0].2;
        let versions = AnthropicVersions::new(AnthropicVersion::V2026_10_21)
            .with_model(pinned.clone(), AnthropicVersion::V2023_06_01);
        assert!(
            c.unsent_temperatures(&versions)
                .iter()
                .all(|u| &u.model != pinned)
        );
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let mut v = embedded_value();
        v["models"][0]["prise"] = 1.into();
        assert!(parse_value(&v).is_err());
    }
}
