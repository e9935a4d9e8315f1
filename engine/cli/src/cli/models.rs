//! `keyvex models …`: the model catalog versions in the store — publish a catalog file as a new
//! version, list them, show one, compare two, activate one, roll back. Works on the configured
//! store (SQLite `KEYVEX_METRICS_DB` or DynamoDB `DYNAMODB_TABLE_NAME`) directly, without a
//! server; running servers and workers notice an activation within their poll interval
//! (`KEYVEX_CATALOG_POLL_MS`).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use keyvex::{Config, ProcessEnv};
use keyvex_engine::Catalog;
use keyvex_engine::catalog::EMBEDDED_CATALOG;
use keyvex_engine::catalog::diff::CatalogDiff;
use keyvex_store::CatalogVersions;
use keyvex_store::catalog_store::Activation;

#[derive(Debug, clap::Args)]
pub struct ModelsArgs {
    #[command(subcommand)]
    command: ModelsCommand,
}

#[derive(Debug, clap::Subcommand)]
enum ModelsCommand {
    /// Validate a catalog file (the shape of models/default-models.json) and store it as the next
    /// version; prints the version and what changed against the latest one.
    Publish {
        file: PathBuf,
        /// Why this version exists, kept with it.
        #[arg(long)]
        note: Option<String>,
        /// Also make it the active version.
        #[arg(long)]
        activate: bool,
        /// Who publishes it, kept with it.
        #[arg(long, default_value = "cli")]
        author: String,
    },
    /// List the stored versions, the active one marked.
    List,
    /// Print a version's catalog JSON (its details go to stderr); 0 is the built-in catalog.
    Show { version: u64 },
    /// What changed from version A to version B.
    Diff { a: u64, b: u64 },
    /// Make a version the active one (0: the catalog each process starts with).
    Activate {
        version: u64,
        #[arg(long, default_value = "cli")]
        author: String,
    },
    /// Make the version that was active before the current one active again.
    Rollback {
        #[arg(long, default_value = "cli")]
        author: String,
    },
}

pub async fn run(args: ModelsArgs) -> anyhow::Result<ExitCode> {
    let config = Config::load(&ProcessEnv, None).context("reading configuration")?;
    let base = Catalog::load(config.models_file.as_deref())?;
    let versions = config.store.open_catalogs().await.with_context(|| {
        format!(
            "opening the catalog versions in {}",
            config.store.describe()
        )
    })?;
    let poll_ms = config.catalog_poll.as_millis();
    let mut out = std::io::stdout();
    match args.command {
        ModelsCommand::Publish {
            file,
            note,
            activate,
            author,
        } => {
            let shown = file.display().to_string();
            let json = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read model catalog {shown}"))?;
            let published = versions
                .publish(&json, &shown, &base, &author, note.as_deref())
                .await?;
            writeln!(out, "published version {}", published.info.version)?;
            for change in &published.changes {
                writeln!(out, "  {change}")?;
            }
            if published.changes.is_empty() {
                writeln!(out, "  {}", published.info.summary)?;
            }
            if activate {
                let activation = versions
                    .activate(published.info.version, &author, &base)
                    .await?;
                print_activation(&mut out, &activation, poll_ms)?;
            }
        }
        ModelsCommand::List => {
            let active = versions.active().await?;
            let mut table = Table::new();
            table.load_preset(UTF8_FULL_CONDENSED).set_header(vec![
                "version",
                "active",
                "label",
                "published (UTC)",
                "author",
                "note",
                "changes",
            ]);
            table.add_row(vec![
                "0".to_owned(),
                mark(active.version == 0),
                base.label().to_owned(),
                "-".to_owned(),
                "built in".to_owned(),
                base.source().to_owned(),
                "-".to_owned(),
            ]);
            for v in versions.list().await? {
                table.add_row(vec![
                    v.version.to_string(),
                    mark(active.version == v.version),
                    v.label,
                    keyvex_store::iso_ts(v.created_at_ms),
                    v.author,
                    v.note.unwrap_or_default(),
                    v.summary,
                ]);
            }
            writeln!(out, "{table}")?;
            if active.version > 0 {
                writeln!(
                    out,
                    "version {} active since {} (by {})",
                    active.version,
                    keyvex_store::iso_ts(active.activated_at_ms),
                    active.activated_by
                )?;
            }
        }
        ModelsCommand::Show { version } => {
            if version == 0 {
                eprintln!("keyvex: version 0: the built-in catalog, {}", base.source());
                let text = match &config.models_file {
                    Some(path) => std::fs::read_to_string(path)
                        .with_context(|| format!("cannot read {}", path.display()))?,
                    None => EMBEDDED_CATALOG.to_owned(),
                };
                writeln!(out, "{}", text.trim_end())?;
            } else {
                let stored = versions
                    .get(version)
                    .await?
                    .ok_or(keyvex_store::CatalogStoreError::UnknownVersion { version })?;
                let info = &stored.info;
                eprintln!(
                    "keyvex: version {} ({}), published {} by {}{}; {}",
                    info.version,
                    info.label,
                    keyvex_store::iso_ts(info.created_at_ms),
                    info.author,
                    info.note
                        .as_deref()
                        .map_or_else(String::new, |n| format!(": {n}")),
                    info.summary
                );
                writeln!(out, "{}", stored.catalog_json)?;
            }
        }
        ModelsCommand::Diff { a, b } => {
            let (old, new) = (
                load(&versions, a, &base).await?,
                load(&versions, b, &base).await?,
            );
            write!(out, "{}", CatalogDiff::between(&old, &new))?;
        }
        ModelsCommand::Activate { version, author } => {
            let activation = versions.activate(version, &author, &base).await?;
            print_activation(&mut out, &activation, poll_ms)?;
        }
        ModelsCommand::Rollback { author } => {
            let activation = versions.rollback(&author).await?;
            print_activation(&mut out, &activation, poll_ms)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn load(versions: &CatalogVersions, version: u64, base: &Catalog) -> anyhow::Result<Catalog> {
    Ok(versions.load(version, base).await?)
}

fn mark(active: bool) -> String {
    if active {
        "*".to_owned()
    } else {
        String::new()
    }
}

fn print_activation(
    out: &mut impl Write,
    activation: &Activation,
    poll_ms: u128,
) -> std::io::Result<()> {
    let version = activation.active.version;
    if activation.changed {
        writeln!(
            out,
            "version {version} is active (was {}); running servers and workers switch within their poll interval ({poll_ms} ms here)",
            activation.previous
        )
    } else {
        writeln!(out, "version {version} was already active; nothing changed")
    }
}
