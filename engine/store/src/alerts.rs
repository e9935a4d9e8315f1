//! Alert rules (cost per day, cost per request, average latency, error rate), evaluated
//! incrementally as records reach the ledger; and the one alert raised from outside the
//! metrics path, a model catalog version a replica could not load ([`Alert::catalog_load`]).
//!
//! Each rule raises **one** alert per breach episode: it fires when the metric crosses its
//! threshold and stays quiet until the metric has recovered, so a bad hour is one alert, not
//! thousands. The clock is the records' own end time (start + latency), which keeps evaluation
//! deterministic and independent of when the ledger gets to them.

use std::collections::VecDeque;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use keyvex_engine::cost::Cost;
use keyvex_engine::record::{RequestRecord, RequestStatus};

const MS_PER_DAY: u64 = 86_400_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertType {
    CostPerDay,
    CostPerRequest,
    AvgLatency,
    ErrorRate,
    /// A replica could not load the model catalog version activated in the store and stays
    /// on its last good one.
    CatalogLoad,
}

impl AlertType {
    pub const ALL: [AlertType; 5] = [
        AlertType::CostPerDay,
        AlertType::CostPerRequest,
        AlertType::AvgLatency,
        AlertType::ErrorRate,
        AlertType::CatalogLoad,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AlertType::CostPerDay => "cost_per_day",
            AlertType::CostPerRequest => "cost_per_request",
            AlertType::AvgLatency => "avg_latency",
            AlertType::ErrorRate => "error_rate",
            AlertType::CatalogLoad => "catalog_load",
        }
    }

    /// Money rules are critical (they cost real dollars), and so is a replica left on another
    /// catalog version than the fleet (it routes and prices differently); quality rules warn.
    pub fn severity(self) -> Severity {
        match self {
            AlertType::CostPerDay | AlertType::ErrorRate | AlertType::CatalogLoad => {
                Severity::Critical
            }
            AlertType::CostPerRequest | AlertType::AvgLatency => Severity::Warning,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Warning,
    Critical,
}

impl Severity {
    pub const ALL: [Severity; 2] = [Severity::Warning, Severity::Critical];

    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

/// One raised alert, stored as an `ALERT#` item / `alerts` row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Alert {
    pub alert_id: String,
    pub alert_type: AlertType,
    pub severity: Severity,
    /// Unix milliseconds of the record that crossed the threshold (its end time).
    pub timestamp_ms: u64,
    /// The metric's value when it crossed, in the threshold's unit (USD, ms or a 0..1 rate).
    /// For `catalog_load`: the version that could not be loaded.
    pub observed: f64,
    /// For `catalog_load`: the version the replica stays on.
    pub threshold: f64,
    pub message: String,
    /// The request that crossed the threshold; empty for `catalog_load`.
    #[serde(default)]
    pub request_id: String,
}

impl Alert {
    /// A replica could not load catalog `version` and stays on `kept`; `reason` says why.
    pub fn catalog_load(version: u64, kept: u64, reason: &str, at_ms: u64) -> Alert {
        let alert_type = AlertType::CatalogLoad;
        Alert {
            alert_id: uuid::Uuid::now_v7().to_string(),
            alert_type,
            severity: alert_type.severity(),
            timestamp_ms: at_ms,
            observed: version as f64,
            threshold: kept as f64,
            message: format!(
                "model catalog version {version} could not be loaded on this replica (process {}), which stays on version {kept}: {reason}",
                std::process::id()
            ),
            request_id: String::new(),
        }
    }
}

/// Thresholds; the defaults are the Keyvex platform's alarms: $100 per day, $1.00 per request,
/// 5 s average latency, 5 % errors.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertConfig {
    pub cost_per_day: Cost,
    pub cost_per_request: Cost,
    pub avg_latency_ms: u64,
    /// Fraction of failed requests (cancelled ones are not errors), e.g. 0.05.
    pub error_rate: f64,
    /// Rolling window of the latency and error-rate rules.
    pub window: Duration,
    /// Below this many records in the window the rolling rules stay silent (one slow request
    /// at 3 a.m. is not an outage).
    pub min_samples: usize,
}

impl Default for AlertConfig {
    fn default() -> Self {
        AlertConfig {
            cost_per_day: Cost::from_micro_usd(100_000_000),
            cost_per_request: Cost::from_micro_usd(1_000_000),
            avg_latency_ms: 5_000,
            error_rate: 0.05,
            window: Duration::from_secs(300),
            min_samples: 20,
        }
    }
}

struct Sample {
    end_ms: u64,
    /// `None` for an interrupted request, whose latency nobody measured.
    latency_ms: Option<u64>,
    failed: bool,
}

/// Incremental state of all rules. O(1) amortised per record.
pub(crate) struct AlertEvaluator {
    cfg: AlertConfig,
    day: u64,
    day_cost: Cost,
    day_alerted: bool,
    request_breach: bool,
    window: VecDeque<Sample>,
    latency_sum: u64,
    /// Samples in the window with a latency.
    timed: usize,
    failures: usize,
    latency_breach: bool,
    error_breach: bool,
}

impl AlertEvaluator {
    pub(crate) fn new(cfg: AlertConfig) -> Self {
        AlertEvaluator {
            cfg,
            day: 0,
            day_cost: Cost::ZERO,
            day_alerted: false,
            request_breach: false,
            window: VecDeque::new(),
            latency_sum: 0,
            timed: 0,
            failures: 0,
            latency_breach: false,
            error_breach: false,
        }
    }

    /// Feeds one record; returns the alerts it starts (usually none).
    pub(crate) fn observe(&mut self, rec: &RequestRecord) -> Vec<Alert> {
        let mut out = Vec::new();
        let end = rec.end_ms();
        let cost = rec.cost();

        // Cost per day: the episode is the UTC day; late records of an earlier day count toward
        // the current one rather than reopening a closed day.
        let day = rec.timestamp_ms / MS_PER_DAY;
        if day > self.day {
            self.day = day;
            self.day_cost = Cost::ZERO;
            self.day_alerted = false;
        }
        self.day_cost += cost;
        if !self.day_alerted && self.day_cost > self.cfg.cost_per_day {
            self.day_alerted = true;
            out.push(self.alert(
                AlertType::CostPerDay,
                rec,
                self.day_cost.usd(),
                self.cfg.cost_per_day.usd(),
                format!(
                    "cost today reached {} (threshold {})",
                    self.day_cost, self.cfg.cost_per_day
                ),
            ));
        }

        // Cost per request: an episode is a run of consecutive over-threshold requests.
        let over = cost > self.cfg.cost_per_request;
        if over && !self.request_breach {
            out.push(self.alert(
                AlertType::CostPerRequest,
                rec,
                cost.usd(),
                self.cfg.cost_per_request.usd(),
                format!(
                    "request {} cost {} (threshold {})",
                    rec.request_id, cost, self.cfg.cost_per_request
                ),
            ));
        }
        self.request_breach = over;

        // Rolling window rules, over requests: a call its request went on from (`retried`)
        // is billed above but is not a request's outcome.
        if !rec.status.is_final() {
            return out;
        }
        // An interrupted request failed (its process stopped under it), but has no latency.
        let failed = rec.status.is_failure();
        let latency_ms = (rec.status != RequestStatus::Interrupted).then_some(rec.latency_ms);
        self.window.push_back(Sample {
            end_ms: end,
            latency_ms,
            failed,
        });
        self.latency_sum += latency_ms.unwrap_or(0);
        self.timed += usize::from(latency_ms.is_some());
        self.failures += usize::from(failed);
        let window_ms = self.cfg.window.as_millis() as u64;
        while let Some(front) = self.window.front() {
            if front.end_ms.saturating_add(window_ms) > end {
                break;
            }
            self.latency_sum -= front.latency_ms.unwrap_or(0);
            self.timed -= usize::from(front.latency_ms.is_some());
            self.failures -= usize::from(front.failed);
            self.window.pop_front();
        }
        let n = self.window.len();
        if n >= self.cfg.min_samples.max(1) {
            let avg = self.latency_sum as f64 / self.timed.max(1) as f64;
            let latency_over = avg > self.cfg.avg_latency_ms as f64;
            if latency_over && !self.latency_breach {
                out.push(self.alert(
                    AlertType::AvgLatency,
                    rec,
                    avg,
                    self.cfg.avg_latency_ms as f64,
                    format!(
                        "average latency {avg:.0} ms over the last {n} requests (threshold {} ms)",
                        self.cfg.avg_latency_ms
                    ),
                ));
            }
            self.latency_breach = latency_over;

            let rate = self.failures as f64 / n as f64;
            let errors_over = rate > self.cfg.error_rate;
            if errors_over && !self.error_breach {
                out.push(self.alert(
                    AlertType::ErrorRate,
                    rec,
                    rate,
                    self.cfg.error_rate,
                    format!(
                        "error rate {:.1}% over the last {n} requests (threshold {:.1}%)",
                        rate * 100.0,
                        self.cfg.error_rate * 100.0
                    ),
                ));
            }
            self.error_breach = errors_over;
        }
        out
    }

    fn alert(
        &self,
        alert_type: AlertType,
        rec: &RequestRecord,
        observed: f64,
        threshold: f64,
        message: String,
    ) -> Alert {
        tracing::warn!(alert = alert_type.as_str(), %message, "metrics alert raised");
        Alert {
            alert_id: uuid::Uuid::now_v7().to_string(),
            alert_type,
            severity: alert_type.severity(),
            timestamp_ms: rec.end_ms(),
            observed,
            threshold,
            message,
            request_id: rec.request_id.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_764_000_000_000;

    fn rec(i: u64, latency_ms: u64, ok: bool, cost_micro: u64) -> RequestRecord {
        let r = RequestRecord::new("u", "direct", "openai", "m")
            .with_timestamp_ms(T0 + i * 1000)
            .with_latency(latency_ms, None)
            .with_cost(Cost::from_micro_usd(cost_micro));
        if ok { r } else { r.failed("upstream", "boom") }
    }

    fn types(alerts: &[Alert]) -> Vec<AlertType> {
        alerts.iter().map(|a| a.alert_type).collect()
    }

    #[test]
    fn cost_per_request_fires_once_per_run_of_expensive_requests() {
        let mut ev = AlertEvaluator::new(AlertConfig::default());
        let mut fired = Vec::new();
        for (i, cost) in [2_000_000, 3_000_000, 10, 2_000_000]
            .into_iter()
            .enumerate()
        {
            fired.extend(ev.observe(&rec(i as u64, 10, true, cost)));
        }
        assert_eq!(types(&fired), vec![AlertType::CostPerRequest; 2]);
        assert_eq!(fired[0].severity, Severity::Warning);
    }

    #[test]
    fn cost_per_day_fires_once_per_day() {
        let cfg = AlertConfig {
            cost_per_day: Cost::from_micro_usd(1_000),
            ..AlertConfig::default()
        };
        let mut ev = AlertEvaluator::new(cfg);
        let mut fired = Vec::new();
        for i in 0..10 {
            fired.extend(ev.observe(&rec(i, 10, true, 300)));
        }
        assert_eq!(types(&fired), vec![AlertType::CostPerDay]);
        // The next day is a new episode.
        let next_day = rec(0, 10, true, 2_000).with_timestamp_ms(T0 + MS_PER_DAY);
        assert_eq!(types(&ev.observe(&next_day)), vec![AlertType::CostPerDay]);
    }

    #[test]
    fn error_rate_one_alert_per_episode_and_respects_min_samples() {
        let cfg = AlertConfig {
            min_samples: 10,
            window: Duration::from_secs(30),
            ..AlertConfig::default()
        };
        let mut ev = AlertEvaluator::new(cfg);
        let mut fired = Vec::new();
        // Nine failures: below the sample minimum, silent.
        for i in 0..9 {
            fired.extend(ev.observe(&rec(i, 10, false, 0)));
        }
        assert!(fired.is_empty());
        // Tenth sample: 100 % errors → one alert; more failures keep the same episode.
        for i in 9..20 {
            fired.extend(ev.observe(&rec(i, 10, false, 0)));
        }
        assert_eq!(types(&fired), vec![AlertType::ErrorRate]);
        // Recovery: 30 s of successes push the failures out of the window.
        for i in 20..60 {
            fired.extend(ev.observe(&rec(i, 10, true, 0)));
        }
        assert_eq!(fired.len(), 1);
        // A second outage is a second episode.
        for i in 60..70 {
            fired.extend(ev.observe(&rec(i, 10, false, 0)));
        }
        assert_eq!(types(&fired), vec![AlertType::ErrorRate; 2]);
    }

    #[test]
    fn average_latency_episode() {
        let cfg = AlertConfig {
            min_samples: 5,
            window: Duration::from_secs(10),
            ..AlertConfig::default()
        };
        let mut ev = AlertEvaluator::new(cfg);
        let mut fired = Vec::new();
        for i in 0..10 {
            fired.extend(ev.observe(&rec(i * 2, 9_000, true, 0)));
        }
        assert_eq!(types(&fired), vec![AlertType::AvgLatency]);
        assert!(fired[0].observed > 5_000.0);
        for i in 10..30 {
            fired.extend(ev.observe(&rec(i * 2, 100, true, 0)));
        }
        for i in 30..40 {
            fired.extend(ev.observe(&rec(i * 2, 9_000, true, 0)));
        }
        assert_eq!(types(&fired), vec![AlertType::AvgLatency; 2]);
    }

    #[test]
    fn interrupted_requests_count_as_errors_but_not_as_latency() {
        let cfg = AlertConfig {
            min_samples: 10,
            window: Duration::from_secs(60),
            ..AlertConfig::default()
        };
        let mut ev = AlertEvaluator::new(cfg);
        let mut fired = Vec::new();
        // Slow successes: average 9 s, over the 5 s threshold once there are 10 samples.
        for i in 0..5 {
            fired.extend(ev.observe(&rec(i, 9_000, true, 0)));
        }
        // Five interrupted requests (no latency, 0 in the record) must not pull the average
        // under the threshold, and they are errors: 50 % over the 5 % threshold.
        for i in 5..10 {
            let cut = rec(i, 0, true, 0).interrupted("the process stopped");
            fired.extend(ev.observe(&cut));
        }
        let mut got = types(&fired);
        got.sort_by_key(|t| t.as_str());
        assert_eq!(got, vec![AlertType::AvgLatency, AlertType::ErrorRate]);
        let latency = fired
            .iter()
            .find(|a| a.alert_type == AlertType::AvgLatency)
            .unwrap();
        assert!((latency.observed - 9_000.0).abs() < 1e-9, "{latency:?}");
    }
}
