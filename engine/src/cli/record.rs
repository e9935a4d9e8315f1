//! Metrics for the one-shot commands (`complete`, `agent`, `pipeline`): every model call they
//! make is recorded like the server's, under the user `cli`, in the same store (the embedded
//! SQLite file, or DynamoDB when `DYNAMODB_TABLE_NAME` is set), so a run from the terminal shows
//! in the admin metrics and the dashboard with its cost.

use std::time::Duration;

use agents::Process;
use keyvex_engine::config::ProcessEnv;
use keyvex_engine::metrics::{CallContext, MetricsConfig, RequestRecord, Tracker, start_from_env};
use keyvex_engine::router::RouteOutcome;

/// The caller id the commands record under.
pub const CLI_USER: &str = "cli";

/// How long the last records may take to ship when the command ends; what does not make it stays
/// in the ledger and is shipped by the next start of any `keyvex` command that records.
const SHIP_DEADLINE: Duration = Duration::from_secs(10);

pub struct CliMetrics {
    tracker: Tracker,
    /// Where the records go, for the closing line.
    destination: String,
    recorded: usize,
}

impl CliMetrics {
    /// Opens the metrics store the environment names. A command whose metrics cannot be opened
    /// fails before spending anything, with the store's error.
    pub async fn start() -> anyhow::Result<CliMetrics> {
        let tracker = start_from_env(&ProcessEnv).await.map_err(|e| {
            anyhow::anyhow!(
                "could not open the metrics store: {e}; set KEYVEX_METRICS_DB to a writable file \
                 (or DYNAMODB_TABLE_NAME for DynamoDB)"
            )
        })?;
        let destination = match std::env::var("DYNAMODB_TABLE_NAME") {
            Ok(table) => format!("DynamoDB table {table}"),
            Err(_) => MetricsConfig::from_env(&ProcessEnv)
                .map(|c| c.ledger_path.display().to_string())
                .unwrap_or_else(|_| "the metrics store".to_owned()),
        };
        Ok(CliMetrics {
            tracker,
            destination,
            recorded: 0,
        })
    }

    /// Records one routed call of `process` (`run`: the pipeline run it belongs to).
    pub fn record(&mut self, outcome: &RouteOutcome, process: Option<Process>, run: Option<&str>) {
        let ctx = CallContext {
            request_id: None,
            user_id: CLI_USER.to_owned(),
            process: process.map(|p| p.key().to_owned()),
            run_id: run.map(str::to_owned),
            stage: run.and(process).map(|p| p.key().to_owned()),
            session_id: None,
        };
        // The receipt is not awaited: `finish` commits everything before the process exits.
        drop(
            self.tracker
                .record(RequestRecord::from_route_outcome(outcome, &ctx)),
        );
        self.recorded += 1;
    }

    /// Commits and ships what was recorded; returns the line to print.
    pub async fn finish(self) -> String {
        let report = self
            .tracker
            .shutdown(tokio::time::Instant::now() + SHIP_DEADLINE)
            .await;
        if !report.ledger_flushed {
            return format!(
                "keyvex: metrics: {} call record(s) could not be committed to the local ledger; see the log above",
                self.recorded
            );
        }
        let left = if report.left_in_ledger > 0 {
            format!(
                ", {} waiting in the local ledger for the next start",
                report.left_in_ledger
            )
        } else {
            String::new()
        };
        format!(
            "keyvex: metrics: {} call record(s) as user {CLI_USER:?} in {}{left}",
            self.recorded, self.destination
        )
    }
}
