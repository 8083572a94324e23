//! Cache prefetch hints, for passes that reach into memory long out of the
//! cache at places known a few steps ahead.

/// How many items ahead a pass over scattered ones asks for them: enough
/// for the waits to overlap, few enough that what comes in is still there
/// when the pass gets to it.
pub const AHEAD: usize = 8;

/// Starts loading the cache line at `p` (a hint: it never faults).
#[inline(always)]
pub fn line<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // Safety: prefetching has no effect on the program's state.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Starts loading every cache line of the `T` at `p`, which need not be
/// valid: a hint.
#[inline(always)]
pub fn all<T>(p: *const T) {
    let p = p.cast::<u8>();
    for at in (0..core::mem::size_of::<T>()).step_by(64) {
        line(p.wrapping_add(at));
    }
}
