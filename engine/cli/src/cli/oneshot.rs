//! What the one-shot commands (`complete`, `agent`, `pipeline`) share: the engine assembled from
//! the configuration, every model call recorded under the caller `cli` in the same store the
//! server uses (so a run from the terminal shows in the admin metrics and the dashboard with its
//! cost), and the closing flush.

use std::time::Duration;

use keyvex::{App, Config, ProcessEnv};
use keyvex_engine::CallContext;

/// The caller id the commands record under.
pub const CLI_USER: &str = "cli";

/// How long the last records may take to ship when the command ends; what does not make it stays
/// in the ledger and is shipped by the next start of any `keyvex` command.
const SHIP_DEADLINE: Duration = Duration::from_secs(10);

/// Reads the configuration and starts the engine, printing the banner. A command whose metrics
/// store cannot be opened fails here, before anything is spent.
pub async fn start() -> anyhow::Result<App> {
    let config = Config::load(&ProcessEnv, None)?;
    let app = App::start(config).await?;
    for line in app.banner() {
        eprintln!("keyvex: {line}");
    }
    Ok(app)
}

/// The context of every call a command makes.
pub fn context() -> CallContext {
    CallContext::new(CLI_USER)
}

/// Commits and ships what was recorded, stops the engine; returns the line to print.
pub async fn finish(app: &App) -> String {
    let report = app.shutdown(SHIP_DEADLINE).await;
    let health = app.stores.tracker.health();
    let recorded = health.accepted.saturating_sub(health.alerts_raised);
    if !report.ledger_flushed {
        return format!(
            "keyvex: metrics: {recorded} call record(s) could not be committed to the local ledger; see the log above"
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
        "keyvex: metrics: {recorded} call record(s) as user {CLI_USER:?} in {}{left}",
        app.stores.description
    )
}
