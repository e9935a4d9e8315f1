//! `keyvex table …`: provision the DynamoDB single table and show how it stands.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use keyvex::{Config, ProcessEnv};
use keyvex_store::StoreConfig;
use keyvex_store::dynamo::{self, Provisioned, TableInfo};

#[derive(Debug, clap::Args)]
pub struct TableArgs {
    #[command(subcommand)]
    command: TableCommand,
}

#[derive(Debug, clap::Subcommand)]
enum TableCommand {
    /// Create the table — keys PK/SK, GSI1 and GSI2 (projection ALL), on-demand billing, TTL on
    /// `ttl` — and wait until it is ACTIVE. Idempotent: an existing table is checked against
    /// that schema (and gets TTL if it lacks it); one that differs is an error naming each
    /// difference, and nothing is changed.
    Create {
        /// The table (default: DYNAMODB_TABLE_NAME, else keyvex-main-table).
        #[arg(long)]
        table: Option<String>,
        /// How long to wait for a new table and its indexes to become ACTIVE.
        #[arg(long, default_value_t = dynamo::ACTIVE_WAIT.as_secs())]
        wait_secs: u64,
    },
    /// Print the table's status, keys, indexes, TTL and billing mode as JSON, with how it differs
    /// from the schema keyvex needs. Exits 1 when the table is missing or differs.
    Describe {
        /// The table (default: DYNAMODB_TABLE_NAME, else keyvex-main-table).
        #[arg(long)]
        table: Option<String>,
    },
}

/// The platform's table name, used when neither `--table` nor `DYNAMODB_TABLE_NAME` names one.
const DEFAULT_TABLE: &str = "keyvex-main-table";

/// `--table`, else the configured table, else the default; and whether the configuration
/// already names it (so the store uses it).
fn table_name(arg: Option<String>, config: &Config) -> (String, bool) {
    let configured = match &config.store {
        StoreConfig::Dynamo { table, .. } => Some(table.as_str()),
        StoreConfig::Sqlite { .. } => None,
    };
    let name = arg
        .or_else(|| configured.map(str::to_owned))
        .unwrap_or_else(|| DEFAULT_TABLE.to_owned());
    let in_use = configured == Some(name.as_str());
    (name, in_use)
}

pub async fn run(args: TableArgs) -> anyhow::Result<ExitCode> {
    let config = Config::load(&ProcessEnv, None).context("reading configuration")?;
    let client = dynamo::client(
        config.dynamodb_endpoint.as_deref(),
        &config.dynamodb_timeouts,
    )
    .await;
    let mut stdout = std::io::stdout();
    match args.command {
        TableCommand::Create { table, wait_secs } => {
            let (name, in_use) = table_name(table, &config);
            let done = dynamo::create_table_within(&client, &name, Duration::from_secs(wait_secs))
                .await
                .with_context(|| format!("provisioning DynamoDB table {name}"))?;
            let ttl = if done.enabled_ttl {
                "TTL on ttl enabled now"
            } else {
                "TTL on ttl"
            };
            let line = match done.outcome {
                Provisioned::Created => format!(
                    "created DynamoDB table {name} ({}): keys PK/SK, GSI1, GSI2, {ttl}",
                    status(&done.table)
                ),
                Provisioned::AlreadyExisted => format!(
                    "DynamoDB table {name} already exists ({}); schema checked: keys PK/SK, GSI1, GSI2, {ttl}",
                    status(&done.table)
                ),
            };
            writeln!(stdout, "{line}")?;
            if !in_use {
                eprintln!(
                    "keyvex: set DYNAMODB_TABLE_NAME={name} to keep metrics, sessions and jobs in it"
                );
            }
        }
        TableCommand::Describe { table } => {
            let (name, _) = table_name(table, &config);
            let Some(info) = dynamo::describe_table(&client, &name)
                .await
                .with_context(|| format!("describing DynamoDB table {name}"))?
            else {
                eprintln!(
                    "keyvex: DynamoDB table {name} does not exist; create it with `keyvex table create --table {name}`"
                );
                return Ok(ExitCode::FAILURE);
            };
            let differences = info.differences();
            let mut json = serde_json::to_value(&info)?;
            json["schemaDifferences"] = serde_json::json!(differences);
            json["ttlEnabled"] = serde_json::json!(info.ttl_enabled());
            writeln!(stdout, "{}", serde_json::to_string_pretty(&json)?)?;
            if !differences.is_empty() {
                eprintln!(
                    "keyvex: table {name} differs from the schema keyvex needs ({}): {}",
                    dynamo::SCHEMA,
                    differences.join("; ")
                );
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn status(table: &TableInfo) -> &str {
    table.status.as_deref().unwrap_or("status unknown")
}
