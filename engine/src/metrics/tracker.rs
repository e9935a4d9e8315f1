//! [`Tracker`]: the request path's handle. `record` is a channel send; a ledger task group-commits
//! into the SQLite outbox and resolves [`Receipt`]s; a shipper task copies the outbox to the sink.
//!
//! Failed sink writes are told apart by [`StoreError::is_rejection`]. Transient failures
//! (throttling, outages, a misconfigured store) keep the batch pending and are retried for as
//! long as it takes, with capped full-jitter backoff. A rejection (the sink refuses the data
//! itself) splits the batch in halves until the refused entries are alone; the rest ships, and
//! each refused entry moves to the ledger's `dead_letters` table, where it is counted, logged,
//! listed by [`Tracker::dead_letters`] and put back by [`Tracker::requeue_dead_letters`].

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::config::Env;
use crate::metrics::MetricsError;
use crate::metrics::alerts::{AlertConfig, AlertEvaluator};
use crate::metrics::ledger::{DeadLetter, Ledger, Pending, Reject};
use crate::metrics::record::{RequestRecord, now_ms};
use crate::store::sessions::{PendingFilter, PendingSessions, SessionMessage};
use crate::store::{Entry, Sink, StoreError, full_jitter};

/// Starts the tracker the environment asks for: the DynamoDB sink when `DYNAMODB_TABLE_NAME` is
/// set (`DYNAMODB_ENDPOINT` points it at an emulator; region and credentials are the standard AWS
/// variables), otherwise the SQLite store in the ledger's own file. The table is not created
/// here; call [`crate::store::dynamo::create_table`] where provisioning is wanted.
pub async fn start_from_env(env: &dyn Env) -> Result<Tracker, MetricsError> {
    let cfg = MetricsConfig::from_env(env)?;
    let sink: Arc<dyn Sink> = match env.var("DYNAMODB_TABLE_NAME") {
        Some(table) => {
            let endpoint = env.var("DYNAMODB_ENDPOINT");
            let client = crate::store::dynamo::client(endpoint.as_deref()).await;
            tracing::info!(
                table,
                endpoint = endpoint.as_deref().unwrap_or("aws"),
                "metrics ship to DynamoDB"
            );
            Arc::new(crate::store::dynamo::DynamoStore::new(client, &table))
        }
        None => {
            let path = cfg.ledger_path.clone();
            let store =
                tokio::task::spawn_blocking(move || crate::store::sqlite::SqliteStore::open(&path))
                    .await
                    .map_err(|_| MetricsError::LedgerStopped)??;
            tracing::info!(path = %cfg.ledger_path.display(), "metrics stored in embedded SQLite");
            Arc::new(store)
        }
    };
    Tracker::start(cfg, sink).await
}

/// Settings of the tracker. `from_env` reads `KEYVEX_METRICS_DB` and `KEYVEX_METRICS_FLUSH_MS`.
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
        }
    }

    pub fn from_env(env: &dyn Env) -> Result<MetricsConfig, MetricsError> {
        let path = env
            .var("KEYVEX_METRICS_DB")
            .unwrap_or_else(|| "keyvex-metrics.sqlite3".to_owned());
        let mut cfg = MetricsConfig::new(path);
        if let Some(v) = env.var("KEYVEX_METRICS_FLUSH_MS") {
            let ms: u64 = v.trim().parse().map_err(|_| MetricsError::Config {
                name: "KEYVEX_METRICS_FLUSH_MS",
                value: v.clone(),
                problem: "expected whole milliseconds, e.g. 500".to_owned(),
            })?;
            if ms == 0 || ms > 60_000 {
                return Err(MetricsError::Config {
                    name: "KEYVEX_METRICS_FLUSH_MS",
                    value: v,
                    problem: "must be between 1 and 60000".to_owned(),
                });
            }
            cfg.flush_interval = Duration::from_millis(ms);
        }
        Ok(cfg)
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
}

/// What `shutdown` achieved before its deadline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Every accepted entry reached the ledger.
    pub ledger_flushed: bool,
    /// Entries shipped during this process's life.
    pub shipped: u64,
    /// Entries still pending in the ledger's outbox, shipped by the next start (never dropped).
    pub left_in_ledger: u64,
    /// Entries the sink refused permanently during this process's life (moved to
    /// `dead_letters`).
    pub dead_lettered: u64,
    /// Entries held in `dead_letters` at shutdown, including earlier runs'; they stay there
    /// until an operator requeues them.
    pub dead_letters: u64,
    pub deadline_hit: bool,
}

/// Resolves once the record is committed to the local ledger.
pub struct Receipt(ReceiptState);

enum ReceiptState {
    Pending(oneshot::Receiver<()>),
    Closed,
}

impl Receipt {
    pub async fn durable(self) -> Result<(), MetricsError> {
        match self.0 {
            ReceiptState::Pending(rx) => rx.await.map_err(|_| MetricsError::LedgerStopped),
            ReceiptState::Closed => Err(MetricsError::Closed),
        }
    }
}

enum Msg {
    Record(RequestRecord, oneshot::Sender<()>),
    Message(SessionMessage, oneshot::Sender<()>),
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
    ledger_errors: AtomicU64,
    pending: AtomicU64,
    /// 0 = nothing pending.
    oldest_pending_ms: AtomicU64,
    alerts_raised: AtomicU64,
    consecutive_failures: AtomicU64,
    dead_lettered: AtomicU64,
    dead_letters: AtomicU64,
    requeued: AtomicU64,
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
    cancel: CancellationToken,
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
    /// runtime. Entries left by an earlier run are shipped first.
    pub async fn start(cfg: MetricsConfig, sink: Arc<dyn Sink>) -> Result<Tracker, MetricsError> {
        let path = cfg.ledger_path.clone();
        let ledger = tokio::task::spawn_blocking(move || Ledger::open(&path))
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
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let cancel = CancellationToken::new();
        let ledger_task = tokio::spawn(ledger_loop(rx, Arc::clone(&shared), alerts));
        let shipper_task = tokio::spawn(shipper_loop(Arc::clone(&shared), cancel.clone()));
        Ok(Tracker {
            inner: Arc::new(Inner {
                tx,
                shared,
                closed: AtomicBool::new(false),
                ledger_task: Mutex::new(Some(ledger_task)),
                shipper_task: Mutex::new(Some(shipper_task)),
                _cancel_on_drop: cancel.clone().drop_guard(),
                cancel,
            }),
        })
    }

    /// Hands a record to the ledger without awaiting anything. The channel is unbounded on
    /// purpose: a bounded one would have to block the request or drop the record, and we do
    /// neither; `health().accepted - durable` shows any backlog.
    pub fn record(&self, rec: RequestRecord) -> Receipt {
        if self.inner.closed.load(Ordering::Acquire) {
            tracing::warn!(request_id = %rec.request_id, "metrics record after shutdown was not accepted");
            return Receipt(ReceiptState::Closed);
        }
        self.send(|tx| Msg::Record(rec, tx))
    }

    /// Hands a session message to the ledger, exactly like [`Tracker::record`]: no I/O, and the
    /// receipt resolves once the message is committed. From then on
    /// [`crate::store::sessions::SessionStore`] reads with this tracker as pending source see it.
    pub fn record_session_message(&self, msg: SessionMessage) -> Receipt {
        if self.inner.closed.load(Ordering::Acquire) {
            tracing::warn!(session_id = %msg.session_id, message_id = %msg.message_id,
                "session message after shutdown was not accepted");
            return Receipt(ReceiptState::Closed);
        }
        self.send(|tx| Msg::Message(msg, tx))
    }

    fn send(&self, msg: impl FnOnce(oneshot::Sender<()>) -> Msg) -> Receipt {
        let (tx, rx) = oneshot::channel();
        if self.inner.tx.send(msg(tx)).is_err() {
            return Receipt(ReceiptState::Closed);
        }
        self.inner
            .shared
            .counters
            .accepted
            .fetch_add(1, Ordering::Relaxed);
        Receipt(ReceiptState::Pending(rx))
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

    /// Stops accepting, commits everything queued to the ledger, then ships until the ledger is
    /// empty or `deadline` passes. What is not shipped stays in the ledger for the next start.
    pub async fn shutdown(&self, deadline: Instant) -> ShutdownReport {
        let inner = &self.inner;
        inner.closed.store(true, Ordering::Release);
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

async fn ledger_loop(
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
            let _ = waiter.send(());
        }
        if c.pending.load(Ordering::Acquire) >= shared.cfg.ship_batch as u64 {
            shared.ship_wake.notify_one();
        }
        shared.bump();
    }
}

async fn shipper_loop(shared: Arc<Shared>, cancel: CancellationToken) {
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
