// SPDX-License-Identifier: GPL-2.0-only
//! Safe wrappers of the few kernel services the filter uses besides block
//! I/O: the wall clock, randomness, and RCU grace periods.

use kernel::bindings;

/// Seconds since the epoch (`ktime_get_real_seconds()`).
pub(crate) fn wall_clock_seconds() -> u64 {
    // SAFETY: Reads the clock; no preconditions.
    let s = unsafe { bindings::ktime_get_real_seconds() };
    u64::try_from(s).unwrap_or(0)
}

/// A random number (`get_random_u64()`).
pub(crate) fn random_u64() -> u64 {
    // SAFETY: No preconditions.
    unsafe { bindings::get_random_u64() }
}

/// Waits for an RCU grace period: every CPU has left the code it was
/// running with preemption disabled or in interrupt context when this was
/// called. Process context.
pub(crate) fn synchronize_rcu() {
    // SAFETY: Called from process context (caller's requirement), with no
    // lock held that an RCU callback could need.
    unsafe { bindings::synchronize_rcu() };
}

/// An RCU read-side critical section, ended on drop.
pub(crate) struct RcuGuard(());

/// Enters an RCU read-side critical section: memory that is freed only
/// after a grace period ([`synchronize_rcu`]) stays valid until the guard
/// is dropped.
pub(crate) fn rcu_read_lock() -> RcuGuard {
    // SAFETY: Balanced by the guard's drop, in the same context.
    unsafe { bindings::rcu_read_lock() };
    RcuGuard(())
}

impl Drop for RcuGuard {
    fn drop(&mut self) {
        // SAFETY: Entered by `rcu_read_lock` when the guard was made.
        unsafe { bindings::rcu_read_unlock() };
    }
}
