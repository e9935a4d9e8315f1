//! Timeouts of the AWS SDK clients (DynamoDB here, SQS in the server's queue). Without them the
//! SDK waits forever on an endpoint that accepts a connection and never answers, and the metrics
//! shipper or the queue worker would stall behind that one request.

use std::time::Duration;

use aws_config::timeout::TimeoutConfig;
use aws_sdk_dynamodb::error::SdkError;

/// The three timeouts of one client. Each attempt (one HTTP exchange, the body included) is cut
/// after `attempt`; the whole operation, retries and backoff included, after `operation`; a TCP
/// (and TLS) connect after `connect`. A cut attempt is retried by the SDK's standard retry while
/// the operation timeout allows; what still fails is a timeout error the callers treat as
/// transient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AwsTimeouts {
    pub connect: Duration,
    pub attempt: Duration,
    pub operation: Duration,
}

impl AwsTimeouts {
    /// DynamoDB single-item and batch calls answer in milliseconds; 5 s for one attempt leaves
    /// room for a slow network, and 20 s for the operation allows the SDK's three attempts with
    /// their backoff.
    pub const DYNAMODB: AwsTimeouts = AwsTimeouts {
        connect: Duration::from_secs(3),
        attempt: Duration::from_secs(5),
        operation: Duration::from_secs(20),
    };

    /// SQS sends, deletes and visibility changes; a long poll gets its wait time on top
    /// ([`AwsTimeouts::extended_by`]), so a 20-second `ReceiveMessage` is never cut.
    pub const SQS: AwsTimeouts = AwsTimeouts {
        connect: Duration::from_secs(3),
        attempt: Duration::from_secs(5),
        operation: Duration::from_secs(20),
    };

    /// The SDK's form.
    pub fn timeout_config(&self) -> TimeoutConfig {
        TimeoutConfig::builder()
            .connect_timeout(self.connect)
            .operation_attempt_timeout(self.attempt)
            .operation_timeout(self.operation)
            .build()
    }

    /// The same with `wait` added to the attempt and the operation timeouts: for a call that the
    /// server holds open on purpose for up to `wait` (an SQS long poll).
    pub fn extended_by(&self, wait: Duration) -> AwsTimeouts {
        AwsTimeouts {
            connect: self.connect,
            attempt: self.attempt.saturating_add(wait),
            operation: self.operation.saturating_add(wait),
        }
    }

    /// The timeouts a client was built with; a timeout the client does not set keeps the value
    /// of `fallback` (a client built without any gets `fallback` whole).
    pub fn of_config(config: Option<&TimeoutConfig>, fallback: AwsTimeouts) -> AwsTimeouts {
        let Some(config) = config else {
            return fallback;
        };
        AwsTimeouts {
            connect: config.connect_timeout().unwrap_or(fallback.connect),
            attempt: config
                .operation_attempt_timeout()
                .unwrap_or(fallback.attempt),
            operation: config.operation_timeout().unwrap_or(fallback.operation),
        }
    }

    /// Checks the relation the settings must keep: every timeout above zero, and an attempt no
    /// longer than its operation (else the attempt timeout could never fire).
    pub fn validate(&self) -> Result<(), String> {
        if self.connect.is_zero() || self.attempt.is_zero() || self.operation.is_zero() {
            return Err("timeouts must be at least 1 ms".to_owned());
        }
        if self.attempt > self.operation {
            return Err(format!(
                "the attempt timeout ({} ms) is longer than the operation timeout ({} ms), so it could never fire; lower it or raise the operation timeout",
                self.attempt.as_millis(),
                self.operation.as_millis()
            ));
        }
        Ok(())
    }
}

/// Whether an SDK error is one of the timeouts above (the operation's, an attempt's, or the
/// connect's), which callers treat as transient: the endpoint may answer again.
pub fn is_timeout<E, R>(err: &SdkError<E, R>) -> bool {
    match err {
        SdkError::TimeoutError(_) => true,
        SdkError::DispatchFailure(e) => e.is_timeout(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sdk_config_carries_all_three_and_a_long_poll_adds_its_wait() {
        let t = AwsTimeouts::SQS;
        let c = t.timeout_config();
        assert_eq!(c.connect_timeout(), Some(Duration::from_secs(3)));
        assert_eq!(c.operation_attempt_timeout(), Some(Duration::from_secs(5)));
        assert_eq!(c.operation_timeout(), Some(Duration::from_secs(20)));
        let poll = t.extended_by(Duration::from_secs(20));
        assert_eq!(
            (poll.connect, poll.attempt, poll.operation),
            (
                Duration::from_secs(3),
                Duration::from_secs(25),
                Duration::from_secs(40)
            )
        );
        assert_eq!(AwsTimeouts::of_config(Some(&c), AwsTimeouts::DYNAMODB), t);
        let partial = TimeoutConfig::builder()
            .operation_timeout(Duration::from_secs(9))
            .build();
        assert_eq!(
            AwsTimeouts::of_config(Some(&partial), AwsTimeouts::SQS).operation,
            Duration::from_secs(9)
        );
        assert_eq!(
            AwsTimeouts::of_config(None, AwsTimeouts::SQS),
            AwsTimeouts::SQS
        );
    }

    #[test]
    fn an_attempt_longer_than_its_operation_is_refused() {
        assert!(AwsTimeouts::DYNAMODB.validate().is_ok());
        let bad = AwsTimeouts {
            attempt: Duration::from_secs(30),
            ..AwsTimeouts::DYNAMODB
        };
        let e = bad.validate().unwrap_err();
        assert!(e.contains("30000 ms") && e.contains("20000 ms"), "{e}");
        let zero = AwsTimeouts {
            connect: Duration::ZERO,
            ..AwsTimeouts::DYNAMODB
        };
        assert!(zero.validate().is_err());
    }
}
