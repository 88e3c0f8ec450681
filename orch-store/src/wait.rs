//! Store calls that must not wait. A thread that serves many callers (an async runtime's worker)
//! may run a store call in place, without the hop to a blocking pool, only if the call cannot
//! wait on anything: another call's transaction, another process's write lock, a lock of the
//! caller's. Under [`without_waiting`], a store call that would wait fails at once with
//! [`StoreError::WouldWait`] instead, having written nothing (a failed call never writes), and
//! the caller runs it again where waiting is allowed.

use std::cell::Cell;
use std::sync::{Mutex, MutexGuard, TryLockError};

use crate::StoreError;

thread_local! {
    static NO_WAIT: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with every store call it makes on this thread told not to wait.
pub fn without_waiting<T>(f: impl FnOnce() -> T) -> T {
    /// Puts the flag back as it was, panic or not.
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            NO_WAIT.set(self.0);
        }
    }
    let _restore = Restore(NO_WAIT.replace(true));
    f()
}

/// Whether a call on this thread may wait (it is not inside [`without_waiting`]).
pub fn allowed() -> bool {
    !NO_WAIT.get()
}

/// Locks `m`; inside [`without_waiting`], only if no one holds it, else [`StoreError::WouldWait`].
/// A poisoned lock is taken as it is: its holder's transaction was rolled back.
pub fn lock<T>(m: &Mutex<T>) -> Result<MutexGuard<'_, T>, StoreError> {
    if allowed() {
        return Ok(m.lock().unwrap_or_else(|p| p.into_inner()));
    }
    match m.try_lock() {
        Ok(guard) => Ok(guard),
        Err(TryLockError::Poisoned(p)) => Ok(p.into_inner()),
        Err(TryLockError::WouldBlock) => Err(StoreError::WouldWait),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_holds_inside_and_is_restored_after_a_panic() {
        assert!(allowed());
        without_waiting(|| {
            assert!(!allowed());
            without_waiting(|| assert!(!allowed()));
            assert!(!allowed(), "a nested call leaves the outer flag set");
        });
        assert!(allowed());
        let _ = std::panic::catch_unwind(|| without_waiting(|| panic!("in a call")));
        assert!(allowed(), "a panic puts the flag back");
    }

    #[test]
    fn lock_waits_only_where_allowed() {
        let m = Mutex::new(1);
        let held = m.lock().unwrap();
        assert!(matches!(without_waiting(|| lock(&m)), Err(StoreError::WouldWait)));
        drop(held);
        assert_eq!(*without_waiting(|| lock(&m)).unwrap(), 1);
        assert_eq!(*lock(&m).unwrap(), 1);
    }
}
