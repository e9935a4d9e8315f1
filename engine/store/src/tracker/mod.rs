//! [`Tracker`]: the request path's handle. `record` is a channel send; a ledger task (`commit`)
//! group-commits into the SQLite outbox and resolves the receipts; a shipper task (`shipper`)
//! copies the outbox to the sink.
//!
//! Failed sink writes are told apart by [`StoreError::is_rejection`]. Transient failures
//! (throttling, outages, a misconfigured store) keep the batch pending and are retried for as
//! long as it takes, with capped full-jitter backoff. A rejection (the sink refuses the data
//! itself) splits the batch in halves until the refused entries are alone; the rest ships, and
//! each refused entry moves to the ledger's `dead_letters` table, where it is counted, logged,
//! listed by [`Tracker::dead_letters`] and put back by [`Tracker::requeue_dead_letters`].
//!
//! Call intents ([`Recorder::record_intent`]) take the same channel into the same transactions:
//! a call's record ends its intent in the transaction that commits the record. The intents of a
//! process that stopped are adopted as `interrupted` records by the next tracker on the ledger
//! (`owners` tells a stopped process from a running one), and with a shared store (`intents`)
//! by any replica once the stopped one has been silent for `replica_lost_after`.

mod commit;
mod intents;
mod owners;
mod shipper;

pub(crate) use intents::{Replica, SharedIntents, Swept};

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::future::BoxFuture;
use keyvex_engine::budgets::HeldSpend;
use keyvex_engine::clock::now_ms;
use keyvex_engine::cost::Cost;
use keyvex_engine::record::{
    CallIntent, Commit, Receipt, RecordError, Recorder, RequestRecord, SessionMessage,
    ShutdownReport,
};
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::alerts::{Alert, AlertConfig, AlertEvaluator};
use crate::entry::{Sink, StoreError};
use crate::error::MetricsError;
use crate::ledger::{DeadLetter, Ledger};
use crate::sessions::{PendingFilter, PendingSessions};
use owners::OwnerLock;

/// Settings of the tracker.
#[derive(Debug, Clone)]
pub struct MetricsConfig {
    /// The SQLite file of the ledger (and of the embedded store).
    pub ledger_path: PathBuf,
    /// Most records per ledger transaction.
    pub commit_batch: usize,
    /// Most entries per sink write (the DynamoDB sink splits further into 25-item requests).
    pub ship_batch: usize,
    /// Ship at least this often when anything is pending; a full `ship_batch` ships at once.
    pub flush_interval: Duration,
    /// Backoff between failed sink writes: full jitter from `retry_base` up to `retry_cap`.
    pub retry_base: Duration,
    pub retry_cap: Duration,
    pub alerts: AlertConfig,
    /// A replica silent this long in the shared store (no heartbeat) is taken for lost, and
    /// another replica records the calls it had in flight as `interrupted`. Heartbeats, sweeps
    /// and the look for stopped processes on the same ledger run every fifth of it. It must be
    /// longer than a heartbeat write can take, and is best well over a call's longest life.
    pub replica_lost_after: Duration,
    /// How long a batch of nothing but call intents waits for other entries before it is
    /// committed on its own. The intent's commit then leaves the moment its call goes out (and
    /// the first token arrives), shares a transaction with what comes next, and a call whose
    /// record arrives meanwhile writes no intent at all. The price: a process killed within this
    /// time after a call started leaves no record of that call.
    pub intent_linger: Duration,
    /// How long a record waits for the records of other calls before its commit, while at
    /// least `record_linger_min_calls` other calls are in flight: one fsync then serves several
    /// records. Each stream's end (its usage waits for the commit) pays up to this much; a call
    /// alone never waits. Zero commits every record at once.
    pub record_linger: Duration,
    /// How many other calls must be in flight (intent received, record not yet) before a
    /// record waits for company at all.
    pub record_linger_min_calls: usize,
}

impl MetricsConfig {
    pub fn new(ledger_path: impl Into<PathBuf>) -> MetricsConfig {
        MetricsConfig {
            ledger_path: ledger_path.into(),
            commit_batch: 512,
            ship_batch: 100,
            flush_interval: Duration::from_millis(500),
            retry_base: Duration::from_millis(100),
            retry_cap: Duration::from_secs(30),
            alerts: AlertConfig::default(),
            replica_lost_after: Duration::from_secs(300),
            intent_linger: Duration::from_millis(5),
            record_linger: Duration::from_millis(5),
            record_linger_min_calls: 4,
        }
    }
}

/// A snapshot of the pipeline's counters. Counts are of ledger entries (requests, alerts and
/// session messages). Serializes camelCase: the admin API returns it as the pipeline's health.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MetricsHealth {
    pub sink: &'static str,
    /// Handed to `record` (plus alerts raised) since start.
    pub accepted: u64,
    /// Committed to the ledger since start.
    pub durable: u64,
    /// Ledger transactions since start (`durable / ledger_commits` is the group-commit size).
    pub ledger_commits: u64,
    /// Confirmed by the sink and removed from the ledger since start.
    pub shipped: u64,
    /// Resends: transiently failed sink writes retried by the shipper plus resends inside the
    /// sink.
    pub retried: u64,
    /// Sink writes (calls of `Sink::write` by the shipper) that returned an error: transient
    /// failures, rejected batches, and the rejected probes that isolate a refused entry. A
    /// rejected batch of `n` entries with one refused entry costs about `2·log2(n)` writes.
    pub failed_writes: u64,
    /// Of `failed_writes`, those the sink did not answer in time (a DynamoDB endpoint that
    /// accepts and stays silent): the entries stay pending and the write is retried.
    pub timeouts: u64,
    /// Transient sink failures since the last write that made progress; 0 when shipping works.
    /// Growing together with `pending` means the sink is down or misconfigured: see `last_error`.
    pub consecutive_failures: u64,
    /// The most recent failed sink write's error (kept after recovery; `consecutive_failures`
    /// tells whether it is current).
    pub last_error: Option<String>,
    pub last_error_age_ms: Option<u64>,
    /// Entries the sink refused permanently and that were moved to `dead_letters`, since start.
    pub dead_lettered: u64,
    /// Entries held in `dead_letters` now, including earlier runs'. They are kept until
    /// `requeue_dead_letters` moves them back to the outbox.
    pub dead_letters: u64,
    /// Dead letters moved back to the outbox by `requeue_dead_letters`, since start.
    pub requeued: u64,
    /// Ledger commits that failed (and were retried).
    pub ledger_errors: u64,
    /// Entries in the ledger not yet shipped (including leftovers of earlier runs).
    pub pending: u64,
    pub oldest_pending_age_ms: Option<u64>,
    pub alerts_raised: u64,
    /// Call intents handed over since start (one per call that went out, and one more per
    /// failed call its request went on from).
    pub intents: u64,
    /// Call intents copied to the shared store since start (0 without one).
    pub intents_shared: u64,
    /// Call intents never written because their call's record came in the same group commit
    /// (the call ended within `intent_linger` of its start, or while a commit ran).
    pub intents_skipped: u64,
    /// `interrupted` records this process wrote since start for calls of processes that stopped
    /// on this ledger (adopted at start, later, or its own at shutdown).
    pub recovered: u64,
    /// `interrupted` records this process wrote to the shared store since start for calls of
    /// replicas it found lost.
    pub swept: u64,
}

enum Msg {
    Record(RequestRecord, Commit),
    Message(SessionMessage, Commit),
    /// An alert raised outside the rules (a catalog version a replica could not load).
    Alert(Alert, Commit),
    Intent(CallIntent),
    /// Adopt the intents of a stopped process (whose owner lock is held).
    Adopt(OwnerLock, Commit),
    Close,
}

#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    durable: AtomicU64,
    ledger_commits: AtomicU64,
    shipped: AtomicU64,
    retried: AtomicU64,
    failed_writes: AtomicU64,
    timeouts: AtomicU64,
    ledger_errors: AtomicU64,
    pending: AtomicU64,
    /// 0 = nothing pending.
    oldest_pending_ms: AtomicU64,
    alerts_raised: AtomicU64,
    consecutive_failures: AtomicU64,
    dead_lettered: AtomicU64,
    dead_letters: AtomicU64,
    requeued: AtomicU64,
    intents: AtomicU64,
    intents_shared: AtomicU64,
    intents_skipped: AtomicU64,
    recovered: AtomicU64,
    swept: AtomicU64,
}

struct Shared {
    counters: Counters,
    ledger: Mutex<Ledger>,
    sink: Arc<dyn Sink>,
    cfg: MetricsConfig,
    ship_wake: Notify,
    draining: AtomicBool,
    /// Bumped after every ledger commit and ship attempt, so tests and exporters can wait for
    /// progress instead of polling on a timer.
    changes: watch::Sender<u64>,
    /// The most recent sink error and when it happened (unix ms).
    last_error: Mutex<Option<(String, u64)>>,
    /// This tracker's owner id on the ledger, and its lock (taken back at a clean shutdown).
    owner_id: String,
    owner: Mutex<Option<OwnerLock>>,
    /// Where every replica's open intents are kept, when the store is shared.
    remote: Option<Arc<dyn SharedIntents>>,
    started_ms: u64,
    /// Dollar reservations of calls recorded `interrupted` here, and who settles them.
    spend: Mutex<SpendSettles>,
}

/// Settles the dollar reservation a call's intent carried to what its `interrupted` record
/// bills (set by whoever holds the budgets: [`Tracker::settle_interrupted_spend_with`]).
pub type SettleInterrupted = Arc<dyn Fn(HeldSpend, Cost) + Send + Sync>;

/// Reservations found before anyone could settle them wait here: a tracker adopts the intents
/// a stopped process left while it opens, before the engine and its budgets exist.
#[derive(Default)]
struct SpendSettles {
    settle: Option<SettleInterrupted>,
    waiting: Vec<(HeldSpend, Cost)>,
}

impl Shared {
    /// Hands the reservations of `intents`, just recorded `interrupted`, to be settled.
    fn settle_spend(&self, intents: &[CallIntent]) {
        self.settle_held(
            intents
                .iter()
                .filter_map(|i| Some((i.spend.clone()?, i.record.cost()))),
        );
    }

    /// Hands reservations of calls recorded `interrupted`, with what they bill, to be settled.
    fn settle_held(&self, held: impl Iterator<Item = (HeldSpend, Cost)>) {
        let mut spend = self.spend.lock().unwrap_or_else(PoisonError::into_inner);
        match spend.settle.clone() {
            Some(settle) => {
                drop(spend);
                held.for_each(|(h, cost)| settle(h, cost));
            }
            None => spend.waiting.extend(held),
        }
    }
}

impl Shared {
    fn bump(&self) {
        self.changes.send_modify(|v| *v = v.wrapping_add(1));
    }

    fn note_error(&self, err: &StoreError) {
        *self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some((err.to_string(), now_ms()));
        self.counters.failed_writes.fetch_add(1, Ordering::Relaxed);
        if err.is_timeout() {
            self.counters.timeouts.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Lowers the pending gauge by rows that left the outbox (shipped or dead-lettered).
    fn left_outbox(&self, rows: u64) {
        let _ = self
            .counters
            .pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| {
                Some(p.saturating_sub(rows))
            });
    }

    async fn with_ledger<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&mut Ledger) -> Result<T, MetricsError> + Send + 'static,
    ) -> Result<T, MetricsError> {
        let shared = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let mut ledger = shared.ledger.lock().unwrap_or_else(PoisonError::into_inner);
            f(&mut ledger)
        })
        .await
        .map_err(|_| MetricsError::LedgerStopped)?
    }
}

struct Inner {
    tx: mpsc::UnboundedSender<Msg>,
    shared: Arc<Shared>,
    closed: AtomicBool,
    ledger_task: Mutex<Option<JoinHandle<()>>>,
    shipper_task: Mutex<Option<JoinHandle<()>>>,
    intents_task: Mutex<Option<JoinHandle<()>>>,
    cancel: CancellationToken,
    /// Stops the intents task first at shutdown (the drop guard stops everything else).
    intents_cancel: CancellationToken,
    /// Dropping the last `Tracker` stops the shipper; the ledger task still commits what it
    /// received (its channel closes) so nothing receipted is lost.
    _cancel_on_drop: DropGuard,
}

/// Cheap-to-clone handle to the metrics pipeline.
#[derive(Clone)]
pub struct Tracker {
    inner: Arc<Inner>,
}

impl Tracker {
    /// Opens (or creates) the ledger, and starts the ledger and shipper tasks on the current
    /// runtime. Entries left by an earlier run are shipped first, and the calls a stopped
    /// process on this ledger left in flight are recorded as `interrupted` before this returns.
    pub async fn start(cfg: MetricsConfig, sink: Arc<dyn Sink>) -> Result<Tracker, MetricsError> {
        Tracker::start_with(cfg, sink, None).await
    }

    /// [`Tracker::start`] with the intents of every replica kept in a shared store too.
    pub(crate) async fn start_with(
        cfg: MetricsConfig,
        sink: Arc<dyn Sink>,
        remote: Option<Arc<dyn SharedIntents>>,
    ) -> Result<Tracker, MetricsError> {
        let path = cfg.ledger_path.clone();
        let (ledger, owner) = tokio::task::spawn_blocking(move || {
            let ledger = Ledger::open(&path)?;
            // Claimed before any intent is written under it, so a running owner always holds
            // its lock.
            let owner = OwnerLock::claim(&path).map_err(|source| MetricsError::Owner {
                path: owners::owners_dir(&path).display().to_string(),
                source,
            })?;
            Ok::<_, MetricsError>((ledger, owner))
        })
        .await
        .map_err(|_| MetricsError::LedgerStopped)??;
        let (count, oldest) = ledger.backlog()?;
        let dead = ledger.dead_letter_count()?;
        if dead > 0 {
            tracing::warn!(
                dead_letters = dead,
                "metrics ledger holds dead letters the sink refused; list them in the admin API and requeue them once the cause is fixed"
            );
        }
        if count > 0 {
            tracing::info!(
                pending = count,
                "metrics ledger has entries from an earlier run; shipping them"
            );
        }
        let counters = Counters::default();
        counters.pending.store(count, Ordering::Relaxed);
        counters.dead_letters.store(dead, Ordering::Relaxed);
        counters
            .oldest_pending_ms
            .store(oldest.unwrap_or(0), Ordering::Relaxed);
        let alerts = AlertEvaluator::new(cfg.alerts.clone());
        let shared = Arc::new(Shared {
            counters,
            ledger: Mutex::new(ledger),
            sink,
            cfg,
            ship_wake: Notify::new(),
            draining: AtomicBool::new(false),
            changes: watch::Sender::new(0),
            last_error: Mutex::new(None),
            owner_id: owner.id().to_owned(),
            owner: Mutex::new(Some(owner)),
            remote,
            started_ms: now_ms(),
            spend: Mutex::new(SpendSettles::default()),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let cancel = CancellationToken::new();
        let intents_cancel = cancel.child_token();
        let ledger_task = tokio::spawn(commit::ledger_loop(rx, Arc::clone(&shared), alerts));
        let shipper_task = tokio::spawn(shipper::shipper_loop(Arc::clone(&shared), cancel.clone()));
        let recovered = intents::adopt_gone_owners(&shared, &tx).await;
        if recovered > 0 {
            tracing::warn!(
                recovered,
                "calls in flight when an earlier process on this ledger stopped are recorded as interrupted"
            );
        }
        let intents_task = tokio::spawn(intents::intents_loop(
            Arc::clone(&shared),
            tx.clone(),
            intents_cancel.clone(),
        ));
        Ok(Tracker {
            inner: Arc::new(Inner {
                tx,
                shared,
                closed: AtomicBool::new(false),
                ledger_task: Mutex::new(Some(ledger_task)),
                shipper_task: Mutex::new(Some(shipper_task)),
                intents_task: Mutex::new(Some(intents_task)),
                _cancel_on_drop: cancel.clone().drop_guard(),
                cancel,
                intents_cancel,
            }),
        })
    }

    /// Hands a record to the ledger without awaiting anything. The channel is unbounded on
    /// purpose: a bounded one would have to block the request or drop the record, and we do
    /// neither; `health().accepted - durable` shows any backlog.
    /// Who settles the dollar reservations of calls this tracker records `interrupted` (their
    /// intents carry one when budgets live in a shared store); reservations found before this
    /// is set are settled now.
    pub fn settle_interrupted_spend_with(&self, settle: SettleInterrupted) {
        let waiting = {
            let mut spend = self
                .inner
                .shared
                .spend
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            spend.settle = Some(Arc::clone(&settle));
            std::mem::take(&mut spend.waiting)
        };
        for (held, cost) in waiting {
            settle(held, cost);
        }
    }

    pub fn record(&self, rec: RequestRecord) -> Receipt {
        if self.inner.closed.load(Ordering::Acquire) {
            tracing::warn!(request_id = %rec.request_id, "metrics record after shutdown was not accepted");
            return Receipt::refused(RecordError::Closed);
        }
        self.send(|tx| Msg::Record(rec, tx))
    }

    /// Hands a call's intent to the ledger without awaiting anything; it is committed with the
    /// next group (never on its own), and ended by the call's record.
    pub fn record_intent(&self, intent: CallIntent) {
        if self.inner.closed.load(Ordering::Acquire) {
            // The call's record will be refused too; shutdown records what is still open.
            tracing::debug!(request_id = %intent.record.request_id, "call intent after shutdown was not accepted");
            return;
        }
        if self.inner.tx.send(Msg::Intent(intent)).is_ok() {
            self.inner
                .shared
                .counters
                .intents
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Hands a session message to the ledger, exactly like [`Tracker::record`]: no I/O, and the
    /// receipt resolves once the message is committed. From then on
    /// [`crate::sessions::SessionStore`] reads with this tracker as pending source see it.
    pub fn record_session_message(&self, msg: SessionMessage) -> Receipt {
        if self.inner.closed.load(Ordering::Acquire) {
            tracing::warn!(session_id = %msg.session_id, message_id = %msg.message_id,
                "session message after shutdown was not accepted");
            return Receipt::refused(RecordError::Closed);
        }
        self.send(|tx| Msg::Message(msg, tx))
    }

    /// Raises an alert found outside the metrics rules: it goes through the ledger to the store
    /// like any other entry (and counts in `alerts_raised`).
    pub fn raise_alert(&self, alert: Alert) -> Receipt {
        if self.inner.closed.load(Ordering::Acquire) {
            tracing::warn!(alert_id = %alert.alert_id, "alert after shutdown was not accepted");
            return Receipt::refused(RecordError::Closed);
        }
        self.send(|tx| Msg::Alert(alert, tx))
    }

    fn send(&self, msg: impl FnOnce(Commit) -> Msg) -> Receipt {
        let (commit, receipt) = Receipt::pending();
        if self.inner.tx.send(msg(commit)).is_err() {
            return Receipt::refused(RecordError::Closed);
        }
        self.inner
            .shared
            .counters
            .accepted
            .fetch_add(1, Ordering::Relaxed);
        receipt
    }

    pub fn health(&self) -> MetricsHealth {
        let c = &self.inner.shared.counters;
        let oldest = c.oldest_pending_ms.load(Ordering::Relaxed);
        let pending = c.pending.load(Ordering::Relaxed);
        let last_error = self
            .inner
            .shared
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let now = now_ms();
        MetricsHealth {
            sink: self.inner.shared.sink.name(),
            accepted: c.accepted.load(Ordering::Relaxed),
            durable: c.durable.load(Ordering::Relaxed),
            ledger_commits: c.ledger_commits.load(Ordering::Relaxed),
            shipped: c.shipped.load(Ordering::Relaxed),
            retried: c.retried.load(Ordering::Relaxed),
            failed_writes: c.failed_writes.load(Ordering::Relaxed),
            timeouts: c.timeouts.load(Ordering::Relaxed),
            consecutive_failures: c.consecutive_failures.load(Ordering::Relaxed),
            last_error_age_ms: last_error.as_ref().map(|(_, at)| now.saturating_sub(*at)),
            last_error: last_error.map(|(text, _)| text),
            dead_lettered: c.dead_lettered.load(Ordering::Relaxed),
            dead_letters: c.dead_letters.load(Ordering::Relaxed),
            requeued: c.requeued.load(Ordering::Relaxed),
            ledger_errors: c.ledger_errors.load(Ordering::Relaxed),
            pending,
            oldest_pending_age_ms: (pending > 0 && oldest > 0).then(|| now.saturating_sub(oldest)),
            alerts_raised: c.alerts_raised.load(Ordering::Relaxed),
            intents: c.intents.load(Ordering::Relaxed),
            intents_shared: c.intents_shared.load(Ordering::Relaxed),
            intents_skipped: c.intents_skipped.load(Ordering::Relaxed),
            recovered: c.recovered.load(Ordering::Relaxed),
            swept: c.swept.load(Ordering::Relaxed),
        }
    }

    /// The newest `limit` entries the sink refused permanently, newest first, with the error and
    /// the time they were set aside (for the admin API).
    pub async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, MetricsError> {
        self.inner
            .shared
            .with_ledger(move |l| l.dead_letters(limit))
            .await
    }

    /// Moves the dead letters back to the outbox, to be shipped at the next flush; for an operator who
    /// fixed the cause (the sink's schema, a limit, the entry's producer). Returns how many
    /// entries were requeued. One that is refused again returns to `dead_letters`. A key that
    /// is pending again keeps its dead letter until that newer entry has shipped. Works after
    /// `shutdown` too: the entries then ship at the next start.
    pub async fn requeue_dead_letters(&self) -> Result<u64, MetricsError> {
        let shared = &self.inner.shared;
        let (requeued, backlog) = shared
            .with_ledger(|l| Ok((l.requeue_dead_letters()?, l.backlog()?)))
            .await?;
        let c = &shared.counters;
        c.requeued.fetch_add(requeued.moved, Ordering::Relaxed);
        let _ = c
            .dead_letters
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| {
                Some(d.saturating_sub(requeued.removed))
            });
        c.pending.fetch_add(requeued.moved, Ordering::AcqRel);
        c.oldest_pending_ms
            .store(backlog.1.unwrap_or(0), Ordering::Release);
        tracing::info!(
            requeued = requeued.moved,
            superseded = requeued.removed.saturating_sub(requeued.moved),
            "metrics dead letters moved back to the outbox"
        );
        shared.bump();
        Ok(requeued.moved)
    }

    /// A receiver that changes after every ledger commit and ship attempt.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.inner.shared.changes.subscribe()
    }

    /// Waits until `pred(health)` holds or `timeout` passes; returns the last snapshot and
    /// whether the predicate held.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        pred: impl Fn(&MetricsHealth) -> bool,
    ) -> (MetricsHealth, bool) {
        let mut rx = self.changes();
        let deadline = Instant::now() + timeout;
        loop {
            let h = self.health();
            if pred(&h) {
                return (h, true);
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                let h = self.health();
                let ok = pred(&h);
                return (h, ok);
            }
        }
    }

    /// Stops accepting, commits everything queued to the ledger, records the calls still open
    /// as `interrupted` (no record of theirs can come any more), then ships until the ledger is
    /// empty or `deadline` passes. What is not shipped stays in the ledger for the next start.
    pub async fn shutdown(&self, deadline: Instant) -> ShutdownReport {
        let inner = &self.inner;
        inner.closed.store(true, Ordering::Release);
        inner.intents_cancel.cancel();
        let intents_task = inner
            .intents_task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(task) = intents_task {
            let _ = task.await;
        }
        // The ledger closes its receiver on `Close` and drains what was sent before it.
        let _ = inner.tx.send(Msg::Close);
        let ledger_task = inner
            .ledger_task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let mut ledger_flushed = true;
        let mut deadline_hit = false;
        if let Some(task) = ledger_task {
            match tokio::time::timeout_at(deadline, task).await {
                Ok(_) => {}
                Err(_) => {
                    ledger_flushed = false;
                    deadline_hit = true;
                }
            }
        }
        if ledger_flushed {
            self.interrupt_open_calls().await;
        }
        inner.shared.draining.store(true, Ordering::Release);
        inner.shared.ship_wake.notify_one();
        let shipper = inner
            .shipper_task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(mut task) = shipper
            && tokio::time::timeout_at(deadline, &mut task).await.is_err()
        {
            deadline_hit = true;
            inner.cancel.cancel();
            let _ = task.await;
        }
        if let Some(remote) = &inner.shared.remote
            && tokio::time::timeout_at(
                deadline,
                intents::share_round(&inner.shared, remote.as_ref()),
            )
            .await
            .is_err()
        {
            deadline_hit = true;
        }
        let owner = inner
            .shared
            .owner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        match owner {
            // Nothing of ours is open any more: the lock file can go.
            Some(owner) if ledger_flushed => owner.retire(),
            // The ledger task may still commit records of open calls: the lock stays held until
            // the process ends, and whoever starts next adopts what is left then.
            Some(owner) => {
                *inner
                    .shared
                    .owner
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = Some(owner)
            }
            None => {}
        }
        let c = &inner.shared.counters;
        let counts = inner
            .shared
            .with_ledger(|l| Ok((l.backlog()?.0, l.dead_letter_count()?)))
            .await;
        let (left, dead) = match counts {
            Ok(counts) => counts,
            Err(err) => {
                tracing::error!(error = %err, "could not count the metrics ledger at shutdown");
                (
                    c.pending.load(Ordering::Relaxed),
                    c.dead_letters.load(Ordering::Relaxed),
                )
            }
        };
        let report = ShutdownReport {
            ledger_flushed,
            shipped: c.shipped.load(Ordering::Relaxed),
            left_in_ledger: left,
            dead_lettered: c.dead_lettered.load(Ordering::Relaxed),
            dead_letters: dead,
            deadline_hit,
        };
        if left > 0 {
            tracing::warn!(
                left,
                "metrics shutdown left entries in the ledger; the next start ships them"
            );
        } else {
            tracing::info!(
                shipped = report.shipped,
                "metrics shut down with nothing pending"
            );
        }
        if dead > 0 {
            tracing::error!(
                dead_letters = dead,
                dead_lettered = report.dead_lettered,
                "the metrics ledger holds entries the sink refused; they are kept in dead_letters until requeued"
            );
        }
        report
    }

    /// At shutdown, once the ledger task drained: this process's calls whose record never came
    /// (a stream still open when the recorder closed) become `interrupted` records.
    async fn interrupt_open_calls(&self) {
        let shared = &self.inner.shared;
        let me = shared.owner_id.clone();
        let shared_mode = shared.remote.is_some();
        let now = now_ms();
        match shared
            .with_ledger(move |l| l.adopt(&me, &me, shared_mode, now))
            .await
        {
            Ok(records) if !records.is_empty() => {
                let n = records.len() as u64;
                commit::count_recovered(shared, n, now);
                tracing::warn!(
                    recorded = n,
                    "calls still in flight at shutdown are recorded as interrupted"
                );
            }
            Ok(_) => {}
            Err(err) => {
                tracing::error!(error = %err, "could not record the calls still in flight at shutdown; the next start records them");
            }
        }
    }
}

/// The engine's [`Recorder`]: call records and session messages go through the ledger like any
/// other entry, and shutdown is the tracker's.
impl Recorder for Tracker {
    fn record(&self, record: RequestRecord) -> Receipt {
        Tracker::record(self, record)
    }

    fn record_message(&self, message: SessionMessage) -> Receipt {
        self.record_session_message(message)
    }

    fn record_intent(&self, intent: CallIntent) {
        Tracker::record_intent(self, intent);
    }

    fn shutdown(&self, deadline: Instant) -> BoxFuture<'_, ShutdownReport> {
        Box::pin(Tracker::shutdown(self, deadline))
    }
}

impl PendingSessions for Tracker {
    fn pending_messages<'a>(
        &'a self,
        filter: PendingFilter<'a>,
    ) -> futures::future::BoxFuture<'a, Result<Vec<SessionMessage>, StoreError>> {
        let owned = match filter {
            PendingFilter::Session(id) => OwnedFilter::Session(id.to_owned()),
            PendingFilter::User(id) => OwnedFilter::User(id.to_owned()),
        };
        Box::pin(async move {
            self.inner
                .shared
                .with_ledger(move |l| l.pending_messages(owned.borrow()))
                .await
                .map_err(|err| StoreError::Ledger(err.to_string()))
        })
    }
}

/// A [`PendingFilter`] that can move onto the blocking pool.
enum OwnedFilter {
    Session(String),
    User(String),
}

impl OwnedFilter {
    fn borrow(&self) -> PendingFilter<'_> {
        match self {
            OwnedFilter::Session(id) => PendingFilter::Session(id),
            OwnedFilter::User(id) => PendingFilter::User(id),
        }
    }
}
