//! A circuit breaker per model: stop calling a model that keeps failing, and probe it again
//! after a cool-down.
//!
//! Closed → (N consecutive retryable failures) → Open until `now + cool_down` → (first request
//! after that) HalfOpen with one trial call in flight → success closes, failure reopens.
//! Only retryable failures count: a 400 says the request was bad, not that the model is down.
//! Time is `tokio::time` so tests can pause it.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// Settings of every model's breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive retryable failures that open the breaker; 0 disables breakers.
    pub failure_threshold: u32,
    /// How long an open breaker refuses calls before it lets one trial through.
    pub cool_down: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            cool_down: Duration::from_secs(30),
        }
    }
}

/// The state of one model's breaker, as seen from outside (health pages, tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    Closed {
        consecutive_failures: u32,
    },
    Open {
        until: Instant,
    },
    /// The cool-down is over; `trial_in_flight` says whether the one probe call is running.
    HalfOpen {
        trial_in_flight: bool,
    },
}

/// Why a call was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Open until this instant.
    OpenUntil(Instant),
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
            CircuitState::Open { until } if Instant::now() < until => {
                Err(Refusal::OpenUntil(until))
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

    /// The call failed with a retryable error.
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
        };
        *state = match (*state, admission) {
            (_, Admission::Trial) => open,
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
        })
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_threshold_and_half_opens_after_cool_down() {
        let b = breakers();
        b.on_failure("m", Admission::Normal);
        assert_eq!(b.admit("m"), Ok(Admission::Normal));
        b.on_failure("m", Admission::Normal);
        assert!(matches!(b.admit("m"), Err(Refusal::OpenUntil(_))));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(b.admit("m"), Ok(Admission::Trial));
        assert_eq!(b.admit("m"), Err(Refusal::TrialInFlight));
        b.on_failure("m", Admission::Trial);
        assert!(matches!(b.state("m"), CircuitState::Open { .. }));
        tokio::time::advance(Duration::from_secs(10)).await;
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
