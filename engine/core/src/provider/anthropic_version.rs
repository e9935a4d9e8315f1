//! The Anthropic API versions the engine speaks (`anthropic-version`), what each changes in a
//! Messages request, and which version each model is called with.
//!
//! Both versions stream the same events, so only the request differs:
//!
//! | | `2023-06-01` | `2026-10-21` |
//! |---|---|---|
//! | key header | `x-api-key: <key>` | `Authorization: Bearer <key>` (what that version's SDKs send) |
//! | `temperature`, `top_p`, `top_k` | accepted | removed: any of them, even at its default, is a 400 |
//! | `document` block in an `assistant` message | accepted | 400 |
//! | `text` block with non-empty `citations` in a `user` message | accepted | 400 |
//!
//! The engine never sends documents or citations, so for its requests the version decides the
//! key header and whether a temperature goes out.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// One `anthropic-version` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum AnthropicVersion {
    /// The version every client sent from mid-2023 until October 2026; still available.
    #[default]
    V2023_06_01,
    /// Released 2026-10-21 with the SDK majors (Python 2, TypeScript 1, Go 2, Java 3, …): no
    /// sampling parameters, stricter message content rules.
    V2026_10_21,
}

impl AnthropicVersion {
    /// Every version the engine speaks, oldest first.
    pub const ALL: [AnthropicVersion; 2] =
        [AnthropicVersion::V2023_06_01, AnthropicVersion::V2026_10_21];

    /// The header value.
    pub fn as_str(self) -> &'static str {
        match self {
            AnthropicVersion::V2023_06_01 => "2023-06-01",
            AnthropicVersion::V2026_10_21 => "2026-10-21",
        }
    }

    /// Whether `temperature`, `top_p` and `top_k` exist in this version's Messages request.
    pub fn accepts_sampling_parameters(self) -> bool {
        match self {
            AnthropicVersion::V2023_06_01 => true,
            AnthropicVersion::V2026_10_21 => false,
        }
    }

    /// How a client of this version sends its key: `x-api-key` on 2023-06-01, the standard
    /// `Authorization: Bearer` on 2026-10-21. The API takes either header; the engine sends what
    /// that version's official SDKs send, so a proxy in between sees the traffic it expects.
    pub fn key_header(self) -> KeyHeader {
        match self {
            AnthropicVersion::V2023_06_01 => KeyHeader::XApiKey,
            AnthropicVersion::V2026_10_21 => KeyHeader::Bearer,
        }
    }

    /// The known versions as a comma-separated list, for error messages.
    pub fn known_list() -> String {
        AnthropicVersion::ALL
            .iter()
            .map(|v| v.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl fmt::Display for AnthropicVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A version string that is not one the engine speaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown Anthropic API version {given:?}: the engine speaks {known}",
    known = AnthropicVersion::known_list()
)]
pub struct UnknownAnthropicVersion {
    pub given: String,
}

impl FromStr for AnthropicVersion {
    type Err = UnknownAnthropicVersion;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        AnthropicVersion::ALL
            .into_iter()
            .find(|v| v.as_str() == s.trim())
            .ok_or_else(|| UnknownAnthropicVersion {
                given: s.to_owned(),
            })
    }
}

impl Serialize for AnthropicVersion {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for AnthropicVersion {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// The header a key travels in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyHeader {
    /// `x-api-key: <key>`.
    XApiKey,
    /// `Authorization: Bearer <key>`.
    Bearer,
}

/// Which version each request goes out with: the model's own when the catalog names one (a model
/// may need a newer version), otherwise the configured default (`ANTHROPIC_VERSION`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AnthropicVersions {
    default: AnthropicVersion,
    by_model: HashMap<String, AnthropicVersion>,
}

impl AnthropicVersions {
    /// Every model on `default`.
    pub fn new(default: AnthropicVersion) -> Self {
        Self {
            default,
            by_model: HashMap::new(),
        }
    }

    /// `model` always on `version`, whatever the default.
    pub fn with_model(mut self, model: impl Into<String>, version: AnthropicVersion) -> Self {
        self.by_model.insert(model.into(), version);
        self
    }

    pub fn default_version(&self) -> AnthropicVersion {
        self.default
    }

    /// The version a request for `model` is sent with.
    pub fn for_model(&self, model: &str) -> AnthropicVersion {
        self.by_model.get(model).copied().unwrap_or(self.default)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_from_their_header_value_and_unknown_ones_name_the_known() {
        for v in AnthropicVersion::ALL {
            assert_eq!(v.as_str().parse::<AnthropicVersion>(), Ok(v));
            assert_eq!(v.to_string(), v.as_str());
        }
        assert_eq!(
            " 2026-10-21 ".parse::<AnthropicVersion>(),
            Ok(AnthropicVersion::V2026_10_21)
        );
        let err = "2025-01-01".parse::<AnthropicVersion>().unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("\"2025-01-01\"")
                && text.contains("2023-06-01")
                && text.contains("2026-10-21"),
            "{text}"
        );
        let json: Result<AnthropicVersion, _> = serde_json::from_str("\"2023-01-01\"");
        assert!(json.unwrap_err().to_string().contains("2023-01-01"));
        assert_eq!(
            serde_json::to_string(&AnthropicVersion::V2026_10_21).unwrap(),
            "\"2026-10-21\""
        );
    }

    #[test]
    fn what_each_version_sends() {
        assert_eq!(AnthropicVersion::default(), AnthropicVersion::V2023_06_01);
        let old = AnthropicVersion::V2023_06_01;
        let new = AnthropicVersion::V2026_10_21;
        assert!(old.accepts_sampling_parameters() && !new.accepts_sampling_parameters());
        assert_eq!(old.key_header(), KeyHeader::XApiKey);
        assert_eq!(new.key_header(), KeyHeader::Bearer);
    }

    #[test]
    fn a_model_of_its_own_version_overrides_the_default() {
        let versions = AnthropicVersions::new(AnthropicVersion::V2023_06_01)
            .with_model("claude-next", AnthropicVersion::V2026_10_21);
        assert_eq!(
            versions.for_model("claude-next"),
            AnthropicVersion::V2026_10_21
        );
        assert_eq!(
            versions.for_model("claude-haiku-4-5"),
            AnthropicVersion::V2023_06_01
        );
        assert_eq!(versions.default_version(), AnthropicVersion::V2023_06_01);
    }
}
