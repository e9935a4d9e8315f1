//! Settles, sent in batches. A settle (a dollar reservation replaced by the call's cost, a token
//! reservation by the tokens used) comes from `Drop` and cannot wait, so it is queued here, and
//! one task sends everything queued as one script call: a script call costs Redis a fixed
//! ~70 µs on a shared 2-core machine whatever it does (measured with `SLOWLOG`), and each call's
//! dollar and token settles used to be two calls. Nothing waits for a batch to fill: a settle
//! is sent as soon as the previous batch is answered, so one lost to a killed process is one
//! that was in flight anyway (a linger would widen that window, and such a reservation stays
//! counted until its window ends).

use std::time::Duration;

use keyvex_engine::cost::Cost;
use tokio::sync::mpsc;

use super::{Link, run_script};

/// Most settles in one script call.
const MOST: usize = 128;
/// Tries of a batch Redis does not take before it is dropped.
const TRIES: u32 = 5;

/// One settle.
#[derive(Debug)]
pub(super) enum Settle {
    /// A dollar reservation on budget lines: their keys and seconds to keep each.
    Spend {
        keys: Vec<String>,
        keep: Vec<u64>,
        reserved: Cost,
        actual: Cost,
    },
    /// A token bucket moved by `cells` of `every` µs.
    Tokens { key: String, every: u64, cells: i64 },
}

/// Starts the task that sends settles on `conn`; it ends when every sender is dropped, after
/// sending what was queued.
pub(super) fn start(conn: Link, timeout: Duration) -> mpsc::UnboundedSender<Settle> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(send(
        conn,
        redis::Script::new(include_str!("settle_batch.lua")),
        timeout,
        rx,
    ));
    tx
}

async fn send(
    conn: Link,
    script: redis::Script,
    timeout: Duration,
    mut rx: mpsc::UnboundedReceiver<Settle>,
) {
    let mut batch = Vec::new();
    while let Some(first) = rx.recv().await {
        batch.push(first);
        loop {
            while batch.len() < MOST
                && let Ok(next) = rx.try_recv()
            {
                batch.push(next);
            }
            apply(&conn, &script, timeout, &batch).await;
            batch.clear();
            // What queued while that batch was in flight goes next.
            match rx.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
    }
}

/// Sends one batch, retrying with growing waits. A batch Redis never takes is dropped with an
/// error: its dollar reservations then stay counted as spent until their windows end, and its
/// token buckets as reserved, which errs on the side of the limits.
async fn apply(conn: &Link, script: &redis::Script, timeout: Duration, batch: &[Settle]) {
    let mut tries = 0;
    loop {
        let mut invocation = script.prepare_invoke();
        for settle in batch {
            match settle {
                Settle::Spend {
                    keys,
                    keep,
                    reserved,
                    actual,
                } => {
                    for key in keys {
                        invocation.key(key);
                    }
                    invocation
                        .arg("s")
                        .arg(keys.len())
                        .arg(reserved.0)
                        .arg(actual.0);
                    for k in keep {
                        invocation.arg(*k);
                    }
                }
                Settle::Tokens { key, every, cells } => {
                    invocation.key(key).arg("t").arg(*every).arg(*cells);
                }
            }
        }
        match run_script::<i64>(conn, timeout, invocation).await {
            Ok(_) => return,
            Err(error) if tries + 1 < TRIES => {
                tries += 1;
                tracing::warn!(%error, tries, settles = batch.len(), "settles not applied in Redis yet; retrying");
                tokio::time::sleep(timeout * tries).await;
            }
            Err(error) => {
                let spend = batch
                    .iter()
                    .filter(|s| matches!(s, Settle::Spend { .. }))
                    .count();
                tracing::error!(%error, spend, tokens = batch.len() - spend,
                    "settles dropped: Redis did not take them; their dollar reservations stay counted until their windows end, their tokens until the minute passes");
                return;
            }
        }
    }
}
