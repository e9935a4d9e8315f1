//! The budget lines of recent callers, shared by their calls.
//!
//! A call's lines depend only on its caller, the configured limits and the windows open now,
//! yet building them costs two calendar conversions and a handful of strings, and a streaming
//! call holds them (its reservation) for as long as it streams: about a kilobyte per open
//! stream, the same kilobyte for every call of one caller. Here the calls of one caller share
//! one list for up to [`FRESH_FOR`], never past the end of a window the list names.
//!
//! The price of sharing: a line's `keep_for` (how long its counter is kept after a use) was
//! measured from when the list was built, so a counter may be kept up to [`FRESH_FOR`] longer
//! than it would otherwise. It is kept two days past its window either way.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use super::SpendLine;

/// How long one list serves a caller's calls.
pub(super) const FRESH_FOR: Duration = Duration::from_secs(60);

/// How many callers are remembered; a full table starts over (callers are API keys, so this is
/// reached only by a deployment with thousands of them, which then rebuilds a list a minute).
const MAX_CALLERS: usize = 4096;

#[derive(Debug, Default)]
pub(super) struct RecentLines {
    by_caller: RwLock<HashMap<String, Recent>>,
}

#[derive(Debug)]
struct Recent {
    built: SystemTime,
    until: SystemTime,
    lines: Arc<[SpendLine]>,
}

impl RecentLines {
    /// `caller`'s list, if one was built at most [`FRESH_FOR`] before `now` and in the windows
    /// `now` falls in.
    pub(super) fn get(&self, caller: &str, now: SystemTime) -> Option<Arc<[SpendLine]>> {
        let table = self
            .by_caller
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let recent = table.get(caller)?;
        // A clock stepped back makes `now` earlier than `built`: build afresh.
        (recent.built <= now && now < recent.until).then(|| Arc::clone(&recent.lines))
    }

    /// Keeps `lines`, built at `now`, for `caller`'s next calls.
    pub(super) fn keep(&self, caller: &str, lines: &Arc<[SpendLine]>, now: SystemTime) {
        let ends = lines.iter().filter_map(|l| l.resets_at).min();
        let fresh = now.checked_add(FRESH_FOR).unwrap_or(now);
        let until = ends.map_or(fresh, |end| end.min(fresh));
        let recent = Recent {
            built: now,
            until,
            lines: Arc::clone(lines),
        };
        let mut table = self
            .by_caller
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(slot) = table.get_mut(caller) {
            *slot = recent;
            return;
        }
        if table.len() >= MAX_CALLERS {
            table.clear();
        }
        table.insert(caller.to_owned(), recent);
    }
}
