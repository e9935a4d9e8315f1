//! The shipper task: copies the outbox to the sink in batches, deletes only what the sink
//! confirmed, retries transient failures for as long as it takes, and sets aside the entries the
//! sink refuses for good.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use keyvex_engine::clock::now_ms;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Shared;
use crate::entry::{Entry, StoreError, full_jitter};
use crate::ledger::{Pending, Reject};

pub(super) async fn shipper_loop(shared: Arc<Shared>, cancel: CancellationToken) {
    // Leftovers of an earlier run ship right away.
    let mut next_flush = Instant::now();
    loop {
        let draining = shared.draining.load(Ordering::Acquire);
        if !draining {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                _ = shared.ship_wake.notified() => {}
                _ = tokio::time::sleep_until(next_flush) => {}
            }
        }
        let draining = shared.draining.load(Ordering::Acquire);
        let pending = shared.counters.pending.load(Ordering::Acquire);
        let due = Instant::now() >= next_flush || pending >= shared.cfg.ship_batch as u64;
        if draining || (due && pending > 0) {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                () = ship_backlog(&shared) => {}
            }
            next_flush = Instant::now() + shared.cfg.flush_interval;
            if draining {
                return;
            }
        } else if Instant::now() >= next_flush {
            next_flush = Instant::now() + shared.cfg.flush_interval;
        }
    }
}

/// Ships batches until the ledger is empty (the caller cancels it to stop). Transient failures
/// keep the batch pending and are retried with capped full-jitter backoff for as long as it
/// takes; a rejected batch is split until the refused entries are alone (see [`isolate`]).
async fn ship_backlog(shared: &Arc<Shared>) {
    let c = &shared.counters;
    let limit = shared.cfg.ship_batch.max(1);
    let mut attempt = 0u32;
    loop {
        let batch = match shared
            .with_ledger(move |l| l.pending(limit, now_ms()))
            .await
        {
            Ok((batch, set_aside)) => {
                if set_aside > 0 {
                    counted_dead(shared, set_aside);
                }
                batch
            }
            Err(err) => {
                tracing::error!(error = %err, "reading the metrics ledger failed; retrying");
                c.ledger_errors.fetch_add(1, Ordering::Relaxed);
                backoff(shared, &mut attempt).await;
                continue;
            }
        };
        if batch.is_empty() {
            c.pending.store(0, Ordering::Release);
            c.oldest_pending_ms.store(0, Ordering::Release);
            shared.bump();
            return;
        }
        let (keys, entries): (Vec<(i64, i64)>, Vec<Entry>) = batch
            .into_iter()
            .map(
                |Pending {
                     seq,
                     version,
                     entry,
                 }| ((seq, version), entry),
            )
            .unzip();
        let round = match shared.sink.write(&entries).await {
            Ok(report) => Round {
                shipped: keys,
                retries: report.retries,
                ..Round::default()
            },
            Err(err) if err.is_rejection() => {
                shared.note_error(&err);
                tracing::warn!(sink = shared.sink.name(), error = %err, entries = entries.len(),
                    "metrics sink refused a batch; isolating the refused entries");
                isolate(shared, &keys, &entries, err).await
            }
            Err(err) => Round {
                transient: Some(err),
                ..Round::default()
            },
        };
        c.retried.fetch_add(round.retries, Ordering::Relaxed);
        if !round.shipped.is_empty() || !round.refused.is_empty() {
            settle(shared, round.shipped, round.refused, &mut attempt).await;
            attempt = 0;
            c.consecutive_failures.store(0, Ordering::Relaxed);
        }
        if let Some(err) = round.transient {
            shared.note_error(&err);
            c.retried.fetch_add(1, Ordering::Relaxed);
            let failures = c.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::warn!(sink = shared.sink.name(), error = %err, entries = entries.len(),
                attempt, consecutive_failures = failures,
                "metrics sink write failed; entries stay in the ledger and are retried");
            shared.bump();
            backoff(shared, &mut attempt).await;
        }
    }
}

/// What one shipping round achieved.
#[derive(Default)]
struct Round {
    /// `(seq, version)` of the entries the sink confirmed.
    shipped: Vec<(i64, i64)>,
    /// Entries the sink refused on their own.
    refused: Vec<Refused>,
    /// Resends inside the sink.
    retries: u64,
    /// A transient failure that ended the round; what was not settled stays pending.
    transient: Option<StoreError>,
}

struct Refused {
    reject: Reject,
    key: String,
    kind: &'static str,
}

/// Finds the entries of a rejected batch that the sink refuses, by writing halves: a half that
/// succeeds is shipped, a refused half is split again, and a refused single entry is set aside
/// with the error it got alone. One bad entry among `n` costs about `2·log2(n)` writes, and a
/// batch of good entries never waits behind it. Resending the halves that had already been
/// stored before the rejection is harmless: sink writes are idempotent per key. A transient
/// failure on the way stops the search; the next round starts it again from the ledger.
async fn isolate(
    shared: &Shared,
    keys: &[(i64, i64)],
    entries: &[Entry],
    rejection: StoreError,
) -> Round {
    let mut round = Round::default();
    // Depth first, left half first, so entries ship in about their ledger order.
    let mut todo = vec![(0, entries.len(), Some(rejection))];
    while let Some((lo, hi, known)) = todo.pop() {
        let err = match known {
            Some(err) => err,
            None => match shared.sink.write(&entries[lo..hi]).await {
                Ok(report) => {
                    round.retries += report.retries;
                    round.shipped.extend_from_slice(&keys[lo..hi]);
                    continue;
                }
                Err(err) if err.is_rejection() => {
                    shared.note_error(&err);
                    err
                }
                Err(err) => {
                    round.transient = Some(err);
                    break;
                }
            },
        };
        if hi - lo == 1 {
            let (seq, version) = keys[lo];
            round.refused.push(Refused {
                reject: Reject {
                    seq,
                    version,
                    error: err.to_string(),
                },
                key: entries[lo].key().into_owned(),
                kind: entries[lo].kind(),
            });
            continue;
        }
        let mid = lo + (hi - lo) / 2;
        todo.push((mid, hi, None));
        todo.push((lo, mid, None));
    }
    round
}

/// Records a round's outcome in the ledger (retrying until the disk takes it) and the counters.
async fn settle(
    shared: &Arc<Shared>,
    shipped: Vec<(i64, i64)>,
    refused: Vec<Refused>,
    attempt: &mut u32,
) {
    let c = &shared.counters;
    let confirmed = shipped.len() as u64;
    let shipped = Arc::new(shipped);
    let rejects: Arc<Vec<Reject>> = Arc::new(refused.iter().map(|r| r.reject.clone()).collect());
    let settled = loop {
        let (shipped, rejects) = (Arc::clone(&shipped), Arc::clone(&rejects));
        let now = now_ms();
        match shared
            .with_ledger(move |l| Ok((l.settle(&shipped, &rejects, now)?, l.backlog()?)))
            .await
        {
            Ok(done) => break done,
            Err(err) => {
                // The sink has the shipped ones; resending them later is harmless (idempotent),
                // and the refused ones are simply refused again.
                tracing::error!(error = %err, "recording shipped metrics in the ledger failed; retrying");
                c.ledger_errors.fetch_add(1, Ordering::Relaxed);
                backoff(shared, attempt).await;
            }
        }
    };
    let (settled, (_, oldest)) = settled;
    for r in &refused {
        tracing::error!(sink = shared.sink.name(), entry_key = %r.key, kind = r.kind,
            error = %r.reject.error,
            "metrics entry refused by the sink; kept in the ledger's dead_letters table until requeued");
    }
    c.shipped.fetch_add(confirmed, Ordering::Relaxed);
    counted_dead(shared, settled.dead_lettered);
    shared.left_outbox(settled.shipped);
    c.oldest_pending_ms
        .store(oldest.unwrap_or(0), Ordering::Release);
    shared.bump();
}

/// Counts rows that moved from the outbox to `dead_letters`.
fn counted_dead(shared: &Shared, rows: u64) {
    let c = &shared.counters;
    c.dead_lettered.fetch_add(rows, Ordering::Relaxed);
    c.dead_letters.fetch_add(rows, Ordering::Relaxed);
    shared.left_outbox(rows);
}

async fn backoff(shared: &Shared, attempt: &mut u32) {
    tokio::time::sleep(full_jitter(
        shared.cfg.retry_base,
        shared.cfg.retry_cap,
        *attempt,
    ))
    .await;
    *attempt = attempt.saturating_add(1);
}
