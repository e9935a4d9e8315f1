//! A circuit breaker per model: stop calling a model that keeps failing, and probe it again
//! soon after.
//!
//! Closed → (N consecutive failures that say the model is unhealthy) → Open until
//! `now + cool_down` → (first request after that) HalfOpen with one trial call in flight →
//! success closes, failure reopens for `probe_interval`. An account error (quota, billing, a
//! refused key, a model we may not use) opens it at once for `account_cool_down`, then probes
//! the same way. Failures that are about the request (400s) or our own limits say nothing of
//! the model and do not count. Time is `tokio::time` so tests can pause it.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// Settings of every model's breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker; 0 disables breakers.
    pub failure_threshold: u32,
    /// How long a breaker opened by failures refuses calls before it lets one trial through.
    pub cool_down: Duration,
    /// How long it refuses calls again after a failed trial.
    pub probe_interval: Duration,
    /// How long a model is skipped after our account was refused (quota, billing, key,
    /// access) before one trial call.
    pub account_cool_down: Duration,
}

impl Default for BreakerConfig {
    /// A recovered model serves again within about 5 s.
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            cool_down: Duration::from_secs(5),
            probe_interval: Duration::from_secs(5),
            account_cool_down: Duration::from_secs(60),
        }
    }
}

/// Why a breaker is open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenReason {
    /// Consecutive failures reached the threshold (or a trial failed).
    Failures,
    /// The provider refused our account for this model; the error kind (`quota_exhausted`,
    /// `auth`, `not_found`, `billing`).
    Account(&'static str),
}

/// The state of one model's breaker, as seen from outside (health pages, tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    Closed {
        consecutive_failures: u32,
    },
    Open {
        until: Instant,
        reason: OpenReason,
    },
    /// The cool-down is over; `trial_in_flight` says whether the one probe call is running.
    HalfOpen {
        trial_in_flight: bool,
    },
}

/// Why a call was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Open until this instant, for this reason.
    OpenUntil(Instant, OpenReason),
    /// Half-open and another request is making the trial call.
    TrialInFlight,
}

/// Whether an admitted call is the half-open trial (its end must settle the breaker).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    Normal,
    Trial,
}

/// Every model's breaker, keyed by model id.
#[derive(Debug)]
pub(crate) struct Breakers {
    config: BreakerConfig,
    states: Mutex<HashMap<String, CircuitState>>,
}

impl Breakers {
    pub(crate) fn new(config: BreakerConfig) -> Self {
        Self {
            config,
            states: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn state(&self, model: &str) -> CircuitState {
        self.lock()
            .get(model)
            .copied()
            .unwrap_or(CircuitState::Closed {
                consecutive_failures: 0,
            })
    }

    /// Asks to call `model` now.
    pub(crate) fn admit(&self, model: &str) -> Result<Admission, Refusal> {
        let mut states = self.lock();
        let Some(state) = states.get_mut(model) else {
            return Ok(Admission::Normal);
        };
        match *state {
            CircuitState::Closed { .. } => Ok(Admission::Normal),
            CircuitState::Open { until, reason } if Instant::now() < until => {
                Err(Refusal::OpenUntil(until, reason))
            }
            CircuitState::Open { .. }
            | CircuitState::HalfOpen {
                trial_in_flight: false,
            } => {
                *state = CircuitState::HalfOpen {
                    trial_in_flight: true,
                };
                Ok(Admission::Trial)
            }
            CircuitState::HalfOpen {
                trial_in_flight: true,
            } => Err(Refusal::TrialInFlight),
        }
    }

    /// The call succeeded: the model works, close the breaker.
    pub(crate) fn on_success(&self, model: &str) {
        self.lock().insert(
            model.to_owned(),
            CircuitState::Closed {
                consecutive_failures: 0,
            },
        );
    }

    /// The call failed in a way that says the model is unhealthy.
    pub(crate) fn on_failure(&self, model: &str, admission: Admission) {
        if self.config.failure_threshold == 0 {
            return;
        }
        let mut states = self.lock();
        let state = states
            .entry(model.to_owned())
            .or_insert(CircuitState::Closed {
                consecutive_failures: 0,
            });
        let open = CircuitState::Open {
            until: super::deadline_in(self.config.cool_down),
            reason: OpenReason::Failures,
        };
        *state = match (*state, admission) {
            (_, Admission::Trial) => CircuitState::Open {
                until: super::deadline_in(self.config.probe_interval),
                reason: OpenReason::Failures,
            },
            (
                CircuitState::Closed {
                    consecutive_failures,
                },
                Admission::Normal,
            ) => {
                let failures = consecutive_failures.saturating_add(1);
                if failures >= self.config.failure_threshold {
                    open
                } else {
                    CircuitState::Closed {
                        consecutive_failures: failures,
                    }
                }
            }
            // Another request already opened it (or is probing): leave that as it is.
            (other, Admission::Normal) => other,
        };
        if matches!(*state, CircuitState::Open { .. }) {
            tracing::warn!(
                model,
                cool_down_ms = self.config.cool_down.as_millis() as u64,
                "circuit opened"
            );
        }
    }

    /// The provider refused our account for this model (`kind` is the error's kind): skip it
    /// for `account_cool_down`, then probe. Applies even with failure counting disabled: the
    /// model cannot answer, however healthy it is.
    pub(crate) fn disable(&self, model: &str, kind: &'static str) {
        let cool_down = self.config.account_cool_down;
        self.lock().insert(
            model.to_owned(),
            CircuitState::Open {
                until: super::deadline_in(cool_down),
                reason: OpenReason::Account(kind),
            },
        );
        tracing::warn!(
            model,
            kind,
            cool_down_ms = cool_down.as_millis() as u64,
            "model disabled: the provider refused our account for it"
        );
    }

    /// The call ended without saying anything about the model's health (a non-retryable error,
    /// or the caller went away): a trial gives its slot back so another request can probe.
    pub(crate) fn on_neutral(&self, model: &str, admission: Admission) {
        if admission != Admission::Trial {
            return;
        }
        if let Some(state) = self.lock().get_mut(model)
            && *state
                == (CircuitState::HalfOpen {
                    trial_in_flight: true,
                })
        {
            *state = CircuitState::HalfOpen {
                trial_in_flight: false,
            };
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, CircuitState>> {
        self.states.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breakers() -> Breakers {
        Breakers::new(BreakerConfig {
            failure_threshold: 2,
            cool_down: Duration::from_secs(10),
            probe_interval: Duration::from_secs(3),
            account_cool_down: Duration::from_secs(60),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_threshold_and_half_opens_after_cool_down() {
        let b = breakers();
        b.on_failure("m", Admission::Normal);
        assert_eq!(b.admit("m"), Ok(Admission::Normal));
        b.on_failure("m", Admission::Normal);
        assert!(matches!(b.admit("m"), Err(Refusal::OpenUntil(..))));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(b.admit("m"), Ok(Admission::Trial));
        assert_eq!(b.admit("m"), Err(Refusal::TrialInFlight));
        b.on_failure("m", Admission::Trial);
        assert!(matches!(b.state("m"), CircuitState::Open { .. }));
        // A failed trial holds for the probe interval, not the whole cool-down.
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(matches!(b.admit("m"), Err(Refusal::OpenUntil(..))));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(b.admit("m"), Ok(Admission::Trial));
        b.on_success("m");
        assert_eq!(
            b.state("m"),
            CircuitState::Closed {
                consecutive_failures: 0
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_account_error_disables_the_model_for_the_account_cool_down() {
        let b = breakers();
        b.disable("m", "quota_exhausted");
        assert!(matches!(
            b.state("m"),
            CircuitState::Open {
                reason: OpenReason::Account("quota_exhausted"),
                ..
            }
        ));
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(matches!(b.admit("m"), Err(Refusal::OpenUntil(..))));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(b.admit("m"), Ok(Admission::Trial));
        b.on_success("m");
        assert_eq!(b.admit("m"), Ok(Admission::Normal));
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_resets_the_count_and_neutral_frees_the_trial() {
        let b = breakers();
        b.on_failure("m", Admission::Normal);
        b.on_success("m");
        b.on_failure("m", Admission::Normal);
        assert_eq!(
            b.admit("m"),
            Ok(Admission::Normal),
            "failures were not consecutive"
        );
        b.on_failure("m", Admission::Normal);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(b.admit("m"), Ok(Admission::Trial));
        b.on_neutral("m", Admission::Trial);
        assert_eq!(b.admit("m"), Ok(Admission::Trial));
    }
}
