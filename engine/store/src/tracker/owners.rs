//! Which processes are using a ledger right now. Every tracker writes its call intents under an
//! owner id of its own and holds an exclusive OS lock (`flock`) on a file named after that id,
//! next to the ledger (`<ledger>.owners/<id>.lock`), for as long as it runs. The kernel drops
//! the lock when the process ends, however it ends (`kill -9` and panics included), so a lock
//! that can be taken means its owner is gone and its open intents are calls nobody will record:
//! taking the lock is the right to adopt them. No clock or heartbeat is involved, so a process
//! that is merely slow is never mistaken for a dead one; several processes (a server, a worker,
//! one-shot commands) can share one ledger.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

/// A held owner lock: ours for as long as the tracker runs, or a gone owner's while its intents
/// are adopted.
#[derive(Debug)]
pub(crate) struct OwnerLock {
    id: String,
    path: PathBuf,
    /// Holding the file holds the lock; dropping it lets go.
    _file: File,
}

/// The directory of the owner locks of the ledger at `ledger`.
pub(crate) fn owners_dir(ledger: &Path) -> PathBuf {
    let mut name = ledger
        .file_name()
        .map_or_else(|| "ledger".into(), ToOwned::to_owned);
    name.push(".owners");
    ledger.with_file_name(name)
}

/// Owner ids are UUIDs; anything else read back from the ledger is never made into a path.
fn is_owner_id(id: &str) -> bool {
    id.len() == 36 && id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

impl OwnerLock {
    /// Draws a new owner id for this process and locks its file.
    pub(crate) fn claim(ledger: &Path) -> io::Result<OwnerLock> {
        let dir = owners_dir(ledger);
        std::fs::create_dir_all(&dir)?;
        let id = uuid::Uuid::now_v7().to_string();
        match OwnerLock::take(&dir, &id)? {
            Some(lock) => Ok(lock),
            None => Err(io::Error::other(format!(
                "the new owner lock {} is held by another process",
                dir.join(&id).display()
            ))),
        }
    }

    /// Takes the lock of owner `id` of the ledger at `ledger` if no process holds it (its owner
    /// is gone); `None` while its owner runs, or for an id that is not an owner id.
    pub(crate) fn take_if_gone(ledger: &Path, id: &str) -> io::Result<Option<OwnerLock>> {
        if !is_owner_id(id) {
            tracing::warn!(
                owner = id,
                "call intents with an owner that is not an owner id are left alone"
            );
            return Ok(None);
        }
        let dir = owners_dir(ledger);
        std::fs::create_dir_all(&dir)?;
        OwnerLock::take(&dir, id)
    }

    fn take(dir: &Path, id: &str) -> io::Result<Option<OwnerLock>> {
        let path = dir.join(format!("{id}.lock"));
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        // `flock`, not `fcntl` locks: those belong to the process, so a second tracker in the
        // same process would take its own owner's lock and adopt a live owner's intents.
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(Some(OwnerLock {
                id: id.to_owned(),
                path,
                _file: file,
            })),
            Err(rustix::io::Errno::WOULDBLOCK) => Ok(None),
            Err(err) => Err(err.into()),
        }
    }

    pub(crate) fn id(&self) -> &str {
        &self.id
    }

    /// The owner is done with (its intents adopted, or its tracker shut down cleanly): removes
    /// its file, then lets go of the lock.
    pub(crate) fn retire(self) {
        if let Err(err) = std::fs::remove_file(&self.path)
            && err.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.path.display(), error = %err, "could not remove an owner lock file");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_lock_cannot_be_taken_and_a_released_one_can() {
        let dir = std::env::temp_dir().join(format!("keyvex-owners-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        let ledger = dir.join("ledger.sqlite3");
        let mine = OwnerLock::claim(&ledger).unwrap();
        assert!(
            owners_dir(&ledger)
                .join(format!("{}.lock", mine.id()))
                .exists()
        );
        // Another open file description (another process, or another tracker here) is refused.
        assert!(
            OwnerLock::take_if_gone(&ledger, mine.id())
                .unwrap()
                .is_none()
        );
        let id = mine.id().to_owned();
        drop(mine);
        let taken = OwnerLock::take_if_gone(&ledger, &id).unwrap().unwrap();
        taken.retire();
        assert!(!owners_dir(&ledger).join(format!("{id}.lock")).exists());
        // A gone owner whose file is gone too (retired by another adopter) can be taken.
        assert!(OwnerLock::take_if_gone(&ledger, &id).unwrap().is_some());
        assert!(
            OwnerLock::take_if_gone(&ledger, "../../etc/passwd")
                .unwrap()
                .is_none()
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
