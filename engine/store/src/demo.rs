//! Sample traffic for demos and the dashboard's browser test: realistic request records over the
//! last days (diurnal shape, all four processes, both providers, catalog prices, a few errors and
//! fallbacks, several callers) plus an incident that trips alerts, deterministic by seed.
//!
//! [`generate`] is pure; [`record_all`] hands the records to a [`Tracker`], so they reach SQLite
//! or DynamoDB exactly as live traffic does and the alert rules see them in time order.

use std::sync::Arc;

use agents::Process;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use keyvex_engine::catalog::{Catalog, ModelSpec};
use keyvex_engine::cost::{Cost, cost};
use keyvex_engine::record::{RecordError, RequestRecord};
use keyvex_engine::stream::Usage;

use crate::tracker::Tracker;

const MS_PER_HOUR: u64 = 3_600_000;
const MS_PER_DAY: u64 = 24 * MS_PER_HOUR;
/// The most days of history: DynamoDB expires request items after 30 days.
pub const MAX_DAYS: u32 = 30;
/// Below this the incident would be most of the traffic.
pub const MIN_REQUESTS: usize = 100;
pub const MAX_REQUESTS: usize = 1_000_000;

/// Requests of the error/latency incident: enough to pass the rolling rules' sample minimum.
const INCIDENT_REQUESTS: u64 = 40;
/// Spacing of incident requests: all 40 fit in the default 5-minute alert window.
const INCIDENT_STEP_MS: u64 = 6_000;
/// Requests that cost more than the $1 per-request threshold.
const EXPENSIVE_REQUESTS: u64 = 3;

const CALLERS: [&str; 12] = [
    "acme-web",
    "globex-api",
    "initech-batch",
    "umbrella-mobile",
    "hooli-studio",
    "stark-labs",
    "wayne-ops",
    "wonka-shop",
    "tyrell-cx",
    "cyberdyne-qa",
    "aperture-dev",
    "soylent-crm",
];

/// Errors of the demo generator.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("invalid demo setting {name}={value}: expected {expected}")]
    Invalid {
        name: &'static str,
        value: String,
        expected: String,
    },
    #[error(
        "the catalog routes {process} to model {model:?}, which it does not list; fix the models file"
    )]
    UnknownModel {
        process: &'static str,
        model: String,
    },
    #[error("recording demo traffic failed: {0}")]
    Record(#[from] RecordError),
}

/// What to generate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DemoConfig {
    /// Total records, the incident included.
    pub requests: usize,
    /// History length: records start in `[end_ms - days, end_ms)`.
    pub days: u32,
    /// Distinct callers (user ids); a few of them send most of the traffic.
    pub users: usize,
    pub seed: u64,
    /// The end of the generated history (usually now).
    pub end_ms: u64,
}

impl DemoConfig {
    /// 5 000 requests over 7 days from 8 callers, seed 42, ending at `end_ms`.
    pub fn new(end_ms: u64) -> DemoConfig {
        DemoConfig {
            requests: 5_000,
            days: 7,
            users: 8,
            seed: 42,
            end_ms,
        }
    }

    fn validate(&self) -> Result<(), DemoError> {
        if !(MIN_REQUESTS..=MAX_REQUESTS).contains(&self.requests) {
            return Err(DemoError::Invalid {
                name: "requests",
                value: self.requests.to_string(),
                expected: format!("{MIN_REQUESTS} to {MAX_REQUESTS}"),
            });
        }
        if !(1..=MAX_DAYS).contains(&self.days) {
            return Err(DemoError::Invalid {
                name: "days",
                value: self.days.to_string(),
                expected: format!("1 to {MAX_DAYS}"),
            });
        }
        if !(1..=100).contains(&self.users) {
            return Err(DemoError::Invalid {
                name: "users",
                value: self.users.to_string(),
                expected: "1 to 100".to_owned(),
            });
        }
        if self.end_ms < u64::from(self.days) * MS_PER_DAY {
            return Err(DemoError::Invalid {
                name: "end_ms",
                value: self.end_ms.to_string(),
                expected: "an instant at least `days` after 1970".to_owned(),
            });
        }
        Ok(())
    }
}

/// The shape of one process's requests: share of traffic and typical token counts.
struct Shape {
    process: Process,
    weight: f64,
    input: f64,
    output: f64,
}

const SHAPES: [Shape; 4] = [
    Shape {
        process: Process::MagicSpark,
        weight: 0.30,
        input: 1_200.0,
        output: 300.0,
    },
    Shape {
        process: Process::LogicArchitect,
        weight: 0.25,
        input: 2_400.0,
        output: 600.0,
    },
    Shape {
        process: Process::ContentCrafter,
        weight: 0.25,
        input: 3_000.0,
        output: 750.0,
    },
    Shape {
        process: Process::StyleMaster,
        weight: 0.20,
        input: 1_800.0,
        output: 400.0,
    },
];

/// Generates `cfg.requests` records sorted by start time. Same config, same records (ids
/// included): request ids are v7 UUIDs built from the timestamp and seeded random bytes.
pub fn generate(cfg: &DemoConfig, catalog: &Catalog) -> Result<Vec<RequestRecord>, DemoError> {
    cfg.validate()?;
    let mut g = Generator {
        rng: StdRng::seed_from_u64(cfg.seed),
        catalog,
        users: cfg.users,
    };
    let incident = INCIDENT_REQUESTS + EXPENSIVE_REQUESTS;
    let background = cfg.requests as u64 - incident;
    let start_ms = cfg.end_ms - u64::from(cfg.days) * MS_PER_DAY;
    let mut records = Vec::with_capacity(cfg.requests);
    for _ in 0..background {
        let ts = g.diurnal_instant(start_ms, cfg.end_ms);
        records.push(g.request(ts)?);
    }
    // The incident: three hours before the end, upstream errors and slow answers on one route.
    let incident_start = cfg.end_ms.saturating_sub(3 * MS_PER_HOUR).max(start_ms);
    for i in 0..INCIDENT_REQUESTS {
        records.push(g.incident_request(incident_start + i * INCIDENT_STEP_MS)?);
    }
    // Runaway prompts: a few huge requests, each over the per-request cost threshold.
    let expensive_start = cfg.end_ms.saturating_sub(2 * MS_PER_HOUR).max(start_ms);
    for i in 0..EXPENSIVE_REQUESTS {
        records.push(g.expensive_request(expensive_start + i * 10 * 60_000)?);
    }
    records.sort_by(|a, b| (a.timestamp_ms, &a.request_id).cmp(&(b.timestamp_ms, &b.request_id)));
    Ok(records)
}

/// Hands every record to the tracker and waits until all are durable in its ledger (the shipper
/// then copies them to the store; [`Tracker::shutdown`] waits for that). Returns the count.
pub async fn record_all(tracker: &Tracker, records: Vec<RequestRecord>) -> Result<u64, DemoError> {
    let receipts: Vec<_> = records.into_iter().map(|r| tracker.record(r)).collect();
    let count = receipts.len() as u64;
    for receipt in receipts {
        receipt.durable().await?;
    }
    Ok(count)
}

/// Totals of generated records, for the command's summary line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DemoSummary {
    pub requests: u64,
    pub errors: u64,
    pub fallbacks: u64,
    pub cost: Cost,
}

pub fn summarize(records: &[RequestRecord]) -> DemoSummary {
    DemoSummary {
        requests: records.len() as u64,
        errors: records.iter().filter(|r| !r.success).count() as u64,
        fallbacks: records.iter().filter(|r| r.fallback_used).count() as u64,
        cost: records.iter().map(RequestRecord::cost).sum(),
    }
}

struct Generator<'a> {
    rng: StdRng,
    catalog: &'a Catalog,
    users: usize,
}

impl<'a> Generator<'a> {
    /// A start instant in `[start, end)` with more traffic in the (UTC) afternoon than at night:
    /// rejection sampling against a raised cosine that peaks at 15:00 and bottoms at 03:00.
    fn diurnal_instant(&mut self, start: u64, end: u64) -> u64 {
        loop {
            let ts = self.rng.random_range(start..end);
            let hour = (ts % MS_PER_DAY) as f64 / MS_PER_HOUR as f64;
            let phase = (hour - 3.0) / 24.0 * std::f64::consts::TAU;
            let weight = 0.15 + 0.85 * (0.5 - 0.5 * phase.cos());
            if self.rng.random::<f64>() < weight {
                return ts;
            }
        }
    }

    /// A caller drawn from a Zipf-like distribution: caller `i` is `1/(i+1)` as likely as the
    /// first, so "top callers" has a clear head and a long tail.
    fn caller(&mut self) -> String {
        let total: f64 = (0..self.users).map(|i| 1.0 / (i as f64 + 1.0)).sum();
        let mut pick = self.rng.random::<f64>() * total;
        let mut index = self.users - 1;
        for i in 0..self.users {
            pick -= 1.0 / (i as f64 + 1.0);
            if pick <= 0.0 {
                index = i;
                break;
            }
        }
        let name = CALLERS[index % CALLERS.len()];
        match index / CALLERS.len() {
            0 => name.to_owned(),
            n => format!("{name}-{}", n + 1),
        }
    }

    /// A factor around 1 with a right tail (mean of two uniforms, squared-ish spread).
    fn spread(&mut self, low: f64, high: f64) -> f64 {
        let u = (self.rng.random::<f64>() + self.rng.random::<f64>()) / 2.0;
        low + (high - low) * u * u * 1.6
    }

    fn model(&self, process: Process, fallback: bool) -> Result<&'a ModelSpec, DemoError> {
        let catalog: &'a Catalog = self.catalog;
        let route = catalog.route(process);
        let id = if fallback {
            &route.fallback
        } else {
            &route.primary
        };
        catalog
            .model(id)
            .map(Arc::as_ref)
            .ok_or_else(|| DemoError::UnknownModel {
                process: process.key(),
                model: id.clone(),
            })
    }

    fn id(&mut self, ts: u64) -> String {
        let mut bytes = [0u8; 10];
        self.rng.fill(&mut bytes);
        uuid::Builder::from_unix_timestamp_millis(ts, &bytes)
            .into_uuid()
            .to_string()
    }

    /// Prompt usage with prefix caching: most requests reuse a cached system prompt; Anthropic
    /// requests sometimes write the cache.
    fn usage(&mut self, model: &ModelSpec, input: u64, output: u64) -> Usage {
        let mut usage = Usage {
            input,
            output,
            ..Usage::default()
        };
        if self.rng.random_bool(0.6) {
            usage.cached_input = (input as f64 * self.rng.random_range(0.3..0.7)) as u64;
        } else if model.pricing.cache_write.is_some() && self.rng.random_bool(0.25) {
            usage.cache_write = (input as f64 * self.rng.random_range(0.2..0.5)) as u64;
        }
        usage
    }

    /// Time to first token and output speed by model size: small models answer sooner.
    fn speed(model: &ModelSpec) -> (f64, f64) {
        let id = model.id.as_str();
        if id.contains("nano") || id.contains("mini") || id.contains("haiku") {
            (300.0, 260.0)
        } else if id.contains("opus") || id.contains("5.5") {
            (700.0, 140.0)
        } else {
            (480.0, 200.0)
        }
    }

    fn request(&mut self, ts: u64) -> Result<RequestRecord, DemoError> {
        let mut pick = self.rng.random::<f64>();
        let shape = SHAPES
            .iter()
            .find(|s| {
                pick -= s.weight;
                pick <= 0.0
            })
            .unwrap_or(&SHAPES[3]);
        let (process, mean_in, mean_out) = (shape.process, shape.input, shape.output);
        let fallback = self.rng.random_bool(0.04);
        let model = self.model(process, fallback)?;
        let input = (mean_in * self.spread(0.4, 1.2)).max(50.0) as u64;
        let mut output = (mean_out * self.spread(0.3, 1.3)).max(10.0) as u64;
        let (ttft_base, tokens_per_s) = Self::speed(model);
        let mut ttft = ttft_base * self.spread(0.6, 1.4) + input as f64 / 40.0;
        if fallback {
            // The primary failed before its first token; the caller waited for that too.
            ttft += self.rng.random_range(300.0..2_500.0);
        }
        let roll = self.rng.random::<f64>();
        let user = self.caller();
        let id = self.id(ts);
        let mut rec = RequestRecord::new(&user, process.key(), model.provider.as_str(), &model.id)
            .with_request_id(&id)
            .with_timestamp_ms(ts)
            .with_attempts(if fallback { 2 } else { 1 }, fallback);
        if roll < 0.012 {
            // Failed before any content: nothing billed.
            let kind = ["upstream_5xx", "timeout", "rate_limited", "overloaded"]
                [self.rng.random_range(0..4)];
            let latency = ttft + self.rng.random_range(0.0..3_000.0);
            return Ok(rec
                .with_latency(latency as u64, None)
                .with_attempts(2, fallback)
                .failed(kind, &format!("demo: {kind} from {}", model.provider)));
        }
        let mut cut = false;
        if roll < 0.03 {
            // Cut mid-stream (error or caller gone): part of the answer was generated and billed.
            output = (output as f64 * self.rng.random_range(0.1..0.6)) as u64;
            cut = true;
        }
        let usage = self.usage(model, input, output);
        let latency = ttft + output as f64 * 1_000.0 / tokens_per_s;
        rec = rec
            .with_usage(&usage)
            .with_cost(cost(&usage, &model.pricing))
            .with_latency(latency as u64, Some(ttft as u64))
            .with_cost_estimated(cut);
        if fallback && roll > 0.5 {
            // The primary's stream broke mid-answer and the fallback restarted it (no extra
            // draw, so the generated data stays the same for a seed). Half the fallbacks, so
            // any day of the demo has some: the dashboard's default range is the last day.
            rec.rescued_from = vec![self.catalog.route(process).primary.clone()];
        }
        Ok(match (cut, roll < 0.022) {
            (false, _) => rec,
            (true, true) => rec.failed("stream_error", "demo: upstream stream ended with an error"),
            (true, false) => rec.cancelled(),
        })
    }

    /// One request of the incident: Logic Architect's primary is slow and failing a third of
    /// the time, which trips the error-rate and average-latency rules.
    fn incident_request(&mut self, ts: u64) -> Result<RequestRecord, DemoError> {
        let process = Process::LogicArchitect;
        let model = self.model(process, false)?;
        let user = self.caller();
        let id = self.id(ts);
        let ttft = self.rng.random_range(2_500..4_500);
        let latency = ttft + self.rng.random_range(4_000..7_000);
        let rec = RequestRecord::new(&user, process.key(), model.provider.as_str(), &model.id)
            .with_request_id(&id)
            .with_timestamp_ms(ts);
        if self.rng.random_bool(0.35) {
            return Ok(rec
                .with_latency(latency, None)
                .with_attempts(3, false)
                .failed(
                    "upstream_5xx",
                    "demo: 503 from upstream during the incident",
                ));
        }
        let input = self.rng.random_range(1_500..3_500);
        let usage = self.usage(model, input, 500);
        Ok(rec
            .with_usage(&usage)
            .with_cost(cost(&usage, &model.pricing))
            .with_latency(latency, Some(ttft)))
    }

    /// A runaway Content Crafter request: a huge pasted document and a long answer, over $1.
    fn expensive_request(&mut self, ts: u64) -> Result<RequestRecord, DemoError> {
        let process = Process::ContentCrafter;
        let model = self.model(process, false)?;
        let user = self.caller();
        let id = self.id(ts);
        // Sonnet: 300k+ input tokens alone are about $0.90; the answer takes it over $1.
        let usage = Usage {
            input: self.rng.random_range(300_000..360_000),
            output: self.rng.random_range(8_000..12_000),
            ..Usage::default()
        };
        let (ttft_base, tokens_per_s) = Self::speed(model);
        let ttft = ttft_base + usage.input as f64 / 40.0;
        let latency = ttft + usage.output as f64 * 1_000.0 / tokens_per_s;
        Ok(
            RequestRecord::new(&user, process.key(), model.provider.as_str(), &model.id)
                .with_request_id(&id)
                .with_timestamp_ms(ts)
                .with_usage(&usage)
                .with_cost(cost(&usage, &model.pricing))
                .with_latency(latency as u64, Some(ttft as u64)),
        )
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use keyvex_engine::record::RequestStatus;

    const END: u64 = 1_764_080_467_123; // 2025-11-25T14:21:07.123Z

    fn catalog() -> Catalog {
        Catalog::embedded().unwrap()
    }

    #[test]
    fn same_seed_same_records_other_seed_other_records() {
        let cfg = DemoConfig::new(END);
        let a = generate(&cfg, &catalog()).unwrap();
        let b = generate(&cfg, &catalog()).unwrap();
        assert_eq!(a, b);
        let c = generate(&DemoConfig { seed: 7, ..cfg }, &catalog()).unwrap();
        assert_ne!(a, c);
    }

    #[test]
    fn traffic_is_varied_priced_and_inside_the_range() {
        let cfg = DemoConfig::new(END);
        let catalog = catalog();
        let recs = generate(&cfg, &catalog).unwrap();
        assert_eq!(recs.len(), cfg.requests);
        let start = END - 7 * MS_PER_DAY;
        assert!(recs.iter().all(|r| (start..END).contains(&r.timestamp_ms)));
        assert!(
            recs.windows(2)
                .all(|w| w[0].timestamp_ms <= w[1].timestamp_ms)
        );
        let set = |f: fn(&RequestRecord) -> &str| -> HashSet<String> {
            recs.iter().map(|r| f(r).to_owned()).collect()
        };
        assert_eq!(set(|r| &r.process).len(), 4);
        assert_eq!(set(|r| &r.provider).len(), 2);
        assert_eq!(set(|r| &r.user_id).len(), cfg.users);
        let ids = set(|r| &r.request_id);
        assert_eq!(ids.len(), recs.len(), "request ids are unique");

        // Every cost is the catalog price of the record's own usage.
        for r in &recs {
            let model = catalog.model(&r.model).unwrap();
            let usage = Usage {
                input: r.input_tokens,
                cached_input: r.cached_input_tokens,
                cache_write: r.cache_write_tokens,
                output: r.output_tokens,
            };
            assert_eq!(r.cost(), cost(&usage, &model.pricing), "{r:?}");
        }

        let s = summarize(&recs);
        let failed = recs
            .iter()
            .filter(|r| r.status == RequestStatus::Failed)
            .count();
        let rate = failed as f64 / recs.len() as f64;
        assert!((0.01..0.06).contains(&rate), "error rate {rate}");
        let fallback_rate = s.fallbacks as f64 / s.requests as f64;
        assert!(
            (0.02..0.07).contains(&fallback_rate),
            "fallback rate {fallback_rate}"
        );
        // A few fallback answers rescued a primary's stream that broke mid-answer.
        let rescued: Vec<_> = recs.iter().filter(|r| !r.rescued_from.is_empty()).collect();
        assert!(!rescued.is_empty() && rescued.len() < s.fallbacks as usize);
        assert!(
            rescued
                .iter()
                .all(|r| r.fallback_used && r.rescued_from[0] != r.model)
        );
        let over_a_dollar = recs
            .iter()
            .filter(|r| r.cost() > Cost::from_micro_usd(1_000_000))
            .count();
        assert_eq!(over_a_dollar, EXPENSIVE_REQUESTS as usize);

        // Diurnal: the busiest UTC hours see clearly more traffic than the quietest.
        let mut by_hour = [0u32; 24];
        for r in &recs {
            by_hour[((r.timestamp_ms % MS_PER_DAY) / MS_PER_HOUR) as usize] += 1;
        }
        assert!(by_hour[15] > 3 * by_hour[3], "{by_hour:?}");
    }

    /// The dashboard's default range is the last day: whatever the hour the demo ends at, that
    /// day holds rescued calls to draw (the dashboard browser test checks they are drawn).
    #[test]
    fn the_last_day_of_the_default_demo_has_rescued_calls_at_any_hour() {
        let catalog = catalog();
        for quarter in 0..96 {
            let end = END + quarter * MS_PER_HOUR / 4;
            let recs = generate(&DemoConfig::new(end), &catalog).unwrap();
            let last_day = recs
                .iter()
                .filter(|r| r.timestamp_ms + MS_PER_DAY >= end && !r.rescued_from.is_empty())
                .count();
            assert!(
                last_day >= 3,
                "ending at {end}: {last_day} rescued calls in the last day"
            );
        }
    }

    #[test]
    fn invalid_settings_name_the_setting() {
        let cfg = DemoConfig {
            days: 0,
            ..DemoConfig::new(END)
        };
        let e = generate(&cfg, &catalog()).unwrap_err().to_string();
        assert!(e.contains("days=0") && e.contains("1 to 30"), "{e}");
        let cfg = DemoConfig {
            requests: 5,
            ..DemoConfig::new(END)
        };
        let e = generate(&cfg, &catalog()).unwrap_err().to_string();
        assert!(e.contains("requests=5"), "{e}");
    }
}
