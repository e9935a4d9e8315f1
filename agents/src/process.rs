//! The four processes (one per agent), with their wire names.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// An agent's process key, as used in the model catalog, metrics and queue messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Process {
    MagicSpark,
    LogicArchitect,
    ContentCrafter,
    StyleMaster,
}

impl Process {
    pub const ALL: [Process; 4] = [
        Process::MagicSpark,
        Process::LogicArchitect,
        Process::ContentCrafter,
        Process::StyleMaster,
    ];

    /// The camelCase key (`magicSpark`): catalog, metrics, queue messages.
    pub fn key(self) -> &'static str {
        match self {
            Process::MagicSpark => "magicSpark",
            Process::LogicArchitect => "logicArchitect",
            Process::ContentCrafter => "contentCrafter",
            Process::StyleMaster => "styleMaster",
        }
    }

    /// The kebab-case slug (`magic-spark`): URLs and CLI arguments.
    pub fn slug(self) -> &'static str {
        match self {
            Process::MagicSpark => "magic-spark",
            Process::LogicArchitect => "logic-architect",
            Process::ContentCrafter => "content-crafter",
            Process::StyleMaster => "style-master",
        }
    }

    pub fn display_name(self) -> &'static str {
        match self {
            Process::MagicSpark => "Magic Spark",
            Process::LogicArchitect => "Logic Architect",
            Process::ContentCrafter => "Content Crafter",
            Process::StyleMaster => "Style Master",
        }
    }
}

impl fmt::Display for Process {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.key())
    }
}

/// The name given is not one of the four processes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown agent/process {given:?}; expected one of magicSpark, logicArchitect, contentCrafter, styleMaster (or magic-spark, logic-architect, content-crafter, style-master)"
)]
pub struct UnknownProcess {
    pub given: String,
}

impl FromStr for Process {
    type Err = UnknownProcess;

    /// Accepts the camelCase key or the kebab-case slug.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Process::ALL
            .into_iter()
            .find(|p| p.key() == s || p.slug() == s)
            .ok_or_else(|| UnknownProcess {
                given: s.to_owned(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_key_and_slug() {
        for p in Process::ALL {
            assert_eq!(p.key().parse::<Process>(), Ok(p));
            assert_eq!(p.slug().parse::<Process>(), Ok(p));
        }
        let err = "sparkle".parse::<Process>().unwrap_err();
        assert!(err.to_string().contains("\"sparkle\""));
    }
}
