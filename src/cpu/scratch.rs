//! Per-thread reusable buffers for the CPU ops' temporaries.
//!
//! An op on thousands of channels allocates per-channel temporaries on every call: the rows
//! kernels' accumulators and f64 totals, each task's partial statistics, the per-channel
//! maps and their periodic copies, tens of KB each. Freed, they leave more than the system
//! allocator's trim threshold (glibc: 128 KiB) free at the top of the thread's heap, which
//! it hands back to the kernel; the next call faults the pages in again, and the kernel's
//! TLB shootdowns interrupt the other threads of the op. For a BatchNorm1d of 256 x 4096
//! f16 values on 2 threads that churn was a quarter of the forward and of the backward
//! (median 0.43 ms against 0.31 with glibc told not to trim, 0.60 against 0.47; 2026-11-27).
//!
//! A [`Scratch`] buffer comes from the calling thread's pool when one of its type is there
//! (else from the allocator) and goes back to the pool of the thread that drops it, so a
//! steady stream of ops of one shape allocates no per-channel temporaries (only the small
//! per-task lists of `team.rs`'s fork-joins). A pool keeps at most [`POOLED`]
//! buffers and [`POOL_BYTES`] in all, none over [`POOLED_BYTES`]; the rest are freed as
//! usual.

use std::any::Any;
use std::cell::RefCell;
use std::ops::{Deref, DerefMut};

/// Buffers a thread's pool keeps.
const POOLED: usize = 32;

/// The largest buffer a pool keeps (bigger temporaries belong to ops big enough to pay for
/// their allocation).
const POOLED_BYTES: usize = 4 << 20;

/// The most bytes a thread's pool holds.
const POOL_BYTES: usize = 16 << 20;

/// A thread's idle buffers (each a boxed `Vec<T>` with its size in bytes) and their total.
struct Pool {
    idle: Vec<(usize, Box<dyn Any>)>,
    bytes: usize,
}

thread_local! {
    static POOL: RefCell<Pool> = const { RefCell::new(Pool { idle: Vec::new(), bytes: 0 }) };
}

/// A `Vec<T>` on loan from the thread's pool; derefs to the vector.
#[derive(Debug)]
pub(crate) struct Scratch<T: 'static> {
    buf: Vec<T>,
}

impl<T: 'static> Scratch<T> {
    /// An empty buffer with room for `capacity` values.
    pub(crate) fn with_capacity(capacity: usize) -> Scratch<T> {
        Scratch { buf: take(capacity) }
    }

    /// The values of `iter` (at most `capacity` of them expected).
    pub(crate) fn collect(capacity: usize, iter: impl IntoIterator<Item = T>) -> Scratch<T> {
        let mut s = Scratch::with_capacity(capacity);
        s.buf.extend(iter);
        s
    }

    /// The vector itself (to grow, or to hand to `collect_into_vec`).
    pub(crate) fn vec(&mut self) -> &mut Vec<T> {
        &mut self.buf
    }
}

impl<T: Clone + 'static> Scratch<T> {
    /// `len` copies of `value`.
    pub(crate) fn filled(len: usize, value: T) -> Scratch<T> {
        let mut s = Scratch::with_capacity(len);
        s.buf.resize(len, value);
        s
    }
}

impl<T: 'static> Deref for Scratch<T> {
    type Target = Vec<T>;
    fn deref(&self) -> &Vec<T> {
        &self.buf
    }
}

impl<T: 'static> DerefMut for Scratch<T> {
    fn deref_mut(&mut self) -> &mut Vec<T> {
        &mut self.buf
    }
}

impl<T: 'static> Drop for Scratch<T> {
    fn drop(&mut self) {
        let mut buf = std::mem::take(&mut self.buf);
        let bytes = buf.capacity().saturating_mul(std::mem::size_of::<T>());
        if bytes == 0 || bytes > POOLED_BYTES {
            return;
        }
        buf.clear();
        // A thread being torn down has no pool any more: the buffer is then simply freed.
        let _ = POOL.try_with(|p| {
            let mut p = p.borrow_mut();
            if p.idle.len() < POOLED && p.bytes + bytes <= POOL_BYTES {
                p.bytes += bytes;
                p.idle.push((bytes, Box::new(buf)));
            }
        });
    }
}

/// An empty vector with room for `capacity` values: the smallest of that type in the pool
/// that is big enough, else a new one (an empty request takes nothing from the pool).
fn take<T: 'static>(capacity: usize) -> Vec<T> {
    if capacity == 0 {
        return Vec::new();
    }
    let pooled = POOL
        .try_with(|p| {
            let mut p = p.borrow_mut();
            let fits = |b: &Box<dyn Any>| b.downcast_ref::<Vec<T>>().map(|v| v.capacity()).filter(|&n| n >= capacity);
            let (i, _) =
                p.idle.iter().enumerate().filter_map(|(i, (_, b))| fits(b).map(|n| (i, n))).min_by_key(|&(_, n)| n)?;
            let (bytes, b) = p.idle.swap_remove(i);
            p.bytes -= bytes;
            b.downcast::<Vec<T>>().ok()
        })
        .ok()
        .flatten();
    match pooled {
        Some(v) => *v,
        None => Vec::with_capacity(capacity),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A dropped buffer is handed out again (same allocation), emptied and refilled; buffers
    /// of other types and smaller ones do not satisfy a request.
    #[test]
    fn dropped_buffers_are_reused_by_type_and_size() {
        std::thread::spawn(|| {
            let a = Scratch::filled(1000, 7.0f32);
            let at = a.as_ptr();
            drop(a);
            let b: Scratch<f64> = Scratch::filled(1000, 1.0);
            assert_ne!(b.as_ptr() as usize, at as usize, "an f32 buffer must not serve f64");
            let c = Scratch::filled(500, 0.0f32);
            assert_eq!(c.as_ptr(), at);
            assert_eq!(c.len(), 500);
            assert!(c.iter().all(|&v| v == 0.0));
            let big = Scratch::filled(5000, 0.0f32);
            let big_at = big.as_ptr();
            drop((c, big));
            let d = Scratch::filled(2000, 0.0f32);
            assert_eq!(d.as_ptr(), big_at, "the 5000-value buffer is the only one to hold 2000");
            let f = Scratch::filled(10, 0.0f32);
            assert_eq!(f.as_ptr(), at, "the smallest that fits");
            let e = Scratch::collect(3, [1u8, 2, 3]);
            assert_eq!(&e[..], &[1, 2, 3]);
            drop((d, f));
            let none: Scratch<f32> = Scratch::with_capacity(0);
            assert_eq!(none.capacity(), 0, "an empty request must not take a pooled buffer");
        })
        .join()
        .unwrap();
    }

    /// The pool keeps at most `POOLED` buffers and `POOL_BYTES`, none over
    /// `POOLED_BYTES`, and counts its bytes right as buffers come and go.
    #[test]
    fn the_pool_is_bounded() {
        std::thread::spawn(|| {
            let idle = || POOL.with(|p| (p.borrow().idle.len(), p.borrow().bytes));
            let many: Vec<Scratch<u32>> = (0..POOLED + 10).map(|_| Scratch::filled(4, 0)).collect();
            drop(many);
            assert_eq!(idle(), (POOLED, POOLED * 16));
            let again: Vec<Scratch<u32>> = (0..POOLED).map(|_| Scratch::filled(3, 0)).collect();
            assert_eq!(idle(), (0, 0));
            drop(again);
            POOL.with(|p| *p.borrow_mut() = Pool { idle: Vec::new(), bytes: 0 });
            drop(Scratch::filled(POOLED_BYTES + 1, 0u8));
            assert_eq!(idle(), (0, 0));
            let big: Vec<Scratch<u8>> = (0..5).map(|_| Scratch::filled(POOLED_BYTES, 0u8)).collect();
            drop(big);
            assert_eq!(idle(), (POOL_BYTES / POOLED_BYTES, POOL_BYTES));
        })
        .join()
        .unwrap();
    }
}
