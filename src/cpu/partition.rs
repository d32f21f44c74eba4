//! How CPU work is cut into rayon tasks.
//!
//! Reductions over channels-first data split by channel when there are enough channels to
//! keep every thread busy, and additionally split each channel's N runs when there are not
//! (C smaller than a few times the thread count), merging the partial statistics after.
//! Element-wise passes and channels-last reductions split by rows / runs.

use std::ops::Range;

/// Tasks per thread to aim for: enough to balance uneven tasks, few enough to stay cheap.
const TASKS_PER_THREAD: usize = 4;

/// Elements an element-wise task should cover at least (amortizes task overhead).
const MIN_TASK_ELEMS: usize = 16 * 1024;

/// A split of channels-first reductions into `c * parts` tasks.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Split {
    pub n: usize,
    pub parts: usize,
}

impl Split {
    /// `parts` pieces per channel so that `c * parts` is about `TASKS_PER_THREAD * threads`,
    /// never cutting a channel into pieces smaller than `MIN_TASK_ELEMS`.
    pub(crate) fn runs(n: usize, c: usize, s: usize, threads: usize) -> Split {
        let want = (TASKS_PER_THREAD * threads).div_ceil(c);
        let by_size = (n * s / MIN_TASK_ELEMS).max(1);
        Split { n, parts: want.min(by_size).min(n).max(1) }
    }

    /// Channel and batch range of task `t`.
    pub(crate) fn task(&self, t: usize) -> (usize, Range<usize>) {
        let (ch, p) = (t / self.parts, t % self.parts);
        (ch, p * self.n / self.parts..(p + 1) * self.n / self.parts)
    }
}

/// Rows of `[rows][c]` per task.
pub(crate) fn rows_per_task(rows: usize, c: usize, threads: usize) -> usize {
    let by_threads = rows.div_ceil(TASKS_PER_THREAD * threads);
    let by_size = MIN_TASK_ELEMS.div_ceil(c);
    by_threads.max(by_size).clamp(1, rows.max(1))
}

/// Rows of `[rows][c]` per reduction task: one task per thread (each task's partial costs
/// a per-channel merge, C of them, so fewer tasks win once C is large), never cutting
/// the rows finer than the element-wise tasks.
pub(crate) fn rows_per_reduce_task(rows: usize, c: usize, threads: usize) -> usize {
    rows.div_ceil(threads.max(1)).max(rows_per_task(rows, c, threads))
}

/// Contiguous runs of length `s` (of `runs` in all) per element-wise task: cut as
/// [`rows_per_task`] cuts rows, about [`TASKS_PER_THREAD`] per thread. Tasks of the
/// minimum size alone (16 Ki values, ~400 of them in a 32x256x28x28 pass) took 7-9 % of
/// f16 channels-first inference on a 2-core Xeon: each claim passes the queue's lock
/// between the cores (0.47 -> 0.44 ms at 32x256x28x28, 0.95 -> 0.88 ms at 32x512x28x28).
pub(crate) fn runs_per_task(runs: usize, s: usize, threads: usize) -> usize {
    rows_per_task(runs, s, threads)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_covers_every_batch_index_once() {
        for (n, c, s, t) in [(32, 3, 50176, 2), (1, 1, 10, 8), (7, 2, 100_000, 16), (256, 2048, 49, 2)] {
            let sp = Split::runs(n, c, s, t);
            for ch in 0..c {
                let mut seen = vec![0; n];
                for p in 0..sp.parts {
                    let (c2, r) = sp.task(ch * sp.parts + p);
                    assert_eq!(c2, ch);
                    r.for_each(|i| seen[i] += 1);
                }
                assert!(seen.iter().all(|&k| k == 1));
            }
        }
        // few channels, lots of data: every thread gets work
        assert!(Split::runs(32, 3, 50176, 2).parts * 3 >= 8);
    }

    #[test]
    fn element_wise_tasks_are_a_few_per_thread_and_not_tiny() {
        for (runs, s, threads) in [(32 * 256, 784, 2), (32 * 2048, 49, 2), (32 * 64, 12544, 16), (1000, 1, 4)] {
            let per = runs_per_task(runs, s, threads);
            let tasks = runs.div_ceil(per);
            assert!(tasks <= TASKS_PER_THREAD * threads, "{runs}x{s} on {threads}: {tasks} tasks");
            assert!(per * s >= MIN_TASK_ELEMS.min(runs * s), "{runs}x{s} on {threads}: {per} runs per task");
        }
        // enough work keeps every thread busy
        assert!((32 * 256usize).div_ceil(runs_per_task(32 * 256, 784, 2)) >= 2);
    }

    #[test]
    fn rows_per_task_is_positive_and_bounded() {
        assert_eq!(rows_per_task(1, 3, 2), 1);
        assert!(rows_per_task(100_000, 64, 2) >= 256);
        assert!(rows_per_task(100_000, 64, 2) <= 100_000);
    }
}
