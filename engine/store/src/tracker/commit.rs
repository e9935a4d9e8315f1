//! The ledger task: group-commits what `Tracker::record` queued into the SQLite outbox (alerts
//! evaluated on the way), then resolves each entry's receipt.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use keyvex_engine::clock::now_ms;
use tokio::sync::mpsc;

use super::{Msg, Shared};
use crate::alerts::AlertEvaluator;
use crate::entry::{Entry, full_jitter};

fn count_raised_alert(shared: &Shared) {
    shared
        .counters
        .alerts_raised
        .fetch_add(1, Ordering::Relaxed);
}

pub(super) async fn ledger_loop(
    mut rx: mpsc::UnboundedReceiver<Msg>,
    shared: Arc<Shared>,
    mut alerts: AlertEvaluator,
) {
    let limit = shared.cfg.commit_batch.max(1);
    let mut buf = Vec::with_capacity(limit);
    // No linger: while one transaction's fsync runs, new records queue up and the next
    // `recv_many` takes them all, so batches grow exactly when load does.
    while rx.recv_many(&mut buf, limit).await > 0 {
        let mut entries = Vec::with_capacity(buf.len());
        let mut waiters = Vec::with_capacity(buf.len());
        let mut raised = 0u64;
        for msg in buf.drain(..) {
            match msg {
                Msg::Record(rec, waiter) => {
                    for alert in alerts.observe(&rec) {
                        entries.push(Entry::Alert(alert));
                        raised += 1;
                    }
                    entries.push(Entry::Request(rec));
                    waiters.push(waiter);
                }
                Msg::Message(msg, waiter) => {
                    entries.push(Entry::Message(msg));
                    waiters.push(waiter);
                }
                Msg::Alert(alert, waiter) => {
                    // Counted as accepted by `send`; only the raised counter is added here.
                    entries.push(Entry::Alert(alert));
                    count_raised_alert(&shared);
                    waiters.push(waiter);
                }
                // Later messages were sent before the close and are still received.
                Msg::Close => rx.close(),
            }
        }
        if entries.is_empty() {
            continue;
        }
        let c = &shared.counters;
        c.accepted.fetch_add(raised, Ordering::Relaxed);
        c.alerts_raised.fetch_add(raised, Ordering::Relaxed);
        let count = entries.len() as u64;
        let now = now_ms();
        let entries = Arc::new(entries);
        let mut attempt = 0u32;
        let inserted = loop {
            let batch = Arc::clone(&entries);
            match shared.with_ledger(move |l| l.append(&batch, now)).await {
                Ok(n) => break n,
                Err(err) => {
                    // Never drop: keep the batch and its waiters until the disk takes it.
                    c.ledger_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(error = %err, entries = count, attempt, "metrics ledger commit failed; retrying");
                    tokio::time::sleep(full_jitter(
                        shared.cfg.retry_base,
                        shared.cfg.retry_cap,
                        attempt,
                    ))
                    .await;
                    attempt = attempt.saturating_add(1);
                }
            }
        };
        c.durable.fetch_add(count, Ordering::Relaxed);
        c.ledger_commits.fetch_add(1, Ordering::Relaxed);
        if c.pending.fetch_add(inserted, Ordering::AcqRel) == 0 {
            let _ =
                c.oldest_pending_ms
                    .compare_exchange(0, now, Ordering::AcqRel, Ordering::Relaxed);
        }
        for waiter in waiters {
            waiter.done();
        }
        if c.pending.load(Ordering::Acquire) >= shared.cfg.ship_batch as u64 {
            shared.ship_wake.notify_one();
        }
        shared.bump();
    }
}
