//! Fork-join with the calling thread taking part: the caller and `helpers` pool threads
//! take an op's tasks from a shared queue, and wait for each other a while without
//! sleeping.
//!
//! rayon's own entry from a thread outside the pool (`ThreadPool::install`) parks the
//! caller until the pool's threads are done, so every op pays two wake-ups (the pool's,
//! then the caller's), and with as many pool threads as cores the parked caller is a
//! thread too many. Here the caller is one of the op's threads: with `threads - 1`
//! helpers an op runs on as many threads as the pool has, the caller starts at once, and
//! a helper that is late (asleep) only takes fewer tasks. A helper that has run out of
//! tasks waits until the fork-join's last task is done, and the caller waits for the
//! helpers, so that back-to-back fork-joins (an op's two passes, a stream of ops) find
//! each other awake instead of paying a wake-up each.
//!
//! Results come back in task order, whoever ran each task, so an op's results do not
//! depend on scheduling.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How long the caller waits (`spin_while`) for helpers still running a task before it
/// blocks (a blocked caller costs a wake-up to resume).
const SPIN_FOR: Duration = Duration::from_micros(200);

/// How long a helper that has run out of tasks waits (`spin_while`) until the fork-join's
/// last task is done (then it returns to the pool, which spins a little before it sleeps).
const LINGER_FOR: Duration = Duration::from_millis(1);

/// The order in which each participant takes the tasks of its segment (see [`Queue`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Order {
    /// From the segment's first task to its last: a first pass over the data.
    Forward,
    /// From the segment's last task to its first: a second pass over data that a first
    /// pass walked forward, so that each thread starts where the data most recently
    /// touched, the most likely still in the caches, lies. When an op's inputs outgrow the
    /// last-level cache, a second forward pass finds none of them there (the first pass's
    /// start was evicted by its end), a backward one finds its first tasks' data there.
    Backward,
}

/// `f(k, item k)` for every item, results in order into `out` (cleared first), on the
/// calling thread and `helpers` threads of `pool` (rayon's global pool for `None`), each
/// thread taking the tasks of its segment in `order` (so does the calling thread alone).
pub(crate) fn fork_join<I: Send, R: Send>(
    pool: Option<&rayon::ThreadPool>,
    helpers: usize,
    (items, order): (impl Iterator<Item = I> + Send, Order),
    f: impl Fn(usize, I) -> R + Sync,
    out: &mut Vec<R>,
) {
    out.clear();
    if helpers == 0 {
        match order {
            Order::Forward => out.extend(items.enumerate().map(|(k, i)| f(k, i))),
            Order::Backward => {
                let items: Vec<I> = items.collect();
                let mut done: Vec<R> = items.into_iter().enumerate().rev().map(|(k, i)| f(k, i)).collect();
                done.reverse();
                out.extend(done);
            }
        }
        return;
    }
    let queue = Queue::new(items, helpers + 1, order);
    let shared = Shared {
        left: AtomicUsize::new(queue.items.len()),
        queue: Mutex::new(queue),
        theirs: Mutex::new(Vec::new()),
        busy: AtomicUsize::new(0),
        f,
    };
    let shared = &shared;
    let mine = match pool {
        Some(p) => p.in_place_scope(|s| share(s, helpers, shared)),
        None => rayon::in_place_scope(|s| share(s, helpers, shared)),
    };
    let mut all = std::mem::take(&mut *lock(&shared.theirs));
    all.extend(mine);
    all.sort_unstable_by_key(|(k, _)| *k);
    out.extend(all.into_iter().map(|(_, r)| r));
}

/// What the participants of one fork-join share.
struct Shared<I, R, F> {
    queue: Mutex<Queue<I>>,
    /// the helpers' results
    theirs: Mutex<Vec<(usize, R)>>,
    /// helpers that have started and not yet returned
    busy: AtomicUsize,
    /// tasks not yet done
    left: AtomicUsize,
    f: F,
}

impl<I, R, F: Fn(usize, I) -> R> Shared<I, R, F> {
    /// Participant `p`'s share: tasks until the queue is empty, with their indices. The
    /// queue's lock is held only to take an item, never while a task runs, so a panicking
    /// task cannot poison it.
    fn work(&self, p: usize) -> Vec<(usize, R)> {
        let mut mine = Vec::new();
        loop {
            let next = lock(&self.queue).claim(p);
            let Some((k, item)) = next else { return mine };
            mine.push((k, (self.f)(k, item)));
            self.left.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// A lock that a panic elsewhere does not make unusable (the data behind it stays valid:
/// nothing is left half-written while it is held).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Wait while `busy()` holds, for at most `limit`, without sleeping: spinning for the
/// first [`SPIN_ONLY_FOR`], then yielding the CPU each round to any other runnable thread
/// (which returns at once on an idle machine), so that with more threads than cores the
/// waiting ones do not hold a core the working ones need (spinning throughout made a
/// 4-thread pool on 2 cores 0.44-1.25x as fast as the old hand-over to the pool).
fn spin_while(limit: Duration, busy: impl Fn() -> bool) {
    let start = Instant::now();
    while busy() {
        let waited = start.elapsed();
        if waited >= limit {
            return;
        }
        if waited < SPIN_ONLY_FOR {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
}

/// How long a wait spins before it starts yielding.
const SPIN_ONLY_FOR: Duration = Duration::from_micros(20);

/// Inside the scope `s`: start `helpers` jobs that take tasks, hand their results over
/// and linger, take tasks here, then wait for the helpers before the scope's end blocks.
fn share<'s, I: Send, R: Send, F: Fn(usize, I) -> R + Sync>(
    s: &rayon::Scope<'s>,
    helpers: usize,
    shared: &'s Shared<I, R, F>,
) -> Vec<(usize, R)> {
    for p in 1..=helpers {
        s.spawn(move |_| {
            shared.busy.fetch_add(1, Ordering::AcqRel);
            let mine = shared.work(p);
            lock(&shared.theirs).extend(mine);
            spin_while(LINGER_FOR, || shared.left.load(Ordering::Acquire) > 0);
            shared.busy.fetch_sub(1, Ordering::AcqRel);
        });
    }
    let mine = shared.work(0);
    spin_while(SPIN_FOR, || shared.busy.load(Ordering::Acquire) > 0);
    mine
}

/// The tasks of a fork-join: participant p owns the p-th of as many contiguous segments
/// as there are participants and takes its tasks in order ([`Order::Forward`]: from the
/// front; [`Order::Backward`]: from the back), so that each thread streams through one
/// contiguous stretch of memory (as rayon's halving split does); a participant whose
/// segment is empty takes a task from the other end of the fullest one.
struct Queue<I> {
    items: Vec<Option<I>>,
    /// per participant: its segment's next and end index (the tasks left are next..end)
    next: Vec<usize>,
    end: Vec<usize>,
    order: Order,
}

impl<I> Queue<I> {
    fn new(items: impl Iterator<Item = I>, participants: usize, order: Order) -> Queue<I> {
        let items: Vec<Option<I>> = items.map(Some).collect();
        let n = items.len();
        let bound = |p: usize| p * n / participants;
        Queue {
            items,
            next: (0..participants).map(bound).collect(),
            end: (1..=participants).map(bound).collect(),
            order,
        }
    }

    /// The next task of participant `p` and its index.
    fn claim(&mut self, p: usize) -> Option<(usize, I)> {
        let (q, own) = if self.next[p] < self.end[p] {
            (p, true)
        } else {
            let q = (0..self.next.len()).max_by_key(|&q| self.end[q] - self.next[q])?;
            if self.end[q] == self.next[q] {
                return None;
            }
            (q, false)
        };
        // the owner takes from its end of the segment, a thief from the other
        let k = if own == (self.order == Order::Forward) {
            self.next[q] += 1;
            self.next[q] - 1
        } else {
            self.end[q] -= 1;
            self.end[q]
        };
        self.items[k].take().map(|item| (k, item))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_come_back_in_task_order() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        for helpers in 0..4 {
            for order in [Order::Forward, Order::Backward] {
                let mut out = vec![(7, 7)];
                fork_join(Some(&pool), helpers, ((0..1000).map(|i| i * 2), order), |k, v| (k, v + 1), &mut out);
                assert_eq!(out, (0..1000).map(|k| (k, 2 * k + 1)).collect::<Vec<_>>());
                let mut out = vec![1u8];
                fork_join(None, helpers, (std::iter::empty::<u8>(), order), |_, v| v, &mut out);
                assert!(out.is_empty());
            }
        }
    }

    #[test]
    fn queue_gives_each_owner_its_segment_in_order_then_steals_from_the_other_end() {
        // segments 0..3, 3..6, 6..10; per order: (participant, task it gets) in turn, with
        // participant 1's fifth claim stealing from the fullest segment (2's), then what
        // participant 0 takes to the end
        let scripts = [
            (Order::Forward, [(1, 3), (0, 0), (1, 4), (1, 5), (1, 9), (2, 6)], vec![1, 2, 7, 8]),
            (Order::Backward, [(1, 5), (0, 2), (1, 4), (1, 3), (1, 6), (2, 9)], vec![0, 1, 7, 8]),
        ];
        for (order, claims, rest) in scripts {
            let mut q = Queue::new(10..20, 3, order);
            for (p, k) in claims {
                assert_eq!(q.claim(p), Some((k, 10 + k)), "{order:?}, participant {p}");
            }
            let mut left: Vec<usize> = std::iter::from_fn(|| q.claim(0)).map(|(k, _)| k).collect();
            left.sort_unstable();
            assert_eq!(left, rest, "{order:?}");
            assert_eq!(q.claim(1), None);
            assert_eq!(q.claim(2), None);
            assert_eq!(Queue::new(0..0, 2, order).claim(0), None);
            // more participants than tasks
            let mut q = Queue::new(0..2, 5, order);
            let mut got: Vec<usize> = (0..5).filter_map(|p| q.claim(p)).map(|(k, _)| k).collect();
            got.sort_unstable();
            assert_eq!(got, vec![0, 1], "{order:?}");
        }
    }

    #[test]
    fn a_lone_caller_runs_backward_tasks_last_first() {
        let seen = Mutex::new(Vec::new());
        let mut out = Vec::new();
        fork_join(
            None,
            0,
            (10..15, Order::Backward),
            |k, v| {
                lock(&seen).push(k);
                v * 2
            },
            &mut out,
        );
        assert_eq!(out, vec![20, 22, 24, 26, 28]);
        assert_eq!(*lock(&seen), vec![4, 3, 2, 1, 0]);
    }

    #[test]
    fn a_panicking_task_reaches_the_caller() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let task = |k, _| {
                assert!(k != 57, "task 57");
                k
            };
            fork_join(Some(&pool), 1, (0..100, Order::Forward), task, &mut Vec::new());
        }));
        assert!(r.is_err());
        // the pool still works afterwards
        let mut out = Vec::new();
        fork_join(Some(&pool), 1, (0..3, Order::Backward), |k, _| k, &mut out);
        assert_eq!(out, vec![0, 1, 2]);
    }
}
