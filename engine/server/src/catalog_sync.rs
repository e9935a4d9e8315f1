//! Keeps an engine on the model catalog version the store says is active, without a restart.
//!
//! Every poll interval a [`CatalogSync`] makes one cheap keyed read of the active pointer; only
//! when it names another version (or the same one activated again) is that version read, parsed
//! by this binary and swapped into the engine atomically — calls in flight finish on the version
//! they started with. An admin activation on this replica applies at once through
//! [`CatalogSync::apply`]. A version this replica cannot load (it does not parse with this
//! binary, or it would route a process to a provider that has no key here) leaves the replica on
//! its last good version, logs an error and raises one `catalog_load` alert per version.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use keyvex_engine::clock::now_ms;
use keyvex_engine::{Catalog, Engine};
use keyvex_store::catalog_store::ActiveVersion;
use keyvex_store::{Alert, CatalogStoreError, CatalogVersions, Tracker};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

/// What one look at the active version did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "camelCase")]
pub enum Applied {
    /// The engine already runs the active version.
    Unchanged { version: u64 },
    /// The engine switched; calls opened from now on use `to`.
    Switched { from: u64, to: u64 },
    /// The active version cannot be loaded here; the engine stays on `kept`.
    Refused {
        version: u64,
        kept: u64,
        reason: String,
    },
}

/// A version this replica refused, remembered so it is alerted once, not every interval.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RefusedVersion {
    pub version: u64,
    pub activated_at_ms: u64,
    pub reason: String,
}

/// Follows the store's active catalog version for one engine. Cheap to clone.
#[derive(Clone)]
pub struct CatalogSync {
    inner: Arc<Inner>,
}

struct Inner {
    versions: CatalogVersions,
    engine: Engine,
    tracker: Tracker,
    /// Version 0: the catalog the engine was built with.
    base: Catalog,
    interval: Duration,
    /// One look at a time (the poller and an admin activation may race); never held by calls.
    applying: tokio::sync::Mutex<()>,
    refused: Mutex<Option<RefusedVersion>>,
    /// Whether the last poll failed, so a store outage is logged once, not every interval.
    failing: Mutex<bool>,
}

impl CatalogSync {
    /// Follows `versions` for `engine`, whose catalog now is version 0 (the one it was built
    /// with); alerts go through `tracker`; `interval` is the time between two polls.
    pub fn new(
        versions: CatalogVersions,
        engine: Engine,
        tracker: Tracker,
        interval: Duration,
    ) -> CatalogSync {
        let base = engine.catalog().as_ref().clone().as_version(0, None);
        CatalogSync {
            inner: Arc::new(Inner {
                versions,
                engine,
                tracker,
                base,
                interval,
                applying: tokio::sync::Mutex::new(()),
                refused: Mutex::new(None),
                failing: Mutex::new(false),
            }),
        }
    }

    pub fn versions(&self) -> &CatalogVersions {
        &self.inner.versions
    }

    /// Version 0: the catalog this process started with.
    pub fn base(&self) -> &Catalog {
        &self.inner.base
    }

    pub fn interval(&self) -> Duration {
        self.inner.interval
    }

    /// The version this replica refused last, while it is still the active one.
    pub fn refused(&self) -> Option<RefusedVersion> {
        self.inner
            .refused
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// One poll: a keyed read of the active pointer, then [`CatalogSync::apply`].
    pub async fn refresh(&self) -> Result<Applied, CatalogStoreError> {
        let active = self.inner.versions.active().await?;
        Ok(self.apply(&active).await)
    }

    /// Puts the version `active` names in force on this engine, unless it already is or was
    /// refused here before.
    pub async fn apply(&self, active: &ActiveVersion) -> Applied {
        let inner = &self.inner;
        let _one_at_a_time = inner.applying.lock().await;
        let current = inner.engine.catalog();
        let activated_at = (active.activated_at_ms > 0).then_some(active.activated_at_ms);
        if current.version() == active.version && current.activated_at_ms() == activated_at {
            self.set_refused(None);
            return Applied::Unchanged {
                version: active.version,
            };
        }
        if let Some(refused) = self.refused()
            && refused.version == active.version
            && refused.activated_at_ms == active.activated_at_ms
        {
            return Applied::Refused {
                version: refused.version,
                kept: current.version(),
                reason: refused.reason,
            };
        }
        let loaded = match inner.versions.load(active.version, &inner.base).await {
            Ok(catalog) => catalog.as_version(active.version, activated_at),
            Err(e) => return self.refuse(active, current.version(), e.to_string()),
        };
        match inner.engine.swap_catalog(loaded) {
            Ok(previous) => {
                self.set_refused(None);
                tracing::info!(
                    version = active.version,
                    previous = previous.version(),
                    activated_by = %active.activated_by,
                    "model catalog version in force; calls in flight finish on the one they started with"
                );
                Applied::Switched {
                    from: previous.version(),
                    to: active.version,
                }
            }
            Err(refused) => {
                let reason = refused.problems.join("; ");
                self.refuse(active, refused.kept, reason)
            }
        }
    }

    fn set_refused(&self, refused: Option<RefusedVersion>) {
        *self
            .inner
            .refused
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = refused;
    }

    fn refuse(&self, active: &ActiveVersion, kept: u64, reason: String) -> Applied {
        tracing::error!(
            version = active.version,
            kept,
            %reason,
            "model catalog version could not be loaded on this replica; staying on the last good version"
        );
        let alert = Alert::catalog_load(active.version, kept, &reason, now_ms());
        // The alert commits in the background; nobody waits for it here.
        drop(self.inner.tracker.raise_alert(alert));
        self.set_refused(Some(RefusedVersion {
            version: active.version,
            activated_at_ms: active.activated_at_ms,
            reason: reason.clone(),
        }));
        Applied::Refused {
            version: active.version,
            kept,
            reason,
        }
    }

    /// Polls every interval until `cancel`; store errors are logged (once per outage) and the
    /// engine keeps its version.
    pub async fn run(self, cancel: CancellationToken) {
        let mut ticks = tokio::time::interval(self.inner.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                _ = ticks.tick() => {}
            }
            let result = self.refresh().await;
            let mut failing = self
                .inner
                .failing
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            match result {
                Ok(_) if *failing => {
                    *failing = false;
                    tracing::info!("the active model catalog version can be read again");
                }
                Ok(_) => {}
                Err(error) if !*failing => {
                    *failing = true;
                    tracing::warn!(%error, "could not read the active model catalog version; keeping the one in force and retrying every interval");
                }
                Err(_) => {}
            }
        }
    }
}
