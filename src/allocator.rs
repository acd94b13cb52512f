//! The memory allocator's housekeeping. `kurz` runs on mimalloc (the global allocator, set in
//! `main.rs`), which keeps freed memory for reuse for a while before it returns it to the OS.
//! That is right for the many small allocations of serving, and wrong just after a snapshot
//! build freed a gigabyte: the file it wrote is mapped next, and the process would hold both.

/// Returns the memory the calling thread freed to the OS now, instead of after mimalloc's
/// delay. A few milliseconds of work: for the end of a large build, not for a hot path.
pub fn release_freed_memory() {
    // SAFETY: mi_collect takes a plain flag and only walks mimalloc's own heaps; when mimalloc
    // is not the global allocator (tests, benches) it finds nothing to collect.
    unsafe { libmimalloc_sys::mi_collect(true) }
}
