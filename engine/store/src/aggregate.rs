//! Aggregation of request records for the admin API: one pure function over records, so the
//! SQLite and DynamoDB stores answer identically.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::Serialize;

use keyvex_engine::record::{RequestRecord, RequestStatus};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GroupBy {
    Process,
    Provider,
    Model,
    /// UTC calendar day of the request's start, `yyyy-mm-dd`.
    Day,
    /// UTC hour of the request's start, `yyyy-mm-ddThh` (the dashboard's time series).
    Hour,
    User,
    /// UTC minute of the request's start, `yyyy-mm-ddThh:mm` (the dashboard's series for ranges
    /// of a few hours, where hourly buckets would be two or three points).
    Minute,
    /// The model catalog version that priced the request (`0`, `1`, …).
    #[serde(rename = "catalogVersion")]
    CatalogVersion,
}

impl GroupBy {
    pub const ALL: [GroupBy; 8] = [
        GroupBy::Process,
        GroupBy::Provider,
        GroupBy::Model,
        GroupBy::Day,
        GroupBy::Hour,
        GroupBy::User,
        GroupBy::Minute,
        GroupBy::CatalogVersion,
    ];

    /// The query-parameter spelling (same as the serialized one).
    pub fn as_str(self) -> &'static str {
        match self {
            GroupBy::Process => "process",
            GroupBy::Provider => "provider",
            GroupBy::Model => "model",
            GroupBy::Day => "day",
            GroupBy::Hour => "hour",
            GroupBy::User => "user",
            GroupBy::Minute => "minute",
            GroupBy::CatalogVersion => "catalogVersion",
        }
    }

    /// The group a record belongs to.
    pub fn key_of(self, rec: &RequestRecord) -> String {
        match self {
            GroupBy::Process => rec.process.clone(),
            GroupBy::Provider => rec.provider.clone(),
            GroupBy::Model => rec.model.clone(),
            GroupBy::Day => crate::entry::day_of(rec.timestamp_ms),
            GroupBy::Hour => crate::entry::iso_ts(rec.timestamp_ms)[..13].to_owned(),
            GroupBy::User => rec.user_id.clone(),
            GroupBy::Minute => crate::entry::iso_ts(rec.timestamp_ms)[..16].to_owned(),
            GroupBy::CatalogVersion => rec.catalog_version.to_string(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Percentiles {
    pub p50: u64,
    pub p95: u64,
    pub p99: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Aggregate {
    pub key: String,
    /// Requests, counted by their last call (a request that fell back is one request).
    pub requests: u64,
    /// Calls that failed and whose request went on to another call (a quick retry or the
    /// fallback): not in `requests`, but in the tokens and cost, since they are billed.
    pub retried: u64,
    /// Failed requests, interrupted ones included (cancelled ones are counted apart, they are
    /// not errors).
    pub errors: u64,
    pub cancelled: u64,
    /// Requests whose process stopped while their last call was in flight (recorded from the
    /// call's intent, cost estimated); part of `errors`, and left out of the latency and TTFT
    /// percentiles, which they have no figure for.
    pub interrupted: u64,
    pub error_rate: f64,
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    pub output_tokens: u64,
    pub cost_pico_usd: u64,
    pub cost_micro_usd: u64,
    /// For display only; the integer fields are the exact figures.
    pub cost_usd: f64,
    pub latency_ms: Percentiles,
    /// Over the requests that reported a TTFT; `None` when none did.
    pub ttft_ms: Option<Percentiles>,
    /// Requests answered (or last tried) by the fallback model.
    pub fallbacks: u64,
    pub fallback_rate: f64,
    /// Requests whose answer was finished by another call after a stream broke mid-answer (the
    /// record lists the broken models in `rescuedFrom`).
    pub rescued: u64,
    /// Distribution of the cost of one request, in micro-dollars (rounded half up), so the
    /// dashboard can show how far the expensive tail is from the $1 per-request alert.
    pub cost_per_request_micro_usd: Percentiles,
    /// The most expensive single request, in micro-dollars.
    pub max_request_cost_micro_usd: u64,
}

impl Aggregate {
    /// The figures of a group with no requests (every count zero, no TTFT).
    pub fn empty(key: &str) -> Aggregate {
        Aggregate {
            key: key.to_owned(),
            requests: 0,
            retried: 0,
            errors: 0,
            cancelled: 0,
            interrupted: 0,
            error_rate: 0.0,
            input_tokens: 0,
            cached_input_tokens: 0,
            output_tokens: 0,
            cost_pico_usd: 0,
            cost_micro_usd: 0,
            cost_usd: 0.0,
            latency_ms: Percentiles::default(),
            ttft_ms: None,
            fallbacks: 0,
            fallback_rate: 0.0,
            rescued: 0,
            cost_per_request_micro_usd: Percentiles::default(),
            max_request_cost_micro_usd: 0,
        }
    }
}

/// Groups `records` and sums them; groups come back sorted by key.
pub fn aggregate(records: &[RequestRecord], group_by: GroupBy) -> Vec<Aggregate> {
    aggregate_by(records, |rec| group_by.key_of(rec))
}

/// [`aggregate`] with any grouping (a constant key gives the totals).
pub fn aggregate_by(
    records: &[RequestRecord],
    key_of: impl Fn(&RequestRecord) -> String,
) -> Vec<Aggregate> {
    struct Acc {
        agg: Aggregate,
        latency: Option<Histogram<u64>>,
        ttft: Option<Histogram<u64>>,
        cost: Option<Histogram<u64>>,
    }
    let mut groups: BTreeMap<String, Acc> = BTreeMap::new();
    for rec in records {
        let key = key_of(rec);
        let acc = groups.entry(key.clone()).or_insert_with(|| Acc {
            agg: Aggregate::empty(&key),
            // Three significant figures: percentiles within 0.1 %, a few KiB per group.
            latency: Histogram::new(3).ok(),
            ttft: Histogram::new(3).ok(),
            cost: Histogram::new(3).ok(),
        });
        let a = &mut acc.agg;
        a.input_tokens += rec.input_tokens;
        a.cached_input_tokens += rec.cached_input_tokens;
        a.output_tokens += rec.output_tokens;
        a.cost_pico_usd = a.cost_pico_usd.saturating_add(rec.cost_pico_usd);
        if !rec.status.is_final() {
            a.retried += 1;
            continue;
        }
        a.requests += 1;
        a.errors += u64::from(rec.status.is_failure());
        a.cancelled += u64::from(rec.status == RequestStatus::Cancelled);
        a.interrupted += u64::from(rec.status == RequestStatus::Interrupted);
        a.fallbacks += u64::from(rec.fallback_used);
        a.rescued += u64::from(!rec.rescued_from.is_empty());
        let request_micro = rec.cost().micro_usd();
        a.max_request_cost_micro_usd = a.max_request_cost_micro_usd.max(request_micro);
        if let Some(h) = acc.cost.as_mut() {
            record(h, request_micro);
        }
        if rec.status == RequestStatus::Interrupted {
            continue;
        }
        if let Some(h) = acc.latency.as_mut() {
            record(h, rec.latency_ms);
        }
        if let (Some(h), Some(t)) = (acc.ttft.as_mut(), rec.ttft_ms) {
            record(h, t);
        }
    }
    groups
        .into_values()
        .map(|mut acc| {
            let a = &mut acc.agg;
            a.error_rate = a.errors as f64 / a.requests.max(1) as f64;
            a.fallback_rate = a.fallbacks as f64 / a.requests.max(1) as f64;
            if let Some(h) = &acc.cost {
                a.cost_per_request_micro_usd = percentiles(h);
            }
            a.cost_micro_usd = keyvex_engine::cost::Cost(a.cost_pico_usd).micro_usd();
            a.cost_usd = keyvex_engine::cost::Cost(a.cost_pico_usd).usd();
            if let Some(h) = &acc.latency {
                a.latency_ms = percentiles(h);
            }
            a.ttft_ms = acc.ttft.as_ref().filter(|h| !h.is_empty()).map(percentiles);
            acc.agg
        })
        .collect()
}

/// `Histogram::new` starts with a tiny range and grows on `record`; `saturating_record` alone
/// would never grow it and would clamp every value above ~2 047 (2 s of latency) to that bound.
fn record(h: &mut Histogram<u64>, value: u64) {
    if h.record(value).is_err() {
        h.saturating_record(value);
    }
}

fn percentiles(h: &Histogram<u64>) -> Percentiles {
    Percentiles {
        p50: h.value_at_quantile(0.50),
        p95: h.value_at_quantile(0.95),
        p99: h.value_at_quantile(0.99),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyvex_engine::cost::Cost;

    #[test]
    fn groups_sums_and_percentiles() {
        let mut recs = Vec::new();
        for i in 1..=100u64 {
            let provider = if i % 2 == 0 { "openai" } else { "anthropic" };
            let mut r = RequestRecord::new("u", "magicSpark", provider, "m")
                .with_timestamp_ms(1_764_028_800_000) // 2025-11-25T00:00:00Z
                .with_latency(i * 10, Some(i))
                .with_cost(Cost(1_000_000));
            r.input_tokens = 10;
            if i % 10 == 0 {
                r = r.failed("upstream", "x");
            }
            recs.push(r);
        }
        let by_process = aggregate(&recs, GroupBy::Process);
        assert_eq!(by_process.len(), 1);
        let a = &by_process[0];
        assert_eq!((a.requests, a.errors, a.input_tokens), (100, 10, 1000));
        assert!((a.error_rate - 0.1).abs() < 1e-9);
        assert_eq!(a.cost_pico_usd, 100_000_000);
        assert_eq!(a.cost_micro_usd, 100);
        assert!(
            (495..=505).contains(&a.latency_ms.p50),
            "{:?}",
            a.latency_ms
        );
        assert!((945..=955).contains(&a.latency_ms.p95));
        assert_eq!(a.ttft_ms.map(|t| t.p99), Some(99));

        let by_provider = aggregate(&recs, GroupBy::Provider);
        let keys: Vec<&str> = by_provider.iter().map(|a| a.key.as_str()).collect();
        assert_eq!(keys, vec!["anthropic", "openai"]);
        assert_eq!(aggregate(&recs, GroupBy::Day)[0].key, "2025-11-25");
        assert_eq!(aggregate(&recs, GroupBy::Hour)[0].key, "2025-11-25T00");
        assert_eq!(aggregate(&recs, GroupBy::User)[0].key, "u");
        assert_eq!(aggregate(&recs, GroupBy::Minute)[0].key, "2025-11-25T00:00");
    }

    #[test]
    fn interrupted_requests_are_failures_without_a_latency() {
        let ok = RequestRecord::new("u", "magicSpark", "openai", "m")
            .with_latency(1_000, Some(100))
            .with_cost(Cost::from_micro_usd(10));
        let cut = RequestRecord::new("u", "magicSpark", "openai", "m")
            .with_cost(Cost::from_micro_usd(4))
            .with_cost_estimated(true)
            .interrupted("the process stopped");
        let retried = RequestRecord::new("u", "magicSpark", "openai", "m")
            .with_cost(Cost::from_micro_usd(1))
            .retried("overloaded", "529");
        let a = &aggregate(&[ok, cut, retried], GroupBy::Process)[0];
        assert_eq!(
            (a.requests, a.errors, a.interrupted, a.retried),
            (2, 1, 1, 1)
        );
        assert!((a.error_rate - 0.5).abs() < 1e-9);
        assert_eq!(a.cost_micro_usd, 15, "an interrupted call is billed");
        assert_eq!(
            a.latency_ms.p50, 1_000,
            "its unknown latency is not a 0 ms sample"
        );
        assert_eq!(a.cost_per_request_micro_usd.p50, 4);
        assert_eq!(serde_json::to_value(a).unwrap()["interrupted"], 1);
    }

    #[test]
    fn a_request_finished_after_a_broken_stream_counts_as_rescued_on_its_answering_model() {
        let mut broken = RequestRecord::new("u", "magicSpark", "anthropic", "claude-sonnet-4-6")
            .with_attempts(1, false);
        broken.status = RequestStatus::Retried;
        let mut answer =
            RequestRecord::new("u", "magicSpark", "openai", "gpt-5.4").with_attempts(2, true);
        answer.rescued_from = vec!["claude-sonnet-4-6".to_owned()];
        let plain = RequestRecord::new("u", "magicSpark", "openai", "gpt-5.4");
        let groups = aggregate(&[broken, answer, plain], GroupBy::Model);
        let of = |model: &str| groups.iter().find(|g| g.key == model).unwrap();
        assert_eq!((of("gpt-5.4").requests, of("gpt-5.4").rescued), (2, 1));
        assert_eq!(
            (
                of("claude-sonnet-4-6").retried,
                of("claude-sonnet-4-6").rescued
            ),
            (1, 0)
        );
        assert_eq!(serde_json::to_value(of("gpt-5.4")).unwrap()["rescued"], 1);
    }

    #[test]
    fn large_values_are_not_clamped() {
        // Latencies of 1..=100 seconds and costs of 1..=100 dollars (in micro-dollars).
        let recs: Vec<RequestRecord> = (1..=100u64)
            .map(|i| {
                RequestRecord::new("u", "magicSpark", "openai", "m")
                    .with_latency(i * 1_000, Some(i * 100))
                    .with_cost(Cost::from_micro_usd(i * 1_000_000))
            })
            .collect();
        let a = &aggregate(&recs, GroupBy::Process)[0];
        let near = |got: u64, want: u64| got.abs_diff(want) * 1000 <= want;
        assert!(near(a.latency_ms.p50, 50_000), "{:?}", a.latency_ms);
        assert!(near(a.latency_ms.p99, 99_000), "{:?}", a.latency_ms);
        assert!(near(a.ttft_ms.unwrap().p95, 9_500), "{:?}", a.ttft_ms);
        let c = a.cost_per_request_micro_usd;
        assert!(near(c.p50, 50_000_000) && near(c.p95, 95_000_000), "{c:?}");
        assert_eq!(a.max_request_cost_micro_usd, 100_000_000);
    }

    #[test]
    fn fallbacks_and_cost_per_request_distribution() {
        // Costs 1..=100 micro-dollars; every fourth request used the fallback model.
        let recs: Vec<RequestRecord> = (1..=100u64)
            .map(|i| {
                RequestRecord::new("u", "styleMaster", "openai", "m")
                    .with_cost(Cost::from_micro_usd(i))
                    .with_attempts(if i % 4 == 0 { 2 } else { 1 }, i % 4 == 0)
            })
            .collect();
        let a = &aggregate(&recs, GroupBy::Process)[0];
        assert_eq!(a.fallbacks, 25);
        assert!((a.fallback_rate - 0.25).abs() < 1e-9);
        assert_eq!(a.max_request_cost_micro_usd, 100);
        assert_eq!(
            a.cost_per_request_micro_usd,
            Percentiles {
                p50: 50,
                p95: 95,
                p99: 99
            }
        );
        let json = serde_json::to_value(a).unwrap();
        assert_eq!(json["fallbackRate"], 0.25);
        assert_eq!(json["rescued"], 0);
        assert_eq!(json["costPerRequestMicroUsd"]["p95"], 95);
        assert_eq!(json["maxRequestCostMicroUsd"], 100);
    }
}
