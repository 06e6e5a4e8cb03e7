// SPDX-License-Identifier: GPL-2.0-only
//! Bounded waiting and delayed work: the two ways the filter waits.
//!
//! Every wait of the module is [`WaitQueue::wait_until`] with a timeout, on
//! a condition that a completion (a bio's end, a count reaching zero) makes
//! true and then wakes the queue. Nothing polls (a wait longer than the
//! timer wheel's first level checks its condition again at its steps).
//! [`DelayedWork`] is the kernel timer that ends a write hold at its
//! deadline, in process context on the module's own workqueue. Neither is
//! late by more than the timer wheel's first level allows (under two
//! jiffies), whatever the timeout.

use core::{cell::UnsafeCell, mem::MaybeUninit, ptr};

use kernel::{
    bindings, c_str, init::pin_init_from_closure, prelude::*, time::Ktime, types::Opaque,
};

/// A lockdep class key (`struct lock_class_key`) in static storage, as
/// lockdep requires.
#[repr(transparent)]
struct ClassKey(UnsafeCell<bindings::lock_class_key>);

// SAFETY: Only lockdep touches the key, under its own locking.
unsafe impl Sync for ClassKey {}

impl ClassKey {
    const fn new() -> Self {
        // SAFETY: An all-zero key is what static storage would hold.
        Self(UnsafeCell::new(unsafe { core::mem::zeroed() }))
    }

    fn as_ptr(&'static self) -> *mut bindings::lock_class_key {
        self.0.get()
    }
}

/// The lock class of every [`WaitQueue`]'s spinlock.
static WAIT_KEY: ClassKey = ClassKey::new();
/// The lockdep classes of [`DelayedWork`]'s work and timer.
static WORK_KEY: ClassKey = ClassKey::new();
static TIMER_KEY: ClassKey = ClassKey::new();

/// A wait queue (`wait_queue_head_t`).
///
/// # Invariants
///
/// `head` is initialised by [`WaitQueue::new`] and stays at its address.
#[pin_data]
pub(crate) struct WaitQueue {
    #[pin]
    head: Opaque<bindings::wait_queue_head>,
}

// SAFETY: A wait queue head is protected by its own spinlock; waking and
// waiting work from any thread.
unsafe impl Send for WaitQueue {}
// SAFETY: See `Send`.
unsafe impl Sync for WaitQueue {}

impl WaitQueue {
    /// An empty wait queue.
    pub(crate) fn new() -> impl PinInit<Self> {
        let init = move |slot: *mut Self| {
            // SAFETY: `slot` is valid, pinned memory for a `WaitQueue`;
            // `raw_get` creates no reference to uninitialised memory.
            let head = unsafe { Opaque::raw_get(ptr::addr_of!((*slot).head)) };
            // INVARIANT: The head is initialised here, in place.
            // SAFETY: `head` is valid for writes; the name and the lock
            // class key are static.
            unsafe {
                bindings::__init_waitqueue_head(
                    head,
                    c_str!("blkmig").as_char_ptr(),
                    WAIT_KEY.as_ptr(),
                )
            };
            Ok(())
        };
        // SAFETY: `init` initialises the only field and cannot fail.
        unsafe { pin_init_from_closure(init) }
    }

    /// Wakes every waiter. Callable from any context, interrupts included.
    pub(crate) fn wake_all(&self) {
        // SAFETY: The head is initialised (type invariant).
        unsafe {
            bindings::__wake_up(
                self.head.get(),
                bindings::TASK_INTERRUPTIBLE | bindings::TASK_UNINTERRUPTIBLE,
                0,
                ptr::null_mut(),
            )
        };
    }

    /// Sleeps until `cond` holds, at most `timeout_ms` milliseconds.
    /// Returns whether `cond` held. Whoever makes `cond` true must call
    /// [`WaitQueue::wake_all`] afterwards.
    ///
    /// Must be called in process context, where sleeping is allowed.
    pub(crate) fn wait_until(&self, timeout_ms: u64, cond: impl Fn() -> bool) -> bool {
        self.wait(timeout_ms, bindings::TASK_UNINTERRUPTIBLE, cond)
            .unwrap_or(false)
    }

    /// As [`WaitQueue::wait_until`], but a fatal signal ends the wait:
    /// `None` then.
    pub(crate) fn wait_until_killable(
        &self,
        timeout_ms: u64,
        cond: impl Fn() -> bool,
    ) -> Option<bool> {
        self.wait(timeout_ms, bindings::TASK_KILLABLE, cond)
    }

    /// Sleeps in `state` until `cond` holds (`Some(true)`), `timeout_ms`
    /// have passed (`Some(false)`) or, in a killable state, a fatal signal
    /// is pending (`None`).
    fn wait(&self, timeout_ms: u64, state: u32, cond: impl Fn() -> bool) -> Option<bool> {
        let ns = i64::try_from(timeout_ms)
            .unwrap_or(i64::MAX)
            .saturating_mul(1_000_000);
        let end_ns = Ktime::ktime_get().to_ns().saturating_add(ns);
        let mut entry = MaybeUninit::<bindings::wait_queue_entry>::zeroed();
        let entry = entry.as_mut_ptr();
        // SAFETY: `entry` is valid for writes and is not moved until
        // `finish_wait` below has taken it off the queue.
        unsafe { bindings::init_wait_entry(entry, 0) };
        let done = loop {
            // SAFETY: The head is initialised; `entry` is initialised and
            // pinned on this stack frame. Queueing before the check is what
            // keeps a wake-up between check and sleep from being lost.
            let queued =
                unsafe { bindings::prepare_to_wait_event(self.head.get(), entry, state as i32) };
            let signalled = queued != 0;
            if cond() {
                break Some(true);
            }
            if signalled {
                // Only a killable sleep is ended by a (fatal) signal.
                break None;
            }
            let left_ns = end_ns.saturating_sub(Ktime::ktime_get().to_ns());
            if left_ns <= 0 {
                break Some(false);
            }
            // What is left of the timeout, from its fixed end (a sleep may
            // end a jiffy after its expiry: counted from the clock, that
            // cannot add up over the steps), at most the wheel's first
            // level at a time: a longer sleep would be rounded up past the
            // end (see `armed_delay`).
            let ms = u32::try_from(left_ns.saturating_add(999_999) / 1_000_000).unwrap_or(u32::MAX);
            let jiffies = kernel::time::msecs_to_jiffies(ms).min(WHEEL_FINE - 1);
            // `schedule_timeout` takes a C `long`, `isize` in the kernel's
            // bindings; `jiffies` is under `WHEEL_FINE`.
            let step = isize::try_from(jiffies).unwrap_or(1);
            // SAFETY: Process context (caller's requirement), task state
            // set by `prepare_to_wait_event`.
            unsafe { bindings::schedule_timeout(step) };
        };
        // SAFETY: `entry` was queued on this head by `prepare_to_wait_event`.
        unsafe { bindings::finish_wait(self.head.get(), entry) };
        done
    }
}

/// Delays shorter than this many jiffies sit in the timer wheel's first
/// level, whose timers fire within a jiffy of their expiry; longer ones
/// land in coarser levels that round them up by up to a granularity of
/// theirs (`LVL_START` and `calc_index()` in `kernel/time/timer.c`).
pub(crate) const WHEEL_FINE: usize = 63;

/// The delay to arm for `jiffies`. The wheel fires a timer a jiffy after
/// its expiry at the earliest, and `jiffies` is rounded up from the
/// caller's milliseconds already: in the first level the delay is armed a
/// jiffy short, so that the timer fires within the tick before the
/// deadline (which the work functions take as the deadline). Beyond the
/// first level, short by an eighth of `jiffies` and a jiffy: a level whose
/// granularity is `8^n` jiffies holds delays of at least `63 * 8^(n-1)`,
/// and an eighth of those plus one exceeds `8^n`, so the rounding cannot
/// make the timer late, only early. Less than two jiffies: as asked.
const fn armed_delay(jiffies: usize) -> usize {
    if jiffies < 2 {
        jiffies
    } else if jiffies < WHEEL_FINE {
        jiffies - 1
    } else {
        jiffies - jiffies / 8 - 1
    }
}

/// A `struct delayed_work` that runs `func` on a workqueue after a delay.
///
/// # Invariants
///
/// `work` is initialised by [`DelayedWork::new`] and stays at its address.
#[pin_data]
#[repr(transparent)]
pub(crate) struct DelayedWork {
    #[pin]
    work: Opaque<bindings::delayed_work>,
}

// SAFETY: Queueing and cancelling delayed work is safe from any thread.
unsafe impl Send for DelayedWork {}
// SAFETY: See `Send`.
unsafe impl Sync for DelayedWork {}

impl DelayedWork {
    /// Delayed work that calls `func` with the address of its
    /// `work_struct`, which [`DelayedWork::from_work`] turns back into the
    /// `DelayedWork`.
    pub(crate) fn new(
        func: unsafe extern "C" fn(*mut bindings::work_struct),
    ) -> impl PinInit<Self> {
        let init = move |slot: *mut Self| {
            // SAFETY: `slot` is valid, pinned memory for a `DelayedWork`.
            let dw = unsafe { Opaque::raw_get(ptr::addr_of!((*slot).work)) };
            // INVARIANT: Both halves are initialised here, in place, as
            // `INIT_DELAYED_WORK` does.
            // SAFETY: `dw` is valid for writes; names and keys are static.
            unsafe {
                ptr::write_bytes(dw, 0, 1);
                bindings::init_work_with_key(
                    ptr::addr_of_mut!((*dw).work),
                    Some(func),
                    false,
                    c_str!("blkmig_work").as_char_ptr(),
                    WORK_KEY.as_ptr(),
                );
                bindings::init_timer_key(
                    ptr::addr_of_mut!((*dw).timer),
                    Some(bindings::delayed_work_timer_fn),
                    bindings::TIMER_IRQSAFE,
                    c_str!("blkmig_timer").as_char_ptr(),
                    TIMER_KEY.as_ptr(),
                );
            }
            Ok(())
        };
        // SAFETY: `init` initialises the only field and cannot fail.
        unsafe { pin_init_from_closure(init) }
    }

    /// Runs the work on `wq` in about `ms` milliseconds, or moves it there
    /// if it is pending already. It may run early, by up to an eighth of
    /// the delay: the work function checks its own deadline and arms again
    /// for the rest. The wheel rounds a delay of [`WHEEL_FINE`] jiffies or
    /// more up by 8 jiffies or more (32 ms at 250 Hz for a 1 s hold), so
    /// such a delay is armed short of that rounding, and a shorter one a
    /// jiffy short of the wheel's own (see `armed_delay`).
    pub(crate) fn schedule(&self, wq: &WorkQueue, ms: u32) {
        let delay = armed_delay(kernel::time::msecs_to_jiffies(ms));
        // SAFETY: The work is initialised (type invariant); `wq` is live.
        unsafe {
            bindings::mod_delayed_work_on(
                bindings::wq_misc_consts_WORK_CPU_UNBOUND as i32,
                wq.0,
                self.work.get(),
                delay,
            )
        };
    }

    /// Cancels the work and waits for a running instance to finish.
    pub(crate) fn cancel_sync(&self) {
        // SAFETY: The work is initialised (type invariant).
        unsafe { bindings::cancel_delayed_work_sync(self.work.get()) };
    }

    /// The `DelayedWork` whose work function was called with `work`.
    ///
    /// # Safety
    ///
    /// `work` must be the argument a work function set up by
    /// [`DelayedWork::new`] was called with.
    pub(crate) unsafe fn from_work(work: *mut bindings::work_struct) -> *const Self {
        // SAFETY: `work` is the `work` field of a `delayed_work` (caller's
        // guarantee), which `DelayedWork` wraps transparently.
        unsafe { kernel::container_of!(work, bindings::delayed_work, work).cast::<Self>() }
    }
}

/// A workqueue of the module's own, usable in memory reclaim (it has a
/// rescuer thread) and served by high-priority workers, as `kblockd` is:
/// held writes are resubmitted from it, and a writer waits for that. It is
/// unbound: its work runs on whichever CPU is free, not behind a busy task
/// on the CPU whose timer queued it.
///
/// # Invariants
///
/// The pointer is a live workqueue owned by this object.
pub(crate) struct WorkQueue(*mut bindings::workqueue_struct);

// SAFETY: Workqueues can be used and destroyed from any thread.
unsafe impl Send for WorkQueue {}
// SAFETY: See `Send`.
unsafe impl Sync for WorkQueue {}

impl WorkQueue {
    /// Allocates a high-priority, unbound workqueue for memory reclaim,
    /// named `name` (no `%` conversions). Its work items run concurrently
    /// (the default `max_active`): one that sleeps, such as a submission
    /// to a frozen queue, never delays another, such as the end of a hold.
    /// High priority: the end of a hold is not kept waiting behind the
    /// busy tasks whose writes it releases.
    pub(crate) fn new(name: &'static CStr) -> Result<Self> {
        let flags = bindings::wq_flags_WQ_UNBOUND
            | bindings::wq_flags_WQ_MEM_RECLAIM
            | bindings::wq_flags_WQ_HIGHPRI;
        // SAFETY: `name` is a static string used as the format string; the
        // module's names have no conversions.
        let wq = unsafe { bindings::alloc_workqueue(name.as_char_ptr(), flags, 0) };
        if wq.is_null() {
            return Err(ENOMEM);
        }
        // INVARIANT: Just allocated and owned.
        Ok(Self(wq))
    }
}

impl Drop for WorkQueue {
    fn drop(&mut self) {
        // SAFETY: Owned (type invariant); the owner cancelled its work.
        unsafe { bindings::destroy_workqueue(self.0) };
    }
}
