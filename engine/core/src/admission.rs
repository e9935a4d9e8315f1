//! Admission of a request that opens model calls: the caller's limit and the dollar budgets,
//! asked before any stream starts. Where the limits and budgets live in a shared store (Redis),
//! one step also reserves the first call's dollars and its provider's per-minute budget, and
//! hands those reservations to that call's first attempt ([`FirstCall`]): every check of a
//! shared store is a network round trip, and without this a request waited on two of them (the
//! admission, then the attempt's reservations) before its first token.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use futures::future::BoxFuture;

use crate::budgets::{BudgetDenied, BudgetView, LineState, SpendHold, SpendLine};
use crate::cost::Cost;
use crate::limits::{
    Allowance, BudgetExceeded, CallerLimited, LimitsUnavailable, ProviderHold, ProviderRates, Rate,
};
use crate::stream::ProviderKind;

/// Everything a request takes from a shared store before its first call, asked in one step.
#[derive(Debug, Clone, Copy)]
pub struct AdmitAsk<'a> {
    pub caller: &'a str,
    pub endpoint: &'a str,
    /// The caller's limit on `endpoint`, when callers are limited.
    pub rate: Option<Rate>,
    /// The budget lines the first call counts against and its worst-case cost, when the
    /// engine has dollar budgets.
    pub spend: Option<(&'a [SpendLine], Cost)>,
    /// The first call's provider, its per-minute budgets and the tokens to reserve, when
    /// provider budgets are kept in the store.
    pub provider: Option<(ProviderKind, ProviderRates, u64)>,
}

/// What the store decided, in the order it decides: the caller's limit, then the budgets,
/// then the provider. A refusal stops there; nothing after it is taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdmitAnswer {
    /// The caller's limit has no room; nothing was taken.
    Limited(CallerLimited),
    /// Budget line `index` has no room for the first call (its state given); the caller's
    /// request was taken, nothing was reserved.
    OverBudget {
        allowance: Option<Allowance>,
        index: usize,
        state: LineState,
    },
    /// Admitted. `states` are the budget lines before this request's reservation. When the
    /// provider refused, the dollars were not reserved either (the first call goes elsewhere
    /// or nowhere, and reserves for itself).
    Admitted {
        allowance: Option<Allowance>,
        states: Vec<LineState>,
        provider: Option<Result<(), BudgetExceeded>>,
    },
}

/// A shared store that can take a caller's request and reserve a first call's dollars and
/// provider budget in one atomic step (one round trip).
pub trait SharedAdmission: Send + Sync + 'static {
    fn admit<'a>(
        &'a self,
        ask: AdmitAsk<'a>,
    ) -> BoxFuture<'a, Result<AdmitAnswer, LimitsUnavailable>>;
}

/// The outcome of [`Engine::admit`](crate::Engine::admit): the caller's limit (with what is
/// left of it, for `x-ratelimit-*` headers), then the budgets (their states, for `x-budget-*`).
/// When the caller is limited the budgets were not asked.
#[derive(Debug)]
pub struct Admission {
    pub allowance: Result<Allowance, CallerLimited>,
    pub budgets: Result<Vec<BudgetView>, BudgetDenied>,
}

/// The first call a request makes, for [`Engine::admit`](crate::Engine::admit) to price (its
/// primary model's worst case) and, with a shared store, to reserve for.
#[derive(Debug, Clone, Copy)]
pub enum FirstCallOf<'a> {
    /// An agent on its input (Magic Spark for a pipeline).
    Agent(agents::Process, &'a serde_json::Value),
    /// A chat call.
    Chat(&'a crate::CallTarget, &'a crate::RouteRequest),
}

/// How often reservations made at admission were used by the first attempt, or returned
/// because that attempt went to another model (or never happened).
#[derive(Debug, Default)]
pub(crate) struct PrepaidCounters {
    used: AtomicU64,
    returned: AtomicU64,
}

/// What `/metrics` shows of reservations made at admission.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrepaidStats {
    pub used: u64,
    pub returned: u64,
}

impl PrepaidCounters {
    pub(crate) fn stats(&self) -> PrepaidStats {
        PrepaidStats {
            used: self.used.load(Ordering::Relaxed),
            returned: self.returned.load(Ordering::Relaxed),
        }
    }
}

/// Reservations made at admission for one model's first attempt.
pub(crate) struct Prepaid {
    pub(crate) model: String,
    /// The worst case reserved on the budgets, and the provider tokens reserved: the attempt
    /// uses them only if its own figures are the same.
    pub(crate) amount: Cost,
    pub(crate) tokens: u64,
    spend: Option<SpendHold>,
    provider: Option<Result<ProviderHold, BudgetExceeded>>,
    counters: Arc<PrepaidCounters>,
}

impl Prepaid {
    pub(crate) fn new(
        model: String,
        amount: Cost,
        tokens: u64,
        spend: Option<SpendHold>,
        provider: Option<Result<ProviderHold, BudgetExceeded>>,
        counters: Arc<PrepaidCounters>,
    ) -> Prepaid {
        Prepaid {
            model,
            amount,
            tokens,
            spend,
            provider,
            counters,
        }
    }

    /// The dollar hold and the provider's answer, for the attempt to use as its own.
    pub(crate) fn take(
        mut self,
    ) -> (
        Option<SpendHold>,
        Option<Result<ProviderHold, BudgetExceeded>>,
    ) {
        self.counters.used.fetch_add(1, Ordering::Relaxed);
        (self.spend.take(), self.provider.take())
    }
}

impl Drop for Prepaid {
    /// Unused: nothing was called with these reservations, so they settle to nothing.
    fn drop(&mut self) {
        let spend = self.spend.take();
        let provider = self.provider.take();
        if spend.is_none() && provider.is_none() {
            return;
        }
        self.counters.returned.fetch_add(1, Ordering::Relaxed);
        if let Some(hold) = spend {
            hold.settle(Cost::ZERO);
        }
        if let Some(Ok(hold)) = provider {
            hold.settle(0);
        }
    }
}

/// The slot a request's reservations made at admission wait in, carried by its
/// [`CallContext`](crate::CallContext) (every clone shares it). The first attempt of the first
/// call takes it, whichever model that attempt goes to; what it does not use is returned.
#[derive(Clone, Default)]
pub struct FirstCall(Option<Arc<Mutex<Option<Prepaid>>>>);

impl FirstCall {
    pub(crate) fn holding(prepaid: Prepaid) -> FirstCall {
        FirstCall(Some(Arc::new(Mutex::new(Some(prepaid)))))
    }

    pub(crate) fn take(&self) -> Option<Prepaid> {
        self.0
            .as_ref()?
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// Whether reservations are waiting (tests).
    pub fn is_waiting(&self) -> bool {
        self.0.as_ref().is_some_and(|slot| {
            slot.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_some()
        })
    }
}

impl fmt::Debug for FirstCall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.is_waiting() {
            "FirstCall(prepaid)"
        } else {
            "FirstCall(none)"
        })
    }
}

/// Contexts compare by who and what they are for; two slots are equal only if they are one.
impl PartialEq for FirstCall {
    fn eq(&self, other: &FirstCall) -> bool {
        match (&self.0, &other.0) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl Eq for FirstCall {}
