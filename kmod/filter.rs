// SPDX-License-Identifier: GPL-2.0-only
//! Safe abstraction of the block device filter interface
//! (`include/linux/blk-filter.h`, added by `patches/0001-*.patch`).
//!
//! A [`Filter`] implementation is registered with [`Registration`]. The C
//! core calls the `*_callback` functions below, which recover the filter
//! object stored in `blkfilter::private` and call the trait methods.

use core::{ffi::c_void, marker::PhantomData, ptr};

use kernel::{
    bindings,
    error::{from_result, to_result},
    init::pin_init_from_closure,
    prelude::*,
    types::Opaque,
    uaccess::UserSlice,
};

use crate::{bdev::BlockDevice, bio::Bio};

/// A block device filter.
///
/// One object of the implementing type exists per attachment; it is created
/// by [`Filter::attach`] and dropped at detach (or when the filtered device
/// goes away), after the core has made sure that no [`Filter::submit_bio`]
/// call is running or can start.
pub(crate) trait Filter: Sized + Send + Sync {
    /// Name user space attaches the filter by.
    const NAME: &'static CStr;

    /// Sets up a filter for `bdev` with the user's options `opt`.
    ///
    /// Runs in process context with the source queue not frozen: it may
    /// sleep, allocate with `GFP_KERNEL` and open other devices.
    fn attach(bdev: &BlockDevice, opt: &[u8], holder: Holder) -> Result<Pin<KBox<Self>>>;

    /// Whether `BLKFILTER_DETACH` may detach the filter now.
    fn may_detach(&self) -> Result {
        Ok(())
    }

    /// A filter-specific command. `len` is the size of `buf` on entry and
    /// must be set to the bytes written to `buf` on success.
    fn ctl(&self, _cmd: u32, _buf: UserSlice, _len: &mut u32) -> Result {
        Err(Error::from_errno(-(bindings::EOPNOTSUPP as i32)))
    }

    /// Whether the filter serves every bio of its device without the
    /// device's own queue (nor any other device of its disk), and will
    /// until it is detached. Asked once, when the disk of the open device
    /// goes away: if so, the device's users carry on and the filter stays
    /// attached until the last of them closes it. Called under a global
    /// mutex and RCU: must not sleep.
    fn serving(&self) -> bool {
        false
    }

    /// A bio for the filtered device. Returns `None` if the filter took
    /// it (and will finish it), or gives it back to let it pass.
    ///
    /// Runs in the submitter's context, ahead of queue entry: must not
    /// wait for I/O, and allocates with `GFP_NOIO` only. It may keep the
    /// bio and resubmit it later from another context.
    fn submit_bio(&self, bio: Bio) -> Option<Bio>;

    /// A device the filter opened with its [`Holder`] is going away.
    /// Called with the device's holder lock held: must not sleep or open
    /// or close devices.
    fn holder_dead(&self);
}

/// A unique holder cookie for exclusive opens made by one attachment (the
/// address of its `struct blkfilter`, which lives as long as the filter),
/// with the holder operations that reach the filter.
#[derive(Clone, Copy)]
pub(crate) struct Holder {
    flt: *mut bindings::blkfilter,
    ops: &'static bindings::blk_holder_ops,
}

impl Holder {
    /// The raw holder pointer for `bdev_file_open_by_dev()`.
    pub(crate) fn as_ptr(self) -> *mut c_void {
        self.flt.cast()
    }

    /// The holder operations for `bdev_file_open_by_dev()`.
    pub(crate) fn ops(self) -> *const bindings::blk_holder_ops {
        self.ops
    }
}

/// The holder operations of filter `T`, as a `'static` table.
struct HolderOps<T>(PhantomData<T>);

impl<T: Filter> HolderOps<T> {
    const OPS: bindings::blk_holder_ops = bindings::blk_holder_ops {
        mark_dead: Some(mark_dead_callback::<T>),
        sync: None,
        freeze: None,
        thaw: None,
    };
}

/// Registration of a [`Filter`] with the block layer.
///
/// # Invariants
///
/// `ops` is registered with `blkfilter_register()` for as long as `self`
/// exists, and its callbacks are those of `T`.
#[pin_data(PinnedDrop)]
pub(crate) struct Registration<T: Filter> {
    #[pin]
    ops: Opaque<bindings::blkfilter_operations>,
    _filter: PhantomData<T>,
}

// SAFETY: The registration only holds the C operations table, which the
// block layer accesses under its own locking; it can be shared and sent
// between threads.
unsafe impl<T: Filter> Sync for Registration<T> {}
// SAFETY: See above.
unsafe impl<T: Filter> Send for Registration<T> {}

impl<T: Filter> Registration<T> {
    /// Registers filter `T`, owned by `module`.
    pub(crate) fn new(module: &'static ThisModule) -> impl PinInit<Self, Error> {
        let init = move |slot: *mut Self| {
            // SAFETY: `slot` is valid for writes and pinned (guaranteed by
            // the caller of the initializer); `addr_of_mut!` creates no
            // reference to the uninitialised memory.
            let ops = unsafe { Opaque::raw_get(core::ptr::addr_of_mut!((*slot).ops)) };
            let table = bindings::blkfilter_operations {
                // SAFETY: All-zero is a valid `list_head`; the core
                // initialises it in `blkfilter_register()`.
                link: unsafe { core::mem::zeroed() },
                owner: module.as_ptr(),
                name: T::NAME.as_char_ptr(),
                attach: Some(attach_callback::<T>),
                may_detach: Some(may_detach_callback::<T>),
                detach: Some(detach_callback::<T>),
                ctl: Some(ctl_callback::<T>),
                serving: Some(serving_callback::<T>),
                submit_bio: Some(submit_bio_callback::<T>),
            };
            // SAFETY: `ops` is valid for writes (see above).
            unsafe { ops.write(table) };
            // INVARIANT: On success `ops` is registered until `drop`; on
            // error no `Registration` comes into existence.
            // SAFETY: `ops` points to a fully initialised operations table
            // that stays at this address (pinned) until `drop`, which
            // unregisters it.
            to_result(unsafe { bindings::blkfilter_register(ops) })
        };
        // SAFETY: On success `init` has initialised `ops` (and
        // `_filter` is a ZST); on error it leaves nothing registered.
        unsafe { pin_init_from_closure(init) }
    }
}

#[pinned_drop]
impl<T: Filter> PinnedDrop for Registration<T> {
    fn drop(self: Pin<&mut Self>) {
        // SAFETY: By the type invariant `ops` is registered. No attached
        // instance exists (each holds a reference on our module).
        unsafe { bindings::blkfilter_unregister(self.ops.get()) };
    }
}

/// Returns the filter object stored in `flt`.
///
/// # Safety
///
/// `flt` must be a `struct blkfilter` whose `private` was set by
/// [`attach_callback::<T>`] and has not yet been released by
/// [`detach_callback::<T>`]; the returned reference must not be used after
/// that.
unsafe fn filter<'a, T: Filter>(flt: *mut bindings::blkfilter) -> &'a T {
    // SAFETY: By the function's safety requirements `private` points to a
    // live `T` that is only shared between callbacks.
    unsafe { &*(*flt).private.cast::<T>() }
}

/// # Safety
///
/// Called by the block layer only: `flt` is a valid, exclusively owned
/// `struct blkfilter` with `bdev` set, and `opt` points to `optlen` bytes
/// (or `optlen` is 0).
unsafe extern "C" fn attach_callback<T: Filter>(
    flt: *mut bindings::blkfilter,
    opt: *const c_void,
    optlen: u32,
) -> core::ffi::c_int {
    from_result(|| {
        let opt: &[u8] = if optlen == 0 || opt.is_null() {
            &[]
        } else {
            // SAFETY: The core passes a kernel copy of `optlen` bytes that
            // stays valid during this call.
            unsafe { core::slice::from_raw_parts(opt.cast::<u8>(), optlen as usize) }
        };
        // SAFETY: `flt->bdev` is the device being attached to; it stays
        // valid while the filter is attached (see the callback's safety
        // requirements).
        let bdev = unsafe { BlockDevice::from_raw((*flt).bdev) };
        let holder = Holder {
            flt,
            ops: &HolderOps::<T>::OPS,
        };
        let obj = T::attach(bdev, opt, holder)?;
        // SAFETY: The object is never moved out of its allocation: it is
        // only accessed by reference until `detach_callback` rebuilds the
        // pinned box and drops it in place.
        let raw = KBox::into_raw(unsafe { Pin::into_inner_unchecked(obj) });
        // SAFETY: `flt` is valid and owned by this attach call. Volatile:
        // the holder callback of the target, opened above, may read it.
        unsafe { ptr::write_volatile(ptr::addr_of_mut!((*flt).private), raw.cast()) };
        Ok(0)
    })
}

/// # Safety
///
/// Called by the block layer only, on an attached filter.
unsafe extern "C" fn may_detach_callback<T: Filter>(
    flt: *mut bindings::blkfilter,
) -> core::ffi::c_int {
    // SAFETY: The filter is attached, so `private` is live.
    let f = unsafe { filter::<T>(flt) };
    from_result(|| f.may_detach().map(|()| 0))
}

/// # Safety
///
/// Called by the block layer only, once, after the filter was taken off its
/// device (no `submit_bio_callback` running or to come) and with no other
/// callback running.
unsafe extern "C" fn detach_callback<T: Filter>(flt: *mut bindings::blkfilter) {
    // SAFETY: `private` was produced by `KBox::into_raw` in
    // `attach_callback` and is released exactly once, here.
    let obj = unsafe { KBox::from_raw((*flt).private.cast::<T>()) };
    // SAFETY: The object was pinned when it was stored and is dropped in
    // place.
    drop(unsafe { Pin::new_unchecked(obj) });
    // SAFETY: `flt` is valid; nothing reads `private` any more.
    unsafe { (*flt).private = core::ptr::null_mut() };
}

/// # Safety
///
/// Called by the block layer only, on an attached filter.
unsafe extern "C" fn serving_callback<T: Filter>(flt: *mut bindings::blkfilter) -> bool {
    // SAFETY: The filter is attached, so `private` is live.
    let f = unsafe { filter::<T>(flt) };
    f.serving()
}

/// # Safety
///
/// Called by the block layer only, on an attached filter, with `len` valid
/// and `buf` a user pointer.
unsafe extern "C" fn ctl_callback<T: Filter>(
    flt: *mut bindings::blkfilter,
    cmd: u32,
    buf: *mut c_void,
    len: *mut u32,
) -> core::ffi::c_int {
    // SAFETY: The filter is attached, so `private` is live.
    let f = unsafe { filter::<T>(flt) };
    // SAFETY: `len` is valid for reads and writes during the call.
    let len = unsafe { &mut *len };
    let user = UserSlice::new(buf as usize, *len as usize);
    from_result(|| f.ctl(cmd, user, len).map(|()| 0))
}

/// # Safety
///
/// Called by the block layer only, on an attached filter (under the
/// filter SRCU read lock, which keeps detach from completing), with `bio` a
/// valid bio the caller hands over.
unsafe extern "C" fn submit_bio_callback<T: Filter>(
    flt: *mut bindings::blkfilter,
    bio: *mut bindings::bio,
) -> bool {
    // SAFETY: The filter is attached, so `private` is live.
    let f = unsafe { filter::<T>(flt) };
    // SAFETY: The hook hands the bio over: we finish it or give it back.
    let Some(bio) = (unsafe { Bio::from_raw(bio) }) else {
        return false;
    };
    match f.submit_bio(bio) {
        None => true,
        Some(bio) => {
            // Given back: the hook lets it pass.
            let _ = bio.into_raw();
            false
        }
    }
}

/// # Safety
///
/// Called by the block layer only, with `bdev->bd_holder_lock` held, for a
/// device opened with a [`Holder`] of filter `T`. Releases the lock, as
/// holder operations must.
unsafe extern "C" fn mark_dead_callback<T: Filter>(
    bdev: *mut bindings::block_device,
    _surprise: bool,
) {
    // SAFETY: The holder is the `struct blkfilter` of the attachment that
    // opened the device. Closing the device clears the holder under
    // `bd_holder_lock`, which we hold, so the filter object (`private`,
    // set once attach has returned) is live while we use it.
    unsafe {
        let flt = (*bdev).bd_holder.cast::<bindings::blkfilter>();
        if !flt.is_null() && !ptr::read_volatile(ptr::addr_of!((*flt).private)).is_null() {
            filter::<T>(flt).holder_dead();
        }
        bindings::mutex_unlock(ptr::addr_of_mut!((*bdev).bd_holder_lock));
    }
}
