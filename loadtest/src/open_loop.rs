//! Open-loop load: requests sent on a fixed or Poisson arrival schedule by our own tokio
//! scheduler, with latency measured from each request's **scheduled** send time.
//!
//! goose's users wait for one answer before sending the next (a closed loop), so when the
//! server slows down they slow down too and the queueing never shows in their timings
//! (coordinated omission). Here arrivals keep coming at the set rate; a request that had to
//! wait, in our scheduler or in the server's queue, carries that wait in its latency. In-flight
//! requests are bounded: an arrival that finds the bound full is dropped and counted (as a
//! failed request), never silently delayed.

use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use crate::scenarios::{Ctx, Route, error_kind, read_stream};
use crate::stats::RequestFailure;

/// What was wrong with `--rate`.
#[derive(Debug, thiserror::Error)]
pub enum RateError {
    #[error("--rate {0:?}: expected requests per second like 5/s, 300/m or 2.5")]
    Syntax(String),
    #[error("--rate {0:?}: must be a positive, finite rate")]
    NotPositive(String),
}

/// Parses `5/s`, `300/m`, `2.5` (per second) into requests per second.
pub fn parse_rate(text: &str) -> Result<f64, RateError> {
    let t = text.trim();
    let (number, per) = match t.split_once('/') {
        Some((n, unit)) => {
            let per = match unit.trim() {
                "s" | "sec" | "second" => 1.0,
                "m" | "min" | "minute" => 60.0,
                "h" | "hour" => 3600.0,
                _ => return Err(RateError::Syntax(text.to_owned())),
            };
            (n, per)
        }
        None => (t, 1.0),
    };
    let n: f64 = number
        .trim()
        .parse()
        .map_err(|_| RateError::Syntax(text.to_owned()))?;
    let rate = n / per;
    if !rate.is_finite() || rate <= 0.0 {
        return Err(RateError::NotPositive(text.to_owned()));
    }
    Ok(rate)
}

/// The open-loop run's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenLoopConfig {
    /// Arrivals per second.
    pub rate: f64,
    /// Exponential inter-arrival times (a Poisson process) instead of a fixed interval.
    pub poisson: bool,
    /// How long arrivals are scheduled; the run then waits for the requests in flight.
    pub duration: Duration,
    /// At most this many requests in flight; arrivals beyond it are dropped.
    pub max_in_flight: usize,
    /// An arrival sent this much later than scheduled counts as late.
    pub late_after: Duration,
    /// Whole-request timeout of the HTTP client.
    pub timeout: Duration,
}

/// The schedule's arrival times, as offsets from the start.
pub fn schedule(rate: f64, poisson: bool, duration: Duration, seed: u64) -> Vec<Duration> {
    let end = duration.as_secs_f64();
    if !poisson {
        // By index, not by summing intervals, so rounding never adds or loses an arrival.
        let n = (end * rate).ceil() as u64;
        return (0..n)
            .map(|i| Duration::from_secs_f64(i as f64 / rate))
            .collect();
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::new();
    let mut t = 0.0_f64;
    while t < end {
        out.push(Duration::from_secs_f64(t));
        // Inverse transform of the exponential distribution; `1 - u` keeps ln away from 0.
        let u: f64 = rng.random();
        t += -(1.0 - u).ln() / rate;
    }
    out
}

/// What the scheduler did, for the summary.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OpenLoopSummary {
    pub rate_per_sec: f64,
    pub poisson: bool,
    pub duration_secs: f64,
    pub max_in_flight: usize,
    pub scheduled: u64,
    pub sent: u64,
    pub dropped: u64,
    pub late: u64,
    /// Mean latency from scheduled time in the first and the last quarter of the schedule:
    /// a rising pair means the server could not keep up with the rate.
    pub first_quarter_mean_ms: Option<f64>,
    pub last_quarter_mean_ms: Option<f64>,
}

/// Runs the open-loop schedule against `base_url`. `routes` lists each route once per unit of
/// weight; arrivals take them in turn.
pub async fn run(
    cfg: &OpenLoopConfig,
    ctx: Arc<Ctx>,
    base_url: &str,
    routes: &[Route],
) -> Result<OpenLoopSummary, reqwest::Error> {
    let client = reqwest::Client::builder()
        .timeout(cfg.timeout)
        .tcp_nodelay(true)
        .build()?;
    let arrivals = schedule(cfg.rate, cfg.poisson, cfg.duration, ctx.seed);
    let permits = Arc::new(Semaphore::new(cfg.max_in_flight.max(1)));
    let tasks = TaskTracker::new();
    let mut summary = OpenLoopSummary {
        rate_per_sec: cfg.rate,
        poisson: cfg.poisson,
        duration_secs: cfg.duration.as_secs_f64(),
        max_in_flight: cfg.max_in_flight,
        scheduled: arrivals.len() as u64,
        ..OpenLoopSummary::default()
    };
    let start = Instant::now();
    for (i, offset) in arrivals.iter().enumerate() {
        let Some(&route) = routes.get(i % routes.len().max(1)) else {
            break;
        };
        let scheduled = start + *offset;
        tokio::time::sleep_until(scheduled).await;
        if Instant::now().saturating_duration_since(scheduled) > cfg.late_after {
            summary.late += 1;
            ctx.stats.record_late();
        }
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            summary.dropped += 1;
            ctx.stats.record_dropped(route.name());
            continue;
        };
        summary.sent += 1;
        let seed = ctx.seed.wrapping_add(i as u64);
        let (body, model) = route.body(seed);
        let request = client
            .post(format!("{base_url}{}", route.path()))
            .bearer_auth(&ctx.api_key)
            .json(&body);
        let ctx = Arc::clone(&ctx);
        let offset = *offset;
        tasks.spawn(async move {
            let _permit = permit;
            let started = scheduled.into_std();
            match request.send().await {
                Err(error) => ctx.stats.record_failure(
                    route.name(),
                    &RequestFailure::Transport(error_kind(&error).to_owned()),
                ),
                Ok(response) if !response.status().is_success() => ctx.stats.record_failure(
                    route.name(),
                    &RequestFailure::Status(response.status().as_u16()),
                ),
                Ok(response) => {
                    let out = read_stream(response, route, model, &ctx.catalog, started).await;
                    ctx.stats.record_stream(route.name(), route.kind(), &out);
                    ctx.stats.record_timeline(offset, out.end_to_end);
                }
            }
        });
    }
    tasks.close();
    tasks.wait().await;
    let timeline = ctx.stats.summary().timeline;
    let quarter = cfg.duration.as_secs() / 4;
    let mean = |from: u64, to: u64| {
        let (n, sum) = timeline
            .iter()
            .filter(|p| p.second >= from && p.second < to)
            .fold((0u64, 0.0f64), |(n, s), p| {
                (n + p.arrivals, s + p.mean_latency_ms * p.arrivals as f64)
            });
        (n > 0).then(|| sum / n as f64)
    };
    let secs = cfg.duration.as_secs().max(1);
    summary.first_quarter_mean_ms = mean(0, quarter.max(1));
    summary.last_quarter_mean_ms = mean(secs - quarter.max(1).min(secs), secs);
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_with_units() {
        assert_eq!(parse_rate("5/s").unwrap(), 5.0);
        assert_eq!(parse_rate("120/m").unwrap(), 2.0);
        assert_eq!(parse_rate("2.5").unwrap(), 2.5);
        assert!(parse_rate("0/s").is_err());
        assert!(parse_rate("five").is_err());
    }

    #[test]
    fn fixed_schedule_is_evenly_spaced_and_poisson_keeps_the_mean_rate() {
        let fixed = schedule(4.0, false, Duration::from_secs(2), 1);
        assert_eq!(fixed.len(), 8);
        assert_eq!(fixed[1], Duration::from_millis(250));
        let poisson = schedule(50.0, true, Duration::from_secs(20), 7);
        let n = poisson.len() as f64;
        assert!((n - 1000.0).abs() < 150.0, "{n} arrivals at 50/s over 20 s");
        assert!(poisson.windows(2).all(|w| w[0] <= w[1]));
    }
}
