//! What becomes of call intents beyond the ledger task: the calls of a process that stopped are
//! adopted (turned into `interrupted` records) by any tracker on the same ledger, at its start
//! and then every heartbeat interval (see `owners`); and, with a shared store, every replica's
//! open intents are copied there as they are written, each replica says it is alive there, and
//! the intents of a replica silent for longer than `replica_lost_after` are recorded as
//! `interrupted` by whichever replica sweeps first — so a machine that never comes back, ledger
//! and all, does not hide the calls it had in flight.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::future::BoxFuture;
use keyvex_engine::budgets::HeldSpend;
use keyvex_engine::cost::Cost;
use keyvex_engine::record::{CallIntent, Receipt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::owners::OwnerLock;
use super::{Msg, Shared};
use crate::entry::StoreError;

/// Intents per ledger read and per shared-store round trip.
const BATCH: usize = 100;

/// Every replica's open call intents, kept in the store all replicas share.
pub(crate) trait SharedIntents: Send + Sync + 'static {
    /// Stores (or replaces) these open intents of `replica`.
    fn put<'a>(
        &'a self,
        replica: &'a str,
        intents: &'a [CallIntent],
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Removes the stored intents of these record ids (their calls' records are stored).
    fn remove<'a>(&'a self, record_ids: &'a [String]) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Says `replica` is alive now.
    fn heartbeat<'a>(&'a self, replica: &'a Replica) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Records as `interrupted` at most `limit` stored intents older than `lost_after` of
    /// replicas (never `me`) with no heartbeat for `lost_after`, and removes them; an intent
    /// whose call's record is already stored is only removed.
    fn sweep<'a>(
        &'a self,
        me: &'a str,
        lost_after: Duration,
        limit: usize,
    ) -> BoxFuture<'a, Result<Swept, StoreError>>;
}

/// A replica as its heartbeat describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Replica {
    /// The owner id of its tracker.
    pub id: String,
    pub pid: u32,
    pub started_ms: u64,
}

/// What one sweep did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Swept {
    /// Intents written as `interrupted` records.
    pub recorded: u64,
    /// Intents removed because their call's record was stored already.
    pub already_recorded: u64,
    /// The dollar reservations of the intents recorded, with what their records bill.
    pub spend: Vec<(HeldSpend, Cost)>,
}

/// How often a tracker looks for gone owners on its ledger, says it is alive in the shared
/// store and sweeps it: a fifth of the time after which a silent replica counts as lost.
pub(super) fn beat_interval(lost_after: Duration) -> Duration {
    (lost_after / 5).max(Duration::from_millis(10))
}

pub(super) async fn intents_loop(
    shared: Arc<Shared>,
    tx: mpsc::UnboundedSender<Msg>,
    cancel: CancellationToken,
) {
    let every = beat_interval(shared.cfg.replica_lost_after);
    let start = Instant::now();
    // The start adopted gone owners already; a heartbeat goes out at once.
    let (mut next_check, mut next_beat) = (start + every, start);
    // Replicas started together spread their sweeps over the interval.
    let mut next_sweep = start + every.mul_f64(rand::random_range(0.5..1.5));
    loop {
        let mut wake = next_check;
        if shared.remote.is_some() {
            wake = wake
                .min(next_beat)
                .min(next_sweep)
                .min(Instant::now() + shared.cfg.flush_interval);
        }
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep_until(wake) => {}
        }
        let round = async {
            let now = Instant::now();
            if let Some(remote) = &shared.remote {
                share_round(&shared, remote.as_ref()).await;
                if now >= next_beat {
                    beat(&shared, remote.as_ref()).await;
                    next_beat = now + every;
                }
                if now >= next_sweep {
                    sweep(&shared, remote.as_ref()).await;
                    next_sweep = now + every;
                }
            }
            if now >= next_check {
                adopt_gone_owners(&shared, &tx).await;
                next_check = now + every;
            }
        };
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            () = round => {}
        }
    }
}

/// Finds the owners of intents on this ledger whose process is gone and has the ledger task
/// adopt their intents, one owner after another; returns how many records that wrote.
pub(super) async fn adopt_gone_owners(
    shared: &Arc<Shared>,
    tx: &mpsc::UnboundedSender<Msg>,
) -> u64 {
    let me = shared.owner_id.clone();
    let path = shared.cfg.ledger_path.clone();
    let gone = shared
        .with_ledger(move |l| {
            let mut locks = Vec::new();
            for owner in l.intent_owners(&me)? {
                match OwnerLock::take_if_gone(&path, &owner) {
                    Ok(Some(lock)) => locks.push(lock),
                    Ok(None) => {}
                    Err(err) => {
                        tracing::warn!(owner, error = %err, "could not tell whether the owner of call intents is gone; looking again later");
                    }
                }
            }
            Ok(locks)
        })
        .await;
    let gone = match gone {
        Ok(gone) => gone,
        Err(err) => {
            tracing::error!(error = %err, "reading the owners of call intents failed; looking again later");
            return 0;
        }
    };
    let before = shared.counters.recovered.load(Ordering::Relaxed);
    for lock in gone {
        let (commit, receipt) = Receipt::pending();
        if tx.send(Msg::Adopt(lock, commit)).is_err() {
            break;
        }
        // A failed adoption lets go of the lock; the next look tries again.
        let _ = receipt.durable().await;
    }
    shared
        .counters
        .recovered
        .load(Ordering::Relaxed)
        .saturating_sub(before)
}

/// Copies this tracker's new and updated open intents to the shared store, then removes from
/// it (and forgets) the intents whose calls' records have shipped.
pub(super) async fn share_round(shared: &Arc<Shared>, remote: &dyn SharedIntents) {
    loop {
        let me = shared.owner_id.clone();
        let open = match shared
            .with_ledger(move |l| l.intents_to_share(&me, BATCH))
            .await
        {
            Ok(open) => open,
            Err(err) => {
                tracing::error!(error = %err, "reading call intents failed; retrying at the next round");
                return;
            }
        };
        if open.is_empty() {
            break;
        }
        let full = open.len() == BATCH;
        let marks: Vec<(String, i64)> = open
            .iter()
            .map(|o| (o.intent.record.request_id.clone(), o.version))
            .collect();
        let intents: Vec<CallIntent> = open.into_iter().map(|o| o.intent).collect();
        if let Err(err) = remote.put(&shared.owner_id, &intents).await {
            tracing::warn!(error = %err, intents = intents.len(), "copying call intents to the store failed; retrying at the next round");
            return;
        }
        shared
            .counters
            .intents_shared
            .fetch_add(intents.len() as u64, Ordering::Relaxed);
        if let Err(err) = shared.with_ledger(move |l| l.mark_shared(&marks)).await {
            tracing::error!(error = %err, "noting call intents as copied failed; they are copied again");
            return;
        }
        if !full {
            break;
        }
    }
    loop {
        let me = shared.owner_id.clone();
        let ended = match shared
            .with_ledger(move |l| l.ended_intents(&me, BATCH))
            .await
        {
            Ok(ended) => ended,
            Err(err) => {
                tracing::error!(error = %err, "reading ended call intents failed; retrying at the next round");
                return;
            }
        };
        if ended.is_empty() {
            return;
        }
        let full = ended.len() == BATCH;
        let stored: Vec<String> = ended
            .iter()
            .filter(|e| e.stored)
            .map(|e| e.record_id.clone())
            .collect();
        if !stored.is_empty()
            && let Err(err) = remote.remove(&stored).await
        {
            tracing::warn!(error = %err, intents = stored.len(), "removing ended call intents from the store failed; retrying at the next round");
            return;
        }
        let ids: Vec<String> = ended.into_iter().map(|e| e.record_id).collect();
        if let Err(err) = shared.with_ledger(move |l| l.forget_intents(&ids)).await {
            tracing::error!(error = %err, "forgetting ended call intents failed; retrying at the next round");
            return;
        }
        if !full {
            return;
        }
    }
}

async fn beat(shared: &Shared, remote: &dyn SharedIntents) {
    let replica = Replica {
        id: shared.owner_id.clone(),
        pid: std::process::id(),
        started_ms: shared.started_ms,
    };
    if let Err(err) = remote.heartbeat(&replica).await {
        tracing::warn!(error = %err, "the replica heartbeat could not be written; other replicas take this one for lost if that lasts");
    }
}

async fn sweep(shared: &Shared, remote: &dyn SharedIntents) {
    match remote
        .sweep(&shared.owner_id, shared.cfg.replica_lost_after, BATCH)
        .await
    {
        Ok(swept) => {
            shared
                .counters
                .swept
                .fetch_add(swept.recorded, Ordering::Relaxed);
            if swept.recorded > 0 {
                tracing::warn!(
                    recorded = swept.recorded,
                    "calls in flight on lost replicas recorded as interrupted"
                );
            }
            if swept.recorded + swept.already_recorded > 0 {
                shared.bump();
            }
            shared.settle_held(swept.spend.into_iter());
        }
        Err(err) => {
            tracing::warn!(error = %err, "sweeping the intents of lost replicas failed; retrying at the next sweep");
        }
    }
}
