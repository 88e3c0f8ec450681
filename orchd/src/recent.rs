//! What the daemon remembers about individual jobs between their events (a job's type, when it
//! was enqueued), in bounded memory: values are kept per run of consecutive job ids, so a batch
//! of a thousand jobs enqueued together costs one entry, and the oldest runs are forgotten past
//! a fixed number of runs. Whatever is forgotten can be read again from the ledger.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use orch_core::JobId;

/// A value per job id, stored as runs of consecutive ids that share it, at most `max_runs` runs
/// (the lowest ids go first).
#[derive(Debug)]
pub struct JobRuns<V> {
    /// First id of a run → (last id of the run, its value).
    runs: BTreeMap<JobId, (JobId, V)>,
    max_runs: usize,
}

impl<V: Clone + PartialEq> JobRuns<V> {
    /// An empty map that keeps at most `max_runs` runs (at least one).
    pub fn new(max_runs: usize) -> Self {
        JobRuns { runs: BTreeMap::new(), max_runs: max_runs.max(1) }
    }

    /// The value of `id`, if it is remembered.
    pub fn get(&self, id: JobId) -> Option<&V> {
        let (_, (last, value)) = self.runs.range(..=id).next_back()?;
        (id <= *last).then_some(value)
    }

    /// Sets the value of `id`. Extends the run just before it when that run ends at `id - 1`
    /// with the same value (the usual case: ids are handed out in increasing order), and splits
    /// a run that holds `id` with another value.
    pub fn insert(&mut self, id: JobId, value: V) {
        if let Some((&first, (last, old))) = self.runs.range_mut(..=id).next_back() {
            if id <= *last {
                if *old == value {
                    return;
                }
                let (last, old) = (*last, old.clone());
                self.runs.remove(&first);
                if first < id {
                    self.runs.insert(first, (id - 1, old.clone()));
                }
                if id < last {
                    self.runs.insert(id + 1, (last, old));
                }
            } else if last.checked_add(1) == Some(id) && *old == value {
                *last = id;
                return;
            }
        }
        self.runs.insert(id, (id, value));
        while self.runs.len() > self.max_runs {
            self.runs.pop_first();
        }
    }

    /// How many runs are kept.
    pub fn runs(&self) -> usize {
        self.runs.len()
    }
}

/// One shared copy of each distinct string (job types, queue names), at most `max` of them; past
/// that the set starts over (copies already handed out stay valid).
#[derive(Debug)]
pub struct Interner {
    set: HashSet<Arc<str>>,
    max: usize,
}

impl Interner {
    /// An interner of at most `max` strings.
    pub fn new(max: usize) -> Interner {
        Interner { set: HashSet::new(), max: max.max(1) }
    }

    /// The shared copy of `s`.
    pub fn get(&mut self, s: &str) -> Arc<str> {
        if let Some(a) = self.set.get(s) {
            return a.clone();
        }
        if self.set.len() >= self.max {
            self.set = HashSet::new();
        }
        let a: Arc<str> = Arc::from(s);
        self.set.insert(a.clone());
        a
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    #[test]
    fn a_batch_is_one_run() {
        let mut m = JobRuns::new(10);
        for id in 1..=1_000 {
            m.insert(id, "ingest");
        }
        for id in 1_001..=1_500 {
            m.insert(id, "render");
        }
        assert_eq!(m.runs(), 2);
        assert_eq!(m.get(0), None);
        assert_eq!(m.get(1), Some(&"ingest"));
        assert_eq!(m.get(1_000), Some(&"ingest"));
        assert_eq!(m.get(1_001), Some(&"render"));
        assert_eq!(m.get(1_501), None);
    }

    #[test]
    fn the_oldest_runs_are_forgotten_past_the_bound() {
        let mut m = JobRuns::new(3);
        for id in 1..=10 {
            m.insert(id, id % 2);
        }
        assert_eq!(m.runs(), 3);
        assert_eq!(m.get(7), None);
        assert_eq!(m.get(8), Some(&0));
        assert_eq!(m.get(10), Some(&0));
    }

    proptest! {
        /// Invariant: whatever is remembered is the last value set for that id, the bound on
        /// runs holds, and with room enough nothing is forgotten.
        #[test]
        fn remembers_the_last_value_set(ops in proptest::collection::vec((0i64..40, 0u8..3), 0..200), max in 1usize..50) {
            let mut m = JobRuns::new(max);
            let mut truth = HashMap::new();
            for (id, v) in &ops {
                m.insert(*id, *v);
                truth.insert(*id, *v);
                prop_assert!(m.runs() <= max);
            }
            for id in -1i64..41 {
                match m.get(id) {
                    Some(v) => prop_assert_eq!(Some(v), truth.get(&id)),
                    None => prop_assert!(max < 40 || !truth.contains_key(&id)),
                }
            }
        }
    }

    #[test]
    fn interned_strings_are_shared() {
        let mut i = Interner::new(2);
        let a = i.get("ingest");
        assert!(Arc::ptr_eq(&a, &i.get("ingest")));
        i.get("render");
        i.get("third");
        assert_eq!(&*i.get("ingest"), "ingest");
    }
}
