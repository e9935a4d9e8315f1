//! Dollar budgets: what a caller may spend per UTC day and per calendar month, what one pipeline
//! run may spend, and a global daily cap, enforced before money is spent.
//!
//! Every provider attempt **reserves** its worst case before the call (every prompt byte counted
//! as a token at the dearer input price, plus the output cap at the output price) and **settles**
//! to the exact cost its record carries when the attempt ends, however it ends. A reservation
//! passes only if, on every budget it touches, `spent + reserved + worst case <= limit`, checked
//! and taken as one step, so concurrent requests can never take a budget past its limit.
//!
//! Amounts are integer picodollars (see `cost.rs`). Where the counters live is a
//! [`SpendStore`]: [`InProcessSpend`] here (one process), or a shared store (Redis, in
//! `keyvex-store`) so every replica enforces one limit.

mod in_process;
mod recent_lines;
mod windows;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::cost::{Cost, Pricing};
use crate::provider::ChatRequest;

use recent_lines::RecentLines;

pub use in_process::InProcessSpend;
pub use windows::{Window, rfc3339, window_of, window_start};

/// Which budget a line of spend counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BudgetScope {
    /// One caller (API key owner), one UTC day.
    CallerDaily,
    /// One caller, one calendar month (UTC).
    CallerMonthly,
    /// One pipeline run (or job), for its whole life.
    Run,
    /// Every caller together, one UTC day.
    GlobalDaily,
}

impl BudgetScope {
    pub const ALL: [BudgetScope; 4] = [
        BudgetScope::CallerDaily,
        BudgetScope::CallerMonthly,
        BudgetScope::Run,
        BudgetScope::GlobalDaily,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BudgetScope::CallerDaily => "caller_daily",
            BudgetScope::CallerMonthly => "caller_monthly",
            BudgetScope::Run => "run",
            BudgetScope::GlobalDaily => "global_daily",
        }
    }

    fn index(self) -> usize {
        match self {
            BudgetScope::CallerDaily => 0,
            BudgetScope::CallerMonthly => 1,
            BudgetScope::Run => 2,
            BudgetScope::GlobalDaily => 3,
        }
    }
}

impl fmt::Display for BudgetScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A caller's own limits, replacing the defaults where set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallerBudget {
    pub daily: Option<Cost>,
    pub monthly: Option<Cost>,
}

impl CallerBudget {
    pub fn is_empty(&self) -> bool {
        self.daily.is_none() && self.monthly.is_none()
    }
}

/// The configured limits. `None` is unlimited (spend is still counted, so it can be read).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BudgetLimits {
    /// Per caller per UTC day, unless the caller has its own.
    pub caller_daily: Option<Cost>,
    /// Per caller per calendar month, unless the caller has its own.
    pub caller_monthly: Option<Cost>,
    /// Per pipeline run or job.
    pub run: Option<Cost>,
    /// All callers together per UTC day.
    pub global_daily: Option<Cost>,
    /// Per-caller limits from the configuration file. Limits set through the admin API (kept in
    /// the spend store) take precedence over these.
    pub callers: BTreeMap<String, CallerBudget>,
}

/// One budget a reservation must fit: its counter key, its limit and when it resets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SpendLine {
    pub scope: BudgetScope,
    /// The caller, the run id, or `*` for the global budget.
    pub subject: String,
    /// The counter's key: scope, subject and window (`caller_daily:alice:2026-12-07`).
    pub key: String,
    /// The window's label (`2026-12-07`, `2026-12`, the run id).
    pub window: String,
    /// The configured limit; a limit set through the admin API for this caller replaces it.
    pub limit: Option<Cost>,
    /// The caller whose admin-set limit applies to this line, if any.
    pub override_of: Option<String>,
    /// When the window ends (`None` for a run: it does not reset).
    pub resets_at: Option<SystemTime>,
    /// How long the counter is worth keeping after its last use.
    pub keep_for: Duration,
}

/// A counter's state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LineState {
    pub spent: Cost,
    pub reserved: Cost,
    /// The limit in force (an admin-set one, or the configured one).
    pub limit: Option<Cost>,
}

impl LineState {
    pub fn remaining(&self) -> Option<Cost> {
        self.limit
            .map(|l| Cost(l.0.saturating_sub(self.spent.0.saturating_add(self.reserved.0))))
    }
}

/// Why a spend store did not take a reservation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpendError {
    /// Line `index` of the reservation has no room; nothing was reserved.
    #[error("no room on budget line {index}")]
    Refused { index: usize, state: LineState },
    /// The store could not be asked (a shared store that is unreachable or too slow).
    #[error("the spend store is unavailable: {0}")]
    Unavailable(String),
}

/// Where spend counters live. Every method answers in one step: a reservation either fits every
/// line and is taken on all of them, or is taken on none.
pub trait SpendStore: Send + Sync + 'static {
    /// Adds `amount` to every line's reserved spend if each has room for it.
    fn reserve<'a>(
        &'a self,
        lines: &'a [SpendLine],
        amount: Cost,
    ) -> BoxFuture<'a, Result<(), SpendError>>;
    /// Moves `reserved` out of every line's reserved spend and adds `actual` to its spent. Never
    /// blocks the caller (it runs from `Drop`): a store that does I/O queues it.
    fn settle(&self, lines: Arc<[SpendLine]>, reserved: Cost, actual: Cost);
    /// The lines' states, in order.
    fn read<'a>(
        &'a self,
        lines: &'a [SpendLine],
    ) -> BoxFuture<'a, Result<Vec<LineState>, SpendError>>;
    /// Sets (or, with an empty budget, clears) a caller's own limits, for every replica.
    fn set_caller<'a>(
        &'a self,
        caller: &'a str,
        budget: CallerBudget,
    ) -> BoxFuture<'a, Result<(), SpendError>>;
    /// Every caller's limits set through [`SpendStore::set_caller`].
    fn callers(&self) -> BoxFuture<'_, Result<BTreeMap<String, CallerBudget>, SpendError>>;
    /// One line for start-up banners.
    fn describe(&self) -> String;
    /// Adds `spent` to a line's spend without a reservation: what the records of an earlier run
    /// of this process billed in the line's window, for a store that starts empty with each
    /// process ([`Budgets::restore`]). A shared store keeps its own counts and ignores it.
    fn restore(&self, line: &SpendLine, spent: Cost) {
        let _ = (line, spent);
    }
    /// Whether reservations outlive the process that made them (a shared store). Only then
    /// does a call's intent carry its reservation, for [`Budgets::settle_interrupted`].
    fn outlives_process(&self) -> bool {
        false
    }
}

/// Where callers' own limits set through the admin API are kept when the spend counters live
/// in the process ([`InProcessSpend::persisted`]), so a restart keeps them (`keyvex-store`: the
/// metrics store's SQLite file or DynamoDB table).
pub trait CallerBudgetStore: Send + Sync + 'static {
    /// Sets `caller`'s limits; an empty budget removes them.
    fn save<'a>(
        &'a self,
        caller: &'a str,
        budget: CallerBudget,
    ) -> BoxFuture<'a, Result<(), String>>;
    /// One line for start-up banners and the admin API.
    fn describe(&self) -> String;
}

/// What one caller spent in the windows open now, by an earlier run ([`Budgets::restore`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RestoredSpend {
    pub day: Cost,
    pub month: Cost,
}

/// A reservation as a call's intent keeps it, so that a process that finds the call
/// interrupted (its own process stopped) can settle it to what the `interrupted` record bills.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HeldSpend {
    pub lines: Vec<SpendLine>,
    pub reserved: Cost,
}

/// A budget that had no room, with everything a caller needs to know about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetRefusal {
    pub scope: BudgetScope,
    pub subject: String,
    pub window: String,
    pub spent: Cost,
    pub reserved: Cost,
    pub limit: Cost,
    /// What the refused call would have reserved.
    pub requested: Cost,
    pub resets_at: Option<SystemTime>,
}

impl BudgetRefusal {
    /// Until the window resets (`None` for a run budget, which never does).
    pub fn retry_after(&self, now: SystemTime) -> Option<Duration> {
        self.resets_at
            .map(|at| at.duration_since(now).unwrap_or(Duration::ZERO))
    }
}

impl fmt::Display for BudgetRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the {} budget of {} for {} is spent: {} spent and {} reserved of {}, and this call may cost up to {}",
            self.scope,
            if self.subject == "*" {
                "all callers"
            } else {
                &self.subject
            },
            self.window,
            self.spent,
            self.reserved,
            self.limit,
            self.requested
        )?;
        match self.resets_at {
            Some(at) => write!(f, "; it resets at {}", windows::rfc3339(at)),
            None => write!(f, "; a run budget does not reset, start a new run"),
        }
    }
}

/// Why a call may not spend.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BudgetDenied {
    #[error("{0}")]
    Exceeded(Box<BudgetRefusal>),
    /// The shared spend store cannot be reached and budgets fail closed.
    #[error(
        "spend budgets cannot be checked ({0}), and without that no model call is made; retry shortly"
    )]
    Unavailable(String),
}

impl BudgetDenied {
    pub fn kind(&self) -> &'static str {
        match self {
            BudgetDenied::Exceeded(_) => "budget_exceeded",
            BudgetDenied::Unavailable(_) => "budget_unavailable",
        }
    }
}

/// What to do when the spend store cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnUnavailable {
    /// Refuse the call (the default for money: an unbounded bill is worse than a refused call).
    #[default]
    FailClosed,
    /// Let the call through uncounted.
    FailOpen,
}

/// A budget as a caller sees it: for the admin API, the dashboard and response headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetView {
    pub scope: BudgetScope,
    pub subject: String,
    pub window: String,
    pub state: LineState,
    pub resets_at: Option<SystemTime>,
}

/// Counts kept for `/metrics`.
#[derive(Debug, Default)]
struct Counters {
    refused: [AtomicU64; 4],
    unavailable: AtomicU64,
    /// Whether the store is in an unavailable episode now (logged once per episode).
    down: AtomicBool,
    reserved_pico: AtomicU64,
    settled_pico: AtomicU64,
    interrupted_settled: AtomicU64,
}

/// What `/metrics` shows of the budgets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BudgetStats {
    /// Refusals per scope, in [`BudgetScope::ALL`] order.
    pub refused: [u64; 4],
    /// Reservations or reads the store could not answer.
    pub unavailable: u64,
    /// Sum of every reservation made, and of every settled cost.
    pub reserved: Cost,
    pub settled: Cost,
    /// Reservations of interrupted calls (made by a process that stopped) settled here.
    pub interrupted_settled: u64,
}

/// The engine's budgets: the limits, the store that counts, and what to do when it is down.
pub struct Budgets {
    limits: BudgetLimits,
    store: Arc<dyn SpendStore>,
    on_unavailable: OnUnavailable,
    counters: Counters,
    recent: RecentLines,
}

impl fmt::Debug for Budgets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Budgets")
            .field("limits", &self.limits)
            .field("store", &self.store.describe())
            .field("on_unavailable", &self.on_unavailable)
            .finish()
    }
}

/// Counters of a run are kept a week after their last use; day and month counters a little past
/// their window, so a late settle still finds them.
const RUN_KEEP: Duration = Duration::from_secs(7 * 24 * 3600);
const AFTER_WINDOW: Duration = Duration::from_secs(2 * 24 * 3600);

impl Budgets {
    pub fn new(
        limits: BudgetLimits,
        store: Arc<dyn SpendStore>,
        on_unavailable: OnUnavailable,
    ) -> Budgets {
        Budgets {
            limits,
            store,
            on_unavailable,
            counters: Counters::default(),
            recent: RecentLines::default(),
        }
    }

    /// Budgets counted in this process only.
    pub fn in_process(limits: BudgetLimits) -> Budgets {
        Budgets::new(
            limits,
            Arc::new(InProcessSpend::default()),
            OnUnavailable::FailClosed,
        )
    }

    pub fn limits(&self) -> &BudgetLimits {
        &self.limits
    }

    pub fn store(&self) -> &dyn SpendStore {
        self.store.as_ref()
    }

    /// The budgets a call by `caller` (within `run_id`, if any) counts against at `now`. A
    /// caller's day and month and the global day are always counted, limited or not (so spend
    /// can be read); a run only when runs are limited.
    ///
    /// The calls of one caller share one list for a minute (see `recent_lines.rs`): a stream
    /// holds its lines while it streams.
    pub fn lines(&self, caller: &str, run_id: Option<&str>, now: SystemTime) -> Arc<[SpendLine]> {
        // A run's line names the run, so only lists without one are shared.
        let shared = run_id.is_none() || self.limits.run.is_none();
        if shared && let Some(lines) = self.recent.get(caller, now) {
            return lines;
        }
        let lines: Arc<[SpendLine]> = self.build_lines(caller, run_id, now).into();
        if shared {
            self.recent.keep(caller, &lines, now);
        }
        lines
    }

    fn build_lines(&self, caller: &str, run_id: Option<&str>, now: SystemTime) -> Vec<SpendLine> {
        let own = self.limits.callers.get(caller);
        let day = window_of(now, Window::Day);
        let month = window_of(now, Window::Month);
        let mut lines = Vec::with_capacity(4);
        let mut push = |scope: BudgetScope,
                        subject: &str,
                        window: (String, SystemTime),
                        limit: Option<Cost>,
                        over: bool| {
            lines.push(SpendLine {
                scope,
                subject: subject.to_owned(),
                key: format!("{scope}:{subject}:{}", window.0),
                window: window.0,
                limit,
                override_of: over.then(|| caller.to_owned()),
                resets_at: Some(window.1),
                keep_for: window
                    .1
                    .duration_since(now)
                    .unwrap_or(Duration::ZERO)
                    .saturating_add(AFTER_WINDOW),
            });
        };
        push(
            BudgetScope::CallerDaily,
            caller,
            day.clone(),
            own.and_then(|o| o.daily).or(self.limits.caller_daily),
            true,
        );
        push(
            BudgetScope::CallerMonthly,
            caller,
            month,
            own.and_then(|o| o.monthly).or(self.limits.caller_monthly),
            true,
        );
        push(
            BudgetScope::GlobalDaily,
            "*",
            day,
            self.limits.global_daily,
            false,
        );
        if let (Some(run), Some(limit)) = (run_id, self.limits.run) {
            lines.push(SpendLine {
                scope: BudgetScope::Run,
                subject: run.to_owned(),
                key: format!("run:{run}"),
                window: run.to_owned(),
                limit: Some(limit),
                override_of: None,
                resets_at: None,
                keep_for: RUN_KEEP,
            });
        }
        lines
    }

    /// Puts back what earlier runs spent in the windows open now, from the metrics store's
    /// records (a store kept in this process starts empty): per caller this UTC day and this
    /// month, and all callers this day. Lines a shared store keeps are left as they are.
    pub fn restore(&self, callers: &BTreeMap<String, RestoredSpend>, global_day: Cost) {
        let now = SystemTime::now();
        for (caller, spent) in callers {
            for line in self.lines(caller, None, now).iter() {
                match line.scope {
                    BudgetScope::CallerDaily => self.store.restore(line, spent.day),
                    BudgetScope::CallerMonthly => self.store.restore(line, spent.month),
                    BudgetScope::GlobalDaily | BudgetScope::Run => {}
                }
            }
        }
        if let Some(global) = self
            .lines("*", None, now)
            .iter()
            .find(|l| l.scope == BudgetScope::GlobalDaily)
        {
            self.store.restore(global, global_day);
        }
    }

    /// Settles the reservation of a call whose process stopped before it ended, to what its
    /// `interrupted` record bills. Called by whichever process records that call; the
    /// reservation would otherwise hold the budget until its window ends.
    pub fn settle_interrupted(&self, held: HeldSpend, actual: Cost) {
        self.counters
            .settled_pico
            .fetch_add(actual.0, Ordering::Relaxed);
        self.counters
            .interrupted_settled
            .fetch_add(1, Ordering::Relaxed);
        self.store.settle(held.lines.into(), held.reserved, actual);
    }

    /// Reserves `amount` on every budget of `caller` (and `run_id`), or refuses naming the first
    /// budget without room.
    pub async fn reserve(
        self: &Arc<Self>,
        caller: &str,
        run_id: Option<&str>,
        amount: Cost,
    ) -> Result<SpendHold, BudgetDenied> {
        let lines = self.lines(caller, run_id, SystemTime::now());
        match self.store.reserve(&lines, amount).await {
            Ok(()) => {
                self.store_up();
                self.counters
                    .reserved_pico
                    .fetch_add(amount.0, Ordering::Relaxed);
                Ok(SpendHold {
                    budgets: Arc::clone(self),
                    lines: Some(lines),
                    reserved: amount,
                    settled: false,
                })
            }
            Err(SpendError::Refused { index, state }) => {
                self.store_up();
                Err(self.refused(&lines, index, state, amount))
            }
            Err(SpendError::Unavailable(why)) => {
                self.store_down(&why);
                match self.on_unavailable {
                    OnUnavailable::FailClosed => Err(BudgetDenied::Unavailable(why)),
                    // Nothing was reserved, so there is nothing to settle.
                    OnUnavailable::FailOpen => Ok(SpendHold {
                        budgets: Arc::clone(self),
                        lines: None,
                        reserved: amount,
                        settled: false,
                    }),
                }
            }
        }
    }

    /// Whether a call of up to `amount` would fit now, without reserving anything: the routes
    /// ask before they start a stream, so a caller over budget gets a plain 429. The reservation
    /// before each attempt is what actually holds the limit. Returns the budgets' states.
    pub async fn check(
        &self,
        caller: &str,
        run_id: Option<&str>,
        amount: Cost,
    ) -> Result<Vec<BudgetView>, BudgetDenied> {
        let lines = self.lines(caller, run_id, SystemTime::now());
        let states = match self.store.read(&lines).await {
            Ok(states) => {
                self.store_up();
                states
            }
            Err(SpendError::Refused { .. }) => Vec::new(),
            Err(SpendError::Unavailable(why)) => return self.unanswered(why),
        };
        for (index, state) in states.iter().enumerate() {
            if let Some(limit) = state.limit
                && state
                    .spent
                    .0
                    .saturating_add(state.reserved.0)
                    .saturating_add(amount.0)
                    > limit.0
            {
                return Err(self.refused(&lines, index, *state, amount));
            }
        }
        Ok(views(&lines, states))
    }

    /// The store did not answer a check: refused or let through, as configured.
    pub(crate) fn unanswered(&self, why: String) -> Result<Vec<BudgetView>, BudgetDenied> {
        self.store_down(&why);
        match self.on_unavailable {
            OnUnavailable::FailClosed => Err(BudgetDenied::Unavailable(why)),
            OnUnavailable::FailOpen => Ok(Vec::new()),
        }
    }

    /// The store reserved `amount` on `lines` in a step of its own (admission's): the hold
    /// that settles it, and the lines' states as they were before it.
    pub(crate) fn reserved_at_admission(
        self: &Arc<Self>,
        lines: Arc<[SpendLine]>,
        states: Vec<LineState>,
        amount: Cost,
    ) -> (SpendHold, Vec<BudgetView>) {
        self.store_up();
        self.counters
            .reserved_pico
            .fetch_add(amount.0, Ordering::Relaxed);
        let views = views(&lines, states);
        let hold = SpendHold {
            budgets: Arc::clone(self),
            lines: Some(lines),
            reserved: amount,
            settled: false,
        };
        (hold, views)
    }

    /// The store answered a check (admission's one step) without reserving: the lines' states.
    pub(crate) fn answered_at_admission(
        &self,
        lines: &[SpendLine],
        states: Vec<LineState>,
    ) -> Vec<BudgetView> {
        self.store_up();
        views(lines, states)
    }

    /// The store found no room on line `index` at admission.
    pub(crate) fn refused_at_admission(
        &self,
        lines: &[SpendLine],
        index: usize,
        state: LineState,
        requested: Cost,
    ) -> BudgetDenied {
        self.store_up();
        self.refused(lines, index, state, requested)
    }

    /// A caller's day and month budgets, for the admin API.
    pub async fn caller_view(&self, caller: &str) -> Result<Vec<BudgetView>, SpendError> {
        let lines: Vec<SpendLine> = self
            .lines(caller, None, SystemTime::now())
            .iter()
            .filter(|l| l.scope != BudgetScope::GlobalDaily)
            .cloned()
            .collect();
        let states = self.store.read(&lines).await?;
        Ok(views(&lines, states))
    }

    /// The global daily budget now.
    pub async fn global_view(&self) -> Result<BudgetView, SpendError> {
        let lines: Vec<SpendLine> = self
            .lines("*", None, SystemTime::now())
            .iter()
            .filter(|l| l.scope == BudgetScope::GlobalDaily)
            .cloned()
            .collect();
        let states = self.store.read(&lines).await?;
        views(&lines, states)
            .pop()
            .ok_or_else(|| SpendError::Unavailable("the store returned no state".into()))
    }

    /// Sets a caller's own limits (an empty budget clears them) for every replica sharing the
    /// store.
    pub async fn set_caller(&self, caller: &str, budget: CallerBudget) -> Result<(), SpendError> {
        self.store.set_caller(caller, budget).await
    }

    /// Callers with limits of their own: the configuration file's, then the admin-set ones.
    pub async fn callers(&self) -> Result<BTreeMap<String, CallerBudget>, SpendError> {
        let mut all = self.limits.callers.clone();
        for (caller, budget) in self.store.callers().await? {
            let entry = all.entry(caller).or_default();
            entry.daily = budget.daily.or(entry.daily);
            entry.monthly = budget.monthly.or(entry.monthly);
        }
        Ok(all)
    }

    pub fn stats(&self) -> BudgetStats {
        let c = &self.counters;
        BudgetStats {
            refused: std::array::from_fn(|i| c.refused[i].load(Ordering::Relaxed)),
            unavailable: c.unavailable.load(Ordering::Relaxed),
            reserved: Cost(c.reserved_pico.load(Ordering::Relaxed)),
            settled: Cost(c.settled_pico.load(Ordering::Relaxed)),
            interrupted_settled: c.interrupted_settled.load(Ordering::Relaxed),
        }
    }

    fn refused(
        &self,
        lines: &[SpendLine],
        index: usize,
        state: LineState,
        requested: Cost,
    ) -> BudgetDenied {
        let Some(line) = lines.get(index) else {
            return BudgetDenied::Unavailable(format!(
                "the spend store named budget line {index} of {}",
                lines.len()
            ));
        };
        self.counters.refused[line.scope.index()].fetch_add(1, Ordering::Relaxed);
        tracing::info!(budget = %line.scope, subject = %line.subject, window = %line.window,
            spent = %state.spent, reserved = %state.reserved, requested = %requested, "budget refused a call");
        BudgetDenied::Exceeded(Box::new(BudgetRefusal {
            scope: line.scope,
            subject: line.subject.clone(),
            window: line.window.clone(),
            spent: state.spent,
            reserved: state.reserved,
            limit: state.limit.unwrap_or_default(),
            requested,
            resets_at: line.resets_at,
        }))
    }

    fn store_down(&self, why: &str) {
        self.counters.unavailable.fetch_add(1, Ordering::Relaxed);
        if !self.counters.down.swap(true, Ordering::Relaxed) {
            let action = match self.on_unavailable {
                OnUnavailable::FailClosed => "refusing model calls until it answers",
                OnUnavailable::FailOpen => "letting model calls through uncounted until it answers",
            };
            tracing::error!(store = %self.store.describe(), error = %why, "spend store unavailable: {action}");
        }
    }

    fn store_up(&self) {
        if self.counters.down.swap(false, Ordering::Relaxed) {
            tracing::warn!(store = %self.store.describe(), "spend store answers again: budgets are enforced");
        }
    }
}

fn views(lines: &[SpendLine], states: Vec<LineState>) -> Vec<BudgetView> {
    lines
        .iter()
        .zip(states)
        .map(|(line, state)| BudgetView {
            scope: line.scope,
            subject: line.subject.clone(),
            window: line.window.clone(),
            state,
            resets_at: line.resets_at,
        })
        .collect()
}

/// Whose money a call spends: the budgets, the caller and the run. Given to the router with
/// each call, which reserves against it before every attempt.
#[derive(Debug, Clone)]
pub struct SpendAccount {
    pub budgets: Arc<Budgets>,
    pub caller: String,
    pub run_id: Option<String>,
}

impl SpendAccount {
    pub async fn reserve(&self, amount: Cost) -> Result<SpendHold, BudgetDenied> {
        self.budgets
            .reserve(&self.caller, self.run_id.as_deref(), amount)
            .await
    }
}

/// Money reserved for one attempt. Settle it with the attempt's cost; dropped unsettled (which
/// the router never does) it settles as "cost the whole reservation".
#[derive(Debug)]
pub struct SpendHold {
    budgets: Arc<Budgets>,
    /// `None`: nothing was reserved (the store was down and budgets fail open).
    lines: Option<Arc<[SpendLine]>>,
    reserved: Cost,
    settled: bool,
}

impl SpendHold {
    pub fn reserved(&self) -> Cost {
        self.reserved
    }

    /// The reservation for the call's intent, when it outlives this process (a shared store;
    /// an in-process reservation ends with the process, so there is nothing to keep).
    pub fn held(&self) -> Option<HeldSpend> {
        let lines = self.lines.as_ref().filter(|l| !l.is_empty())?;
        self.budgets.store.outlives_process().then(|| HeldSpend {
            lines: lines.to_vec(),
            reserved: self.reserved,
        })
    }

    /// Replaces the reservation with what the attempt cost: the number its record bills.
    pub fn settle(mut self, actual: Cost) {
        self.finish(actual);
    }

    fn finish(&mut self, actual: Cost) {
        self.settled = true;
        self.budgets
            .counters
            .settled_pico
            .fetch_add(actual.0, Ordering::Relaxed);
        if let Some(lines) = self.lines.take().filter(|l| !l.is_empty()) {
            self.budgets.store.settle(lines, self.reserved, actual);
        }
    }
}

impl Drop for SpendHold {
    fn drop(&mut self) {
        if !self.settled {
            self.finish(self.reserved);
        }
    }
}

/// Parses a dollar amount (`25`, `0.50`, `1000.000001`) exactly into picodollars; at most 12
/// decimals, no sign, no exponent.
pub fn parse_usd(text: &str) -> Result<Cost, String> {
    let text = text.trim().trim_start_matches('$');
    let (whole, frac) = text.split_once('.').unwrap_or((text, ""));
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !(digits(whole) || (whole.is_empty() && digits(frac))) || !(frac.is_empty() || digits(frac))
    {
        return Err("expected a dollar amount such as 25 or 0.50".to_owned());
    }
    if frac.len() > 12 {
        return Err("more than 12 decimals (a picodollar is the smallest unit)".to_owned());
    }
    let whole: u64 = if whole.is_empty() {
        0
    } else {
        whole
            .parse()
            .map_err(|_| "too large an amount".to_owned())?
    };
    let frac_pico: u64 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<12}")
            .parse()
            .map_err(|_| "expected a dollar amount such as 25 or 0.50".to_owned())?
    };
    whole
        .checked_mul(1_000_000_000_000)
        .and_then(|p| p.checked_add(frac_pico))
        .map(Cost)
        .ok_or_else(|| "too large an amount (at most about $18 million)".to_owned())
}

/// What one attempt can cost at most: every byte of the prompt counted as a token (a token is
/// never shorter than a byte, whatever the tokenizer, so this bounds the input from above),
/// priced at the dearer of the input and cache-write prices, plus the output cap at the output
/// price. A tokenizer estimate could be short on punctuation-heavy text, and then N concurrent
/// calls could take a budget past its limit.
pub fn worst_case_cost(request: &ChatRequest, pricing: &Pricing) -> Cost {
    const FRAMING_TOKENS: u64 = 8;
    let bytes: u64 = request.system.as_deref().map_or(0, |s| s.len() as u64)
        + request
            .messages
            .iter()
            .map(|m| m.content.len() as u64 + FRAMING_TOKENS)
            .sum::<u64>()
        + request
            .response_schema
            .as_ref()
            .map_or(0, |s| json_len(&s.schema))
        + FRAMING_TOKENS;
    let input_price = pricing.input.0.max(pricing.cache_write.map_or(0, |p| p.0));
    Cost(
        input_price.saturating_mul(bytes).saturating_add(
            pricing
                .output
                .0
                .saturating_mul(u64::from(request.max_output_tokens)),
        ),
    )
}

/// The length of `value` as compact JSON, counted as it is written rather than built into a
/// string: an answer schema is a few KiB, and every attempt's worst case measures it.
fn json_len(value: &serde_json::Value) -> u64 {
    struct Count(u64);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len() as u64;
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Writing a `Value` to a sink that never fails cannot fail.
    let _ = serde_json::to_writer(&mut count, value);
    count.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_schema_is_measured_as_its_compact_json() {
        let schema = serde_json::json!({
            "type": "object",
            "properties": { "q\"uote": { "type": "string", "maxLength": 12, "x": 1.5 } },
            "required": ["a", "b"],
        });
        assert_eq!(json_len(&schema), schema.to_string().len() as u64);
    }

    fn usd(x: u64) -> Cost {
        Cost::from_micro_usd(x * 1_000_000)
    }

    #[tokio::test]
    async fn reservations_never_take_a_budget_past_its_limit() {
        let budgets = Arc::new(Budgets::in_process(BudgetLimits {
            caller_daily: Some(usd(10)),
            ..BudgetLimits::default()
        }));
        let mut holds = Vec::new();
        for _ in 0..3 {
            holds.push(budgets.reserve("alice", None, usd(3)).await.unwrap());
        }
        let BudgetDenied::Exceeded(refusal) =
            budgets.reserve("alice", None, usd(3)).await.unwrap_err()
        else {
            panic!("expected a refusal");
        };
        assert_eq!(refusal.scope, BudgetScope::CallerDaily);
        assert_eq!((refusal.spent, refusal.reserved), (Cost::ZERO, usd(9)));
        assert!(refusal.resets_at.is_some());
        // Another caller has a budget of its own.
        budgets
            .reserve("bob", None, usd(3))
            .await
            .unwrap()
            .settle(usd(1));
        // Settling to less than reserved frees the difference.
        holds.pop().unwrap().settle(usd(1));
        let view = budgets.caller_view("alice").await.unwrap();
        assert_eq!(view[0].state.spent, usd(1));
        assert_eq!(view[0].state.reserved, usd(6));
        assert_eq!(view[0].state.remaining(), Some(usd(3)));
        budgets
            .reserve("alice", None, usd(3))
            .await
            .unwrap()
            .settle(usd(3));
        assert_eq!(budgets.stats().refused[0], 1);
    }

    #[test]
    fn a_callers_calls_share_their_lines_for_a_minute_and_never_across_a_window() {
        let budgets = Budgets::in_process(BudgetLimits {
            run: Some(usd(1)),
            ..BudgetLimits::default()
        });
        let at = |s: &str| {
            let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                .unwrap();
            SystemTime::from(t)
        };
        let noon = at("2026-12-07T12:00:00Z");
        let first = budgets.lines("alice", None, noon);
        let same = |a: &Arc<[SpendLine]>, b: &Arc<[SpendLine]>| Arc::ptr_eq(a, b);
        assert!(same(
            &first,
            &budgets.lines("alice", None, noon + Duration::from_secs(59))
        ));
        assert!(!same(&first, &budgets.lines("bob", None, noon)));
        // A minute on, the list is built afresh (its `keep_for` counts from when it was built).
        let later = budgets.lines("alice", None, noon + Duration::from_secs(60));
        assert!(!same(&first, &later));
        assert_eq!(first[..], budgets.build_lines("alice", None, noon)[..]);
        // A run's line names the run: such lists are not shared.
        let run = budgets.lines("alice", Some("r1"), noon);
        assert_eq!(run.len(), 4);
        assert_eq!(run[3].key, "run:r1");
        assert!(!same(&run, &budgets.lines("alice", Some("r1"), noon)));
        // Seconds before midnight the list is fresh, but not past it: the day line is a new one.
        let before = budgets.lines("carol", None, at("2026-12-07T23:59:30Z"));
        let after = budgets.lines("carol", None, at("2026-12-08T00:00:10Z"));
        assert_eq!(before[0].window, "2026-12-07");
        assert_eq!(after[0].window, "2026-12-08");
        // A clock stepped back builds afresh too.
        let earlier = budgets.lines("alice", None, noon - Duration::from_secs(1));
        assert!(!same(&earlier, &later));
    }

    #[tokio::test]
    async fn admin_limits_replace_the_configured_ones_and_runs_have_their_own() {
        let mut callers = BTreeMap::new();
        callers.insert(
            "vip".to_owned(),
            CallerBudget {
                daily: Some(usd(100)),
                monthly: None,
            },
        );
        let budgets = Arc::new(Budgets::in_process(BudgetLimits {
            caller_daily: Some(usd(1)),
            run: Some(usd(5)),
            callers,
            ..BudgetLimits::default()
        }));
        budgets
            .reserve("vip", None, usd(50))
            .await
            .unwrap()
            .settle(usd(50));
        budgets
            .set_caller(
                "vip",
                CallerBudget {
                    daily: Some(usd(60)),
                    monthly: None,
                },
            )
            .await
            .unwrap();
        assert!(budgets.reserve("vip", None, usd(20)).await.is_err());
        assert_eq!(budgets.callers().await.unwrap()["vip"].daily, Some(usd(60)));
        let BudgetDenied::Exceeded(refusal) = budgets
            .reserve("vip", Some("run-1"), usd(6))
            .await
            .unwrap_err()
        else {
            panic!("expected a refusal");
        };
        assert_eq!(refusal.scope, BudgetScope::Run);
        assert_eq!(refusal.resets_at, None);
    }

    #[tokio::test]
    async fn a_dropped_hold_keeps_its_reservation_as_spent() {
        let budgets = Arc::new(Budgets::in_process(BudgetLimits {
            global_daily: Some(usd(10)),
            ..BudgetLimits::default()
        }));
        drop(budgets.reserve("a", None, usd(4)).await.unwrap());
        let global = budgets.global_view().await.unwrap();
        assert_eq!(
            (global.state.spent, global.state.reserved),
            (usd(4), Cost::ZERO)
        );
        assert!(budgets.check("b", None, usd(7)).await.is_err());
        assert!(budgets.check("b", None, usd(6)).await.is_ok());
    }

    #[test]
    fn dollar_amounts_parse_exactly() {
        assert_eq!(parse_usd("25"), Ok(usd(25)));
        assert_eq!(parse_usd("0.50"), Ok(Cost(500_000_000_000)));
        assert_eq!(parse_usd("$.000000000001"), Ok(Cost(1)));
        for bad in ["", "-1", "1e3", "1.2.3", "0.0000000000001", "abc"] {
            assert!(parse_usd(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_worst_case_bounds_input_by_bytes_and_output_by_the_cap() {
        let pricing = Pricing {
            input: crate::cost::Price(3_000_000),
            cached_input: crate::cost::Price(300_000),
            cache_write: Some(crate::cost::Price(3_750_000)),
            output: crate::cost::Price(15_000_000),
        };
        let request = ChatRequest {
            model: "m".into(),
            system: Some("be brief".into()),
            messages: vec![crate::provider::ChatMessage::user("hello")],
            max_output_tokens: 100,
            temperature: None,
            response_schema: None,
        };
        // 8 + (5 + 8) + 8 = 29 tokens at the cache-write price, 100 at the output price.
        assert_eq!(
            worst_case_cost(&request, &pricing),
            Cost(29 * 3_750_000 + 100 * 15_000_000)
        );
    }
}
