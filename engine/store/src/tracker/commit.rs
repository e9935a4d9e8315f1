//! The ledger task: group-commits what `Tracker::record` and `Tracker::record_intent` queued
//! into the SQLite outbox and intents table (alerts evaluated on the way), then resolves each
//! entry's receipt; and adopts the intents of stopped processes as `interrupted` records.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use keyvex_engine::clock::now_ms;
use keyvex_engine::record::{CallIntent, Commit};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::owners::OwnerLock;
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
    // A call alive longer than `replica_lost_after` is one a replica would already record as
    // lost; the same bound ends its count here.
    let mut in_flight = InFlight::new(shared.cfg.replica_lost_after);
    // While one transaction's fsync runs, new records queue up and the next `recv_many` takes
    // them all, so batches grow with load on their own once commits overlap. Below that, a
    // record waits up to `record_linger` for the records of other calls in flight
    // (`linger_for_company`), and a batch of intents alone waits for anything else
    // (`linger_on_intents`).
    while rx.recv_many(&mut buf, limit).await > 0 {
        in_flight.note_all(&buf);
        let mut batch = Batch {
            rx: &mut rx,
            buf: &mut buf,
            limit,
            in_flight: &mut in_flight,
        };
        batch.linger_on_intents(shared.cfg.intent_linger).await;
        batch
            .linger_for_company(shared.cfg.record_linger, shared.cfg.record_linger_min_calls)
            .await;
        let mut entries = Vec::with_capacity(buf.len());
        let mut intents = Vec::new();
        let mut adoptions = Vec::new();
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
                Msg::Intent(intent) => intents.push(intent),
                Msg::Adopt(lock, waiter) => adoptions.push((lock, waiter)),
                // Later messages were sent before the close and are still received.
                Msg::Close => rx.close(),
            }
        }
        let skipped = drop_ended_intents(&mut intents, &entries);
        shared
            .counters
            .intents_skipped
            .fetch_add(skipped, Ordering::Relaxed);
        if !entries.is_empty() || !intents.is_empty() {
            commit(&shared, entries, intents, waiters, raised).await;
        }
        for (lock, waiter) in adoptions {
            adopt(&shared, &mut alerts, lock, waiter).await;
        }
    }
}

/// The calls of this process whose intent the ledger task has received and whose record it has
/// not: the calls that may end soon, which decide whether a record waits for company.
struct InFlight {
    open: HashMap<String, Instant>,
    /// An intent never ended by a record (none is expected: a dropped call records itself as
    /// `cancelled`) stops counting after this long, so a leak cannot make every commit wait.
    forget_after: Duration,
    noted_since_prune: usize,
}

impl InFlight {
    /// How many intents are noted between two sweeps for forgotten ones.
    const PRUNE_EVERY: usize = 4096;

    fn new(forget_after: Duration) -> InFlight {
        InFlight {
            open: HashMap::new(),
            forget_after,
            noted_since_prune: 0,
        }
    }

    fn note_all(&mut self, msgs: &[Msg]) {
        for msg in msgs {
            match msg {
                Msg::Intent(intent) => {
                    let now = Instant::now();
                    self.open.insert(intent.record.request_id.clone(), now);
                    self.noted_since_prune += 1;
                    if self.noted_since_prune >= Self::PRUNE_EVERY {
                        self.noted_since_prune = 0;
                        let forget_after = self.forget_after;
                        self.open
                            .retain(|_, since| now.duration_since(*since) < forget_after);
                    }
                }
                Msg::Record(rec, _) => {
                    self.open.remove(rec.request_id.as_str());
                }
                _ => {}
            }
        }
    }

    fn calls(&self) -> usize {
        self.open.len()
    }
}

/// The group being gathered for the next transaction.
struct Batch<'a> {
    rx: &'a mut mpsc::UnboundedReceiver<Msg>,
    buf: &'a mut Vec<Msg>,
    limit: usize,
    in_flight: &'a mut InFlight,
}

impl Batch<'_> {
    /// Records enough to share one transaction: its fixed cost (the WAL frames of the pages
    /// every group touches, and the fsync) is then a small part of the whole, and waiting for
    /// more only adds time. At 1,000 streams groups reach ~50 records without waiting; at 32,
    /// one record each (`keyvex_metrics_durable / keyvex_metrics_ledger_commits`).
    const ENOUGH_RECORDS: usize = 16;
    /// How often a lingering group looks at what arrived: one wake-up per look, not per
    /// message, since at high rates a wake-up per message costs more than the grouping saves.
    const LOOK_EVERY: Duration = Duration::from_millis(1);

    /// Receives more into the group until `until`, waking for every message (the intent linger
    /// ends the moment anything else arrives); false once the group is full, closed, or the
    /// time is up.
    async fn receive_until(&mut self, until: Instant) -> bool {
        let room = self.limit.saturating_sub(self.buf.len());
        if room == 0 || self.closing() {
            return false;
        }
        let start = self.buf.len();
        match tokio::time::timeout_at(until, self.rx.recv_many(self.buf, room)).await {
            Ok(0) | Err(_) => false,
            Ok(_) => {
                self.in_flight.note_all(&self.buf[start..]);
                true
            }
        }
    }

    /// Sleeps one look (or to `until`), then takes whatever arrived meanwhile; false once the
    /// group is full, closed, or the time is up.
    async fn look_until(&mut self, until: Instant) -> bool {
        if self.buf.len() >= self.limit || self.closing() {
            return false;
        }
        let now = Instant::now();
        if now >= until {
            return false;
        }
        tokio::time::sleep_until(until.min(now + Self::LOOK_EVERY)).await;
        let start = self.buf.len();
        while self.buf.len() < self.limit {
            match self.rx.try_recv() {
                Ok(msg) => self.buf.push(msg),
                Err(_) => break,
            }
        }
        self.in_flight.note_all(&self.buf[start..]);
        true
    }

    fn closing(&self) -> bool {
        self.buf.iter().any(|m| matches!(m, Msg::Close))
    }

    fn records(&self) -> usize {
        self.buf
            .iter()
            .filter(|m| matches!(m, Msg::Record(..)))
            .count()
    }

    /// A group of nothing but intents waits up to `linger` for anything else (or a full
    /// group): the intents of calls just sent are then not committed while their first tokens
    /// come, and join the next group instead of making one of their own.
    async fn linger_on_intents(&mut self, linger: Duration) {
        let only_intents = |buf: &[Msg]| buf.iter().all(|m| matches!(m, Msg::Intent(_)));
        if linger.is_zero() || !only_intents(self.buf) {
            return;
        }
        let until = Instant::now() + linger;
        while only_intents(self.buf) && self.receive_until(until).await {}
    }

    /// A group holding fewer than [`Self::ENOUGH_RECORDS`] records waits up to `linger` for the
    /// records of other calls while at least `min_calls` are in flight: their commits then
    /// share one WAL append and one fsync. The wait is paid at the end of each stream (its usage
    /// waits for the commit), never by its first token, and a lone call commits at once.
    async fn linger_for_company(&mut self, linger: Duration, min_calls: usize) {
        let records = self.records();
        if linger.is_zero() || records == 0 || records >= Self::ENOUGH_RECORDS {
            return;
        }
        let until = Instant::now() + linger;
        while self.in_flight.calls() >= min_calls.max(1)
            && self.records() < Self::ENOUGH_RECORDS
            && self.look_until(until).await
        {}
    }
}

/// Leaves out the intents of calls whose records are in the same group: the record is what
/// the transaction commits, and an intent inserted only to be ended in the same step is work
/// for nothing.
fn drop_ended_intents(intents: &mut Vec<CallIntent>, entries: &[Entry]) -> u64 {
    if intents.is_empty() {
        return 0;
    }
    let ended: HashSet<&str> = entries
        .iter()
        .filter_map(|e| match e {
            Entry::Request(r) => Some(r.request_id.as_str()),
            _ => None,
        })
        .collect();
    let before = intents.len();
    if !ended.is_empty() {
        intents.retain(|i| !ended.contains(i.record.request_id.as_str()));
    }
    (before - intents.len()) as u64
}

/// Commits one group: intents first, then entries (each request ending its call's intent), in
/// one transaction retried until the disk takes it; then resolves the receipts.
async fn commit(
    shared: &Arc<Shared>,
    entries: Vec<Entry>,
    intents: Vec<CallIntent>,
    waiters: Vec<Commit>,
    raised: u64,
) {
    let c = &shared.counters;
    c.accepted.fetch_add(raised, Ordering::Relaxed);
    c.alerts_raised.fetch_add(raised, Ordering::Relaxed);
    let count = entries.len() as u64;
    let now = now_ms();
    let batch = Arc::new((entries, intents));
    let shared_intents = shared.remote.is_some();
    let mut attempt = 0u32;
    let inserted = loop {
        let batch = Arc::clone(&batch);
        let owner = shared.owner_id.clone();
        match shared
            .with_ledger(move |l| l.commit(&owner, &batch.1, &batch.0, shared_intents, now))
            .await
        {
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
    note_pending(shared, inserted, now);
    for waiter in waiters {
        waiter.done();
    }
    if c.pending.load(Ordering::Acquire) >= shared.cfg.ship_batch as u64 {
        shared.ship_wake.notify_one();
    }
    shared.bump();
}

/// Adds rows that entered the outbox to the pending gauge.
fn note_pending(shared: &Shared, inserted: u64, now: u64) {
    let c = &shared.counters;
    if c.pending.fetch_add(inserted, Ordering::AcqRel) == 0 && inserted > 0 {
        let _ = c
            .oldest_pending_ms
            .compare_exchange(0, now, Ordering::AcqRel, Ordering::Relaxed);
    }
}

/// Counts `n` `interrupted` records written from intents into the outbox.
pub(super) fn count_recovered(shared: &Shared, n: u64, now: u64) {
    let c = &shared.counters;
    c.recovered.fetch_add(n, Ordering::Relaxed);
    c.accepted.fetch_add(n, Ordering::Relaxed);
    c.durable.fetch_add(n, Ordering::Relaxed);
    note_pending(shared, n, now);
    shared.ship_wake.notify_one();
    shared.bump();
}

/// Turns the open intents of the stopped process whose lock is `lock` into `interrupted`
/// records (alerts evaluated on them like on any record), then retires its lock. A failure
/// lets go of the lock without retiring it: the next look adopts them.
async fn adopt(shared: &Arc<Shared>, alerts: &mut AlertEvaluator, lock: OwnerLock, waiter: Commit) {
    let gone = lock.id().to_owned();
    let me = shared.owner_id.clone();
    let shared_intents = shared.remote.is_some();
    let now = now_ms();
    let intents = match shared
        .with_ledger(move |l| l.adopt(&gone, &me, shared_intents, now))
        .await
    {
        Ok(intents) => intents,
        Err(err) => {
            shared
                .counters
                .ledger_errors
                .fetch_add(1, Ordering::Relaxed);
            tracing::error!(owner = lock.id(), error = %err, "adopting the call intents of a stopped process failed; trying again later");
            return;
        }
    };
    // The stopped process's reservations went with it only where it kept them; a shared
    // store still holds them, until they are settled to what the records bill.
    shared.settle_spend(&intents);
    let n = intents.len() as u64;
    if n > 0 {
        tracing::warn!(
            owner = lock.id(),
            recorded = n,
            "calls in flight when their process stopped are recorded as interrupted"
        );
        count_recovered(shared, n, now);
        let raised: Vec<Entry> = intents
            .iter()
            .flat_map(|i| alerts.observe(&i.record))
            .map(Entry::Alert)
            .collect();
        if !raised.is_empty() {
            let k = raised.len() as u64;
            let c = &shared.counters;
            c.accepted.fetch_add(k, Ordering::Relaxed);
            c.alerts_raised.fetch_add(k, Ordering::Relaxed);
            match shared.with_ledger(move |l| l.append(&raised, now)).await {
                Ok(inserted) => {
                    c.durable.fetch_add(k, Ordering::Relaxed);
                    note_pending(shared, inserted, now);
                }
                Err(err) => {
                    c.ledger_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(error = %err, alerts = k, "alerts on interrupted calls could not be committed");
                }
            }
        }
    }
    lock.retire();
    waiter.done();
}
