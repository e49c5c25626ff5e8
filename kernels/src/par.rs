//! Data parallelism that degrades to a plain loop without `std`.

/// Runs `f(i, chunk)` for every `chunk_len`-sized chunk of `data` (the last may be
/// shorter), on up to `threads` threads when `std` is enabled.
pub fn for_each_chunk<T: Send, F>(data: &mut [T], chunk_len: usize, threads: usize, f: F)
where
    F: Fn(usize, &mut [T]) + Sync + Send,
{
    assert!(chunk_len > 0, "chunk_len must be positive");
    #[cfg(feature = "std")]
    if threads > 1 {
        use rayon::prelude::*;
        data.par_chunks_mut(chunk_len)
            .enumerate()
            .for_each(|(i, c)| f(i, c));
        return;
    }
    let _ = threads;
    for (i, c) in data.chunks_mut(chunk_len).enumerate() {
        f(i, c);
    }
}

/// Runs `f` on a worker thread of the pool (with `std`; without, on the caller).
///
/// Parallel work started from a worker is queued on that worker's own deque; started
/// from outside, it is injected into a shared queue that allocates a block every few
/// dozen jobs. A decode loop run inside `install` therefore allocates nothing per
/// token, on any number of threads.
pub fn install<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    #[cfg(feature = "std")]
    {
        rayon::scope(|_| f())
    }
    #[cfg(not(feature = "std"))]
    {
        f()
    }
}

/// Starts the pool and returns once every worker thread has run a task, so the
/// threads' start-up allocations happen now rather than during later work (std; a
/// no-op without).
pub fn warm_up() {
    #[cfg(feature = "std")]
    rayon::broadcast(|_| ());
}

/// The most worker threads the command lines accept. Far above any board or host
/// cap runs on (the largest x86 servers have a few hundred hardware threads); far below
/// the counts where spawning fails (5000 failed the pool's start-up and a later use
/// panicked; 100000 hung).
pub const MAX_THREADS: usize = 1024;

/// Sets the number of worker threads used by every parallel kernel in this process.
/// Only the first call has an effect (the pool is global); returns whether it did.
#[cfg(feature = "std")]
pub fn init_threads(threads: usize) -> bool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .build_global()
        .is_ok()
}

/// Number of worker threads the parallel kernels use.
pub fn current_threads() -> usize {
    #[cfg(feature = "std")]
    {
        rayon::current_num_threads()
    }
    #[cfg(not(feature = "std"))]
    {
        1
    }
}
