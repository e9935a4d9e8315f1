//! Callers' own dollar limits set through the admin API, kept in the store when the budgets'
//! counters live in the process (no Redis), so a restart does not drop them. In SQLite the
//! `caller_budgets` table (one row per caller); in the DynamoDB single table `PK=CONFIG`,
//! `SK=CALLER_BUDGET#{caller}`. Amounts are picodollars written as decimal text: a budget may
//! pass what an SQLite integer holds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::types::AttributeValue;
use futures::FutureExt;
use futures::future::BoxFuture;
use keyvex_engine::budgets::{CallerBudget, CallerBudgetStore};
use keyvex_engine::cost::Cost;
use rusqlite::{Connection, params};

use crate::dynamo::sdk_error;
use crate::entry::StoreError;
use crate::sqlite::run_blocking;

const PK: &str = "CONFIG";
const SK_PREFIX: &str = "CALLER_BUDGET#";

/// Where the admin-set caller limits are kept.
#[derive(Clone)]
pub enum CallerBudgets {
    Sqlite {
        path: PathBuf,
        conn: Arc<Mutex<Connection>>,
    },
    Dynamo {
        client: Client,
        table: String,
    },
}

fn amount(text: Option<&str>) -> Result<Option<Cost>, StoreError> {
    match text {
        None | Some("") => Ok(None),
        Some(t) => t
            .parse::<u64>()
            .map(|p| Some(Cost(p)))
            .map_err(|e| StoreError::Decode {
                what: "caller budget",
                problem: format!("amount {t:?} is not picodollars: {e}"),
            }),
    }
}

fn text(c: Option<Cost>) -> Option<String> {
    c.map(|c| c.0.to_string())
}

impl CallerBudgets {
    /// Opens (and creates) the table in the store's SQLite file.
    pub fn sqlite(path: &Path) -> Result<CallerBudgets, StoreError> {
        // FULL: an operator's change with no other copy.
        let conn = crate::sqlite::open_tables(
            path,
            "FULL",
            "CREATE TABLE IF NOT EXISTS caller_budgets (
                caller TEXT PRIMARY KEY,
                daily TEXT,
                monthly TEXT,
                updated_ms INTEGER NOT NULL
             );",
        )?;
        Ok(CallerBudgets::Sqlite {
            path: path.to_owned(),
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    pub fn dynamo(client: Client, table: &str) -> CallerBudgets {
        CallerBudgets::Dynamo {
            client,
            table: table.to_owned(),
        }
    }

    /// Every caller's limits.
    pub async fn load(&self) -> Result<BTreeMap<String, CallerBudget>, StoreError> {
        match self {
            CallerBudgets::Sqlite { path, conn } => {
                let rows = run_blocking(conn, path, |c| {
                    let mut stmt =
                        c.prepare("SELECT caller, daily, monthly FROM caller_budgets")?;
                    let rows = stmt
                        .query_map([], |r| {
                            Ok((
                                r.get::<_, String>(0)?,
                                r.get::<_, Option<String>>(1)?,
                                r.get::<_, Option<String>>(2)?,
                            ))
                        })?
                        .collect::<Result<Vec<_>, _>>()?;
                    Ok(rows)
                })
                .await?;
                rows.into_iter()
                    .map(|(caller, daily, monthly)| {
                        Ok((
                            caller,
                            CallerBudget {
                                daily: amount(daily.as_deref())?,
                                monthly: amount(monthly.as_deref())?,
                            },
                        ))
                    })
                    .collect()
            }
            CallerBudgets::Dynamo { client, table } => {
                let mut all = BTreeMap::new();
                let mut next = None;
                loop {
                    let out = client
                        .query()
                        .table_name(table)
                        .key_condition_expression("PK = :pk AND begins_with(SK, :prefix)")
                        .expression_attribute_values(":pk", AttributeValue::S(PK.into()))
                        .expression_attribute_values(":prefix", AttributeValue::S(SK_PREFIX.into()))
                        .set_exclusive_start_key(next)
                        .consistent_read(true)
                        .send()
                        .await
                        .map_err(|e| sdk_error(table, "Query", &e))?;
                    for item in out.items() {
                        let field = |name: &str| item.get(name).and_then(|v| v.as_s().ok());
                        let Some(caller) = field("SK").and_then(|sk| sk.strip_prefix(SK_PREFIX))
                        else {
                            continue;
                        };
                        all.insert(
                            caller.to_owned(),
                            CallerBudget {
                                daily: amount(field("dailyPicoUsd").map(String::as_str))?,
                                monthly: amount(field("monthlyPicoUsd").map(String::as_str))?,
                            },
                        );
                    }
                    next = out.last_evaluated_key().cloned();
                    if next.is_none() {
                        return Ok(all);
                    }
                }
            }
        }
    }

    /// Sets `caller`'s limits; an empty budget removes them.
    pub async fn save(&self, caller: &str, budget: CallerBudget) -> Result<(), StoreError> {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        match self {
            CallerBudgets::Sqlite { path, conn } => {
                let caller = caller.to_owned();
                run_blocking(conn, path, move |c| {
                    if budget.is_empty() {
                        c.execute(
                            "DELETE FROM caller_budgets WHERE caller = ?1",
                            params![caller],
                        )?;
                    } else {
                        c.execute(
                            "INSERT INTO caller_budgets (caller, daily, monthly, updated_ms)
                             VALUES (?1, ?2, ?3, ?4)
                             ON CONFLICT(caller) DO UPDATE SET
                               daily = excluded.daily, monthly = excluded.monthly,
                               updated_ms = excluded.updated_ms",
                            params![caller, text(budget.daily), text(budget.monthly), now_ms],
                        )?;
                    }
                    Ok(())
                })
                .await
            }
            CallerBudgets::Dynamo { client, table } => {
                let sk = format!("{SK_PREFIX}{caller}");
                if budget.is_empty() {
                    client
                        .delete_item()
                        .table_name(table)
                        .key("PK", AttributeValue::S(PK.into()))
                        .key("SK", AttributeValue::S(sk))
                        .send()
                        .await
                        .map_err(|e| sdk_error(table, "DeleteItem", &e))?;
                    return Ok(());
                }
                let mut put = client
                    .put_item()
                    .table_name(table)
                    .item("PK", AttributeValue::S(PK.into()))
                    .item("SK", AttributeValue::S(sk))
                    .item("updatedMs", AttributeValue::N(now_ms.to_string()));
                if let Some(daily) = text(budget.daily) {
                    put = put.item("dailyPicoUsd", AttributeValue::S(daily));
                }
                if let Some(monthly) = text(budget.monthly) {
                    put = put.item("monthlyPicoUsd", AttributeValue::S(monthly));
                }
                put.send()
                    .await
                    .map_err(|e| sdk_error(table, "PutItem", &e))?;
                Ok(())
            }
        }
    }
}

impl CallerBudgetStore for CallerBudgets {
    fn save<'a>(
        &'a self,
        caller: &'a str,
        budget: CallerBudget,
    ) -> BoxFuture<'a, Result<(), String>> {
        async move {
            CallerBudgets::save(self, caller, budget)
                .await
                .map_err(|e| e.to_string())
        }
        .boxed()
    }

    fn describe(&self) -> String {
        match self {
            CallerBudgets::Sqlite { path, .. } => format!("SQLite {}", path.display()),
            CallerBudgets::Dynamo { table, .. } => format!("DynamoDB table {table}"),
        }
    }
}
