//! Fault and latency knobs: scripted rules, `x-sim-*` request headers and random fault rates,
//! resolved into one [`Plan`] per request.
//!
//! Precedence, per aspect (timing, cached tokens, failure): request header, then the first
//! matching rule, then the configured defaults and random rates. Each aspect takes at most one
//! rule, so a forever "cached tokens" rule and a one-shot "429" rule both apply to one request.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::http::HeaderMap;
use serde::{Deserialize, Serialize};

use super::content::Rng;
use super::{FaultRates, LatencyProfile};
use keyvex_engine::stream::ProviderKind;

/// A scripted behaviour for requests matching `model` and/or `protocol` (`None` matches any).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rule {
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub protocol: Option<ProviderKind>,
    pub fault: Fault,
    /// How many requests the rule applies to; `None` = forever.
    #[serde(default)]
    pub times: Option<u32>,
}

impl Rule {
    /// A rule for every request, forever.
    pub fn always(fault: Fault) -> Rule {
        Rule {
            model: None,
            protocol: None,
            fault,
            times: None,
        }
    }

    /// A rule for the next `n` requests.
    pub fn times(fault: Fault, n: u32) -> Rule {
        Rule {
            times: Some(n),
            ..Rule::always(fault)
        }
    }

    /// A rule for the next request to `model` only.
    pub fn once_on(model: &str, fault: Fault) -> Rule {
        Rule {
            model: Some(model.to_owned()),
            ..Rule::times(fault, 1)
        }
    }

    fn matches(&self, model: &str, protocol: ProviderKind) -> bool {
        self.model.as_deref().is_none_or(|m| m == model)
            && self.protocol.is_none_or(|p| p == protocol)
    }
}

/// One simulated misbehaviour (or adjustment). Serialized externally tagged in snake case with
/// durations in milliseconds, e.g. `{"http":{"status":429,"retry_after_ms":500}}`,
/// `"insufficient_quota"`, `{"cut_after":{"tokens":20}}`, `{"slow_first_token":1500}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    /// An HTTP error before any body, shaped like the protocol's error body.
    Http {
        status: u16,
        #[serde(default, rename = "retry_after_ms", with = "opt_millis")]
        retry_after: Option<Duration>,
    },
    /// OpenAI's out-of-credit 429 (`insufficient_quota`); Anthropic gets its spend-limit 429.
    InsufficientQuota,
    /// Headers at once, first content after the delay.
    SlowFirstToken(#[serde(with = "millis")] Duration),
    /// Drop the TCP connection after about this many output tokens, with no terminator.
    CutAfter { tokens: u32 },
    /// Go silent after about this many tokens for `stall`, keeping the connection open.
    StallAfter {
        tokens: u32,
        #[serde(rename = "stall_ms", with = "millis")]
        stall: Duration,
    },
    /// An error event after HTTP 200 (OpenAI `data: {"error":…}`, Anthropic `event: error`).
    InStreamError {
        after_tokens: u32,
        error_type: String,
    },
    /// A `data:` line that is not JSON after about this many tokens.
    MalformedAfter { tokens: u32 },
    /// Override timing.
    Latency {
        #[serde(rename = "ttft_ms", with = "millis")]
        ttft: Duration,
        tokens_per_sec: f64,
    },
    /// Report this many prompt tokens as read from cache.
    CachedPromptTokens(u64),
    /// Answer with exactly `text` instead of the generated content (streamed in pieces, token
    /// counts are those of `text`). For agents this is how a model "gets it wrong": broken JSON,
    /// or JSON that passes the schema but fails the agent's own rules, to exercise the repair.
    BadOutput { text: String },
    /// Accept the request and never answer: no headers, until the client gives up.
    Silent,
    /// Headers, then only keep-alives (Anthropic `ping` events, SSE comments for OpenAI) every
    /// `every`, never content.
    PingsOnly {
        #[serde(rename = "every_ms", with = "millis")]
        every: Duration,
    },
    /// Content one piece every `every`, forever: the answer repeats and never finishes.
    Drip {
        #[serde(rename = "every_ms", with = "millis")]
        every: Duration,
    },
    /// The whole answer, finish reason and usage included, but no terminator (`data: [DONE]`,
    /// `message_stop`); the connection is held open `hold`, then the body ends cleanly.
    NoTerminator {
        #[serde(default, rename = "hold_ms", with = "millis")]
        hold: Duration,
    },
    /// The body ends cleanly after about `tokens` tokens: no finish reason, usage or terminator.
    CleanEnd { tokens: u32 },
    /// After about `tokens` tokens, a `data:` line of `bytes` bytes that never ends (sent in
    /// 64 KiB pieces), then the connection is cut.
    HugeLine {
        bytes: u64,
        #[serde(default)]
        tokens: u32,
    },
    /// Reset the connection (TCP RST) before any byte of the response.
    Reset,
    /// Reset the connection (TCP RST) after about this many output tokens, with no terminator.
    ResetAfter { tokens: u32 },
    /// Out of credit: Anthropic's 402 `billing_error`; OpenAI's 429 `insufficient_quota`.
    Billing,
    /// The prompt does not fit: OpenAI's 400 `context_length_exceeded`, Anthropic's 400
    /// "prompt is too long".
    ContextTooLong,
    /// Refused by the provider's content policy (HTTP 400).
    ContentPolicy,
    /// Frame the stream's lines with this line ending (SSE allows all three).
    LineEnding(LineEnding),
}

/// The line ending of every line of a stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LineEnding {
    #[default]
    Lf,
    Crlf,
    Cr,
}

impl LineEnding {
    fn parse(s: &str) -> Option<LineEnding> {
        match s.to_ascii_lowercase().as_str() {
            "lf" => Some(LineEnding::Lf),
            "crlf" => Some(LineEnding::Crlf),
            "cr" => Some(LineEnding::Cr),
            _ => None,
        }
    }
}

/// The failure part of a plan: what goes wrong, if anything.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Failure {
    Http {
        status: u16,
        retry_after: Option<Duration>,
    },
    Quota,
    Cut {
        tokens: u64,
    },
    ResetAfter {
        tokens: u64,
    },
    Stall {
        tokens: u64,
        stall: Duration,
    },
    InStream {
        tokens: u64,
        error_type: String,
    },
    Malformed {
        tokens: u64,
    },
    Silent,
    PingsOnly {
        every: Duration,
    },
    Drip {
        every: Duration,
    },
    NoTerminator {
        hold: Duration,
    },
    CleanEnd {
        tokens: u64,
    },
    HugeLine {
        bytes: u64,
        tokens: u64,
    },
    Reset,
    Billing,
    ContextTooLong,
    ContentPolicy,
}

/// Everything the knobs decide about one request.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Plan {
    pub ttft: Duration,
    pub tokens_per_sec: f64,
    pub output_tokens: Option<u32>,
    pub cached_tokens: u64,
    pub failure: Option<Failure>,
    /// Replaces the generated answer ([`Fault::BadOutput`]).
    pub content: Option<String>,
    /// Replaces the configured seed (`x-sim-seed`).
    pub seed: Option<u64>,
    pub line_ending: LineEnding,
}

/// The ordered rule list, shared by handlers and control endpoints.
#[derive(Debug, Default)]
pub(crate) struct RuleBook {
    rules: Mutex<Vec<Rule>>,
    /// Draw counter for random faults and jitter, so they vary per request yet replay exactly.
    draws: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Aspect {
    Timing,
    Cache,
    Failure,
    Content,
    Framing,
}

fn aspect(fault: &Fault) -> Aspect {
    match fault {
        Fault::Latency { .. } | Fault::SlowFirstToken(_) => Aspect::Timing,
        Fault::CachedPromptTokens(_) => Aspect::Cache,
        Fault::BadOutput { .. } => Aspect::Content,
        Fault::LineEnding(_) => Aspect::Framing,
        Fault::Http { .. }
        | Fault::Silent
        | Fault::PingsOnly { .. }
        | Fault::Drip { .. }
        | Fault::NoTerminator { .. }
        | Fault::CleanEnd { .. }
        | Fault::HugeLine { .. }
        | Fault::Reset
        | Fault::Billing
        | Fault::ContextTooLong
        | Fault::ContentPolicy
        | Fault::InsufficientQuota
        | Fault::CutAfter { .. }
        | Fault::ResetAfter { .. }
        | Fault::StallAfter { .. }
        | Fault::InStreamError { .. }
        | Fault::MalformedAfter { .. } => Aspect::Failure,
    }
}

impl RuleBook {
    pub fn push(&self, rule: Rule) {
        if rule.times == Some(0) {
            return;
        }
        self.lock().push(rule);
    }

    pub fn clear(&self) {
        self.lock().clear();
    }

    pub fn list(&self) -> Vec<Rule> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Rule>> {
        // A panic while holding this lock cannot leave the list half-edited (every edit is one
        // Vec operation), so a poisoned lock is still usable.
        self.rules
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes (consumes one use of) the first matching rule of each aspect.
    fn take(&self, model: &str, protocol: ProviderKind) -> Vec<Fault> {
        let mut rules = self.lock();
        let mut taken: Vec<Fault> = Vec::new();
        let mut seen: Vec<Aspect> = Vec::new();
        let mut i = 0;
        while i < rules.len() {
            let rule = &mut rules[i];
            let a = aspect(&rule.fault);
            if seen.contains(&a) || !rule.matches(model, protocol) {
                i += 1;
                continue;
            }
            seen.push(a);
            taken.push(rule.fault.clone());
            if let Some(times) = rule.times.as_mut() {
                *times = times.saturating_sub(1);
                if *times == 0 {
                    rules.remove(i);
                    continue;
                }
            }
            i += 1;
        }
        taken
    }

    /// Resolves the knobs for one request.
    pub fn plan(
        &self,
        model: &str,
        protocol: ProviderKind,
        headers: &HeaderMap,
        latency: &LatencyProfile,
        rates: &FaultRates,
        seed: u64,
    ) -> Result<Plan, KnobError> {
        let draw = self.draws.fetch_add(1, Ordering::Relaxed);
        let mut rng = Rng::new(seed ^ draw.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5EED);
        let jitter = latency.ttft_jitter.min(latency.ttft);
        let ttft = if jitter.is_zero() {
            latency.ttft
        } else {
            let spread = rng.f64() * 2.0 - 1.0;
            Duration::from_secs_f64(
                (latency.ttft.as_secs_f64() + spread * jitter.as_secs_f64()).max(0.0),
            )
        };
        // Real models vary in speed between requests; ±20 % of the configured rate.
        let tokens_per_sec = if latency.tokens_per_sec.is_finite() && latency.tokens_per_sec > 0.0 {
            latency.tokens_per_sec * (0.8 + 0.4 * rng.f64())
        } else {
            0.0
        };
        let mut plan = Plan {
            ttft,
            tokens_per_sec,
            output_tokens: latency.output_tokens,
            cached_tokens: 0,
            failure: random_failure(&mut rng, rates, protocol),
            content: None,
            seed: None,
            line_ending: LineEnding::Lf,
        };
        for fault in self.take(model, protocol) {
            apply(&mut plan, fault);
        }
        apply_headers(&mut plan, headers)?;
        Ok(plan)
    }
}

fn apply(plan: &mut Plan, fault: Fault) {
    match fault {
        Fault::Latency {
            ttft,
            tokens_per_sec,
        } => {
            plan.ttft = ttft;
            plan.tokens_per_sec = tokens_per_sec;
        }
        Fault::SlowFirstToken(delay) => plan.ttft = delay,
        Fault::CachedPromptTokens(n) => plan.cached_tokens = n,
        Fault::BadOutput { text } => plan.content = Some(text),
        Fault::Http {
            status,
            retry_after,
        } => {
            plan.failure = Some(Failure::Http {
                status,
                retry_after,
            })
        }
        Fault::InsufficientQuota => plan.failure = Some(Failure::Quota),
        Fault::CutAfter { tokens } => {
            plan.failure = Some(Failure::Cut {
                tokens: tokens.into(),
            })
        }
        Fault::StallAfter { tokens, stall } => {
            plan.failure = Some(Failure::Stall {
                tokens: tokens.into(),
                stall,
            })
        }
        Fault::InStreamError {
            after_tokens,
            error_type,
        } => {
            plan.failure = Some(Failure::InStream {
                tokens: after_tokens.into(),
                error_type,
            })
        }
        Fault::MalformedAfter { tokens } => {
            plan.failure = Some(Failure::Malformed {
                tokens: tokens.into(),
            })
        }
        Fault::Silent => plan.failure = Some(Failure::Silent),
        Fault::PingsOnly { every } => plan.failure = Some(Failure::PingsOnly { every }),
        Fault::Drip { every } => plan.failure = Some(Failure::Drip { every }),
        Fault::NoTerminator { hold } => plan.failure = Some(Failure::NoTerminator { hold }),
        Fault::CleanEnd { tokens } => {
            plan.failure = Some(Failure::CleanEnd {
                tokens: tokens.into(),
            })
        }
        Fault::HugeLine { bytes, tokens } => {
            plan.failure = Some(Failure::HugeLine {
                bytes,
                tokens: tokens.into(),
            })
        }
        Fault::Reset => plan.failure = Some(Failure::Reset),
        Fault::ResetAfter { tokens } => {
            plan.failure = Some(Failure::ResetAfter {
                tokens: tokens.into(),
            });
        }
        Fault::Billing => plan.failure = Some(Failure::Billing),
        Fault::ContextTooLong => plan.failure = Some(Failure::ContextTooLong),
        Fault::ContentPolicy => plan.failure = Some(Failure::ContentPolicy),
        Fault::LineEnding(ending) => plan.line_ending = ending,
    }
}

/// A random failure according to `rates` (one uniform draw against the cumulative rates).
fn random_failure(rng: &mut Rng, rates: &FaultRates, protocol: ProviderKind) -> Option<Failure> {
    let roll = rng.f64();
    let after = rng.range(0, 40);
    // OpenAI never answers 529; its overload answer is a 503.
    let overloaded = match protocol {
        ProviderKind::OpenAi => 503,
        ProviderKind::Anthropic => 529,
    };
    let overload_error = match protocol {
        ProviderKind::OpenAi => "server_error",
        ProviderKind::Anthropic => "overloaded_error",
    };
    let table: [(f64, Failure); 8] = [
        (
            rates.http_429,
            Failure::Http {
                status: 429,
                retry_after: Some(Duration::from_secs(1)),
            },
        ),
        (
            rates.http_500,
            Failure::Http {
                status: 500,
                retry_after: None,
            },
        ),
        (
            rates.http_503,
            Failure::Http {
                status: 503,
                retry_after: Some(Duration::from_secs(1)),
            },
        ),
        (
            rates.overloaded_529,
            Failure::Http {
                status: overloaded,
                retry_after: None,
            },
        ),
        (rates.cut, Failure::Cut { tokens: after }),
        (
            rates.stall,
            Failure::Stall {
                tokens: after,
                stall: Duration::from_secs(60),
            },
        ),
        (
            rates.in_stream_error,
            Failure::InStream {
                tokens: after,
                error_type: overload_error.to_owned(),
            },
        ),
        (rates.malformed, Failure::Malformed { tokens: after }),
    ];
    let mut cumulative = 0.0;
    for (rate, failure) in table {
        if !rate.is_finite() || rate <= 0.0 {
            continue;
        }
        cumulative += rate;
        if roll < cumulative {
            return Some(failure);
        }
    }
    None
}

/// A request header that could not be understood.
#[derive(Debug, thiserror::Error)]
#[error("header {header}: {problem}")]
pub(crate) struct KnobError {
    pub header: &'static str,
    pub problem: String,
}

fn header<'a>(headers: &'a HeaderMap, name: &'static str) -> Result<Option<&'a str>, KnobError> {
    let Some(value) = headers.get(name) else {
        return Ok(None);
    };
    value
        .to_str()
        .map(|v| Some(v.trim()))
        .map_err(|_| KnobError {
            header: name,
            problem: "is not visible ASCII".into(),
        })
}

fn number<T: std::str::FromStr>(
    headers: &HeaderMap,
    name: &'static str,
) -> Result<Option<T>, KnobError> {
    let Some(raw) = header(headers, name)? else {
        return Ok(None);
    };
    raw.parse().map(Some).map_err(|_| KnobError {
        header: name,
        problem: format!("{raw:?} is not a number"),
    })
}

fn apply_headers(plan: &mut Plan, headers: &HeaderMap) -> Result<(), KnobError> {
    if let Some(ms) = number::<u64>(headers, "x-sim-ttft-ms")? {
        plan.ttft = Duration::from_millis(ms);
    }
    if let Some(tps) = number::<f64>(headers, "x-sim-tps")? {
        plan.tokens_per_sec = tps;
    }
    if let Some(n) = number::<u32>(headers, "x-sim-output-tokens")? {
        plan.output_tokens = Some(n);
    }
    if let Some(n) = number::<u64>(headers, "x-sim-cached-tokens")? {
        plan.cached_tokens = n;
    }
    if let Some(seed) = number::<u64>(headers, "x-sim-seed")? {
        plan.seed = Some(seed);
    }
    if let Some(raw) = header(headers, "x-sim-line-ending")? {
        plan.line_ending = LineEnding::parse(raw).ok_or_else(|| KnobError {
            header: "x-sim-line-ending",
            problem: format!("{raw:?} is not a line ending; expected lf, crlf or cr"),
        })?;
    }
    if let Some(spec) = header(headers, "x-sim-fault")? {
        match parse_fault(spec) {
            Ok(Fault::SlowFirstToken(delay)) => plan.ttft = delay,
            Ok(fault) => apply(plan, fault),
            Err(problem) => {
                return Err(KnobError {
                    header: "x-sim-fault",
                    problem,
                });
            }
        }
    }
    Ok(())
}

/// Parses the compact `x-sim-fault` syntax: `429`, `429:<retry_after_ms>`, `quota`,
/// `billing`, `context`, `policy`, `slow:<ms>`, `cut:<tokens>`, `stall:<tokens>:<ms>`,
/// `error:<type>:<tokens>`, `malformed:<tokens>`, `bad_output:<text>`, `silent`, `reset`,
/// `pings[:<every_ms>]`, `drip:<every_ms>`, `no_terminator[:<hold_ms>]`, `clean_end:<tokens>`,
/// `huge_line:<bytes>[:<tokens>]`.
pub(crate) fn parse_fault(spec: &str) -> Result<Fault, String> {
    const SYNTAX: &str = "expected one of 429, 429:<retry_after_ms>, quota, billing, context, \
                          policy, slow:<ms>, cut:<tokens>, stall:<tokens>:<ms>, error:<type>:<tokens>, \
                          malformed:<tokens>, bad_output:<text>, silent, reset, pings[:<every_ms>], \
                          drip:<every_ms>, no_terminator[:<hold_ms>], clean_end:<tokens>, \
                          huge_line:<bytes>[:<tokens>]";
    // The replacement text is free-form (usually JSON, full of colons): everything after the
    // first colon is the text, verbatim.
    if let Some(text) = spec.trim_start().strip_prefix("bad_output:") {
        return Ok(Fault::BadOutput {
            text: text.to_owned(),
        });
    }
    let parts: Vec<&str> = spec.split(':').map(str::trim).collect();
    let num = |s: &str| -> Result<u64, String> {
        s.parse::<u64>()
            .map_err(|_| format!("{s:?} in {spec:?} is not a whole number; {SYNTAX}"))
    };
    let tokens =
        |s: &str| -> Result<u32, String> { num(s).map(|n| u32::try_from(n).unwrap_or(u32::MAX)) };
    match parts.as_slice() {
        [status] if status.chars().all(|c| c.is_ascii_digit()) => {
            let status = http_status(num(status)?, spec)?;
            Ok(Fault::Http {
                status,
                retry_after: None,
            })
        }
        [status, ms] if status.chars().all(|c| c.is_ascii_digit()) => Ok(Fault::Http {
            status: http_status(num(status)?, spec)?,
            retry_after: Some(Duration::from_millis(num(ms)?)),
        }),
        ["quota"] => Ok(Fault::InsufficientQuota),
        ["slow", ms] => Ok(Fault::SlowFirstToken(Duration::from_millis(num(ms)?))),
        ["cut", n] => Ok(Fault::CutAfter { tokens: tokens(n)? }),
        ["stall", n, ms] => Ok(Fault::StallAfter {
            tokens: tokens(n)?,
            stall: Duration::from_millis(num(ms)?),
        }),
        ["error", kind, n] if !kind.is_empty() => Ok(Fault::InStreamError {
            after_tokens: tokens(n)?,
            error_type: (*kind).to_owned(),
        }),
        ["malformed", n] => Ok(Fault::MalformedAfter { tokens: tokens(n)? }),
        ["billing"] => Ok(Fault::Billing),
        ["context"] => Ok(Fault::ContextTooLong),
        ["policy"] => Ok(Fault::ContentPolicy),
        ["silent"] => Ok(Fault::Silent),
        ["reset"] => Ok(Fault::Reset),
        ["reset", n] => Ok(Fault::ResetAfter { tokens: tokens(n)? }),
        ["pings"] => Ok(Fault::PingsOnly {
            every: Duration::from_secs(1),
        }),
        ["pings", ms] => Ok(Fault::PingsOnly {
            every: Duration::from_millis(num(ms)?.max(1)),
        }),
        ["drip", ms] => Ok(Fault::Drip {
            every: Duration::from_millis(num(ms)?),
        }),
        ["no_terminator"] => Ok(Fault::NoTerminator {
            hold: Duration::ZERO,
        }),
        ["no_terminator", ms] => Ok(Fault::NoTerminator {
            hold: Duration::from_millis(num(ms)?),
        }),
        ["clean_end", n] => Ok(Fault::CleanEnd { tokens: tokens(n)? }),
        ["huge_line", bytes] => Ok(Fault::HugeLine {
            bytes: num(bytes)?,
            tokens: 0,
        }),
        ["huge_line", bytes, n] => Ok(Fault::HugeLine {
            bytes: num(bytes)?,
            tokens: tokens(n)?,
        }),
        _ => Err(format!("{spec:?} is not a fault; {SYNTAX}")),
    }
}

fn http_status(n: u64, spec: &str) -> Result<u16, String> {
    u16::try_from(n)
        .ok()
        .filter(|s| (400..=599).contains(s))
        .ok_or_else(|| format!("{spec:?}: HTTP fault status must be 400-599"))
}

/// Serde helpers: durations as whole milliseconds, which is what a load-test script writes.
mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

mod opt_millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Option::<u64>::deserialize(d).map(|ms| ms.map(Duration::from_millis))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn book(rules: Vec<Rule>) -> RuleBook {
        let book = RuleBook::default();
        for r in rules {
            book.push(r);
        }
        book
    }

    fn plan_for(book: &RuleBook, model: &str, protocol: ProviderKind) -> Plan {
        let latency = crate::SimConfig::fast(1).latency;
        book.plan(
            model,
            protocol,
            &HeaderMap::new(),
            &latency,
            &FaultRates::default(),
            1,
        )
        .unwrap()
    }

    #[test]
    fn rules_match_on_model_and_protocol_and_are_consumed_in_order() {
        let book = book(vec![
            Rule {
                model: Some("gpt-4o-mini".into()),
                protocol: None,
                fault: Fault::Http {
                    status: 500,
                    retry_after: None,
                },
                times: Some(1),
            },
            Rule {
                model: None,
                protocol: Some(ProviderKind::Anthropic),
                fault: Fault::Http {
                    status: 529,
                    retry_after: None,
                },
                times: Some(2),
            },
            Rule::times(Fault::CutAfter { tokens: 3 }, 1),
        ]);
        let status = |p: &Plan| match p.failure {
            Some(Failure::Http { status, .. }) => Some(status),
            Some(Failure::Cut { .. }) => Some(0),
            _ => None,
        };
        // Anthropic matches only the second rule, twice.
        assert_eq!(
            status(&plan_for(&book, "claude", ProviderKind::Anthropic)),
            Some(529)
        );
        assert_eq!(
            status(&plan_for(&book, "claude", ProviderKind::Anthropic)),
            Some(529)
        );
        // The model rule comes first for its model; then the catch-all cut; then nothing.
        assert_eq!(
            status(&plan_for(&book, "gpt-4o-mini", ProviderKind::OpenAi)),
            Some(500)
        );
        assert_eq!(
            status(&plan_for(&book, "gpt-4o-mini", ProviderKind::OpenAi)),
            Some(0)
        );
        assert_eq!(
            status(&plan_for(&book, "gpt-4o-mini", ProviderKind::OpenAi)),
            None
        );
        assert!(book.list().is_empty());
    }

    #[test]
    fn one_rule_per_aspect_applies_together() {
        let book = book(vec![
            Rule::always(Fault::CachedPromptTokens(64)),
            Rule::times(
                Fault::Http {
                    status: 429,
                    retry_after: None,
                },
                1,
            ),
            Rule::times(
                Fault::Http {
                    status: 500,
                    retry_after: None,
                },
                1,
            ),
        ]);
        let first = plan_for(&book, "m", ProviderKind::OpenAi);
        assert_eq!(first.cached_tokens, 64);
        assert_eq!(
            first.failure,
            Some(Failure::Http {
                status: 429,
                retry_after: None
            })
        );
        let second = plan_for(&book, "m", ProviderKind::OpenAi);
        assert_eq!(second.cached_tokens, 64);
        assert_eq!(
            second.failure,
            Some(Failure::Http {
                status: 500,
                retry_after: None
            })
        );
        assert_eq!(book.list().len(), 1, "the forever rule stays");
    }

    #[test]
    fn headers_override_rules() {
        let book = book(vec![Rule::always(Fault::Http {
            status: 500,
            retry_after: None,
        })]);
        let mut headers = HeaderMap::new();
        headers.insert("x-sim-fault", "stall:10:5000".parse().unwrap());
        headers.insert("x-sim-cached-tokens", "7".parse().unwrap());
        let latency = crate::SimConfig::fast(1).latency;
        let plan = book
            .plan(
                "m",
                ProviderKind::OpenAi,
                &headers,
                &latency,
                &FaultRates::default(),
                1,
            )
            .unwrap();
        assert_eq!(
            plan.failure,
            Some(Failure::Stall {
                tokens: 10,
                stall: Duration::from_millis(5000)
            })
        );
        assert_eq!(plan.cached_tokens, 7);
        headers.insert("x-sim-fault", "explode".parse().unwrap());
        let err = book
            .plan(
                "m",
                ProviderKind::OpenAi,
                &headers,
                &latency,
                &FaultRates::default(),
                1,
            )
            .unwrap_err();
        assert!(err.to_string().contains("x-sim-fault"), "{err}");
    }

    #[test]
    fn fault_header_syntax() {
        assert_eq!(
            parse_fault("429"),
            Ok(Fault::Http {
                status: 429,
                retry_after: None
            })
        );
        assert_eq!(
            parse_fault("529:1500"),
            Ok(Fault::Http {
                status: 529,
                retry_after: Some(Duration::from_millis(1500))
            })
        );
        assert_eq!(parse_fault("cut:20"), Ok(Fault::CutAfter { tokens: 20 }));
        assert_eq!(
            parse_fault("reset:20"),
            Ok(Fault::ResetAfter { tokens: 20 })
        );
        assert_eq!(
            parse_fault("error:overloaded_error:5"),
            Ok(Fault::InStreamError {
                after_tokens: 5,
                error_type: "overloaded_error".into()
            })
        );
        assert_eq!(
            parse_fault("malformed:3"),
            Ok(Fault::MalformedAfter { tokens: 3 })
        );
        assert_eq!(parse_fault("quota"), Ok(Fault::InsufficientQuota));
        assert_eq!(
            parse_fault(r#"bad_output:{"concepts":[]}"#),
            Ok(Fault::BadOutput {
                text: r#"{"concepts":[]}"#.into()
            })
        );
        assert!(parse_fault("200").is_err());
        assert!(parse_fault("cut:x").is_err());
    }

    #[test]
    fn random_rates_fire_about_as_often_as_configured() {
        let rates = FaultRates {
            http_429: 0.25,
            cut: 0.25,
            ..FaultRates::default()
        };
        let mut rng = Rng::new(9);
        let n = 4000;
        let hits = (0..n)
            .filter(|_| random_failure(&mut rng, &rates, ProviderKind::OpenAi).is_some())
            .count();
        assert!((1800..2200).contains(&hits), "{hits} of {n}");
        assert!(random_failure(&mut rng, &FaultRates::default(), ProviderKind::OpenAi).is_none());
    }

    #[test]
    fn rules_round_trip_as_json() {
        let rule = Rule {
            model: Some("m".into()),
            protocol: Some(ProviderKind::OpenAi),
            fault: Fault::Http {
                status: 429,
                retry_after: Some(Duration::from_millis(250)),
            },
            times: Some(2),
        };
        let json = serde_json::to_value(&rule).unwrap();
        assert_eq!(json["fault"]["http"]["retry_after_ms"], 250);
        assert_eq!(json["protocol"], "openai");
        assert_eq!(serde_json::from_value::<Rule>(json).unwrap(), rule);
        let slow: Fault = serde_json::from_str(r#"{"slow_first_token":1500}"#).unwrap();
        assert_eq!(slow, Fault::SlowFirstToken(Duration::from_millis(1500)));
        let bad: Fault = serde_json::from_str(r#"{"bad_output":{"text":"not json"}}"#).unwrap();
        assert_eq!(
            bad,
            Fault::BadOutput {
                text: "not json".into()
            }
        );
    }

    #[test]
    fn bad_output_combines_with_a_failure_rule() {
        let book = book(vec![
            Rule::times(
                Fault::BadOutput {
                    text: "oops".into(),
                },
                1,
            ),
            Rule::times(Fault::CutAfter { tokens: 2 }, 1),
        ]);
        let plan = plan_for(&book, "m", ProviderKind::Anthropic);
        assert_eq!(plan.content.as_deref(), Some("oops"));
        assert_eq!(plan.failure, Some(Failure::Cut { tokens: 2 }));
        let next = plan_for(&book, "m", ProviderKind::Anthropic);
        assert_eq!(next.content, None, "a one-shot rule is used up");
    }
}
