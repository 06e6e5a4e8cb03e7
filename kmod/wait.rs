// SPDX-License-Identifier: GPL-2.0-only
//! Bounded waiting and delayed work: the two ways the filter waits.
//!
//! Every wait of the module is [`WaitQueue::wait_until`] with a timeout, on
//! a condition that a completion (a bio's end, a count reaching zero) makes
//! true and then wakes the queue. Nothing polls. [`DelayedWork`] is the
//! kernel timer that ends a write hold at its deadline, in process context
//! on the module's own workqueue.

use core::{cell::UnsafeCell, mem::MaybeUninit, ptr};

use kernel::{bindings, c_str, init::pin_init_from_closure, prelude::*, types::Opaque};

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
        let ms = u32::try_from(timeout_ms).unwrap_or(u32::MAX);
        // `schedule_timeout` takes a C `long`, `isize` in the kernel's bindings.
        let mut left = isize::try_from(kernel::time::msecs_to_jiffies(ms)).unwrap_or(isize::MAX);
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
            if left <= 0 {
                break Some(false);
            }
            // SAFETY: Process context (caller's requirement), task state
            // set by `prepare_to_wait_event`.
            left = unsafe { bindings::schedule_timeout(left) };
        };
        // SAFETY: `entry` was queued on this head by `prepare_to_wait_event`.
        unsafe { bindings::finish_wait(self.head.get(), entry) };
        done
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

    /// Runs the work on `wq` in `ms` milliseconds, or moves it there if it
    /// is pending already.
    pub(crate) fn schedule(&self, wq: &WorkQueue, ms: u32) {
        let delay = kernel::time::msecs_to_jiffies(ms);
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
/// rescuer thread): held writes are resubmitted from it.
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
    /// Allocates a workqueue for memory reclaim. Its work items run
    /// concurrently (the default `max_active`): one that blocks, such as a
    /// submission to a frozen queue, never delays another, such as the end
    /// of a hold.
    pub(crate) fn new() -> Result<Self> {
        // SAFETY: The format string is static and has no conversions.
        let wq = unsafe {
            bindings::alloc_workqueue(
                c_str!("blkmig").as_char_ptr(),
                bindings::wq_flags_WQ_MEM_RECLAIM,
                0,
            )
        };
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
